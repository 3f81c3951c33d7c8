"""Plans, node rates and commands: their contracts, period arithmetic and billing rates."""

from __future__ import annotations

import calendar
import itertools
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from quotaflow.core.plans import (
    NO_END,
    CalendarMonth,
    Command,
    EveryDays,
    Monthly,
    NodeRates,
    NoReset,
    Pack,
    Plan,
    billed,
    pack_order,
    period_at,
    period_bounds,
    rate_at,
    unix,
)

UTC_TZ = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
ISSUE_PLAN = (
    b'{"user_id": "alice", "quota_bytes": 50000000000, "period": {"kind": "calendar_month"},'
    b' "timezone": "Europe/Berlin", "starts_at": "2026-11-01T00:00:00+01:00",'
    b' "expires_at": "2026-12-31T23:59:59Z", "packs": [{"pack_id": "nov-extra",'
    b' "bytes": 10000000000, "added_at": "2026-11-20T10:00:00Z", "expires_at": null}],'
    b' "warn_at": [0.8], "enabled": true}'
)
# Zones with DST at midnight (Santiago, Havana, Beirut), half-hour DST (Lord Howe),
# offsets off the hour (Kolkata, Kathmandu, Chatham), the southern hemisphere, and none.
ZONES = [
    "UTC", "Europe/Berlin", "America/New_York", "America/Santiago", "America/Havana",
    "Asia/Beirut", "Australia/Lord_Howe", "Asia/Kolkata", "Asia/Kathmandu", "Pacific/Chatham",
    "Pacific/Apia", "Europe/London",
]


def plan_json(**fields: object) -> bytes:
    base: dict[str, object] = {
        "user_id": "u", "quota_bytes": 100, "period": {"kind": "calendar_month"},
        "enabled": True,
    }
    base.update(fields)
    return orjson.dumps(base)


def local(unix_s: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(unix_s, tz).isoformat()


# ---------------------------------------------------------------------------- the plan contract


def test_the_issues_example_reads_and_round_trips() -> None:
    plan = Plan.decode(ISSUE_PLAN)
    assert plan.quota_bytes == 50_000_000_000
    assert plan.period == CalendarMonth(kind="calendar_month")
    assert plan.packs[0].expires_at is None
    assert Plan.decode(plan.encode()) == plan
    assert Plan.decode(plan.encode().decode()) == plan


def test_optional_fields_may_be_left_out() -> None:
    plan = Plan.decode(plan_json(packs=[{"pack_id": "p", "bytes": 1,
                                         "added_at": "2026-01-01T00:00:00Z"}]))
    assert (plan.timezone, plan.starts_at, plan.expires_at) == (None, None, None)
    assert plan.warn_at == (0.8,)
    assert plan.packs[0].expires_at is None
    assert plan.zone(BERLIN) is BERLIN
    assert Plan.decode(plan_json(quota_bytes=None)).quota_bytes is None


@pytest.mark.parametrize("quota", [0, -1, -(10**12)])
def test_zero_and_negative_quotas_are_refused_with_a_hint(quota: int) -> None:
    with pytest.raises(ValidationError, match="use null for unlimited"):
        Plan.decode(plan_json(quota_bytes=quota))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"period": {"kind": "none"}}, "needs starts_at"),
        ({"warn_at": [1.0]}, "between 0 and 1"),
        ({"warn_at": [0]}, "between 0 and 1"),
        ({"warn_at": [0.5, 0.5]}, "given twice"),
        ({"timezone": "Mars/Olympus"}, "unknown IANA timezone"),
        ({"period": {"kind": "monthly", "reset_day": 32}}, "less than or equal to 31"),
        ({"period": {"kind": "monthly", "reset_day": 0}}, "greater than or equal to 1"),
        ({"period": {"kind": "every_days", "days": 0, "anchor": "2026-01-01T00:00:00Z"}},
         "greater than or equal to 1"),
        ({"period": {"kind": "every_days", "days": 3, "anchor": "2026-01-01T00:00:00"}},
         "timezone"),
        ({"period": {"kind": "weekly"}}, "does not match any of the expected tags"),
        ({"quota_bytes": "100"}, "valid integer"),
        ({"quota_bytes": 2**63}, "2\\*\\*63-1"),
        ({"colour": "red"}, "Extra inputs"),
        ({"packs": [{"pack_id": "p", "bytes": 1, "added_at": "2026-01-02T00:00:00Z",
                     "expires_at": "2026-01-01T00:00:00Z"}]}, "after its added_at"),
        ({"packs": [{"pack_id": "p", "bytes": 0, "added_at": "2026-01-01T00:00:00Z"}]},
         "greater than 0"),
        ({"packs": [{"pack_id": "p", "bytes": 1, "added_at": "2026-01-01T00:00:00Z"},
                    {"pack_id": "p", "bytes": 2, "added_at": "2026-01-01T00:00:00Z"}]},
         "pack_id is given twice"),
        ({"user_id": "bad\n"}, "String should match pattern"),
    ],
)
def test_invalid_plans_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Plan.decode(plan_json(**fields))


