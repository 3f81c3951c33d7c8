"""The `wireguard` enforcement backend: its checks, its `wg` runs with an injected runner,
and the disable/enable cycle on a real wireguard-go tunnel with real traffic.

The tunnel is two wireguard-go interfaces, each moved into its own network
namespace; their UDP sockets stay on this namespace's loopback, where a counting
UDP relay sits between them. The server side is the node: its `wg` counters for
the client's peer are compared with the datagram bytes the relay passed.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from quotaflow.core.contracts import Counter
from quotaflow.producers.enforce.backends import EnforceError, load_backend
from quotaflow.producers.enforce.backends.wireguard import Config, WireGuardBackend, build
from quotaflow.producers.enforce.credentials import Credentials
from quotaflow.producers.sources import SOURCES, ParseError
from quotaflow.producers.sources.wireguard import (
    WireGuardConfig,
    parse_wg_allowed_ips,
    read_wg_allowed_ips,
)
from tests.producers.enforce.helpers import FETCH, command
from tests.producers.sources import helpers
from tests.producers.sources.helpers import (
    DOWNLOAD,
    LOCAL,
    PEER_1,
    PEER_2,
    SBIN_PATH,
    UPLOAD,
    Processes,
    _ip,
    free_port,
    wait_until,
)

node_software = helpers.node_software
processes = helpers.processes
root = helpers.root

NET = "10.219.0"
CLIENT_IP, SERVER_IP, BOB_IP = f"{NET}.1", f"{NET}.2", f"{NET}.3"
HTTP_PORT, STREAM_PORT = 8080, 8081


def credentials(interface: str, alice: str, bob: str) -> Credentials:
    return Credentials.model_validate(
        {
            "accounts": [
                {"user_id": "alice", "backend": "wireguard", "interface": interface,
                 "public_key": alice, "allowed_ips": [f"{CLIENT_IP}/32"]},
                {"user_id": "bob", "backend": "wireguard", "interface": interface,
                 "public_key": bob, "allowed_ips": [BOB_IP]},
            ]
        }
    )  # fmt: skip


# ------------------------------------------------------------ the real tunnel


class UdpRelay:
    """Relays datagrams between a WireGuard client and server, counting payload bytes.

    The client's endpoint is `port`; the relay sends on to the server from a socket
    of its own, whose address the server learns as the client's endpoint.
    """

    def __init__(self, server_port: int) -> None:
        self.server = (LOCAL, server_port)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for sock in (self.front, self.back):
            # as large as wireguard-go's own, so that the relay drops nothing
            sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
            sock.setsockopt(socket.SOL_SOCKET, 32, 16 << 20)  # SO_SNDBUFFORCE
            sock.bind((LOCAL, 0))
        self.port: int = self.front.getsockname()[1]
        self._client: Any = None
        self._up = self._down = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.front, self.back], [], [], 0.1)
            for sock in ready:
                data, address = sock.recvfrom(65535)
                with self._lock:
                    if sock is self.front:
                        self._client = address
                        self._up += len(data)
                        self.back.sendto(data, self.server)
                    elif self._client is not None:
                        self._down += len(data)
                        self.front.sendto(data, self._client)

    def totals(self) -> tuple[int, int]:
        """(client -> server, server -> client) UDP payload bytes so far."""
        with self._lock:
            return self._up, self._down

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.front.close()
        self.back.close()


_SERVERS = """
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
host = sys.argv[1]
http_port, stream_port, size = (int(a) for a in sys.argv[2:5])
body = (b"quotaflow-" * (size // 10 + 1))[:size]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
def stream(conn):
    chunk = b"s" * 16384
    try:
        while True:
            conn.sendall(chunk)
    except OSError:
        pass
def streams():
    listener = socket.create_server((host, stream_port))
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=stream, args=(conn,), daemon=True).start()
threading.Thread(target=streams, daemon=True).start()
HTTPServer((host, http_port), H).serve_forever()
"""


_READ_STREAM = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.settimeout(0.05)
total, last = 0, 0.0
while True:
    try:
        chunk = sock.recv(65536)
        if not chunk:
            break
        total += len(chunk)
    except TimeoutError:
        pass
    if time.monotonic() - last >= 0.05:
        print(total, flush=True)
        last = time.monotonic()
"""


@dataclass
class Tunnel:
    interface: str  # the server's (the node's) interface
    client_ns: str
    client_key: str
    bob_key: str
    relay: UdpRelay
    env: dict[str, str] = field(default_factory=dict)

    def fetch(self, deadline: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        """POST UPLOAD bytes and get DOWNLOAD bytes back, from the client's namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.client_ns, sys.executable, "-c", FETCH, SERVER_IP,
             str(HTTP_PORT), str(UPLOAD), str(deadline)],
            capture_output=True, timeout=deadline + 60, env=self.env,
        )  # fmt: skip

    def works(self) -> bool:
        done = self.fetch()
        return done.returncode == 0 and len(done.stdout) == DOWNLOAD

    def alice(self) -> Counter:
        """The server's counters for the client's peer, read by the source's collector."""
        collector = SOURCES["wireguard"].collector(
            WireGuardConfig(type="wireguard", interface=self.interface,
                            user_map={self.client_key: "alice"})
        )  # fmt: skip
        return {c.user_id: c for c in collector.collect().counters}["alice"]

    def settle(self) -> tuple[Counter, tuple[int, int]]:
        """The peer's counters once the last datagrams have landed, and the relay's totals.

        The server counts every datagram it sent (`down`: the relay's server -> client
        bytes, to the byte) and every datagram it accepted (`up`); wireguard-go may
        drop a datagram that arrives (a few full-size ones in a burst, seen in some
        rounds), which the relay passed but the server never counted (TCP sends it
        again, and that one is counted).
        """
        deadline = time.monotonic() + 5
        last = None
        while True:
            found, passed = self.alice(), self.relay.totals()
            now = (found.up, found.down, *passed)
            if found.down == passed[1] and found.up <= passed[0] and now == last:
                return found, passed
            if time.monotonic() > deadline:
                raise AssertionError(f"peer counters {found} did not settle; relay {passed}")
            last = now
            time.sleep(0.1)


class StreamReader:
    """A download that never ends, from the client's namespace; `total()` is what arrived."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", tunnel.client_ns, sys.executable, "-c", _READ_STREAM,
             SERVER_IP, str(STREAM_PORT)],
            stdout=subprocess.PIPE, text=True, env=tunnel.env,
        )  # fmt: skip
        self._total = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._total = int(line)

    def total(self) -> int:
        return self._total

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def _wg_key() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


@pytest.fixture
def tunnel(
    root: None, node_software: None, processes: Processes, tmp_path: Path
) -> Iterator[Tunnel]:
    tag = f"{os.getpid() % 100_000}"
    ns_client, ns_server = f"qf{tag}ec", f"qf{tag}es"
    wg_client, wg_server = f"qfec{tag}", f"qfes{tag}"
    keys = {}
    for side in ("client", "server"):
        private, keys[side] = _wg_key()
        (tmp_path / f"{side}.key").write_text(private)
    _, bob = _wg_key()
    udp = {side: free_port(socket.SOCK_DGRAM) for side in ("client", "server")}
    env = {**os.environ, "PATH": SBIN_PATH}
    relay = UdpRelay(udp["server"])
    try:
        for ns in (ns_client, ns_server):
            _ip("netns", "add", ns)
        for iface in (wg_client, wg_server):
            processes.start(iface, ["wireguard-go", iface], env={"WG_PROCESS_FOREGROUND": "1"})
        for iface in (wg_client, wg_server):
            wait_until(iface, Path(f"/var/run/wireguard/{iface}.sock").exists)
        subprocess.run(
            ["wg", "set", wg_client, "listen-port", str(udp["client"]),
             "private-key", str(tmp_path / "client.key"), "peer", keys["server"],
             "endpoint", f"{LOCAL}:{relay.port}", "allowed-ips", f"{SERVER_IP}/32"],
            check=True,
        )  # fmt: skip
        subprocess.run(
            ["wg", "set", wg_server, "listen-port", str(udp["server"]),
             "private-key", str(tmp_path / "server.key"),
             "peer", keys["client"], "allowed-ips", f"{CLIENT_IP}/32",
             "peer", bob, "allowed-ips", f"{BOB_IP}/32"],
            check=True,
        )  # fmt: skip
        for iface, ns, address in ((wg_client, ns_client, CLIENT_IP),
                                   (wg_server, ns_server, SERVER_IP)):  # fmt: skip
            _ip("link", "set", iface, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        processes.start(
            "servers-in-netns",
            ["ip", "netns", "exec", ns_server, sys.executable, "-c", _SERVERS, SERVER_IP,
             str(HTTP_PORT), str(STREAM_PORT), str(DOWNLOAD)],
        )  # fmt: skip
        yield Tunnel(wg_server, ns_client, keys["client"], bob, relay, env)
    finally:
        processes.stop()
        relay.close()
        for ns in (ns_client, ns_server):
            _ip("netns", "del", ns, check=False)


@pytest.mark.integration
def test_disable_and_enable_with_real_traffic(tunnel: Tunnel) -> None:
    backend = load_backend(
        {"type": "wireguard", "interfaces": [tunnel.interface], "timeout_s": 5},
        credentials(tunnel.interface, tunnel.client_key, tunnel.bob_key),
    )
    assert backend.serves("alice") and backend.serves("bob") and not backend.serves("carol")
    assert tunnel.works(), "no traffic through the tunnel before any command"
    assert backend.apply(command("enable")).outcome == "already"

    # What WireGuard counts: the datagrams it exchanged with the peer, checked
    # against the relay: every byte sent to the peer; every byte received from it
    # but for datagrams wireguard-go dropped on arrival.
    first, passed = tunnel.settle()
    assert first.down == passed[1] > DOWNLOAD
    uncounted = passed[0] - first.up
    assert first.up > UPLOAD and 0 <= uncounted <= passed[0] // 5, (first, passed)

    stream = StreamReader(tunnel)
    try:
        wait_until("the stream to flow", lambda: stream.total() > 1_000_000, timeout=20)
        before = tunnel.alice()  # the agent's snapshot, right before the disable
        disabled = backend.apply(command("disable"))
        right_after = tunnel.alice()
        assert disabled.outcome == "applied", disabled
        # The peer stays, with its counters: nothing counted before is lost.
        assert right_after.up >= before.up and right_after.down >= before.down
        peers = read_wg_allowed_ips(tunnel.interface)
        assert peers[tunnel.client_key] == () and peers[tunnel.bob_key] == (f"{BOB_IP}/32",)
        # Traffic stops at once, the open stream included.
        time.sleep(0.5)
        stalled = stream.total()
        time.sleep(2.0)
        assert stream.total() == stalled, "the open stream kept flowing after disable"
        # What the server still sent the peer after `apply` returned (already queued).
        late = tunnel.alice().down - right_after.down

        at_disable, passed_then = tunnel.settle()
        failed = tunnel.fetch(deadline=3.0)
        assert failed.returncode != 0, "a new connection got through after disable"
        # The client's refused attempts still reach the server, and are counted in `up`.
        after, passed_now = tunnel.settle()
        assert after.up > at_disable.up, "the dropped attempts were not counted"
        assert after.down == at_disable.down
        attempts = after.up - at_disable.up
        assert attempts == passed_now[0] - passed_then[0]

        assert backend.apply(command("disable")).outcome == "already"

        enabled = backend.apply(command("enable"))
        assert enabled.outcome == "applied", enabled
        assert read_wg_allowed_ips(tunnel.interface)[tunnel.client_key] == (f"{CLIENT_IP}/32",)
        assert backend.apply(command("enable")).outcome == "already"
        resumed_from = stream.total()
        assert tunnel.works(), "no traffic after enable"
        # The stalled stream's TCP connection resumes (retransmission).
        wait_until("the stream to resume", lambda: stream.total() > resumed_from, timeout=30)
    finally:
        stream.stop()

    # The counters never went back: one epoch for the whole cycle.
    final, _ = tunnel.settle()
    assert final.up > after.up and final.down > after.down + DOWNLOAD
    assert read_wg_allowed_ips(tunnel.interface)[tunnel.bob_key] == (f"{BOB_IP}/32",)

    # What the backend avoids: removing the peer (then adding it back) zeroes its counters.
    subprocess.run(["wg", "set", tunnel.interface, "peer", tunnel.client_key, "remove"],
                   check=True)  # fmt: skip
    subprocess.run(["wg", "set", tunnel.interface, "peer", tunnel.client_key, "allowed-ips",
                    f"{CLIENT_IP}/32"], check=True)  # fmt: skip
    zeroed = tunnel.alice()
    assert (zeroed.up, zeroed.down) == (0, 0)
    print(
        f"\nfirst round: counted {first.up}/{first.down} B, relay {passed[0]}/{passed[1]} B"
        f" ({uncounted} B dropped on arrival, uncounted);"
        f" sent to the peer after `apply` returned: {late} B;"
        f" refused attempts while disabled counted: up {attempts} B"
    )


# ---------------------------------------------------- `wg` through an injected runner


class FakeWg:
    """`wg show IF allowed-ips` and `wg set IF peer K allowed-ips ...` on a dict."""

    def __init__(self, peers: dict[str, dict[str, tuple[str, ...]]]) -> None:
        self.peers = peers
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert isinstance(argv, list) and not kwargs.get("shell"), "never through a shell"
        self.calls.append(argv)
        if argv[1:2] == ["show"] or argv[1:2] == ["set"]:
            interface = argv[2]
            if interface not in self.peers:
                return subprocess.CompletedProcess(
                    argv, 1, "", "Unable to access interface: No such device\n"
                )
        if argv[1] == "show":
            text = "".join(
                f"{key}\t{' '.join(networks) if networks else '(none)'}\n"
                for key, networks in self.peers[interface].items()
            )
            return subprocess.CompletedProcess(argv, 0, text, "")
        _, _, interface, _, key, _, networks = argv
        self.peers[interface][key] = tuple(n for n in networks.split(",") if n)
        return subprocess.CompletedProcess(argv, 0, "", "")

    def sets(self) -> list[list[str]]:
        return [c for c in self.calls if c[1] == "set"]


def _backend(wg: FakeWg, **options: Any) -> WireGuardBackend:
    config = Config.model_validate({"type": "wireguard", **options})
    backend = build(config, credentials("wg0", PEER_1, PEER_2))
    return WireGuardBackend(config, backend._peers, runner=wg)


def test_disable_empties_once_and_enable_restores_once() -> None:
    wg = FakeWg({"wg0": {PEER_1: ("10.219.0.1/32",), PEER_2: ("10.219.0.3/32",)}})
    backend = _backend(wg)
    assert backend.apply(command("disable")).outcome == "applied"
    assert wg.sets() == [["wg", "set", "wg0", "peer", PEER_1, "allowed-ips", ""]]
    assert backend.apply(command("disable")).outcome == "already"
    assert len(wg.sets()) == 1
    assert wg.peers["wg0"][PEER_2] == ("10.219.0.3/32",)
    assert backend.apply(command("enable")).outcome == "applied"
    assert wg.sets()[-1] == ["wg", "set", "wg0", "peer", PEER_1, "allowed-ips", "10.219.0.1/32"]
    assert backend.apply(command("enable")).outcome == "already"
    assert len(wg.sets()) == 2
    assert backend.apply(command("enable", "bob")).outcome == "already"  # "10.219.0.3" is /32
    assert backend.apply(command("warn")).outcome == "skipped"
    assert backend.apply(command("disable", "carol")).outcome == "skipped"


def test_a_peer_not_on_the_interface() -> None:
    wg = FakeWg({"wg0": {PEER_2: ("10.219.0.3/32",)}})
    backend = _backend(wg)
    absent = backend.apply(command("disable"))
    assert absent.outcome == "already" and "not on wg0" in absent.detail
    with pytest.raises(EnforceError, match="is not on wg0"):
        backend.apply(command("enable"))
    assert wg.sets() == []


def test_wg_failures_are_enforce_errors() -> None:
    with pytest.raises(EnforceError, match=r"wireguard disable alice: .*No such device"):
        _backend(FakeWg({})).apply(command("disable"))

    class Stuck(FakeWg):
        def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
            if argv[1] == "set":
                self.calls.append(argv)
                return subprocess.CompletedProcess(argv, 0, "", "")  # says yes, does nothing
            return super().__call__(argv, **kwargs)

    stuck = Stuck({"wg0": {PEER_1: ("10.219.0.1/32",)}})
    with pytest.raises(EnforceError, match="still has allowed IPs"):
        _backend(stuck).apply(command("disable"))

    def missing(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", "wg")

    config = Config(type="wireguard")
    backend = WireGuardBackend(config, _backend(stuck)._peers, runner=missing)
    with pytest.raises(EnforceError, match="wg"):
        backend.apply(command("enable"))


def test_allowed_ips_output() -> None:
    text = f"{PEER_1}\t10.8.0.2/32 fd00::2/128\n{PEER_2}\t(none)\n"
    assert parse_wg_allowed_ips(text) == {PEER_1: ("10.8.0.2/32", "fd00::2/128"), PEER_2: ()}
    assert parse_wg_allowed_ips("") == {}
    for garbage in (f"{PEER_1} 10.8.0.2/32\n", "alice\t10.8.0.2/32\n",
                    f"{PEER_1}\t10.8.0.2\n", f"{PEER_1}\t(none)\n{PEER_1}\t(none)\n"):  # fmt: skip
        with pytest.raises(ParseError):
            parse_wg_allowed_ips(garbage)


# ------------------------------------------------------------------ config checks


def _accounts(*accounts: dict[str, Any]) -> Credentials:
    return Credentials.model_validate(
        {"accounts": [{"backend": "wireguard", "interface": "wg0", **a} for a in accounts]}
    )


def test_build_refuses_a_configured_user_without_credentials() -> None:
    creds = credentials("wg0", PEER_1, PEER_2)
    with pytest.raises(ValueError, match=r"no wireguard credentials on wg1 .*: alice, bob"):
        load_backend({"type": "wireguard", "interfaces": ["wg1"], "users": ["alice", "bob"]},
                     creds)  # fmt: skip
    with pytest.raises(ValueError, match=r"configured users: carol"):
        load_backend({"type": "wireguard", "users": ["alice", "carol"]}, creds)


def test_serves_users_with_a_peer_on_its_interfaces() -> None:
    creds = credentials("wg0", PEER_1, PEER_2)
    every = load_backend({"type": "wireguard"}, creds)
    assert every.serves("alice") and every.serves("bob") and not every.serves("carol")
    assert not load_backend({"type": "wireguard", "interfaces": ["wg1"]}, creds).serves("alice")
    only = load_backend({"type": "wireguard", "users": ["bob"]}, creds)
    assert only.serves("bob") and not only.serves("alice")


@pytest.mark.parametrize(
    ("accounts", "problem"),
    [
        ([{"user_id": "alice", "public_key": "alice", "allowed_ips": ["10.0.0.1"]}],
         "is not a public key"),
        ([{"user_id": "alice", "public_key": PEER_1, "allowed_ips": []}], "no allowed_ips"),
        ([{"user_id": "alice", "public_key": PEER_1, "allowed_ips": ["10.0.0.300"]}],
         "is not an IP network"),
        ([{"user_id": "alice", "public_key": PEER_1, "allowed_ips": ["10.0.0.0/24"]},
          {"user_id": "bob", "public_key": PEER_2, "allowed_ips": ["10.0.0.7/32"]}],
         "overlaps 10.0.0.0/24 of 'alice'"),
        ([{"user_id": "alice", "public_key": PEER_1, "allowed_ips": ["10.0.0.1"]},
          {"user_id": "bob", "public_key": PEER_1, "allowed_ips": ["10.0.0.2"]}],
         "listed twice"),
        ([{"user_id": "alice", "public_key": PEER_1, "allowed_ips": ["10.0.0.1"],
           "interface": "wg0; rm -rf /"}], "not an interface name"),
    ],
)  # fmt: skip
def test_build_refuses_what_it_could_not_apply(
    accounts: list[dict[str, Any]], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        load_backend({"type": "wireguard"}, _accounts(*accounts))
