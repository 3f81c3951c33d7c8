"""The worker's per-message logic, without Faust: one raw message in, what to publish out.

`RawHandler.handle()` takes one message of `<prefix>.raw` (its value, partition
and offset) and returns an `Outcome`: the totals records, dead letters and
re-routed fragments to send. The Faust app (`quotaflow.streams.app`) only moves
messages: it consumes, calls the handler and sends each output. The node ledgers
live in a mapping the handler is given (a Faust table in the worker, a dict in
tests), one record per node and partition.

Ledgers are written at checkpoints, not per message: `checkpoint()` writes every
ledger that changed since the last one, as one record each, and the worker
acknowledges a message only after a checkpoint that holds its effects. A crash
then makes the worker handle again at most the messages since the last
checkpoint, against ledgers that do not have them, so it bills them again
exactly once; a message acknowledged is in a written ledger. A node whose
ledger changes with every message is written once per checkpoint instead of
once per message, which is most of what the worker produced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from pydantic import ValidationError

from quotaflow.core.contracts import (
    CounterReport,
    DeadLetter,
    DeadReason,
    TotalsBatch,
    validation_reason,
)
from quotaflow.core.ledger import Billing, NodeLedger, Refusal
from quotaflow.core.partitioning import owners, split_report
from quotaflow.core.plans import RATE_UNIT
from quotaflow.core.settings import Settings
from quotaflow.streams.quotas import Decided, QuotaKeeper

log = logging.getLogger("quotaflow.streams")


class LedgerTable(Protocol):
    """Where node ledgers are stored: `N|P` -> `NodeLedger.to_bytes()` (a Faust table, a dict)."""

    def get(self, key: bytes, /) -> bytes | None: ...

    def __setitem__(self, key: bytes, value: bytes, /) -> None: ...


@dataclass
class WorkerStats:
    """Counters for the status line."""

    messages: int = 0
    readings: int = 0
    billed_bytes: int = 0
    dead: int = 0
    rerouted: int = 0
    stale: int = 0  # reports not billed for a stale seq or epoch (seq went back, stale-epoch)
    late: int = 0  # reports with readings refused as late
    dead_letters: dict[str, int] = field(default_factory=dict)  # reason -> letters sent
    started: float = field(default_factory=time.monotonic)

    def count_dead(self, reason: str) -> None:
        """Count one dead letter of `reason`."""
        self.dead += 1
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1

    def line(self) -> str:
        """One line for logs and the status display."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (
            f"messages={self.messages} readings={self.readings} "
            f"({self.readings / elapsed:,.0f}/s) billed={self.billed_bytes:,}B "
            f"dead={self.dead} rerouted={self.rerouted} stale={self.stale}"
        )


RateLookup = Callable[[str, int], int]
"""(node_id, observed_at Unix s) -> the node's rate then, in 1/10000."""


def ledger_key(node_id: str, partition: int) -> bytes:
    """The table key of a node's ledger in `partition`: `N|P`."""
    return f"{node_id}|{partition}".encode()