def test_required_fields_must_be_given() -> None:
    for missing in ("quota_bytes", "period", "enabled", "user_id"):
        data = orjson.loads(plan_json())
        del data[missing]
        with pytest.raises(ValidationError, match="Field required"):
            Plan.decode(orjson.dumps(data))


def test_a_key_given_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="'quota_bytes' is given twice"):
        Plan.decode(plan_json()[:-1] + b',"quota_bytes": 5}')
    with pytest.raises(ValidationError):
        Plan.decode(b"not json")


# ---------------------------------------------------------------------------- periods, examples


def bounds_of(rule: object, zone: str, t: datetime, starts_at: datetime | None = None
              ) -> tuple[str, str | None]:
    tz = ZoneInfo(zone)
    plan = Plan(user_id="u", quota_bytes=None, period=rule, timezone=zone,  # type: ignore[arg-type]
                starts_at=starts_at, enabled=True)
    start, end = period_at(plan, t, UTC_TZ)
    assert start.tzinfo == tz
    return start.isoformat(), None if end is None else end.isoformat()


CAL = CalendarMonth(kind="calendar_month")


@pytest.mark.parametrize(
    ("rule", "zone", "t", "expected"),
    [
        # Berlin's March has 743 hours: it ends in summer time
        (CAL, "Europe/Berlin", datetime(2026, 3, 31, 21, 59, 59, tzinfo=UTC),
         ("2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00")),
        (CAL, "Europe/Berlin", datetime(2026, 3, 31, 22, tzinfo=UTC),
         ("2026-04-01T00:00:00+02:00", "2026-05-01T00:00:00+02:00")),
        (CAL, "Europe/Berlin", datetime(2026, 10, 31, 22, 59, 59, tzinfo=UTC),
         ("2026-10-01T00:00:00+02:00", "2026-11-01T00:00:00+01:00")),
        # Santiago's clocks go from 00:00 to 01:00 on 2026-09-06: that day starts at 01:00
        (Monthly(kind="monthly", reset_day=6), "America/Santiago",
         datetime(2026, 9, 6, 4, 0, tzinfo=UTC),
         ("2026-09-06T01:00:00-03:00", "2026-10-06T00:00:00-03:00")),
        (Monthly(kind="monthly", reset_day=6), "America/Santiago",
         datetime(2026, 9, 6, 3, 59, 59, tzinfo=UTC),
         ("2026-08-06T00:00:00-04:00", "2026-09-06T01:00:00-03:00")),
        # reset day 31 in February (leap and not), April; 29 and 30 in February
        (Monthly(kind="monthly", reset_day=31), "UTC", datetime(2028, 2, 29, 12, tzinfo=UTC),
         ("2028-02-29T00:00:00+00:00", "2028-03-31T00:00:00+00:00")),
        (Monthly(kind="monthly", reset_day=31), "UTC", datetime(2028, 2, 28, 12, tzinfo=UTC),
         ("2028-01-31T00:00:00+00:00", "2028-02-29T00:00:00+00:00")),
        (Monthly(kind="monthly", reset_day=31), "UTC", datetime(2027, 3, 1, tzinfo=UTC),
         ("2027-02-28T00:00:00+00:00", "2027-03-31T00:00:00+00:00")),
        (Monthly(kind="monthly", reset_day=31), "UTC", datetime(2026, 4, 30, tzinfo=UTC),
         ("2026-04-30T00:00:00+00:00", "2026-05-31T00:00:00+00:00")),
        (Monthly(kind="monthly", reset_day=29), "UTC", datetime(2027, 2, 28, tzinfo=UTC),
         ("2027-02-28T00:00:00+00:00", "2027-03-29T00:00:00+00:00")),
        (Monthly(kind="monthly", reset_day=30), "UTC", datetime(2028, 2, 29, tzinfo=UTC),
         ("2028-02-29T00:00:00+00:00", "2028-03-30T00:00:00+00:00")),
        (Monthly(kind="monthly", reset_day=1), "UTC", datetime(2026, 12, 31, tzinfo=UTC),
         ("2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00")),
        (Monthly(kind="monthly", reset_day=15), "Asia/Kolkata",
         datetime(2026, 1, 14, 18, 30, tzinfo=UTC),
         ("2026-01-15T00:00:00+05:30", "2026-02-15T00:00:00+05:30")),
        # every_days counts elapsed time, whatever the zone's DST; the anchor's offset counts
        (EveryDays(kind="every_days", days=7,
                   anchor=datetime(2026, 3, 23, tzinfo=timezone(timedelta(hours=1)))),
         "Europe/Berlin", datetime(2026, 3, 30, 0, 30, tzinfo=BERLIN),
         ("2026-03-23T00:00:00+01:00", "2026-03-30T01:00:00+02:00")),
        (EveryDays(kind="every_days", days=2,
                   anchor=datetime(2026, 5, 10, 12, tzinfo=timezone(timedelta(hours=-7)))),
         "UTC", datetime(2026, 5, 1, tzinfo=UTC),
         ("2026-04-30T19:00:00+00:00", "2026-05-02T19:00:00+00:00")),
    ],
)
def test_period_bounds_examples(
    rule: object, zone: str, t: datetime, expected: tuple[str, str]
) -> None:
    assert bounds_of(rule, zone, t) == expected


