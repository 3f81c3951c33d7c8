"""The `ss-manager` enforcement backend: its config and credentials checks, and the
disable/enable cycle on the real ss-manager (Debian's shadowsocks-libev) with real traffic.

The traffic goes through a real ss-local to the ss-server that ss-manager runs for
the user's port, to a local HTTP server. Two counting relays sit on its way (ss-local
-> relay -> ss-server, and ss-server -> relay -> HTTP server), so the bytes that
really moved are known independently of ss-manager: ss-server's figure is the
ciphertext it received from the client plus the plaintext it received from the
target, to the byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotaflow.core.plans import Action
from quotaflow.core.settings import Settings
from quotaflow.producers.agent import Agent, AgentConfig
from quotaflow.producers.enforce.backends import Backend, EnforceError, load_backend
from quotaflow.producers.enforce.credentials import Credentials
from quotaflow.producers.sources import SOURCES, ParseError
from quotaflow.producers.sources.ss_manager import (
    SsManagerClient,
    SsManagerConfig,
    parse_ss_manager_list,
)
from tests.producers.enforce.helpers import TcpServer, command
from tests.producers.enforce.helpers import echo as echo_back
from tests.producers.enforce.test_agent_enforce import _raw_reports
from tests.producers.enforce.test_consumer import Control
from tests.producers.sources import helpers
from tests.producers.sources.helpers import (
    LOCAL,
    METHOD,
    Processes,
    free_port,
    listening,
    push_known_bytes,
    socks_http,
    start_ss_local,
    wait_until,
)

# The source tests' fixtures: Debian's node software, processes killed at teardown,
# the local HTTP server.
node_software = helpers.node_software
processes = helpers.processes
http_port = helpers.http_port

ALICE_PASSWORD = "alice-Secret-7"
BOB_PASSWORD = "bob-Secret-8"


def credentials(alice_port: int, bob_port: int) -> Credentials:
    return Credentials.model_validate(
        {
            "accounts": [
                {"user_id": "alice", "backend": "ss-manager", "server_port": alice_port,
                 "password": ALICE_PASSWORD, "method": METHOD},
                {"user_id": "bob", "backend": "ss-manager", "server_port": bob_port,
                 "password": BOB_PASSWORD},
            ]
        }
    )  # fmt: skip


# ---------------------------------------------------------------- counting relays


class CountingRelay(TcpServer):
    """A TCP relay on loopback to `target`, counting the bytes each way."""

    def __init__(self, target_port: int) -> None:
        self.target = (LOCAL, target_port)
        self.up = 0  # client -> target
        self.down = 0  # target -> client
        self._lock = threading.Lock()
        super().__init__(self._relay)

    def _relay(self, client: socket.socket) -> None:
        with socket.create_connection(self.target, timeout=5) as server:
            server.settimeout(None)
            back = threading.Thread(target=self._pipe, args=(server, client, False), daemon=True)
            back.start()
            self._pipe(client, server, True)
            back.join()

    def _pipe(self, source: socket.socket, sink: socket.socket, up: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down


def socks_connect(socks_port: int, target_port: int) -> socket.socket:
    """A connection to 127.0.0.1:target_port through a SOCKS5 proxy, left open."""
    sock = socket.create_connection((LOCAL, socks_port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(LOCAL) + target_port.to_bytes(2, "big"))
    assert sock.recv(10)[:2] == b"\x05\x00"
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def http_fails(socks_port: int, target_port: int) -> bool:
    """Whether one HTTP request through the proxy fails (no answer, or a cut one)."""
    try:
        socks_http(socks_port, target_port, timeout=5)
    except (OSError, AssertionError):
        return True
    return False


# -------------------------------------------------------------------- ss-manager


@pytest.fixture
def ss_manager(node_software: None, processes: Processes) -> SsManagerClient:
    port = free_port(socket.SOCK_DGRAM)
    workdir = processes.folder / "ss-manager"
    workdir.mkdir()
    processes.pid_files.append(workdir / ".shadowsocks_*.pid")  # its ss-servers
    argv = ["ss-manager", "-m", METHOD, "-s", LOCAL, "-D", str(workdir)]
    argv += ["--manager-address", f"{LOCAL}:{port}", "--executable", "/usr/bin/ss-server"]
    processes.start("ss-manager", argv)
    client = SsManagerClient(f"{LOCAL}:{port}", timeout=0.5)

    def answers() -> bool:
        try:
            return client.list_ports() == []
        except Exception:
            return False

    wait_until("ss-manager", answers)
    return client


@pytest.fixture
def relays(http_port: int) -> Iterator[dict[str, CountingRelay]]:
    """`target`: a counting relay in front of the HTTP server (the ss-server's side)."""
    target = CountingRelay(http_port)
    try:
        yield {"target": target}
    finally:
        target.close()


def port_figure(client: SsManagerClient, port: int) -> int | None:
    figures = {c.user_id: c.down for c in client.query_port_counters()}
    return figures.get(str(port))


@pytest.mark.integration
def test_disable_and_enable_with_real_traffic(
    ss_manager: SsManagerClient, processes: Processes, relays: dict[str, CountingRelay],
) -> None:  # fmt: skip
    alice_port, bob_port = free_port(), free_port()
    backend = load_backend(
        {"type": "ss-manager", "address": ss_manager.address, "timeout_s": 1.0},
        credentials(alice_port, bob_port),
    )
    assert backend.serves("alice") and backend.serves("bob") and not backend.serves("carol")

    # Both ports start through the backend: enable adds what `list` lacks, once.
    for user in ("alice", "bob"):
        assert backend.apply(command("enable", user)).outcome == "applied"
    assert backend.apply(command("enable")).outcome == "already"
    assert ss_manager.list_ports() == sorted([alice_port, bob_port])
    wait_until("alice's ss-server", lambda: listening(alice_port))

    # ss-local -> counting relay -> ss-server; ss-server -> counting relay -> HTTP server.
    client_side = CountingRelay(alice_port)
    target = relays["target"]
    socks = start_ss_local(processes, ALICE_PASSWORD, client_side.port)
    push_known_bytes(socks, target.port)

    def moved() -> int:
        """The bytes ss-server counts: ciphertext from ss-local, plaintext from the target."""
        return client_side.totals()[0] + target.totals()[1]

    # ss-server pushes its figure every 5 s; once pushed, it is every byte moved.
    wait_until("ss-server's stat push", lambda: port_figure(ss_manager, alice_port) == moved(),
               timeout=12)  # fmt: skip
    collector = SOURCES["ss-manager"].collector(
        SsManagerConfig(type="ss-manager", address=ss_manager.address,
                        user_map={str(alice_port): "alice"})
    )  # fmt: skip
    snapshot = {c.user_id: c for c in collector.collect().counters}["alice"]
    assert (snapshot.up, snapshot.down) == (0, moved()), (snapshot, client_side.totals())

    echo = TcpServer(echo_back)
    held = socks_connect(socks, echo.port)
    held.sendall(b"still here")
    assert held.recv(100) == b"still here"

    started = time.monotonic()
    disabled = backend.apply(command("disable"))
    assert disabled.outcome == "applied", disabled
    assert str(alice_port) in disabled.detail and ALICE_PASSWORD not in disabled.detail
    assert ss_manager.list_ports() == [bob_port]
    # The open connection is cut: ss-manager stopped the port's ss-server.
    assert closed_within(held, 5.0), "the open connection survived the removal"
    cut_after = time.monotonic() - started
    held.close()
    # New connections fail, and the removed port's counter is gone from ss-manager.
    wait_until("the ss-server to stop", lambda: not listening(alice_port))
    assert http_fails(socks, target.port)
    assert port_figure(ss_manager, alice_port) is None
    assert "alice" not in {c.user_id for c in collector.collect().counters}
    assert port_figure(ss_manager, bob_port) == 0

    assert backend.apply(command("disable")).outcome == "already"
    assert ss_manager.list_ports() == [bob_port]
    ss_manager.remove(alice_port)  # ss-manager answers "ok" for a port it does not run

    enabled = backend.apply(command("enable"))
    assert enabled.outcome == "applied", enabled
    assert backend.apply(command("enable")).outcome == "already"
    wait_until("alice's ss-server again", lambda: listening(alice_port))
    assert port_figure(ss_manager, alice_port) == 0
    at_enable = moved()
    push_known_bytes(socks, target.port)
    # The re-added port's figure starts again from 0: it counts the bytes since enable.
    wait_until("the new ss-server's push",
               lambda: port_figure(ss_manager, alice_port) == moved() - at_enable > 0,
               timeout=12)  # fmt: skip
    echo.close()
    client_side.close()
    print(f"open connection cut {cut_after:.3f} s after disable began")


@pytest.mark.integration
def test_bytes_since_the_last_stat_push_are_lost_on_removal(
    ss_manager: SsManagerClient, processes: Processes, relays: dict[str, CountingRelay],
) -> None:  # fmt: skip
    """What a snapshot taken right before `disable` holds: ss-manager's last pushed figure.

    Bytes moved after the ss-server's last push are in no snapshot, and removal
    loses them (the ss-server sends no last figure on SIGTERM).
    """
    alice_port = free_port()
    backend = load_backend(
        {"type": "ss-manager", "address": ss_manager.address}, credentials(alice_port, 1)
    )
    assert backend.apply(command("enable")).outcome == "applied"
    wait_until("alice's ss-server", lambda: listening(alice_port))
    client_side, target = CountingRelay(alice_port), relays["target"]
    socks = start_ss_local(processes, ALICE_PASSWORD, client_side.port)

    def moved() -> int:
        return client_side.totals()[0] + target.totals()[1]

    push_known_bytes(socks, target.port)
    wait_until("a stat push", lambda: port_figure(ss_manager, alice_port) == moved(), timeout=12)
    pushed = moved()
    # Right after a push, the next is ~5 s away: these bytes wait for it.
    push_known_bytes(socks, target.port)
    snapshot = port_figure(ss_manager, alice_port)
    assert backend.apply(command("disable")).outcome == "applied"
    assert snapshot == pushed < moved(), (snapshot, pushed, moved())
    time.sleep(6)  # past the next push the ss-server would have made
    assert port_figure(ss_manager, alice_port) is None
    print(f"lost on removal: {moved() - pushed} bytes moved after the last stat push")
    client_side.close()


@pytest.mark.integration
@pytest.mark.parametrize("settle_s", [5.5, 0.0])
def test_the_agent_waits_for_the_stat_push_before_its_snapshot_of_a_disable(
    ss_manager: SsManagerClient, processes: Processes, relays: dict[str, CountingRelay],
    settings: Settings, tmp_path: Path, settle_s: float,
) -> None:  # fmt: skip
    """The agent's path: a disable on `.control`, the backend's `prepare_disable`, the
    snapshot through the real ss-manager collector, then the removal.

    A round moved right after a stat push is not in ss-manager's figure when the
    disable is published; the snapshot stored before the removal holds it, to the
    byte. With `settle_s = 0` (no wait) the snapshot lacks it: the round is lost.
    """
    alice_port = free_port()
    creds = tmp_path / "credentials.toml"
    creds.write_text(
        f'[[accounts]]\nuser_id = "alice"\nbackend = "ss-manager"\nserver_port = {alice_port}\n'
        f'password = "{ALICE_PASSWORD}"\nmethod = "{METHOD}"\n'
    )
    backend = load_backend(
        {"type": "ss-manager", "address": ss_manager.address}, credentials(alice_port, 1)
    )
    assert backend.apply(command("enable")).outcome == "applied"
    wait_until("alice's ss-server", lambda: listening(alice_port))
    client_side, target = CountingRelay(alice_port), relays["target"]
    socks = start_ss_local(processes, ALICE_PASSWORD, client_side.port)

    def moved() -> int:
        return client_side.totals()[0] + target.totals()[1]

    config = AgentConfig.model_validate({
        "node_id": "ssm", "outbox": str(tmp_path / "o.db"), "baseline_on_first_start": False,
        "kafka": {"bootstrap": settings.kafka_bootstrap, "topic_prefix": settings.topic_prefix},
        "collectors": [{"type": "ss-manager", "address": ss_manager.address,
                        "user_map": {str(alice_port): "alice"}, "interval_s": 3600}],
        "enforce": {
            "credentials": str(creds), "poll_interval_s": 0.2,
            "retry": {"base_s": 0.2, "cap_s": 1.0},
            "backends": [{"type": "ss-manager", "address": ss_manager.address,
                          "settle_s": settle_s}],
        },
    })  # fmt: skip
    control = Control(settings)
    agent = Agent(config, settings=settings)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(agent.run(),))
    thread.start()
    try:
        push_known_bytes(socks, target.port)
        wait_until("a stat push", lambda: port_figure(ss_manager, alice_port) == moved(),
                   timeout=12)  # fmt: skip
        pushed = moved()
        # Right after a push, the next is ~5 s away: these bytes wait for it.
        push_known_bytes(socks, target.port)
        before = port_figure(ss_manager, alice_port)
        at_disable = moved()
        disable = command("disable")
        started = time.monotonic()
        control.publish(disable)
        control.wait(lambda: control.outcomes(disable.command_id) != [], why="the disable")
        took = time.monotonic() - started
        outcomes = control.outcomes(disable.command_id)
    finally:
        loop.call_soon_threadsafe(agent.stop.set)
        thread.join(60)
        control.close()
    assert not thread.is_alive()
    loop.close()
    assert before == pushed < at_disable == moved(), (before, pushed, at_disable, moved())
    assert outcomes == ["applied"]
    assert ss_manager.list_ports() == []
    # The reports that reached Kafka: the first collection at start, then the snapshot
    # stored before the removal, which holds the round moved after the last push.
    downs = [[c.down for c in r.counters if c.user_id == "alice"]
             for r in _raw_reports(settings, "ssm")]  # fmt: skip
    assert all(d in ([], [0]) for d in downs[:-1]), downs
    client_side.close()
    if settle_s == 0:
        assert downs[-1] == [pushed], (downs, pushed, at_disable)
        print(f"settle_s = 0: disable acknowledged {took:.2f} s after it was published; the"
              f" snapshot lacked the {at_disable - pushed} bytes moved after the last push")
        return
    assert downs[-1] == [at_disable], (downs, pushed, at_disable)
    print(f"disable acknowledged {took:.2f} s after it was published; the snapshot held "
          f"{at_disable - pushed} bytes moved after the last push before the disable")


