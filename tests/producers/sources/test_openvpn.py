"""The openvpn source: status files of versions 1-3, the session accumulator, a real
OpenVPN tunnel."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotaflow.core.contracts import MAX_COUNTER, Counter
from quotaflow.producers.sources import ParseError
from quotaflow.producers.sources.openvpn import (
    OpenVpnAccumulator,
    OpenVpnSession,
    openvpn_counters,
    parse_openvpn_status,
    read_openvpn_status,
)
from tests.producers.sources.helpers import (
    _NETNS_FETCH,
    _NETNS_HTTP_SERVER,
    DOWNLOAD,
    LOCAL,
    SBIN_PATH,
    UPLOAD,
    Processes,
    _body,
    _ip,
    assert_tunnel_figures,
    by_user,
    free_port,
    readings,
    sample,
    wait_until,
)

OPENVPN_EXPECTED = {"alice": (1843921 + 52001, 20481733 + 640113), "bob": (73219, 918274)}


@pytest.mark.parametrize(
    "name", ["openvpn-status-v1.log", "openvpn-status-v2.log", "openvpn-status-v3.log"]
)
def test_openvpn_status_samples(name: str) -> None:
    sessions = parse_openvpn_status(sample(name))
    assert [(s.common_name, s.real_address) for s in sessions] == [
        ("alice", "198.51.100.7:50312"),
        ("bob", "203.0.113.24:41877"),
        ("alice", "192.0.2.55:1194"),
        ("UNDEF", "203.0.113.99:60001"),
    ]
    assert sessions[0].bytes_received == 1843921
    assert sessions[0].bytes_sent == 20481733
    assert sessions[0].connected_since_text == "2026-11-21 09:14:02"
    assert readings(openvpn_counters(sessions)) == OPENVPN_EXPECTED


def test_openvpn_connected_since() -> None:
    v1 = parse_openvpn_status(sample("openvpn-status-v1.log"))
    v2 = parse_openvpn_status(sample("openvpn-status-v2.log"))
    assert all(s.connected_since is None for s in v1)
    assert [s.connected_since for s in v2] == [1795252442, 1795262320, 1795260619, 1795262403]


def test_openvpn_v2_columns_found_by_header_name() -> None:
    text = (
        "HEADER,CLIENT_LIST,Bytes Sent,Common Name,Bytes Received,Real Address\n"
        "CLIENT_LIST,5,carol,7,192.0.2.1:1\n"
        "END\n"
    )
    [session] = parse_openvpn_status(text)
    assert (session.common_name, session.bytes_received, session.bytes_sent) == ("carol", 7, 5)
    assert session.connected_since is None


@pytest.mark.parametrize(
    "row",
    [
        # OpenVPN 2.3: no IPv6 column, no client/peer id, no cipher
        "CLIENT_LIST,carol,192.0.2.1:1194,10.8.0.2,7,5,Thu Nov 19 10:00:00 2026,1795082400,UNDEF",
        # OpenVPN 2.4: no cipher
        "CLIENT_LIST,carol,192.0.2.1:1194,10.8.0.2,,7,5,Thu Nov 19 10:00:00 2026,1795082400,"
        "UNDEF,0,0",
    ],
)
def test_openvpn_v2_without_header_uses_known_layouts(row: str) -> None:
    text = f"TITLE,OpenVPN 2.4.12\nTIME,Thu Nov 19 10:00:05 2026,1795082405\n{row}\nEND\n"
    [session] = parse_openvpn_status(text)
    assert (session.common_name, session.bytes_received, session.bytes_sent) == ("carol", 7, 5)
    assert session.connected_since == 1795082400


def test_openvpn_management_crlf() -> None:
    text = sample("openvpn-status-v3.log").replace("\n", "\r\n")
    assert readings(openvpn_counters(parse_openvpn_status(text))) == OPENVPN_EXPECTED


@pytest.mark.parametrize(
    "name", ["openvpn-status-v1.log", "openvpn-status-v2.log", "openvpn-status-v3.log"]
)
def test_openvpn_truncated_file_is_refused(name: str) -> None:
    text = sample(name)
    cut = text[: text.index("\n", len(text) // 3)]
    with pytest.raises(ParseError, match="END"):
        parse_openvpn_status(cut)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "hello",
        "OpenVPN CLIENT LIST\nEND\n",
        "OpenVPN CLIENT LIST\nCommon Name,Real Address,Bytes Received,Bytes Sent,Connected Since\n"
        "a,b,1,2\nROUTING TABLE\nEND\n",
        "OpenVPN CLIENT LIST\nCommon Name,Real Address,Bytes Received,Bytes Sent,Connected Since\n"
        "a,b,1K,2,x\nROUTING TABLE\nEND\n",
        "CLIENT_LIST,a,b,1,2\nEND\n",  # no header, unknown layout
        "HEADER,CLIENT_LIST,Common Name,Real Address\nEND\n",  # byte columns missing
        "HEADER,CLIENT_LIST,Common Name,Real Address,Bytes Received,Bytes Sent\n"
        "CLIENT_LIST,a,b,1\nEND\n",
        "HEADER,CLIENT_LIST,Common Name,Real Address,Bytes Received,Bytes Sent\n"
        "CLIENT_LIST,a,b,1,2\nCLIENT_LIST,c,b,1,2\nEND\n",  # same real address twice
        "HEADER,CLIENT_LIST,Common Name,Real Address,Bytes Received,Bytes Sent\n"
        "CLIENT_LIST,a,b,1,-2\nEND\n",
        "TITLE,x\nEND\nCLIENT_LIST,a,b,1,2\n",
    ],
)
def test_openvpn_refuses_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_openvpn_status(text)


def session(cn: str, addr: str, up: int, down: int, since: int | None = 100) -> OpenVpnSession:
    return OpenVpnSession(cn, addr, up, down, since)


def test_accumulator_keeps_bytes_of_ended_sessions() -> None:
    acc = OpenVpnAccumulator()
    assert readings(acc.update([session("a", "1:1", 10, 20)])) == {"a": (10, 20)}
    assert readings(acc.update([session("a", "1:1", 15, 30)])) == {"a": (15, 30)}
    assert readings(acc.update([])) == {"a": (15, 30)}
    assert readings(acc.update([session("b", "2:2", 1, 1)])) == {"a": (15, 30), "b": (1, 1)}


def test_accumulator_two_concurrent_sessions() -> None:
    acc = OpenVpnAccumulator()
    both = [session("a", "1:1", 10, 20), session("a", "2:2", 1, 2, since=200)]
    assert readings(acc.update(both)) == {"a": (11, 22)}
    one = [session("a", "2:2", 5, 6, since=200)]
    assert readings(acc.update(one)) == {"a": (15, 26)}


def test_accumulator_reconnect_from_same_address() -> None:
    acc = OpenVpnAccumulator()
    acc.update([session("a", "1:1194", 500, 600, since=100)])
    # New connection: same address, new start time, counters from zero (here even higher).
    counters = acc.update([session("a", "1:1194", 700, 800, since=160)])
    assert readings(counters) == {"a": (1200, 1400)}


def test_accumulator_counters_going_down_is_a_new_session() -> None:
    acc = OpenVpnAccumulator()
    acc.update([session("a", "1:1", 500, 600, since=None)])
    counters = acc.update([session("a", "1:1", 3, 900, since=None)])
    assert readings(counters) == {"a": (503, 1500)}


def test_accumulator_session_missing_from_one_report_is_not_counted_twice() -> None:
    acc = OpenVpnAccumulator()
    acc.update([session("a", "1:1", 500, 600)])
    acc.update([])
    assert readings(acc.update([session("a", "1:1", 510, 600)])) == {"a": (510, 600)}


def test_accumulator_skips_unauthenticated_and_refuses_duplicates() -> None:
    acc = OpenVpnAccumulator()
    assert acc.update([session("UNDEF", "1:1", 5, 5)]) == []
    with pytest.raises(ParseError):
        acc.update([session("a", "1:1", 1, 1), session("a", "1:1", 2, 2)])


def test_accumulator_error_leaves_state_unchanged() -> None:
    acc = OpenVpnAccumulator()
    acc.update([session("a", "1:1", MAX_COUNTER, 0)])
    before = acc.state()
    with pytest.raises(ParseError):
        acc.update([session("a", "1:1", MAX_COUNTER, 0), session("a", "2:2", 1, 0)])
    assert acc.state() == before


def test_accumulator_state_round_trips_through_json() -> None:
    acc = OpenVpnAccumulator(max_remembered=5)
    acc.update(parse_openvpn_status(sample("openvpn-status-v2.log")))
    acc.update(parse_openvpn_status(sample("openvpn-status-v1.log")))
    restored = OpenVpnAccumulator.from_state(json.loads(json.dumps(acc.state())))
    assert restored.state() == acc.state()
    assert restored.counters() == acc.counters()
    assert restored.update([]) == acc.update([])


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"version": 2},
        {"version": 1, "max_remembered": 5, "ended": [], "live": [], "gone": []},
        {"version": 1, "max_remembered": 5, "ended": {"a": [1]}, "live": [], "gone": []},
        {"version": 1, "max_remembered": 5, "ended": {"a": [1, -1]}, "live": [], "gone": []},
        {"version": 1, "max_remembered": 5, "ended": {}, "live": [["a", "b", 1, 2]], "gone": []},
        {"version": 1, "max_remembered": 5, "ended": {}, "live": [], "gone": None},
        {"version": 1, "max_remembered": -1, "ended": {}, "live": [], "gone": []},
    ],
)
def test_accumulator_refuses_bad_state(state: dict[str, object]) -> None:
    with pytest.raises(ParseError):
        OpenVpnAccumulator.from_state(state)


@dataclass
class SimSession:
    """One connection in the accumulator's property test."""

    cn: str
    addr: str
    since: int
    up: int = 0
    down: int = 0
    hidden: bool = False  # missing from the next report only
    restarted: bool = False  # restarted under the same key since the last report


