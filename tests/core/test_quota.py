"""Quota decisions: every rule by example, and properties against a reference model."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.core import quota as quota_module
from quotaflow.core.plans import (
    CalendarMonth,
    Command,
    EveryDays,
    NoReset,
    Pack,
    Plan,
    unix,
)
from quotaflow.core.quota import QuotaBook

UTC_TZ = ZoneInfo("UTC")
T0 = datetime(2026, 11, 1, tzinfo=UTC)  # a calendar month in UTC: November
CAL = CalendarMonth(kind="calendar_month")
DAY = 86400


def at(days: float = 0, hours: float = 0, seconds: float = 0) -> datetime:
    return T0 + timedelta(days=days, hours=hours, seconds=seconds)


def s(moment: datetime) -> int:
    return unix(moment)


def plan(**fields: object) -> Plan:
    base: dict[str, object] = {
        "user_id": "alice", "quota_bytes": 1000, "period": CAL, "enabled": True,
        "timezone": "UTC", "warn_at": (0.8,),
    }
    base.update(fields)
    return Plan(**base)  # type: ignore[arg-type]


def pack(pack_id: str, size: int, added: datetime = T0, expires: datetime | None = None) -> Pack:
    return Pack(pack_id=pack_id, bytes=size, added_at=added, expires_at=expires)


def acts(commands: Sequence[Command]) -> list[tuple[str, str] | tuple[str, str, float]]:
    out: list[tuple[str, str] | tuple[str, str, float]] = []
    for c in commands:
        out.append((c.action, c.reason) if c.threshold is None else
                   (c.action, c.reason, c.threshold))
    return out


def grouped(readings: list[tuple[str, int, int]]) -> list[tuple[int, list[tuple[str, int]]]]:
    """`QuotaBook.update`'s batch of readings `(user, observed_at, bytes)`, in their order."""
    return [(t, [(user, count)]) for user, t, count in readings]


def use(book: QuotaBook, count: int, now: datetime, observed: datetime | None = None,
        user: str = "alice") -> list[Command]:
    return book.update([(s(observed or now), [(user, count)])], now)


# ---------------------------------------------------------------------------- starting


def test_a_new_plan_starts_enabled_without_a_command() -> None:
    book = QuotaBook(UTC_TZ)
    assert book.set_plan("alice", plan(), at(1)) == []
    assert book.status("alice").disabled == ()  # type: ignore[union-attr]
    assert use(book, 100, at(2)) == []


@pytest.mark.parametrize(
    ("fields", "usage", "expected"),
    [
        ({"enabled": False}, 0, [("disable", "operator")]),
        ({"expires_at": at(1)}, 0, [("disable", "expired")]),
        ({}, 1000, [("warn", "threshold", 0.8), ("disable", "quota")]),
        ({"warn_at": ()}, 1500, [("disable", "quota")]),
        ({"enabled": False, "expires_at": at(1)}, 1000,
         [("warn", "threshold", 0.8), ("disable", "operator")]),
    ],
)
def test_a_first_plan_that_is_off_expired_or_over_quota_disables(
    fields: dict[str, object], usage: int, expected: list[tuple[str, str]]
) -> None:
    book = QuotaBook(UTC_TZ)
    if usage:
        use(book, usage, at(2))
    assert acts(book.set_plan("alice", plan(**fields), at(3))) == expected


def test_a_plan_for_another_user_is_refused() -> None:
    with pytest.raises(ValueError, match="'alice' was given for 'bob'"):
        QuotaBook(UTC_TZ).set_plan("bob", plan(), at(0))


# ---------------------------------------------------------------------------- thresholds


def test_thresholds_crossed_at_once_come_in_ascending_order_before_the_disable() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(warn_at=(0.9, 0.5, 0.8)), at(0))
    assert acts(use(book, 600, at(1))) == [("warn", "threshold", 0.5)]
    commands = use(book, 500, at(2))
    assert acts(commands) == [
        ("warn", "threshold", 0.8), ("warn", "threshold", 0.9), ("disable", "quota"),
    ]
    assert [c.used_bytes for c in commands] == [1100] * 3
    assert {c.allowance_bytes for c in commands} == {1000}


def test_a_threshold_is_exact_integer_arithmetic() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(quota_bytes=3, warn_at=(1 / 3,)), at(0))
    assert use(book, 0, at(1)) == []
    assert acts(use(book, 1, at(1))) == [("warn", "threshold", 1 / 3)]