def test_a_plan_without_reset_has_one_period_from_starts_at() -> None:
    starts = datetime(2026, 11, 1, tzinfo=BERLIN)
    assert bounds_of(NoReset(kind="none"), "Europe/Berlin", datetime(2030, 1, 1, tzinfo=UTC),
                     starts) == ("2026-11-01T00:00:00+01:00", None)
    rule = NoReset(kind="none")
    assert period_bounds(rule, UTC_TZ, 5, 10**9) == (5, NO_END)


def test_the_default_zone_applies_when_the_plan_names_none() -> None:
    plan = Plan(user_id="u", quota_bytes=1, period=CAL, enabled=True)
    start, _ = period_at(plan, datetime(2026, 6, 15, tzinfo=UTC), ZoneInfo("Asia/Tokyo"))
    assert start.isoformat() == "2026-06-01T00:00:00+09:00"


# ---------------------------------------------------------------------------- periods, properties


def first_instant_by_search(day: date, tz: ZoneInfo) -> int:
    """The smallest Unix second whose local date is `day`, found by bisection."""
    lo = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) - 2 * 86400
    hi = lo + 4 * 86400
    while lo < hi:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).date() < day:
            lo = mid + 1
        else:
            hi = mid
    return lo


def reference_bounds(reset_day: int, tz: ZoneInfo, t: int) -> tuple[int, int]:
    """Walk the reset dates around `t`: each month's reset_day, or its last day."""
    here = datetime.fromtimestamp(t, tz).date()
    starts = []
    for offset in range(-2, 3):
        month_index = here.year * 12 + here.month - 1 + offset
        year, month = divmod(month_index, 12)
        last = calendar.monthrange(year, month + 1)[1]
        starts.append(first_instant_by_search(date(year, month + 1, min(reset_day, last)), tz))
    for start, end in itertools.pairwise(starts):
        if start <= t < end:
            return start, end
    raise AssertionError("no period found")


