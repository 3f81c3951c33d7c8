"""How quotaflow.dev.local tells whether a server it started runs, and when a stopped one
is gone: with small stand-in servers, so each case happens every time, not by timing."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotaflow.dev import local

# A server whose main thread exits first on SIGTERM, while another thread keeps its port
# for a second more: its first thread is a zombie, but the process still holds the port.
_SLOW_TO_LEAVE = """
import ctypes, os, platform, signal, socket, sys, threading, time
SYS_EXIT = {"x86_64": 60, "aarch64": 93, "riscv64": 93}[platform.machine()]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
leaving = threading.Event()
def hold_the_port():
    leaving.wait()
    time.sleep(1.0)
    os._exit(0)
threading.Thread(target=hold_the_port).start()
def on_term(*_):
    leaving.set()
    ctypes.CDLL(None).syscall(SYS_EXIT, 0)  # the exit of this thread alone
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def _wait_for(condition: object, what: str, timeout_s: float = 30.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.02)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[str]:
    """The run directory's name, as it appears in a server's command line; the stand-ins
    left running by a failed test are killed after it."""
    yield str(tmp_path / "run")
    for pid, (process, cmdline) in list(local._CHILDREN.items()):
        if str(tmp_path) in cmdline:
            process.kill()
            process.wait()
            local._CHILDREN.pop(pid, None)


def test_a_server_is_running_while_exec_has_not_shown_its_command_line(
    tmp_path: Path, marker: str
) -> None:
    """/proc shows no command line while `exec` still loads the program: a server started
    a moment ago must not be taken for one that exited while starting (it was, under load,
    and a Kafka restart failed with the previous broker's log as its reason). Here the
    command line /proc shows lacks the run directory for good, as after `exec sleep`."""
    pid = local._spawn(["/bin/sh", "-c", "exec sleep 60", marker], tmp_path / "s.log", tmp_path)
    _wait_for(lambda: Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep"), "exec")
    assert local._alive(pid, marker)
    assert not local._alive(pid, str(tmp_path / "another-run"))
    local._stop_pid(pid, marker, timeout=10)
    assert not local._alive(pid, marker) and pid not in local._CHILDREN


@pytest.mark.parametrize("started_by", ["this process", "another process"])
def test_a_stopped_server_is_gone_only_once_its_last_thread_exited(
    tmp_path: Path, marker: str, started_by: str
) -> None:
    """Stopping returns once the server's port is free, not when its first thread became a
    zombie: the same port is bound again at once when Kafka restarts after an outage."""
    [port] = local.free_ports(1)
    log = tmp_path / "s.log"
    pid = local._spawn([sys.executable, "-c", _SLOW_TO_LEAVE, str(port), marker], log, tmp_path)
    process, _ = local._CHILDREN[pid]
    if started_by == "another process":  # known by its pid and command line only
        del local._CHILDREN[pid]
    try:
        _wait_for(lambda: "ready" in log.read_text(), "ready")
        assert local._alive(pid, marker) and not _port_free(port)
        local._stop_pid(pid, marker, timeout=10)
        assert _port_free(port), f"port still held by {pid}: {_state(pid)}"
        assert not local._alive(pid, marker)
        if started_by == "this process":
            assert pid not in local._CHILDREN  # reaped
        else:
            assert _state(pid) == "Z"  # gone, but not reaped: not ours to reap
    finally:
        process.kill()
        process.wait()


def test_a_server_that_exits_while_starting_shows_its_own_output(tmp_path: Path) -> None:
    """A restarted server appends to its log: the error shows what the new process wrote
    (here nothing before its exit status), never the previous process's last lines."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "kafka.log"
    log.write_text("[..] INFO [KafkaRaftServer nodeId=1] shut down completed (kafka.server)\n")
    [port] = local.free_ports(1)
    services = local.LocalServices(
        kafka_bootstrap=f"127.0.0.1:{port}", influx_url="http://127.0.0.1:9", run_dir=run_dir,
        state_dir=tmp_path, kafka_port=port, controller_port=port, influx_port=9,
        influx_rpc_port=9, kafka_pid=None, influx_pid=None, database="-",
        kafka_version=local.kafka_version(), influxd=tmp_path / "influxd",
    )
    services.kafka_pid = local._spawn(
        ["/bin/sh", "-c", "echo the new broker failed; exit 3", str(run_dir)], log, run_dir
    )
    with pytest.raises(local.LocalServicesError) as failed:
        local._wait_kafka(services, time.monotonic() + 30)
    message = str(failed.value)
    assert message.startswith("Kafka exited while starting")
    assert "the new broker failed" in message and "shut down completed" not in message
    assert message.splitlines()[-2].startswith(local._STARTED)