def test_a_threshold_is_warned_once_per_period_whatever_happens_later() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(), at(0))
    assert acts(use(book, 800, at(1))) == [("warn", "threshold", 0.8)]
    # a pack lowers usage below 80 % of the allowance; crossing it again warns no more
    book.set_plan("alice", plan(packs=(pack("p", 1000),)), at(2))
    assert use(book, 900, at(3)) == []
    # and neither do a restart nor the same plan again
    book = QuotaBook.from_bytes(book.to_bytes(), UTC_TZ)
    assert book.set_plan("alice", plan(packs=(pack("p", 1000),)), at(4)) == []
    assert use(book, 10, at(5)) == []
    assert book.status("alice").warned == (0.8,)  # type: ignore[union-attr]
    # the next period warns again
    assert acts(use(book, 1100, at(31))) == [("warn", "threshold", 0.8)]  # of 1000 + 290


def test_new_thresholds_warn_when_the_plan_adds_them() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(), at(0))
    use(book, 850, at(1))
    assert acts(book.set_plan("alice", plan(warn_at=(0.5, 0.8, 0.9)), at(2))) == [
        ("warn", "threshold", 0.5),
    ]


def test_an_expiring_pack_can_cross_a_threshold() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(packs=(pack("p", 1000, expires=at(10)),)), at(0))
    assert use(book, 900, at(1)) == []  # 45 % of 2000
    assert acts(book.tick(at(10))) == [("warn", "threshold", 0.8)]


# ---------------------------------------------------------------------------- enabling


def over_quota(book: QuotaBook, **fields: object) -> None:
    book.set_plan("alice", plan(**fields), at(0))
    assert acts(use(book, 1200, at(1)))[-1] == ("disable", "quota")


def test_a_period_reset_enables_by_the_clock() -> None:
    book = QuotaBook(UTC_TZ)
    over_quota(book)
    assert book.tick(at(29, 23)) == []
    commands = book.tick(at(30, seconds=1))
    assert acts(commands) == [("enable", "period_reset")]
    assert commands[0].period_start == datetime(2026, 12, 1, tzinfo=UTC_TZ)
    assert (commands[0].used_bytes, commands[0].allowance_bytes) == (0, 1000)


def test_traffic_in_the_new_period_resets_before_the_tick_and_warns_after_the_enable() -> None:
    book = QuotaBook(UTC_TZ)
    over_quota(book)
    assert acts(use(book, 900, at(30, 1))) == [
        ("enable", "period_reset"), ("warn", "threshold", 0.8),
    ]


@pytest.mark.parametrize(
    ("before", "after", "usage", "reason"),
    [
        ({}, {"quota_bytes": 2000}, 1200, "quota_raised"),
        ({}, {"quota_bytes": None}, 1200, "quota_raised"),
        ({}, {"packs": (pack("p", 500),)}, 1200, "pack"),
        ({"packs": (pack("p", 100),)}, {"packs": (pack("p", 500),)}, 1200, "pack"),
        ({"enabled": False}, {}, 0, "operator"),
        ({"expires_at": at(1)}, {"expires_at": at(60)}, 0, "renewed"),
        ({"expires_at": at(1)}, {}, 0, "renewed"),
        # several changes at once: operator, renewed, quota_raised, pack
        ({"enabled": False}, {"quota_bytes": 5000, "packs": (pack("p", 500),)}, 1200,
         "operator"),
        ({"expires_at": at(1)}, {"quota_bytes": 5000, "packs": (pack("p", 500),)}, 1200,
         "renewed"),
        ({}, {"quota_bytes": 1100, "packs": (pack("p", 500),)}, 1200, "quota_raised"),
        ({"enabled": False, "expires_at": at(1)}, {"expires_at": at(60)}, 0, "operator"),
    ],
)
def test_a_plan_update_that_removes_the_last_cause_enables_with_its_reason(
    before: dict[str, object], after: dict[str, object], usage: int, reason: str
) -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(**before), at(0))
    use(book, usage, at(2))
    assert book.status("alice").disabled  # type: ignore[union-attr]
    assert acts(book.set_plan("alice", plan(**after), at(3))) == [("enable", reason)]


def test_a_user_stays_disabled_while_any_cause_remains() -> None:
    book = QuotaBook(UTC_TZ)
    over_quota(book)
    assert book.set_plan("alice", plan(enabled=False), at(2)) == []  # already disabled
    assert book.status("alice").disabled == ("operator", "quota")  # type: ignore[union-attr]
    assert book.set_plan("alice", plan(enabled=False, quota_bytes=5000), at(3)) == []
    assert acts(book.set_plan("alice", plan(quota_bytes=5000), at(4))) == [("enable", "operator")]