Report = list[tuple[str, str, int, int, int, bool]]  # cn, addr, since, up, down, restarted


@st.composite
def openvpn_histories(draw: st.DrawFn) -> list[Report]:
    """Random connection lives, as the sequence of status reports a server would write."""
    live: list[SimSession] = []
    next_since = 1000
    reports: list[Report] = []
    for _ in range(draw(st.integers(1, 12))):
        for _ in range(draw(st.integers(0, 5))):
            op = draw(st.sampled_from(["start", "grow", "grow", "end", "restart", "hide"]))
            if op == "start" or not live:
                cn = draw(st.sampled_from(["alice", "bob", "UNDEF"]))
                addr = draw(st.sampled_from(["192.0.2.1:1194", "192.0.2.2:1194", "[::1]:5"]))
                next_since += draw(st.integers(1, 3))
                live.append(SimSession(cn, addr, next_since))
                continue
            s = draw(st.sampled_from(live))
            if op == "grow":
                s.up += draw(st.integers(0, 10**6))
                s.down += draw(st.integers(0, 10**6))
            elif op == "end":
                live.remove(s)
            elif op == "restart":  # same key, counters restart from zero
                s.up = draw(st.integers(0, max(0, s.up - 1)))
                s.down = draw(st.integers(0, s.down))
                s.restarted = True
            else:
                s.hidden = True
        report: Report = []
        for s in live:
            if not s.hidden:
                report.append((s.cn, s.addr, s.since, s.up, s.down, s.restarted))
                s.restarted = False
            s.hidden = False
        reports.append(report)
    return reports


