"""Shared by the source tests: samples, the real programs' processes, known bytes through them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from quotaflow.core.contracts import Counter
from quotaflow.core.settings import Settings
from quotaflow.dev.local import free_ports
from quotaflow.producers.sources.prometheus import (
    PrometheusMapping,
)

SAMPLES = Path(__file__).parent / "samples"

DIRECTION_MAPPING = PrometheusMapping(
    up_metric="xray_user_traffic_bytes_total",
    down_metric="xray_user_traffic_bytes_total",
    direction_label="direction",
    up_value="uplink",
    down_value="downlink",
)


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def readings(counters: list[Counter]) -> dict[str, tuple[int, int]]:
    return {c.user_id: (c.up, c.down) for c in counters}


REPO = Path(__file__).resolve().parents[3]
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
    """A free loopback port below the ephemeral range (see `free_ports`)."""
    return free_ports(1, kind)[0]


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


def _reports_stamped(outbox: Path) -> bool:
    """True once the agent stored a report (the seqs table outlives the sent reports)."""
    import sqlite3

    if not outbox.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
            return bool(db.execute("SELECT count(*) FROM seqs").fetchone()[0])
    except sqlite3.Error:
        return False


def billed_through_agent(
    tmp_path: Path, settings: Settings, pipeline: Any, collector: str,
    traffic: Callable[[], None], settle_s: float = 3.0,
) -> dict[str, tuple[int, int]]:
    """Run the real agent with one collector while `traffic` moves bytes; InfluxDB's totals.

    The agent takes a first look at the idle node, the traffic runs, the agent keeps
    polling for `settle_s`, then stops (draining its outbox) and the pipeline bills it.
    Returns (up, down) per user, summed over days, for the node `node`.
    """
    from quotaflow.dev.truth_check import read_daily_totals

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
        # the agent's first, empty look at the node: wait for it, however slow the start
        wait_until("the agent's first report", lambda: _reports_stamped(tmp_path / "outbox.db"),
                   timeout=60.0)
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


METHOD = "aes-256-gcm"


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


def start_ss_local(processes: Processes, password: str, server_port: int) -> int:
    """An ss-local SOCKS5 proxy on a free port, relaying to a Shadowsocks server."""
    port = free_port()
    argv = ["ss-local", "-s", LOCAL, "-p", str(server_port), "-b", LOCAL]
    argv += ["-l", str(port), "-k", password, "-m", METHOD]
    processes.start(f"ss-local-{port}", argv)
    wait_until("ss-local", lambda: listening(port))
    return port


PEER_1 = "9xBb9s+DPUUSgbmrZenA2HpgxVUx05YxHZodhr9XpFE="
PEER_2 = "WJ4yiws4GDt3k0Y0BCRBqbAd72nokJFHXC6lNsESjHc="
