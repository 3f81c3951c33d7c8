"""Tests for producers.parsers: hand-written samples of every format, and fuzzing.

The samples in `samples/` follow the formats the servers really print; the fuzz
tests check that any text, and any damaged sample, gives either valid counters or
a ParseError, never another exception.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import producers.parsers
from producers.parsers import (
    V2RAY_EXPORTER_MAPPING,
    OpenVpnAccumulator,
    OpenVpnSession,
    ParseError,
    PrometheusMapping,
    apply_user_map,
    openvpn_counters,
    parse_iptables,
    parse_openvpn_status,
    parse_prometheus,
    parse_ss_manager_stat,
    parse_v2ray_stats,
    parse_v2ray_stats_json,
    parse_wg_dump,
)
from quotaflow.contracts import MAX_COUNTER, Counter, validate_counter

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


def test_module_doctests() -> None:
    """The examples in the module's docstrings, also when pytest is not pointed at producers/."""
    result = doctest.testmod(producers.parsers)
    assert result.attempted > 0
    assert result.failed == 0


# ------------------------------------------------------------------ V2Ray / Xray


def test_v2ray_pairs_keep_only_user_traffic() -> None:
    counters = parse_v2ray_stats(
        [
            ("user>>>alice@example.com>>>traffic>>>uplink", 10),
            ("user>>>alice@example.com>>>traffic>>>downlink", 20),
            ("user>>>bob>>>traffic>>>downlink", 5),
            ("user>>>bob>>>online", 2),
            ("inbound>>>vmess>>>traffic>>>uplink", 999),
            ("outbound>>>direct>>>traffic>>>downlink", 999),
        ]
    )
    assert readings(counters) == {"alice@example.com": (10, 20), "bob": (0, 5)}


def test_v2ray_email_may_contain_separator_like_text() -> None:
    counters = parse_v2ray_stats([("user>>>a>>>b>>>traffic>>>uplink", 1)])
    assert readings(counters) == {"a>>>b": (1, 0)}


@pytest.mark.parametrize(
    "pairs",
    [
        [("user>>>a>>>traffic>>>uplink", -1)],
        [("user>>>a>>>traffic>>>uplink", MAX_COUNTER + 1)],
        [("user>>>a>>>traffic>>>uplink", True)],
        [("user>>>a>>>traffic>>>sideways", 1)],
        [("user>>>>>>traffic>>>uplink", 1)],
        [("garbage", 1)],
        [("user>>>a>>>traffic>>>uplink", 1), ("user>>>a>>>traffic>>>uplink", 2)],
    ],
)
def test_v2ray_pairs_refuse_garbage(pairs: list[tuple[str, int]]) -> None:
    with pytest.raises(ParseError):
        parse_v2ray_stats(pairs)


def test_xray_statsquery_sample() -> None:
    counters = parse_v2ray_stats_json(sample("xray-statsquery.json"))
    assert readings(counters) == {
        "alice@example.com": (18273645, 712634511),
        "bob@example.com": (0, 4096),
    }


@pytest.mark.parametrize("text", ["{}", '{"stat": []}', '{"stat": null}'])
def test_xray_statsquery_without_stats(text: str) -> None:
    assert parse_v2ray_stats_json(text) == []


def test_xray_statsquery_numbers_and_strings_mix() -> None:
    text = json.dumps(
        {
            "stat": [
                {"name": "user>>>a>>>traffic>>>uplink", "value": 7},
                {"name": "user>>>a>>>traffic>>>downlink", "value": "8"},
            ]
        }
    )
    assert readings(parse_v2ray_stats_json(text)) == {"a": (7, 8)}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"stat": {}}',
        '{"stat": [1]}',
        '{"stat": [{"value": 1}]}',
        '{"stat": [{"name": "user>>>a>>>traffic>>>uplink", "value": -3}]}',
        '{"stat": [{"name": "user>>>a>>>traffic>>>uplink", "value": "-3"}]}',
        '{"stat": [{"name": "user>>>a>>>traffic>>>uplink", "value": 1.5}]}',
        '{"stat": [{"name": "user>>>a>>>traffic>>>uplink", "value": "0x10"}]}',
        '{"stat": [], "stat": []}',
        "[" * 100_000,
    ],
)
def test_xray_statsquery_refuses_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_v2ray_stats_json(text)