# ------------------------------------------------------------ without the program


def test_list_answers() -> None:
    assert parse_ss_manager_list("[\n]") == []
    two = '[\n\t{"server_port":"8389","password":"a\\"b","method":"m"},'
    two += '\n\t{"server_port":"8388","password":"","method":"m"}\n]'
    assert parse_ss_manager_list(two) == [8388, 8389]
    # ss-manager splits a long list over datagrams; joined, it reads as one.
    split = '[\n\t{"server_port":"1","password":"x","method":"m"},' + '\n\t{"server_port":"2",'
    assert parse_ss_manager_list(split + '"password":"y","method":"m"}\n]') == [1, 2]


@pytest.mark.parametrize(
    "text",
    ["", "ok", "stat: {}", "[", '[{"server_port":"0","password":"x"}]',
     '[{"server_port":"70000","password":"x"}]', '[{"server_port":"08388","password":"x"}]',
     '[{"password":"x","server_port":"8388"}]',
     '[{"server_port":"1","password":"x"},{"server_port":"1","password":"y"}]'],
)  # fmt: skip
def test_list_garbage_is_refused(text: str) -> None:
    with pytest.raises(ParseError):
        parse_ss_manager_list(text)


def _entry(**options: object) -> dict[str, object]:
    return {"type": "ss-manager", "address": f"{LOCAL}:9", **options}