def test_the_operator_can_switch_a_user_off_and_on_twice_with_distinct_ids() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(), at(0))
    commands = []
    for day, enabled in ((1, False), (2, True), (3, False), (4, True)):
        commands += book.set_plan("alice", plan(enabled=enabled), at(day))
    assert acts(commands) == [("disable", "operator"), ("enable", "operator")] * 2
    assert len({c.command_id for c in commands}) == 4


def test_expiry_is_found_by_the_clock() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(expires_at=at(5)), at(0))
    assert book.tick(at(5, seconds=-1)) == []
    assert acts(book.tick(at(5))) == [("disable", "expired")]
    assert book.tick(at(6)) == []
    assert acts(book.set_plan("alice", plan(expires_at=at(40)), at(7))) == [("enable", "renewed")]
    assert book.tick(at(31)) == []  # the period resets, the user was enabled anyway
    assert acts(book.tick(at(40))) == [("disable", "expired")]
    assert book.tick(at(61)) == []  # still expired after a period reset


def test_a_later_pack_enables_when_it_becomes_valid() -> None:
    book = QuotaBook(UTC_TZ)
    over_quota(book)
    later = (pack("p", 500, added=at(4)),)
    assert book.set_plan("alice", plan(packs=later), at(2)) == []
    assert book.tick(at(4, seconds=-1)) == []
    commands = book.tick(at(4))
    assert acts(commands) == [("enable", "pack")]
    assert commands[0].allowance_bytes == 1500
    assert book.status("alice").given == {"p": 200}  # type: ignore[union-attr]


def test_an_expiring_pack_disables_by_the_clock_and_keeps_what_it_gave() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(packs=(pack("p", 500, expires=at(10)),)), at(0))
    assert acts(use(book, 1200, at(1))) == [("warn", "threshold", 0.8)]  # 1200 >= 0.8 * 1500
    commands = book.tick(at(10))
    assert acts(commands) == [("disable", "quota")]
    assert (commands[0].used_bytes, commands[0].allowance_bytes) == (1200, 1200)


# ---------------------------------------------------------------------------- plans removed


def test_removing_a_plan_enables_a_disabled_user_and_forgets_the_plan() -> None:
    book = QuotaBook(UTC_TZ)
    assert book.set_plan("nobody", None, at(0)) == []
    over_quota(book)
    commands = book.set_plan("alice", None, at(2))
    assert acts(commands) == [("enable", "plan_removed")]
    assert (commands[0].used_bytes, commands[0].allowance_bytes) == (1200, 1000)
    assert book.status("alice") is None
    assert use(book, 10**6, at(3)) == []
    assert book.tick(at(40)) == []
    assert book.set_plan("alice", None, at(3)) == []
    # a plan again: it sees November's traffic only while the buckets keep it
    first = acts(book.set_plan("alice", plan(), at(4)))
    assert first == [("warn", "threshold", 0.8), ("disable", "quota")]


def test_removing_the_plan_of_an_enabled_user_says_nothing() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(), at(0))
    assert book.set_plan("alice", None, at(1)) == []


# ---------------------------------------------------------------------------- usage


def test_late_traffic_of_a_closed_period_counts_there_and_issues_no_command() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(), at(0))
    use(book, 500, at(29))
    assert book.tick(at(30)) == []
    assert use(book, 5000, at(30, 2), observed=at(29, 23)) == []
    assert book.usage("alice", s(T0)) == 5500
    assert book.status("alice").used == 0  # type: ignore[union-attr]


def test_a_plan_arriving_mid_period_sees_earlier_usage_to_within_an_hour() -> None:
    # Kolkata's months start at 18:30 UTC: the hour 18:00-19:00 straddles the start
    book = QuotaBook(UTC_TZ)
    start = datetime(2026, 10, 31, 18, 30, tzinfo=UTC)
    readings = [
        ("alice", s(start) - 3600, 1),  # October
        ("alice", s(start) - 60, 10),  # October, in the straddling hour
        ("alice", s(start) + 60, 100),  # November, in the straddling hour
        ("alice", s(start) + 3600, 1000),  # November
    ]
    book.update(grouped(readings), at(5))
    book.set_plan("alice", plan(timezone="Asia/Kolkata", quota_bytes=10**6), at(5))
    status = book.status("alice")
    assert status is not None and status.period_start == s(start)
    assert status.used == 1000  # the straddling hour counts toward October
    # from now on the period is exact: late readings of any hour count where observed
    book.update(grouped([("alice", s(start) + 60, 100_000), ("alice", s(start) - 60, 7)]), at(6))
    assert book.status("alice").used == 101_000  # type: ignore[union-attr]