class Biller:
    """Applies report fragments to node ledgers and says what to publish.

    It knows nothing of Faust but the `table` mapping it is given: the ledger
    of node N in partition P is stored under the key `N|P`, as one record.
    """

    def __init__(
        self, settings: Settings, table: LedgerTable, rate: RateLookup | None = None
    ) -> None:
        self.settings = settings
        self.rate = rate
        self.policy = settings.billing_policy
        self.partitions = settings.partitions
        self.owners = owners(settings.partitions)
        self.table = table
        self._live: dict[bytes, NodeLedger] = {}
        # key -> (message, rate) of each fragment applied to the ledger since it was
        # last written, in order: the ledger's changes to write at the checkpoint, and
        # what rebuilds it if a later message fails half way
        self._unwritten: dict[bytes, list[tuple[bytes, int]]] = {}
        self.stats = WorkerStats()

    def forget_live(self) -> None:
        """Drop decoded ledgers and their unwritten changes; after a rebalance the table
        is the truth, and the messages not acknowledged come again."""
        self._live.clear()
        self._unwritten.clear()

    def own_fragment(
        self, report: CounterReport, partition: int
    ) -> tuple[CounterReport | None, dict[int, CounterReport]]:
        """The fragment of `report` that `partition` bills, and the others by partition
        (none when the report is all there). A cumulative report with nothing for
        `partition` has no fragment there (None); a delta report has one on every
        partition (see `split_report`)."""
        if not self.misrouted(report, partition):
            return report, {}
        fragments = split_report(report, self.partitions)
        return fragments.pop(partition, None), fragments

    def ledger(self, node_id: str, partition: int) -> NodeLedger:
        """The node's ledger for this partition, from the live cache or the table."""
        key = ledger_key(node_id, partition)
        found = self._live.get(key)
        if found is None:
            stored = self.table.get(key)
            found = NodeLedger.from_bytes(stored) if stored else NodeLedger(node_id)
            self._live[key] = found
        return found

    def misrouted(self, report: CounterReport, partition: int) -> bool:
        """True if some reading belongs to another partition.

        A user with counters in the node's ledger of `partition` was billed there,
        so it belongs there: only the others are looked up, and the ledger's map
        is the one billing reads next.
        """
        owner = self.owners
        known = self.ledger(report.node_id, partition).users
        # a plain loop: no generator to resume per reading (the hot path)
        for counter in report.counters:
            user_id = counter.user_id
            if user_id not in known and owner[user_id] != partition:
                return True
        return False

    def bill(self, report: CounterReport, partition: int) -> Billing:
        """Apply one fragment that belongs to `partition`; `keep()` or `undo()` follows."""
        if not self.stats.messages:
            self.stats.started = time.monotonic()
            log.info("first message at %.3f", time.time())  # read by bench/throughput.py
        ledger = self.ledger(report.node_id, partition)
        rate = RATE_UNIT if self.rate is None else self.rate(
            report.node_id, int(report.observed_at.timestamp())
        )
        billing = ledger.update(report, self.policy, rate)
        self.stats.messages += 1
        self.stats.readings += len(report.counters)
        self.stats.billed_bytes += billing.billed_bytes
        return billing

    def keep(self, node_id: str, partition: int, message: bytes, rate: int) -> None:
        """Keep what `bill()` did with the fragment of `message` (billed at `rate`): the
        ledger is written at the next `checkpoint()`."""
        self._unwritten.setdefault(ledger_key(node_id, partition), []).append((message, rate))

    def undo(self, node_id: str, partition: int) -> None:
        """Forget what the last `bill()` did to the node's ledger, which may be half
        done: the ledger is read again and the fragments kept since its last write are
        applied again, in order."""
        key = ledger_key(node_id, partition)
        self._live.pop(key, None)
        ledger = self.ledger(node_id, partition)
        for message, rate in self._unwritten.get(key, ()):
            fragment, _ = self.own_fragment(CounterReport.decode(message), partition)
            assert fragment is not None  # it was billed here
            ledger.update(fragment, self.policy, rate)

    def checkpoint(self) -> int:
        """Write every ledger that changed since the last checkpoint, a record each;
        the number written."""
        written = self._unwritten
        self._unwritten = {}
        for key in written:
            self.table[key] = self._live[key].to_bytes()
        return len(written)