instants = st.integers(
    int(datetime(2020, 1, 1, tzinfo=UTC).timestamp()),
    int(datetime(2040, 1, 1, tzinfo=UTC).timestamp()),
)


def near_transitions(zone: str) -> st.SearchStrategy[int]:
    """Instants within a day of a month's start or a DST change, where periods get hard."""
    tz = ZoneInfo(zone)

    def around(t: int, shift: int) -> int:
        local = datetime.fromtimestamp(t, tz).date().replace(day=1)
        return first_instant_by_search(local, tz) + shift

    return st.one_of(
        instants,
        st.builds(around, instants, st.integers(-86400, 86400)),
        st.builds(around, instants, st.integers(-3, 3)),
    )


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(ZONES).flatmap(lambda z: st.tuples(st.just(z), near_transitions(z))),
    st.integers(1, 31),
)
def test_monthly_periods_match_walking_the_reset_dates(pair: tuple[str, int], day: int) -> None:
    zone, t = pair
    tz = ZoneInfo(zone)
    assert period_bounds(Monthly(kind="monthly", reset_day=day), tz, None, t) == (
        reference_bounds(day, tz, t)
    )


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ZONES).flatmap(lambda z: st.tuples(st.just(z), near_transitions(z))))
def test_calendar_months_match_the_first_of_the_month(pair: tuple[str, int]) -> None:
    zone, t = pair
    tz = ZoneInfo(zone)
    start, end = period_bounds(CAL, tz, None, t)
    assert (start, end) == reference_bounds(1, tz, t)
    assert datetime.fromtimestamp(start, tz).day == 1
    assert datetime.fromtimestamp(start - 1, tz).month != datetime.fromtimestamp(start, tz).month


@settings(max_examples=300, deadline=None)
@given(
    instants,
    st.integers(1, 400),
    instants,
    st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m))),
    st.integers(0, 59),
)
def test_every_days_periods_tile_elapsed_time_from_the_anchor(
    anchor_s: int, days: int, t: int, offset: timezone, second: int
) -> None:
    anchor = datetime.fromtimestamp(anchor_s + second, offset)
    rule = EveryDays(kind="every_days", days=days, anchor=anchor)
    start, end = period_bounds(rule, BERLIN, None, t)
    assert start <= t < end
    assert end - start == days * 86400
    # the anchor starts a period: reference by stepping whole periods from it
    length = days * 86400
    reference = anchor_s + second
    while reference > t:
        reference -= length
    while reference + length <= t:
        reference += length
    assert start == reference


# ---------------------------------------------------------------------------- packs


def test_packs_are_ordered_by_expiry_then_added_at_then_id() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    packs = [
        Pack(pack_id="forever-b", bytes=1, added_at=t),
        Pack(pack_id="forever-a", bytes=1, added_at=t),
        Pack(pack_id="forever-old", bytes=1, added_at=t - timedelta(days=1)),
        Pack(pack_id="late", bytes=1, added_at=t, expires_at=t + timedelta(days=9)),
        Pack(pack_id="soon-2", bytes=1, added_at=t, expires_at=t + timedelta(days=2)),
        Pack(pack_id="soon-1", bytes=1, added_at=t - timedelta(hours=1),
             expires_at=t + timedelta(days=2)),
    ]
    assert [p.pack_id for p in sorted(packs, key=pack_order)] == [
        "soon-1", "soon-2", "late", "forever-old", "forever-a", "forever-b",
    ]


# ---------------------------------------------------------------------------- node rates


