"""The ss-manager source: its stat answer, the real ss-manager, and billing through the pipeline."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from quotaflow.core.settings import Settings
from quotaflow.producers.sources import ParseError, SourceError
from quotaflow.producers.sources.ss_manager import SsManagerClient, parse_ss_manager_stat
from tests.producers.sources.helpers import (
    DOWNLOAD,
    LOCAL,
    METHOD,
    SLACK,
    UPLOAD,
    Processes,
    billed_through_agent,
    by_user,
    free_port,
    listening,
    push_known_bytes,
    readings,
    sample,
    start_ss_local,
    wait_until,
)


def test_ss_manager_sample() -> None:
    counters = parse_ss_manager_stat(sample("ss-manager-stat.txt"))
    assert readings(counters) == {"8388": (0, 21960643), "8389": (0, 10505169), "8390": (0, 0)}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"8388": 5}', {"8388": (0, 5)}),
        ("stat: {}", {}),
        ('stat: {"8388": 5}\x00\x00', {"8388": (0, 5)}),
        # ss-manager splits long answers; the later datagrams lack "stat: {".
        (
            'stat: {"8388":5,"8389":6}\n"8390":7,"8391":8}',
            {"8388": (0, 5), "8389": (0, 6), "8390": (0, 7), "8391": (0, 8)},
        ),
    ],
)
def test_ss_manager_variants(text: str, expected: dict[str, tuple[int, int]]) -> None:
    assert readings(parse_ss_manager_stat(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "pong",
        "stat:",
        "stat: []",
        'stat: {"8388": -1}',
        'stat: {"8388": 1.5}',
        'stat: {"http": 1}',
        'stat: {"0": 1}',
        'stat: {"70000": 1}',
        'stat: {"08388": 1}',
        'stat: {"8388": 1, "8388": 2}',
        'stat: {"8388": 1}\n"8388": 2}',
    ],
)
def test_ss_manager_refuses_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_ss_manager_stat(text)


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
