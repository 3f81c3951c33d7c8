"""Calendar billing periods: which day and month an instant belongs to, in a timezone.

Days and months are calendar ones in the billing timezone, so a day in a DST zone
can last 23 or 25 hours.

>>> from datetime import UTC
>>> from zoneinfo import ZoneInfo
>>> cal = Calendar(ZoneInfo("Europe/Berlin"))
>>> instant = int(datetime(2026, 3, 29, 12, tzinfo=UTC).timestamp())
>>> day, month = cal.starts(instant)
>>> cal.length_s(day, "day") // 3600
23
>>> datetime.fromtimestamp(month, cal.tz).isoformat()
'2026-03-01T00:00:00+01:00'
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from quotaflow.core.contracts import PeriodKind


def _first_instant(day: date, tz: ZoneInfo) -> int:
    """Unix time of the first second of `day` in `tz`.

    For a day that starts inside a DST gap, fold=0 takes the offset in force before
    the gap, which lands exactly on the first instant that exists.
    """
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp())


class Calendar:
    """Maps Unix times to the start of their day and month, with a cache for the hot path."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._by_slot: dict[int, tuple[int, int]] = {}
        self._back: dict[tuple[int, int], int] = {}

    def starts(self, unix_s: int) -> tuple[int, int]:
        """(day start, month start) of the instant, as Unix seconds.

        Every zone's offsets and transitions fall on quarter hours, so all instants
        of one 15-minute slot share their local day: the cache is keyed by slot.
        """
        slot = unix_s // 900
        hit = self._by_slot.get(slot)
        if hit is None:
            local = datetime.fromtimestamp(slot * 900, self.tz).date()
            hit = (_first_instant(local, self.tz), _first_instant(local.replace(day=1), self.tz))
            if len(self._by_slot) > 100_000:
                self._by_slot.clear()
            self._by_slot[slot] = hit
        return hit

    def day_start(self, unix_s: int) -> int:
        """The first second of the instant's calendar day."""
        return self.starts(unix_s)[0]

    def month_start(self, unix_s: int) -> int:
        """The first second of the instant's calendar month."""
        return self.starts(unix_s)[1]

    def next_start(self, start: int, period: PeriodKind) -> int:
        """The start of the period after the one starting at `start`."""
        local = datetime.fromtimestamp(start, self.tz).date()
        if period == "day":
            return _first_instant(local + timedelta(days=1), self.tz)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        return _first_instant(date(year, month, 1), self.tz)

    def length_s(self, start: int, period: PeriodKind) -> int:
        """How many seconds the period starting at `start` lasts."""
        return self.next_start(start, period) - start

    def days_back(self, unix_s: int, days: int) -> int:
        """The start of the calendar day `days` days before the instant's day."""
        key = (self.day_start(unix_s), days)
        found = self._back.get(key)
        if found is None:
            local = datetime.fromtimestamp(key[0], self.tz).date()
            found = _first_instant(local - timedelta(days=days), self.tz)
            if len(self._back) > 10_000:
                self._back.clear()
            self._back[key] = found
        return found

    def label(self, start: int, period: PeriodKind) -> str:
        """A readable name: `2026-11-21` for a day, `2026-11` for a month."""
        local = datetime.fromtimestamp(start, self.tz)
        return local.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")

