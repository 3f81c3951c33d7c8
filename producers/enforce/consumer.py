"""The enforcement consumer: `<prefix>.control` in, backends called, acknowledgements out.

One loop, in a node agent's thread (`[enforce]` in agent.toml, consumer group
`<prefix>-enforce-<node_id>`) or in `quotaflow enforce` (`<prefix>-enforce-central`).
It uses kafka-python, which the agent install has. Each round it

1. polls `.control` for at most `poll_interval_s` (less when a retry is due sooner),
   and hands every command to `Deliveries` with the backends that `serve` its user
   (commands for no served user are finished at once, without an acknowledgement);
   a record that is not a `Command` goes to `<prefix>.dead` (reason `invalid`);
2. while it is behind the end of a partition (after an outage), it reads on
   without applying, for up to `catch_up_s`, so that each user's latest state is
   applied rather than the history (`delivery.py`: latest state wins);
3. calls `before_disable(user_ids)` once before the round's disables (the agent
   takes a counter snapshot there; if it fails, the disables count a failed
   attempt), then applies the due jobs, for at most `round_budget_s`; just before
   it, each backend with a `prepare_disable` (ss-manager: wait for the next stat
   push) gets its users of those disables (if it fails, that backend's disables
   count a failed attempt);
4. records each applied (command_id, backend) in SQLite (synchronous=FULL) before
   anything else, then publishes the acknowledgements (`.control.acks`) and dead
   commands (`.control.dead`), waits until Kafka has them, and only then commits
   each partition's offset up to its first unfinished record (`CommitPoint`).

A crash anywhere re-reads from the last commit: a command applied before the
crash finds its id in SQLite and is acknowledged `already` without acting again;
one not recorded yet is applied again, which every backend's idempotent apply
makes harmless. Applied ids are kept `keep_applied_days` (30 by default).

`QUOTAFLOW_FAULT_KILL_AFTER_APPLY=<command_id>` (tests only) SIGKILLs the process
right after that command's id was recorded, before its acknowledgement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sqlite3
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from pydantic import BaseModel, ConfigDict, ValidationError

from quotaflow.core.contracts import DeadLetter, validation_reason
from quotaflow.core.plans import Ack, Command, DeadCommand
from quotaflow.core.settings import Settings
from quotaflow.producers.enforce.backends import Backend, EnforceError, PreparesDisable
from quotaflow.producers.enforce.config import (
    EnforceConfig,
    EnforceConfigError,
    open_backends,
    problems,
)
from quotaflow.producers.enforce.delivery import (
    CommitPoint,
    Deliveries,
    Job,
    Newest,
    Origin,
    RetryPolicy,
)

log = logging.getLogger("quotaflow.enforce")

CENTRAL = "central"
"""The node id of `quotaflow enforce` in acknowledgements and dead commands."""
FAULT_KILL_AFTER_APPLY = "QUOTAFLOW_FAULT_KILL_AFTER_APPLY"

BeforeDisable = Callable[[list[str]], None]

_PRODUCER_OPTIONS: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 5,
    "max_block_ms": 5_000,
    "request_timeout_ms": 10_000,
    "delivery_timeout_ms": 30_000,
    "allow_auto_create_topics": False,
}
_FLUSH_TIMEOUT_S = 5.0
_HOUSEKEEPING_S = 3600.0


# ------------------------------------------------------------------------------ applied ids

_IDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    command_id TEXT NOT NULL, backend TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (command_id, backend)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS applied_at ON applied (at);
CREATE TABLE IF NOT EXISTS newest (
    user_id TEXT NOT NULL, backend TEXT NOT NULL, command_id TEXT NOT NULL,
    action TEXT NOT NULL, issued_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, backend)
) WITHOUT ROWID;
"""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _ms(t: datetime) -> int:
    """Milliseconds since 1970 (a command's `issued_at` is to the millisecond on the wire)."""
    return (t - _EPOCH) // _MS



