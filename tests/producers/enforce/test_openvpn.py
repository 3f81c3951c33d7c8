"""The `openvpn` enforcement backend: its checks, and the ccd + management `kill` path on a
real OpenVPN server with a real OpenVPN client and real traffic.

Server and client are Debian's `openvpn` on this namespace's loopback (UDP), with
certificates from a throwaway CA made with openssl; each tun device is moved into
a network namespace of its own, with an HTTP server on the server's side.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from quotaflow.producers.enforce.backends import EnforceError, load_backend
from quotaflow.producers.enforce.backends.openvpn import Config, OpenVpnBackend, build
from quotaflow.producers.enforce.credentials import Credentials
from quotaflow.producers.sources import SourceError
from quotaflow.producers.sources.openvpn import OpenVpnManagement, parse_openvpn_status
from tests.producers.enforce.helpers import FETCH, command
from tests.producers.sources import helpers
from tests.producers.sources.helpers import (
    _NETNS_HTTP_SERVER,
    DOWNLOAD,
    LOCAL,
    SBIN_PATH,
    UPLOAD,
    Processes,
    _ip,
    free_port,
    listening,
    wait_until,
)
from tests.producers.sources.test_openvpn import _pki

node_software = helpers.node_software
processes = helpers.processes
root = helpers.root

PASSWORD = "mgmt-Secret-9"
NET = "10.220.0"
SERVER_IP, ALICE_IP = f"{NET}.1", f"{NET}.10"
PUSHED = f"ifconfig-push {ALICE_IP} 255.255.255.0\n"  # alice's own line in her ccd file


def credentials() -> Credentials:
    return Credentials.model_validate(
        {
            "accounts": [
                {"user_id": "alice", "backend": "openvpn", "common_name": "alice"},
                {"user_id": "bob", "backend": "openvpn", "common_name": "bob"},
            ]
        }
    )


@dataclass
class Vpn:
    """A running OpenVPN server, and what starting clients for alice needs."""

    folder: Path
    processes: Processes
    port: int
    management: str
    client_ns: str
    client_dev: str
    common: list[str]
    env: dict[str, str] = field(default_factory=dict)
    clients: int = 0

    @property
    def ccd(self) -> Path:
        return self.folder / "ccd"

    def start_client(self) -> tuple[str, subprocess.Popen[bytes]]:
        """A new client process for alice; its log's name and the process."""
        self.clients += 1
        name = f"openvpn-client-{self.clients}"
        argv = ["openvpn", "--client", "--remote", LOCAL, str(self.port), "--dev",
                self.client_dev, "--cert", "alice.crt", "--key", "alice.key", *self.common]
        return name, self.processes.start(name, argv, cwd=self.folder)  # fmt: skip

    def connect(self) -> tuple[str, subprocess.Popen[bytes]]:
        """A client that gets through: its tun device moved into the client namespace."""
        name, proc = self.start_client()
        wait_until("the client's tun device",
                   lambda: Path(f"/sys/class/net/{self.client_dev}").exists(),
                   timeout=20)  # fmt: skip
        _ip("link", "set", self.client_dev, "netns", self.client_ns)
        _ip("-n", self.client_ns, "addr", "add", f"{ALICE_IP}/24", "dev", self.client_dev)
        _ip("-n", self.client_ns, "link", "set", self.client_dev, "up")
        return name, proc

    def fetch(self, deadline: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", self.client_ns, sys.executable, "-c", FETCH, SERVER_IP,
             "8080", str(UPLOAD), str(deadline)],
            capture_output=True, timeout=deadline + 60, env=self.env,
        )  # fmt: skip

    def works(self) -> bool:
        done = self.fetch()
        return done.returncode == 0 and len(done.stdout) == DOWNLOAD

    def sessions(self) -> list[str]:
        """The common names of the server's client sessions, asked over management."""
        [answer] = OpenVpnManagement(self.management, PASSWORD).commands("status 2")
        return [s.common_name for s in parse_openvpn_status("\n".join(answer))]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")


def _server_argv(folder: Path, port: int, dev: str, management: list[str]) -> list[str]:
    (folder / "management.pw").write_text(PASSWORD + "\n")
    return ["openvpn", "--mode", "server", "--tls-server", "--local", LOCAL, "--port", str(port),
            "--dev", dev, "--topology", "subnet", "--ifconfig", SERVER_IP, "255.255.255.0",
            "--ifconfig-pool", f"{NET}.100", f"{NET}.120", "--push", "topology subnet",
            "--cert", "server.crt", "--key", "server.key", "--dh", "none",
            "--client-config-dir", "ccd", "--keepalive", "1", "3",
            "--management", *management, "management.pw"]  # fmt: skip


COMMON = ["--dev-type", "tun", "--proto", "udp4", "--ifconfig-noexec", "--route-noexec",
          "--disable-dco", "--ca", "ca.crt", "--verb", "3"]  # fmt: skip


