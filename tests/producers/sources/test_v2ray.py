"""The v2ray source: its stats parser, its gRPC client (real V2Ray, in-process Xray and
sing-box stand-ins) and billing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message

from quotaflow.core.contracts import MAX_COUNTER, Counter
from quotaflow.core.settings import Settings
from quotaflow.producers.sources import ParseError, SourceError
from quotaflow.producers.sources._pb.singbox.experimental.v2rayapi import (
    stats_pb2 as singbox_stats,
)
from quotaflow.producers.sources._pb.v2ray.core.common.serial.typed_message_pb2 import (
    TypedMessage as V2RayTypedMessage,
)
from quotaflow.producers.sources._pb.v2ray.core.proxy.vless.account_pb2 import (
    Account as V2RayVlessAccount,
)
from quotaflow.producers.sources._pb.xray.app.proxyman.command.command_pb2 import (
    AddUserOperation,
    AlterInboundRequest,
    AlterInboundResponse,
    RemoveUserOperation,
)
from quotaflow.producers.sources._pb.xray.app.stats.command import command_pb2 as xray_stats
from quotaflow.producers.sources._pb.xray.common.serial.typed_message_pb2 import (
    TypedMessage as XrayTypedMessage,
)
from quotaflow.producers.sources._pb.xray.proxy.shadowsocks.account_pb2 import (
    Account as XrayShadowsocksAccount,
)
from quotaflow.producers.sources._pb.xray.proxy.vless.account_pb2 import Account as VlessAccount
from quotaflow.producers.sources.v2ray import (
    TypedMessage,
    V2RayCollector,
    V2RayConfig,
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

SOURCES = Path(__file__).resolve().parents[3] / "producers" / "sources"
PB = SOURCES / "_pb"
GENERATE = SOURCES / "proto" / "generate.py"


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
    """An in-process gRPC server answering only to Xray's (or the given) service names.

    It speaks with the generated messages (Xray's, or sing-box's for its service name)
    and keeps each request's bytes as they came, to be checked against the messages.
    """

    def __init__(self, stats_service: str = "xray.app.stats.command.StatsService") -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        messages = singbox_stats if stats_service.startswith("experimental.") else xray_stats
        stats = {
            "QueryStats": self._handler("QueryStats", _xray_query_answer(messages)),
            "GetSysStats": self._handler(
                "GetSysStats", messages.SysStatsResponse(NumGoroutine=7, Uptime=42)
            ),
        }
        handler = {"AlterInbound": self._handler("AlterInbound", AlterInboundResponse())}
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

    def _handler(self, name: str, answer: Message) -> grpc.RpcMethodHandler[bytes, bytes]:
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.requests.append((name, request))
            return answer.SerializeToString()

        return grpc.unary_unary_rpc_method_handler(call)


def _xray_query_answer(messages: Any = xray_stats) -> Message:
    answer: Message = messages.QueryStatsResponse(
        stat=[
            messages.Stat(name="user>>>x@test>>>traffic>>>uplink", value=150),
            messages.Stat(name="user>>>x@test>>>traffic>>>downlink", value=300),
        ]
    )
    return answer


def _alter_inbound(request: bytes) -> tuple[str, str, bytes]:
    """An Xray AlterInboundRequest's tag, operation type and operation bytes."""
    message = AlterInboundRequest.FromString(request)
    return message.tag, message.operation.type, message.operation.value


def test_falls_back_to_xray_service_names() -> None:
    fake = _FakeXray()
    try:
        with V2RayStatsClient(f"{LOCAL}:{fake.port}") as client:
            assert client.query_user_counters() == [Counter(user_id="x@test", up=150, down=300)]
            assert client.service == "xray.app.stats.command.StatsService"
            assert client.sys_stats()["Uptime"] == 42
            client.remove_user("in", "x@test")
        name, request = fake.requests[0]
        assert name == "QueryStats"
        query = xray_stats.QueryStatsRequest.FromString(request)
        assert (query.pattern, query.reset) == ("user>>>", False)
        assert request == b"\n\x07user>>>"  # reset=false is left out on the wire
        name, request = fake.requests[-1]
        assert name == "AlterInbound"
        tag, kind, operation = _alter_inbound(request)
        assert (tag, kind) == ("in", "xray.app.proxyman.command.RemoveUserOperation")
        assert RemoveUserOperation.FromString(operation) == RemoveUserOperation(email="x@test")
    finally:
        fake.server.stop(None)


