"""The Faust application: bills counter reports from `<prefix>.raw`.

The agent only moves batches: each message is one node's report fragment for the
partition it arrived on; `quotaflow.core.ledger.NodeLedger` decides what to bill. The
node's whole state in that partition is one Faust table entry, so the changelog
record of a message carries all of its effects at once. Faust commits an offset
only after the producer has flushed everything sent before it (at-least-once),
and a redelivered message finds its seqs already applied: totals stay exact
across crashes. Totals go to `<prefix>.totals`, refusals to `<prefix>.dead`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.types import TP
from pydantic import ValidationError

from quotaflow.admin import ensure_topics
from quotaflow.core.contracts import CounterReport, DeadLetter, DeadReason, TotalsBatch
from quotaflow.core.ledger import Billing, NodeLedger, Refusal
from quotaflow.core.partitioning import partition_of, split_report
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES

log = logging.getLogger("quotaflow.streams")


@dataclass
class WorkerStats:
    """Counters for the status line."""

    messages: int = 0
    readings: int = 0
    billed_bytes: int = 0
    dead: int = 0
    rerouted: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """One line for logs and the status display."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (
            f"messages={self.messages} readings={self.readings} "
            f"({self.readings / elapsed:,.0f}/s) billed={self.billed_bytes:,}B "
            f"dead={self.dead} rerouted={self.rerouted}"
        )


def _validation_reason(exc: ValidationError) -> str:
    """A short, readable reason; the report's values are left out of it."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(x) for x in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


class Biller:
    """Applies report fragments to node ledgers and says what to publish.

    It knows nothing of Faust but the `table` mapping it is given: the ledger
    of node N in partition P is stored under the key `N|P`, as one record.
    """

    def __init__(self, settings: Settings, table: Any) -> None:
        self.settings = settings
        self.policy = settings.billing_policy
        self.partitions = settings.partitions
        self.table = table
        self._live: dict[bytes, NodeLedger] = {}
        self.stats = WorkerStats()
        self.processed: dict[int, int] = {}  # raw partition -> last offset handled

    def forget_live(self) -> None:
        """Drop decoded ledgers; after a rebalance the table is the truth."""
        self._live.clear()

    def ledger(self, key: bytes, node_id: str) -> NodeLedger:
        """The node's ledger for this partition, from the live cache or the table."""
        found = self._live.get(key)
        if found is None:
            stored = self.table.get(key)
            found = NodeLedger.from_bytes(stored) if stored else NodeLedger(node_id)
            self._live[key] = found
        return found

    def misrouted(self, report: CounterReport, partition: int) -> bool:
        """True if some reading belongs to another partition."""
        n = self.partitions
        owner = partition_of
        return any(owner(c.user_id, n) != partition for c in report.counters)

    def bill(self, report: CounterReport, partition: int) -> Billing:
        """Apply one fragment that belongs to `partition`, and persist the ledger."""
        if not self.stats.messages:
            self.stats.started = time.monotonic()
            log.info("first message at %.3f", time.time())  # read by bench/throughput.py
        key = f"{report.node_id}|{partition}".encode()
        ledger = self.ledger(key, report.node_id)
        billing = ledger.update(report, self.policy)
        self.table[key] = ledger.to_bytes()
        self.stats.messages += 1
        self.stats.readings += len(report.counters)
        self.stats.billed_bytes += billing.billed_bytes
        return billing


class CommitWatchdog:
    """Notices when Faust stops committing offsets of messages the worker has handled.

    Faust commits the offsets of handled messages every second. If its
    bookkeeping stalls (seen after rebalances during crash loops), the worker
    would handle new messages but never commit them, and each restart would
    redo ever more work. The worker then exits, and its supervisor (`quotaflow
    run`, systemd) starts it again from the last commit, which is harmless: a
    redelivered message bills nothing twice.

    >>> dog = CommitWatchdog(stall_s=30.0)
    >>> dog.stalled(0, offset=9, committed=10, now=0.0)  # all handled work is committed
    0.0
    >>> dog.stalled(0, offset=20, committed=10, now=1.0)
    0.0
    >>> dog.stalled(0, offset=25, committed=10, now=40.0)  # no commit progress for 39 s
    39.0
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._since: dict[int, tuple[int | None, float]] = {}

    def stalled(
        self, partition: int, offset: int, committed: int | None, now: float | None = None
    ) -> float:
        """Seconds the partition's commits are stuck behind handled work (0.0 if not stuck)."""
        now = time.monotonic() if now is None else now
        if committed is not None and committed > offset:
            self._since.pop(partition, None)
            return 0.0
        last_committed, since = self._since.setdefault(partition, (committed, now))
        if last_committed != committed:  # commits progress, just not caught up yet
            self._since[partition] = (committed, now)
            return 0.0
        waited = now - since
        return waited if waited >= self.stall_s else 0.0