# ------------------------------------------------------------------ OpenVPN

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


# ------------------------------------------------------------------ shadowsocks-libev


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


# ------------------------------------------------------------------ iptables


def test_iptables_sample() -> None:
    counters = parse_iptables(sample("iptables-nvxL.txt"))
    assert readings(counters) == {
        "8388": (21873412 + 87231, 61234987 + 101244),
        "8389": (1203944, 9301225),
        "8390": (0, 0),
    }


IPTABLES_HEADER = (
    "Chain SS_ACCOUNT (1 references)\n"
    "    pkts      bytes target     prot opt in     out     source               destination\n"
)


def test_iptables_port_in_comment_is_not_a_match() -> None:
    rule = "    1  100 ACCEPT  tcp  --  *  *  0.0.0.0/0  0.0.0.0/0  /* dpt:9999 */ tcp spt:8388\n"
    assert readings(parse_iptables(IPTABLES_HEADER + rule)) == {"8388": (0, 100)}


def test_iptables_negated_port_is_skipped() -> None:
    rule = "    1  100 ACCEPT  tcp  --  *  *  0.0.0.0/0  0.0.0.0/0  tcp dpt:!8388\n"
    assert parse_iptables(IPTABLES_HEADER + rule) == []


def test_iptables_line_numbers() -> None:
    text = (
        "Chain SS_ACCOUNT (1 references)\n"
        "num      pkts      bytes target     prot opt in     out     source     destination\n"
        "1          12       3400 ACCEPT     tcp  --  *   *   0.0.0.0/0  0.0.0.0/0  tcp dpt:8388\n"
        "2          10       9900            tcp  --  *   *   0.0.0.0/0  0.0.0.0/0  tcp spt:8388\n"
    )
    assert readings(parse_iptables(text)) == {"8388": (3400, 9900)}


def test_iptables_empty_chain() -> None:
    assert parse_iptables(IPTABLES_HEADER) == []


@pytest.mark.parametrize(
    "rule",
    [
        "   12K  3M ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:8388",  # without -x
        "Zeroing chain `SS_ACCOUNT'\n",
        "1 2 ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp spt:1 dpt:8388",
        "1 2 ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:70000",
        "1 2 ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:08388",
        "hello world",
    ],
)
def test_iptables_refuses_garbage(rule: str) -> None:
    with pytest.raises(ParseError):
        parse_iptables(IPTABLES_HEADER + rule)


def test_iptables_refuses_rules_without_header() -> None:
    # With --line-numbers and no header, "1 12 3400" would be misread: refuse instead.
    with pytest.raises(ParseError, match="header"):
        parse_iptables("1  12  3400 ACCEPT tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:8388\n")


# ------------------------------------------------------------------ WireGuard

PEER_1 = "9xBb9s+DPUUSgbmrZenA2HpgxVUx05YxHZodhr9XpFE="
PEER_2 = "WJ4yiws4GDt3k0Y0BCRBqbAd72nokJFHXC6lNsESjHc="
PEER_3 = "KdRCiLDxU9C6bWLtQussWAK5b32KNTNKj/qX1n+5vTk="


def test_wg_dump_all_sums_a_key_over_interfaces() -> None:
    counters = parse_wg_dump(sample("wg-show-all-dump.txt"))
    assert readings(counters) == {
        PEER_1: (48213390 + 1000, 912837412 + 2000),
        PEER_2: (1203, 8812),
        PEER_3: (0, 0),
    }


def test_wg_dump_one_interface() -> None:
    counters = parse_wg_dump(sample("wg-show-wg0-dump.txt"))
    assert readings(counters) == {PEER_1: (48213390, 912837412), PEER_2: (1203, 8812)}