@settings(max_examples=300, deadline=None)
@given(openvpn_histories(), st.data())
def test_accumulator_counter_is_monotonic_and_sums_all_sessions(
    history: list[Report], data: st.DataObject
) -> None:
    acc = OpenVpnAccumulator()
    # The last bytes seen of every connection life, by (cn, addr, since, life number).
    last_seen: dict[tuple[str, str, int, int], tuple[int, int]] = {}
    lives: dict[tuple[str, str, int], int] = {}
    previous: dict[str, tuple[int, int]] = {}
    for report in history:
        sessions = []
        for cn, addr, since, up, down, restarted in report:
            key = (cn, addr, since)
            life = lives.setdefault(key, 0)
            seen = last_seen.get((*key, life))
            if restarted and seen is not None and (up < seen[0] or down < seen[1]):
                # A restart is a new life when its counters went below what was last
                # seen; otherwise nobody could tell it from the same connection going on.
                life = lives[key] = life + 1
            last_seen[(*key, life)] = (up, down)
            sessions.append(OpenVpnSession(cn, addr, up, down, since))
        if data.draw(st.booleans(), label="persist and restore"):
            acc = OpenVpnAccumulator.from_state(json.loads(json.dumps(acc.state())))
        now = readings(acc.update(sessions))
        expected: dict[str, tuple[int, int]] = {}
        for (cn, *_), (up, down) in last_seen.items():
            if cn != "UNDEF":
                old = expected.get(cn, (0, 0))
                expected[cn] = (old[0] + up, old[1] + down)
        assert now == expected
        for cn, (up, down) in previous.items():
            assert now[cn][0] >= up and now[cn][1] >= down
        previous = now


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
