"""Calendar periods: day and month boundaries in the billing timezone, DST included."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.core.periods import Calendar

HOUR = 3600


def utc(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())


def first_instant_by_search(day: date, tz: ZoneInfo) -> int:
    """The smallest Unix second whose local date is `day`: found by bisection, not by zoneinfo's
    fold rules, so it is an independent reference for `Calendar.starts`."""
    lo = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) - 2 * 86400
    hi = lo + 4 * 86400
    while lo < hi:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).date() < day:
            lo = mid + 1
        else:
            hi = mid
    return lo


def local(unix_s: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(unix_s, tz).isoformat()


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        ("Europe/Berlin", date(2026, 3, 29), 23),
        ("Europe/Berlin", date(2026, 10, 25), 25),
        ("Europe/Berlin", date(2026, 10, 24), 24),
        ("America/New_York", date(2026, 3, 8), 23),
        ("America/New_York", date(2026, 11, 1), 25),
        ("America/Santiago", date(2026, 9, 6), 23),  # 00:00 does not exist
        ("America/Santiago", date(2026, 4, 4), 25),  # 24:00 -> 23:00 the same day
        ("America/Havana", date(2026, 3, 8), 23),  # 00:00 does not exist
        ("America/Havana", date(2026, 11, 1), 25),  # 00:00-01:00 happens twice
        ("UTC", date(2026, 3, 29), 24),
    ],
)
def test_day_length_and_first_instant(zone: str, day: date, hours: int) -> None:
    tz = ZoneInfo(zone)
    cal = Calendar(tz)
    noon = int(datetime(day.year, day.month, day.day, 12, tzinfo=tz).timestamp())
    start = cal.day_start(noon)
    assert start == first_instant_by_search(day, tz)
    assert datetime.fromtimestamp(start, tz).date() == day
    assert datetime.fromtimestamp(start - 1, tz).date() < day
    assert cal.length_s(start, "day") == hours * HOUR
    end = cal.next_start(start, "day")
    assert cal.day_start(end - 1) == start
    assert cal.day_start(end) == end != start
    assert cal.label(start, "day") == day.isoformat()


def test_midnight_gap_first_instant_santiago() -> None:
    tz = ZoneInfo("America/Santiago")
    cal = Calendar(tz)
    # 2026-09-06: local clocks jump from 24:00 -04 to 01:00 -03 (04:00 UTC).
    start = cal.day_start(utc(2026, 9, 6, 12))
    assert start == utc(2026, 9, 6, 4)
    assert local(start, tz) == "2026-09-06T01:00:00-03:00"
    # The last second before it belongs to the 5th.
    assert cal.day_start(start - 1) == utc(2026, 9, 5, 4)
    assert cal.length_s(utc(2026, 9, 5, 4), "day") == 24 * HOUR
    # September starts before the gap (on the 1st, at 00:00 -04).
    assert cal.month_start(start) == utc(2026, 9, 1, 4)
    assert cal.length_s(utc(2026, 9, 1, 4), "month") == 30 * 24 * HOUR - HOUR


def test_midnight_gap_first_instant_havana() -> None:
    tz = ZoneInfo("America/Havana")
    cal = Calendar(tz)
    start = cal.day_start(utc(2026, 3, 8, 17))
    assert start == utc(2026, 3, 8, 5)
    assert local(start, tz) == "2026-03-08T01:00:00-04:00"
    assert cal.day_start(start - 1) == utc(2026, 3, 7, 5)
    # Fall back at 01:00 -> 00:00: the day starts with the first of the two midnights.
    first = cal.day_start(utc(2026, 11, 1, 12))
    assert first == utc(2026, 11, 1, 4)
    assert local(first, tz) == "2026-11-01T00:00:00-04:00"
    # The month starts with it too, and the second 00:00 (-05) is in the same day.
    assert cal.month_start(utc(2026, 11, 1, 5)) == first
    assert cal.day_start(utc(2026, 11, 1, 5)) == first
    assert cal.day_start(first - 1) == utc(2026, 10, 31, 4)


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "UTC"])
def test_month_end(zone: str) -> None:
    tz = ZoneInfo(zone)
    cal = Calendar(tz)
    before = int(datetime(2026, 10, 31, 23, 59, 59, tzinfo=tz).timestamp())
    after = int(datetime(2026, 11, 1, 0, 0, 0, tzinfo=tz).timestamp())
    assert after - before == 1
    day_b, month_b = cal.starts(before)
    day_a, month_a = cal.starts(after)
    assert day_a == month_a == after
    assert day_b != day_a and month_b != month_a
    assert cal.label(month_b, "month") == "2026-10"
    assert cal.label(month_a, "month") == "2026-11"
    assert cal.next_start(month_b, "month") == month_a
    assert cal.next_start(day_b, "day") == day_a
    # October in Berlin and New York has the 25-hour day (Berlin) or none (New York: Nov 1).
    extra = {"Europe/Berlin": HOUR, "America/New_York": 0, "UTC": 0}[zone]
    assert cal.length_s(month_b, "month") == 31 * 24 * HOUR + extra


def test_year_end_and_month_lengths() -> None:
    cal = Calendar(ZoneInfo("Europe/Berlin"))
    dec = cal.month_start(utc(2026, 12, 15))
    jan = cal.next_start(dec, "month")
    assert local(jan, cal.tz) == "2027-01-01T00:00:00+01:00"
    assert cal.length_s(dec, "month") == 31 * 86400
    feb = cal.month_start(utc(2026, 2, 10))
    assert cal.length_s(feb, "month") == 28 * 86400
    march = cal.next_start(feb, "month")
    assert cal.length_s(march, "month") == 31 * 86400 - HOUR


def test_days_back_across_dst() -> None:
    cal = Calendar(ZoneInfo("Europe/Berlin"))
    instant = utc(2026, 3, 30, 10)
    assert local(cal.days_back(instant, 3), cal.tz) == "2026-03-27T00:00:00+01:00"
    assert local(cal.days_back(instant, 0), cal.tz) == "2026-03-30T00:00:00+02:00"


ZONES = ["Europe/Berlin", "America/New_York", "America/Santiago", "America/Havana",
         "Asia/Kathmandu", "Australia/Lord_Howe", "Pacific/Chatham", "UTC"]


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    instant=st.integers(min_value=utc(2024, 1, 1), max_value=utc(2030, 1, 1)),
)
def test_starts_match_reference(zone: str, instant: int) -> None:
    tz = ZoneInfo(zone)
    cal = Calendar(tz)
    for t in (instant, instant - 1, instant + 1):  # twice through the slot cache as well
        day, month = cal.starts(t)
        local_date = datetime.fromtimestamp(t, tz).date()
        assert day == first_instant_by_search(local_date, tz)
        assert month == first_instant_by_search(local_date.replace(day=1), tz)
        assert day <= t < cal.next_start(day, "day")
        assert month <= day
        assert 23 * HOUR <= cal.length_s(day, "day") <= 25 * HOUR
        assert cal.starts(t) == (day, month)