def test_wg_dump_empty() -> None:
    assert parse_wg_dump("") == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.replace(PEER_2, "not-a-key"),
        lambda t: t.replace("\t1203\t", "\t-1203\t"),
        lambda t: t.replace("\t8812\t", "\t8.8K\t"),
        lambda t: "\n".join(t.splitlines()[1:]),  # peers without their interface
        lambda t: t + t.splitlines()[1] + "\n",  # a peer listed twice
        lambda t: t.replace("\t(none)\t198.51.100.7:40123", "\t198.51.100.7:40123"),
    ],
)
def test_wg_dump_refuses_garbage(mutate: Callable[[str], str]) -> None:
    with pytest.raises(ParseError):
        parse_wg_dump(mutate(sample("wg-show-all-dump.txt")))


def test_wg_dump_refuses_mixed_forms() -> None:
    text = sample("wg-show-all-dump.txt") + sample("wg-show-wg0-dump.txt")
    with pytest.raises(ParseError):
        parse_wg_dump(text)


# ------------------------------------------------------------------ Prometheus


def test_prometheus_v2ray_exporter_sample() -> None:
    counters = parse_prometheus(sample("prometheus-v2ray-exporter.prom"), V2RAY_EXPORTER_MAPPING)
    assert readings(counters) == {
        "alice@example.com": (18273645, 712634511),
        "bob@example.com": (0, 4096),
    }


def test_prometheus_direction_label_sample() -> None:
    counters = parse_prometheus(sample("prometheus-direction-label.prom"), DIRECTION_MAPPING)
    assert readings(counters) == {"alice": (18274645, 712636511), "bob": (0, 4096)}


def test_prometheus_match_filter() -> None:
    mapping = PrometheusMapping(
        up_metric="xray_user_traffic_bytes",
        down_metric="xray_user_traffic_bytes",
        direction_label="direction",
        up_value="uplink",
        down_value="downlink",
        match={"inbound": "trojan"},
    )
    counters = parse_prometheus(sample("prometheus-direction-label.prom"), mapping)
    assert readings(counters) == {"alice": (1000, 2000)}


@pytest.mark.parametrize(
    ("text", "metric"),
    [
        # typed counter without _total: prometheus_client renames the samples
        ('# TYPE up_bytes counter\nup_bytes{user="a"} 5\n', "up_bytes"),
        ('# TYPE up_bytes counter\nup_bytes{user="a"} 5\n', "up_bytes_total"),
        ('# TYPE up_bytes_total counter\nup_bytes_total{user="a"} 5\n', "up_bytes"),
        ('# TYPE up_bytes_total counter\nup_bytes_total{user="a"} 5\n', "up_bytes_total"),
        ('up_bytes_total{user="a"} 5\n', "up_bytes_total"),
        ('up_bytes{user="a"} 5\n', "up_bytes"),
        ('# TYPE up_bytes gauge\nup_bytes{user="a"} 5\n', "up_bytes"),
    ],
)
def test_prometheus_total_suffix(text: str, metric: str) -> None:
    mapping = PrometheusMapping(up_metric=metric, down_metric="down_bytes")
    assert readings(parse_prometheus(text, mapping)) == {"a": (5, 0)}


def test_prometheus_sums_same_user_and_skips_unlabelled() -> None:
    text = 'up{user="a",in="x"} 5\nup{user="a",in="y"} 6\nup 100\nup{user=""} 7\ndown{user="b"} 1\n'
    mapping = PrometheusMapping(up_metric="up", down_metric="down")
    assert readings(parse_prometheus(text, mapping)) == {"a": (11, 0), "b": (0, 1)}


