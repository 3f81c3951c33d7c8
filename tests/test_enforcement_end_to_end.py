"""End to end: a user crosses the quota and is cut off on a real v2ray through the agent.

Real Kafka, the real worker and sink (`pipeline`), the Debian v2ray server (an API
inbound with StatsService + HandlerService, and a VLESS inbound), one v2ray client
with a SOCKS inbound per user, and `quotaflow agent` run as a user runs it: a
`v2ray` collector every second and `[enforce]` with the `v2ray` backend and a
credentials file. `bench/enforce_latency.py` times the same setup.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from quotaflow.core.contracts import Counter, CounterReport
from quotaflow.core.partitioning import partition_of
from quotaflow.core.plans import Ack, CalendarMonth, Command, Pack, Plan
from quotaflow.core.settings import Settings
from quotaflow.producers.sources.v2ray import V2RayCollector, V2RayConfig
from tests.producers.enforce.test_xray import (
    User,
    _inbound,
    _outbound,
    http_through,
    refused,
    server_config,
)
from tests.producers.sources import helpers
from tests.producers.sources.helpers import LOCAL, Processes, free_port, listening, wait_until

node_software = helpers.node_software
processes = helpers.processes
http_port = helpers.http_port

PROTOCOL = "vless"
TAG = f"{PROTOCOL}-in"
NODE = "edge-1"
MB = 1_000_000


def make_users(n: int) -> list[User]:
    """`n` users u00, u01, ... with their own UUIDs and client source addresses."""
    return [
        User(f"u{i:02d}", str(uuid.UUID(int=0xE2E000 + i)), f"pw-{i}", "", f"127.0.1.{i + 1}")
        for i in range(n)
    ]


class V2RayNode:
    """The real v2ray server for `users`, and one real v2ray client: a SOCKS port per user."""

    def __init__(self, processes: Processes, users: list[User]) -> None:
        self.processes, self.users = processes, users
        self.api, self.port = free_port(), free_port()
        config = server_config("v2ray", self.api, _inbound("v2ray", PROTOCOL, self.port, users))
        server = processes.folder / "v2ray-server.json"
        server.write_text(json.dumps(config))
        processes.start("v2ray-server", ["v2ray", "-config", str(server)])
        wait_until("the v2ray server", lambda: listening(self.api) and listening(self.port),
                   timeout=30)
        self.address = f"{LOCAL}:{self.api}"
        self.socks = {u.name: free_port() for u in users}
        inbounds = [{"tag": f"in-{u.name}", "listen": LOCAL, "port": self.socks[u.name],
                     "protocol": "socks"} for u in users]
        outbounds = [{**_outbound("v2ray", PROTOCOL, self.port, u), "tag": f"out-{u.name}"}
                     for u in users]
        rules = [{"type": "field", "inboundTag": [f"in-{u.name}"], "outboundTag": f"out-{u.name}"}
                 for u in users]
        client = processes.folder / "v2ray-client.json"
        client.write_text(json.dumps({
            "log": {"loglevel": "warning"}, "inbounds": inbounds, "outbounds": outbounds,
            "routing": {"rules": rules},
        }))
        processes.start("v2ray-client", ["v2ray", "-config", str(client)])
        wait_until("the v2ray client", lambda: all(listening(p) for p in self.socks.values()),
                   timeout=30)
        self.collector = V2RayCollector(V2RayConfig(type="v2ray", address=self.address))

    def counters(self) -> dict[str, Counter]:
        """The v2ray stats counters, read as the agent's collector reads them."""
        return {c.user_id: c for c in self.collector.collect().counters}

    def download(self, user: str, http_port: int) -> int:
        """One 1 MB GET through the user's SOCKS port; the bytes received."""
        return len(http_through(self.socks[user], http_port))

    def ping(self, user: str, http_port: int, timeout: float = 3) -> bool:
        """A new, tiny request (an empty POST) through the user's SOCKS port: did it work?"""
        try:
            return http_through(self.socks[user], http_port, "POST", b"", timeout=timeout) == b"0"
        except (AssertionError, OSError):
            return False

    def refused(self, user: str, http_port: int) -> bool:
        return refused(self.socks[user], http_port)