def _wire(number: int, data: bytes | str) -> bytes:
    """A length-delimited protobuf field, written by hand: an oracle for the generated code."""
    raw = data.encode() if isinstance(data, str) else data
    size, length = len(raw), bytearray()
    while size >= 0x80:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return bytes([number << 3 | 2]) + bytes(length) + raw


def test_add_user_sends_an_add_user_operation_with_a_vless_account() -> None:
    user_uuid = str(uuid.UUID(int=0xE1))
    fake = _FakeXray()
    try:
        with V2RayStatsClient(f"{LOCAL}:{fake.port}") as client:
            account = TypedMessage.vless_account(user_uuid, "xtls-rprx-vision")
            client.add_user("vless-in", "v@test", account, level=1)
        name, request = fake.requests[-1]
    finally:
        fake.server.stop(None)
    assert name == "AlterInbound"
    tag, kind, operation = _alter_inbound(request)
    assert (tag, kind) == ("vless-in", "xray.app.proxyman.command.AddUserOperation")
    user = AddUserOperation.FromString(operation).user
    assert (user.level, user.email) == (1, "v@test")
    assert user.account.type == "xray.proxy.vless.Account"  # the bare full name, no type URL
    assert VlessAccount.FromString(user.account.value) == VlessAccount(
        id=user_uuid, flow="xtls-rprx-vision"
    )
    assert user.account == XrayTypedMessage.FromString(account.encode("xray."))
    # The same bytes, written field by field as the wire format says.
    vless = _wire(1, user_uuid) + _wire(2, "xtls-rprx-vision")
    typed_account = _wire(1, "xray.proxy.vless.Account") + _wire(2, vless)
    user_bytes = b"\x08\x01" + _wire(2, "v@test") + _wire(3, typed_account)
    typed_operation = _wire(1, "xray.app.proxyman.command.AddUserOperation")
    typed_operation += _wire(2, _wire(1, user_bytes))
    assert request == _wire(1, "vless-in") + _wire(2, typed_operation)


