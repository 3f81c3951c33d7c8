"""The billing rules: counter reports in, exact byte deltas and running period totals out.

A `NodeLedger` holds everything quotaflow remembers about one node within one
partition: each user's last counters, the (epoch, seq) pairs of delta reports
already billed, and the user's running day and month totals. `update()` applies a
report (one partition's fragment of it) and says what to bill, what totals changed
and what was refused. Because a fragment touches exactly one ledger and the ledger
serialises to one record, the stream worker can persist all effects of a message
atomically, which is what makes redelivery after a crash harmless.

>>> from datetime import datetime, UTC
>>> from zoneinfo import ZoneInfo
>>> from quotaflow.core.contracts import Counter, CounterReport
>>> policy = BillingPolicy(timezone=ZoneInfo("UTC"))
>>> ledger = NodeLedger("node-a")
>>> def report(seq, up, down, epoch=1):
...     return CounterReport(node_id="node-a", epoch=epoch, seq=seq,
...         observed_at=datetime(2026, 11, 21, 12, seq, tzinfo=UTC),
...         counters=(Counter(user_id="alice", up=up, down=down),))
>>> ledger.update(report(1, 100, 1000), policy).billed
[('alice', 100, 1000)]
>>> ledger.update(report(2, 150, 1000), policy).billed
[('alice', 50, 0)]
>>> ledger.update(report(2, 150, 1000), policy).billed   # a duplicate bills nothing
[]
>>> ledger.update(report(1, 30, 40, epoch=2), policy).billed   # the node restarted
[('alice', 30, 40)]
>>> ledger.update(report(3, 30, 40, epoch=2), policy).totals  # user, day and month up/down
[('alice', 180, 1040, 180, 1040)]

Those are raw bytes. Billed bytes are raw bytes times the node's rate in effect at
the report's `observed_at` (in 1/10000, rounded down per reading and direction; see
`quotaflow.core.plans.rate_at`); once they differ from the raw ones, a row gives
them after the raw ones:

>>> ledger.update(report(4, 40, 50, epoch=2), policy, rate=15_000).totals
[('alice', 190, 1050, 190, 1050, 195, 1055, 195, 1055)]
"""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass, field
from sys import intern
from zoneinfo import ZoneInfo

import orjson

from quotaflow.core.contracts import (
    MAX_COUNTER,
    CounterReport,
    DeadReason,
    PeriodKind,
    TotalsRow,
    right_sized,
)
from quotaflow.core.periods import Calendar
from quotaflow.core.plans import RATE_UNIT

# An epoch that reads as milliseconds since 2000 is taken to be the counters' start time.
_PLAUSIBLE_EPOCH_MS = 946_684_800_000
# The most epochs of delta reports a node may have within the lateness window; a
# report of one more is refused as an anomaly (a node that restarts all the time).
_DELTA_EPOCHS_MAX = 10_000
# Above this many out-of-order seqs in one epoch, the oldest gap is given up as billed.
_DELTA_SEQS_KEPT = 10_000


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    """The configurable parts of the billing rules."""

    timezone: ZoneInfo
    max_rate_bytes_per_s: int = 1_250_000_000
    min_interval_s: float = 60.0
    lateness_days: int = 3

    def allowance(self, interval_s: float | None) -> float:
        """The most bytes one direction may plausibly move in `interval_s` seconds."""
        return self.max_rate_bytes_per_s * max(interval_s or 0.0, self.min_interval_s)


@dataclass(slots=True)
class Refusal:
    """A user's traffic that was not billed, and why."""

    reason: DeadReason
    detail: str
    user_id: str
    up: int
    down: int