def test_traffic_before_starts_at_does_not_count() -> None:
    book = QuotaBook(UTC_TZ)
    use(book, 5000, at(1))
    use(book, 300, at(3, 2))
    book.set_plan("alice", plan(starts_at=at(3)), at(4))
    assert book.status("alice").used == 300  # type: ignore[union-attr]
    assert use(book, 5000, at(5), observed=at(2)) == []
    assert book.status("alice").used == 300  # type: ignore[union-attr]
    # moving starts_at recounts the same period from the buckets
    book.set_plan("alice", plan(starts_at=at(0)), at(6))
    assert book.status("alice").used == 10_300  # type: ignore[union-attr]


def test_a_plan_that_changes_its_periods_recounts() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(), at(0))
    use(book, 600, at(1))
    use(book, 100, at(8))
    assert acts(use(book, 400, at(9))) == [("warn", "threshold", 0.8), ("disable", "quota")]
    weekly = EveryDays(kind="every_days", days=7, anchor=at(7))
    commands = book.set_plan("alice", plan(period=weekly, quota_bytes=600), at(10))
    assert acts(commands) == [("enable", "period_reset"), ("warn", "threshold", 0.8)]
    assert book.status("alice").used == 500  # type: ignore[union-attr]


def test_unlimited_plans_never_warn_or_disable_for_quota() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(quota_bytes=None, packs=(pack("p", 5),)), at(0))
    assert use(book, 10**15, at(1)) == []
    commands = book.set_plan("alice", plan(quota_bytes=None, enabled=False), at(2))
    assert acts(commands) == [("disable", "operator")]
    assert commands[0].allowance_bytes is None
    assert book.status("alice").given == {}  # type: ignore[union-attr]


def test_a_plan_without_reset_never_resets() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(period=NoReset(kind="none"), starts_at=at(0)), at(0))
    commands = use(book, 1000, at(10))
    assert commands[-1].period_end is None
    assert commands[-1].period_start == T0
    assert book.tick(at(400)) == []
    assert book.status("alice").used == 1000  # type: ignore[union-attr]


def test_commands_are_in_the_plans_zone() -> None:
    book = QuotaBook(ZoneInfo("Europe/Berlin"))
    book.set_plan("alice", plan(timezone=None), at(0))
    command = use(book, 2000, at(5))[0]
    assert command.period_start.isoformat() == "2026-11-01T00:00:00+01:00"
    assert command.period_end.isoformat() == "2026-12-01T00:00:00+01:00"  # type: ignore[union-attr]
    assert command.issued_at == at(5)


# ---------------------------------------------------------------------------- packs


def test_packs_are_drawn_soonest_expiry_first_and_carry_over() -> None:
    book = QuotaBook(UTC_TZ)
    packs = (
        pack("forever", 1000),
        pack("b-soon", 100, expires=at(50)),
        pack("a-soon", 100, expires=at(50)),
        pack("sooner", 100, added=at(hours=1), expires=at(45)),  # added last, expires first
    )
    book.set_plan("alice", plan(packs=packs, warn_at=()), at(0))
    use(book, 1250, at(1))
    assert book.status("alice").given == {"sooner": 100, "a-soon": 100, "b-soon": 50}  # type: ignore[union-attr]
    assert book.status("alice").allowance == 2300  # type: ignore[union-attr]
    # December: what was given is gone, the rest carries over
    assert acts(use(book, 1100, at(31))) == []
    status = book.status("alice")
    assert status is not None
    assert status.given == {"sooner": 100, "a-soon": 100, "b-soon": 100, "forever": 50}
    assert (status.drawn, status.allowance) == (100, 1000 + 100 + 950)
    # January, after the packs expired: only the one without expiry is left
    use(book, 1000, at(62))
    assert book.status("alice").allowance == 1950  # type: ignore[union-attr]


def test_a_plan_update_keeps_what_packs_gave() -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(packs=(pack("p", 500),)), at(0))
    use(book, 1300, at(1))
    assert book.set_plan("alice", plan(packs=(pack("p", 500), pack("q", 1))), at(2)) == []
    assert book.status("alice").given == {"p": 300}  # type: ignore[union-attr]
    assert book.status("alice").allowance == 1501  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- state and ids


def scenario(book: QuotaBook) -> list[Command]:
    commands = book.set_plan("alice", plan(packs=(pack("p", 100, expires=at(3)),)), at(0))
    commands += use(book, 900, at(1))
    commands += book.tick(at(3))
    commands += use(book, 300, at(4))
    commands += book.set_plan("alice", plan(quota_bytes=2000), at(5))
    return commands