@dataclass(frozen=True, slots=True)
class Keyed:
    """A record to send with a key: to `<prefix>.totals`, or a fragment back to `<prefix>.raw`."""

    partition: int
    key: bytes | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """A `DeadLetter` record to send to `<prefix>.dead`."""

    partition: int
    value: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one raw message makes the worker publish, each list in sending order."""

    totals: tuple[Keyed, ...] = ()
    dead: tuple[Dead, ...] = ()
    rerouted: tuple[Keyed, ...] = ()
    quota: Decided | None = None  # the quota step's commands, when the message billed bytes


class RawHandler:
    """Bills one raw message at a time and says what to publish; no Kafka, no Faust.

    `table` holds the node ledgers (see `LedgerTable`); `now` is the wall clock
    (Unix seconds) that reports from the future are judged by and quota decisions
    are dated with; `rate` gives a node's rate (1 when not given). A message
    handled again (a redelivery) bills nothing twice: its seqs are in the ledger
    already, and its totals are sent again as they are. With `quotas` (whose book
    of the partition must be loaded), the billed bytes go through the quota step.
    """

    def __init__(
        self, settings: Settings, table: LedgerTable, *, now: Callable[[], float] = time.time,
        rate: RateLookup | None = None, quotas: QuotaKeeper | None = None,
    ) -> None:
        self.settings = settings
        self.quotas = quotas
        self.biller = Biller(settings, table, rate)
        self.stats = self.biller.stats
        self.now = now
        self.raw_topic = settings.topics.raw
        self.partitions = settings.partitions
        self.max_clock_skew_s = settings.max_clock_skew_s
        self._seq_went_back: set[tuple[str, int]] = set()  # (node, epoch) dead-lettered

    def forget_live(self) -> None:
        """Drop decoded ledgers (after a rebalance); the table is the truth."""
        self.biller.forget_live()

    def checkpoint(self) -> int:
        """Write the node ledgers that changed since the last checkpoint (see the module
        docstring); the messages handled before it may then be acknowledged."""
        return self.biller.checkpoint()

    def _dead(
        self, value: bytes, partition: int, offset: int, reason: DeadReason, detail: str,
        readings: tuple[dict[str, int | str], ...] = (),
    ) -> Dead:
        self.stats.count_dead(reason)
        return Dead(partition, DeadLetter.encode(
            reason, detail, topic=self.raw_topic, partition=partition, offset=offset,
            payload=value, readings=readings,
        ))

    def handle(
        self, value: bytes, partition: int, offset: int, key: bytes | None = None,
        appended: float | None = None,
    ) -> Outcome:
        """Bill one message of `<prefix>.raw`; `key` is the message's key (kept on re-routes).

        `appended` is when the message was appended to `<prefix>.raw` (its Kafka
        timestamp, Unix seconds; `now()` when not given), for the totals' `ReportSeen`.
        """
        try:
            report = CounterReport.decode(value)
        except ValidationError as exc:
            return Outcome(dead=(
                self._dead(value, partition, offset, "invalid", validation_reason(exc)),
            ))
        ahead = report.observed_at.timestamp() - self.now()
        if ahead > self.max_clock_skew_s:  # a bad clock would make later reports late
            return Outcome(dead=(self._dead(
                value, partition, offset, "invalid",
                f"observed_at is {ahead:.0f}s in the future "
                f"(more than QUOTAFLOW_MAX_CLOCK_SKEW_S)",
            ),))
        own, others = self.biller.own_fragment(report, partition)
        rerouted = tuple(
            Keyed(other, key, fragment.encode()) for other, fragment in others.items()
        )
        self.stats.rerouted += len(rerouted)
        if own is None:
            return Outcome(rerouted=rerouted)
        report = own
        quota: Decided | None = None
        try:
            billing = self.biller.bill(report, partition)
            quotas = self.quotas
            if quotas is not None and billing.billed:
                # journaled before the ledger record, on the same changelog partition
                quota = quotas.update(
                    partition, offset, int(report.observed_at.timestamp()), billing.rated(),
                    datetime.fromtimestamp(self.now(), UTC),
                )
            self.biller.keep(report.node_id, partition, value, billing.rate)
        except Exception as exc:  # a bug must not stop the partition: keep the message
            log.exception("cannot bill %s[%d]@%d", self.raw_topic, partition, offset)
            self.biller.undo(report.node_id, partition)  # the ledger may be half updated
            return Outcome(rerouted=rerouted, dead=(self._dead(
                value, partition, offset, "error", f"{type(exc).__name__}: {exc}"[:500]
            ),))
        # also without totals: the record tells the sinks the node is alive
        seen = (report.epoch, report.seq, int(report.observed_at.timestamp() * 1000),
                int((self.now() if appended is None else appended) * 1000),
                len(report.counters))
        totals = (Keyed(partition, report.node_id.encode(), TotalsBatch.encode(
            report.node_id, billing.day, billing.month, billing.totals, seen
        )),)
        by_reason: dict[DeadReason, list[Refusal]] = {}
        for refusal in billing.refused:
            by_reason.setdefault(refusal.reason, []).append(refusal)
        dead = tuple(
            self._dead(
                value, partition, offset, reason, refusals[0].detail,
                tuple({"user_id": r.user_id, "up": r.up, "down": r.down} for r in refusals),
            )
            for reason, refusals in by_reason.items()
        )
        if "late" in by_reason:
            self.stats.late += 1
        if billing.set_aside is not None:
            self.stats.stale += billing.set_aside[0] == "stale-epoch"
            dead += (self._dead(value, partition, offset, *billing.set_aside),)
        if billing.seq_went_back:
            self.stats.stale += 1
            node_epoch = (report.node_id, report.epoch)
            if node_epoch not in self._seq_went_back:  # one dead letter per node and epoch
                self._seq_went_back.add(node_epoch)
                dead += (self._dead(
                    value, partition, offset, "stale-seq",
                    f"seq {report.seq} of epoch {report.epoch} is below a seq already billed, "
                    "with higher counters: the node lost its seqs (reinstalled without its "
                    "outbox?); its traffic is billed once its seq passes the old one or its "
                    "epoch changes",
                ),)
        return Outcome(
            totals=totals, dead=dead, rerouted=rerouted, quota=quota)