class SqliteIds:
    """The applied commands, durably: `AppliedIds` on SQLite.

    `applied` holds each applied (command_id, backend), forgotten after
    `keep_applied_days`; `newest` the newest disable/enable applied per (user,
    backend), kept for good (one row per user and backend). WAL with
    synchronous=FULL: an id recorded is on disk before its acknowledgement is sent,
    so a crash or power loss after applying never applies it twice.

    >>> import tempfile
    >>> from quotaflow.producers.enforce.delivery import example_command
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     ids = SqliteIds(Path(folder) / "enforce.db")
    ...     ids.add(example_command("c1", "alice", "disable"), "xray")
    ...     seen = ids.seen("c1", "xray"), ids.seen("c1", "webhook")
    ...     newest = ids.newest("alice", "xray")
    ...     forgotten = ids.forget_older_than(0)
    ...     ids.close()
    >>> seen, newest.command_id, newest.action, forgotten
    ((True, False), 'c1', 'disable', 1)
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_IDS_SCHEMA)

    def seen(self, command_id: str, backend: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM applied WHERE command_id = ? AND backend = ?", (command_id, backend)
            ).fetchone()
        return row is not None

    def add(self, command: Command, backend: str) -> None:
        issued_ms = _ms(command.issued_at)
        with self._lock, self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO applied (command_id, backend, at) VALUES (?, ?, ?)",
                (command.command_id, backend, self.clock()),
            )
            if command.action != "warn":
                self._db.execute(
                    "INSERT INTO newest (user_id, backend, command_id, action, issued_ms)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, backend) DO UPDATE SET"
                    " command_id = excluded.command_id, action = excluded.action,"
                    " issued_ms = excluded.issued_ms WHERE excluded.issued_ms >= newest.issued_ms",
                    (command.user_id, backend, command.command_id, command.action, issued_ms),
                )

    def newest(self, user_id: str, backend: str) -> Newest | None:
        with self._lock:
            row = self._db.execute(
                "SELECT command_id, action, issued_ms FROM newest"
                " WHERE user_id = ? AND backend = ?", (user_id, backend),
            ).fetchone()
        if row is None:
            return None
        return Newest(row[0], row[1], _EPOCH + row[2] * _MS)

    def forget_older_than(self, seconds: float) -> int:
        """Delete the ids recorded more than `seconds` ago; how many."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM applied WHERE at < ?", (self.clock() - seconds + 1e-6,)
            )
        return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ------------------------------------------------------------------------------ the loop


@dataclass(frozen=True, slots=True)
class _Out:
    """A record to publish."""

    topic: str
    key: bytes | None
    value: bytes


class _Rebalances(ConsumerRebalanceListener):  # type: ignore[misc]
    """Notes that the partitions were taken away; the loop then forgets what it held."""

    def __init__(self) -> None:
        self.happened = threading.Event()

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            self.happened.set()

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("enforcement reads %s", sorted(tp.partition for tp in assigned))


