"""Quota decisions: billed usage and plans in, warn/disable/enable commands out.

A `QuotaBook` holds everything quotaflow remembers about the users of one
partition: each user's recent usage in hourly buckets, and for a user with a plan
the usage of the current period, what the packs have given, the thresholds
already warned about and why the user is disabled. It changes through three
calls, each pure (the clock is an argument) and each returning the commands to
publish, in order:

- `update(batch, now)`: billed bytes, as groups `(observed_at, [(user_id, bytes),
  ...])` that share an `observed_at` (Unix seconds; a message's readings do);
  each user's decisions are taken once per batch;
- `set_plan(user_id, plan or None, now)`: a plan arrived, changed or was deleted;
- `tick(now)`: period rollovers, expiries and packs coming or going, found by the
  clock; only users with something due are touched.

>>> from datetime import datetime, UTC
>>> from zoneinfo import ZoneInfo
>>> from quotaflow.core.plans import CalendarMonth, Pack, Plan
>>> def at(day, hour=0):
...     return datetime(2026, 11, day, hour, tzinfo=UTC)
>>> def s(day, hour=0):
...     return int(at(day, hour).timestamp())
>>> def show(commands):
...     for c in commands:
...         print(c.action, c.reason, c.used_bytes, c.allowance_bytes, c.threshold)
>>> book = QuotaBook(ZoneInfo("UTC"))
>>> show(book.update([(s(1, 8), [("alice", 600)])], now=at(2)))   # no plan yet: no commands
>>> plan = Plan(user_id="alice", quota_bytes=1000, period=CalendarMonth(kind="calendar_month"),
...             enabled=True, warn_at=(0.5, 0.8))
>>> show(book.set_plan("alice", plan, now=at(2)))      # sees the 600 bytes already used
warn threshold 600 1000 0.5
>>> show(book.update([(s(2, 1), [("alice", 150)]), (s(2, 2), [("alice", 300)])], now=at(3)))
warn threshold 1050 1000 0.8
disable quota 1050 1000 None
>>> pack = Pack(pack_id="extra", bytes=500, added_at=at(3))
>>> show(book.set_plan("alice", plan.model_copy(update={"packs": (pack,)}), now=at(3)))
enable pack 1050 1500 None
>>> show(book.update([(s(3, 1), [("alice", 500)])], now=at(4)))   # the pack is used up
disable quota 1550 1500 None
>>> show(book.update([(s(30, 23), [("alice", 10)])], now=datetime(2026, 12, 1, 0, 5, tzinfo=UTC)))
enable period_reset 0 1000 None
>>> show(book.tick(datetime(2026, 12, 2, tzinfo=UTC)))  # nothing due
>>> december = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
>>> book.usage("alice", s(1)), book.usage("alice", december)
(1560, 0)

The late 10 bytes of November count toward November, and issue no command. The
pack gave all its 500 bytes in November, so December's allowance is the quota
alone. Commands carry a deterministic id, and the state survives a restart:

>>> again = QuotaBook.from_bytes(book.to_bytes(), ZoneInfo("UTC"))
>>> show(again.update([(s(30, 23), [("alice", 1)])], now=datetime(2026, 12, 2, tzinfo=UTC)))
>>> again.usage("alice", s(1)) == 1561 and again.to_bytes() != book.to_bytes()
True

How packs are used. In the current period, the bytes above `quota_bytes` not yet
covered by packs are drawn, when a batch (or the clock) is handled, from the packs
valid then, the one that expires first first (no expiry last), then by
`added_at`, then by `pack_id`. What a pack gave is gone for good; what it did not
give carries over to later periods until it expires. The allowance of the
current period is `quota_bytes + drawn this period + what the valid packs have
left`, so drawing does not change it: a pack's expiry takes only what it had left.

How a plan sees usage from before it arrived. Every user's billed bytes are kept
in hourly buckets (by `observed_at`, UTC hours) for `history_days`. A period's
usage is created from the buckets whose first second falls in the period (and
not before `starts_at`) when it is first needed, and from then on it is exact:
every later reading observed in the period is added to it. So a plan arriving
mid-period is off by at most the traffic of the one hour that straddles the
period's start, and only when the period does not start on the hour.

Command ids: sha256 of user, period start, action, reason, threshold and the
user's command counter, which grows with every command and is kept in the state
for good (also while the user has no plan), so two commands never share an id
and handling the same input from the same state gives the same ids.
"""

from __future__ import annotations

import hashlib
import heapq
import sys
from array import array
from bisect import bisect_left
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast
from zoneinfo import ZoneInfo

import orjson

from quotaflow.core.contracts import right_sized
from quotaflow.core.plans import (
    NO_END,
    Action,
    Command,
    Plan,
    Reason,
    fraction,
    pack_order,
    period_bounds,
    unix,
)

BUCKET_S = 3600
"""The width of the usage history's buckets: a mid-period plan is exact to within one."""
DAY_HOURS = 24
"""Buckets per history record: a user's older buckets are kept in a record per UTC day."""
LONGEST_PERIOD_DAYS = 32
"""A calendar month and a DST hour, rounded up: how far back a new plan may look."""

OPERATOR, EXPIRED, QUOTA = 1, 2, 4
"""Why a user is disabled: a bit each."""
_DISABLE_REASONS: tuple[tuple[int, Reason], ...] = (
    (OPERATOR, "operator"), (EXPIRED, "expired"), (QUOTA, "quota"),
)
_NEVER = NO_END
_BEFORE_ALL = -NO_END
_NO_HOUR = -NO_END  # the newest hour of a user with no bucket
_CHANGED, _UNREPORTED = 1, 2
"""The book's lists of users: changed (for the state records) and unreported."""
_TOUCHED = _CHANGED | _UNREPORTED
_GENERATION_BITS = 32
# Shared by the users that hold nothing there, never written to: the containers a
# user with no plan (most of them) or a single hour of traffic would hold cost more
# than the rest of the user's state.
_NO_HOURS = array("q")
_NO_SEALED: dict[int, bytes] = {}
_NO_USAGE: dict[int, int] = {}
_NO_PACKS: dict[str, int] = {}