def test_node_rates_read_and_apply() -> None:
    rates = NodeRates.decode(
        b'{"node_id": "node-a", "rates": [{"from": "2026-12-01T00:00:00Z", "rate": "0.5"},'
        b' {"from": "2026-11-01T00:00:00Z", "rate": "1.5"}, {"from": "2027-01-01T00:00:00Z"}]}'
    )
    assert NodeRates.decode(rates.encode()) == rates
    assert b'"from"' in rates.encode()
    nov = datetime(2026, 11, 1, tzinfo=UTC)
    assert rate_at(rates, nov - timedelta(seconds=1)) == 10_000
    assert rate_at(rates, nov) == 15_000
    assert rate_at(rates, unix(nov) + 86400 * 30) == 5_000
    assert rate_at(rates, datetime(2027, 6, 1, tzinfo=UTC)) == 10_000
    assert rate_at(None, nov) == 10_000
    assert rate_at(NodeRates(node_id="n"), nov) == 10_000


@pytest.mark.parametrize(
    ("text", "units"),
    [("1", 10_000), ("0", 0), ("1.5", 15_000), ("0.0001", 1), ("12.3456", 123_456),
     ("2.10", 21_000)],
)
def test_rates_are_integers_of_a_ten_thousandth(text: str, units: int) -> None:
    rates = NodeRates.decode(orjson.dumps(
        {"node_id": "n", "rates": [{"from": "2026-01-01T00:00:00Z", "rate": text}]}
    ))
    assert rates.rates[0].units == units


@pytest.mark.parametrize("bad", ["1.23456", "-1", "1.", ".5", "01", "1e3", " 1", 1.5, 2])
def test_bad_rates_are_refused(bad: object) -> None:
    with pytest.raises(ValidationError):
        NodeRates.decode(orjson.dumps(
            {"node_id": "n", "rates": [{"from": "2026-01-01T00:00:00Z", "rate": bad}]}
        ))


def test_two_rates_from_the_same_instant_are_refused() -> None:
    with pytest.raises(ValidationError, match="same instant"):
        NodeRates.decode(
            b'{"node_id": "n", "rates": [{"from": "2026-01-01T00:00:00Z", "rate": "1"},'
            b' {"from": "2026-01-01T01:00:00+01:00", "rate": "2"}]}'
        )


@given(st.integers(0, 2**63 - 1), st.integers(0, 10**6), st.integers(0, 9999))
def test_billed_bytes_round_down_exactly(raw: int, whole: int, places: int) -> None:
    text = f"{whole}.{places:04d}"
    rate = NodeRates.decode(orjson.dumps(
        {"node_id": "n", "rates": [{"from": "2026-01-01T00:00:00Z", "rate": text}]}
    )).rates[0].units
    assert billed(raw, rate) == int(Decimal(raw) * Decimal(text) // 1)


# ---------------------------------------------------------------------------- commands


def test_commands_carry_every_field() -> None:
    command = Command(
        command_id="abc", user_id="alice", action="disable", reason="quota",
        period_start=datetime(2026, 11, 1, tzinfo=BERLIN), period_end=None,
        used_bytes=5, allowance_bytes=None, threshold=None,
        issued_at=datetime(2026, 11, 24, 10, 0, 1, 234567, tzinfo=UTC),
    )
    wire = orjson.loads(command.encode())
    assert list(wire) == [
        "command_id", "user_id", "action", "reason", "period_start", "period_end", "used_bytes",
        "allowance_bytes", "threshold", "issued_at",
    ]
    assert wire["period_start"] == "2026-11-01T00:00:00+01:00"
    assert wire["issued_at"] == "2026-11-24T10:00:01.234Z"
    assert wire["period_end"] is None and wire["threshold"] is None
    decoded = Command.decode(command.encode())
    assert decoded.period_start == command.period_start
    with pytest.raises(ValidationError):
        Command.decode(command.encode().replace(b'"disable"', b'"ban"'))
