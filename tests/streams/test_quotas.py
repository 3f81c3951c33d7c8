"""The worker's quota step without Faust: the journal, flushes, plans at load, unsent commands.

A crash is a copy of the store taken at some moment (what had reached Kafka)
given to a new keeper, which then sees the messages after the committed offset
again, as the worker would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.core.plans import CalendarMonth, Command, Plan, QuotaBatch
from quotaflow.core.settings import Settings
from quotaflow.streams.quotas import (
    JOURNAL_SLOTS,
    STATE_PAGES,
    DictStore,
    QuotaKeeper,
    day_key,
    journal_key,
    page_key,
    page_of,
    state_key,
)

NOW = datetime(2026, 11, 24, 10, tzinfo=UTC)
T = int(NOW.timestamp())


def plan(user: str, quota: int | None = 1000, **fields: object) -> Plan:
    return Plan(user_id=user, quota_bytes=quota, period=CalendarMonth(kind="calendar_month"),
                **{"enabled": True, **fields})  # type: ignore[arg-type]


def acts(commands: list[Command]) -> list[tuple[str, str, str]]:
    return [(c.user_id, c.action, c.reason) for c in commands]


def copy(store: DictStore) -> DictStore:
    crashed = DictStore()
    crashed.data = dict(store.data)
    return crashed


def record_writes(store: DictStore) -> list[bytes]:
    """The keys `store` is written under from now on, in order."""
    writes: list[bytes] = []
    real_put = store.put

    def put(partition: int, key: bytes, value: bytes | None) -> None:
        writes.append(key)
        real_put(partition, key, value)

    store.put = put  # type: ignore[method-assign]
    return writes


def crashes_during(
    store: DictStore, act: Callable[[], object]
) -> tuple[list[bytes], list[DictStore]]:
    """Run `act`, which writes to `store`: the keys it wrote, in order, and the store a
    crash part-way through those writes leaves, for each number of them that reached
    Kafka (none, the first, the first two, ..., all)."""
    before = dict(store.data)
    writes: list[tuple[bytes, bytes | None]] = []
    real_put = store.put

    def put(partition: int, key: bytes, value: bytes | None) -> None:
        writes.append((key, value))
        real_put(partition, key, value)

    store.put = put  # type: ignore[method-assign]
    act()
    store.put = real_put  # type: ignore[method-assign]
    crashes = []
    for landed in range(len(writes) + 1):
        crashed = DictStore()
        crashed.data = dict(before)
        for key, value in writes[:landed]:
            crashed.put(0, key, value)  # a `DictStore` keeps every partition's keys alike
        crashes.append(crashed)
    return [key for key, _ in writes], crashes


def test_a_plan_that_changed_or_went_while_nobody_owned_the_partition_is_applied_at_load() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(2, {}, NOW)
    keeper.set_plans(2, [("ann", plan("ann")), ("ben", plan("ben", enabled=False))], NOW)
    for c in keeper.unsent.get((2, "ben"), []):
        keeper.sent(2, c)
    keeper.flush(2)
    # while no worker owned partition 2: ann's plan switched her off, ben's plan was deleted
    later = QuotaKeeper(Settings(), store)
    decided = later.load(2, {"ann": plan("ann", enabled=False)}, NOW + timedelta(hours=1))
    assert acts(decided.commands) == [
        ("ben", "enable", "plan_removed"), ("ann", "disable", "operator"),
    ]
    states = later.report(2)
    assert states is not None
    assert [row[0] for row in QuotaBatch.decode(states).states] == ["ann"]


def test_an_unchanged_plan_is_not_applied_again() -> None:
    keeper = QuotaKeeper(Settings(), DictStore())
    keeper.load(0, {}, NOW)
    keeper.set_plans(0, [("ann", plan("ann"))], NOW)
    keeper.report(0)
    keeper.set_plans(0, [("ann", plan("ann"))], NOW)
    assert keeper.report(0) is None


def test_a_user_who_got_a_command_is_reported_before_the_others() -> None:
    """Between full reports, a report holds only the users who got a command since
    the last one; a full report holds every user that changed, those among them."""
    keeper = QuotaKeeper(Settings(), DictStore())
    keeper.load(0, {}, NOW)
    keeper.set_plans(0, [("ann", plan("ann")), ("ben", plan("ben"))], NOW)
    keeper.report(0)
    keeper.update(0, 0, T, [("ann", 5000), ("ben", 10)], NOW)  # ann is disabled

    def users(states: bytes | None) -> list[str]:
        return [] if states is None else [row[0] for row in QuotaBatch.decode(states).states]

    assert users(keeper.report(0, everyone=False)) == ["ann"]
    assert users(keeper.report(0, everyone=False)) == []
    assert users(keeper.report(0)) == ["ann", "ben"]
    assert users(keeper.report(0)) == []


def test_unsent_commands_are_kept_in_order_until_kafka_has_them() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(1, {}, NOW)
    keeper.set_plans(1, [("cat", plan("cat"))], NOW)
    first = keeper.update(1, 0, T, [("cat", 900)], NOW).commands
    second = keeper.update(1, 1, T, [("cat", 200)], NOW).commands
    assert acts(first + second) == [("cat", "warn", "threshold"), ("cat", "disable", "quota")]
    key = state_key(1, "cat") + b"\x1fc"
    assert [Command.decode(c) for c in orjson.loads(store.data[key])] == first + second
    keeper.sent(1, first[0])
    assert [Command.decode(c) for c in orjson.loads(store.data[key])] == second
    resent = QuotaKeeper(Settings(), copy(store)).load(1, {"cat": plan("cat")}, NOW).commands
    assert resent == second  # the same id: consumers deduplicate
    keeper.sent(1, second[0])
    assert key not in store.data


def test_between_flushes_a_message_writes_one_journal_record_and_no_state() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(3, {}, NOW)
    keeper.flush(3)
    before = set(store.data)
    for offset in range(10):
        keeper.update(3, offset, T, [(f"u{i}", 5) for i in range(100)], NOW)
    assert set(store.data) - before == {journal_key(3, o) for o in range(10)}
    keeper.flush(3)
    assert set(store.data) - before == (
        {journal_key(3, o) for o in range(10)} | {page_key(3, page_of(f"u{i}")) for i in range(100)}
    )
    assert not keeper.must_flush(3)
    for offset in range(10, 10 + JOURNAL_SLOTS // 2):
        keeper.update(3, offset, T, [("u0", 1)], NOW)
    assert keeper.must_flush(3)


def test_journal_records_of_the_earlier_shape_are_replayed_as_the_current_ones() -> None:
    """Changelogs of running deployments hold `[offset, [[user, observed_at, bytes], ...]]`
    records: a worker that loads them counts what one loading the current shape does."""
    readings = [[("ann", 700), ("ben", 200)], [("ann", 400)], [("ben", 900), ("cy", 5)]]
    plans = {u: plan(u, 1000, warn_at=(0.5,)) for u in ("ann", "ben", "cy")}
    written = DictStore()
    keeper = QuotaKeeper(Settings(), written)
    keeper.load(1, plans, NOW)
    keeper.flush(1)
    for offset, pairs in enumerate(readings):
        keeper.update(1, offset, T + offset, pairs, NOW)
    earlier = copy(written)
    for offset, pairs in enumerate(readings):
        key = journal_key(1, offset)
        assert orjson.loads(written.data[key]) == [offset, T + offset, [list(p) for p in pairs]]
        earlier.data[key] = orjson.dumps([offset, [[u, T + offset, b] for u, b in pairs]])
    current, old = QuotaKeeper(Settings(), written), QuotaKeeper(Settings(), earlier)
    replayed = current.load(1, plans, NOW).commands
    assert acts(replayed) == [
        ("ann", "warn", "threshold"), ("ann", "disable", "quota"), ("ben", "warn", "threshold"),
        ("ben", "disable", "quota"),
    ]
    assert [c.command_id for c in old.load(1, plans, NOW).commands] == [
        c.command_id for c in replayed
    ]
    for user, used in (("ann", 1100), ("ben", 1100), ("cy", 5)):
        got, want = old.books[1].status(user), current.books[1].status(user)
        assert got is not None and want is not None and got.used == want.used == used
    old.flush(1)
    current.flush(1)
    assert {k: v for k, v in earlier.data.items() if b"\x1fj\x1f" not in k} == {
        k: v for k, v in written.data.items() if b"\x1fj\x1f" not in k
    }


def test_a_users_history_is_written_about_once_an_hour() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(3, {}, NOW)
    keeper.set_plans(3, [("dan", plan("dan", 10**15))], NOW)
    writes = record_writes(store)
    start = T - 20 * 86400
    for minute in range(20 * 24 * 60):  # twenty days, a reading a minute, a flush each
        keeper.update(3, minute, start + 60 * minute, [("dan", 1000)], NOW)
        keeper.flush(3)
    days = state_key(3, "dan", b"d")
    history = [k for k in writes if k.startswith(days)]
    assert len(history) == 20 * 24 - 1  # once per hour that became history
    assert history[-1] == day_key(3, "dan", (T - 3600) // 86400)  # only the hour's day
    assert len(store.data[page_key(3, page_of("dan"))]) < 1000
    records = [v for k, v in store.data.items() if k.startswith(days)]
    assert len(records) == 21  # twenty days from 10:00 UTC touch 21 UTC days
    assert max(map(len, records)) <= 201  # packed: 24 hours at most


def hourly(keeper: QuotaKeeper, hours: range, start: int) -> None:
    """A reading of dan's an hour, then a flush, for each hour in `hours` from `start`."""
    for hour in hours:
        t = start + 3600 * hour
        keeper.update(3, hour, t + 60, [("dan", 1000 + hour)], datetime.fromtimestamp(t, UTC))
        keeper.flush(3)


