"""The node agent: poll collectors, store each report in the outbox, send the outbox to Kafka.

`run_agent(path)` runs everything an agent TOML file (docs/agent.md) describes:
its collectors, the panel push receiver if there is a `[push]` table (standalone,
or a gateway in front of the panel with `upstream`: producers/push.py), and the
sender. A report is stamped (node, epoch, seq, observed_at, baseline) and stored
in the outbox before anything is sent; the sender publishes each node's oldest
pending report, waits for Kafka's acknowledgement of every fragment, deletes it,
and only then sends that node's next one, so reports reach the stream in order
even after an outage. Kafka down: reports pile up in the outbox (compacted past
its bound) and go out in order when it is back. SIGTERM/SIGINT: stop collecting,
try to drain for `drain_timeout_s`, stop. SIGKILL: the next start resumes from
the outbox; a report that may have been delivered is re-sent with its own seq,
which the stream deduplicates. A task that dies (a collector's loop, the sender's,
the push receiver) is logged with its traceback and ends the process with a
non-zero status, for systemd to start it again. A lost or damaged outbox is not
a first start: the agent refuses to start until `--reset-outbox` (docs/agent.md).

With an `[enforce]` table the agent also applies the quota commands of
`<prefix>.control` to the node's programs (`quotaflow.producers.enforce.consumer`, in
a thread, consumer group `<prefix>-enforce-<node_id>`). Before it disables
users it reads its collectors and stores their reports in the outbox
(`before_disable`), because removing a user resets that user's counters on
several programs. A bad `[enforce]` (a configured user without credentials, a
backend that cannot be built) stops the agent at start with status 78.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quotaflow import logs
from quotaflow.core.settings import Settings
from quotaflow.producers.enforce.config import EnforceConfig, EnforceConfigError, problems
from quotaflow.producers.outbox import Outbox, OutboxLocked, OutboxUnusable, outbox_broken
from quotaflow.producers.push import PushConfig, make_app, start_site
from quotaflow.producers.sources import Collector, SourceConfig, Stateful, build_collector

if TYPE_CHECKING:
    from aiohttp import web

    from quotaflow.producers.enforce.consumer import EnforceConsumer
    from quotaflow.producers.publisher import Publisher, SendFuture

log = logging.getLogger("quotaflow.agent")

PENDING = Gauge("quotaflow_agent_pending_reports", "Reports in the agent's outbox")
SENT = Gauge("quotaflow_agent_last_ack_unixtime", "When Kafka last acknowledged a report")

# How long one send round may wait for acknowledgements, and producer timeouts to match.
_PRODUCER_OPTIONS: dict[str, Any] = {
    "linger_ms": 5,
    "max_block_ms": 10_000,
    "request_timeout_ms": 10_000,
    "delivery_timeout_ms": 30_000,
    "bootstrap_timeout_ms": 5_000,
    "client_id": "quotaflow-agent",
}


class KafkaOverrides(BaseModel):
    """`[kafka]`: overrides of the QUOTAFLOW_* settings."""

    model_config = ConfigDict(extra="forbid")

    bootstrap: str | None = None
    topic_prefix: str | None = None
    partitions: int | None = Field(default=None, ge=1)


class AgentConfig(BaseModel):
    """The agent TOML file."""

    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(min_length=1, max_length=256)
    outbox: Path = Path("/var/lib/quotaflow/agent-outbox.db")
    max_reports: int = Field(default=100_000, ge=10)
    baseline_on_first_start: bool = True
    ensure_topics: bool = False
    batch: int = Field(default=500, ge=1)
    drain_timeout_s: float = Field(default=10.0, ge=0)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    log_level: str = "INFO"
    kafka: KafkaOverrides = Field(default_factory=KafkaOverrides)
    collectors: list[SourceConfig] = Field(default_factory=list)
    push: PushConfig | None = None
    enforce: EnforceConfig | None = None

    @model_validator(mode="after")
    def _unique_nodes(self) -> AgentConfig:
        nodes = [self.node_of(i) for i in range(len(self.collectors))]
        if len(set(nodes)) != len(nodes):
            raise ValueError(
                "two collectors report as the same node: give each its own node_id"
            )
        if self.enforce is not None and self.enforce.snapshot is not None:
            unknown = sorted(set(self.enforce.snapshot) - set(nodes))
            if unknown:
                raise ValueError(
                    f"enforce.snapshot names no collector's node: {', '.join(unknown)}"
                )
        return self

    def node_of(self, index: int) -> str:
        """The node id collector `index` reports as."""
        return self.collectors[index].node_id or self.node_id

    def settings(self) -> Settings:
        """QUOTAFLOW_* settings with the `[kafka]` overrides applied."""
        overrides: dict[str, Any] = {}
        if self.kafka.bootstrap is not None:
            overrides["kafka_bootstrap"] = self.kafka.bootstrap
        if self.kafka.topic_prefix is not None:
            overrides["topic_prefix"] = self.kafka.topic_prefix
        if self.kafka.partitions is not None:
            overrides["partitions"] = self.kafka.partitions
        return Settings(**overrides)


def load_config(path: Path) -> AgentConfig:
    """Read and check an agent TOML file."""
    with path.open("rb") as f:
        return AgentConfig.model_validate(tomllib.load(f))


def _load_or_exit(path: Path) -> AgentConfig:
    """`load_config`, or a CRITICAL line saying what is wrong (never the values: `[enforce]`
    holds secrets) and exit status 78."""
    try:
        return load_config(path)
    except (OSError, ValueError) as exc:
        problem = (
            problems(exc) if isinstance(exc, ValidationError)
            else (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)
        )
        logs.setup("INFO")
        log.critical("%s: %s; exiting with status %d", path, problem, EXIT_CONFIG)
        raise SystemExit(EXIT_CONFIG) from None


class Sender:
    """Sends the outbox's oldest report of every node, acks what Kafka acknowledged.

    `publisher_factory` makes a publisher (connects); by default a Kafka
    `ReportPublisher` with the agent's timeouts. After a failed round the
    publisher is closed and the next round makes a new one.
    """

    def __init__(self, outbox: Outbox, settings: Settings, batch: int = 500,
                 ensure_topics: bool = False, *,
                 publisher_factory: Callable[[], Publisher] | None = None) -> None:
        self.outbox = outbox
        self.settings = settings
        self.batch = batch
        self.ensure_topics = ensure_topics
        self.acked = 0
        self._factory = publisher_factory or self._kafka_publisher
        self._publisher: Publisher | None = None

    def _kafka_publisher(self) -> Publisher:
        from quotaflow.admin import ensure_topics
        from quotaflow.producers.publisher import ReportPublisher

        if self.ensure_topics:
            ensure_topics(self.settings)
        return ReportPublisher(self.settings, **_PRODUCER_OPTIONS)

    def _connect(self) -> Publisher:
        if self._publisher is None:
            self._publisher = self._factory()
        return self._publisher

    def _drop(self, timeout: float = 1.0) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            with contextlib.suppress(Exception):
                publisher.close(timeout=timeout)

    def step(self) -> tuple[int, bool]:
        """One round: (reports acked, whether everything sent was acknowledged)."""
        pending = len(self.outbox)  # counted, not decoded: heads can be megabytes each
        PENDING.set(pending)
        if not pending:
            return 0, True
        try:
            publisher = self._connect()
        except Exception as exc:
            log.warning("Kafka unreachable (%s); %d reports wait in the outbox",
                        exc, len(self.outbox))
            self._drop()
            return 0, False
        # Chosen again, and marked in flight at once: the outbox may have compacted
        # while connecting.
        heads = self.outbox.claim_heads(self.batch)
        sent: list[tuple[int, Sequence[SendFuture]]] = []
        ok = True
        try:
            for row_id, report in heads:
                sent.append((row_id, publisher.publish(report)))
        except Exception as exc:
            log.warning("sending failed (%s)", exc)
            ok = False
        deadline = time.monotonic() + _PRODUCER_OPTIONS["delivery_timeout_ms"] / 1000 + 5
        acked: list[int] = []
        for row_id, futures in sent:
            try:
                for future in futures:
                    future.get(timeout=max(deadline - time.monotonic(), 0.1))
            except Exception as exc:
                if ok:
                    log.warning("Kafka did not acknowledge a report (%s); will resend", exc)
                ok = False
                continue
            acked.append(row_id)
        self.outbox.ack(acked)
        self.acked += len(acked)
        if acked:
            SENT.set(time.time())
        if not ok:
            self._drop()
        PENDING.set(len(self.outbox))
        return len(acked), ok

    def close(self) -> None:
        """Close the Kafka connection."""
        self._drop(timeout=5.0)


class AgentFailed(RuntimeError):
    """A task of the agent died (it was logged with its traceback); exit non-zero."""


EXIT_FAILED = 1  # a task died, or the agent could not start
EXIT_CONFIG = 78  # EX_CONFIG: the config file (or its [enforce] backends) cannot be used
EXIT_OUTBOX_UNUSABLE = 78  # EX_CONFIG: the outbox is lost or damaged; see --reset-outbox


def now_ms() -> int:
    """Wall-clock ms since 1970: the first seq of an epoch (docs/agent.md, "Epochs and seqs")."""
    return time.time_ns() // 1_000_000


class Agent:
    """The agent runtime; `collectors` may replace the configured ones (tests).

    Opening the outbox raises `OutboxUnusable` if it is lost or damaged, unless
    `reset_outbox` (then a new one is started; see `Outbox`). With `enforce` and an
    `[enforce]` table the enforcement consumer is built too (its applied ids in
    `<outbox>.enforce.db`), raising `EnforceConfigError` when it cannot be.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        settings: Settings | None = None,
        collectors: Mapping[str, tuple[Collector, float]] | None = None,
        outbox: Outbox | None = None,
        reset_outbox: bool = False,
        enforce: bool = True,
    ) -> None:
        self.config = config
        self.settings = settings if settings is not None else config.settings()
        self.outbox = outbox if outbox is not None else Outbox(
            config.outbox, config.max_reports, reset=reset_outbox
        )
        if collectors is None:
            collectors = {
                config.node_of(i): (build_collector(c), c.interval_s)
                for i, c in enumerate(config.collectors)
            }
        self.collectors = dict(collectors)
        self.sender = Sender(self.outbox, self.settings, config.batch, config.ensure_topics)
        self.stop = asyncio.Event()
        self.collected = 0
        self.push_port: int | None = None
        self.push_app: web.Application | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # A collector is read by its loop and by enforcement's snapshots: one at a time.
        self._collecting = {node: threading.Lock() for node in self.collectors}
        # Set when a collector's loop has restored its state (or given up on it: `_off`).
        self._ready = {node: threading.Event() for node in self.collectors}
        self._off: set[str] = set()
        self._enforce_stop = threading.Event()
        self.enforcement: EnforceConsumer | None = None
        if enforce and config.enforce is not None:
            try:
                self.enforcement = self._enforcement(config.enforce)
            except BaseException:
                self.outbox.close()
                raise

    def _enforcement(self, enforce: EnforceConfig) -> EnforceConsumer:
        from quotaflow.producers.enforce.consumer import EnforceConsumer

        return EnforceConsumer.from_config(
            enforce, self.settings, node_id=self.config.node_id,
            state_file=Path(f"{self.outbox.path}.enforce.db"),
            before_disable=self.before_disable,
        )

    def wake(self) -> None:
        """Tell the sender there is something new (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    # ------------------------------------------------------------------ collecting

    def collect_once(self, node_id: str, collector: Collector) -> None:
        """Read one collector and store its report (blocking; one call per collector at once)."""
        with self._collecting.setdefault(node_id, threading.Lock()):
            self._collect_and_record(node_id, collector)

    def _collect_and_record(self, node_id: str, collector: Collector) -> None:
        snapshot = collector.collect()
        started_key = f"started:{node_id}"
        first = self.outbox.get_state(started_key) is None
        # After --reset-outbox every node's counters hold traffic billed before.
        reset = self.outbox.reset_at is not None
        baseline = first and (self.config.baseline_on_first_start or reset) and any(
            c.up or c.down for c in snapshot.counters
        )
        last_epoch = self.outbox.last_epoch(node_id)
        if last_epoch is not None and snapshot.epoch < last_epoch:
            log.error("%s: epoch went back from %d to %d; the stream ignores such reports",
                      node_id, last_epoch, snapshot.epoch)
        state: dict[str, Any] = {started_key: True}
        if isinstance(collector, Stateful):
            state[f"collector:{node_id}"] = collector.state()
        # An epoch's seqs start at the wall clock in ms: above any seq an outbox lost
        # before (a reinstall) gave out in the same boot or core-start epoch.
        self.outbox.record(
            node_id=node_id, epoch=snapshot.epoch, observed_at=datetime.now(UTC),
            counters=snapshot.counters, baseline=baseline, state=state, first_seq=now_ms(),
        )
        self.collected += 1
        if baseline and reset:
            log.warning("%s: first report after --reset-outbox is a baseline: its %d users' "
                        "traffic since their last acknowledged report is not billed",
                        node_id, len(snapshot.counters))
        elif baseline:
            log.info("%s: first report is a baseline (its %d users' counters are not billed)",
                     node_id, len(snapshot.counters))

    async def _collect_loop(self, node_id: str, collector: Collector, interval: float) -> None:
        """Collect until `stop`; ends with an exception (and so ends the agent) only when
        the outbox is damaged, or it cannot even start."""
        if isinstance(collector, Stateful):
            saved = self.outbox.get_state(f"collector:{node_id}")
            if saved is not None:
                try:
                    collector.restore(saved)
                except Exception:
                    # Starting afresh could bill traffic twice (an OpenVPN accumulator
                    # that forgot its ended sessions), and a restart would not help, so
                    # this collector stops, loudly; the others go on.
                    log.exception("%s: cannot restore the collector's saved state; "
                                  "not collecting from it", node_id)
                    self._off.add(node_id)
                    self._ready.setdefault(node_id, threading.Event()).set()
                    await self.stop.wait()
                    return
        self._ready.setdefault(node_id, threading.Event()).set()
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.collect_once, node_id, collector)
                self._wake.set()
            except Exception as exc:
                if outbox_broken(exc):
                    raise
                log.warning("%s: collecting failed: %s", node_id, exc)
            delay = max(interval - (time.monotonic() - started), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

    # ------------------------------------------------------------------ enforcing

    def before_disable(self, user_ids: list[str]) -> None:
        """Enforcement's hook, before it disables `user_ids`: read the collectors now and store
        their reports in the outbox (the same path as every collection), so the bytes up to
        the removal are billed even where removing a user resets its counters.

        The collectors read are those of `[enforce] snapshot` (default: all). Raises when
        one cannot be read: the disable then counts a failed attempt and is retried.
        """
        enforce = self.config.enforce
        chosen = enforce.snapshot if enforce is not None and enforce.snapshot is not None else None
        nodes = list(self.collectors) if chosen is None else [n for n in chosen
                                                              if n in self.collectors]
        for node_id in nodes:
            ready = self._ready.setdefault(node_id, threading.Event())
            deadline = time.monotonic() + 30.0
            while not ready.wait(timeout=0.5):
                if self._enforce_stop.is_set() or time.monotonic() > deadline:
                    raise RuntimeError(f"{node_id}: the collector has not started yet")
            if node_id in self._off:
                continue  # not collecting at all (its state could not be restored)
            self.collect_once(node_id, self.collectors[node_id][0])
        self.wake()
        log.info("counter snapshot of %s stored before disabling %d user(s): %s",
                 ", ".join(nodes) or "no collector", len(user_ids), ", ".join(user_ids[:10]))

    # ------------------------------------------------------------------ sending

    async def _send_loop(self) -> None:
        backoff = 0.5
        drain_until: float | None = None
        while True:
            if self.stop.is_set() and drain_until is None:
                drain_until = time.monotonic() + self.config.drain_timeout_s
            try:
                acked, ok = await asyncio.to_thread(self.sender.step)
            except Exception as exc:  # e.g. a full disk under the outbox: keep trying, loudly
                if outbox_broken(exc):
                    raise
                log.exception("sending failed; the reports stay in the outbox")
                acked, ok = 0, False
            if drain_until is not None and (
                len(self.outbox) == 0 or time.monotonic() >= drain_until or not ok
            ):
                return
            if not ok:
                await self._sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            if acked == 0:
                self._wake.clear()
                await self._sleep(1.0, self._wake)

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        waits = [asyncio.ensure_future(self.stop.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()

    # ------------------------------------------------------------------ running

    async def run(self, *, collect: bool = True) -> None:
        """Run until `stop` is set; closes the outbox at the end.

        If a task dies (a collector's loop, the sender's, or the push receiver at its
        start), it is logged with its traceback, the rest stops as on SIGTERM (the
        sender drains) and `AgentFailed` is raised, for the process to exit non-zero
        and its supervisor to start it again.
        """
        self._loop = asyncio.get_running_loop()
        tasks: dict[asyncio.Task[None], str] = {}
        runner = None
        dead: list[str] = []
        enforcing = False
        try:
            push = self.config.push
            if push is not None:
                try:
                    app = make_app(push, self.outbox, self.wake)
                    runner, self.push_port = await start_site(app, push.host, push.port)
                    self.push_app = app
                except Exception as exc:
                    log.critical("the push receiver cannot serve on %s:%d; stopping the agent",
                                 push.host, push.port, exc_info=True)
                    raise AgentFailed("the push receiver did not start") from exc
                log.info("push receiver on %s:%d%s", push.host, self.push_port,
                         f", a gateway to {push.upstream}" if push.upstream else " (standalone)")
            if collect:
                for node, (c, interval) in self.collectors.items():
                    task = asyncio.create_task(self._collect_loop(node, c, interval))
                    tasks[task] = f"the collector of {node}"
                if self.enforcement is not None:  # closes it when it ends
                    consumer = asyncio.to_thread(self.enforcement.run, self._enforce_stop)
                    tasks[asyncio.create_task(consumer)] = "the enforcement consumer"
                    enforcing = True
            tasks[asyncio.create_task(self._send_loop())] = "the sender"
            stopping = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            self._find_dead(tasks, dead)
            self.stop.set()
            self._enforce_stop.set()
            if runner is not None:
                await runner.cleanup()
                runner = None
            await asyncio.wait(tasks)  # the collectors end, the sender drains
            self._find_dead(tasks, dead)
            if dead:
                raise AgentFailed(f"{', '.join(dead)} died")
        finally:
            self._enforce_stop.set()
            for task in tasks:
                task.cancel()
            if runner is not None:
                await runner.cleanup()
            if self.enforcement is not None and not enforcing:
                self.enforcement.close()  # built, never run
            await asyncio.to_thread(self.sender.close)
            left = len(self.outbox)
            self.outbox.close()
            log.info("agent stopped; %d reports left in the outbox for the next start", left)

    def _find_dead(self, tasks: Mapping[asyncio.Task[None], str], dead: list[str]) -> None:
        """Log each task that died and is not in `dead` yet, and add it there."""
        for task, name in tasks.items():
            if not task.done() or name in dead:
                continue
            if task.cancelled():
                log.critical("%s was cancelled; stopping the agent", name)
            elif (exc := task.exception()) is not None:
                log.critical("%s died; stopping the agent", name, exc_info=exc)
            elif not self.stop.is_set():
                log.critical("%s ended on its own; stopping the agent", name)
            else:
                continue
            dead.append(name)


def _serve(config: AgentConfig, collect: bool, reset_outbox: bool = False) -> None:
    """Run the agent; on a failure, log it and exit non-zero (systemd starts it again)."""
    logs.setup(config.log_level.upper())
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port)

    async def main() -> None:
        agent = Agent(config, reset_outbox=reset_outbox, enforce=collect)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop.set)
        await agent.run(collect=collect)

    try:
        asyncio.run(main())
    except OutboxUnusable as exc:
        log.critical("%s", exc)
        raise SystemExit(EXIT_OUTBOX_UNUSABLE) from None
    except OutboxLocked as exc:
        log.critical("%s", exc)
        raise SystemExit(EXIT_FAILED) from None
    except EnforceConfigError as exc:
        log.critical("%s; exiting with status %d", exc, EXIT_CONFIG)
        raise SystemExit(EXIT_CONFIG) from None
    except AgentFailed as exc:  # logged with its traceback where it happened
        log.critical("agent failed: %s; exiting with status %d", exc, EXIT_FAILED)
        raise SystemExit(EXIT_FAILED) from None
    except Exception:
        log.critical("agent failed; exiting with status %d", EXIT_FAILED, exc_info=True)
        raise SystemExit(EXIT_FAILED) from None


def run_agent(config_path: Path, *, reset_outbox: bool = False) -> None:
    """`quotaflow agent --config agent.toml`: collectors, push receiver (if `[push]`), sender.

    `reset_outbox`: start a new outbox if the configured one is lost or damaged.
    """
    _serve(_load_or_exit(config_path), collect=True, reset_outbox=reset_outbox)


def run_push_receiver(config_path: Path, *, reset_outbox: bool = False) -> None:
    """Only the push receiver (and sender) of an agent config; its collectors are ignored."""
    config = _load_or_exit(config_path)
    if config.push is None:
        raise SystemExit(f"{config_path}: no [push] table")
    _serve(config, collect=False, reset_outbox=reset_outbox)


if __name__ == "__main__":  # python -m quotaflow.producers.agent agent.toml [--reset-outbox]
    import sys

    run_agent(Path(sys.argv[1]), reset_outbox="--reset-outbox" in sys.argv[2:])