@dataclass(slots=True)
class Billing:
    """What one `update()` decided."""

    billed: list[tuple[str, int, int]] = field(default_factory=list)
    # the report's day and month, and (user, day up, day down, month up, month down,
    # then the same billed) rows: a `TotalsBatch`'s fields, as plain values because
    # this is the hot path
    day: int = 0
    month: int = 0
    totals: list[TotalsRow] = field(default_factory=list)
    rate: int = RATE_UNIT  # the node's rate at the report's observed_at, in 1/10000
    refused: list[Refusal] = field(default_factory=list)
    duplicate: bool = False
    # The whole fragment was set aside (reason, detail) without its readings: whether
    # its bytes were billed before cannot be known, so its dead letter lists none.
    set_aside: tuple[DeadReason, str] | None = None
    # A cumulative report whose seq went back while its counters went up (a node
    # reinstalled without its outbox): not billed now, and visible.
    seq_went_back: bool = False

    @property
    def billed_bytes(self) -> int:
        """Up plus down bytes billed, raw (before the rate)."""
        return sum(up + down for _, up, down in self.billed)

    def rated(self) -> list[tuple[str, int]]:
        """(user, billed up + billed down) of each billed reading, after the rate: the quota
        step's readings (all observed at the report's observed_at).

        >>> Billing(billed=[("alice", 3, 5)], rate=15_000).rated()
        [('alice', 11)]
        """
        rate, unit = self.rate, RATE_UNIT
        if rate == unit:
            return [(user, up + down) for user, up, down in self.billed]
        return [(user, up * rate // unit + down * rate // unit)
                for user, up, down in self.billed]


@dataclass(slots=True)
class _SeqSet:
    """The seqs of one epoch billed so far: all up to `low`, plus the sparse ones above."""

    low: int = -1
    above: list[int] = field(default_factory=list)
    last_seen: int = 0  # the latest observed_at of the epoch's reports, Unix seconds

    def add(self, seq: int) -> bool:
        """Record `seq`; False if it was already recorded."""
        if seq <= self.low:
            return False
        if self.above and seq in self.above:
            return False
        insort(self.above, seq)
        while self.above and self.above[0] == self.low + 1:
            self.low = self.above.pop(0)
        if len(self.above) > _DELTA_SEQS_KEPT:
            self.low = self.above.pop(0)
        return True


class NodeLedger:
    """One node's billing state within one partition; see the module docstring."""

    __slots__ = (
        "_deltas", "_deltas_dropped_until", "_kept_from", "_totals", "node_id", "users",
        "watermark",
    )

    # period -> period start -> user -> (up, down, billed up, billed down), or (up, down)
    # when the billed bytes equal the raw ones (a node at rate 1): a `Total`
    _totals: dict[PeriodKind, dict[int, dict[str, Total]]]

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        # Tuples of ints only, never lists: the garbage collector stops tracking
        # them, so a large state costs no time in collections.
        # user -> (epoch, seq, up, down, observed_s) of the last cumulative counters
        self.users: dict[str, tuple[int, int, int, int, int]] = {}
        # period -> period start -> user -> `Total`; nested so that the whole state
        # serialises without a Python loop
        self._totals = {"day": {}, "month": {}}
        self._deltas: dict[int, _SeqSet] = {}
        # the latest observed_at of any delta epoch whose seqs were dropped
        self._deltas_dropped_until = 0
        self._kept_from = 0  # the oldest day start whose totals are kept
        self.watermark = 0  # the latest observed_at seen, Unix seconds

    def update(
        self, report: CounterReport, policy: BillingPolicy, rate: int = RATE_UNIT
    ) -> Billing:
        """Apply one report (or fragment) of this node; see docs/contracts.md for the rules.

        `rate` is the node's rate (1/10000) in effect at the report's `observed_at`.
        """
        observed = int(report.observed_at.timestamp())
        calendar = _calendar(policy.timezone)
        day, month = calendar.starts(observed)
        self.watermark = max(self.watermark, observed)
        oldest_day = calendar.days_back(self.watermark, policy.lateness_days)
        late = day < oldest_day
        billing = Billing(day=day, month=month, rate=rate)
        if report.kind == "delta":
            self._apply_delta(report, observed, policy, billing)
        else:
            self._apply_cumulative(report, observed, policy, billing)
        if late:
            for user_id, up, down in billing.billed:
                billing.refused.append(
                    Refusal("late", f"observed before the lateness window (day {day})",
                            user_id, up, down)
                )
        rows = None
        if billing.billed and not late:
            # when the report's every reading was billed, its rows come with the sums
            rows = self._add_to_totals(
                billing, day, month, len(billing.billed) == len(report.counters))
        if late:
            billing.billed = []
        else:
            billing.totals = self._current_totals(report, day, month) if rows is None else rows
        if oldest_day > self._kept_from:
            self._kept_from = oldest_day
            oldest_month = calendar.month_start(calendar.days_back(oldest_day, 31))
            self._forget_before(oldest_day, oldest_month)
            # A delta epoch's seqs are kept while any of its reports could still be billed.
            for epoch in [e for e, seqs in self._deltas.items() if seqs.last_seen < oldest_day]:
                dropped = self._deltas.pop(epoch)
                if dropped.last_seen > self._deltas_dropped_until:
                    self._deltas_dropped_until = dropped.last_seen
        return billing

    def _apply_cumulative(
        self, report: CounterReport, observed: int, policy: BillingPolicy, billing: Billing
    ) -> None:
        epoch, seq = report.epoch, report.seq
        since_epoch = (
            observed - epoch / 1000 if _PLAUSIBLE_EPOCH_MS <= epoch <= observed * 1000 else None
        )
        users = self.users
        billed = billing.billed
        surely_fine = policy.allowance(None)  # no interval allows less than this
        baseline = report.baseline
        for counter in report.counters:
            up, down = counter.up, counter.down
            state = users.get(counter.user_id)
            if state is None or epoch > state[0]:
                bill_up, bill_down, interval = up, down, since_epoch
            elif epoch < state[0] or seq <= state[1]:
                # A duplicate or stale report; one whose seq went back while its counters
                # went up is a node that lost its seqs, and is made visible.
                if epoch == state[0] and seq < state[1] and (up > state[2] or down > state[3]):
                    billing.seq_went_back = True
                continue
            else:
                bill_up = up - state[2] if up >= state[2] else up
                bill_down = down - state[3] if down >= state[3] else down
                interval = observed - state[4]
            users[counter.user_id if state else intern(counter.user_id)] = (
                epoch, seq, up, down, observed)
            if baseline or not (bill_up or bill_down):
                continue
            if bill_up <= surely_fine and bill_down <= surely_fine:
                billed.append((counter.user_id, bill_up, bill_down))
            else:
                self._bill(billing, policy, counter.user_id, bill_up, bill_down, interval)

    def _apply_delta(
        self, report: CounterReport, observed: int, policy: BillingPolicy, billing: Billing
    ) -> None:
        seqs = self._deltas.get(report.epoch)
        if seqs is None:
            if observed <= self._deltas_dropped_until:
                # Its epoch's seqs may have been dropped with the lateness window: a
                # redelivery of a billed report looks the same as one never billed.
                billing.set_aside = (
                    "stale-epoch",
                    "delta report of an epoch not seen within the lateness window: "
                    "whether it was billed cannot be known, so no readings are listed",
                )
                return
            if len(self._deltas) >= _DELTA_EPOCHS_MAX:
                for counter in report.counters:
                    billing.refused.append(
                        Refusal("anomaly", f"more than {_DELTA_EPOCHS_MAX} delta epochs "
                                "within the lateness window", counter.user_id, counter.up,
                                counter.down)
                    )
                return
            seqs = self._deltas[report.epoch] = _SeqSet()
        if observed > seqs.last_seen:
            seqs.last_seen = observed
        if not seqs.add(report.seq):
            billing.duplicate = True
            return
        if report.baseline:
            return
        for counter in report.counters:
            if counter.up or counter.down:
                self._bill(billing, policy, counter.user_id, counter.up, counter.down, None)

    @staticmethod
    def _bill(
        billing: Billing,
        policy: BillingPolicy,
        user_id: str,
        up: int,
        down: int,
        interval: float | None,
    ) -> None:
        allowed = policy.allowance(interval)
        if up > allowed or down > allowed:
            billing.refused.append(
                Refusal("anomaly", f"more than {allowed:.0f} bytes in one direction "
                        f"for an interval of {interval or policy.min_interval_s:.0f}s",
                        user_id, up, down)
            )
        else:
            billing.billed.append((user_id, up, down))

    def _add_to_totals(
        self, billing: Billing, day: int, month: int, rows_wanted: bool
    ) -> list[TotalsRow] | None:
        """Add the billed readings to the day and month totals, refusing any that would overflow.

        With `rows_wanted` (every reading of the report was billed), it returns the
        rows `_current_totals` would give, in the same order, unless it refused one.

        InfluxDB stores integers as int64 and the sink writes `total_bytes = up + down`,
        so a reading that would take a user's month total of up + down past 2**63 - 1
        is refused as an anomaly, and no total changes. The month total holds every
        day total of its month (both get the same readings, and a month is kept longer
        than its days), so checking it bounds the day total too.
        """
        months = self._period("month", month)
        days = self._period("day", day)
        refused: list[tuple[str, int, int]] | None = None
        rows: list[TotalsRow] | None = [] if rows_wanted else None
        rate, unit = billing.rate, RATE_UNIT
        plain = rate == unit
        for reading in billing.billed:
            user_id, up, down = reading
            if plain:
                bill_up, bill_down = up, down
            else:
                bill_up, bill_down = up * rate // unit, down * rate // unit
            total = months.get(user_id)
            if total is None:
                user_id = intern(user_id)  # one string per user, however many dicts hold it
                month_total = _first(up, down, bill_up, bill_down)
            elif plain and len(total) == 2:  # most readings: `_added`'s first case, inline
                month_total = (total[0] + up, total[1] + down)
            else:
                month_total = _added(total, up, down, bill_up, bill_down, plain)
            # the billed bytes are the last two, in either form
            if (month_total[0] + month_total[1] > MAX_COUNTER
                    or month_total[-2] + month_total[-1] > MAX_COUNTER):
                if refused is None:
                    refused = []
                refused.append(reading)
                continue
            months[user_id] = month_total
            total = days.get(user_id)
            if total is None:
                day_total = _first(up, down, bill_up, bill_down)
            elif plain and len(total) == 2:
                day_total = (total[0] + up, total[1] + down)
            else:
                day_total = _added(total, up, down, bill_up, bill_down, plain)
            days[user_id] = day_total
            if rows is not None:
                rows.append(_row(user_id, day_total, month_total))
        if refused is not None:
            for user_id, up, down in refused:
                billing.refused.append(Refusal(
                    "anomaly", f"the user's month total of up + down would exceed 2**63-1 "
                    f"bytes ({MAX_COUNTER}, InfluxDB's largest integer)", user_id, up, down,
                ))
            gone = set(refused)  # a user appears once in a report
            billing.billed = [r for r in billing.billed if r not in gone]
            return None  # a refused user may have a day total: `_current_totals` says
        return rows

    def _period(self, period: PeriodKind, start: int) -> dict[str, Total]:
        """The user totals of one period, created empty when missing."""
        starts = self._totals[period]
        found = starts.get(start)
        if found is None:
            found = starts[start] = {}
        return found

    def _current_totals(
        self, report: CounterReport, day: int, month: int
    ) -> list[TotalsRow]:
        """The day and month totals of every user the report names who has a day total.

        Sent even when nothing changed: after a crash the worker handles the message
        again, and these re-sent totals are what reaches the sinks then. A user
        without a day total was billed nothing today, so nothing of theirs is owed.
        A row whose billed bytes equal its raw bytes (a node at rate 1) leaves them
        out, as records from before rates did: a third fewer bytes per row.
        """
        today = self._totals["day"].get(day)
        if not today:
            return []
        this_month = self._totals["month"][month]
        out: list[TotalsRow] = []
        for counter in report.counters:
            user_id = counter.user_id
            total = today.get(user_id)
            if total is not None:
                out.append(_row(user_id, total, this_month[user_id]))
        return out

    def _forget_before(self, oldest_day: int, oldest_month: int) -> None:
        for period, oldest in (("day", oldest_day), ("month", oldest_month)):
            starts = self._totals[period]  # type: ignore[index]
            for start in [s for s in starts if s < oldest]:
                del starts[start]

    def total(self, user_id: str, period: PeriodKind, start: int) -> tuple[int, int] | None:
        """The running raw (up, down) total of a user for the period starting at `start`."""
        found = self._totals[period].get(start, {}).get(user_id)
        return None if found is None else (found[0], found[1])

    def billed_total(
        self, user_id: str, period: PeriodKind, start: int
    ) -> tuple[int, int] | None:
        """The running billed (up, down) total of a user for the period starting at `start`."""
        found = self._totals[period].get(start, {}).get(user_id)
        return None if found is None else (found[-2], found[-1])

    def to_bytes(self) -> bytes:
        """The whole state as one record, for the changelog (right-sized: tables keep it)."""
        return right_sized(orjson.dumps(
            {
                "v": 1,
                "node": self.node_id,
                "wm": self.watermark,
                "users": self.users,
                "totals": self._totals,
                "deltas": {e: [s.low, s.above, s.last_seen] for e, s in self._deltas.items()},
                "dropped": self._deltas_dropped_until,
            },
            option=orjson.OPT_NON_STR_KEYS,
        ))

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeLedger:
        """Rebuild a ledger from `to_bytes()` output."""
        raw = orjson.loads(data)
        ledger = cls(raw["node"])
        ledger.watermark = raw["wm"]
        # A report's users share its epoch, seq and observed_at: one int object each
        # again, rather than three per user (a tenth of the state)
        shared: dict[int, int] = {}
        one = shared.setdefault
        ledger.users = {
            intern(user): (one(epoch, epoch), one(seq, seq), up, down, one(seen, seen))
            for user, (epoch, seq, up, down, seen) in raw["users"].items()
        }
        ledger._totals = {
            period: {
                # records written before rates existed hold (up, down) too: billed alike;
                # records written before (up, down) stood for billed alike may hold
                # (up, down, up, down)
                int(start): {
                    intern(user): (
                        (t[0], t[1]) if len(t) == 2 or (t[2] == t[0] and t[3] == t[1])
                        else (t[0], t[1], t[2], t[3])
                    )
                    for user, t in users.items()
                }
                for start, users in raw["totals"][period].items()
            }
            for period in ("day", "month")
        }
        # Records from before "dropped" existed may have dropped epochs by count.
        ledger._deltas_dropped_until = raw.get("dropped", ledger.watermark)
        ledger._deltas = {
            # records written before last_seen existed count as seen at the watermark
            int(e): _SeqSet(seqs[0], seqs[1], seqs[2] if len(seqs) > 2 else ledger.watermark)
            for e, seqs in raw["deltas"].items()
        }
        return ledger


Total = tuple[int, int] | tuple[int, int, int, int]
"""A user's period total: (up, down, billed up, billed down), or (up, down) when the
billed bytes equal the raw ones, which is most totals (nodes at rate 1): two fewer
items per total, in memory and in the ledger's record."""


def _row(user_id: str, day: Total, month: Total) -> TotalsRow:
    """A user's totals row: its day and month totals, then their billed bytes if either
    differs from the raw ones (`TotalsBatch` leaves them out otherwise).

    >>> _row("alice", (1, 2), (3, 4)), _row("bob", (1, 2), (3, 4, 5, 6))
    (('alice', 1, 2, 3, 4), ('bob', 1, 2, 3, 4, 1, 2, 5, 6))
    """
    if len(day) == 2 and len(month) == 2:
        return (user_id, day[0], day[1], month[0], month[1])
    return (user_id, day[0], day[1], month[0], month[1], day[-2], day[-1], month[-2], month[-1])


def _first(up: int, down: int, bill_up: int, bill_down: int) -> Total:
    """The `Total` of a user's first reading in a period.

    >>> _first(3, 5, 3, 5), _first(3, 5, 4, 7)
    ((3, 5), (3, 5, 4, 7))
    """
    if bill_up == up and bill_down == down:
        return (up, down)
    return (up, down, bill_up, bill_down)


def _added(
    total: Total, up: int, down: int, bill_up: int, bill_down: int, plain: bool,
) -> Total:
    """`total` plus a reading's bytes (`plain`: billed alike, the reading's rate is 1).

    >>> _added((5, 6), 1, 1, 1, 1, True), _added((5, 6, 7, 9), 1, 1, 1, 1, True)
    ((6, 7), (6, 7, 8, 10))
    >>> _added((5, 6), 2, 2, 3, 3, False), _added((5, 6, 4, 5), 2, 2, 3, 3, False)
    ((7, 8, 8, 9), (7, 8))
    """
    raw_up, raw_down = total[0] + up, total[1] + down
    if len(total) == 2:
        if plain:
            return (raw_up, raw_down)
        billed_up, billed_down = total[0] + bill_up, total[1] + bill_down
    else:
        billed_up, billed_down = total[2] + bill_up, total[3] + bill_down
    if billed_up == raw_up and billed_down == raw_down:
        return (raw_up, raw_down)
    return (raw_up, raw_down, billed_up, billed_down)


_calendars: dict[ZoneInfo, Calendar] = {}


def _calendar(tz: ZoneInfo) -> Calendar:
    found = _calendars.get(tz)
    if found is None:
        found = _calendars[tz] = Calendar(tz)
    return found