def test_command_ids_are_deterministic_and_distinct() -> None:
    first, second = scenario(QuotaBook(UTC_TZ)), scenario(QuotaBook(UTC_TZ))
    assert acts(first) == [
        ("warn", "threshold", 0.8), ("disable", "quota"), ("enable", "quota_raised"),
    ]
    assert [c.command_id for c in first] == [c.command_id for c in second]
    assert len({c.command_id for c in first}) == len(first)


def test_each_list_of_users_holds_those_changed_since_it_was_last_taken() -> None:
    """The changed and unreported users are taken at different moments (flush, report):
    taking one list leaves the other as it was, and a user who changes again after a
    list was taken is in its next one."""
    book = QuotaBook(UTC_TZ)
    use(book, 1, at(1), user="ann")
    use(book, 1, at(1), user="bob")
    assert book.take_unreported() == ["ann", "bob"] and book.take_unreported() == []
    use(book, 1, at(1), user="bob")
    assert book.take_unreported() == ["bob"]
    assert book.take_changed() == ["ann", "bob"]  # not taken before: both, once
    use(book, 1, at(1), user="ann")
    assert book.take_changed() == ["ann"] and book.take_unreported() == ["ann"]
    assert book.take_changed() == book.take_unreported() == []


def test_per_user_records_round_trip() -> None:
    book = QuotaBook(UTC_TZ)
    scenario(book)
    use(book, 5, at(6), user="bob")
    changed = book.take_changed()
    assert sorted(changed) == ["alice", "bob"] and book.take_changed() == []
    copy = QuotaBook(UTC_TZ)
    assert {user for user, _ in book.take_history_changed()} >= {"alice"}
    for user in changed:
        copy.load_user(user, orjson.dumps(book.user_state(user)), book.history_records(user))
    assert orjson.loads(copy.to_bytes()) == orjson.loads(book.to_bytes())
    assert book.user_state("carol") is None
    copy.load_user("bob", None)
    assert "bob" not in copy.users
    # the restored book keeps its clock duties
    assert acts(copy.tick(at(30))) == acts(book.tick(at(30))) == []
    assert acts(copy.update([(s(at(31)), [("alice", 2000)])], at(31))) == [
        ("warn", "threshold", 0.8), ("disable", "quota"),
    ]


