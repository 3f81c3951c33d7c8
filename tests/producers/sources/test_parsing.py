"""What all sources share: the registry, user maps, and fuzzing every text parser."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotaflow.core.contracts import MAX_COUNTER, Counter, validate_counter
from quotaflow.producers.sources import SOURCES, ParseError, apply_user_map, parse_counters_json
from quotaflow.producers.sources.iptables import parse_iptables
from quotaflow.producers.sources.openvpn import (
    OpenVpnAccumulator,
    OpenVpnSession,
    openvpn_counters,
    parse_openvpn_status,
)
from quotaflow.producers.sources.prometheus import (
    V2RAY_EXPORTER_MAPPING,
    PrometheusMapping,
    parse_prometheus,
)
from quotaflow.producers.sources.ss_manager import parse_ss_manager_stat
from quotaflow.producers.sources.v2ray import (
    parse_v2ray_stats,
    parse_v2ray_stats_json,
)
from quotaflow.producers.sources.wireguard import parse_wg_dump
from tests.producers.sources.helpers import (
    DIRECTION_MAPPING,
    PEER_1,
    PEER_2,
    SAMPLES,
    readings,
    sample,
)


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
    "v2ray": parse_v2ray_stats_json,
    "openvpn": parse_openvpn_status,
    "ss-manager": parse_ss_manager_stat,
    "iptables": parse_iptables,
    "wireguard": parse_wg_dump,
    "prometheus": lambda t: parse_prometheus(t, V2RAY_EXPORTER_MAPPING),
    "prometheus-direction": lambda t: parse_prometheus(t, DIRECTION_MAPPING),
    "command": parse_counters_json,
}
SAMPLE_OF = {
    "v2ray": ["xray-statsquery.json"],
    "openvpn": ["openvpn-status-v1.log", "openvpn-status-v2.log", "openvpn-status-v3.log"],
    "ss-manager": ["ss-manager-stat.txt"],
    "iptables": ["iptables-nvxL.txt"],
    "wireguard": ["wg-show-all-dump.txt", "wg-show-wg0-dump.txt"],
    "prometheus": ["prometheus-v2ray-exporter.prom"],
    "prometheus-direction": ["prometheus-direction-label.prom"],
    "command": ["counters.json"],
}


def test_every_text_source_is_fuzzed() -> None:
    text_sources = {name for name, source in SOURCES.items() if source.parse is not None}
    assert text_sources <= set(TEXT_PARSERS)
    assert set(SAMPLE_OF) == set(TEXT_PARSERS)


def test_counters_json_takes_objects_and_lists_and_refuses_the_rest() -> None:
    assert readings(parse_counters_json(sample("counters.json"))) == {
        "alice": (1200, 56000), "bob": (0, 7)
    }
    listed = parse_counters_json('[{"user_id": "carol", "up": 1, "down": 2}]')
    assert readings(listed) == {"carol": (1, 2)}
    for bad in ('{"a": [1, 2], "a": [3, 4]}', '{"a": [1]}', '{"a": [-1, 2]}', '{"a": [1.0, 2]}',
                '[{"user_id": "a", "up": 1}]', '"x"', '{"a": [true, 2]}'):
        with pytest.raises(ParseError):
            parse_counters_json(bad)


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
