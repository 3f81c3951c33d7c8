"""The v2ray source: its stats parser, its gRPC client (real V2Ray, in-process Xray and
sing-box stand-ins) and billing."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from quotaflow.core.contracts import MAX_COUNTER, Counter
from quotaflow.core.settings import Settings
from quotaflow.producers.sources import ParseError, SourceError
from quotaflow.producers.sources.v2ray import (
    TypedMessage,
    V2RayStatsClient,
    derive_epoch_ms,
    parse_v2ray_stats,
    parse_v2ray_stats_json,
)
from tests.producers.sources.helpers import (
    DOWNLOAD,
    LOCAL,
    METHOD,
    SLACK,
    UPLOAD,
    Processes,
    _body,
    billed_through_agent,
    by_user,
    free_port,
    listening,
    push_known_bytes,
    readings,
    sample,
    socks_http,
    start_ss_local,
    wait_until,
)


def test_v2ray_pairs_keep_only_user_traffic() -> None:
    counters = parse_v2ray_stats(
        [
            ("user>>>alice@example.com>>>traffic>>>uplink", 10),
            ("user>>>alice@example.com>>>traffic>>>downlink", 20),
            ("user>>>bob>>>traffic>>>downlink", 5),
            ("user>>>bob>>>online", 2),
            ("inbound>>>vmess>>>traffic>>>uplink", 999),
            ("outbound>>>direct>>>traffic>>>downlink", 999),
        ]
    )
    assert readings(counters) == {"alice@example.com": (10, 20), "bob": (0, 5)}


def test_v2ray_email_may_contain_separator_like_text() -> None:
    counters = parse_v2ray_stats([("user>>>a>>>b>>>traffic>>>uplink", 1)])
    assert readings(counters) == {"a>>>b": (1, 0)}


@pytest.mark.parametrize(
    "pairs",
    [
        [("user>>>a>>>traffic>>>uplink", -1)],
        [("user>>>a>>>traffic>>>uplink", MAX_COUNTER + 1)],
        [("user>>>a>>>traffic>>>uplink", True)],
        [("user>>>a>>>traffic>>>sideways", 1)],
        [("user>>>>>>traffic>>>uplink", 1)],
        [("garbage", 1)],
        [("user>>>a>>>traffic>>>uplink", 1), ("user>>>a>>>traffic>>>uplink", 2)],
    ],
)
def test_v2ray_pairs_refuse_garbage(pairs: list[tuple[str, int]]) -> None:
    with pytest.raises(ParseError):
        parse_v2ray_stats(pairs)


def test_xray_statsquery_sample() -> None:
    counters = parse_v2ray_stats_json(sample("xray-statsquery.json"))
    assert readings(counters) == {
        "alice@example.com": (18273645, 712634511),
        "bob@example.com": (0, 4096),
    }


@pytest.mark.parametrize("text", ["{}", '{"stat": []}', '{"stat": null}'])
def test_xray_statsquery_without_stats(text: str) -> None:
    assert parse_v2ray_stats_json(text) == []


def test_xray_statsquery_numbers_and_strings_mix() -> None:
    text = json.dumps(
        {
            "stat": [
                {"name": "user>>>a>>>traffic>>>uplink", "value": 7},
                {"name": "user>>>a>>>traffic>>>downlink", "value": "8"},
            ]
        }
    )
    assert readings(parse_v2ray_stats_json(text)) == {"a": (7, 8)}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"stat": {}}',
        '{"stat": [1]}',
        '{"stat": [{"value": 1}]}',
        '{"stat": [{"name": "user>>>a>>>traffic>>>uplink", "value": -3}]}',
        '{"stat": [{"name": "user>>>a>>>traffic>>>uplink", "value": "-3"}]}',
        '{"stat": [{"name": "user>>>a>>>traffic>>>uplink", "value": 1.5}]}',
        '{"stat": [{"name": "user>>>a>>>traffic>>>uplink", "value": "0x10"}]}',
        '{"stat": [], "stat": []}',
        "[" * 100_000,
    ],
)
def test_xray_statsquery_refuses_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_v2ray_stats_json(text)


ALICE_PASSWORD = "alice-secret-1"
BOB_UUID = str(uuid.UUID(int=0xB0B))


def _v2ray_server_config(api: int, ss: int, vmess: int) -> dict[str, Any]:
    return {
        "log": {"loglevel": "warning"},
        "stats": {},
        "api": {"tag": "api", "services": ["StatsService", "HandlerService"]},
        "policy": {"levels": {"0": {"statsUserUplink": True, "statsUserDownlink": True}}},
        "inbounds": [
            {
                "tag": "api",
                "listen": LOCAL,
                "port": api,
                "protocol": "dokodemo-door",
                "settings": {"address": LOCAL},
            },
            {
                "tag": "ss-alice",
                "listen": LOCAL,
                "port": ss,
                "protocol": "shadowsocks",
                "settings": {
                    "method": METHOD,
                    "password": ALICE_PASSWORD,
                    "email": "alice@test",
                    "level": 0,
                    "network": "tcp",
                },
            },
            {
                "tag": "vmess-in",
                "listen": LOCAL,
                "port": vmess,
                "protocol": "vmess",
                "settings": {
                    "clients": [{"id": BOB_UUID, "alterId": 0, "email": "bob@test", "level": 0}]
                },
            },
        ],
        "outbounds": [{"tag": "direct", "protocol": "freedom"}],
        "routing": {"rules": [{"type": "field", "inboundTag": ["api"], "outboundTag": "api"}]},
    }


def _v2ray_vmess_client_config(socks: int, vmess: int, user_uuid: str) -> dict[str, Any]:
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [{"listen": LOCAL, "port": socks, "protocol": "socks"}],
        "outbounds": [
            {
                "protocol": "vmess",
                "settings": {
                    "vnext": [
                        {
                            "address": LOCAL,
                            "port": vmess,
                            "users": [{"id": user_uuid, "alterId": 0}],
                        }
                    ]
                },
            }
        ],
    }


class V2RayNode:
    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.api, self.ss, self.vmess = free_port(), free_port(), free_port()
        config = processes.folder / "v2ray-server.json"
        config.write_text(json.dumps(_v2ray_server_config(self.api, self.ss, self.vmess)))
        self.started_ms = time.time_ns() // 1_000_000
        processes.start("v2ray-server", ["v2ray", "-config", str(config)])
        wait_until("the v2ray API", lambda: listening(self.api) and listening(self.ss))

    def ss_local(self, password: str) -> int:
        return start_ss_local(self.processes, password, self.ss)

    def vmess_client(self, user_uuid: str) -> int:
        port = free_port()
        config = self.processes.folder / f"v2ray-client-{port}.json"
        config.write_text(json.dumps(_v2ray_vmess_client_config(port, self.vmess, user_uuid)))
        self.processes.start(f"v2ray-client-{port}", ["v2ray", "-config", str(config)])
        wait_until("the v2ray client", lambda: listening(port))
        return port


@pytest.fixture
def v2ray(node_software: None, processes: Processes) -> V2RayNode:
    return V2RayNode(processes)


def v2ray_version() -> str:
    return subprocess.run(["v2ray", "-version"], capture_output=True, text=True).stdout.split("\n")[
        0
    ]


@pytest.mark.integration
def test_v2ray_counts_user_bytes(v2ray: V2RayNode, http_port: int) -> None:
    client = V2RayStatsClient(f"{LOCAL}:{v2ray.api}")
    with client:
        assert client.query_user_counters() == []  # no user has moved a byte yet
        assert client.service == "v2ray.core.app.stats.command.StatsService"

        push_known_bytes(v2ray.ss_local(ALICE_PASSWORD), http_port)
        users = by_user(client.query_user_counters())

        alice = users["alice@test"]
        assert DOWNLOAD <= alice.down <= DOWNLOAD + SLACK, (alice, v2ray_version())
        assert UPLOAD <= alice.up <= UPLOAD + SLACK, alice
        assert users.get("bob@test", Counter(user_id="bob@test", up=0, down=0)).down == 0
        # reset=false: a second read sees the same cumulative figures
        assert by_user(client.query_user_counters())["alice@test"] == alice

        sys_stats = client.sys_stats()
        assert sys_stats["NumGoroutine"] > 0 and sys_stats["Alloc"] > 0, sys_stats
        now_ms = time.time_ns() // 1_000_000
        assert 0 <= sys_stats["Uptime"] <= (now_ms - v2ray.started_ms) // 1000 + 1
        epoch = client.epoch_ms()
        assert v2ray.started_ms - 2 * 10_000 <= epoch <= v2ray.started_ms + 1_000
        assert client.epoch_ms() == epoch


@pytest.mark.integration
def test_v2ray_handler_adds_and_removes_users(v2ray: V2RayNode, http_port: int) -> None:
    carol = str(uuid.uuid4())
    with V2RayStatsClient(f"{LOCAL}:{v2ray.api}") as client:
        client.add_user("vmess-in", "carol@test", TypedMessage.vmess_account(carol))
        with pytest.raises(SourceError):  # the same email twice
            client.add_user("vmess-in", "carol@test", TypedMessage.vmess_account(carol))
        with pytest.raises(SourceError):  # no such inbound
            client.add_user("nope", "dave@test", TypedMessage.vmess_account(carol))

        socks = v2ray.vmess_client(carol)
        assert socks_http(socks, http_port) == _body(DOWNLOAD)
        users = by_user(client.query_user_counters())
        assert DOWNLOAD <= users["carol@test"].down <= DOWNLOAD + SLACK, users
        assert users["carol@test"].up > 0

        client.remove_user("vmess-in", "carol@test")
        with pytest.raises((AssertionError, OSError)):  # V2Ray stalls unknown users
            socks_http(socks, http_port, timeout=2)
        assert by_user(client.query_user_counters())["carol@test"] == users["carol@test"]


class _FakeXray:
    """An in-process gRPC server answering only to Xray's (or the given) service names."""

    def __init__(self, stats_service: str = "xray.app.stats.command.StatsService") -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        stats = {
            "QueryStats": self._handler("QueryStats", _xray_query_answer()),
            "GetSysStats": self._handler("GetSysStats", b"\x08\x07" + b"\x50\x2a"),
        }
        handler = {"AlterInbound": self._handler("AlterInbound", b"")}
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(stats_service, stats),
                grpc.method_handlers_generic_handler(
                    "xray.app.proxyman.command.HandlerService", handler
                ),
            )
        )
        self.port = self.server.add_insecure_port(f"{LOCAL}:0")
        self.server.start()

    def _handler(self, name: str, answer: bytes) -> grpc.RpcMethodHandler[bytes, bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.requests.append((name, request))
            return answer

        return grpc.unary_unary_rpc_method_handler(call)


def _pb_len(number: int, data: bytes) -> bytes:
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


def _xray_query_answer() -> bytes:
    up = _pb_len(1, b"user>>>x@test>>>traffic>>>uplink") + b"\x10\x96\x01"  # 150
    down = _pb_len(1, b"user>>>x@test>>>traffic>>>downlink") + b"\x10\xac\x02"  # 300
    return _pb_len(1, up) + _pb_len(1, down)


def test_falls_back_to_xray_service_names() -> None:
    fake = _FakeXray()
    try:
        with V2RayStatsClient(f"{LOCAL}:{fake.port}") as client:
            assert client.query_user_counters() == [Counter(user_id="x@test", up=150, down=300)]
            assert client.service == "xray.app.stats.command.StatsService"
            assert client.sys_stats()["Uptime"] == 42
            client.remove_user("in", "x@test")
        assert fake.requests[0] == ("QueryStats", _pb_len(1, b"user>>>"))  # reset=false: absent
        name, request = fake.requests[-1]
        operation = _pb_len(1, b"x@test")
        typed = _pb_len(1, b"xray.app.proxyman.command.RemoveUserOperation") + _pb_len(2, operation)
        assert (name, request) == ("AlterInbound", _pb_len(1, b"in") + _pb_len(2, typed))
    finally:
        fake.server.stop(None)


def test_sing_box_stats_without_handler_service() -> None:
    fake = _FakeXray("experimental.v2rayapi.StatsService")
    try:
        with V2RayStatsClient(f"{LOCAL}:{fake.port}") as client:
            assert client.query_user_counters() == [Counter(user_id="x@test", up=150, down=300)]
            assert client.service == "experimental.v2rayapi.StatsService"
            with pytest.raises(SourceError, match="no HandlerService"):
                client.remove_user("in", "x@test")
    finally:
        fake.server.stop(None)


def test_unreachable_v2ray_api_raises() -> None:
    with (
        V2RayStatsClient(f"{LOCAL}:{free_port()}", timeout=1) as client,
        pytest.raises(SourceError),
    ):
        client.query_user_counters()


def test_epoch_is_stable_across_polls_and_grows_on_restart() -> None:
    start = 1_761_000_009_500  # just before a 10 s boundary
    epoch = derive_epoch_ms(start + 100_900, 100)
    for extra_ms, uptime in [(1_000, 101), (1_999, 101), (60_300, 160)]:
        now = start + 100_900 + extra_ms
        assert derive_epoch_ms(now, uptime, epoch, 100) == epoch
    restarted = derive_epoch_ms(start + 200_000, 5, epoch, 160)
    assert restarted > epoch
    fast_restart = derive_epoch_ms(start + 100_950, 0, epoch, 100)
    assert fast_restart > epoch


@pytest.mark.integration
def test_v2ray_traffic_is_billed_by_the_pipeline(
    v2ray: V2RayNode, http_port: int, settings: Settings, pipeline: Any, tmp_path: Path
) -> None:
    """Real bytes through a real V2Ray, read by the agent, billed into InfluxDB exactly."""
    billed = billed_through_agent(
        tmp_path, settings, pipeline, f'type = "v2ray"\naddress = "{LOCAL}:{v2ray.api}"',
        lambda: push_known_bytes(v2ray.ss_local(ALICE_PASSWORD), http_port),
    )
    with V2RayStatsClient(f"{LOCAL}:{v2ray.api}") as client:
        alice = by_user(client.query_user_counters())["alice@test"]
    assert alice.down >= DOWNLOAD and alice.up >= UPLOAD
    assert billed == {"alice@test": (alice.up, alice.down)}, (tmp_path / "agent.log").read_text()
