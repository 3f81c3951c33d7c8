"""Live collectors against the real proxy and VPN programs, with known bytes pushed through them.

Everything runs on 127.0.0.1 (WireGuard's tunnel runs between two network
namespaces made here, its UDP over the host's loopback). The programs come from
Debian's packages; `deploy/local/install-node-software.sh` installs any that are
missing. Tests that need root for iptables or network namespaces skip without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from producers.parsers import (
    openvpn_counters,
    parse_iptables,
    parse_openvpn_status,
    parse_wg_dump,
)
from producers.sources import (
    SourceError,
    SsManagerClient,
    TypedMessage,
    V2RayStatsClient,
    derive_epoch_ms,
    read_iptables,
    read_openvpn_status,
    read_wg_dump,
)
from quotaflow.contracts import Counter
from quotaflow.settings import Settings

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "local" / "install-node-software.sh"
LOCAL = "127.0.0.1"
DOWNLOAD = 1_000_000  # bytes the user fetches
UPLOAD = 300_000  # bytes the user posts
SLACK = 4_096  # HTTP headers and the SOCKS handshake, never more


@pytest.fixture
def root() -> None:
    """iptables, network namespaces and TUN devices need root; CI runs as root."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (iptables, network namespaces, TUN devices)")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _body(size: int) -> bytes:
    return (b"quotaflow-" * (size // 10 + 1))[:size]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def node_software() -> None:
    """Install v2ray, shadowsocks-libev, wireguard and friends when missing."""
    done = subprocess.run(
        ["bash", str(INSTALL)], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"install-node-software.sh failed: {done.stderr[-2000:]}")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOCAL, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOCAL, port)) == 0


