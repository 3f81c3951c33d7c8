"""What operators type about plans: sizes, periods, instants, `plans set` edits, plan files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotaflow.core.contracts import MAX_COUNTER, identifier_problem
from quotaflow.core.plan_edits import (
    SIZE_UNITS,
    PlanEdit,
    PlanEditError,
    brief_size,
    format_period,
    format_size,
    pack_id_at,
    parse_instant,
    parse_pack,
    parse_period,
    parse_quota,
    parse_size,
    parse_thresholds,
    plan_changes,
    plans_file,
    read_plans_file,
    set_rate,
)
from quotaflow.core.plans import (
    CalendarMonth,
    EveryDays,
    Monthly,
    NodeRates,
    NoReset,
    Pack,
    Plan,
    Rate,
)

NOW = datetime(2026, 11, 24, 10, 30, 5, 250000, tzinfo=UTC)
THIS_SECOND = NOW.replace(microsecond=0)

# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("123", 123), ("123B", 123), ("123 b", 123), ("0", 0),
        ("1kB", 1000), ("1KB", 1000), ("1kb", 1000), ("1KiB", 1024), ("1kib", 1024),
        ("50GB", 50 * 10**9), ("50 GB", 50 * 10**9), ("10GiB", 10 * 2**30),
        ("1.5GB", 1_500_000_000), ("1.5TiB", 3 * 2**39), ("2PB", 2 * 10**15),
        ("1PiB", 2**50), ("7EiB", 7 * 2**60), (".5MB", 500_000), ("  7 MiB ", 7 * 2**20),
        ("1.3KiB", 1331),  # 1331.2 bytes: the fraction of a byte is dropped
        ("0.0001B", 0),
        ("9223372036854775807", MAX_COUNTER),
    ],
)
def test_sizes_are_read_in_si_and_iec_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not a size like 50GB"),
        ("GB", "is not a size like 50GB"),
        ("-1GB", "is not a size like 50GB"),
        ("+1GB", "is not a size like 50GB"),
        ("1e9", "is not a size like 50GB"),
        ("1,000", "is not a size like 50GB"),
        ("1.GB", "is not a size like 50GB"),
        ("50G", "say GB \\(10\\^9\\) or GiB \\(2\\^30\\)"),
        ("50Gi", "say GB \\(10\\^9\\) or GiB \\(2\\^30\\)"),
        ("5k", "say kB \\(10\\^3\\) or KiB \\(2\\^10\\)"),
        ("3 bytes", "unknown unit 'bytes'"),
        ("10Gbit", "unknown unit 'Gbit'"),
        ("10EB", "above the largest, 2\\*\\*63-1 bytes"),
        ("9223372036854775808", "above the largest"),
        ("1" * 100, "is too long"),
    ],
)
def test_nonsense_sizes_are_refused_naming_the_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        parse_size(text)
    assert repr(text.strip()[:20]) in str(refused.value) or repr(text) in str(refused.value)


@given(st.integers(min_value=0, max_value=MAX_COUNTER))
def test_formatted_sizes_read_back_exactly(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(
    st.integers(min_value=0, max_value=10**6),
    st.text(alphabet="0123456789", max_size=6),
    st.sampled_from(sorted(SIZE_UNITS)),
    st.sampled_from([str.lower, str.upper, lambda s: s]),
    st.sampled_from(["", " "]),
)
def test_a_decimal_size_is_the_exact_product_rounded_down(
    whole: int, places: str, unit: str, case: object, space: str
) -> None:
    number = f"{whole}.{places}" if places else str(whole)
    # the reference, in integers only: whole.places x unit, fractions of a byte dropped
    scale = 10 ** len(places)
    expected = (whole * scale + int(places or "0")) * SIZE_UNITS[unit] // scale
    text = number + space + case(unit)  # type: ignore[operator]
    if expected > MAX_COUNTER:
        with pytest.raises(ValueError, match="above the largest"):
            parse_size(text)
    else:
        assert parse_size(text) == expected


@given(st.integers(min_value=0, max_value=MAX_COUNTER))
def test_a_brief_size_is_at_most_one_percent_short(size: int) -> None:
    shown = parse_size(brief_size(size))
    assert shown <= size
    assert size - shown <= size // 100


def test_formatted_sizes_take_the_shortest_unit() -> None:
    assert [format_size(n) for n in (0, 1000, 1024, 1500, 10**9, 2**30, 3 * 2**39)] == [
        "0 B", "1 kB", "1 KiB", "1.5 kB", "1 GB", "1 GiB", "1.5 TiB",
    ]


def test_quotas_are_sizes_or_unlimited() -> None:
    assert parse_quota("unlimited") is None
    assert parse_quota("Unlimited") is None
    assert parse_quota("50GB") == 50 * 10**9
    for zero in ("0", "0GB", "0.0001B"):
        with pytest.raises(ValueError, match="not positive: use 'unlimited'"):
            parse_quota(zero)


# ---------------------------------------------------------------------------- instants and periods


def test_instants_need_an_offset() -> None:
    assert parse_instant("now", NOW) == THIS_SECOND
    assert parse_instant(" NOW ", NOW) == THIS_SECOND
    assert parse_instant("2026-11-01T00:00:00+01:00", NOW) == datetime(
        2026, 10, 31, 23, tzinfo=UTC
    )
    assert parse_instant("2026-11-01T00:00:00Z", NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="'2026-11-01T00:00:00' has no offset"):
        parse_instant("2026-11-01T00:00:00", NOW)
    with pytest.raises(ValueError, match="'2026-11-01' has no offset"):
        parse_instant("2026-11-01", NOW)
    with pytest.raises(ValueError, match="'next week' is not an RFC 3339 time"):
        parse_instant("next week", NOW)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("calendar_month", CalendarMonth(kind="calendar_month")),
        ("monthly:1", Monthly(kind="monthly", reset_day=1)),
        ("monthly:31", Monthly(kind="monthly", reset_day=31)),
        ("none", NoReset(kind="none")),
        ("every_days:30@2026-11-01T00:00:00+01:00",
         EveryDays(kind="every_days", days=30,
                   anchor=datetime(2026, 11, 1, tzinfo=timezone(timedelta(hours=1))))),
        ("every_days:1@now", EveryDays(kind="every_days", days=1, anchor=THIS_SECOND)),
    ],
)
def test_periods_are_read_from_one_word(text: str, rule: object) -> None:
    assert parse_period(text, NOW) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("weekly", "is not one of calendar_month, monthly:DAY"),
        ("calendar_month:3", "is not one of"),
        ("monthly", "is not one of"),
        ("monthly:0", "reset day must be 1 to 31"),
        ("monthly:x", "reset day must be 1 to 31"),
        ("every_days:0@now", "whole number, 1 to 100000"),
        ("every_days:30", "needs an anchor"),
        ("every_days:30@2026-11-01T00:00:00", "the anchor's time .* has no offset"),
    ],
)
def test_bad_periods_are_refused_naming_the_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        parse_period(text, NOW)
    assert repr(text) in str(refused.value)


offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
anchors = st.builds(
    lambda t, tz: t.replace(tzinfo=UTC).astimezone(tz),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    offsets,
)
rules = st.one_of(
    st.just(CalendarMonth(kind="calendar_month")),
    st.just(NoReset(kind="none")),
    st.builds(lambda d: Monthly(kind="monthly", reset_day=d), st.integers(1, 31)),
    st.builds(lambda d, a: EveryDays(kind="every_days", days=d, anchor=a),
              st.integers(1, 100_000), anchors),
)


@given(rules)
def test_formatted_periods_read_back(rule: CalendarMonth | Monthly | EveryDays | NoReset) -> None:
    again = parse_period(format_period(rule), NOW)
    assert again == rule
    if isinstance(rule, EveryDays):  # the same instant and the same offset
        assert isinstance(again, EveryDays)
        assert again.anchor.utcoffset() == rule.anchor.utcoffset()


@given(st.lists(st.integers(1, 999), min_size=1, max_size=5, unique=True))
def test_thresholds_read_ascending(thousandths: list[int]) -> None:
    fractions = [n / 1000 for n in thousandths]
    assert parse_thresholds(",".join(map(str, fractions))) == tuple(sorted(fractions))


def test_thresholds_take_percentages_and_none() -> None:
    assert parse_thresholds("80%, 50%") == (0.5, 0.8)
    assert parse_thresholds("none") == ()
    for bad, message in [("0", "between 0 and 1"), ("1", "between 0 and 1"),
                         ("nan", "between 0 and 1"), ("x", "not a number"),
                         ("0.5,50%", "given twice"), ("", "not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_thresholds(bad)


# ---------------------------------------------------------------------------- packs


def test_a_pack_is_added_now_with_an_id_from_the_second() -> None:
    pack = parse_pack("10GiB", NOW)
    assert pack == Pack(pack_id="pack-20261124T103005Z", bytes=10 * 2**30,
                        added_at=THIS_SECOND, expires_at=None)
    assert parse_pack("1GB:never", NOW).expires_at is None
    expiring = parse_pack("1GB:2026-12-01T00:00:00+01:00", NOW)
    assert expiring.expires_at == datetime(2026, 11, 30, 23, tzinfo=UTC)
    taken = ["pack-20261124T103005Z", "pack-20261124T103005Z-2"]
    assert parse_pack("1GB", NOW, taken).pack_id == "pack-20261124T103005Z-3"


def test_pack_ids_are_in_utc() -> None:
    berlin_noon = datetime(2026, 7, 1, 12, tzinfo=ZoneInfo("Europe/Berlin"))
    assert pack_id_at(berlin_noon, []) == "pack-20260701T100000Z"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0GB", "at least one byte"),
        ("10G", "say GB"),
        ("10GB:2026-11-01T00:00:00Z", "not after now"),
        ("10GB:soon", "'soon' is not an RFC 3339 time"),
        ("10GB:2026-12-01", "has no offset"),
    ],
)
def test_bad_packs_are_refused_naming_the_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        parse_pack(text, NOW)
    assert str(refused.value).startswith(f"pack {text!r}: ")


# ---------------------------------------------------------------------------- plans set

FULL_PLAN = Plan.decode(
    b'{"user_id": "alice", "quota_bytes": 50000000000, "period": {"kind": "calendar_month"},'
    b' "timezone": "Europe/Berlin", "starts_at": "2026-11-01T00:00:00+01:00",'
    b' "expires_at": "2026-12-31T23:59:59Z", "packs": [{"pack_id": "nov-extra",'
    b' "bytes": 10000000000, "added_at": "2026-11-20T10:00:00Z", "expires_at": null}],'
    b' "warn_at": [0.8], "enabled": true}'
)


def _without(plan: Plan, *names: str) -> dict[str, object]:
    return {k: v for k, v in plan.model_dump().items() if k not in names}


@pytest.mark.parametrize(
    ("edit", "field", "value"),
    [
        (PlanEdit(quota="60GB"), "quota_bytes", 60 * 10**9),
        (PlanEdit(quota="unlimited"), "quota_bytes", None),
        (PlanEdit(period="monthly:15"), "period", Monthly(kind="monthly", reset_day=15)),
        (PlanEdit(timezone="Asia/Tokyo"), "timezone", "Asia/Tokyo"),
        (PlanEdit(timezone="default"), "timezone", None),
        (PlanEdit(starts_at="none"), "starts_at", None),
        (PlanEdit(starts_at="2026-11-05T00:00:00Z"), "starts_at",
         datetime(2026, 11, 5, tzinfo=UTC)),
        (PlanEdit(expires="never"), "expires_at", None),
        (PlanEdit(expires="now"), "expires_at", THIS_SECOND),
        (PlanEdit(warn_at="0.5,0.9"), "warn_at", (0.5, 0.9)),
        (PlanEdit(warn_at="none"), "warn_at", ()),
        (PlanEdit(enabled=False), "enabled", False),
        (PlanEdit(remove_packs=("nov-extra",)), "packs", ()),
    ],
)
def test_an_edit_changes_its_field_and_keeps_the_rest(
    edit: PlanEdit, field: str, value: object
) -> None:
    edited = edit.apply("alice", FULL_PLAN, NOW)
    assert getattr(edited, field) == value
    assert _without(edited, field) == _without(FULL_PLAN, field)
    assert [line.split(":")[0] for line in plan_changes(FULL_PLAN, edited)] == [field]


@given(st.integers(min_value=1, max_value=MAX_COUNTER))
def test_any_quota_is_set_exactly_and_nothing_else(quota: int) -> None:
    edited = PlanEdit(quota=format_size(quota)).apply("alice", FULL_PLAN, NOW)
    assert edited == FULL_PLAN.model_copy(update={"quota_bytes": quota})


def test_adding_packs_keeps_the_old_ones() -> None:
    edited = PlanEdit(add_packs=("10GB:2026-12-31T00:00:00Z", "1GiB")).apply(
        "alice", FULL_PLAN, NOW
    )
    assert _without(edited, "packs") == _without(FULL_PLAN, "packs")
    assert edited.packs[0] == FULL_PLAN.packs[0]
    assert [(p.pack_id, p.bytes, p.added_at, p.expires_at) for p in edited.packs[1:]] == [
        ("pack-20261124T103005Z", 10**10, THIS_SECOND, datetime(2026, 12, 31, tzinfo=UTC)),
        ("pack-20261124T103005Z-2", 2**30, THIS_SECOND, None),
    ]
    assert plan_changes(FULL_PLAN, edited) == [
        "packs: + pack-20261124T103005Z, 10 GB, expires 2026-12-31T00:00:00Z",
        "packs: + pack-20261124T103005Z-2, 1 GiB, expires never",
    ]


def test_a_new_user_needs_a_quota_and_gets_defaults() -> None:
    with pytest.raises(PlanEditError, match="bob has no plan yet: give --quota"):
        PlanEdit(period="monthly:3").apply("bob", None, NOW)
    plan = PlanEdit(quota="unlimited").apply("bob", None, NOW)
    assert plan == Plan(user_id="bob", quota_bytes=None,
                        period=CalendarMonth(kind="calendar_month"), enabled=True)
    assert plan.warn_at == (0.8,) and plan.timezone is None


def test_period_none_starts_now_unless_a_start_is_known() -> None:
    new = PlanEdit(quota="1GB", period="none").apply("bob", None, NOW)
    assert (new.period.kind, new.starts_at) == ("none", THIS_SECOND)
    kept = PlanEdit(period="none").apply("alice", FULL_PLAN, NOW)
    assert kept.starts_at == FULL_PLAN.starts_at
    given_start = PlanEdit(quota="1GB", period="none", starts_at="2026-11-01T00:00:00Z")
    assert given_start.apply("bob", None, NOW).starts_at == datetime(2026, 11, 1, tzinfo=UTC)


def test_every_bad_option_is_named_at_once() -> None:
    edit = PlanEdit(quota="0", period="weekly", timezone="Mars/Base", expires="soon",
                    add_packs=("5G",), remove_packs=("nope",), warn_at="2")
    with pytest.raises(PlanEditError) as refused:
        edit.apply("alice", FULL_PLAN, NOW)
    assert [problem.split(":")[0] for problem in refused.value.problems] == [
        "--quota", "--period", "--expires", "--warn-at", "--remove-pack", "--add-pack",
    ]
    # the zone is checked by the plan itself, once the options parse
    with pytest.raises(PlanEditError) as refused:
        PlanEdit(timezone="Mars/Base").apply("alice", FULL_PLAN, NOW)
    assert refused.value.problems == ("--timezone: unknown IANA timezone 'Mars/Base'",)


def test_an_edit_without_options_is_empty() -> None:
    assert PlanEdit().empty
    assert not PlanEdit(enabled=True).empty
    assert PlanEdit().apply("alice", FULL_PLAN, NOW) == FULL_PLAN


# ---------------------------------------------------------------------------- node rates


def test_a_rate_is_added_or_replaces_the_one_from_the_same_instant() -> None:
    t1, t2 = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 15, tzinfo=UTC)
    rates = set_rate(None, "node-a", "2", t2)
    rates = set_rate(rates, "node-a", "1.5", t1)
    assert rates == NodeRates(node_id="node-a", rates=(
        Rate.model_validate({"from": t1, "rate": "1.5"}),
        Rate.model_validate({"from": t2, "rate": "2"}),
    ))
    same_instant = t2.astimezone(ZoneInfo("Asia/Tokyo"))
    replaced = set_rate(rates, "node-a", "0.5", same_instant)
    assert [r.rate for r in replaced.rates] == ["1.5", "0.5"]
    for bad in ("x2", "-1", "1.23456", "", "01"):
        with pytest.raises(ValueError, match="is not a decimal with at most 4 places"):
            set_rate(rates, "node-a", bad, t1)
    with pytest.raises(ValueError, match="node 'bad\\\\n'"):
        set_rate(None, "bad\n", "1", t1)


# ---------------------------------------------------------------------------- plan files


def _plan_line(user: str) -> str:
    return json.dumps({"user_id": user, "quota_bytes": 1000, "period": {"kind": "monthly",
                       "reset_day": 5}, "enabled": True})


BAD_LINES = {
    "zero quota": (
        '{"user_id": "z", "quota_bytes": 0, "period": {"kind": "calendar_month"}, '
        '"enabled": true}', "quota_bytes: must be positive; use null for unlimited",
    ),
    "zone": (
        '{"user_id": "t", "quota_bytes": 1, "period": {"kind": "calendar_month"}, '
        '"timezone": "Mars/Base", "enabled": true}', "timezone: unknown IANA timezone 'Mars/Base'",
    ),
    "not json": ("{oops", "not JSON"),
    "not an object": ("42", "Input should be an object"),
    "twice": ('{"user_id": "k", "user_id": "k"}', "the key 'user_id' is given twice"),
}


@given(st.lists(st.sampled_from(["good", "blank", *BAD_LINES]), max_size=25))
def test_every_bad_line_is_reported_with_its_number(kinds: list[str]) -> None:
    lines, expected_errors, expected_users = [], [], []
    for number, kind in enumerate(kinds, start=1):
        if kind == "good":
            lines.append(_plan_line(f"user-{number}"))
            expected_users.append(f"user-{number}")
        elif kind == "blank":
            lines.append("   ")
        else:
            text, reason = BAD_LINES[kind]
            lines.append(text)
            expected_errors.append((number, reason))
    plans, errors = read_plans_file("\n".join(lines))
    assert [p.user_id for p in plans] == expected_users
    assert [number for number, _ in errors] == [number for number, _ in expected_errors]
    for (_, reason), (_, expected) in zip(errors, expected_errors, strict=True):
        assert expected in reason


@given(st.lists(st.sampled_from(["good", "zero quota", "zone", "twice"]), max_size=20))
def test_an_array_reports_the_line_each_element_starts_on(kinds: list[str]) -> None:
    elements = [
        _plan_line(f"user-{i}") if kind == "good" else BAD_LINES[kind][0]
        for i, kind in enumerate(kinds)
    ]
    plans, errors = read_plans_file("[\n" + ",\n".join(elements) + "\n]\n")
    assert [number for number, _ in errors] == [
        i + 2 for i, kind in enumerate(kinds) if kind != "good"
    ]
    assert len(plans) == kinds.count("good")


def test_a_user_given_twice_is_an_error_on_the_later_line() -> None:
    text = "\n".join([_plan_line("a"), _plan_line("b"), _plan_line("a"), _plan_line("a")])
    plans, errors = read_plans_file(text)
    assert [p.user_id for p in plans] == ["a", "b"]
    assert errors == [(3, "user 'a' is given again (first on line 1)"),
                      (4, "user 'a' is given again (first on line 1)")]


def test_broken_arrays_say_where() -> None:
    assert read_plans_file("[]") == ([], [])
    assert read_plans_file("\ufeff[\n]") == ([], [])
    assert read_plans_file("[\n" + _plan_line("a") + "\n")[1] == [
        (3, "not JSON: expected ',' or ']'")
    ]
    assert read_plans_file("[\n" + _plan_line("a") + ",\n]")[1] == [
        (3, "not JSON: Expecting value (column 1)")
    ]
    assert read_plans_file("[" + _plan_line("a") + "]\n\nx")[1] == [
        (3, "not JSON: more after the array's end")
    ]


def test_reasons_do_not_echo_a_huge_line() -> None:
    huge = '{"user_id": "' + "x" * 100_000 + '", "quota_bytes": 1}'
    _, errors = read_plans_file(huge)
    assert len(errors) == 1 and len(errors[0][1]) <= 400


plans_strategy = st.lists(
    st.builds(
        lambda user, quota, rule, enabled: Plan(
            user_id=user, quota_bytes=quota, period=rule, enabled=enabled,
            starts_at=THIS_SECOND if rule.kind == "none" else None,
        ),
        st.text(min_size=1, max_size=20).filter(lambda u: identifier_problem(u) is None),
        st.none() | st.integers(1, MAX_COUNTER),
        rules,
        st.booleans(),
    ),
    unique_by=lambda p: p.user_id,
    max_size=8,
)


@given(plans_strategy)
def test_a_written_file_reads_back(plans: list[Plan]) -> None:
    assert read_plans_file(plans_file(plans)) == (sorted(plans, key=lambda p: p.user_id), [])