class EnforceConsumer:
    """The loop of the module docstring; `run(stop)` until `stop` is set.

    `backends` are (name, backend) pairs (`config.open_backends`); the consumer
    closes them and `ids` when it stops. `node_id` None is `quotaflow enforce`.
    """

    def __init__(
        self,
        settings: Settings,
        backends: Sequence[tuple[str, Backend]],
        ids: SqliteIds,
        *,
        node_id: str | None,
        retry: RetryPolicy,
        before_disable: BeforeDisable | None = None,
        poll_interval_s: float = 0.5,
        keep_applied_s: float = 30 * 86_400,
        round_budget_s: float = 30.0,
        catch_up_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.node_id = node_id or CENTRAL
        self.group = self.topics.enforce_group(node_id)
        # Static membership: a restarted consumer takes its partitions back at once,
        # rather than after the dead one's session timed out.
        host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:100]
        self.instance = f"{self.group}-{host}"[:249]
        self.backends = dict(backends)
        self.ids = ids
        self.deliveries = Deliveries(retry, ids)
        self.before_disable = before_disable
        self.poll_interval_s = poll_interval_s
        self.keep_applied_s = keep_applied_s
        self.round_budget_s = round_budget_s
        self.catch_up_s = catch_up_s
        self.clock = clock
        self._consumer: Any = None
        self._producer: Any = None
        self._rebalances = _Rebalances()
        self._points: dict[int, CommitPoint] = {}
        self._committed: dict[int, int] = {}
        self._finished: list[Origin] = []  # finished once what was published is acknowledged
        self._to_send: list[_Out] = []
        self._in_flight: list[tuple[_Out, Any]] = []
        self._behind_since: float | None = None
        self._housekept = -_HOUSEKEEPING_S
        self._kill_after = os.environ.get(FAULT_KILL_AFTER_APPLY) or None

    @classmethod
    def from_config(
        cls,
        config: EnforceConfig,
        settings: Settings,
        *,
        node_id: str | None,
        state_file: Path,
        before_disable: BeforeDisable | None = None,
    ) -> EnforceConsumer:
        """Build the backends and open the applied ids; EnforceConfigError if they are bad."""
        backends = open_backends(config)
        try:
            ids = SqliteIds(config.state_file or state_file)
        except (OSError, sqlite3.Error) as exc:
            for _, backend in backends:
                backend.close()
            raise EnforceConfigError(
                f"enforce: cannot open {config.state_file or state_file}: {exc}"
            ) from None
        return cls(
            settings, backends, ids, node_id=node_id, retry=config.retry.policy(),
            before_disable=before_disable, poll_interval_s=config.poll_interval_s,
            keep_applied_s=config.keep_applied_s,
        )

    # -------------------------------------------------------------- running

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set; then publish what is settled, commit and close."""
        backoff = 0.5
        log.info("enforcement of %s starts: group %s, backends %s",
                 self.node_id, self.group, ", ".join(self.backends))
        try:
            while not stop.is_set():
                if self._consumer is None:
                    try:
                        self._connect()
                    except Exception as exc:
                        log.warning("enforcement: Kafka unreachable (%s); retrying", exc)
                        stop.wait(backoff)
                        backoff = min(backoff * 2, 30.0)
                        continue
                    backoff = 0.5
                self.step()
            if self._consumer is not None:
                self._publish(flush_timeout_s=_FLUSH_TIMEOUT_S * 2)
                self._commit()
        finally:
            self.close()

    def _connect(self) -> None:
        common = {
            "bootstrap_servers": self.settings.kafka_bootstrap,
            "client_id": f"quotaflow-enforce-{self.node_id}",
        }
        producer = KafkaProducer(**common, **_PRODUCER_OPTIONS)
        try:
            consumer = KafkaConsumer(
                **common,
                group_id=self.group,
                group_instance_id=self.instance,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                allow_auto_create_topics=False,
                max_poll_records=500,
            )
        except BaseException:
            producer.close(timeout=1)
            raise
        consumer.subscribe([self.topics.control], listener=self._rebalances)
        self._producer, self._consumer = producer, consumer

    def step(self) -> None:
        """One round: poll, apply what is due, publish, commit."""
        now = self.clock()
        timeout = self.poll_interval_s
        due = self.deliveries.next_due()
        if due is not None:  # (not quite 0: while catching up, due jobs wait)
            timeout = min(timeout, max(due - now, 0.02))
        batches = self._consumer.poll(timeout_ms=int(timeout * 1000))
        if self._rebalances.happened.is_set():
            self._rebalances.happened.clear()
            self._forget_partitions()
        now = self.clock()
        for batch in batches.values():
            for record in batch:
                self._read(record, now)
        if not self._catching_up(now):
            self._apply_due()
        self._publish()
        self._commit()
        self._housekeeping()

    def _forget_partitions(self) -> None:
        """The partitions were taken away: everything after their commits is read again."""
        log.info("enforcement: partitions reassigned; %d pending jobs will be read again",
                 len(self.deliveries))
        self.deliveries.clear()
        self._points.clear()
        self._committed.clear()
        self._finished.clear()

    def _read(self, record: Any, now: float) -> None:
        origin = (record.partition, record.offset)
        self._points.setdefault(record.partition, CommitPoint()).update(record.offset, False)
        try:
            if record.value is None:
                raise ValueError("an empty record (no value)")
            command = Command.decode(record.value)
        except (ValidationError, ValueError) as exc:
            reason = validation_reason(exc) if isinstance(exc, ValidationError) else str(exc)
            detail = f"enforcement of {self.node_id}: not a Command: {reason}"
            log.warning("%s at %s:%d:%d; to %s", detail, record.topic, *origin, self.topics.dead)
            self._to_send.append(_Out(self.topics.dead, None, DeadLetter.encode(
                "invalid", detail, topic=record.topic, partition=record.partition,
                offset=record.offset, payload=record.value,
            )))
            self._finished.append(origin)
            return
        served = [name for name, backend in self.backends.items()
                  if self._serves(name, backend, command.user_id)]
        self.deliveries.add(command, served, origin, now)

    @staticmethod
    def _serves(name: str, backend: Backend, user_id: str) -> bool:
        try:
            return backend.serves(user_id)
        except Exception:
            log.exception("%s: serves(%r) failed; taken as not served", name, user_id)
            return False

    def _catching_up(self, now: float) -> bool:
        """Whether to read on before applying: behind a partition's end, for up to catch_up_s."""
        behind = False
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None or self._consumer.position(tp) < high:
                behind = True
                break
        if not behind:
            self._behind_since = None
            return False
        if self._behind_since is None:
            self._behind_since = now
        return now - self._behind_since < self.catch_up_s

    def _apply_due(self) -> None:
        start = self.clock()
        jobs = self.deliveries.due(start)
        if not jobs:
            return
        snapshot_failed: str | None = None
        prepare_failed: dict[str, str] = {}
        users = sorted({j.command.user_id for j in jobs if j.action == "disable"})
        if users and self.before_disable is not None:
            prepare_failed = self._prepare_disables(jobs)
            try:
                self.before_disable(users)
            except Exception as exc:
                snapshot_failed = f"counter snapshot before disable failed: {exc}"
                log.warning("enforcement: %s (users %s)", snapshot_failed, ", ".join(users[:10]))
        for job in jobs:
            if self.clock() - start > self.round_budget_s:
                break  # poll again (the group's max.poll.interval); the rest stays due
            command = job.command
            what = f"{command.action} of {command.user_id} on {job.backend} ({command.command_id})"
            if job.action == "disable" and snapshot_failed is not None:
                self.deliveries.failed(job, snapshot_failed, self.clock())
                continue
            if job.action == "disable" and job.backend in prepare_failed:
                self.deliveries.failed(job, prepare_failed[job.backend], self.clock())
                continue
            try:
                result = self.backends[job.backend].apply(command)
            except EnforceError as exc:
                reason = str(exc) or type(exc).__name__
                log.warning("%s failed (attempt %d of %d): %s", what, job.attempts + 1,
                            self.deliveries.retry.max_attempts, reason)
                self.deliveries.failed(job, reason, self.clock())
                continue
            except Exception as exc:  # a backend's bug: retried like a failure, loudly
                log.exception("%s failed unexpectedly", what)
                self.deliveries.failed(job, f"{type(exc).__name__}: {exc}", self.clock())
                continue
            self.deliveries.applied(job, result)
            log.info("%s: %s%s", what, result.outcome,
                     f" ({result.detail})" if result.detail else "")
            if self._kill_after is not None and command.command_id == self._kill_after:
                log.warning("%s is set: killing the process before the acknowledgement",
                            FAULT_KILL_AFTER_APPLY)
                os.kill(os.getpid(), signal.SIGKILL)

    def _prepare_disables(self, jobs: Sequence[Job]) -> dict[str, str]:
        """Each backend's `prepare_disable` for its users of the round's disables, before
        the snapshot; what failed, by backend (those disables count a failed attempt)."""
        by_backend: dict[str, set[str]] = {}
        for job in jobs:
            if job.action == "disable":
                by_backend.setdefault(job.backend, set()).add(job.command.user_id)
        failed: dict[str, str] = {}
        for name, users in by_backend.items():
            backend = self.backends.get(name)
            if not isinstance(backend, PreparesDisable):
                continue
            try:
                backend.prepare_disable(sorted(users))
            except Exception as exc:
                failed[name] = f"{name}: preparing the snapshot before disable failed: {exc}"
                log.warning("enforcement: %s", failed[name])
        return failed

    # -------------------------------------------------------------- publishing

    def _publish(self, flush_timeout_s: float = _FLUSH_TIMEOUT_S) -> None:
        """Publish what is settled; once Kafka has all of it, finish the records."""
        settled = self.deliveries.drain()
        at = datetime.now(UTC)
        for note in settled.acks:
            ack = Ack(command_id=note.command_id, node_id=self.node_id, backend=note.backend,
                      outcome=note.outcome, detail=note.detail[:2000], at=at)
            self._to_send.append(_Out(self.topics.control_acks, note.command_id.encode(),
                                      ack.encode()))
        for dead in settled.dead:
            log.error("gave up on %s of %s on %s (%s) after %d attempts: %s; to %s",
                      dead.command.action, dead.command.user_id, dead.backend,
                      dead.command.command_id, dead.attempts, dead.reason,
                      self.topics.control_dead)
            record = DeadCommand(command=dead.command, node_id=self.node_id,
                                 backend=dead.backend, attempts=dead.attempts,
                                 reason=dead.reason[:2000], at=at)
            self._to_send.append(_Out(self.topics.control_dead,
                                      dead.command.command_id.encode(), record.encode()))
        self._finished.extend(settled.finished)
        self._send(flush_timeout_s)
        if not self._to_send and not self._in_flight:
            for partition, offset in self._finished:
                point = self._points.get(partition)
                if point is not None:
                    point.update(offset, True)
            self._finished.clear()

    def _send(self, flush_timeout_s: float) -> None:
        if not self._to_send and not self._in_flight:
            return
        waiting, self._to_send = self._to_send, []
        for index, out in enumerate(waiting):
            try:
                future = self._producer.send(out.topic, key=out.key, value=out.value)
            except Exception as exc:  # no metadata within max_block_ms: Kafka is away
                log.warning("enforcement: cannot publish to %s (%s); will retry", out.topic, exc)
                self._to_send = waiting[index:]
                break
            self._in_flight.append((out, future))
        with contextlib.suppress(Exception):  # a timeout: the futures below say what is left
            self._producer.flush(timeout=flush_timeout_s)
        still: list[tuple[_Out, Any]] = []
        for out, future in self._in_flight:
            if not future.is_done:
                still.append((out, future))
            elif future.failed():
                log.warning("enforcement: Kafka did not take a record for %s (%s); will retry",
                            out.topic, future.exception)
                self._to_send.append(out)
        self._in_flight = still

    def _commit(self) -> None:
        assigned = self._consumer.assignment()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for partition, point in self._points.items():
            tp = TopicPartition(self.topics.control, partition)
            position = point.position
            if (tp in assigned and position is not None
                    and position > self._committed.get(partition, -1)):
                offsets[tp] = OffsetAndMetadata(position, "", -1)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
        except Exception as exc:  # a rebalance or Kafka away: the next round commits
            log.warning("enforcement: commit failed (%s); will retry", exc)
            return
        for tp, meta in offsets.items():
            self._committed[tp.partition] = meta.offset

    def _housekeeping(self) -> None:
        now = self.clock()
        if now - self._housekept < _HOUSEKEEPING_S:
            return
        self._housekept = now
        forgotten = self.ids.forget_older_than(self.keep_applied_s)
        if forgotten:
            log.info("enforcement: forgot %d applied command ids older than %.0f days",
                     forgotten, self.keep_applied_s / 86_400)

    def close(self) -> None:
        """Close Kafka, the backends and the applied ids."""
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=5)
        for name, backend in self.backends.items():
            try:
                backend.close()
            except Exception:
                log.exception("%s: closing failed", name)
        self.backends = {}
        with contextlib.suppress(Exception):
            self.ids.close()