@pytest.mark.parametrize(
    "text",
    [
        'up{user="a"} NaN\n',
        'up{user="a"} +Inf\n',
        'up{user="a"} -1\n',
        'up{user="a"} 1.5\n',
        'up{user="a"} 1e300\n',
        'up{user="a"} 9223372036854775808\n',
        'up{user="a"} 1\nup{user="a"} 2\n',  # the same series twice
        'up{user="a"} 1\nup_total{user="b"} 2\n',  # both spellings present
        'up{user="a} 1\n',
    ],
)
def test_prometheus_refuses_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_prometheus(text, PrometheusMapping(up_metric="up", down_metric="down"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"up_metric": "x", "down_metric": "x"},
        {"up_metric": "x", "down_metric": "x_total"},
        {"up_metric": "x", "down_metric": "y", "up_value": "u"},
        {"up_metric": "x", "down_metric": "x", "direction_label": "d", "up_value": "u"},
        {
            "up_metric": "x",
            "down_metric": "x",
            "direction_label": "d",
            "up_value": "u",
            "down_value": "u",
        },
        {"up_metric": "", "down_metric": "y"},
    ],
)
def test_prometheus_mapping_validation(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        PrometheusMapping(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------ user map


def test_apply_user_map_merges_and_keeps_unknown_ids() -> None:
    counters = parse_iptables(sample("iptables-nvxL.txt"))
    mapped = apply_user_map(counters, {"8388": "alice", "8389": "alice"})
    assert readings(mapped) == {
        "alice": (21873412 + 87231 + 1203944, 61234987 + 101244 + 9301225),
        "8390": (0, 0),
    }
    assert apply_user_map(counters, None) == counters
    assert apply_user_map(counters, {}) == counters


def test_apply_user_map_refuses_overflow() -> None:
    big = [Counter(user_id="a", up=MAX_COUNTER, down=0), Counter(user_id="b", up=1, down=0)]
    with pytest.raises(ParseError):
        apply_user_map(big, {"a": "u", "b": "u"})


# ------------------------------------------------------------------ fuzzing

TEXT_PARSERS: dict[str, Callable[[str], object]] = {
    "v2ray-stats-json": parse_v2ray_stats_json,
    "openvpn-status": parse_openvpn_status,
    "ss-manager": parse_ss_manager_stat,
    "iptables": parse_iptables,
    "wg-dump": parse_wg_dump,
    "prometheus-v2ray": lambda t: parse_prometheus(t, V2RAY_EXPORTER_MAPPING),
    "prometheus-direction": lambda t: parse_prometheus(t, DIRECTION_MAPPING),
}
SAMPLE_OF = {
    "v2ray-stats-json": ["xray-statsquery.json"],
    "openvpn-status": ["openvpn-status-v1.log", "openvpn-status-v2.log", "openvpn-status-v3.log"],
    "ss-manager": ["ss-manager-stat.txt"],
    "iptables": ["iptables-nvxL.txt"],
    "wg-dump": ["wg-show-all-dump.txt", "wg-show-wg0-dump.txt"],
    "prometheus-v2ray": ["prometheus-v2ray-exporter.prom"],
    "prometheus-direction": ["prometheus-direction-label.prom"],
}


def check_outcome(parser: Callable[[str], object], text: str) -> None:
    """Valid readings or a ParseError; anything else fails the test."""
    try:
        result = parser(text)
        assert isinstance(result, list)
        if result and isinstance(result[0], OpenVpnSession):
            for s in result:
                assert isinstance(s, OpenVpnSession)
                assert 0 <= s.bytes_received <= MAX_COUNTER and 0 <= s.bytes_sent <= MAX_COUNTER
            OpenVpnAccumulator().update(result)
            result = openvpn_counters(result)
    except ParseError:
        return
    ids = [c.user_id for c in result]
    assert len(ids) == len(set(ids))
    for c in result:
        assert isinstance(c, Counter)
        validate_counter(dataclasses.asdict(c))


# Characters that matter to one format or another, to reach past the first checks.
ALPHABET = (
    st.sampled_from([*',\t\n\r\x00:{}[]"\\ #=/*>!._-+0123456789eE', "\u2028", "\x1c", "é", "٣"])
    | st.characters()
)
MUTATION_TEXT = st.text(alphabet=ALPHABET, max_size=30) | st.sampled_from(
    [
        "END",
        "\nEND\n",
        "CLIENT_LIST,",
        "HEADER,CLIENT_LIST,",
        ">>>traffic>>>",
        "user>>>",
        " dpt:",
        " spt:",
        "(none)",
        "stat: ",
        "_total",
        "{user=",
        "NaN",
        "99999999999999999999",
        "-1",
        "1e400",
    ]
)


@st.composite
def mutated(draw: st.DrawFn, text: str) -> str:
    """A sample with a few random edits: cuts, insertions, line shuffles, duplications."""
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["cut", "insert", "replace", "lines", "truncate"]))
        n = len(text)
        i = draw(st.integers(0, n))
        if op == "cut":
            text = text[:i] + text[draw(st.integers(i, n)) :]
        elif op == "insert":
            text = text[:i] + draw(MUTATION_TEXT) + text[i:]
        elif op == "replace":
            text = text[:i] + draw(MUTATION_TEXT) + text[i + draw(st.integers(0, 10)) :]
        elif op == "truncate":
            text = text[:i]
        else:
            lines = text.splitlines(keepends=True)
            if lines:
                text = "".join(draw(st.lists(st.sampled_from(lines), max_size=len(lines) + 2)))
    return text