def test_build_refuses_a_configured_user_without_credentials() -> None:
    with pytest.raises(ValueError, match=r"no ss-manager credentials .*: carol"):
        load_backend(_entry(users=["alice", "carol"]), credentials(8388, 8389))


def test_serves_only_users_with_a_port() -> None:
    creds = credentials(8388, 8389)
    assert {u for u in ("alice", "bob", "carol") if load_backend(_entry(), creds).serves(u)} == {
        "alice", "bob"}  # fmt: skip
    only_bob = load_backend(_entry(users=["bob"]), creds)
    assert only_bob.serves("bob") and not only_bob.serves("alice")


@pytest.mark.parametrize(
    ("password", "problem"),
    [("", "empty"), ("x" * 128, "longer than 127"), ('a"b', "quote"), ("a\\b", "backslash"),
     ("a\nb", "control")],
)  # fmt: skip
def test_build_refuses_passwords_ss_manager_would_mangle(password: str, problem: str) -> None:
    creds = Credentials.model_validate({"accounts": [
        {"user_id": "alice", "backend": "ss-manager", "server_port": 8388, "password": password}
    ]})  # fmt: skip
    with pytest.raises(ValueError, match=problem) as caught:
        load_backend(_entry(), creds)
    assert password not in str(caught.value) or not password


def test_build_refuses_one_port_for_two_users() -> None:
    with pytest.raises(ValueError, match="port 8388 belongs to two users"):
        load_backend(_entry(), credentials(8388, 8388))


def test_warn_is_skipped_and_strangers_are_skipped() -> None:
    backend: Backend = load_backend(_entry(), credentials(8388, 8389))
    assert backend.apply(command("warn")).outcome == "skipped"
    assert backend.apply(command("disable", "carol")).outcome == "skipped"


def test_an_unreachable_manager_is_an_enforce_error_without_secrets() -> None:
    silent = f"{LOCAL}:{free_port(socket.SOCK_DGRAM)}"
    backend = load_backend(
        {"type": "ss-manager", "address": silent, "timeout_s": 0.3}, credentials(8388, 8389)
    )
    actions: tuple[Action, ...] = ("disable", "enable")
    for action in actions:
        with pytest.raises(EnforceError, match=f"ss-manager {action} alice") as caught:
            backend.apply(command(action))
        assert ALICE_PASSWORD not in str(caught.value)
