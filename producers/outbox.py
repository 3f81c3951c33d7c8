"""A durable on-disk outbox for counter reports: stored before they are sent, deleted once acked.

The agent and the push receiver never hand a report to Kafka that is not first in
the outbox, and delete it only after every fragment of it was acknowledged
(acks=all). A crash at any point therefore either re-sends a report with the same
(node, epoch, seq) — which the stream deduplicates exactly — or sends it for the
first time. The outbox also keeps each node's (epoch, seq) counters, small bits of
collector state (saved in the same transaction as the report they produced) and the
push receiver's pushes held while the panel decides on them and its marks of pushes
that may come again (see producers/push.py). A held push is no report: it has no
seq, the sender never sees it, and it becomes a report (`record(release=...)`) or
goes (`drop_held`) in one transaction, so the invariants below hold unchanged.

Storage is SQLite in WAL mode with `synchronous=FULL`. WAL with NORMAL survives a
process crash (SIGKILL) but may roll back the last commits on power loss or a
kernel crash; that would break two promises: a push answered 200 would be lost,
and a seq counter could go back and hand out a seq the stream already billed for
a delta report, which it would then drop as a duplicate. FULL costs one fsync per
commit, which at one report per collector interval (or per pushed node per
minute) is nothing.

Bounded size and compaction
---------------------------
Above `max_reports` pending reports the outbox logs a WARNING, counts it
(`compactions`, `compacted`, and Prometheus counters) and compacts the reports of
each node that were never handed to Kafka (`in_flight` ones may already be
delivered, so they are re-sent as they are and never touched). Compaction works
on runs of consecutive reports of one node with the same epoch, kind and
`compact_bucket_s` time bucket (15 minutes by default: every UTC offset is a
multiple of 15 minutes, so daily totals in any billing timezone stay exact);
baseline reports are never merged.

* Cumulative runs keep, per user, the readings billing depends on: the first,
  the last, and any reading around a drop of the counters. A dropped reading r
  sits between readings p <= r <= n (each direction), and billing p -> r -> n
  bills (r - p) + (n - r) = n - p, exactly what p -> n bills: later cumulative
  counters include the earlier bytes. The first reading is kept because the
  ledger may hold a higher reading from before (then it bills a reset). Runs
  never cross an epoch change, so the last report of the old epoch — whose
  bytes the new epoch's counters do not include — is always kept.
* Delta runs are summed per user into one report (split where a user's sum
  would pass `max_merged_bytes`, so the stream's plausibility check still
  passes). The parts are deleted in the same transaction, so they can never be
  delivered as well.

The merged reports are renumbered: within the (node, epoch), the never-sent
reports hold seqs k+1..m (all seqs up to k went to Kafka, the rest never left
this file), so they get k+1, k+2, ... again and the seq counter is set to the
last one. Every seq on the wire stays unique per (node, epoch) and delta seqs
stay gap-free, which keeps the stream's record of billed seqs small. Totals stay
exact; only the time a merged reading is billed at moves within its bucket.

If compaction cannot bring the outbox under the bound (say one huge backlog of
in-flight reports), the report is still stored and an ERROR is logged: accepted
traffic is never dropped.

Identity: a lost outbox is never a first start
-----------------------------------------------
A new outbox gets a random id, kept inside it and in a marker file next to it
(`<outbox>.id`, written, fsynced, after the database). Opening checks them: a
marker without its outbox (the file gone or empty), an outbox that cannot be read
(garbage, truncated: `PRAGMA quick_check` at every open) or one with another id
raises `OutboxUnusable`, naming the file and `--reset-outbox`, and creates
nothing. Starting afresh there would silently lose the reports that were never
acknowledged and, for the agent, the traffic since the last acknowledged report
(a new outbox takes a baseline). `Outbox(path, reset=True)` does so on purpose:
it moves what is there aside (`<outbox>.broken-<time>`, never deleted), starts a
new outbox with a new id and marks it reset (`reset_at`), logging a WARNING with
the cost; on a sound outbox it changes nothing. No marker and no outbox is a first
start; an outbox from before markers gets one.

The first seq of a (node, epoch) is 0 unless the caller asks for another
(`record(first_seq=...)`); the agent asks for the wall clock in ms, so that a new
outbox's seqs lie above an old one's in an epoch that outlived it (docs/agent.md).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter as PromCounter

from quotaflow.core.contracts import Counter, CounterReport, ReportKind

log = logging.getLogger(__name__)

COMPACTIONS = PromCounter(
    "quotaflow_outbox_compactions", "Times an outbox went over its bound and was compacted"
)
COMPACTED = PromCounter(
    "quotaflow_outbox_compacted_reports", "Reports removed from outboxes by compaction"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    baseline INTEGER NOT NULL,
    observed REAL NOT NULL,
    in_flight INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_node ON reports (node_id, id);
CREATE TABLE IF NOT EXISTS seqs (
    node_id TEXT NOT NULL, epoch INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    PRIMARY KEY (node_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (key TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    at REAL NOT NULL,
    body BLOB NOT NULL
);
"""
_EPOCHS_KEPT = 16  # seq counters kept per node; older epochs are forgotten
_ID_KEY = "outbox:id"  # in `state`: this outbox's id, also in the marker file
_RESET_KEY = "outbox:reset"  # in `state`: when this outbox was started by a reset
# SQLite's names for a damaged file (or the disk under it failing), as opposed to a
# full disk or a busy lock, which pass.
_BROKEN = ("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR")