@pytest.mark.parametrize("source", sorted(TEXT_PARSERS))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=ALPHABET, max_size=400))
def test_fuzz_arbitrary_text(source: str, text: str) -> None:
    check_outcome(TEXT_PARSERS[source], text)


@pytest.mark.parametrize("source", sorted(TEXT_PARSERS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_samples(source: str, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(SAMPLE_OF[source]), label="sample")
    text = data.draw(mutated(sample(name)), label="text")
    check_outcome(TEXT_PARSERS[source], text)


@pytest.mark.parametrize("source", sorted(TEXT_PARSERS))
def test_samples_parse_under_every_parser_only_as_intended(source: str) -> None:
    """Every sample fed to every parser: valid readings or a ParseError."""
    for path in sorted(SAMPLES.iterdir()):
        check_outcome(TEXT_PARSERS[source], path.read_text())


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["user>>>a>>>traffic>>>uplink", "user>>>b>>>traffic>>>downlink", "8388"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["stat", "name", "value", "8388", "x"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values, prefix=st.sampled_from(["", "stat: "]))
def test_fuzz_json_shapes(value: object, prefix: str) -> None:
    text = json.dumps(value)
    check_outcome(parse_v2ray_stats_json, text)
    check_outcome(parse_ss_manager_stat, prefix + text)


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(
            st.text(max_size=10)
            | st.builds(
                lambda k, e, d: f"{k}>>>{e}>>>traffic>>>{d}",
                st.sampled_from(["user", "inbound", "outbound", "x"]),
                st.text(max_size=5),
                st.sampled_from(["uplink", "downlink", "up", ""]),
            ),
            st.integers(-5, 2**64),
        ),
        max_size=8,
    )
)
def test_fuzz_v2ray_pairs(pairs: list[tuple[str, int]]) -> None:
    try:
        result = parse_v2ray_stats(pairs)
    except ParseError:
        return
    assert all(isinstance(c, Counter) for c in result)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.lists(
            st.sampled_from(["wg0", "wg1", PEER_1, PEER_2, "(none)", "off", "0", "12", "-1", ""])
            | st.text(max_size=6),
            min_size=3,
            max_size=10,
        ),
        max_size=6,
    )
)
def test_fuzz_wg_rows(rows: list[list[str]]) -> None:
    check_outcome(parse_wg_dump, "\n".join("\t".join(r) for r in rows))


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.lists(
            st.sampled_from(["CLIENT_LIST", "HEADER", "END", "alice", "1:1", "5", "-1", ""])
            | st.sampled_from(["Common Name", "Real Address", "Bytes Received", "Bytes Sent"])
            | st.text(max_size=6),
            min_size=1,
            max_size=8,
        ),
        max_size=6,
    ),
    sep=st.sampled_from([",", "\t"]),
)
def test_fuzz_openvpn_rows(rows: list[list[str]], sep: str) -> None:
    check_outcome(parse_openvpn_status, "\n".join(sep.join(r) for r in rows) + "\nEND\n")


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=200),
    up=st.sampled_from(["up", "up_total", "v2ray_traffic_uplink_bytes_total"]),
    direction=st.booleans(),
)
def test_fuzz_prometheus_mappings(text: str, up: str, direction: bool) -> None:
    if direction:
        mapping = PrometheusMapping(up, up, "user", "d", "u", "v")
    else:
        mapping = PrometheusMapping(up, "down", "user")
    check_outcome(lambda t: parse_prometheus(t, mapping), text)