@pytest.fixture
def vpn(root: None, node_software: None, processes: Processes, tmp_path: Path) -> Iterator[Vpn]:
    _pki(tmp_path)
    (tmp_path / "ccd").mkdir()
    (tmp_path / "ccd" / "alice").write_text(PUSHED)
    tag = f"{os.getpid() % 100_000}"
    ns_client, ns_server = f"qf{tag}vc", f"qf{tag}vs"
    dev_client, dev_server = f"qfvc{tag}", f"qfvs{tag}"
    port, management = free_port(socket.SOCK_DGRAM), free_port()
    env = {**os.environ, "PATH": SBIN_PATH}
    try:
        for ns in (ns_client, ns_server):
            _ip("netns", "add", ns)
        argv = _server_argv(tmp_path, port, dev_server, [LOCAL, str(management)])
        processes.start("openvpn-server", [*argv, *COMMON], cwd=tmp_path)
        wait_until("the OpenVPN server", lambda: Path(f"/sys/class/net/{dev_server}").exists())
        wait_until("its management interface", lambda: listening(management))
        _ip("link", "set", dev_server, "netns", ns_server)
        _ip("-n", ns_server, "addr", "add", f"{SERVER_IP}/24", "dev", dev_server)
        for ns in (ns_server, ns_client):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns_server, "link", "set", dev_server, "up")
        processes.start(
            "http-in-netns",
            ["ip", "netns", "exec", ns_server, sys.executable, "-c", _NETNS_HTTP_SERVER,
             SERVER_IP, "8080", str(DOWNLOAD)],
        )  # fmt: skip
        yield Vpn(tmp_path, processes, port, f"{LOCAL}:{management}", ns_client, dev_client,
                  COMMON, env)  # fmt: skip
    finally:
        processes.stop()
        for ns in (ns_client, ns_server):
            _ip("netns", "del", ns, check=False)


@pytest.mark.integration
def test_disable_kills_and_refuses_and_enable_lets_back_in(vpn: Vpn) -> None:
    backend = load_backend(
        {"type": "openvpn", "management": vpn.management, "management_password": PASSWORD,
         "ccd_dir": str(vpn.ccd), "timeout_s": 5},
        credentials(),
    )  # fmt: skip
    assert backend.serves("alice") and backend.serves("bob") and not backend.serves("carol")
    first, client = vpn.connect()
    assert vpn.works(), vpn.processes.logs()
    assert vpn.sessions() == ["alice"]
    assert backend.apply(command("enable")).outcome == "already"

    disabled = backend.apply(command("disable"))
    assert disabled.outcome == "applied", disabled
    assert "killed 1 session(s) of alice" in disabled.detail
    assert (vpn.ccd / "alice").read_text() == PUSHED + "disable\n"  # her own line kept
    killed_at = time.monotonic()
    # The server forgot the session at once; the tunnel passes nothing any more.
    assert vpn.sessions() == []
    assert vpn.fetch(deadline=2.0).returncode != 0, "traffic went through after the kill"
    # Over UDP the client is not told: it notices by ping-restart (3 s here), comes back
    # and is refused by the ccd file's `disable`; on AUTH_FAILED it exits.
    assert client.wait(timeout=30) is not None
    exited_after = time.monotonic() - killed_at
    assert "AUTH_FAILED" in vpn.log(first), vpn.log(first)
    assert "rejected due to 'disable' directive" in vpn.log("openvpn-server")

    again = backend.apply(command("disable"))
    assert again.outcome == "already", again
    assert (vpn.ccd / "alice").read_text() == PUSHED + "disable\n"
    assert not (vpn.ccd / "bob").exists()

    # A client started while disabled cannot connect: refused, it exits, no tunnel.
    refused, late = vpn.start_client()
    assert late.wait(timeout=30) is not None
    assert "AUTH_FAILED" in vpn.log(refused)
    assert "Initialization Sequence Completed" not in vpn.log(refused)

    enabled = backend.apply(command("enable"))
    assert enabled.outcome == "applied", enabled
    assert (vpn.ccd / "alice").read_text() == PUSHED  # only `disable` taken out
    assert backend.apply(command("enable")).outcome == "already"
    vpn.connect()
    assert vpn.works(), vpn.processes.logs()
    assert vpn.sessions() == ["alice"]
    print(f"\nthe killed client exited on AUTH_FAILED {exited_after:.1f} s after the kill")


@pytest.fixture
def unix_vpn(root: None, node_software: None, processes: Processes, tmp_path: Path) -> Path:
    """A client-less OpenVPN server with its management interface on a unix socket."""
    _pki(tmp_path)
    (tmp_path / "ccd").mkdir()
    dev = f"qfvu{os.getpid() % 100_000}"
    sock = tmp_path / "management.sock"
    argv = _server_argv(tmp_path, free_port(socket.SOCK_DGRAM), dev, [str(sock), "unix"])
    processes.start("openvpn-server", [*argv, *COMMON], cwd=tmp_path)
    wait_until("the management socket", sock.exists)
    return tmp_path