class Processes:
    """Programs started by one test; all killed, by pid, at teardown."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.pid_files: list[Path] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        env = {**os.environ, "PATH": SBIN_PATH, **kwargs.pop("env", {})}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs)
        self.started.append((name, proc))
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{(self.folder / f'{name}.log').read_text(errors='replace')[-3000:]}"
            for name, _ in self.started
        )

    def stop(self) -> None:
        pids = []
        for pid_file in self.pid_files:
            for path in pid_file.parent.glob(pid_file.name):
                with contextlib.suppress(OSError, ValueError):
                    pids.append(int(path.read_text().strip()))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


class _Handler(BaseHTTPRequestHandler):
    """GET /blob answers DOWNLOAD bytes; POST reads the body and answers its length."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        body = _body(DOWNLOAD)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        size = int(self.headers["Content-Length"])
        got = self.rfile.read(size)
        answer = str(len(got)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer((LOCAL, 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def socks_http(
    socks_port: int, http_port: int, method: str = "GET", body: bytes = b"", timeout: float = 10
) -> bytes:
    """One HTTP/1.0 request to 127.0.0.1:http_port through a SOCKS5 proxy; the response body."""
    with socket.create_connection((LOCAL, socks_port), timeout=timeout) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(LOCAL) + http_port.to_bytes(2, "big"))
        reply = sock.recv(10)
        assert reply[:2] == b"\x05\x00", reply
        head = f"{method} /blob HTTP/1.0\r\nHost: {LOCAL}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        response = _read_all(sock)
    header, _, payload = response.partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.0 200"), header[:100]
    return payload


def push_known_bytes(socks_port: int, http_port: int) -> None:
    """DOWNLOAD bytes down and UPLOAD bytes up through the proxy, checked end to end."""
    assert socks_http(socks_port, http_port) == _body(DOWNLOAD)
    assert socks_http(socks_port, http_port, "POST", _body(UPLOAD)) == str(UPLOAD).encode()


def by_user(counters: list[Counter]) -> dict[str, Counter]:
    return {c.user_id: c for c in counters}


# --------------------------------------------------------------------------- V2Ray

ALICE_PASSWORD = "alice-secret-1"
BOB_UUID = str(uuid.UUID(int=0xB0B))
METHOD = "aes-256-gcm"


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


def start_ss_local(processes: Processes, password: str, server_port: int) -> int:
    """An ss-local SOCKS5 proxy on a free port, relaying to a Shadowsocks server."""
    port = free_port()
    argv = ["ss-local", "-s", LOCAL, "-p", str(server_port), "-b", LOCAL]
    argv += ["-l", str(port), "-k", password, "-m", METHOD]
    processes.start(f"ss-local-{port}", argv)
    wait_until("ss-local", lambda: listening(port))
    return port


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


# --------------------------------------------------------------------------- ss-manager


@pytest.fixture
def ss_manager(node_software: None, processes: Processes) -> SsManagerClient:
    port = free_port(socket.SOCK_DGRAM)
    workdir = processes.folder / "ss-manager"
    workdir.mkdir()
    processes.pid_files.append(workdir / ".shadowsocks_*.pid")
    argv = ["ss-manager", "-m", METHOD, "-s", LOCAL, "-D", str(workdir)]
    argv += ["--manager-address", f"{LOCAL}:{port}", "--executable", "/usr/bin/ss-server"]
    processes.start("ss-manager", argv)
    client = SsManagerClient(f"{LOCAL}:{port}", timeout=0.5)

    def answers() -> bool:
        try:
            return client.ping() == "stat: {}"
        except SourceError:
            return False

    wait_until("ss-manager", answers)
    return client


@pytest.mark.integration
def test_ss_manager_counts_port_bytes(
    ss_manager: SsManagerClient, processes: Processes, http_port: int
) -> None:
    port, idle = free_port(), free_port()
    ss_manager.add(port, "port-secret", METHOD)
    ss_manager.add(idle, "idle-secret")
    wait_until("ss-server", lambda: listening(port))
    with pytest.raises(SourceError):
        ss_manager.add(port, "")  # refused: no password

    push_known_bytes(start_ss_local(processes, "port-secret", port), http_port)

    def counted() -> bool:
        figures = by_user(ss_manager.query_port_counters())
        return figures[str(port)].down >= DOWNLOAD + UPLOAD

    wait_until("ss-server's stat push (every 5 s)", counted, timeout=20)
    figures = by_user(ss_manager.query_port_counters())
    total = figures[str(port)]
    assert total.up == 0 and total.down <= DOWNLOAD + UPLOAD + 2 * SLACK, (total, processes.logs())
    assert figures[str(idle)].down == 0

    ss_manager.remove(port)
    assert str(port) not in by_user(ss_manager.query_port_counters())
    wait_until("the ss-server to stop", lambda: not listening(port))


@pytest.mark.integration
def test_ss_manager_over_a_unix_socket(node_software: None, processes: Processes) -> None:
    path = processes.folder / "manager.sock"
    workdir = processes.folder / "ss-manager-unix"
    workdir.mkdir()
    processes.pid_files.append(workdir / ".shadowsocks_*.pid")
    argv = ["ss-manager", "-m", METHOD, "-s", LOCAL, "-D", str(workdir)]
    processes.start("ss-manager-unix", [*argv, "--manager-address", str(path)])
    wait_until("the manager socket", path.exists)
    client = SsManagerClient(str(path))
    assert client.ping() == "stat: {}"
    port = free_port()
    client.add(port, "unix-secret", METHOD)
    assert client.ping() == f'stat: {{"{port}":0}}'
    client.remove(port)


def test_ss_manager_silence_raises() -> None:
    with pytest.raises(SourceError):
        SsManagerClient(f"{LOCAL}:{free_port(socket.SOCK_DGRAM)}", timeout=0.3).ping()


# --------------------------------------------------------------------------- iptables


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["iptables", "-w", *args],
        capture_output=True,
        text=True,
        check=check,
        env={**os.environ, "PATH": SBIN_PATH},
    )


@pytest.mark.integration
def test_iptables_counts_port_bytes(root: None, node_software: None, http_port: int) -> None:
    chain = f"QFTEST{os.getpid()}"
    _iptables("-N", chain)
    _iptables("-I", "OUTPUT", "-o", "lo", "-j", chain)
    try:
        _iptables("-A", chain, "-p", "tcp", "-d", LOCAL, "--dport", str(http_port))
        _iptables("-A", chain, "-p", "tcp", "-s", LOCAL, "--sport", str(http_port))
        with socket.create_connection((LOCAL, http_port), timeout=10) as sock:
            sock.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
            assert _read_all(sock).endswith(_body(DOWNLOAD))
        env_path = {**os.environ, "PATH": SBIN_PATH}

        def runner(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, env=env_path, **kwargs)

        text = read_iptables(chain, runner)
        (counter,) = parse_iptables(text)
        assert counter.user_id == str(http_port)
        assert DOWNLOAD <= counter.down <= DOWNLOAD * 11 // 10, text
        assert 0 < counter.up < 20_000, text
    finally:
        _iptables("-D", "OUTPUT", "-o", "lo", "-j", chain, check=False)
        _iptables("-F", chain, check=False)
        _iptables("-X", chain, check=False)
    with pytest.raises(SourceError):
        read_iptables(chain, runner)


# --------------------------------------------------------------------------- WireGuard


def assert_tunnel_figures(counter: Counter) -> None:
    """A tunnel's figures for DOWNLOAD bytes down and UPLOAD up, in the right directions.

    Tunnel overhead, the other direction's TCP ACKs and datagrams that the sender
    counted but the loopback dropped (TCP sends them again) all come on top, so
    only the order of magnitude is exact: a swap of directions still fails.
    """
    assert UPLOAD < counter.up < DOWNLOAD < counter.down < 2 * DOWNLOAD, counter


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(
        ["ip", *args], check=check, capture_output=True, env={**os.environ, "PATH": SBIN_PATH}
    )


@pytest.mark.integration
def test_wireguard_counts_peer_bytes(
    root: None, node_software: None, processes: Processes, tmp_path: Path
) -> None:
    tag = f"{os.getpid() % 100_000}"
    ns_client, ns_server = f"qf{tag}c", f"qf{tag}s"
    wg_client, wg_server = f"qfwc{tag}", f"qfws{tag}"
    keys = {}
    for side in ("client", "server"):
        private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True)
        public = subprocess.run(
            ["wg", "pubkey"], input=private.stdout, capture_output=True, text=True, check=True
        )
        (tmp_path / f"{side}.key").write_text(private.stdout)
        keys[side] = public.stdout.strip()
    udp = {"client": free_port(socket.SOCK_DGRAM), "server": free_port(socket.SOCK_DGRAM)}
    server_port = 8080
    try:
        for ns in (ns_client, ns_server):
            _ip("netns", "add", ns)
        for iface in (wg_client, wg_server):
            processes.start(iface, ["wireguard-go", iface], env={"WG_PROCESS_FOREGROUND": "1"})
        for iface in (wg_client, wg_server):
            wait_until(iface, Path(f"/var/run/wireguard/{iface}.sock").exists)
        plan = [
            ("client", wg_client, ns_client, "10.213.0.1", "server", "10.213.0.2"),
            ("server", wg_server, ns_server, "10.213.0.2", "client", "10.213.0.1"),
        ]
        for side, iface, ns, address, peer, peer_address in plan:
            subprocess.run(
                ["wg", "set", iface, "listen-port", str(udp[side]),
                 "private-key", str(tmp_path / f"{side}.key"),
                 "peer", keys[peer], "endpoint", f"{LOCAL}:{udp[peer]}",
                 "allowed-ips", f"{peer_address}/32"],
                check=True,
            )  # fmt: skip
            # The UDP socket stays in this namespace (loopback); the tunnel moves out.
            _ip("link", "set", iface, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", iface)
            _ip("-n", ns, "link", "set", iface, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        processes.start(
            "http-in-netns",
            ["ip", "netns", "exec", ns_server, sys.executable, "-c", _NETNS_HTTP_SERVER,
             "10.213.0.2", str(server_port), str(DOWNLOAD)],
        )  # fmt: skip
        fetch = subprocess.run(
            ["ip", "netns", "exec", ns_client, sys.executable, "-c", _NETNS_FETCH,
             "10.213.0.2", str(server_port), str(UPLOAD)],
            capture_output=True, timeout=60, env={**os.environ, "PATH": SBIN_PATH},
        )  # fmt: skip
        assert fetch.returncode == 0, (fetch.stderr, processes.logs())
        assert fetch.stdout == _body(DOWNLOAD)

        users = by_user(parse_wg_dump(read_wg_dump(wg_server)))
        client_peer = users[keys["client"]]  # the server's view: what the client sent and got
        assert_tunnel_figures(client_peer)
        # The client's view of the server peer. Not an exact mirror: a sender counts
        # datagrams that the loopback then drops (TCP sends them again).
        mirror = by_user(parse_wg_dump(read_wg_dump(wg_client)))[keys["server"]]
        assert DOWNLOAD < mirror.up <= client_peer.down and mirror.down > UPLOAD, mirror
    finally:
        processes.stop()
        for ns in (ns_client, ns_server):
            _ip("netns", "del", ns, check=False)


# --------------------------------------------------------------------------- OpenVPN


def _pki(folder: Path) -> None:
    """A throwaway CA, a server and a client ("alice") certificate, with openssl."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=quotaflow-test-ca")  # fmt: skip
    for name, usage in (("server", "serverAuth"), ("alice", "clientAuth")):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(
            f"extendedKeyUsage={usage}\nkeyUsage=digitalSignature\n"
        )
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                "-extfile", f"{name}.ext")  # fmt: skip


@pytest.mark.integration
def test_openvpn_status_counts_client_bytes(
    root: None, node_software: None, processes: Processes, tmp_path: Path
) -> None:
    _pki(tmp_path)
    tag = f"{os.getpid() % 100_000}"
    ns_client, ns_server = f"qf{tag}oc", f"qf{tag}os"
    dev_client, dev_server = f"qfoc{tag}", f"qfos{tag}"
    port = free_port(socket.SOCK_DGRAM)
    status = tmp_path / "status.txt"
    common = ["--dev-type", "tun", "--proto", "udp4", "--ifconfig-noexec", "--route-noexec",
              "--disable-dco", "--ca", "ca.crt", "--verb", "3"]  # fmt: skip
    server = ["openvpn", "--mode", "server", "--tls-server", "--local", LOCAL, "--port", str(port),
              "--dev", dev_server, "--topology", "subnet", "--ifconfig", "10.214.0.1",
              "255.255.255.0", "--ifconfig-pool", "10.214.0.10", "10.214.0.20",
              "--push", "topology subnet", "--cert", "server.crt", "--key", "server.key",
              "--dh", "none", "--status", str(status), "1", "--status-version", "2"]  # fmt: skip
    client = ["openvpn", "--client", "--remote", LOCAL, str(port), "--dev", dev_client,
              "--cert", "alice.crt", "--key", "alice.key"]  # fmt: skip
    try:
        for ns in (ns_client, ns_server):
            _ip("netns", "add", ns)
        processes.start("openvpn-server", [*server, *common], cwd=tmp_path)
        wait_until("the OpenVPN server", lambda: Path(f"/sys/class/net/{dev_server}").exists())
        processes.start("openvpn-client", [*client, *common], cwd=tmp_path)
        wait_until("the OpenVPN client", lambda: Path(f"/sys/class/net/{dev_client}").exists())
        # The UDP sockets stay on this namespace's loopback; the tunnels move out.
        for dev, ns, address in ((dev_server, ns_server, "10.214.0.1"),
                                 (dev_client, ns_client, "10.214.0.10")):  # fmt: skip
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        processes.start(
            "http-in-netns",
            ["ip", "netns", "exec", ns_server, sys.executable, "-c", _NETNS_HTTP_SERVER,
             "10.214.0.1", "8080", str(DOWNLOAD)],
        )  # fmt: skip
        fetch = subprocess.run(
            ["ip", "netns", "exec", ns_client, sys.executable, "-c", _NETNS_FETCH,
             "10.214.0.1", "8080", str(UPLOAD)],
            capture_output=True, timeout=60, env={**os.environ, "PATH": SBIN_PATH},
        )  # fmt: skip
        assert fetch.returncode == 0, (fetch.stderr, processes.logs())
        assert fetch.stdout == _body(DOWNLOAD)

        def alice() -> Counter | None:
            text = read_openvpn_status(status) if status.exists() else ""
            if not text.rstrip().endswith("END"):
                return None  # not written yet, or caught half-written
            return by_user(openvpn_counters(parse_openvpn_status(text))).get("alice")

        def counted() -> bool:
            found = alice()
            return found is not None and found.down > DOWNLOAD and found.up > UPLOAD

        wait_until("the status file (rewritten every second)", counted, timeout=10)
        found = alice()
        assert found is not None
        assert_tunnel_figures(found)
    finally:
        processes.stop()
        for ns in (ns_client, ns_server):
            _ip("netns", "del", ns, check=False)


_NETNS_HTTP_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = (b"quotaflow-" * (size // 10 + 1))[:size]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
HTTPServer((host, port), H).serve_forever()
"""

_NETNS_FETCH = """
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
upload = (b"quotaflow-" * (size // 10 + 1))[:size]
deadline = time.monotonic() + 30
while True:
    try:
        sock = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
sock.sendall(b"POST / HTTP/1.0\\r\\nContent-Length: %d\\r\\n\\r\\n" % size + upload)
data = b""
while chunk := sock.recv(65536):
    data += chunk
sys.stdout.buffer.write(data.partition(b"\\r\\n\\r\\n")[2])
"""


def billed_through_agent(
    tmp_path: Path, settings: Settings, pipeline: Any, collector: str,
    traffic: Callable[[], None], settle_s: float = 3.0,
) -> dict[str, tuple[int, int]]:
    """Run the real agent with one collector while `traffic` moves bytes; InfluxDB's totals.

    The agent takes a first look at the idle node, the traffic runs, the agent keeps
    polling for `settle_s`, then stops (draining its outbox) and the pipeline bills it.
    Returns (up, down) per user, summed over days, for the node `node`.
    """
    from sinks.ledger_check import read_daily_totals

    config = tmp_path / "agent.toml"
    config.write_text(
        f'node_id = "node"\noutbox = "{tmp_path / "outbox.db"}"\ndrain_timeout_s = 20\n'
        f"[[collectors]]\ninterval_s = 0.5\n{collector}\n"
    )
    with (tmp_path / "agent.log").open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "quotaflow", "agent", "--config", str(config)],
            env={**os.environ, **settings.to_env()}, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        time.sleep(2.0)  # the agent's first, empty look at the node
        traffic()
        time.sleep(settle_s)  # more polls: the last one shows the final counters
    finally:
        agent.send_signal(signal.SIGTERM)  # drains the outbox before it exits
        agent.wait(timeout=60)
    pipeline.wait()
    billed: dict[str, tuple[int, int]] = {}
    for (user, node, _), (up, down) in read_daily_totals(settings).items():
        if node == "node":
            before = billed.get(user, (0, 0))
            billed[user] = (before[0] + up, before[1] + down)
    return billed


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


@pytest.mark.integration
def test_ss_manager_traffic_is_billed_by_the_pipeline(
    ss_manager: SsManagerClient, processes: Processes, http_port: int, settings: Settings,
    pipeline: Any, tmp_path: Path,
) -> None:
    """Real bytes through a real ss-server, read from ss-manager by the agent, billed exactly."""
    port = free_port()
    ss_manager.add(port, "port-secret", METHOD)
    wait_until("ss-server", lambda: listening(port))

    def traffic() -> None:
        push_known_bytes(start_ss_local(processes, "port-secret", port), http_port)
        wait_until(
            "ss-server's stat push (every 5 s)",
            lambda: by_user(ss_manager.query_port_counters())[str(port)].down
            >= DOWNLOAD + UPLOAD,
            timeout=20,
        )

    billed = billed_through_agent(
        tmp_path, settings, pipeline,
        f'type = "ss-manager"\naddress = "{ss_manager.address}"', traffic,
        settle_s=7.0,  # past ss-server's next stat push, which has the final figure
    )
    final = by_user(ss_manager.query_port_counters())[str(port)]
    assert final.down >= DOWNLOAD + UPLOAD
    assert billed == {str(port): (0, final.down)}, (tmp_path / "agent.log").read_text()