def test_users_without_plans_hold_no_plan_state_of_their_own() -> None:
    book = QuotaBook(UTC_TZ)
    scenario(book)  # alice: a plan, a pack drawn from, late traffic, a plan update
    for hour in range(3):  # buckets of several hours, then a plan that comes and goes
        use(book, 5, at(6, hours=hour), user="bob")
    bob_plan = plan(user_id="bob", quota_bytes=10)
    assert acts(book.set_plan("bob", bob_plan, at(7))) == [
        ("warn", "threshold", 0.8), ("disable", "quota")]
    assert acts(book.set_plan("bob", None, at(7, hours=1))) == [("enable", "plan_removed")]
    use(book, 5, at(8), user="carol")
    # what users without plans share is never written to
    assert (list(quota_module._NO_HOURS), quota_module._NO_USAGE, quota_module._NO_PACKS) == (
        [], {}, {})
    assert book.users["carol"].hours is quota_module._NO_HOURS  # one hour: the newest only
    assert book.users["bob"].buckets() == {
        s(at(6, hours=h)) // 3600: 5 for h in range(3)}
    for user in ("bob", "carol"):  # the plan's fields are not the user's own
        assert book.users[user].rules is None
        assert sys.getsizeof(book.users[user]) < sys.getsizeof(book.users["alice"])
    assert book.status("bob") is None and book.usage("bob", s(at(0))) is None
    again = QuotaBook.from_bytes(book.to_bytes(), UTC_TZ)
    assert orjson.loads(again.to_bytes()) == orjson.loads(book.to_bytes())


def test_a_tick_touches_only_due_users(monkeypatch: pytest.MonkeyPatch) -> None:
    book = QuotaBook(UTC_TZ)
    for i in range(2000):
        user = f"user-{i}"
        book.set_plan(user, plan(user_id=user, expires_at=at(5) if i < 3 else None), at(0))
    book.take_changed()
    decided: list[str] = []
    real = QuotaBook._decide

    def counting(self: QuotaBook, user_id: str, *args: object) -> list[Command]:
        decided.append(user_id)
        return real(self, user_id, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(QuotaBook, "_decide", counting)
    assert book.tick(at(4)) == []
    assert decided == [] and book.take_changed() == []
    assert len(book.tick(at(5), max_users=2)) == 2
    assert len(book.tick(at(5))) == 1
    assert sorted(decided) == ["user-0", "user-1", "user-2"]


def test_old_buckets_are_forgotten() -> None:
    book = QuotaBook(UTC_TZ, lateness_days=0)
    use(book, 1, at(0), user="bob")
    use(book, 1, at(40), user="bob")
    assert len(book.users["bob"].buckets()) == 1
    use(book, 1, at(40), user="carol")
    book.prune(at(80))
    assert book.users["carol"].buckets() == {}
    assert book.history_s == quota_module.LONGEST_PERIOD_DAYS * DAY
    for hour in range(4):
        use(book, 1, at(100, hours=hour), user="dave")
    book.prune(at(100, hours=2, seconds=book.history_s))  # the history begins at hour 2
    first = s(at(100)) // 3600
    assert book.users["dave"].buckets() == {first + 2: 1, first + 3: 1}
    assert book.users["dave"].first == first + 2


@given(day=st.integers(0, 10**6),
       buckets=st.dictionaries(st.integers(0, 23), st.integers(0, 2**64 - 1)))
def test_a_day_record_holds_the_days_buckets_packed_or_not(
    day: int, buckets: dict[int, int]
) -> None:
    flat = [x for hour, count in sorted(buckets.items()) for x in (day * 24 + hour, count)]
    record = quota_module._day_record(day, flat)
    assert quota_module._history_pairs(record) == flat
    packed = len(buckets) >= quota_module._PACKED_FROM and max(buckets.values()) < 2**63
    assert (len(record) == 201) is packed


def test_an_hour_past_2_to_the_63_bytes_keeps_its_buckets_unpacked() -> None:
    book = QuotaBook(UTC_TZ)
    big = 2**62 + 1
    for hours in (0, 0, 1):  # the first hour ends up over 2**63 - 1 once the second begins
        book.update([(s(at(1, hours=hours)), [("bob", big)])], at(1, hours=hours))
    book.update([(s(at(1)), [("bob", big)])], at(1, hours=1))  # a late reading, unpacked
    bob = book.users["bob"]
    assert isinstance(bob.hours, list)
    assert bob.buckets() == {s(at(1)) // 3600: 3 * big, s(at(1, hours=1)) // 3600: big}
    copy = QuotaBook(UTC_TZ)
    copy.load_user("bob", orjson.dumps(book.user_state("bob")), book.history_records("bob"))
    assert copy.users["bob"].buckets() == bob.buckets()
    # a late reading past 2**63 - 1 in a bucket that was packed
    for hours in (0, 1, 2):
        book.update([(s(at(2, hours=hours)), [("cy", 1)])], at(2, hours=hours))
    book.update([(s(at(2)), [("cy", 2**63)])], at(2, hours=2))
    cy = book.users["cy"]
    assert isinstance(cy.hours, list)
    assert cy.buckets() == {
        s(at(2, hours=h)) // 3600: b for h, b in ((0, 2**63 + 1), (1, 1), (2, 1))
    }


# ---------------------------------------------------------------------------- properties


@given(st.lists(st.tuples(st.integers(0, 40 * 24), st.integers(0, 2**40), st.integers(0, 48),
                          st.booleans()), min_size=1, max_size=40))
def test_hourly_buckets_are_the_reference_sums_in_any_order(
    readings: list[tuple[int, int, int, bool]],
) -> None:
    """Readings of any hours in any order (late ones among them), the clock up to two
    days past each, the history records written now and then as a flush writes them
    (which seals the days they hold): the buckets are the sums by hour since the
    history's start, and they survive the state and history records."""
    book = QuotaBook(UTC_TZ, lateness_days=0)
    expected: dict[int, int] = {}
    store: dict[int, bytes] = {}  # bob's history records by day, as a flush leaves them

    def flush() -> None:
        for user, day in book.take_history_changed():
            record = book.history_bytes(user, day)
            if record is None:
                store.pop(day, None)
            else:
                store[day] = record

    for hour, count, later, flushed in readings:
        observed = s(T0) + hour * 3600 + 7
        now = T0 + timedelta(hours=hour + later)
        book.update([(observed, [("bob", count)])], now)
        expected[observed // 3600] = expected.get(observed // 3600, 0) + count
        oldest = (s(now) - book.history_s) // 3600
        expected = {h: b for h, b in expected.items() if h >= oldest}
        bob = book.users["bob"]
        assert bob.buckets() == expected
        assert bob.first == min(expected, default=quota_module._NEVER)
        if flushed:
            flush()
    state = orjson.dumps(book.user_state("bob"))
    flush()
    copy = QuotaBook(UTC_TZ, lateness_days=0)
    copy.load_user("bob", state, list(store.values()))
    assert copy.users["bob"].buckets() == expected
    assert sorted(store) == sorted(book.users["bob"].days())


THRESHOLDS = [0.1, 0.25, 1 / 3, 0.5, 0.8, 0.9, 0.95, 0.999]


@st.composite
def split_stream(draw: st.DrawFn) -> tuple[int, tuple[float, ...], list[tuple[int, int]],
                                             list[int], set[int], set[int]]:
    quota = draw(st.integers(1, 5000))
    warn_at = tuple(draw(st.sets(st.sampled_from(THRESHOLDS), min_size=1, max_size=4)))
    # (observed offset in seconds since October 25, bytes): October's are a closed period
    readings = draw(st.lists(
        st.tuples(st.integers(0, 25 * DAY), st.integers(0, 2000)), min_size=1, max_size=40,
    ))
    cuts = sorted(draw(st.sets(st.integers(1, len(readings)), max_size=len(readings))))
    restarts = draw(st.sets(st.integers(0, len(readings))))
    per_user = draw(st.sets(st.integers(0, len(readings))))
    return quota, warn_at, readings, cuts, restarts, per_user


def run_batches(
    quota: int, warn_at: tuple[float, ...], readings: list[tuple[int, int]], cuts: list[int],
    restarts: set[int], per_user: set[int],
) -> list[list[Command]]:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(quota_bytes=quota, warn_at=warn_at), at(0))
    origin = s(at(-7))
    out = []
    bounds = [0, *[c for c in cuts if c < len(readings)], len(readings)]
    for index, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if index in restarts:
            book = QuotaBook.from_bytes(book.to_bytes(), UTC_TZ)
        if index in per_user:
            copy = QuotaBook(UTC_TZ)
            copy.load_user("alice", orjson.dumps(book.user_state("alice")),
                           book.history_records("alice"))
            book = copy
        batch = [("alice", origin + t, b) for t, b in readings[lo:hi]]
        out.append(book.update(grouped(batch), at(20, seconds=index)))
    return out


@settings(max_examples=300, deadline=None)
@given(split_stream())
def test_thresholds_are_warned_exactly_once_under_any_split_and_restart(
    case: tuple[int, tuple[float, ...], list[tuple[int, int]], list[int], set[int], set[int]],
) -> None:
    quota, warn_at, readings, cuts, restarts, per_user = case
    batches = run_batches(quota, warn_at, readings, cuts, restarts, per_user)
    # reference: November's running usage after each batch, thresholds in exact fractions
    november = s(T0)
    bounds = [0, *[c for c in cuts if c < len(readings)], len(readings)]
    used = 0
    warned: set[float] = set()
    disabled = False
    for (lo, hi), commands in zip(itertools.pairwise(bounds), batches, strict=True):
        used += sum(b for t, b in readings[lo:hi] if s(at(-7)) + t >= november)
        expected: list[tuple[str, str] | tuple[str, str, float]] = []
        for w in sorted(warn_at):
            if w not in warned and used >= Decimal(repr(w)) * quota:
                warned.add(w)
                expected.append(("warn", "threshold", w))
        if used >= quota and not disabled:
            disabled = True
            expected.append(("disable", "quota"))
        assert acts(commands) == expected
        assert all(c.used_bytes == used for c in commands)
    # the same commands, with the same ids, as in one batch without restarts
    whole = run_batches(quota, warn_at, readings, [], set(), set())
    assert [c.command_id for b in batches for c in b] == [c.command_id for b in whole for c in b]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30 * DAY - 1), st.integers(0, 3000)), max_size=20),
    st.lists(st.integers(1, 20), max_size=5),
)
def test_late_traffic_of_a_closed_period_never_issues_a_command(
    late: list[tuple[int, int]], sizes: list[int]
) -> None:
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(warn_at=(0.5, 0.8)), at(0))
    use(book, 10, at(29))
    book.tick(at(30))
    before = book.usage("alice", s(T0))
    assert before == 10
    position = 0
    for size in [*sizes, len(late)]:
        batch = [("alice", s(T0) + t, b) for t, b in late[position:position + size]]
        position += size
        assert book.update(grouped(batch), at(30, 1)) == []
    assert book.usage("alice", s(T0)) == 10 + sum(b for _, b in late)
    assert book.status("alice").used == 0  # type: ignore[union-attr]