def test_day_records_older_than_the_history_are_deleted_and_load_back() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(3, {}, NOW)
    start = T - 40 * 86400
    hourly(keeper, range(40 * 24), start)
    dan = keeper.books[3].users["dan"]
    days = sorted(int(k.rsplit(b"\x1fd", 1)[1]) for k in store.data
                  if k.startswith(state_key(3, "dan", b"d")))
    assert days == sorted(dan.days()) and len(days) == 36  # a window of 35 days and an hour
    assert min(days) == dan.first // 24 > start // 86400
    again = QuotaKeeper(Settings(), copy(store))
    again.load(3, {}, NOW)
    assert again.books[3].users["dan"].buckets() == dan.buckets()


def test_a_crash_part_way_through_storing_commands_loses_none_and_sends_each_once() -> None:
    """A message that makes dan's plan warn and disable writes its journal record,
    dan's unsent commands and dan's state; whatever prefix of those reached Kafka,
    the worker that loads the partition and sees the message again sends both
    commands, once each, with the ids they were first given."""
    plans = {"dan": plan("dan", 1000, warn_at=(0.5,))}
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(3, plans, NOW)
    keeper.update(3, 0, T, [("dan", 400)], NOW)
    keeper.flush(3)
    issued: list[Command] = []
    writes, crashes = crashes_during(
        store, lambda: issued.extend(keeper.update(3, 1, T, [("dan", 700)], NOW).commands))
    assert acts(issued) == [("dan", "warn", "threshold"), ("dan", "disable", "quota")]
    assert len(writes) == 3
    for crashed in crashes:
        again = QuotaKeeper(Settings(), crashed)
        sent = again.load(3, plans, NOW).commands
        sent += again.update(3, 1, T, [("dan", 700)], NOW).commands
        assert [c.command_id for c in sent] == [c.command_id for c in issued]