def faust_app(settings: Settings, app_id: str) -> faust.App:
    """A Faust app with quotaflow's broker, delivery and size settings."""
    datadir = settings.state_dir / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(datadir),
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_max_request_size=MAX_MESSAGE_BYTES,
        # changelog records hold a node's ledger (tens of KB): Faust's default 16 KB
        # batch makes each its own produce request, one round trip at a time
        producer_max_batch_size=MAX_MESSAGE_BYTES // 4,
        producer_linger_ms=5,
        consumer_max_fetch_size=MAX_MESSAGE_BYTES * 2,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # a crashed worker's partitions move on after 10 s instead of a minute
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        web_enabled=False,
        table_cleanup_interval=3600.0,
    )


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app for these settings (the app id derives from the topic prefix)."""
    app = faust_app(settings, settings.topics.worker_group)
    raw = app.topic(settings.topics.raw, partitions=settings.partitions)
    totals = app.topic(settings.topics.totals, partitions=settings.partitions)
    dead = app.topic(settings.topics.dead, partitions=settings.partitions)
    table = app.Table(
        "ledgers",
        default=None,
        partitions=settings.partitions,
        key_type=bytes,
        value_type=bytes,
        extra_topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)},
    )
    biller = Biller(settings, table)
    app.biller = biller  # type: ignore[attr-defined]
    raw_topic = settings.topics.raw

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _forget(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        biller.forget_live()

    async def send_dead(payload: bytes, partition: int, offset: int, reason: DeadReason,
                        detail: str, readings: tuple[dict[str, int | str], ...] = ()) -> None:
        biller.stats.dead += 1
        await dead.send(
            value=DeadLetter.encode(reason, detail, topic=raw_topic, partition=partition,
                                    offset=offset, payload=payload, readings=readings),
            partition=partition,
        )

    @app.agent(raw)
    async def bill(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            partition, offset, value = message.partition, message.offset, event.value
            biller.processed[partition] = offset
            try:
                report = CounterReport.decode(value)
            except ValidationError as exc:
                await send_dead(value, partition, offset, "invalid", _validation_reason(exc))
                continue
            ahead = report.observed_at.timestamp() - time.time()
            if ahead > settings.max_clock_skew_s:  # a bad clock would make later reports late
                await send_dead(value, partition, offset, "invalid",
                                f"observed_at is {ahead:.0f}s in the future "
                                f"(more than QUOTAFLOW_MAX_CLOCK_SKEW_S)")
                continue
            if biller.misrouted(report, partition):
                fragments = split_report(report, settings.partitions)
                report = fragments.pop(partition, report.model_copy(update={"counters": ()}))
                for other, fragment in fragments.items():
                    biller.stats.rerouted += 1
                    await raw.send(key=message.key, value=fragment.encode(), partition=other)
                if not report.counters and report.kind == "cumulative":
                    continue
            try:
                billing = biller.bill(report, partition)
            except Exception as exc:  # a bug must not stop the partition: keep the message
                log.exception("cannot bill %s[%d]@%d", raw_topic, partition, offset)
                biller.forget_live()  # the ledger may be half updated; reload from the table
                await send_dead(value, partition, offset, "error",
                                f"{type(exc).__name__}: {exc}"[:500])
                continue
            if billing.totals:
                await totals.send(
                    key=report.node_id.encode(),
                    value=TotalsBatch.encode(
                        report.node_id, billing.day, billing.month, billing.totals
                    ),
                    partition=partition,
                )
            by_reason: dict[DeadReason, list[Refusal]] = {}
            for refusal in billing.refused:
                by_reason.setdefault(refusal.reason, []).append(refusal)
            for reason, refusals in by_reason.items():
                await send_dead(
                    value, partition, offset, reason, refusals[0].detail,
                    tuple({"user_id": r.user_id, "up": r.up, "down": r.down} for r in refusals),
                )

    @app.timer(interval=10.0)  # type: ignore[untyped-decorator]
    async def _status() -> None:
        log.info("%s", biller.stats.line())

    watchdog = CommitWatchdog(stall_s=30.0)

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def _watch_commits() -> None:
        consumer: Any = app.consumer
        committed = consumer._committed_offset  # Faust's record of what it committed (private)
        for partition, offset in list(biller.processed.items()):
            tp = TP(raw_topic, partition)
            stalled = watchdog.stalled(partition, offset, committed.get(tp))
            if stalled:
                acked = consumer._acked.get(tp) or []
                log.error(
                    "offset commits of %s stalled for %.0fs (handled up to %d, committed %s, "
                    "acked head %s, %d acked): exiting so the supervisor restarts the worker "
                    "from the last commit", tp, stalled, offset, committed.get(tp),
                    sorted(acked)[:3], len(acked),
                )
                logging.shutdown()
                os._exit(70)

    return app


def _quiet_gc() -> None:
    """Keep the garbage collector off the hot path.

    Each message allocates a few hundred short-lived objects (the validated
    report); with the default thresholds the collector then keeps walking the
    worker's long-lived objects (Faust, aiokafka, decoded ledgers). Freezing what
    exists at start and collecting the young generation less often cut the
    worker's CPU time by a fifth in `bench/throughput.py` (13.9 s -> 11.1 s for
    2.4M readings).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def run_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM."""
    _quiet_gc()
    ensure_topics(settings)
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
