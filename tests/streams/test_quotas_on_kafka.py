"""Quota decisions of the real worker on real Kafka: plans in, commands on `.control` out."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from quotaflow.core.contracts import DeadLetter
from quotaflow.core.partitioning import partition_of
from quotaflow.core.plans import CalendarMonth, Command, EveryDays, NodeRates, Pack, Plan, Rate
from quotaflow.core.settings import Settings

pytestmark = pytest.mark.integration

EPOCH = 1_761_000_000_000


class Fleet:
    """Publishes plans, node rates and cumulative reports, and reads the commands back."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        self.seq: dict[str, int] = {}
        self.counters: dict[tuple[str, str], tuple[int, int]] = {}
        self.commands: list[Command] = []
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
        )
        tps = [TopicPartition(self.topics.control, p) for p in range(settings.partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning()

    def close(self) -> None:
        self.producer.close()
        self.consumer.close()

    def plan(self, plan: Plan | None, user_id: str | None = None) -> None:
        user = user_id or (plan.user_id if plan else "")
        self.producer.send(
            self.topics.plans, key=user.encode(), value=None if plan is None else plan.encode(),
            partition=partition_of(user, self.settings.partitions),
        ).get(10)

    def rates(self, rates: NodeRates) -> None:
        self.producer.send(
            self.topics.nodes, key=rates.node_id.encode(), value=rates.encode(),
            partition=partition_of(rates.node_id, self.settings.partitions),
        ).get(10)

    def use(self, node: str, user: str, up: int, down: int) -> None:
        """The node reports that `user` moved `up` and `down` more bytes, observed now."""
        before = self.counters.get((node, user), (0, 0))
        self.counters[node, user] = now = (before[0] + up, before[1] + down)
        seq = self.seq[node] = self.seq.get(node, 0) + 1
        report = {
            "node_id": node, "epoch": EPOCH, "seq": seq,
            "observed_at": datetime.now(UTC).isoformat(),
            "counters": [{"user_id": user, "up": now[0], "down": now[1]}],
        }
        self.producer.send(
            self.topics.raw, value=orjson.dumps(report),
            partition=partition_of(user, self.settings.partitions),
        ).get(10)

    def read(self) -> list[Command]:
        for records in self.consumer.poll(timeout_ms=200).values():
            self.commands += [Command.decode(r.value) for r in records]
        return self.commands

    def of(self, user: str) -> list[tuple[str, str]]:
        return [(c.action, c.reason) for c in self.read() if c.user_id == user]

    def wait_for(self, what: Callable[[], bool], timeout_s: float = 60.0) -> float:
        """Seconds until `what()` holds; fails with the commands seen if it never does."""
        start = time.monotonic()
        while not what():
            if time.monotonic() - start > timeout_s:
                pytest.fail(f"timed out; commands: {[c.encode() for c in self.read()]}")
            time.sleep(0.1)
        return time.monotonic() - start


@pytest.fixture
def fleet(settings: Settings) -> Iterator[Fleet]:
    from quotaflow.admin import ensure_topics

    ensure_topics(settings)
    fleet = Fleet(settings)
    try:
        yield fleet
    finally:
        fleet.close()


def monthly(user: str, quota: int | None, **fields: Any) -> Plan:
    base: dict[str, Any] = {"enabled": True, "period": CalendarMonth(kind="calendar_month")}
    return Plan(user_id=user, quota_bytes=quota, **{**base, **fields})


def test_warn_disable_pack_operator_and_rates(fleet: Fleet, pipeline: Any) -> None:
    # bad plan records are dead-lettered and change nothing
    partition = partition_of("wanda", fleet.settings.partitions)
    for bad in (b'{"user_id": "wanda", "quota_bytes": 0}', monthly("other", 5).encode()):
        fleet.producer.send(fleet.topics.plans, key=b"wanda", value=bad,
                            partition=partition).get(10)
    # a plan published a moment before the burst is in force for it
    fleet.plan(monthly("wanda", 1000))
    fleet.use("node-a", "wanda", 400, 450)  # 85%
    fleet.wait_for(lambda: fleet.of("wanda") == [("warn", "threshold")])
    fleet.use("node-a", "wanda", 100, 60)  # 101%
    fleet.wait_for(lambda: fleet.of("wanda") == [("warn", "threshold"), ("disable", "quota")])
    [warn, disable] = [c for c in fleet.read() if c.user_id == "wanda"]
    assert (warn.threshold, warn.used_bytes, warn.allowance_bytes) == (0.8, 850, 1000)
    assert (disable.used_bytes, disable.allowance_bytes, disable.threshold) == (1010, 1000, None)

    # a pack bought while disabled enables at once, without traffic
    now = datetime.now(UTC)
    fleet.plan(monthly("wanda", 1000, packs=(Pack(pack_id="p1", bytes=500, added_at=now),)))
    fleet.wait_for(lambda: ("enable", "pack") in fleet.of("wanda"), timeout_s=10)

    # the operator's switch
    fleet.plan(monthly("oscar", 10**9))
    fleet.plan(monthly("oscar", 10**9, enabled=False))
    fleet.wait_for(lambda: fleet.of("oscar") == [("disable", "operator")], timeout_s=10)
    fleet.plan(monthly("oscar", 10**9))
    fleet.wait_for(lambda: fleet.of("oscar") == [("disable", "operator"), ("enable", "operator")],
                   timeout_s=10)

    # a node sold at x2: the quota counts billed bytes
    fleet.rates(NodeRates(node_id="node-x2", rates=(Rate(from_=now - timedelta(days=1),
                                                         rate="2"),)))
    fleet.plan(monthly("rita", 1000, warn_at=()))
    fleet.use("node-x2", "rita", 300, 200)  # 500 raw, 1000 billed
    fleet.wait_for(lambda: fleet.of("rita") == [("disable", "quota")])
    assert [c.used_bytes for c in fleet.read() if c.user_id == "rita"] == [1000]

    # each change was announced once, with its own id
    time.sleep(3)
    ids = [c.command_id for c in fleet.read()]
    assert len(ids) == len(set(ids)) == 6
    dead = KafkaConsumer(
        fleet.topics.dead, bootstrap_servers=fleet.settings.kafka_bootstrap,
        auto_offset_reset="earliest", consumer_timeout_ms=3000,
    )
    letters = [DeadLetter.decode(r.value) for r in dead]
    dead.close()
    assert sorted((d.topic, d.partition, d.detail[:40]) for d in letters) == [
        (fleet.topics.plans, partition, "keyed 'wanda' but holds the plan of 'oth"),
        (fleet.topics.plans, partition, "quota_bytes: Value error, must be positi"),
    ]


def test_the_clock_resets_periods_and_expires_plans(fleet: Fleet, pipeline: Any) -> None:
    boundary = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=25)
    fleet.plan(Plan(user_id="rolf", quota_bytes=1000, enabled=True, warn_at=(),
                    period=EveryDays(kind="every_days", days=1, anchor=boundary)))
    fleet.use("node-a", "rolf", 1000, 500)
    fleet.wait_for(lambda: fleet.of("rolf") == [("disable", "quota")])
    fleet.plan(monthly("ellen", None, expires_at=boundary))
    # neither sends traffic again: the clock decides
    fleet.wait_for(lambda: len(fleet.of("rolf")) == 2 and len(fleet.of("ellen")) == 1)
    seen = datetime.now(UTC)
    assert fleet.of("rolf")[1] == ("enable", "period_reset")
    assert fleet.of("ellen") == [("disable", "expired")]
    for user in ("rolf", "ellen"):
        command = [c for c in fleet.read() if c.user_id == user][-1]
        late = (command.issued_at - boundary).total_seconds()
        assert 0 <= late < 5, f"{user}: decided {late:.1f}s after the boundary"
    assert seen - boundary < timedelta(seconds=10)


def test_a_killed_worker_announces_no_change_twice_with_a_new_id(
    fleet: Fleet, pipeline: Any
) -> None:
    users = [f"kim-{i}" for i in range(60)]
    for user in users:
        fleet.plan(monthly(user, 10_000, warn_at=(0.5, 0.8)))
    for step in range(12):
        for user in users:
            fleet.use("node-k", user, 500, 500)  # 1,000 more bytes each step
        if step == 6:
            pipeline.kill("worker")
            pipeline.start("worker")
    expected = {(u, a, r) for u in users for a, r in
                (("warn", "threshold"), ("disable", "quota"))}
    fleet.wait_for(lambda: {(c.user_id, c.action, c.reason) for c in fleet.read()} >= expected,
                   timeout_s=120)
    time.sleep(3)
    # per user: warn at 50%, warn at 80%, disable; a re-sent command keeps its id
    ids_per_change: dict[tuple[str, str, float | None], set[str]] = {}
    for c in fleet.read():
        ids_per_change.setdefault((c.user_id, c.action, c.threshold), set()).add(c.command_id)
    assert len(ids_per_change) == 3 * len(users)
    assert all(len(ids) == 1 for ids in ids_per_change.values()), ids_per_change
    assert Tally(c.action for c in fleet.read()).keys() == {"warn", "disable"}