def _flat(pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Pairs as one flat list, the records' form of a map of ints.

    >>> _flat({1: 2, 3: 4}.items()), _unflat([1, 2, 3, 4])
    ([1, 2, 3, 4], {1: 2, 3: 4})
    """
    return [x for pair in pairs for x in pair]


def _unflat(flat: Sequence[int]) -> dict[int, int]:
    """A flat list of pairs (`_flat()`, or a packed array of them) as a map."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _packed(flat: list[int]) -> array[int] | list[int]:
    """`flat` as 8-byte ints, or as it is if one does not fit (bytes past 2**63 - 1 in
    an hour, only at absurd rates).

    >>> _packed([1, 2]), _packed([1, 2**63])
    (array('q', [1, 2]), [1, 9223372036854775808])
    """
    try:
        return array("q", flat)
    except OverflowError:
        return flat


_PACKED_DAY = b"\x01"
"""The first byte of a packed day record (a JSON record's is `[`)."""
_PACKED_FROM = 12
"""Buckets from which a day record is packed: about where it gets shorter than JSON."""


def _day_record(day: int, flat: Sequence[int]) -> bytes:
    """A day record: the (hour, bytes) pairs `flat` of UTC day `day` (days since
    the epoch), in hour order. While few, as a flat JSON list; from `_PACKED_FROM`
    buckets, packed: `_PACKED_DAY`, then the day and the bytes of each of its 24
    hours (-1: no bucket) as little-endian 8-byte ints, 201 bytes however large
    the counts (JSON again if one does not fit). `_history_pairs()` reads both.

    >>> _day_record(20416, [489984, 7, 489990, 0])
    b'[489984,7,489990,0]'
    >>> full = [x for hour in range(489984, 490008) for x in (hour, 10**9)]
    >>> packed = _day_record(20416, full)
    >>> len(packed), _history_pairs(packed) == full
    (201, True)
    """
    if len(flat) < 2 * _PACKED_FROM:
        return orjson.dumps(list(flat))
    first = day * DAY_HOURS - 1  # the slot before the day's first hour holds the day
    slots = array("q", [day] + [-1] * DAY_HOURS)
    try:
        for at in range(0, len(flat), 2):
            slots[flat[at] - first] = flat[at + 1]
    except OverflowError:  # past 2**63 - 1 bytes in an hour (absurd rates)
        return orjson.dumps(list(flat))
    if sys.byteorder == "big":
        slots.byteswap()
    return _PACKED_DAY + slots.tobytes()


def _history_pairs(record: bytes) -> list[int]:
    """The flat (hour, bytes) pairs of a history record: a day record
    (`_day_record()`) or an earlier version's record of a user's whole history,
    the same flat JSON list."""
    if record[:1] != _PACKED_DAY:
        flat: list[int] = orjson.loads(record)
        return flat
    slots = array("q")
    slots.frombytes(record[1:])
    if sys.byteorder == "big":
        slots.byteswap()
    first = slots[0] * DAY_HOURS - 1
    return [x for at in range(1, len(slots)) if slots[at] >= 0 for x in (first + at, slots[at])]


def _inserted(hours: array[int] | list[int], at: int, values: list[int]) -> array[int] | list[int]:
    """`hours` with `values` put in before index `at`: the same object, or, if a value
    does not fit its 8-byte ints (bytes past 2**63 - 1 in an hour, only at absurd
    rates), the buckets unpacked into a list.

    >>> _inserted(array("q", [1, 2]), 0, [0, 7]), _inserted(array("q", [1, 2]), 2, [3, 2**63])
    (array('q', [0, 7, 1, 2]), [1, 2, 3, 9223372036854775808])
    """
    if isinstance(hours, array):
        try:
            hours[at:at] = array("q", values)
            return hours
        except OverflowError:
            hours = list(hours)
    hours[at:at] = values
    return hours


@dataclass(frozen=True, slots=True)
class Status:
    """A user's quota state as of the last decision (Unix seconds, bytes)."""

    period_start: int
    period_end: int | None
    used: int
    allowance: int | None
    drawn: int  # pack bytes given in this period
    given: dict[str, int]  # pack_id -> bytes it gave, ever
    warned: tuple[float, ...]  # thresholds warned about in this period
    disabled: tuple[str, ...]  # why, a reason per cause; empty when enabled


class _Rules:
    """A plan compiled for the hot path: Unix seconds, integer fractions, packs in order."""

    __slots__ = (
        "count_from", "expires", "packs", "plan", "plan_json", "quota", "starts", "tz", "warns",
    )

    def __init__(self, plan: Plan, default_tz: ZoneInfo) -> None:
        self.plan = plan
        self.plan_json = plan.encode().decode()  # written with every state record
        self.tz = plan.zone(default_tz)
        self.starts = None if plan.starts_at is None else unix(plan.starts_at)
        self.count_from = _BEFORE_ALL if self.starts is None else self.starts
        self.expires = None if plan.expires_at is None else unix(plan.expires_at)
        self.quota = plan.quota_bytes
        # (pack_id, bytes, valid from, valid until), in the order they are drawn
        self.packs = tuple(
            (p.pack_id, p.bytes, unix(p.added_at),
             _NEVER if p.expires_at is None else unix(p.expires_at))
            for p in sorted(plan.packs, key=pack_order)
        )
        self.warns = tuple(sorted((w, *fraction(w)) for w in plan.warn_at))

    def bounds(self, t: int) -> tuple[int, int]:
        return period_bounds(self.plan.period, self.tz, self.starts, t)

    def same_periods(self, other: _Rules) -> bool:
        """Whether both plans cut time into the same periods and count from the same instant."""
        return (
            self.plan.period == other.plan.period
            and self.tz == other.tz
            and self.count_from == other.count_from
        )

    def available(self, given: dict[str, int], t: int) -> int:
        """Bytes the packs valid at `t` have left."""
        left = 0
        for pack_id, size, added, until in self.packs:
            if added <= t < until:
                left += max(0, size - given.get(pack_id, 0))
        return left


class _User:
    """One user's state. A user with no plan (most users, mostly) is a `_User`, which
    holds the fields every user has; the plan's fields are the class's, and read as
    those of a user with nothing to decide. A user with a plan is a `_PlannedUser`,
    which holds them too.
    """

    # the fields every reading reads first, so that they share the fewest cache lines
    __slots__ = (  # noqa: RUF023
        "newest", "tally", "first", "marks", "hours", "issued", "n", "through", "sealed",
    )

    # the plan's fields of a user with no plan: never written to (see `_PlannedUser`)
    rules: _Rules | None = None
    start = end = lo = used = drawn = causes = at = 0
    due = mark = _NEVER
    usage: dict[int, int] = _NO_USAGE
    given: dict[str, int] = _NO_PACKS
    warned: tuple[float, ...] = ()

    def __init__(self) -> None:
        self.n = 0  # commands issued so far, for their ids; never reset
        self.issued = 0  # the last command's issued_at, Unix ms; never reset
        # The hourly buckets, but the newest one (`newest` and `tally`): hour (Unix s
        # // 3600) and billed bytes observed in it, flat and by hour, [h, b, h, b, ...],
        # packed: a month of hours is 16 bytes each rather than a dict entry and two
        # int objects (about 75). `buckets()` gives them all. The newest bucket is in
        # the state record, the older ones in a history record per UTC day, of which
        # mostly the newest day's changes, about once an hour. An array of its own
        # once there is a bucket before the newest. Not the days in `sealed`.
        self.hours: array[int] | list[int] = _NO_HOURS
        # Days before the newest bucket's, by day, as their history records
        # (`seal()`): the same objects as the store's, so a month of history is held
        # once. A reading for such a day opens it again (`_unseal()`).
        self.sealed = _NO_SEALED
        self.newest = _NO_HOUR  # the latest hour with traffic
        self.tally = 0  # the newest hour's bytes, added to per reading
        self.first = _NEVER  # the oldest hour of `buckets()`, for pruning
        # the generations of the book's changed and unreported lists the user is
        # listed in, as `QuotaBook._listing` packs them (0: in none)
        self.marks = 0
        # for whoever stores the record: the last input position it holds (-1: none)
        self.through = -1

    def buckets(self) -> dict[int, int]:
        """All the hourly buckets, the newest one among them, by hour (a new dict)."""
        if self.newest == _NO_HOUR:
            return {}
        found = _unflat(self.hours)
        for record in self.sealed.values():
            found.update(_unflat(_history_pairs(record)))
        found[self.newest] = self.tally
        return found

    def set_buckets(self, hours: dict[int, int]) -> None:
        """Replace the hourly buckets."""
        ordered = sorted(hours.items())
        self.first = ordered[0][0] if ordered else _NEVER
        self.newest, self.tally = ordered.pop() if ordered else (_NO_HOUR, 0)
        self.hours = _packed(_flat(ordered)) if ordered else _NO_HOURS
        self.sealed = _NO_SEALED

    def keep_from(self, oldest_hour: int) -> set[int]:
        """Forget the buckets before `oldest_hour`; the days whose history changed."""
        if self.newest < oldest_hour:
            days = self.days()
            self.set_buckets({})
            return days
        changed = set()
        sealed = self.sealed
        oldest_day = oldest_hour // DAY_HOURS
        sealed_first = _NEVER  # the oldest hour of the sealed days
        while sealed:  # from the oldest sealed day
            day = min(sealed)
            flat = _history_pairs(sealed[day]) if day >= oldest_day else []
            at = 2 * bisect_left(flat[::2], oldest_hour)
            if at < len(flat):  # the day keeps buckets
                if at:
                    changed.add(day)
                    sealed[day] = right_sized(_day_record(day, flat[at:]))
                sealed_first = flat[at]
                break
            changed.add(day)
            del sealed[day]
        hours = self.hours
        kept = 2 * bisect_left(hours[::2], oldest_hour)
        if kept:
            self.hours = hours[kept:] if kept < len(hours) else _NO_HOURS
        self.first = min(self.hours[0] if self.hours else self.newest, sealed_first)
        return changed | {hour // DAY_HOURS for hour in hours[:kept:2]}

    def _span(self, day: int) -> slice:
        """Where `day`'s buckets are in `hours`."""
        starts = self.hours[::2]
        first = day * DAY_HOURS
        lo = bisect_left(starts, first)
        return slice(2 * lo, 2 * bisect_left(starts, first + DAY_HOURS, lo))

    def seal(self, day: int, record: bytes) -> None:
        """Keep `day`'s buckets (before the newest bucket's day) as `record`, their
        history record, instead of in `hours`."""
        hours = self.hours
        del hours[self._span(day)]
        if not hours:
            self.hours = _NO_HOURS
        if self.sealed is _NO_SEALED:
            self.sealed = {}
        self.sealed[day] = record

    def _unseal(self, day: int) -> None:
        """Put `day`'s sealed buckets back into `hours`."""
        flat = _history_pairs(self.sealed[day])
        hours = self.hours if self.hours else array("q")
        self.hours = _inserted(hours, self._span(day).start, flat)
        del self.sealed[day]

    def pairs(self, hours: Collection[int]) -> list[int]:
        """The flat (hour, bytes) pairs of the history's buckets of `hours`, in hour order."""
        flat = self.hours
        starts = flat[::2]
        found: list[int] = []
        for hour in sorted(hours):
            at = bisect_left(starts, hour)
            if at < len(starts) and starts[at] == hour:
                found += (hour, flat[2 * at + 1])
        return found

    def days(self) -> set[int]:
        """The days of the history's buckets (all but the newest)."""
        return {hour // DAY_HOURS for hour in self.hours[::2]} | self.sealed.keys()

    def day(self, day: int) -> list[int]:
        """The flat (hour, bytes) pairs of the history's buckets in `day`."""
        if day in self.sealed:
            return _history_pairs(self.sealed[day])
        return list(self.hours[self._span(day)])

    def add_to_hour(self, hour: int, count: int) -> int:
        """Add `count` bytes to `hour`'s bucket, which is not the newest one; the hour
        whose bucket in the history (the buckets but the newest) changed, or
        `_NO_HOUR`."""
        newest = self.newest
        if newest == _NO_HOUR:  # the first bucket
            self.first = self.newest = hour
            self.tally = count
            return _NO_HOUR
        hours = self.hours if self.hours else array("q")
        if hour > newest:  # the old newest bucket joins the history
            self.hours = _inserted(hours, len(hours), [newest, self.tally])
            self.newest = hour
            self.tally = count
            return newest
        # a late reading: mostly for a recent hour, so looked for from the end
        if self.sealed and hour // DAY_HOURS in self.sealed:
            self.hours = hours
            self._unseal(hour // DAY_HOURS)
            hours = self.hours
        at = len(hours) - 2
        while at >= 0 and hours[at] > hour:
            at -= 2
        if at >= 0 and hours[at] == hour:
            try:
                hours[at + 1] += count
            except OverflowError:  # past 2**63 - 1 bytes in an hour (absurd rates)
                hours = list(hours)
                hours[at + 1] += count
        else:  # a bucket of its own, in hour order
            hours = _inserted(hours, at + 2, [hour, count])
            self.first = min(self.first, hour)
        self.hours = hours
        return hour

    def record(self, history: bool = True, changed: Collection[int] = ()) -> dict[str, object]:
        """The user as JSON-ready values; without `history`, only the newest bucket and
        the older ones of the hours `changed`."""
        if history:
            if self.newest == _NO_HOUR:
                flat = []
            elif self.sealed:
                flat = _flat(sorted(self.buckets().items()))
            else:
                flat = [*self.hours, self.newest, self.tally]
        else:
            newest = self.newest
            flat = [newest, self.tally] if newest != _NO_HOUR else []
            if changed:
                flat[:0] = self.pairs(changed)
        if self.rules is None:
            return {"n": self.n, "i": self.issued, "h": flat, "k": self.through}
        return {
            "n": self.n, "i": self.issued, "h": flat, "k": self.through,
            "p": self.rules.plan_json,
            "s": self.start, "e": self.end, "u": self.used,
            "o": _flat(self.usage.items()),
            "d": self.drawn, "g": self.given, "w": self.warned, "c": self.causes,
            "a": self.at, "x": self.due, "m": self.mark,
        }

    def copy_to(self, other: _User) -> None:
        """Give `other` the fields every user has."""
        other.n, other.issued, other.hours = self.n, self.issued, self.hours
        other.newest, other.tally, other.first = self.newest, self.tally, self.first
        other.marks, other.through, other.sealed = self.marks, self.through, self.sealed

    @staticmethod
    def restore(raw: dict[str, object], default_tz: ZoneInfo) -> _User:
        plan = raw.get("p")
        user = _User() if plan is None else _PlannedUser()
        user.n = raw["n"]  # type: ignore[assignment]
        user.issued = raw.get("i", 0)  # type: ignore[assignment]
        flat: list[int] = raw["h"]  # type: ignore[assignment]
        user.set_buckets(_unflat(flat))
        user.through = raw.get("k", -1)  # type: ignore[assignment]
        if isinstance(user, _PlannedUser):
            user.restore_plan(raw, default_tz)
        return user


class _PlannedUser(_User):
    """A user with a plan: the plan's fields are its own."""

    __slots__ = (  # noqa: RUF023
        "lo", "end", "used", "mark", "due", "rules", "at", "causes", "drawn", "given", "start",
        "usage", "warned",
    )

    def __init__(self, user: _User | None = None) -> None:
        """A user given a plan: `user`'s fields every user has (new ones without)."""
        if user is None:
            super().__init__()
        else:
            user.copy_to(self)
        self.rules = None
        self._clear()

    def _clear(self) -> None:
        self.start = 0  # the current period [start, end), as of the last decision
        self.end = 0
        self.lo = 0  # max(start, count_from): a reading in [lo, end) counts toward `used`
        self.used = 0  # billed bytes of the current period
        self.usage = {}  # other periods' start -> billed bytes
        self.drawn = 0  # pack bytes given in the current period
        self.given = {}  # pack_id -> bytes it gave, ever
        self.warned = ()  # thresholds warned about in the current period
        self.causes = 0  # OPERATOR | EXPIRED | QUOTA: disabled when not 0
        self.at = 0  # when the last decision was taken
        self.due = _NEVER  # the next instant at which the clock can change a decision
        self.mark = _NEVER  # the usage at which a decision can change

    def restore_plan(self, raw: dict[str, object], default_tz: ZoneInfo) -> None:
        """Put back the plan's fields of a `record()`."""
        self.rules = rules = _Rules(Plan.decode(raw["p"]), default_tz)  # type: ignore[arg-type]
        self.start, self.end = raw["s"], raw["e"]  # type: ignore[assignment]
        self.lo = max(self.start, rules.count_from)
        self.used = raw["u"]  # type: ignore[assignment]
        other: list[int] = raw["o"]  # type: ignore[assignment]
        self.usage = _unflat(other)
        self.drawn, self.given = raw["d"], raw["g"]  # type: ignore[assignment]
        self.warned = tuple(raw["w"])  # type: ignore[arg-type]
        self.causes, self.at = raw["c"], raw["a"]  # type: ignore[assignment]
        self.due, self.mark = raw["x"], raw["m"]  # type: ignore[assignment]


class QuotaBook:
    """The quota state of one partition's users; see the module docstring.

    `default_tz` is the zone of plans that name none (`QUOTAFLOW_TIMEZONE`);
    usage is kept `LONGEST_PERIOD_DAYS + lateness_days` back for plans that arrive
    mid-period.
    """

    __slots__ = (
        "_changed", "_changed_generation", "_due", "_history_changed", "_listed", "_unreported",
        "_unreported_generation", "_unwritten", "default_tz", "history_s", "users",
    )

    def __init__(self, default_tz: ZoneInfo, lateness_days: int = 3) -> None:
        self.default_tz = default_tz
        self.history_s = (LONGEST_PERIOD_DAYS + lateness_days) * 86400
        self.users: dict[str, _User] = {}
        self._due: list[tuple[int, str]] = []  # (due, user_id), stale entries skipped
        # users listed once each, while their `marks` say so, rather than sets: a
        # reading then touches nothing but its user. Taking a list starts its next
        # generation, which unmarks every user at once, without visiting them.
        self._changed: list[str] = []
        # since the last `take_history_changed()`: by user, the hours whose bucket in
        # the history changed (the state records hold them until the history
        # records that do are written), and the other (user, day) records to write
        # (pruned, or to be split from an earlier version's record)
        self._unwritten: dict[str, set[int]] = {}
        self._history_changed: set[tuple[str, int]] = set()
        self._unreported: list[str] = []  # changed since `take_unreported()`
        self._changed_generation = self._unreported_generation = 1
        self._listed = self._listing(1, 1)  # the marks of a user listed in both

    # ------------------------------------------------------------------ the three calls

    def update(
        self, batch: Iterable[tuple[int, Iterable[tuple[str, int]]]], now: datetime
    ) -> list[Command]:
        """Add billed readings, grouped by observed_at: `(Unix s, [(user_id, bytes), ...])`;
        the commands they cause."""
        now_s = unix(now)
        users = self.users
        seen: dict[str, _User] = {}
        unwritten = self._unwritten
        for t, readings in batch:
            hour = t // BUCKET_S
            for user_id, count in readings:
                user = users.get(user_id)
                if user is None:
                    user = users[user_id] = _User()
                if user.lo <= t < user.end:  # only a `_PlannedUser` has lo < end
                    user.used += count  # type: ignore[misc]
                elif user.rules is not None and t >= user.rules.count_from:
                    self._add_elsewhere(cast(_PlannedUser, user), t, count)
                if hour == user.newest:
                    user.tally += count
                else:
                    changed = user.add_to_hour(hour, count)
                    if changed != _NO_HOUR:
                        unwritten.setdefault(user_id, set()).add(changed)
                seen[user_id] = user
        oldest_hour = (now_s - self.history_s) // BUCKET_S
        # every user's due is in the heap, so before its first entry nobody is due
        none_due = not self._due or now_s < self._due[0][0]
        commands: list[Command] = []
        listed = self._listed
        for user_id, user in seen.items():
            if user.marks != listed:
                self._mark(user_id, user, _TOUCHED)
            if user.first < oldest_hour:  # mostly in order: the first is the oldest
                days = user.keep_from(oldest_hour)
                self._history_changed.update((user_id, day) for day in days)
            # a user with no plan has nothing to decide
            if user.rules is None or (user.used < user.mark and (none_due or now_s < user.due)):
                continue
            commands.extend(self._decide(user_id, cast(_PlannedUser, user), now_s, now, ()))
        return commands

    def set_plan(self, user_id: str, plan: Plan | None, now: datetime) -> list[Command]:
        """A user's plan arrived, changed, or was deleted (None); the commands that causes."""
        if plan is not None and plan.user_id != user_id:
            raise ValueError(f"the plan of {plan.user_id!r} was given for {user_id!r}")
        now_s = unix(now)
        user = self.users.get(user_id)
        old = None if user is None else user.rules
        if old is None:
            if plan is None:  # no plan before, none now
                if user is not None:
                    self._mark(user_id, user, _TOUCHED)
                return []
            user = self.users[user_id] = _PlannedUser(user)  # the plan's fields its own
        planned = cast(_PlannedUser, user)  # it has a plan, or is given one
        self._mark(user_id, planned, _TOUCHED)
        if plan is None:
            assert old is not None
            commands = []
            if planned.causes:
                start, end = old.bounds(now_s)
                used = (planned.used if start == planned.start
                        else self._usage(planned, start, end))
                allowance = (
                    None if old.quota is None
                    else old.quota + (planned.drawn if start == planned.start else 0)
                    + old.available(planned.given, now_s)
                )
                commands.append(self._command(
                    user_id, planned, "enable", "plan_removed", start, end, used, allowance, None,
                    now,
                ))
            planned.copy_to(plain := _User())  # the plan's fields are gone with it
            self.users[user_id] = plain
            return commands
        rules = _Rules(plan, self.default_tz)
        if old is None:
            planned.rules = rules
            return self._decide(user_id, planned, now_s, now, ())
        reasons = _plan_changes(old, rules, planned.given, now_s)
        planned.rules = rules
        if not rules.same_periods(old):
            planned.usage = {}  # counted under the old periods
            start, end = rules.bounds(now_s)
            if start == planned.start:  # the same period, counted from elsewhere
                planned.end = end
                planned.lo = max(start, rules.count_from)
                planned.used = self._usage(planned, start, end)
            else:
                # a new period from the next decision
                planned.start = planned.end = planned.lo = 0
        names = {p.pack_id for p in plan.packs}
        planned.given = {k: v for k, v in planned.given.items() if k in names}
        return self._decide(user_id, planned, now_s, now, reasons)

    def tick(self, now: datetime, max_users: int | None = None) -> list[Command]:
        """Decide again for the users whose period ended, plan expired or packs came or went.

        With `max_users`, at most that many users are decided; the others stay due
        for the next tick (a month's end in one zone makes every user due at once).
        """
        now_s = unix(now)
        due = self._due
        commands: list[Command] = []
        budget = -1 if max_users is None else max_users
        while due and due[0][0] <= now_s and budget != 0:
            when, user_id = heapq.heappop(due)
            user = self.users.get(user_id)
            if user is None or user.rules is None or user.due != when:
                continue  # a stale entry: the user's due moved
            self._mark(user_id, user, _TOUCHED)
            commands.extend(self._decide(user_id, cast(_PlannedUser, user), now_s, now, ()))
            budget -= 1
        return commands

    # ------------------------------------------------------------------ reading the state

    def next_due(self) -> int | None:
        """When (Unix s) the clock may next change a decision, or None; `tick()` is cheap before."""
        return self._due[0][0] if self._due else None

    def status(self, user_id: str) -> Status | None:
        """The user's state as of the last decision, or None when the user has no plan."""
        user = self.users.get(user_id)
        if user is None or user.rules is None:
            return None
        rules = user.rules
        return Status(
            period_start=user.start,
            period_end=None if user.end >= _NEVER else user.end,
            used=user.used,
            allowance=None if rules.quota is None
            else rules.quota + user.drawn + rules.available(user.given, user.at),
            drawn=user.drawn,
            given=dict(user.given),
            warned=user.warned,
            disabled=tuple(reason for bit, reason in _DISABLE_REASONS if user.causes & bit),
        )

    def state_rows(self, user_ids: Iterable[str]) -> list[tuple[str, str, int, int | None, str]]:
        """The `QuotaBatch` rows of the users that have a plan, as `status()` gives them:
        (user, period start in the plan's zone, used, allowance, enabled or disabled).

        Without a `Status` per user, and with one date string per period start and
        zone: the worker reports every user that changed, every few seconds.

        >>> from quotaflow.core.plans import CalendarMonth, Plan
        >>> book = QuotaBook(ZoneInfo("UTC"))
        >>> plan = Plan(user_id="bob", quota_bytes=10, period=CalendarMonth(kind="calendar_month"),
        ...             enabled=True)
        >>> now = datetime(2026, 11, 24, tzinfo=UTC)
        >>> _ = book.set_plan("bob", plan, now)
        >>> _ = book.update([(int(now.timestamp()), [("bob", 12)]), (0, [("eve", 1)])], now)
        >>> book.state_rows(["bob", "eve"])
        [('bob', '2026-11-01T00:00:00+00:00', 12, 10, 'disabled')]
        """
        rows: list[tuple[str, str, int, int | None, str]] = []
        starts: dict[tuple[int, ZoneInfo], str] = {}
        users = self.users
        for user_id in user_ids:
            user = users.get(user_id)
            if user is None or user.rules is None:
                continue
            rules = user.rules
            start = starts.get((user.start, rules.tz))
            if start is None:
                start = starts[user.start, rules.tz] = datetime.fromtimestamp(
                    user.start, rules.tz).isoformat()
            rows.append((
                user_id, start, user.used,
                None if rules.quota is None
                else rules.quota + user.drawn + rules.available(user.given, user.at),
                "disabled" if user.causes else "enabled",
            ))
        return rows

    def usage(self, user_id: str, period_start: int) -> int | None:
        """Billed bytes of the user's period starting at `period_start`, if it is kept."""
        user = self.users.get(user_id)
        if user is None or user.rules is None:
            return None
        if period_start == user.start:
            return user.used
        return user.usage.get(period_start)

    def take_changed(self) -> list[str]:
        """The users whose state records changed since the last call (for the changelog),
        in the order they first changed."""
        changed, self._changed = self._changed, []
        self._changed_generation += 1
        return self._taken(changed)

    def take_unreported(self) -> list[str]:
        """The users whose state changed since the last call (to report their quota states),
        in the order they first changed."""
        changed, self._unreported = self._unreported, []
        self._unreported_generation += 1
        return self._taken(changed)

    def take_history_changed(self) -> set[tuple[str, int]]:
        """The (user, day) of each history record that changed since the last call (for
        the changelog): write `history_bytes(user, day)`, after the state records
        (`user_state()`), which hold the changed buckets until then."""
        changed, self._history_changed = self._history_changed, set()
        unwritten, self._unwritten = self._unwritten, {}
        changed.update((user, hour // DAY_HOURS) for user, hours in unwritten.items()
                       for hour in hours)
        return changed

    def rewrite_history(self, user_id: str) -> None:
        """List every history record of the user as changed (to write them anew, as
        when they were loaded from an earlier version's record of the whole history)."""
        user = self.users.get(user_id)
        if user is not None:
            self._history_changed.update((user_id, day) for day in user.days())

    def prune(self, now: datetime) -> None:
        """Forget buckets older than the history window of users not seen for that long."""
        oldest_hour = (unix(now) - self.history_s) // BUCKET_S
        for user_id, user in self.users.items():
            if user.newest != _NO_HOUR and user.first < oldest_hour:
                days = user.keep_from(oldest_hour)
                self._mark(user_id, user, _CHANGED)
                self._history_changed.update((user_id, day) for day in days)

    # ------------------------------------------------------------------ state records

    def user_state(self, user_id: str, through: int | None = None) -> dict[str, object] | None:
        """One user's state as JSON-ready values; None for a user never seen.

        It holds the newest hour's bucket: the older ones are in the history
        records (`history_bytes()`), written far less often, so it also holds
        those that changed since they were last taken (`take_history_changed()`),
        mostly one; a crash after it is stored but before those history records
        are loses nothing. It may share the user's live objects: encode it before
        the user changes again. With `through`, the user is stored as holding the
        input up to that position.
        """
        user = self.users.get(user_id)
        if user is None:
            return None
        if through is not None:
            user.through = through
        return user.record(history=False, changed=self._unwritten.get(user_id, ()))

    def history_bytes(self, user_id: str, day: int) -> bytes | None:
        """A user's history record of UTC day `day` (days since the epoch): its hourly
        buckets of that day but the newest bucket; None if it has none there.

        A day before the newest bucket's is held as this record from then on (the
        same object as the store's, once stored), until a reading for it comes.
        """
        user = self.users.get(user_id)
        if user is None:
            return None
        record = user.sealed.get(day)
        if record is not None:
            return record
        flat = user.day(day)
        if not flat:
            return None
        record = right_sized(_day_record(day, flat))
        if day < user.newest // DAY_HOURS:  # held as the record the store holds too
            user.seal(day, record)
        return record

    def history_records(self, user_id: str) -> list[bytes]:
        """All of a user's history records (`history_bytes()` of each of its days)."""
        user = self.users.get(user_id)
        if user is None:
            return []
        return [_day_record(day, user.day(day)) for day in sorted(user.days())]

    def load_user(self, user_id: str, data: bytes | None, histories: Iterable[bytes] = ()) -> None:
        """Put back a `user_state()` record and its history records (None forgets the
        user)."""
        self.load_state(user_id, None if data is None else orjson.loads(data), histories)

    def load_state(
        self, user_id: str, state: dict[str, object] | None, histories: Iterable[bytes] = ()
    ) -> None:
        """Put back a decoded `user_state()` and its history records, `history_bytes()`
        or an earlier version's record of the whole history, in the order written
        (None forgets the user); `state` is the book's from then on."""
        if state is None:
            self.users.pop(user_id, None)
            return
        user = self.users[user_id] = _User.restore(state, self.default_tz)
        older: dict[int, int] = {}
        days: list[tuple[int, list[int], bytes]] = []
        for record in histories:  # a later record holds the later count of an hour
            flat = _history_pairs(record)
            older.update(_unflat(flat))
            if flat and flat[0] // DAY_HOURS == flat[-2] // DAY_HOURS:  # a day record
                days.append((flat[0] // DAY_HOURS, flat, record))
        if older:
            older.update(user.buckets())
            user.set_buckets(older)
        for day, flat, record in days:  # held as the store's records, where they hold it
            if day < user.newest // DAY_HOURS and user.day(day) == flat:
                user.seal(day, record)
        if user.rules is not None and user.due < _NEVER:
            heapq.heappush(self._due, (user.due, user_id))

    def to_bytes(self) -> bytes:
        """The whole book as one record (a record per user inside)."""
        return orjson.dumps({"v": 1, "users": {u: s.record() for u, s in self.users.items()}})

    @classmethod
    def from_bytes(cls, data: bytes, default_tz: ZoneInfo, lateness_days: int = 3) -> QuotaBook:
        """Rebuild a book from `to_bytes()` output."""
        book = cls(default_tz, lateness_days)
        for user_id, raw in orjson.loads(data)["users"].items():
            user = book.users[user_id] = _User.restore(raw, default_tz)
            if user.rules is not None and user.due < _NEVER:
                book._due.append((user.due, user_id))
        heapq.heapify(book._due)
        return book

    def _mark(self, user_id: str, user: _User, lists: int) -> None:
        """List the user as changed (`_CHANGED`) and/or unreported (`_UNREPORTED`), once
        per generation of each list."""
        changed = user.marks >> _GENERATION_BITS
        unreported = user.marks & ((1 << _GENERATION_BITS) - 1)
        if lists & _CHANGED and changed != self._changed_generation:
            changed = self._changed_generation
            self._changed.append(user_id)
        if lists & _UNREPORTED and unreported != self._unreported_generation:
            unreported = self._unreported_generation
            self._unreported.append(user_id)
        listing = self._listing(changed, unreported)
        # the book's own int when listed in both (most users): none of its own
        user.marks = self._listed if listing == self._listed else listing

    def _taken(self, listed: list[str]) -> list[str]:
        """A list just taken, its generation moved on: each user once, in order."""
        self._listed = self._listing(self._changed_generation, self._unreported_generation)
        # listed once while marked; a user put back by `load_user` may be listed again
        return list(dict.fromkeys(listed))

    @staticmethod
    def _listing(changed: int, unreported: int) -> int:
        """A user's `marks`: listed in these generations of the changed and unreported lists.

        >>> QuotaBook._listing(3, 5) >> _GENERATION_BITS, QuotaBook._listing(3, 5) & 0xFFFFFFFF
        (3, 5)
        """
        return changed << _GENERATION_BITS | unreported

    # ------------------------------------------------------------------ the rules

    def _usage(self, user: _User, start: int, end: int) -> int:
        """A period's usage from the hourly buckets: those whose first second it counts."""
        assert user.rules is not None
        lo = max(start, user.rules.count_from)
        return sum(b for h, b in user.buckets().items() if lo <= h * BUCKET_S < end)

    def _add_elsewhere(self, user: _PlannedUser, t: int, count: int) -> None:
        """Count a reading observed outside the current period (late, or early)."""
        assert user.rules is not None
        start, end = user.rules.bounds(t)
        found = user.usage.get(start)
        if found is None:
            found = self._usage(user, start, end)  # before this reading is in a bucket
        user.usage[start] = found + count

    def _decide(
        self, user_id: str, user: _PlannedUser, now_s: int, now: datetime,
        changes: tuple[Reason, ...],
    ) -> list[Command]:
        """Take the user's decisions at `now`; `changes` are what a plan update brought."""
        rules = user.rules
        assert rules is not None
        clock: list[Reason] = []
        if not user.start <= now_s < user.end:
            start, end = rules.bounds(now_s)
            if start != user.start:
                if user.end:
                    user.usage[user.start] = user.used
                found = user.usage.pop(start, None)
                user.used = self._usage(user, start, end) if found is None else found
                user.start, user.end = start, end
                user.lo = max(start, rules.count_from)
                user.drawn = 0
                user.warned = ()
                clock.append("period_reset")
                oldest = now_s - self.history_s
                if any(s < oldest for s in user.usage):
                    user.usage = {s: b for s, b in user.usage.items() if s >= oldest}
        # packs: draw what the quota does not cover, from the packs valid now, in order
        given = user.given
        used = user.used
        quota = rules.quota
        left = 0
        became_valid = False
        for pack_id, size, added, until in rules.packs:
            if added <= now_s < until:
                left += max(0, size - given.get(pack_id, 0))
                if added > user.at:
                    became_valid = True
        if became_valid:
            clock.append("pack")
        allowance: int | None = None
        if quota is not None:
            wanted = used - quota - user.drawn
            if wanted > 0 and left > 0:
                drawn = 0
                for pack_id, size, added, until in rules.packs:
                    if drawn >= wanted:
                        break
                    if added <= now_s < until:
                        had = given.get(pack_id, 0)
                        take = min(size - had, wanted - drawn)
                        if take > 0:
                            given[pack_id] = had + take
                            drawn += take
                user.drawn += drawn
                left -= drawn
            allowance = quota + user.drawn + left
        causes = (0 if rules.plan.enabled else OPERATOR) | (
            EXPIRED if rules.expires is not None and now_s >= rules.expires else 0
        ) | (QUOTA if allowance is not None and used >= allowance else 0)
        # thresholds, each once per period, and the usage at which a decision can change
        mark = _NEVER
        warns: list[float] = []
        if allowance is not None:
            for threshold, num, den in rules.warns:
                if threshold in user.warned:
                    continue
                level = -(-num * allowance // den)
                if used >= level:
                    warns.append(threshold)
                elif level < mark:
                    mark = level
            if not causes & QUOTA:
                mark = min(mark, allowance)
            if left > 0 and quota is not None:
                mark = min(mark, quota + user.drawn + 1)
        user.mark = mark
        commands: list[Command] = []
        was = user.causes
        if was and not causes:
            reasons = (*changes, *clock)
            commands.append(self._command(
                user_id, user, "enable", reasons[0] if reasons else "period_reset",
                user.start, user.end, used, allowance, None, now,
            ))
        for threshold in warns:
            commands.append(self._command(
                user_id, user, "warn", "threshold", user.start, user.end, used, allowance,
                threshold, now,
            ))
        if warns:
            user.warned = (*user.warned, *warns)
        if causes and not was:
            reason = next(r for bit, r in _DISABLE_REASONS if causes & bit)
            commands.append(self._command(
                user_id, user, "disable", reason, user.start, user.end, used, allowance, None,
                now,
            ))
        user.causes = causes
        user.at = now_s
        # the next instant the clock can change a decision
        due = user.end
        if rules.expires is not None and now_s < rules.expires < due:
            due = rules.expires
        for pack_id, size, added, until in rules.packs:
            if given.get(pack_id, 0) >= size:
                continue
            if now_s < added:
                due = min(due, added)
            elif now_s < until:
                due = min(due, until)
        if due != user.due:
            user.due = due
            if due < _NEVER:
                heapq.heappush(self._due, (due, user_id))
        return commands

    def _command(
        self, user_id: str, user: _User, action: Action, reason: Reason, start: int, end: int,
        used: int, allowance: int | None, threshold: float | None, now: datetime,
    ) -> Command:
        user.n += 1
        # strictly later than the user's previous command, to the millisecond of the
        # wire form: consumers order a user's commands by issued_at
        issued = user.issued = max(int(now.timestamp() * 1000), user.issued + 1)
        key = f"{user_id}\x1f{start}\x1f{action}\x1f{reason}\x1f{threshold!r}\x1f{user.n}"
        tz = user.rules.tz if user.rules is not None else self.default_tz
        return Command(
            command_id=hashlib.sha256(key.encode()).hexdigest()[:32],
            user_id=user_id,
            action=action,
            reason=reason,
            period_start=datetime.fromtimestamp(start, tz),
            period_end=None if end >= _NEVER else datetime.fromtimestamp(end, tz),
            used_bytes=used,
            allowance_bytes=allowance,
            threshold=threshold,
            issued_at=datetime.fromtimestamp(issued / 1000, UTC),
        )


def _plan_changes(old: _Rules, new: _Rules, given: dict[str, int], t: int) -> tuple[Reason, ...]:
    """What a plan update brought that can enable a user, in the order reasons are chosen."""
    found: list[Reason] = []
    if not old.plan.enabled and new.plan.enabled:
        found.append("operator")
    if old.expires is not None and (new.expires is None or new.expires > old.expires):
        found.append("renewed")
    if old.quota is not None and (new.quota is None or new.quota > old.quota):
        found.append("quota_raised")
    if new.available(given, t) > old.available(given, t):
        found.append("pack")
    if not new.same_periods(old):
        found.append("period_reset")
    return tuple(found)
