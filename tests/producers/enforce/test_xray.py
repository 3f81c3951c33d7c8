"""The `xray`/`v2ray` enforcement backend: its config and credentials checks, and the
disable/enable cycle on the real Debian V2Ray and the real Xray with real traffic.

Every integration test runs the real server and a real client of the same program
(a SOCKS inbound relaying to the server's VMess, VLESS, Trojan or Shadowsocks
inbound), moves known bytes to a local HTTP server, and reads the counters with
the source's own collector (`V2RayCollector`), as the agent does.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quotaflow.core.contracts import Counter
from quotaflow.core.plans import Action
from quotaflow.producers.enforce.backends import EnforceError, load_backend
from quotaflow.producers.enforce.backends.xray import XrayBackend
from quotaflow.producers.enforce.credentials import Credentials
from quotaflow.producers.sources.v2ray import (
    TypedMessage,
    V2RayCollector,
    V2RayConfig,
    V2RayStatsClient,
)
from tests.producers.enforce.helpers import TcpServer, command
from tests.producers.sources import helpers
from tests.producers.sources.helpers import (
    DOWNLOAD,
    LOCAL,
    SLACK,
    UPLOAD,
    Processes,
    _body,
    free_port,
    listening,
    wait_until,
)

# The source tests' fixtures: Debian's node software, processes killed at teardown,
# the local HTTP server.
node_software = helpers.node_software
processes = helpers.processes
http_port = helpers.http_port

INSTALL_XRAY = Path(__file__).resolve().parents[3] / "deploy" / "local" / "install-xray.sh"
SS_METHOD = "aes-256-gcm"
SS_2022 = "2022-blake3-aes-128-gcm"
SERVER_KEY = base64.b64encode(bytes(range(16))).decode()  # the 2022 inbound's own key


@dataclass(frozen=True)
class User:
    name: str
    uuid: str
    password: str
    key: str  # Shadowsocks 2022 user key
    address: str  # the client's source address: Xray lists no loopback 127.0.0.1


ALICE = User("alice", str(uuid.UUID(int=0xA11CE)), "alice-pw-1",
             base64.b64encode(b"alice-key-16byte").decode(), "127.0.0.2")
BOB = User("bob", str(uuid.UUID(int=0xB0B)), "bob-pw-1",
           base64.b64encode(b"bob-key-16-bytes").decode(), "127.0.0.3")


# ---------------------------------------------------------------------- configs


def _protocol(protocol: str) -> str:
    return "shadowsocks" if protocol.startswith("shadowsocks") else protocol


def _server_client(program: str, protocol: str, user: User) -> dict[str, Any]:
    entry: dict[str, Any] = {"email": user.name, "level": 0}
    if protocol in ("vmess", "vless"):
        entry["id"] = user.uuid
        if protocol == "vmess" and program == "v2ray":
            entry["alterId"] = 0
    elif protocol == "trojan":
        entry["password"] = user.password
    elif protocol == "shadowsocks":
        entry |= {"password": user.password, "method": SS_METHOD}
    else:  # shadowsocks-2022
        entry["password"] = user.key
    return entry


def _inbound(program: str, protocol: str, port: int, users: list[User]) -> dict[str, Any]:
    settings: dict[str, Any] = {"clients": [_server_client(program, protocol, u) for u in users]}
    if protocol == "vless":
        settings["decryption"] = "none"
    if protocol.startswith("shadowsocks"):
        settings["network"] = "tcp"
    if protocol == "shadowsocks-2022":
        settings |= {"method": SS_2022, "password": SERVER_KEY}
    return {
        "tag": f"{protocol}-in", "listen": LOCAL, "port": port,
        "protocol": _protocol(protocol), "settings": settings,
    }


def server_config(program: str, api: int, inbound: dict[str, Any]) -> dict[str, Any]:
    level = {"statsUserUplink": True, "statsUserDownlink": True}
    config: dict[str, Any] = {
        "log": {"loglevel": "warning"},
        "stats": {},
        "outbounds": [{"tag": "direct", "protocol": "freedom"}],
    }
    if program == "xray":
        level["statsUserOnline"] = True  # the client addresses that cut_scope "client" needs
        config["api"] = {
            "tag": "api", "listen": f"{LOCAL}:{api}", "services": ["StatsService", "HandlerService"]
        }
        config["inbounds"] = [inbound]
    else:
        config["api"] = {"tag": "api", "services": ["StatsService", "HandlerService"]}
        api_inbound = {
            "tag": "api", "listen": LOCAL, "port": api, "protocol": "dokodemo-door",
            "settings": {"address": LOCAL},
        }
        config["inbounds"] = [api_inbound, inbound]
        config["routing"] = {
            "rules": [{"type": "field", "inboundTag": ["api"], "outboundTag": "api"}]
        }
    config["policy"] = {"levels": {"0": level}}
    return config


def _outbound(program: str, protocol: str, port: int, user: User) -> dict[str, Any]:
    settings: dict[str, Any]
    if protocol in ("vmess", "vless"):
        account: dict[str, Any] = {"id": user.uuid}
        if protocol == "vless":
            account["encryption"] = "none"
        elif program == "v2ray":
            account["alterId"] = 0
        settings = {"vnext": [{"address": LOCAL, "port": port, "users": [account]}]}
    elif protocol == "trojan":
        settings = {"servers": [{"address": LOCAL, "port": port, "password": user.password}]}
    elif protocol == "shadowsocks":
        server = {"address": LOCAL, "port": port, "method": SS_METHOD, "password": user.password}
        settings = {"servers": [server]}
    else:
        server = {
            "address": LOCAL, "port": port, "method": SS_2022,
            "password": f"{SERVER_KEY}:{user.key}",
        }
        settings = {"servers": [server]}
    return {"protocol": _protocol(protocol), "sendThrough": user.address, "settings": settings}


def credentials(program: str, protocol: str, users: list[User]) -> Credentials:
    """The credentials file, in its documented TOML form."""
    entries = []
    for user in users:
        lines = [
            "[[accounts]]", f'user_id = "{user.name}"', f'backend = "{program}"',
            f'inbound = "{protocol}-in"', f'protocol = "{_protocol(protocol)}"',
        ]
        if protocol in ("vmess", "vless"):
            lines.append(f'id = "{user.uuid}"')
        elif protocol == "trojan":
            lines.append(f'password = "{user.password}"')
        elif protocol == "shadowsocks":
            lines += [f'password = "{user.password}"', f'method = "{SS_METHOD}"']
        else:
            lines += [f'password = "{user.key}"', f'method = "{SS_2022}"']
        entries.append("\n".join(lines))
    return Credentials.parse("\n\n".join(entries), "toml")


@pytest.fixture(scope="module")
def xray_binary() -> str:
    """Xray, built by deploy/local/install-xray.sh into the quotaflow cache."""
    done = subprocess.run(
        ["bash", str(INSTALL_XRAY)], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"install-xray.sh failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


class Node:
    """A real V2Ray or Xray server with one inbound for alice and bob, and its clients."""

    def __init__(self, processes: Processes, program: str, binary: str, protocol: str) -> None:
        self.processes, self.program, self.binary = processes, program, binary
        self.protocol, self.tag = protocol, f"{protocol}-in"
        self.api, self.port = free_port(), free_port()
        config = server_config(
            program, self.api, _inbound(program, protocol, self.port, [ALICE, BOB])
        )
        path = processes.folder / f"{program}-server.json"
        path.write_text(json.dumps(config))
        processes.start(f"{program}-server", self._argv(path))
        wait_until(
            f"the {program} API", lambda: listening(self.api) and listening(self.port), timeout=30
        )
        self.address = f"{LOCAL}:{self.api}"

    def _argv(self, config: Path) -> list[str]:
        if self.program == "xray":
            return [self.binary, "run", "-c", str(config)]
        return [self.binary, "-config", str(config)]

    def client(self, user: User) -> int:
        """A client of the same program for `user`: its SOCKS port."""
        socks = free_port()
        config = {
            "log": {"loglevel": "warning"},
            "inbounds": [{"listen": LOCAL, "port": socks, "protocol": "socks"}],
            "outbounds": [_outbound(self.program, self.protocol, self.port, user)],
        }
        path = self.processes.folder / f"{self.program}-client-{user.name}-{socks}.json"
        path.write_text(json.dumps(config))
        self.processes.start(f"{self.program}-client-{user.name}-{socks}", self._argv(path))
        wait_until(f"the {self.program} client", lambda: listening(socks), timeout=30)
        return socks

    def backend(self, **options: Any) -> XrayBackend:
        entry = {"type": self.program, "address": self.address, "inbounds": [self.tag], **options}
        backend = load_backend(entry, credentials(self.program, self.protocol, [ALICE, BOB]))
        assert isinstance(backend, XrayBackend)
        return backend

    def collector(self) -> V2RayCollector:
        return V2RayCollector(V2RayConfig(type="v2ray", address=self.address))


def _binary(program: str, request: pytest.FixtureRequest) -> str:
    if program == "xray":
        binary: str = request.getfixturevalue("xray_binary")
        return binary
    request.getfixturevalue("node_software")
    return "v2ray"


def alice_of(collector: V2RayCollector) -> Counter:
    snapshot = collector.collect()
    found = {c.user_id: c for c in snapshot.counters}
    return found.get("alice", Counter(user_id="alice", up=0, down=0))


def http_through(
    socks: int, http_port: int, method: str = "GET", body: bytes = b"", timeout: float = 10
) -> bytes:
    """One HTTP/1.0 request through a SOCKS5 proxy to the local HTTP server; the body.

    As `helpers.socks_http`, with two differences the programs here need: the
    response is read up to its Content-Length rather than to the end of the
    connection (Xray's Shadowsocks 2022 relays the bytes, but not the server's
    close), and a POST's body goes a moment after its head (Xray's Trojan client
    fails a first payload of 300 kB: "failed to write A request payload >
    common/buf: buffer is full", and resets the connection).
    """
    with socket.create_connection((LOCAL, socks), timeout=timeout) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(LOCAL) + http_port.to_bytes(2, "big"))
        assert sock.recv(10)[:2] == b"\x05\x00"
        head = f"{method} /blob HTTP/1.0\r\nHost: {LOCAL}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode())
        if body:
            time.sleep(0.2)
            sock.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the connection ended before the response's head: {data[:100]!r}"
            data += chunk
        header, _, payload = data.partition(b"\r\n\r\n")
        assert header.startswith(b"HTTP/1.0 200"), header[:100]
        size = int(header.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(payload) < size:
            chunk = sock.recv(65536)
            assert chunk, f"the connection ended after {len(payload)} of {size} bytes"
            payload += chunk
    return payload


def push_known_bytes(socks: int, http_port: int) -> None:
    """DOWNLOAD bytes down and UPLOAD bytes up through the proxy, checked end to end."""
    assert http_through(socks, http_port) == _body(DOWNLOAD)
    assert http_through(socks, http_port, "POST", _body(UPLOAD)) == str(UPLOAD).encode()


def refused(socks: int, http_port: int) -> bool:
    """Whether a new request through the proxy fails (within 3 s)."""
    try:
        http_through(socks, http_port, timeout=3)
    except (AssertionError, OSError):
        return True
    return False


CASES = [
    ("v2ray", "vmess"), ("v2ray", "vless"), ("v2ray", "trojan"),
    ("xray", "vmess"), ("xray", "vless"), ("xray", "trojan"),
    ("xray", "shadowsocks"), ("xray", "shadowsocks-2022"),
]


# ---------------------------------------------------------------- the real programs


@pytest.mark.integration
@pytest.mark.parametrize(("program", "protocol"), CASES, ids=[f"{p}-{q}" for p, q in CASES])
def test_disable_and_enable_with_real_traffic(
    program: str, protocol: str, processes: Processes, http_port: int,
    request: pytest.FixtureRequest,
) -> None:
    node = Node(processes, program, _binary(program, request), protocol)
    alice, bob = node.client(ALICE), node.client(BOB)
    collector = node.collector()
    backend = node.backend()
    try:
        assert backend.serves("alice") and backend.serves("bob") and not backend.serves("carol")
        push_known_bytes(alice, http_port)  # traffic flows
        first = collector.collect()
        before = alice_of(collector)  # what the agent snapshots right before a disable
        assert UPLOAD <= before.up <= UPLOAD + SLACK, (before, processes.logs())
        assert DOWNLOAD <= before.down <= DOWNLOAD + SLACK, before

        done = backend.apply(command("disable"))
        assert (done.outcome, done.detail) == ("applied", f"removed from {node.tag}")
        again = backend.apply(command("disable"))
        assert (again.outcome, again.detail) == ("already", f"not on {node.tag}")
        assert refused(alice, http_port), "a removed user still gets through"
        push_known_bytes(bob, http_port)  # the others are not touched
        # Removal keeps the user's counters: nothing moved is lost, nothing is reset.
        assert alice_of(collector) == before

        done = backend.apply(command("enable"))
        assert (done.outcome, done.detail) == ("applied", f"added to {node.tag}")
        again = backend.apply(command("enable"))
        assert (again.outcome, again.detail) == ("already", f"already on {node.tag}")
        push_known_bytes(alice, http_port)  # works again
        after = alice_of(collector)
        # The counters go on from where they were: one cumulative series, same epoch.
        assert before.up + UPLOAD <= after.up <= before.up + UPLOAD + SLACK, (before, after)
        assert before.down + DOWNLOAD <= after.down <= before.down + DOWNLOAD + SLACK
        assert collector.collect().epoch == first.epoch
        assert backend.apply(command("warn")).outcome == "skipped"
    finally:
        backend.close()


def trickle_bytes(conn: socket.socket) -> None:
    """Once the connection sends a line, send it 1000 bytes every 20 ms until cut off."""
    conn.recv(64)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        conn.sendall(b"x" * 1000)
        time.sleep(0.02)


@pytest.fixture(scope="module")
def trickle() -> Iterator[TcpServer]:
    server = TcpServer(trickle_bytes)
    try:
        yield server
    finally:
        server.close()


class Stream:
    """One long download through a SOCKS proxy, read in a thread: an open connection."""

    def __init__(self, socks: int, port: int) -> None:
        self.sock = socket.create_connection((LOCAL, socks), timeout=5)
        self.sock.sendall(b"\x05\x01\x00")
        assert self.sock.recv(2) == b"\x05\x00"
        request = b"\x05\x01\x00\x01" + socket.inet_aton(LOCAL) + port.to_bytes(2, "big")
        self.sock.sendall(request)
        assert self.sock.recv(10)[:2] == b"\x05\x00"
        self.sock.sendall(b"start\n")
        self.received = 0
        self.ended: float | None = None
        self.sock.settimeout(30)
        threading.Thread(target=self._read, daemon=True).start()
        wait_until("the stream's first bytes", lambda: self.received > 0)

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.received += len(chunk)
        except OSError:
            pass
        self.ended = time.monotonic()
        self.sock.close()

    def flowing(self, seconds: float = 1.0) -> bool:
        """Whether bytes keep coming for `seconds` and the connection stays open."""
        start = self.received
        time.sleep(seconds)
        return self.ended is None and self.received > start + 10_000


@pytest.mark.integration
@pytest.mark.parametrize("program", ["v2ray", "xray"])
def test_open_connections_survive_removal_unless_cut(
    program: str, processes: Processes, http_port: int, trickle: TcpServer,
    request: pytest.FixtureRequest,
) -> None:
    """Removal leaves open connections flowing; `cut_connections` ends them with `ss -K`.

    Xray cuts only the disabled user's client addresses (its online list); V2Ray,
    which has none, cuts every connection on the inbound's port, so bob's open
    connection ends too, while bob can connect again at once and alice cannot.
    """
    node = Node(processes, program, _binary(program, request), "vless")
    alice, bob = node.client(ALICE), node.client(BOB)
    plain = node.backend()
    scope = "client" if program == "xray" else "port"
    cutter = node.backend(cut_connections=True, ports={node.tag: node.port}, cut_scope=scope)
    try:
        alice_stream, bob_stream = Stream(alice, trickle.port), Stream(bob, trickle.port)
        assert plain.apply(command("disable")).outcome == "applied"
        assert refused(alice, http_port)
        # The connection opened before the removal goes on: nothing closes it.
        assert alice_stream.flowing(1.5), "the open connection stopped without a cut"

        started = time.monotonic()
        done = cutter.apply(command("disable"))  # already removed, and now cut
        assert done.outcome == "already", done
        wait_until("the cut", lambda: alice_stream.ended is not None, timeout=5)
        assert alice_stream.ended is not None
        print(f"{program}: cut after {alice_stream.ended - started:.3f} s: {done.detail}")
        if program == "xray":
            assert done.detail == f"not on {node.tag}; cut 1 connection(s) on port {node.port}" \
                f" from {ALICE.address}"
            assert bob_stream.flowing(), "bob's connection was cut"
        else:
            assert done.detail == f"not on {node.tag}; cut 2 connection(s) on port {node.port}"
            wait_until("bob's cut too", lambda: bob_stream.ended is not None, timeout=5)
            push_known_bytes(bob, http_port)
        assert refused(alice, http_port)

        # A first disable with the cutter: removed and cut at once.
        assert cutter.apply(command("enable")).outcome == "applied"
        alice_stream = Stream(alice, trickle.port)
        done = cutter.apply(command("disable"))
        assert done.outcome == "applied" and "cut " in done.detail, done
        wait_until("the cut", lambda: alice_stream.ended is not None, timeout=5)
    finally:
        plain.close()
        cutter.close()


@pytest.mark.integration
def test_xray_old_shadowsocks_duplicate_email(
    processes: Processes, http_port: int, xray_binary: str
) -> None:
    """Xray's old-style Shadowsocks takes the same email twice; the backend copes.

    Disabling removes every copy (one RemoveUserOperation removes one), and
    enabling asks GetInboundUsers first, so it never adds a second copy.
    """
    node = Node(processes, "xray", xray_binary, "shadowsocks")
    backend = node.backend()
    alice = node.client(ALICE)
    with V2RayStatsClient(node.address) as api:
        account = TypedMessage.shadowsocks_account(ALICE.password, SS_METHOD)
        api.add_user(node.tag, "alice", account)  # accepted: no "already exists" here
        assert api.inbound_users(node.tag).count("alice") == 2
        try:
            done = backend.apply(command("disable"))
            assert (done.outcome, done.detail) == ("applied", f"removed from {node.tag} (2 copies)")
            assert "alice" not in api.inbound_users(node.tag)
            assert refused(alice, http_port)
            assert backend.apply(command("enable")).outcome == "applied"
            assert backend.apply(command("enable")).outcome == "already"
            assert api.inbound_users(node.tag).count("alice") == 1
            push_known_bytes(alice, http_port)
        finally:
            backend.close()


# ------------------------------------------------------------------ config, no program


def _entry(**options: Any) -> dict[str, Any]:
    return {"type": "xray", "address": f"{LOCAL}:1", "inbounds": ["vless-in"], **options}


def test_build_refuses_a_configured_user_without_credentials() -> None:
    creds = credentials("xray", "vless", [ALICE])
    with pytest.raises(ValueError, match=r"no credentials .* for the configured users: bob"):
        load_backend(_entry(users=["alice", "bob"]), creds)
    # alice's account is on another inbound than the one configured
    with pytest.raises(ValueError, match="configured users: alice"):
        load_backend(_entry(inbounds=["vmess-in"], users=["alice"]), creds)
    backend = load_backend(_entry(users=["alice"]), creds)
    assert backend.name == "xray" and backend.serves("alice") and not backend.serves("bob")
    backend.close()


def test_serves_only_users_with_an_account_on_its_inbounds() -> None:
    account = {
        "user_id": "alice", "backend": "v2ray", "inbound": "vless-in", "protocol": "vless",
        "id": ALICE.uuid,
    }
    creds = Credentials.parse(json.dumps({"accounts": [account]}), "json")  # a panel export
    backend = load_backend(_entry(type="v2ray"), creds)
    assert backend.name == "v2ray"
    assert backend.serves("alice") and not backend.serves("bob")
    assert backend.apply(command("warn")).outcome == "skipped"
    assert backend.apply(command("disable", "bob")).outcome == "skipped"
    other = load_backend(_entry(inbounds=["trojan-in"]), creds)
    assert not other.serves("alice")
    backend.close()
    other.close()


@pytest.mark.parametrize(
    ("text", "options", "problem"),
    [
        ('protocol = "vless"', {}, "needs `id`"),
        ('protocol = "vless"\nid = "not-a-uuid"', {}, "not a UUID"),
        ('protocol = "trojan"', {}, "trojan needs `password`"),
        ('protocol = "shadowsocks"\npassword = "p"', {}, "needs `method`"),
        ('protocol = "shadowsocks"\npassword = "p"\nmethod = "rc4-md5"', {}, "Shadowsocks method"),
        ('protocol = "shadowsocks"\npassword = "p"\nmethod = "aes-128-gcm"', {"type": "v2ray"},
         "V2Ray's Shadowsocks inbound has one fixed user"),
        (f'protocol = "vmess"\nid = "{ALICE.uuid}"', {"cut_connections": True},
         "needs each inbound's listen port"),
        (f'protocol = "vmess"\nid = "{ALICE.uuid}"',
         {"type": "v2ray", "cut_connections": True, "ports": {"vless-in": 443}},
         "V2Ray keeps no list"),
        (f'protocol = "vmess"\nid = "{ALICE.uuid}"', {"ports": {"other": 443}},
         "not in `inbounds`"),
        (f'protocol = "vmess"\nid = "{ALICE.uuid}"', {"inbounds": []}, "at least 1"),
    ],
)
def test_build_refuses_what_it_could_not_apply(
    text: str, options: dict[str, Any], problem: str
) -> None:
    backend = options.get("type", "xray")
    creds = Credentials.parse(
        f'[[accounts]]\nuser_id = "alice"\nbackend = "{backend}"\ninbound = "vless-in"\n{text}',
        "toml",
    )
    with pytest.raises(ValueError, match=problem):
        load_backend(_entry(**options), creds)


def test_build_refuses_two_users_with_one_name_on_an_inbound() -> None:
    creds = Credentials.parse(
        "\n".join(
            f'[[accounts]]\nuser_id = "{user}"\nbackend = "xray"\ninbound = "vless-in"\n'
            f'protocol = "vless"\nid = "{uuid.uuid4()}"\nemail = "Shared@x"'
            for user in ("alice", "bob")
        ),
        "toml",
    )
    with pytest.raises(ValueError, match="two accounts named"):
        load_backend(_entry(), creds)


def test_an_unreachable_api_is_an_enforce_error() -> None:
    creds = credentials("xray", "vless", [ALICE])
    backend = load_backend(_entry(address=f"{LOCAL}:{free_port()}", timeout_s=1), creds)
    try:
        actions: tuple[Action, ...] = ("disable", "enable")
        for action in actions:
            with pytest.raises(EnforceError, match="UNAVAILABLE"):
                backend.apply(command(action))
    finally:
        backend.close()