def test_a_crash_part_way_through_a_flush_keeps_every_hourly_bucket_exact() -> None:
    """A flush that crosses an hour and holds a late reading for an hour of the day
    before, whose record the flush before wrote; whatever prefix of its writes
    reached Kafka, the buckets come out as without a crash, once the messages after
    the last complete flush are seen again."""
    midnight = T // 86400 * 86400
    minutes = [-110, -50, 10,  # flushed: the day before's record holds 22:00 and 23:00
               20, -80, 65,  # a late reading for 22:00, then 01:00: the flush cut short
               90, 130]
    messages = [(o, midnight + 60 * m, 100 + o) for o, m in enumerate(minutes)]
    truth = QuotaKeeper(Settings(), DictStore())
    truth.load(3, {}, NOW)
    for offset, t, count in messages:
        truth.update(3, offset, t, [("dan", count)], NOW)
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(3, {}, NOW)
    for offset, t, count in messages[:3]:
        keeper.update(3, offset, t, [("dan", count)], NOW)
    keeper.flush(3)
    assert day_key(3, "dan", midnight // 86400 - 1) in store.data
    for offset, t, count in messages[3:6]:
        keeper.update(3, offset, t, [("dan", count)], NOW)
    writes, crashes = crashes_during(store, lambda: keeper.flush(3))
    assert any(b"\x1fp\x1f" in k for k in writes)
    assert day_key(3, "dan", midnight // 86400 - 1) in writes
    for crashed in crashes:
        again = QuotaKeeper(Settings(), crashed)
        again.load(3, {}, NOW)
        for offset, t, count in messages[3:]:
            again.update(3, offset, t, [("dan", count)], NOW)
        assert again.books[3].users["dan"].buckets() == truth.books[3].users["dan"].buckets()


def test_a_whole_history_record_of_earlier_versions_loads_and_is_split_into_days() -> None:
    """Earlier versions kept a user's older buckets in one record, rewritten whole every
    hour: it loads, and the next flush writes it as day records and deletes it."""
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(3, {}, NOW)
    hourly(keeper, range(3 * 24), T - 3 * 86400)
    earlier = copy(store)
    days = [k for k in earlier.data if k.startswith(state_key(3, "dan", b"d"))]
    older = [x for k in sorted(days) for x in keeper.books[3].users["dan"].day(
        int(k.rsplit(b"\x1fd", 1)[1]))]
    for key in days:
        del earlier.data[key]
    earlier.data[state_key(3, "dan", b"h")] = orjson.dumps(older)
    later = QuotaKeeper(Settings(), earlier)
    later.load(3, {}, NOW)
    assert later.books[3].users["dan"].buckets() == keeper.books[3].users["dan"].buckets()
    later.flush(3)
    assert earlier.data == store.data


def test_a_flush_writes_a_record_per_page_with_a_changed_user_not_one_per_user() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(0, {}, NOW)
    users = [f"user-{i}" for i in range(5 * STATE_PAGES)]
    keeper.update(0, 0, T, [(u, 7) for u in users], NOW)
    writes = record_writes(store)
    keeper.flush(0)
    pages = {page_of(u) for u in users}
    assert sorted(writes) == sorted(page_key(0, p) for p in pages)
    keeper.update(0, 1, T, [("user-3", 1)], NOW)
    del writes[:]
    keeper.flush(0)
    assert writes == [page_key(0, page_of("user-3"))]  # its page only
    paged = orjson.loads(store.data[page_key(0, page_of("user-3"))])
    assert paged["user-3"]["k"] == 1  # the last message its state holds
    again = QuotaKeeper(Settings(), copy(store))
    again.load(0, {}, NOW)
    assert again.books[0].users.keys() == keeper.books[0].users.keys()


def test_per_user_state_records_of_earlier_versions_load_and_move_into_pages() -> None:
    """Changelogs written before pages hold a state record per user under `state_key`:
    they load as they did, and the next flush writes those users into their pages and
    deletes the per-user records."""
    plans = {u: plan(u, 1000, warn_at=(0.5,)) for u in ("ann", "ben", "cy")}
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(1, plans, NOW)
    for command in keeper.update(1, 0, T, [("ann", 700), ("ben", 200)], NOW).commands:
        keeper.sent(1, command)
    keeper.flush(1)
    earlier = copy(store)  # the same states, one record per user
    for key in [k for k in earlier.data if b"\x1fp\x1f" in k]:
        for user, state in orjson.loads(earlier.data.pop(key)).items():
            earlier.data[state_key(1, user)] = orjson.dumps(state)
    for later_store in (store, earlier):
        later = QuotaKeeper(Settings(), later_store)
        assert later.load(1, plans, NOW).commands == []
        for user in ("ann", "ben", "cy"):
            got, want = later.books[1].status(user), keeper.books[1].status(user)
            assert got == want
        later.flush(1)
    assert not {state_key(1, u) for u in ("ann", "ben", "cy")} & set(earlier.data)
    assert earlier.data == store.data
    # a per-user record left beside a newer page (a crash before it was deleted) loses
    stale = orjson.loads(earlier.data[page_key(1, page_of("ann"))])["ann"]
    earlier.data[state_key(1, "ann")] = orjson.dumps({**stale, "u": 1})
    again = QuotaKeeper(Settings(), earlier)
    again.load(1, plans, NOW)
    assert again.books[1].status("ann") == keeper.books[1].status("ann")


@settings(max_examples=60, deadline=None)
@given(
    amounts=st.lists(st.lists(st.tuples(st.sampled_from(["ann", "ben", "cy"]),
                                        st.integers(0, 400)), max_size=4),
                     min_size=1, max_size=20),
    flushes=st.sets(st.integers(0, 20)),
    crash_at=st.integers(0, 20),
    committed=st.integers(0, 20),
    checkpointed=st.integers(0, 21),
)
def test_a_crash_anywhere_neither_loses_nor_doubles_usage_and_keeps_command_ids(
    amounts: list[list[tuple[str, int]]], flushes: set[int], crash_at: int, committed: int,
    checkpointed: int,
) -> None:
    """Messages 0..n-1 are billed; the store is copied after message `crash_at` (what
    reached Kafka); offsets below `committed` are not seen again; the messages below
    `checkpointed` are in the ledger records that landed (a checkpoint, at or above the
    committed offset) and bill nothing when seen again, the later ones bill again."""
    crash_at = min(crash_at, len(amounts) - 1)
    committed = min(committed, crash_at + 1)
    checkpointed = min(max(checkpointed, committed), crash_at + 1)
    plans = {u: plan(u, 1500, warn_at=(0.5,)) for u in ("ann", "ben", "cy")}

    def run(keeper: QuotaKeeper, offsets: range, billed: set[int]) -> list[Command]:
        out: list[Command] = []
        for offset in offsets:
            if offset in billed:
                continue  # its ledger record says it was billed: no readings
            readings = [(u, b) for u, b in amounts[offset] if b]
            if readings:
                out += keeper.update(1, offset, T, readings, NOW).commands
            if offset in flushes:
                keeper.flush(1)
        return out

    truth = QuotaKeeper(Settings(), DictStore())
    truth.load(1, plans, NOW)
    expected = run(truth, range(len(amounts)), set())

    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(1, plans, NOW)
    before = run(keeper, range(crash_at + 1), set())
    crashed = copy(store)  # every journal record is in; ledger records up to the checkpoint
    again = QuotaKeeper(Settings(), crashed)
    after = again.load(1, plans, NOW).commands
    billed = set(range(checkpointed))
    after += run(again, range(committed, len(amounts)), billed)
    for user in ("ann", "ben", "cy"):
        got, want = again.books[1].status(user), truth.books[1].status(user)
        assert got is not None and want is not None and got.used == want.used
    # every change is announced with the id the uncrashed run gave it
    assert {c.command_id for c in itertools.chain(before, after)} == {
        c.command_id for c in expected
    }