def test_accounts_follow_the_server_family() -> None:
    user_uuid = str(uuid.UUID(int=0xF00))
    vless = TypedMessage.vless_account(user_uuid)
    assert XrayTypedMessage.FromString(vless.encode("xray.")).type == "xray.proxy.vless.Account"
    v2ray_typed = V2RayTypedMessage.FromString(vless.encode("v2ray.core."))
    assert v2ray_typed.type == "v2ray.core.proxy.vless.Account"
    assert v2ray_typed.value == V2RayVlessAccount(id=user_uuid).SerializeToString()

    # V2Ray and Xray number Shadowsocks ciphers differently.
    ss = TypedMessage.shadowsocks_account("secret", "chacha20-ietf-poly1305")
    assert XrayShadowsocksAccount.FromString(ss.typed("xray.").value) == XrayShadowsocksAccount(
        password="secret", cipher_type="CHACHA20_POLY1305"
    )
    assert ss.message("xray.").SerializeToString() == b"\n\x06secret\x10\x07"
    assert ss.message("v2ray.core.").SerializeToString() == b"\n\x06secret\x10\x03"
    with pytest.raises(SourceError, match="V2Ray"):  # V2Ray has no XChaCha20
        TypedMessage.shadowsocks_account("s", "xchacha20-ietf-poly1305").encode("v2ray.core.")
    ss2022 = TypedMessage.shadowsocks_account("a2V5", "2022-blake3-aes-128-gcm")
    assert XrayTypedMessage.FromString(ss2022.encode("xray.")).type == (
        "xray.proxy.shadowsocks_2022.Account"
    )
    with pytest.raises(SourceError, match="V2Ray has no"):
        ss2022.encode("v2ray.core.")
    with pytest.raises(ValueError, match="Shadowsocks method"):
        TypedMessage.shadowsocks_account("s", "rc4-md5")

    # Xray's VMess has no alter_id: 0 is left out, anything else is refused.
    assert TypedMessage.vmess_account(user_uuid).message("xray.").SerializeToString() == (
        _wire(1, user_uuid)
    )
    assert TypedMessage.vmess_account(user_uuid, 4).message("v2ray.core.").SerializeToString() == (
        _wire(1, user_uuid) + b"\x10\x04"
    )
    with pytest.raises(SourceError, match="Xray"):
        TypedMessage.vmess_account(user_uuid, 4).encode("xray.")
    assert TypedMessage.trojan_account("pw").message("xray.").SerializeToString() == _wire(1, "pw")


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    """producers/sources/_pb/ is what `make proto` makes of the .proto files, byte for byte."""
    done = subprocess.run(
        [sys.executable, str(GENERATE), "--out", str(tmp_path / "_pb")],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr

    def tree(root: Path) -> dict[str, bytes]:
        return {
            path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts
        }

    fresh, committed = tree(tmp_path / "_pb"), tree(PB)
    assert sorted(fresh) == sorted(committed), "run `make proto`: modules added or removed"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run `make proto`: {stale} differ from the .proto files"


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


def test_epoch_does_not_flap_when_the_first_estimate_was_floored_far_down() -> None:
    """Seen on the real Xray: a first estimate 0.1 s before a 10 s mark was floored
    9.9 s down, a later one read 0.7 s later, and a new epoch re-billed the counters."""
    first_estimate = 1_761_000_019_900
    epoch = derive_epoch_ms(first_estimate + 5_000, 5)
    assert epoch == 1_761_000_010_000
    for jitter_ms, uptime in [(700, 5), (1_100, 6), (1_999, 61)]:
        now = first_estimate + uptime * 1000 + jitter_ms
        assert derive_epoch_ms(now, uptime, epoch, 5) == epoch
    # a start 20 s after the first one is a restart, even with no lower uptime seen
    assert derive_epoch_ms(first_estimate + 25_000, 5, epoch, 5) > epoch


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


# --------------------------------------------------------------------------- real Xray

INSTALL_XRAY = Path(__file__).resolve().parents[3] / "deploy" / "local" / "install-xray.sh"
DAVE_UUID = str(uuid.UUID(int=0xDA7E))


@pytest.fixture(scope="module")
def xray_binary() -> str:
    """Xray, built with `go install` into the quotaflow cache by deploy/local/install-xray.sh."""
    done = subprocess.run(
        ["bash", str(INSTALL_XRAY)], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"install-xray.sh failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def _xray_server_config(api: int, vless: int) -> dict[str, Any]:
    return {
        "log": {"loglevel": "warning"},
        "stats": {},
        "api": {
            "tag": "api",
            "listen": f"{LOCAL}:{api}",
            "services": ["StatsService", "HandlerService"],
        },
        "policy": {
            "levels": {
                "0": {"statsUserUplink": True, "statsUserDownlink": True, "statsUserOnline": True}
            }
        },
        "inbounds": [
            {
                "tag": "vless-in",
                "listen": LOCAL,
                "port": vless,
                "protocol": "vless",
                "settings": {
                    "clients": [{"id": DAVE_UUID, "email": "dave@test", "level": 0}],
                    "decryption": "none",
                },
            }
        ],
        "outbounds": [{"tag": "direct", "protocol": "freedom"}],
    }


def _xray_vless_client_config(
    socks: int, vless: int, user_uuid: str, source: str = LOCAL
) -> dict[str, Any]:
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [{"listen": LOCAL, "port": socks, "protocol": "socks"}],
        "outbounds": [
            {
                "protocol": "vless",
                "sendThrough": source,
                "settings": {
                    "vnext": [
                        {
                            "address": LOCAL,
                            "port": vless,
                            "users": [{"id": user_uuid, "encryption": "none"}],
                        }
                    ]
                },
            }
        ],
    }


class XrayNode:
    def __init__(self, processes: Processes, binary: str) -> None:
        self.processes, self.binary = processes, binary
        self.api, self.vless = free_port(), free_port()
        config = processes.folder / "xray-server.json"
        config.write_text(json.dumps(_xray_server_config(self.api, self.vless)))
        self.started_ms = time.time_ns() // 1_000_000
        processes.start("xray-server", [binary, "run", "-c", str(config)])
        wait_until(
            "the xray API", lambda: listening(self.api) and listening(self.vless), timeout=30
        )

    def vless_client(self, user_uuid: str, source: str = LOCAL) -> int:
        """A real Xray client with a SOCKS inbound; it connects from `source`."""
        port = free_port()
        config = self.processes.folder / f"xray-client-{port}.json"
        client = _xray_vless_client_config(port, self.vless, user_uuid, source)
        config.write_text(json.dumps(client))
        self.processes.start(f"xray-client-{port}", [self.binary, "run", "-c", str(config)])
        wait_until("the xray client", lambda: listening(port), timeout=30)
        return port


@pytest.mark.integration
def test_xray_counts_and_manages_vless_users(
    xray_binary: str, processes: Processes, http_port: int
) -> None:
    """A real Xray: its StatsService under Xray's names, and VLESS users added and removed."""
    xray = XrayNode(processes, xray_binary)
    erin = str(uuid.uuid4())
    with V2RayStatsClient(f"{LOCAL}:{xray.api}") as client:
        assert client.query_user_counters() == []
        assert client.service == "xray.app.stats.command.StatsService", processes.logs()
        assert client.sys_stats()["NumGoroutine"] > 0

        dave = xray.vless_client(DAVE_UUID)
        push_known_bytes(dave, http_port)
        users = by_user(client.query_user_counters())
        assert DOWNLOAD <= users["dave@test"].down <= DOWNLOAD + SLACK, users
        assert UPLOAD <= users["dave@test"].up <= UPLOAD + SLACK, users

        client.add_user("vless-in", "erin@test", TypedMessage.vless_account(erin))
        with pytest.raises(SourceError):  # the same email twice
            client.add_user("vless-in", "erin@test", TypedMessage.vless_account(erin))
        with pytest.raises(SourceError):  # no such inbound
            client.add_user("nope", "frank@test", TypedMessage.vless_account(erin))

        socks = xray.vless_client(erin)
        assert socks_http(socks, http_port) == _body(DOWNLOAD)
        users = by_user(client.query_user_counters())
        assert DOWNLOAD <= users["erin@test"].down <= DOWNLOAD + SLACK, users
        assert users["erin@test"].up > 0

        client.remove_user("vless-in", "erin@test")
        with pytest.raises((AssertionError, OSError)):  # Xray drops unknown users
            socks_http(socks, http_port, timeout=2)
        after = by_user(client.query_user_counters())
        assert after["erin@test"] == users["erin@test"]
        assert after["dave@test"] == users["dave@test"]


@pytest.mark.integration
def test_xray_collector_on_the_real_binary(
    xray_binary: str, processes: Processes, http_port: int
) -> None:
    """The agent's collector on a real Xray, as the in-process stand-in tests it: the
    service found by its names, exact counters, an epoch at the core's start that
    stays put, and reads that never reset."""
    xray = XrayNode(processes, xray_binary)
    collector = V2RayCollector(V2RayConfig(type="v2ray", address=f"{LOCAL}:{xray.api}"))
    first = collector.collect()
    assert first.counters == []
    assert xray.started_ms - 2 * 10_000 <= first.epoch <= xray.started_ms + 1_000, first

    push_known_bytes(xray.vless_client(DAVE_UUID), http_port)
    snapshot = collector.collect()
    dave = by_user(snapshot.counters)["dave@test"]
    assert DOWNLOAD <= dave.down <= DOWNLOAD + SLACK, dave
    assert UPLOAD <= dave.up <= UPLOAD + SLACK, dave
    assert snapshot.epoch == first.epoch
    assert collector.collect() == snapshot  # reset=false: the same cumulative figures

    # Xray answers to V2Ray's StatsService names too, with the same counters; the
    # client takes it for Xray, whose HandlerService wants Xray's messages.
    address = f"{LOCAL}:{xray.api}"
    with V2RayStatsClient(address, "v2ray.core.app.stats.command.StatsService") as v2ray_names:
        assert by_user(v2ray_names.query_user_counters())["dave@test"] == dave
    with V2RayStatsClient(address) as client:
        assert client.family == "Xray"
        assert client.service == "xray.app.stats.command.StatsService"
        uptime = client.sys_stats()["Uptime"]
        assert 0 <= uptime <= (time.time_ns() // 1_000_000 - xray.started_ms) // 1000 + 1


@pytest.mark.integration
def test_xray_lists_inbound_users_and_client_addresses(
    xray_binary: str, processes: Processes
) -> None:
    """GetInboundUsers and GetStatsOnlineIpList on the real Xray, as enforcement uses them."""
    xray = XrayNode(processes, xray_binary)
    erin = str(uuid.uuid4())
    with V2RayStatsClient(f"{LOCAL}:{xray.api}") as client:
        assert client.inbound_users("vless-in") == ["dave@test"]
        assert client.inbound_users("vless-in", "dave@test") == ["dave@test"]
        assert client.inbound_users("vless-in", "DAVE@test") == ["dave@test"]  # any case
        assert client.inbound_users("vless-in", "nobody@test") == []  # Xray: one empty User
        with pytest.raises(SourceError, match="handler not found"):
            client.inbound_users("nope")
        client.add_user("vless-in", "erin@test", TypedMessage.vless_account(erin))
        assert sorted(client.inbound_users("vless-in")) == ["dave@test", "erin@test"]

        assert client.online_ips("dave@test") == {}  # no connection yet
        # An open connection from 127.0.0.2 is listed; from 127.0.0.1 it never is.
        quiet = socket.create_server((LOCAL, 0))  # a target that keeps connections open
        for source, listed in (("127.0.0.2", True), (LOCAL, False)):
            socks = xray.vless_client(DAVE_UUID, source)
            with socket.create_connection((LOCAL, socks), timeout=5) as sock:
                sock.sendall(b"\x05\x01\x00")
                assert sock.recv(2) == b"\x05\x00"
                target = socket.inet_aton(LOCAL) + quiet.getsockname()[1].to_bytes(2, "big")
                sock.sendall(b"\x05\x01\x00\x01" + target + b"hello")
                assert sock.recv(10)[:2] == b"\x05\x00"
                if listed:
                    wait_until("dave's address", lambda: "127.0.0.2" in client.online_ips(
                        "dave@test"))
                else:
                    time.sleep(0.5)
                    assert LOCAL not in client.online_ips("dave@test")
        quiet.close()


@pytest.mark.integration
def test_xray_traffic_is_billed_by_the_pipeline(
    xray_binary: str, processes: Processes, http_port: int, settings: Settings, pipeline: Any,
    tmp_path: Path,
) -> None:
    """Real bytes through a real Xray, read by the agent, billed into InfluxDB exactly."""
    xray = XrayNode(processes, xray_binary)
    billed = billed_through_agent(
        tmp_path, settings, pipeline, f'type = "v2ray"\naddress = "{LOCAL}:{xray.api}"',
        lambda: push_known_bytes(xray.vless_client(DAVE_UUID), http_port),
    )
    with V2RayStatsClient(f"{LOCAL}:{xray.api}") as client:
        dave = by_user(client.query_user_counters())["dave@test"]
    assert dave.down >= DOWNLOAD and dave.up >= UPLOAD
    assert billed == {"dave@test": (dave.up, dave.down)}, (tmp_path / "agent.log").read_text()


# --------------------------------------------------------------------------- real sing-box

INSTALL_SING_BOX = Path(__file__).resolve().parents[3] / "deploy" / "local" / "install-sing-box.sh"
ALICE_UUID = str(uuid.UUID(int=0xA11CE))


@pytest.fixture(scope="module")
def sing_box_binary() -> str:
    """sing-box (with_v2ray_api), built by deploy/local/install-sing-box.sh into the cache."""
    done = subprocess.run(
        ["bash", str(INSTALL_SING_BOX)], capture_output=True, text=True, timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"install-sing-box.sh failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def _sing_box_server_config(api: int, vless: int) -> dict[str, Any]:
    users = [{"name": "alice", "uuid": ALICE_UUID}, {"name": "bob", "uuid": BOB_UUID}]
    return {
        "log": {"level": "warn"},
        "inbounds": [
            {"type": "vless", "tag": "vless-in", "listen": LOCAL, "listen_port": vless,
             "users": users}
        ],
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "experimental": {
            "v2ray_api": {
                "listen": f"{LOCAL}:{api}",
                # per-user counters only for the names listed here: bob has none
                "stats": {"enabled": True, "inbounds": ["vless-in"], "users": ["alice"]},
            }
        },
    }


def _sing_box_client_config(socks: int, vless: int, user_uuid: str) -> dict[str, Any]:
    return {
        "log": {"level": "warn"},
        "inbounds": [{"type": "socks", "tag": "socks-in", "listen": LOCAL, "listen_port": socks}],
        "outbounds": [
            {"type": "vless", "tag": "proxy", "server": LOCAL, "server_port": vless,
             "uuid": user_uuid}
        ],
    }


@pytest.mark.integration
def test_sing_box_collector_on_the_real_binary(
    sing_box_binary: str, processes: Processes, http_port: int
) -> None:
    """A real sing-box: its StatsService answers under V2Ray's name, counts exactly, and
    only for the users listed in `stats.users`."""
    api, vless = free_port(), free_port()
    config = processes.folder / "sing-box-server.json"
    config.write_text(json.dumps(_sing_box_server_config(api, vless)))
    started_ms = time.time_ns() // 1_000_000
    processes.start("sing-box-server", [sing_box_binary, "run", "-c", str(config)])
    wait_until("the sing-box API", lambda: listening(api) and listening(vless), timeout=30)

    def client(user_uuid: str) -> int:
        socks = free_port()
        path = processes.folder / f"sing-box-client-{socks}.json"
        path.write_text(json.dumps(_sing_box_client_config(socks, vless, user_uuid)))
        processes.start(f"sing-box-client-{socks}", [sing_box_binary, "run", "-c", str(path)])
        wait_until("the sing-box client", lambda: listening(socks), timeout=30)
        return socks

    collector = V2RayCollector(V2RayConfig(type="v2ray", address=f"{LOCAL}:{api}"))
    first = collector.collect()
    assert first.counters == [], processes.logs()
    assert started_ms - 2 * 10_000 <= first.epoch <= started_ms + 1_000, first

    push_known_bytes(client(ALICE_UUID), http_port)
    push_known_bytes(client(BOB_UUID), http_port)
    snapshot = collector.collect()
    users = by_user(snapshot.counters)
    assert set(users) == {"alice"}, users  # bob is not in stats.users: no counters
    assert DOWNLOAD <= users["alice"].down <= DOWNLOAD + SLACK, users
    assert UPLOAD <= users["alice"].up <= UPLOAD + SLACK, users
    assert snapshot.epoch == first.epoch
    assert collector.collect() == snapshot  # reset=false

    with V2RayStatsClient(f"{LOCAL}:{api}") as stats:
        stats.query_user_counters()
        # sing-box registers its service under V2Ray's name, not experimental.v2rayapi
        assert stats.service == "v2ray.core.app.stats.command.StatsService"
        # and ignores the deprecated `pattern`: every counter comes back, the parser
        # keeps the per-user ones
        names = [name for name, _ in stats.query_stats("user>>>")]
        assert "inbound>>>vless-in>>>traffic>>>uplink" in names, names
        with pytest.raises(SourceError):  # no HandlerService
            stats.remove_user("vless-in", "alice")