class ReferencePacks:
    """Packs by the issue's words: per period, usage above quota_bytes is covered from the
    packs valid at the moment, the one expiring first first; given bytes are gone."""

    def __init__(self, quota: int, packs: list[Pack]) -> None:
        self.quota = quota
        self.packs = packs
        self.given: dict[str, int] = {}
        self.usage: dict[int, int] = {}
        self.period = -1
        self.drawn = 0
        self.over = False

    def valid(self, now: int) -> list[Pack]:
        def key(p: Pack) -> tuple[int, int, int, str]:
            expires = p.expires_at
            return (expires is None, 0 if expires is None else s(expires), s(p.added_at),
                    p.pack_id)
        return sorted(
            (p for p in self.packs
             if s(p.added_at) <= now and (p.expires_at is None or now < s(p.expires_at))),
            key=key,
        )

    def step(self, now: int, readings: list[tuple[int, int]]) -> None:
        for t, b in readings:
            start = T0_S + (t - T0_S) // WEEK * WEEK
            self.usage[start] = self.usage.get(start, 0) + b
        period = T0_S + (now - T0_S) // WEEK * WEEK
        if period != self.period:
            self.period, self.drawn = period, 0
        used = self.usage.get(period, 0)
        for p in self.valid(now):
            missing = used - self.quota - self.drawn
            if missing <= 0:
                break
            take = min(p.bytes - self.given.get(p.pack_id, 0), missing)
            if take > 0:
                self.given[p.pack_id] = self.given.get(p.pack_id, 0) + take
                self.drawn += take
        left = sum(p.bytes - self.given.get(p.pack_id, 0) for p in self.valid(now))
        self.allowance = self.quota + self.drawn + left
        self.used = used
        self.over = used >= self.allowance


