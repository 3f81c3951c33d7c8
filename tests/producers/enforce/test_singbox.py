"""The `sing-box` enforcement backend: its config and credentials checks, and the
disable/enable cycle on a real sing-box (deploy/local/install-sing-box.sh).

The server has one managed Shadowsocks 2022 inbound behind the SSM API, the V2Ray
API (per-user stats, what the `v2ray` collector reads) and the Clash API. Each
user's client is another sing-box: a mixed (SOCKS) inbound relaying to the
server with the user's key. Traffic goes to a local HTTP server and a local
echo server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import socketserver
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quotaflow.producers.enforce.backends import EnforceError, load_backend
from quotaflow.producers.enforce.backends.singbox import SingBoxBackend
from quotaflow.producers.enforce.credentials import Credentials
from quotaflow.producers.sources.v2ray import V2RayStatsClient
from tests.producers.enforce.helpers import command
from tests.producers.sources import helpers
from tests.producers.sources.helpers import (
    DOWNLOAD,
    LOCAL,
    SLACK,
    UPLOAD,
    Processes,
    free_port,
    listening,
    wait_until,
)

# The source tests' fixtures: processes killed at teardown, the local HTTP server.
processes = helpers.processes
http_port = helpers.http_port

INSTALL = Path(__file__).resolve().parents[3] / "deploy" / "local" / "install-sing-box.sh"
METHOD = "2022-blake3-aes-128-gcm"
SERVER_KEY = base64.b64encode(bytes(range(16))).decode()  # the inbound's own key
SSM_PATH = "/ss"
# sing-box registers its V2Ray API StatsService under V2Ray's name
STATS_SERVICE = "v2ray.core.app.stats.command.StatsService"


@dataclass(frozen=True)
class User:
    name: str
    key: str  # the user's Shadowsocks 2022 key (uPSK)


ALICE = User("alice", base64.b64encode(b"alice-key-16byte").decode())
KEY = ALICE.key
BOB = User("bob", base64.b64encode(b"bob-key-16-bytes").decode())


def credentials(*users: User, path: str = SSM_PATH) -> Credentials:
    return Credentials.model_validate({
        "accounts": [
            {"user_id": u.name, "backend": "sing-box", "inbound": path, "password": u.key}
            for u in users
        ]
    })


@pytest.fixture(scope="module")
def sing_box() -> str:
    """sing-box, built by deploy/local/install-sing-box.sh into the quotaflow cache."""
    done = subprocess.run(
        ["bash", str(INSTALL)], capture_output=True, text=True, timeout=1200, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"install-sing-box.sh failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


class Node:
    """A sing-box server with a managed inbound, and one sing-box client per user."""

    def __init__(self, processes: Processes, binary: str) -> None:
        self.processes = processes
        self.binary = binary
        self.ss, self.ssm, self.v2ray, self.clash = (free_port() for _ in range(4))
        config = {
            "log": {"level": "warn"},
            "inbounds": [{
                "type": "shadowsocks", "tag": "ss-in", "listen": LOCAL, "listen_port": self.ss,
                "method": METHOD, "password": SERVER_KEY, "managed": True,
            }],
            "services": [{
                "type": "ssm-api", "tag": "ssm", "listen": LOCAL, "listen_port": self.ssm,
                "servers": {SSM_PATH: "ss-in"},
            }],
            "outbounds": [{"type": "direct", "tag": "direct"}],
            "experimental": {
                "v2ray_api": {
                    "listen": f"{LOCAL}:{self.v2ray}",
                    "stats": {"enabled": True, "users": [ALICE.name, BOB.name]},
                },
                "clash_api": {"external_controller": f"{LOCAL}:{self.clash}"},
            },
        }
        self._start("server", config)
        for port in (self.ss, self.ssm, self.v2ray, self.clash):
            try:
                wait_until(f"sing-box on port {port}",
                           lambda p=port: listening(p))  # type: ignore[misc]
            except AssertionError as exc:
                raise AssertionError(f"{exc}; {processes.logs()}") from None
        self.url = f"http://{LOCAL}:{self.ssm}"

    def _start(self, name: str, config: dict[str, Any]) -> None:
        path = self.processes.folder / f"{name}.json"
        path.write_text(json.dumps(config))
        self.processes.start(name, [self.binary, "run", "-c", str(path)])

    def client(self, user: User) -> int:
        """A SOCKS port relaying to the server as `user`."""
        port = free_port()
        self._start(f"client-{user.name}", {
            "log": {"level": "warn"},
            "inbounds": [{"type": "mixed", "tag": "in", "listen": LOCAL, "listen_port": port}],
            "outbounds": [{
                "type": "shadowsocks", "tag": "ss", "server": LOCAL, "server_port": self.ss,
                "method": METHOD, "password": f"{SERVER_KEY}:{user.key}",
            }],
        })
        wait_until(f"the client of {user.name}", lambda: listening(port))
        return port

    def backend(self, *users: User, **options: Any) -> SingBoxBackend:
        entry = {"type": "sing-box", "url": self.url, **options}
        backend = load_backend(entry, credentials(*users))
        assert isinstance(backend, SingBoxBackend)
        return backend

    def get(self, base: str, path: str) -> Any:
        with urllib.request.urlopen(base + path, timeout=5) as response:
            return json.loads(response.read())

    def ssm_stats(self) -> dict[str, tuple[int, int]]:
        """(up, down) per user, as the SSM API's `GET /server/v1/stats` reports them."""
        stats = self.get(self.url, f"{SSM_PATH}/server/v1/stats")
        return {u["username"]: (u["uplinkBytes"], u["downlinkBytes"]) for u in stats["users"]}

    def v2ray_stats(self) -> dict[str, tuple[int, int]]:
        """(up, down) per user from the V2Ray API (the `v2ray` collector's reading)."""
        with V2RayStatsClient(f"{LOCAL}:{self.v2ray}", STATS_SERVICE) as client:
            return {c.user_id: (c.up, c.down) for c in client.query_user_counters()}