@pytest.mark.integration
def test_ccd_file_and_management_over_a_unix_socket(unix_vpn: Path) -> None:
    sock, ccd = unix_vpn / "management.sock", unix_vpn / "ccd"
    entry = {"type": "openvpn", "management": str(sock), "management_password": PASSWORD,
             "ccd_dir": str(ccd), "timeout_s": 2}  # fmt: skip
    backend = load_backend(entry, credentials())
    # bob has no ccd file and no session: disable writes the file, kills nobody.
    disabled = backend.apply(command("disable", "bob"))
    assert disabled.outcome == "applied" and "no session of bob" in disabled.detail
    assert (ccd / "bob").read_text() == "disable\n"
    assert oct((ccd / "bob").stat().st_mode & 0o777) == "0o644"
    assert backend.apply(command("disable", "bob")).outcome == "already"
    assert backend.apply(command("enable", "bob")).outcome == "applied"
    assert not (ccd / "bob").exists()  # nothing else was in it: deleted
    assert backend.apply(command("enable", "bob")).outcome == "already"
    assert sorted(p.name for p in ccd.iterdir()) == []  # no temporary file left behind

    wrong = load_backend({**entry, "management_password": "not-it"}, credentials())
    with pytest.raises(EnforceError, match="refused the password") as caught:
        wrong.apply(command("disable", "alice"))
    assert "not-it" not in str(caught.value) and PASSWORD not in str(caught.value)

    # OpenVPN serves one management client at a time: while one stays, the next waits.
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(str(sock))
    try:
        with pytest.raises(EnforceError, match="one management client at a time"):
            backend.apply(command("disable", "alice"))
    finally:
        holder.close()
    assert OpenVpnManagement(str(sock), PASSWORD, timeout=5).kill("alice") == 0


# ------------------------------------------------------------ without the program


def test_build_checks() -> None:
    creds = credentials()
    with pytest.raises(ValueError, match="is not a directory"):
        load_backend({"type": "openvpn", "management": "x:1", "ccd_dir": "/nonexistent"}, creds)
    entry: dict[str, Any] = {"type": "openvpn", "management": "x:1", "ccd_dir": "/tmp"}
    with pytest.raises(ValueError, match=r"no openvpn credentials for the configured users: carol"):
        load_backend({**entry, "users": ["alice", "carol"]}, creds)
    only = load_backend({**entry, "users": ["bob"]}, creds)
    assert only.serves("bob") and not only.serves("alice")
    for name in ("../etc/passwd", "a b", "..", "x:1"):
        bad = Credentials.model_validate(
            {"accounts": [{"user_id": "alice", "backend": "openvpn", "common_name": name}]}
        )
        with pytest.raises(ValueError, match="is not one OpenVPN keeps"):
            load_backend(entry, bad)
    twice = Credentials.model_validate({"accounts": [
        {"user_id": "alice", "backend": "openvpn", "common_name": "shared"},
        {"user_id": "bob", "backend": "openvpn", "common_name": "shared"},
    ]})  # fmt: skip
    with pytest.raises(ValueError, match="belongs to two users"):
        load_backend(entry, twice)


def test_warn_and_strangers_are_skipped(tmp_path: Path) -> None:
    config = Config(type="openvpn", management=f"{LOCAL}:9", ccd_dir=tmp_path)
    backend = build(config, credentials())
    assert backend.apply(command("warn")).outcome == "skipped"
    assert backend.apply(command("disable", "carol")).outcome == "skipped"
    assert list(tmp_path.iterdir()) == []


def test_unreachable_management_is_an_enforce_error_after_the_file(tmp_path: Path) -> None:
    """The file is written first, so a retry after the failure only needs the kill."""
    config = Config(type="openvpn", management=f"{LOCAL}:{free_port()}", ccd_dir=tmp_path,
                    timeout_s=1)  # fmt: skip
    backend = OpenVpnBackend(config, {"alice": ("alice",)})
    with pytest.raises(EnforceError, match="openvpn disable alice: OpenVPN management"):
        backend.apply(command("disable"))
    assert (tmp_path / "alice").read_text() == "disable\n"
    (tmp_path / "alice").write_text("# mine\ndisable\n  disable\npush \"route 10.0.0.0 255.0.0.0\"")
    assert backend.apply(command("enable")).outcome == "applied"
    assert (tmp_path / "alice").read_text() == "# mine\npush \"route 10.0.0.0 255.0.0.0\""


def test_management_refuses_multi_line_commands_and_odd_names() -> None:
    client = OpenVpnManagement(f"{LOCAL}:9")
    with pytest.raises(ValueError):
        client.commands("kill alice\nsignal SIGTERM")
    with pytest.raises(ValueError):
        client.kill("1.2.3.4:1194")
    with pytest.raises(SourceError):
        OpenVpnManagement(f"{LOCAL}:{free_port()}", timeout=0.5).kill("alice")