def credentials_toml(users: list[User]) -> str:
    """The credentials file (docs/enforcement.md) for the VLESS inbound."""
    return "\n".join(
        f'[[accounts]]\nuser_id = "{u.name}"\nbackend = "v2ray"\ninbound = "{TAG}"\n'
        f'protocol = "{PROTOCOL}"\nid = "{u.uuid}"\n'
        for u in users
    )


def start_agent(processes: Processes, settings: Settings, node: V2RayNode,
                interval_s: float = 1.0) -> subprocess.Popen[bytes]:
    """`quotaflow agent --config agent.toml`, as a user runs it, with [enforce]."""
    folder = processes.folder
    creds = folder / "credentials.toml"
    creds.write_text(credentials_toml(node.users))
    config = folder / "agent.toml"
    config.write_text(
        f'node_id = "{NODE}"\noutbox = "{folder / "outbox.db"}"\n'
        "baseline_on_first_start = false\ndrain_timeout_s = 20\n"
        f'[[collectors]]\ntype = "v2ray"\naddress = "{node.address}"\ninterval_s = {interval_s}\n'
        f'[enforce]\ncredentials = "{creds}"\npoll_interval_s = 0.2\n'
        "[enforce.retry]\nbase_s = 0.2\ncap_s = 1.0\n"
        f'[[enforce.backends]]\ntype = "v2ray"\naddress = "{node.address}"\n'
        f'inbounds = ["{TAG}"]\n'
    )
    env = {**settings.to_env(), "PYTHONUNBUFFERED": "1"}
    return processes.start("agent", [sys.executable, "-m", "quotaflow", "agent", "--config",
                                     str(config)], env=env)


def plan(user: str, quota: int, packs: tuple[Pack, ...] = ()) -> Plan:
    return Plan(user_id=user, quota_bytes=quota, period=CalendarMonth(kind="calendar_month"),
                packs=packs, enabled=True)


def pack(size: int) -> Pack:
    return Pack(pack_id="raise-1", bytes=size, added_at=datetime.now(UTC) - timedelta(seconds=1))


@dataclass
class Seen:
    """A record read from a topic, with its Kafka timestamp (ms) and when it was read."""

    value: Any
    timestamp_ms: int
    read_at: float  # time.time()


@dataclass
class Bus:
    """Publishes plans; reads `.raw`, `.control` and `.control.acks` from their start."""

    settings: Settings
    raw: list[Seen] = field(default_factory=list)
    commands: list[Seen] = field(default_factory=list)
    acks: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        topics = self.settings.topics
        self.producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap,
                                      acks="all")
        self.consumer = KafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                      enable_auto_commit=False)
        self.consumer.assign([TopicPartition(t, p) for t in (topics.raw, topics.control,
                                                             topics.control_acks)
                              for p in range(self.settings.partitions)])
        self.consumer.seek_to_beginning()
        self.decoders: dict[str, tuple[Callable[[bytes], Any], list[Seen]]] = {
            topics.raw: (CounterReport.decode, self.raw),
            topics.control: (Command.decode, self.commands),
            topics.control_acks: (Ack.decode, self.acks),
        }

    def close(self) -> None:
        self.producer.close()
        self.consumer.close()

    def publish(self, plan: Plan) -> None:
        self.producer.send(
            self.settings.topics.plans, key=plan.user_id.encode(), value=plan.encode(),
            partition=partition_of(plan.user_id, self.settings.partitions),
        ).get(10)

    def poll(self, timeout_ms: int = 50) -> None:
        for tp, records in self.consumer.poll(timeout_ms=timeout_ms).items():
            decode, into = self.decoders[tp.topic]
            now = time.time()
            into += [Seen(decode(r.value), r.timestamp, now) for r in records if r.value]

    def reports(self) -> list[Seen]:
        self.poll()
        return self.raw

    def command(self, user: str, action: str) -> Seen | None:
        self.poll()
        return next((c for c in self.commands
                     if c.value.user_id == user and c.value.action == action), None)

    def ack(self, command_id: str) -> Seen | None:
        self.poll()
        return next((a for a in self.acks if a.value.command_id == command_id), None)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := check():
                return found
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def crossing(self, user: str, quota: int) -> Seen | None:
        """The first `.raw` report whose (cumulative, billed) bytes of `user` reach `quota`."""
        self.poll()
        for seen in self.raw:
            for c in seen.value.counters:
                if c.user_id == user and c.up + c.down >= quota:
                    return seen
        return None