@pytest.fixture
def node(sing_box: str, processes: Processes) -> Node:
    return Node(processes, sing_box)


def _body(size: int) -> bytes:
    return (b"quotaflow-" * (size // 10 + 1))[:size]


def _socks(socks: int, port: int, timeout: float = 5) -> socket.socket:
    """A connection to 127.0.0.1:port through the SOCKS proxy on `socks`."""
    sock = socket.create_connection((LOCAL, socks), timeout=timeout)
    try:
        sock.sendall(b"\x05\x01\x00")
        if sock.recv(2) != b"\x05\x00":
            raise OSError("SOCKS greeting refused")
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(LOCAL) + port.to_bytes(2, "big"))
        reply = sock.recv(10)
        if reply[:2] != b"\x05\x00":
            raise OSError(f"SOCKS connect refused: {reply!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def fetch(socks: int, http_port: int, method: str = "GET", body: bytes = b"") -> bytes | None:
    """One HTTP request through the proxy: the response body, or None when it failed."""
    try:
        with _socks(socks, http_port) as sock:
            head = f"{method} /blob HTTP/1.0\r\nHost: {LOCAL}\r\n"
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    header, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    return payload if header.startswith(b"HTTP/1.0 200") else None


def push_known_bytes(socks: int, http_port: int) -> None:
    """DOWNLOAD bytes down and UPLOAD bytes up, checked end to end."""
    assert fetch(socks, http_port) == _body(DOWNLOAD)
    assert fetch(socks, http_port, "POST", _body(UPLOAD)) == str(UPLOAD).encode()


def works(socks: int, http_port: int) -> bool:
    return fetch(socks, http_port) == _body(DOWNLOAD)


class _Echo(socketserver.BaseRequestHandler):
    """Sends back what it reads, until the other side closes."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """A local TCP echo server."""
    server = socketserver.ThreadingTCPServer((LOCAL, 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def exchange(sock: socket.socket, size: int) -> None:
    """Send `size` bytes on an open connection through the proxy and read them back."""
    sender = threading.Thread(target=sock.sendall, args=(_body(size),), daemon=True)
    sender.start()
    got = 0
    while got < size:
        chunk = sock.recv(65536)
        assert chunk, f"the connection ended after {got} of {size} bytes"
        got += len(chunk)
    sender.join(10)
    assert got == size


# --------------------------------------------------------------------------- real sing-box


@pytest.mark.integration
def test_disable_and_enable_with_real_traffic(node: Node, http_port: int) -> None:
    """The managed inbound starts empty; enable adds, disable removes, each twice acts once.

    The SSM API's counters of a user are dropped when the user is removed: a
    user added back starts at 0.
    """
    backend = node.backend(ALICE, BOB)
    alice, bob = node.client(ALICE), node.client(BOB)
    try:
        assert not works(alice, http_port)  # no users until the API adds them
        first = backend.apply(command("enable"))
        assert (first.outcome, first.detail) == ("applied", "added to /ss")
        again = backend.apply(command("enable"))
        assert (again.outcome, again.detail) == ("already", "already on /ss")
        assert backend.apply(command("enable", "bob")).outcome == "applied"

        push_known_bytes(alice, http_port)
        assert works(bob, http_port)
        up, down = node.ssm_stats()["alice"]
        # the SSM API counts the user's payload: the HTTP requests and answers
        assert UPLOAD <= up <= UPLOAD + SLACK and DOWNLOAD <= down <= DOWNLOAD + SLACK
        billed_before = node.v2ray_stats()["alice"]

        removed = backend.apply(command("disable"))
        assert (removed.outcome, removed.detail) == ("applied", "removed from /ss")
        assert backend.apply(command("disable")).outcome == "already"
        assert not works(alice, http_port)
        assert works(bob, http_port)  # the other user is not touched
        assert "alice" not in node.ssm_stats()  # removed with its counters
        assert "bob" in node.ssm_stats()
        assert node.v2ray_stats()["alice"] == billed_before  # the V2Ray API keeps them

        back = backend.apply(command("enable"))
        assert (back.outcome, back.detail) == ("applied", "added to /ss")
        assert node.ssm_stats()["alice"] == (0, 0)  # added back: counting from 0
        push_known_bytes(alice, http_port)
        assert backend.apply(command("enable")).outcome == "already"
        up_after, down_after = node.ssm_stats()["alice"]
        assert UPLOAD <= up_after <= UPLOAD + SLACK and DOWNLOAD <= down_after <= DOWNLOAD + SLACK
        v2_up, v2_down = node.v2ray_stats()["alice"]
        assert v2_up >= billed_before[0] + UPLOAD and v2_down >= billed_before[1] + DOWNLOAD
        assert backend.apply(command("warn")).outcome == "skipped"
    finally:
        backend.close()


@pytest.mark.integration
def test_open_connections_are_not_cut(node: Node, echo_port: int, http_port: int) -> None:
    """A connection open when its user is removed goes on; its later bytes are in the V2Ray
    API's counters but nowhere in the SSM API's; the Clash API names no user."""
    backend = node.backend(ALICE)
    alice = node.client(ALICE)
    try:
        backend.apply(command("enable"))
        with _socks(alice, echo_port, timeout=10) as sock:
            exchange(sock, 10_000)
            connections = node.get(f"http://{LOCAL}:{node.clash}", "/connections")["connections"]
            ours = [c for c in connections if c["metadata"]["destinationPort"] == str(echo_port)]
            assert len(ours) == 1 and ours[0]["metadata"]["type"] == "shadowsocks/ss-in"
            assert "alice" not in json.dumps(ours)  # no user to cut a user's connections by
            ssm_before, v2_before = node.ssm_stats()["alice"], node.v2ray_stats()["alice"]
            assert backend.apply(command("disable")).outcome == "applied"
            assert not works(alice, http_port)  # new connections fail at once
            exchange(sock, 500_000)  # the open one goes on, both ways
            v2_after = node.v2ray_stats()["alice"]
        assert v2_after[0] >= v2_before[0] + 500_000 and v2_after[1] >= v2_before[1] + 500_000
        assert "alice" not in node.ssm_stats()
        assert ssm_before[0] >= 10_000
        backend.apply(command("enable"))
        assert node.ssm_stats()["alice"] == (0, 0)  # the 500 kB after removal: never counted
    finally:
        backend.close()


def _raw(node: Node, method: str, path: str, body: dict[str, str] | None = None) -> int:
    """One SSM API call as another panel would make it; the HTTP status."""
    request = urllib.request.Request(
        node.url + SSM_PATH + "/server/v1" + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
def test_a_key_the_server_refuses_is_taken_off_its_list(node: Node, http_port: int) -> None:
    """sing-box keeps a user whose key it refused on its list, and then refuses every change
    of the inbound's users; the backend takes the name off again, and says why it failed
    without the key."""
    mallory = User("mallory", "not-a-base64-key!")
    # a method other than 2022 lets any password through the backend's own check
    backend = node.backend(ALICE, mallory, method="aes-128-gcm")
    alice = node.client(ALICE)
    try:
        with pytest.raises(EnforceError, match=r"POST /ss/server/v1/users \('mallory'\): HTTP 400"
                           ) as caught:
            backend.apply(command("enable", "mallory"))
        assert mallory.key not in str(caught.value)
        assert "mallory" not in node.ssm_stats()
        assert backend.apply(command("enable")).outcome == "applied"  # nothing left stuck
        assert works(alice, http_port)
        assert backend.apply(command("disable")).outcome == "applied"
        assert not works(alice, http_port)
    finally:
        backend.close()


@pytest.mark.integration
def test_a_refused_removal_is_not_taken_for_done(node: Node, http_port: int) -> None:
    """While another panel's bad key blocks the inbound, DELETE answers 400 and the user
    still gets in: the backend fails, and keeps failing on retry, until it is fixed."""
    backend = node.backend(ALICE)
    alice = node.client(ALICE)
    try:
        backend.apply(command("enable"))
        assert _raw(node, "POST", "/users", {"username": "bad", "uPSK": "bad-key!"}) == 400
        for _ in range(2):
            with pytest.raises(EnforceError, match="DELETE /ss/server/v1/users/alice: HTTP 400"):
                backend.apply(command("disable"))
            assert works(alice, http_port)  # sing-box still lets alice in
        assert _raw(node, "DELETE", "/users/bad") == 204  # the other panel's fix
        assert backend.apply(command("disable")).outcome == "applied"
        assert not works(alice, http_port)
    finally:
        backend.close()


@pytest.mark.integration
def test_names_that_need_escaping_reach_the_user(node: Node) -> None:
    """A user name with spaces and URL characters is added and removed as itself."""
    odd = User("a b?#&%é", ALICE.key)
    backend = node.backend(odd)
    try:
        assert backend.apply(command("enable", odd.name)).outcome == "applied"
        assert odd.name in node.ssm_stats()
        assert backend.apply(command("disable", odd.name)).outcome == "applied"
        assert odd.name not in node.ssm_stats()
        assert backend.apply(command("disable", odd.name)).outcome == "already"
    finally:
        backend.close()


# --------------------------------------------------------------------------- config, no server


def test_build_refuses_a_configured_user_without_credentials() -> None:
    entry = {"type": "sing-box", "users": ["alice", "carol"]}
    with pytest.raises(ValueError, match="no sing-box credentials on any SSM path for the "
                                         "configured users: carol"):
        load_backend(entry, credentials(ALICE, BOB))
    load_backend({**entry, "servers": ["/ss"]}, credentials(ALICE, User("carol", KEY)))
    # carol's account is on another path than the configured one
    mixed = credentials(ALICE).model_copy(update={"accounts": (
        *credentials(ALICE).accounts, *credentials(User("carol", KEY), path="/other").accounts,
    )})
    with pytest.raises(ValueError, match="no sing-box credentials on /ss for the configured "
                                         "users: carol"):
        load_backend({**entry, "servers": ["/ss"]}, mixed)


def test_serves_users_with_an_account_on_its_paths() -> None:
    creds = credentials(ALICE).model_copy(update={"accounts": (
        *credentials(ALICE).accounts, *credentials(BOB, path="/other").accounts,
    )})
    every = load_backend({"type": "sing-box"}, creds)
    assert every.serves("alice") and every.serves("bob") and not every.serves("carol")
    only_ss = load_backend({"type": "sing-box", "servers": ["/ss"]}, creds)
    assert only_ss.serves("alice") and not only_ss.serves("bob")
    only_alice = load_backend({"type": "sing-box", "users": ["alice"]}, creds)
    assert only_alice.serves("alice") and not only_alice.serves("bob")
    assert only_alice.apply(command("disable", "bob")).outcome == "skipped"
    assert only_alice.apply(command("warn")).outcome == "skipped"


@pytest.mark.parametrize(
    ("accounts", "problem"),
    [
        ([("alice", "/ss", "a/b", KEY)], "cannot contain '/'"),
        ([("alice", "/ss", "..", KEY)], "cannot be a sing-box SSM user name"),
        ([("alice", "ss", None, KEY)], "is not an SSM server path"),
        ([("alice", "/ss", "same", KEY), ("bob", "/ss", "same", KEY)], "two accounts named 'same'"),
        ([("alice", "/ss", None, "bad-key!")], "the key is not base64"),
        ([("alice", "/ss", None, "YWxpY2U=")], "the key is 5 bytes; 16 or 32 are taken"),
    ],
)
def test_build_refuses_accounts_it_could_not_apply(
    accounts: list[tuple[str, str, str | None, str]], problem: str
) -> None:
    creds = Credentials.model_validate({"accounts": [
        {"user_id": user, "backend": "sing-box", "inbound": path, "name": name, "password": key}
        for user, path, name, key in accounts
    ]})
    with pytest.raises(ValueError, match=problem):
        load_backend({"type": "sing-box"}, creds)


def test_build_checks_keys_against_the_configured_method() -> None:
    wide = User("wide", base64.b64encode(bytes(32)).decode())
    load_backend({"type": "sing-box"}, credentials(ALICE, wide))  # 16 and 32 bytes: either
    load_backend({"type": "sing-box", "method": "2022-blake3-aes-128-gcm"}, credentials(ALICE))
    with pytest.raises(ValueError, match="'wide' on '/ss': `password`: the key is 32 bytes; "
                                         "2022-blake3-aes-128-gcm takes 16"):
        load_backend({"type": "sing-box", "method": METHOD}, credentials(ALICE, wide))
    plain = User("plain", "any password")
    load_backend({"type": "sing-box", "method": "aes-256-gcm"}, credentials(plain))
    with pytest.raises(ValueError, match="unknown Shadowsocks 2022 method"):
        load_backend({"type": "sing-box", "method": "2022-blake3-rot13"}, credentials(ALICE))


@pytest.mark.parametrize(
    "entry",
    [
        {"url": "ftp://127.0.0.1:9000"},
        {"url": "http://127.0.0.1:9000/ss"},
        {"servers": ["ss"]},
        {"servers": ["/ss", "/ss/"]},
        {"timeout_s": 0},
        {"unknown": 1},
    ],
)
def test_config_refuses(entry: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        load_backend({"type": "sing-box", **entry}, credentials(ALICE))


def test_an_unreachable_api_is_an_enforce_error() -> None:
    backend = load_backend(
        {"type": "sing-box", "url": f"http://{LOCAL}:{free_port()}", "timeout_s": 2},
        credentials(ALICE),
    )
    with pytest.raises(EnforceError, match="sing-box SSM API"):
        backend.apply(command("disable"))
    with pytest.raises(EnforceError, match="sing-box SSM API"):
        backend.apply(command("enable"))