T0_S = s(T0)
WEEK = 7 * DAY


@st.composite
def pack_cases(draw: st.DrawFn) -> tuple[int, list[Pack], list[tuple[int, list[int]]]]:
    quota = draw(st.integers(1, 3000))
    packs = []
    for i in range(draw(st.integers(0, 4))):
        added = at(hours=draw(st.integers(-100, 300)))
        life = draw(st.none() | st.integers(1, 400))
        packs.append(pack(f"p{draw(st.integers(0, 9))}{i}", draw(st.integers(1, 2000)), added,
                          None if life is None else added + timedelta(hours=life)))
    # steps: hours since the last step, and bytes observed up to 30 hours before now
    steps = draw(st.lists(
        st.tuples(st.integers(0, 48), st.lists(st.integers(0, 1500), max_size=3)),
        min_size=1, max_size=30,
    ))
    return quota, packs, steps


@settings(max_examples=300, deadline=None)
@given(pack_cases(), st.data())
def test_packs_follow_the_reference_order_expiry_and_carry_over(
    case: tuple[int, list[Pack], list[tuple[int, list[int]]]], data: st.DataObject
) -> None:
    quota, packs, steps = case
    weekly = EveryDays(kind="every_days", days=7, anchor=T0)
    book = QuotaBook(UTC_TZ)
    book.set_plan("alice", plan(quota_bytes=quota, period=weekly, packs=tuple(packs),
                                warn_at=()), T0)
    reference = ReferencePacks(quota, packs)
    reference.step(T0_S, [])
    now = T0_S
    for hours, counts in steps:
        now += hours * 3600
        readings = [(now - data.draw(st.integers(0, 30 * 3600)), b) for b in counts]
        was_over = reference.over
        moment = datetime.fromtimestamp(now, UTC)
        if readings:
            commands = book.update([(t, [("alice", b)]) for t, b in readings], moment)
        else:
            commands = book.tick(moment)
        reference.step(now, readings)
        status = book.status("alice")
        assert status is not None
        assert status.given == {k: v for k, v in reference.given.items() if v}
        assert (status.used, status.allowance) == (reference.used, reference.allowance)
        assert ("quota" in status.disabled) == reference.over
        # the quota states the worker reports say what status() says
        assert book.state_rows(["alice"]) == [(
            "alice", datetime.fromtimestamp(status.period_start, UTC).isoformat(), status.used,
            status.allowance, "disabled" if status.disabled else "enabled",
        )]
        if reference.over == was_over:
            assert commands == []
        elif reference.over:
            assert acts(commands) == [("disable", "quota")]
        else:
            assert len(commands) == 1 and commands[0].action == "enable"
            assert commands[0].reason in ("period_reset", "pack")