# ------------------------------------------------------------------------------ central


class CentralConfig(BaseModel):
    """enforce.toml of `quotaflow enforce`: an `[enforce]` table and the log level."""

    model_config = ConfigDict(extra="forbid")

    log_level: str = "INFO"
    enforce: EnforceConfig


def load_central_config(path: Path) -> CentralConfig:
    """Read enforce.toml; EnforceConfigError saying what is wrong (no values, no secrets)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise EnforceConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise EnforceConfigError(f"{path}: not TOML: {exc}") from None
    try:
        return CentralConfig.model_validate(data)
    except ValidationError as exc:
        raise EnforceConfigError(f"{path}: {problems(exc)}") from None


EXIT_CONFIG = 78  # EX_CONFIG


def run_central(config_path: Path, settings: Settings) -> None:
    """`quotaflow enforce --config enforce.toml` until SIGTERM/SIGINT; exit 78 on a bad config."""
    from quotaflow import logs
    from quotaflow.admin import ensure_topics

    try:
        config = load_central_config(config_path)
    except EnforceConfigError as exc:
        logs.setup("INFO")
        log.critical("%s; exiting with status %d", exc, EXIT_CONFIG)
        raise SystemExit(EXIT_CONFIG) from None
    logs.setup(config.log_level.upper())
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        consumer = EnforceConsumer.from_config(
            config.enforce, settings, node_id=None,
            state_file=settings.state_dir / "enforce-central.db",
        )
    except EnforceConfigError as exc:
        log.critical("%s; exiting with status %d", exc, EXIT_CONFIG)
        raise SystemExit(EXIT_CONFIG) from None
    try:
        ensure_topics(settings)
    except Exception as exc:
        log.warning("could not check the topics (%s); they must exist", exc)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    consumer.run(stop)