def billed(settings: Settings, user: str) -> tuple[int, int]:
    """The user's billed (up, down) on the node, in InfluxDB's daily totals."""
    from quotaflow.dev.truth_check import read_daily_totals

    total = (0, 0)
    for (who, node, _), (up, down) in read_daily_totals(settings).items():
        if (who, node) == (user, NODE):
            total = (total[0] + up, total[1] + down)
    return total


# ------------------------------------------------------------------------------- the test


@pytest.mark.integration
@pytest.mark.usefixtures("node_software")
def test_a_user_over_quota_is_cut_off_on_a_real_v2ray_and_back_after_a_pack(
    settings: Settings, pipeline: Any, processes: Processes, http_port: int
) -> None:
    quota = 2 * MB
    users = make_users(2)
    alice, bob = users[0].name, users[1].name
    node = V2RayNode(processes, users)
    bus = Bus(settings)
    agent = start_agent(processes, settings, node)
    try:
        for u in users:
            bus.publish(plan(u.name, quota))
        # the agent's first (idle) report is on Kafka: it runs and reads the node
        bus.wait("the agent's first report", bus.reports, timeout=60)
        assert node.ping(bob, http_port)
        # alice downloads until the quota is crossed and the disable arrives
        for _ in range(10):
            assert node.download(alice, http_port) == MB
            time.sleep(1.5)  # a collector interval, and the worker's decision
            if bus.command(alice, "disable"):
                break
        disable = bus.wait("alice's disable", lambda: bus.command(alice, "disable"))
        assert disable.value.reason == "quota" and disable.value.used_bytes >= quota
        ack = bus.wait("the applied ack", lambda: bus.ack(disable.value.command_id))
        assert (ack.value.outcome, ack.value.node_id, ack.value.backend) == (
            "applied", NODE, "v2ray"), processes.logs()
        assert ack.value.detail == f"removed from {TAG}"
        # new connections for alice fail within a few seconds; bob's still work
        wait_until("alice refused", lambda: node.refused(alice, http_port), timeout=5)
        assert node.ping(bob, http_port)
        assert node.download(bob, http_port) == MB
        # billed exactly what v2ray counted up to the removal (its counters stay put)
        counted = node.counters()[alice]
        assert counted.up + counted.down >= quota
        deadline = time.monotonic() + 60
        while True:
            pipeline.wait()
            if billed(settings, alice) == (counted.up, counted.down) or (
                    time.monotonic() > deadline):
                break
            time.sleep(1)
        assert billed(settings, alice) == (counted.up, counted.down), processes.logs()
        assert node.counters()[alice] == counted  # nothing moved after the removal

        # a pack raises the allowance: enable, and alice connects again
        bus.publish(plan(alice, quota, (pack(10 * MB),)))
        enable = bus.wait("alice's enable", lambda: bus.command(alice, "enable"))
        ack = bus.wait("the enable's ack", lambda: bus.ack(enable.value.command_id))
        assert (ack.value.outcome, ack.value.detail) == ("applied", f"added to {TAG}")
        wait_until("alice back", lambda: node.ping(alice, http_port), timeout=10)
        assert node.download(alice, http_port) == MB
        assert [c.value.action for c in bus.commands if c.value.user_id == bob] == []
    finally:
        bus.close()
        agent.send_signal(signal.SIGTERM)
        try:
            assert agent.wait(60) == 0, processes.logs()
        finally:
            if agent.poll() is None:
                os.kill(agent.pid, signal.SIGKILL)