RESET_COST = (
    "the reports it held that Kafka had not acknowledged are lost, and the traffic "
    "since each node's last acknowledged report is not billed: each node's first "
    "report in the new outbox is a baseline"
)


class OutboxLocked(RuntimeError):
    """Another process has this outbox open."""


class OutboxUnusable(RuntimeError):
    """The outbox is gone, empty, unreadable or not the one that was here; see the message."""


def outbox_broken(exc: BaseException) -> bool:
    """Whether `exc` says the outbox's file is damaged (not a passing trouble like a full disk)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return name.startswith(_BROKEN)
    text = str(exc)
    return "malformed" in text or "not a database" in text


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    node_id: str
    epoch: int
    seq: int
    kind: str
    baseline: bool
    observed: float
    in_flight: bool
    body: bytes

    def report(self) -> CounterReport:
        return CounterReport.decode(self.body)


class Outbox:
    """The durable report queue of one agent or push receiver; see the module docstring.

    Thread-safe; one process at a time (a lock file next to the database says so).
    Raises `OutboxUnusable` when the outbox is lost or damaged, unless `reset`
    (which then starts a new one; see "Identity" in the module docstring).
    """

    def __init__(
        self,
        path: Path | str,
        max_reports: int = 100_000,
        *,
        compact_bucket_s: int = 900,
        max_merged_bytes: int = 64 * 2**30,
        reset: bool = False,
    ) -> None:
        if max_reports < 1 or compact_bucket_s < 1 or max_merged_bytes < 1:
            raise ValueError("max_reports, compact_bucket_s and max_merged_bytes must be >= 1")
        self.path = Path(path)
        self.max_reports = max_reports
        self.compact_bucket_s = compact_bucket_s
        self.max_merged_bytes = max_merged_bytes
        self.compactions = 0
        self.compacted = 0
        self.marker = Path(f"{self.path}.id")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise OutboxLocked(f"outbox {self.path} is in use by another process") from None
        self._lock = threading.RLock()
        try:
            self._db = self._open(reset)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.outbox_id: str = self.get_state(_ID_KEY)
        reset_at = self.get_state(_RESET_KEY)
        self.reset_at: str | None = reset_at if isinstance(reset_at, str) else None
        self._count: int = self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0]
        self._compact_above = max_reports

    # ------------------------------------------------------------------ opening

    def _open(self, reset: bool) -> sqlite3.Connection:
        """The checked database; see "Identity" in the module docstring."""
        marked = _read_marker(self.marker)
        db: sqlite3.Connection | None = None
        problem: str | None = None
        wal = Path(f"{self.path}-wal")
        if not self.path.exists():
            if marked is not None:
                problem = f"outbox {self.path} is missing, but {self.marker} says one was here"
        elif self.path.stat().st_size == 0 and not (wal.exists() and wal.stat().st_size):
            if marked is not None:
                problem = f"outbox {self.path} is empty, but {self.marker} says one was here"
        else:
            try:
                db = _connect(self.path, create=False)
                found = _check(db)
            except sqlite3.DatabaseError as exc:
                if db is not None:
                    db.close()
                db = None
                if not (isinstance(exc, _Damaged) or outbox_broken(exc)):
                    raise  # no access, say; nothing a new outbox would mend
                problem = f"outbox {self.path} cannot be read ({exc})"
            else:
                if found is None and marked is not None:
                    problem = f"outbox {self.path} is empty, but {self.marker} says one was here"
                elif found is not None and marked not in (None, "", found.id):
                    problem = (
                        f"outbox {self.path} is outbox {found.id or '(no id)'}, but "
                        f"{self.marker} says it should be {marked}: it is not the one this "
                        f"process used"
                    )
        if problem is None and db is not None:
            if reset:
                log.info("--reset-outbox: outbox %s is sound; nothing is reset", self.path)
            return self._adopt(db)
        if db is not None:
            db.close()
        if problem is not None and not reset:
            raise OutboxUnusable(
                f"{problem}. Refusing to start: a new outbox would hide the loss. If the "
                f"outbox cannot be brought back, start once with --reset-outbox to begin a "
                f"new one at {self.path}; the cost: {RESET_COST}."
            )
        reset_at: str | None = None
        if problem is not None:
            reset_at = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            moved = self._move_aside(reset_at)
            log.warning(
                "--reset-outbox: %s. Starting a new outbox at %s%s. The cost: %s.",
                problem, self.path,
                f" (the old files were moved to {', '.join(moved)})" if moved else "",
                RESET_COST,
            )
        else:  # an empty file and no marker: a first start
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        return self._create(reset_at)

    def _adopt(self, db: sqlite3.Connection) -> sqlite3.Connection:
        """A sound existing outbox: give it an id if it is from before ids, mark it."""
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM state WHERE key = ?", (_ID_KEY,)).fetchone()
        if row is None:
            outbox_id = uuid.uuid4().hex
            db.execute("INSERT INTO state (key, value) VALUES (?, ?)",
                       (_ID_KEY, orjson.dumps(outbox_id)))
            log.info("outbox %s is now outbox %s", self.path, outbox_id)
        else:
            outbox_id = orjson.loads(row[0])
        if _read_marker(self.marker) != outbox_id:
            _write_marker(self.marker, outbox_id)
        return db

    def _create(self, reset_at: str | None) -> sqlite3.Connection:
        db = _connect(self.path, create=True)
        db.executescript(_SCHEMA)
        outbox_id = uuid.uuid4().hex
        state: dict[str, Any] = {_ID_KEY: outbox_id}
        if reset_at is not None:
            state[_RESET_KEY] = reset_at
        db.execute("BEGIN IMMEDIATE")
        self._save_state(db, state)
        db.execute("COMMIT")
        # After the database: a crash in between leaves an outbox without a marker,
        # which the next start marks; never a marker without its outbox.
        _write_marker(self.marker, outbox_id)
        if reset_at is None:
            log.info("new outbox %s (%s)", self.path, outbox_id)
        return db

    def _move_aside(self, stamp: str) -> list[str]:
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                target = f"{self.path}.broken-{stamp}{suffix}"
                os.replace(source, target)
                moved.append(target)
        _fsync_dir(self.path.parent)
        return moved

    # ------------------------------------------------------------------ basics

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database and release the lock."""
        with self._lock:
            self._db.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._count

    # ------------------------------------------------------------------ seqs and state

    def last_seq(self, node_id: str, epoch: int) -> int | None:
        """The last seq handed out for (node, epoch), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT last_seq FROM seqs WHERE node_id = ? AND epoch = ?", (node_id, epoch)
            ).fetchone()
        return None if row is None else int(row[0])

    def last_epoch(self, node_id: str) -> int | None:
        """The newest epoch a seq was handed out for, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(epoch) FROM seqs WHERE node_id = ?", (node_id,)
            ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def next_seq(self, node_id: str, epoch: int) -> int:
        """Hand out (and persist) the next seq of (node, epoch); the first is 0."""
        with self._tx() as db:
            return self._bump_seq(db, node_id, epoch, None)

    @staticmethod
    def _bump_seq(
        db: sqlite3.Connection, node_id: str, epoch: int, at_least: int | None, first: int = 0
    ) -> int:
        row = db.execute(
            "SELECT last_seq FROM seqs WHERE node_id = ? AND epoch = ?", (node_id, epoch)
        ).fetchone()
        seq = first if row is None else int(row[0]) + 1
        if at_least is not None:
            seq = max(seq - 1, at_least) if row is not None else at_least
        db.execute(
            "INSERT INTO seqs (node_id, epoch, last_seq) VALUES (?, ?, ?) "
            "ON CONFLICT (node_id, epoch) DO UPDATE SET last_seq = excluded.last_seq",
            (node_id, epoch, seq),
        )
        if row is None:
            db.execute(
                "DELETE FROM seqs WHERE node_id = ? AND epoch NOT IN "
                "(SELECT epoch FROM seqs WHERE node_id = ? ORDER BY epoch DESC LIMIT ?)",
                (node_id, node_id, _EPOCHS_KEPT),
            )
        return seq

    def get_state(self, key: str) -> Any:
        """A JSON value saved with `set_state` or `record(state=...)`, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def set_state(self, key: str, value: Any) -> None:
        """Save a JSON value under `key`."""
        with self._tx() as db:
            self._save_state(db, {key: value})

    @staticmethod
    def _save_state(db: sqlite3.Connection, state: Mapping[str, Any]) -> None:
        db.executemany(
            "INSERT INTO state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, orjson.dumps(v)) for k, v in state.items()],
        )

    # ------------------------------------------------------------------ storing

    def put(self, report: CounterReport, *, state: Mapping[str, Any] | None = None) -> int:
        """Store a report that already has its seq (the counter moves up to it); returns its id."""
        with self._tx() as db:
            self._bump_seq(db, report.node_id, report.epoch, report.seq)
            row_id = self._insert(db, report)
            if state:
                self._save_state(db, state)
        self._after_insert()
        return row_id

    def record(
        self,
        *,
        node_id: str,
        epoch: int,
        observed_at: datetime,
        counters: Iterable[Counter],
        kind: ReportKind = "cumulative",
        baseline: bool = False,
        state: Mapping[str, Any] | None = None,
        first_seq: int = 0,
        release: int | None = None,
    ) -> CounterReport:
        """Give a new report the next seq of (node, epoch) and store it, in one transaction.

        The first seq this outbox hands out for (node, epoch) is `first_seq`.
        `state` is saved in the same transaction, and the held push `release`
        (see `hold`) is deleted in it: the push becomes this report.
        """
        with self._tx() as db:
            if release is not None:
                gone = db.execute("DELETE FROM held WHERE id = ?", (release,)).rowcount
                if gone != 1:
                    raise KeyError(f"no held push {release}")
            seq = self._bump_seq(db, node_id, epoch, None, first_seq)
            report = CounterReport(
                node_id=node_id, epoch=epoch, seq=seq, observed_at=observed_at, kind=kind,
                baseline=baseline, counters=tuple(counters),
            )
            self._insert(db, report)
            if state:
                self._save_state(db, state)
        self._after_insert()
        return report

    # ------------------------------------------------------------------ the push receiver's

    def hold(self, sender: str, body: bytes, at: float) -> int:
        """Keep a push (fsynced) while the panel decides on it; returns its id.

        It stays until `record(release=id)` makes it a report or `drop_held` drops it.
        """
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO held (sender, at, body) VALUES (?, ?, ?)", (sender, at, body)
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def drop_held(self, held_id: int | None = None) -> list[tuple[str, float, int]]:
        """Drop one held push (or, with None, all of them); (sender, at, body size) of each."""
        with self._tx() as db:
            where, args = ("WHERE id = ?", (held_id,)) if held_id is not None else ("", ())
            rows = db.execute(
                f"SELECT sender, at, LENGTH(body) FROM held {where} ORDER BY id", args
            ).fetchall()
            db.execute(f"DELETE FROM held {where}", args)
        return [(str(r[0]), float(r[1]), int(r[2])) for r in rows]

    def mark(self, key: str, at: float, keep_s: float) -> None:
        """Remember `key` as of `at` (fsynced); marks older than `keep_s` are forgotten."""
        with self._tx() as db:
            db.execute("DELETE FROM marks WHERE at < ? OR at > ?", (at - keep_s, at + keep_s))
            db.execute(
                "INSERT INTO marks (key, at) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET at = excluded.at",
                (key, at),
            )

    def take_mark(self, key: str, now: float, window_s: float) -> bool:
        """Whether `key` was marked within `window_s` of `now`; the mark is used up either way.

        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d, Outbox(pathlib.Path(d) / "o.db") as box:
        ...     box.mark("k", 1000.0, 60.0)
        ...     box.take_mark("k", 1030.0, 60.0), box.take_mark("k", 1031.0, 60.0)
        (True, False)
        """
        with self._tx() as db:
            row = db.execute("DELETE FROM marks WHERE key = ? RETURNING at", (key,)).fetchone()
        # abs: a mark from the future (the wall clock was stepped back) counts only
        # within the window.
        return row is not None and abs(now - float(row[0])) <= window_s

    def _insert(self, db: sqlite3.Connection, report: CounterReport) -> int:
        cursor = db.execute(
            "INSERT INTO reports (node_id, epoch, seq, kind, baseline, observed, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (report.node_id, report.epoch, report.seq, report.kind, int(report.baseline),
             report.observed_at.timestamp(), report.encode()),
        )
        self._count += 1
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _after_insert(self) -> None:
        if self._count <= self._compact_above:
            return
        before = self._count
        log.warning(
            "outbox %s holds %d reports, more than its bound of %d (is Kafka reachable?); "
            "compacting", self.path, before, self.max_reports,
        )
        removed = self.compact()
        if self._count > self.max_reports:
            log.error(
                "outbox %s still holds %d reports after compaction; keeping them all",
                self.path, self._count,
            )
        # Do not compact again on every insert while over the bound.
        self._compact_above = max(self.max_reports, self._count + max(self.max_reports // 10, 1))
        log.warning("outbox compaction removed %d of %d reports", removed, before)

    # ------------------------------------------------------------------ sending

    def pending(self, limit: int | None = None) -> list[tuple[int, CounterReport]]:
        """Pending reports in the order they were stored, as (id, report)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body, id FROM reports ORDER BY id LIMIT ?", (limit or -1,)
            ).fetchall()
        return [(int(i), CounterReport.decode(b)) for b, i in rows]

    def heads(self, limit: int | None = None) -> list[tuple[int, CounterReport]]:
        """The oldest pending report of each node, oldest first.

        Sending only these, and a node's next report only once its previous one
        was acked, keeps every node's reports in order on every partition.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT body, id FROM reports WHERE id IN "
                "(SELECT MIN(id) FROM reports GROUP BY node_id) ORDER BY id LIMIT ?",
                (limit or -1,),
            ).fetchall()
        return [(int(i), CounterReport.decode(b)) for b, i in rows]

    def claim_heads(self, limit: int | None = None) -> list[tuple[int, CounterReport]]:
        """`heads()` marked in flight in the same transaction; what a sender sends.

        Choosing and marking separately would let a compaction in between merge and
        renumber a chosen report: it would go out as it was and then again, merged,
        under the same seq, which the stream drops as a duplicate.
        """
        with self._tx() as db:
            rows = db.execute(
                "SELECT body, id FROM reports WHERE id IN "
                "(SELECT MIN(id) FROM reports GROUP BY node_id) ORDER BY id LIMIT ?",
                (limit or -1,),
            ).fetchall()
            db.executemany("UPDATE reports SET in_flight = 1 WHERE id = ?", [(i,) for _, i in rows])
        return [(int(i), CounterReport.decode(b)) for b, i in rows]

    def mark_in_flight(self, ids: Sequence[int]) -> None:
        """Record, durably, that these reports are about to be handed to Kafka.

        From then on they may be delivered, so compaction leaves them as they are.
        """
        if not ids:
            return
        with self._tx() as db:
            db.executemany("UPDATE reports SET in_flight = 1 WHERE id = ?", [(i,) for i in ids])

    def ack(self, ids: Sequence[int]) -> None:
        """Delete reports Kafka has acknowledged."""
        if not ids:
            return
        with self._tx() as db:
            cursor = db.executemany("DELETE FROM reports WHERE id = ?", [(i,) for i in ids])
            self._count -= cursor.rowcount

    # ------------------------------------------------------------------ compaction

    def compact(self) -> int:
        """Merge never-sent reports as the module docstring says; returns how many went away."""
        with self._tx() as db:
            rows = [
                _Row(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], bool(r[7]), r[8])
                for r in db.execute(
                    "SELECT id, node_id, epoch, seq, kind, baseline, observed, in_flight, body "
                    "FROM reports ORDER BY id"
                )
            ]
            by_node: dict[str, list[_Row]] = {}
            for row in rows:
                by_node.setdefault(row.node_id, []).append(row)
            removed = 0
            for node_rows in by_node.values():
                removed += self._compact_node(db, node_rows)
        self.compactions += 1
        self.compacted += removed
        COMPACTIONS.inc()
        COMPACTED.inc(removed)
        return removed

    def _compact_node(self, db: sqlite3.Connection, rows: list[_Row]) -> int:
        last_sent = max((i for i, r in enumerate(rows) if r.in_flight), default=-1)
        candidates = rows[last_sent + 1 :]
        if len(candidates) < 2:
            return 0
        node_id = rows[0].node_id
        # Per epoch: the candidates' seqs must rise in order and lie above every seq
        # that may be on the wire, and be the last ones handed out, or nothing is renumbered.
        epochs: dict[int, list[_Row]] = {}
        for row in candidates:
            epochs.setdefault(row.epoch, []).append(row)
        for epoch, group in epochs.items():
            seqs = [r.seq for r in group]
            sent = [r.seq for r in rows[: last_sent + 1] if r.epoch == epoch]
            if any(b <= a for a, b in pairwise(seqs)) or (
                sent and min(seqs) <= max(sent)
            ):
                return 0
            if self._last_seq_in(db, node_id, epoch) != seqs[-1]:
                return 0
        merged: list[CounterReport] = []
        for run in self._runs(candidates):
            merged.extend(self._merge(run) if len(run) > 1 else [run[0].report()])
        if len(merged) >= len(candidates):
            return 0
        next_seq = {epoch: group[0].seq for epoch, group in epochs.items()}
        db.executemany("DELETE FROM reports WHERE id = ?", [(r.id,) for r in candidates])
        self._count -= len(candidates)
        for report in merged:
            seq = next_seq[report.epoch]
            next_seq[report.epoch] = seq + 1
            self._insert(db, report.model_copy(update={"seq": seq}))
        for epoch, seq in next_seq.items():
            db.execute(
                "UPDATE seqs SET last_seq = ? WHERE node_id = ? AND epoch = ?",
                (seq - 1, node_id, epoch),
            )
        return len(candidates) - len(merged)

    @staticmethod
    def _last_seq_in(db: sqlite3.Connection, node_id: str, epoch: int) -> int | None:
        row = db.execute(
            "SELECT last_seq FROM seqs WHERE node_id = ? AND epoch = ?", (node_id, epoch)
        ).fetchone()
        return None if row is None else int(row[0])

    def _runs(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        run: list[_Row] = []
        key: tuple[int, str, int] | None = None
        for row in rows:
            row_key = (row.epoch, row.kind, int(row.observed // self.compact_bucket_s))
            if row.baseline or row_key != key:
                if run:
                    yield run
                run, key = [], None if row.baseline else row_key
            run.append(row)
        if run:
            yield run

    def _merge(self, run: list[_Row]) -> list[CounterReport]:
        reports = [r.report() for r in run]
        if reports[0].kind == "delta":
            return self._merge_delta(reports)
        return _merge_cumulative(reports)

    def _merge_delta(self, reports: list[CounterReport]) -> list[CounterReport]:
        out: list[CounterReport] = []
        sums: dict[str, list[int]] = {}
        last = reports[0]
        for report in reports:
            if any(
                (s := sums.get(c.user_id)) is not None
                and (s[0] + c.up > self.max_merged_bytes or s[1] + c.down > self.max_merged_bytes)
                for c in report.counters
            ):
                out.append(_delta_of(last, sums))
                sums = {}
            for c in report.counters:
                s = sums.setdefault(c.user_id, [0, 0])
                s[0] += c.up
                s[1] += c.down
            last = report
        out.append(_delta_of(last, sums))
        return out


def _delta_of(last: CounterReport, sums: Mapping[str, list[int]]) -> CounterReport:
    return last.model_copy(
        update={"counters": tuple(Counter(user_id=u, up=s[0], down=s[1]) for u, s in sums.items())}
    )


def _merge_cumulative(reports: list[CounterReport]) -> list[CounterReport]:
    """The fewest reports that bill every user exactly like `reports` do; see the module doc."""
    readings: dict[str, list[tuple[int, Counter]]] = {}
    for index, report in enumerate(reports):
        for counter in report.counters:
            readings.setdefault(counter.user_id, []).append((index, counter))
    kept: dict[str, list[tuple[int, Counter]]] = {}
    for user, seq in readings.items():
        keep: list[tuple[int, Counter]] = []
        for j, (index, c) in enumerate(seq):
            first, last = j == 0, j == len(seq) - 1
            drop_after = not last and (seq[j + 1][1].up < c.up or seq[j + 1][1].down < c.down)
            drop_here = not first and (c.up < seq[j - 1][1].up or c.down < seq[j - 1][1].down)
            if first or last or drop_after or drop_here:
                keep.append((index, c))
        kept[user] = keep
    levels = max((len(k) for k in kept.values()), default=1)
    out: list[CounterReport] = []
    for level in range(levels):
        # Aligned at the end: every user's last reading goes into the last report.
        counters: list[Counter] = []
        newest = -1
        for keep in kept.values():
            at = level - (levels - len(keep))
            if at >= 0:
                index, counter = keep[at]
                counters.append(counter)
                newest = max(newest, index)
        if level == levels - 1:
            newest = len(reports) - 1
        observed = reports[newest].observed_at if newest >= 0 else reports[-1].observed_at
        if out and observed < out[-1].observed_at:
            observed = out[-1].observed_at
        out.append(
            reports[-1].model_copy(update={"observed_at": observed, "counters": tuple(counters)})
        )
    return out


class _Damaged(sqlite3.DatabaseError):
    """SQLite opened the file, but it is no sound outbox."""


@dataclass(frozen=True, slots=True)
class _Found:
    id: str  # "" for an outbox from before ids


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    uri = f"file:{path}?mode={'rwc' if create else 'rw'}"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        db.close()
        raise
    return db


def _check(db: sqlite3.Connection) -> _Found | None:
    """What the database holds: None if nothing; raises `DatabaseError` if it is damaged."""
    (result,) = db.execute("PRAGMA quick_check(1)").fetchone()
    if result != "ok":
        raise _Damaged(f"quick_check: {result}")
    if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
        return None
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"reports", "seqs", "state"} <= tables:
        raise _Damaged(f"not an outbox (its tables: {', '.join(sorted(tables))})")
    db.execute("SELECT COUNT(*) FROM reports").fetchone()
    row = db.execute("SELECT value FROM state WHERE key = ?", (_ID_KEY,)).fetchone()
    return _Found("" if row is None else str(orjson.loads(row[0])))


def _read_marker(path: Path) -> str | None:
    """The id in a marker file ("" if it holds none), or None if there is no marker."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _write_marker(path: Path, outbox_id: str) -> None:
    tmp = Path(f"{path}.tmp")
    with tmp.open("w") as f:
        f.write(f"{outbox_id}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
