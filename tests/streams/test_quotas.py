"""The worker's quota step without Faust: the store, reconciling plans, unsent commands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from quotaflow.core.plans import CalendarMonth, Command, Plan, QuotaBatch
from quotaflow.core.settings import Settings
from quotaflow.streams.quotas import DictStore, QuotaKeeper, state_key

NOW = datetime(2026, 11, 24, 10, tzinfo=UTC)


def plan(user: str, quota: int | None = 1000, **fields: object) -> Plan:
    return Plan(user_id=user, quota_bytes=quota, period=CalendarMonth(kind="calendar_month"),
                **{"enabled": True, **fields})  # type: ignore[arg-type]


def acts(commands: list[Command]) -> list[tuple[str, str, str]]:
    return [(c.user_id, c.action, c.reason) for c in commands]


def test_a_plan_that_changed_or_went_while_nobody_owned_the_partition_is_applied_at_load() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(2, {}, NOW)
    keeper.set_plans(2, [("ann", plan("ann")), ("ben", plan("ben", enabled=False))], NOW)
    for c in keeper.unsent.get((2, "ben"), []):
        keeper.sent(2, c)
    # while no worker owned partition 2: ann's plan switched her off, ben's plan was deleted
    later = QuotaKeeper(Settings(), store)
    decided = later.load(2, {"ann": plan("ann", enabled=False)}, NOW + timedelta(hours=1))
    assert acts(decided.commands) == [
        ("ben", "enable", "plan_removed"), ("ann", "disable", "operator"),
    ]
    assert decided.states is not None
    assert [row[0] for row in QuotaBatch.decode(decided.states).states] == ["ann"]


def test_an_unchanged_plan_is_not_applied_again() -> None:
    keeper = QuotaKeeper(Settings(), DictStore())
    keeper.load(0, {}, NOW)
    keeper.set_plans(0, [("ann", plan("ann"))], NOW)
    assert keeper.set_plans(0, [("ann", plan("ann"))], NOW).states is None


def test_unsent_commands_are_kept_in_order_until_kafka_has_them() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(1, {}, NOW)
    keeper.set_plans(1, [("cat", plan("cat"))], NOW)
    first = keeper.update(1, [("cat", int(NOW.timestamp()), 900)], NOW).commands
    second = keeper.update(1, [("cat", int(NOW.timestamp()), 200)], NOW).commands
    assert acts(first + second) == [("cat", "warn", "threshold"), ("cat", "disable", "quota")]
    key = state_key(1, "cat") + b"\x1fc"
    assert [Command.decode(c) for c in orjson.loads(store.data[key])] == first + second
    keeper.sent(1, first[0])
    assert [Command.decode(c) for c in orjson.loads(store.data[key])] == second
    resent = QuotaKeeper(Settings(), store).load(1, {"cat": plan("cat")}, NOW).commands
    assert resent == second  # the same id: consumers deduplicate
    keeper.sent(1, second[0])
    assert key not in store.data


def test_a_batch_writes_a_small_state_record_and_the_history_about_once_an_hour() -> None:
    store = DictStore()
    keeper = QuotaKeeper(Settings(), store)
    keeper.load(3, {}, NOW)
    keeper.set_plans(3, [("dan", plan("dan", 10**15))], NOW)
    writes: list[bytes] = []
    real_put = store.put

    def put(partition: int, key: bytes, value: bytes | None) -> None:
        writes.append(key)
        real_put(partition, key, value)

    store.put = put  # type: ignore[method-assign]
    start = int(NOW.timestamp()) - 20 * 86400
    for minute in range(20 * 24 * 60):  # twenty days, a reading a minute
        keeper.update(3, [("dan", start + 60 * minute, 1000)], NOW)
    history = [k for k in writes if k.endswith(b"\x1fh")]
    assert len(history) == 20 * 24 - 1  # once per hour that became history
    assert len(store.data[state_key(3, "dan")]) < 1000
    assert len(store.data[state_key(3, "dan") + b"\x1fh"]) > 5000
