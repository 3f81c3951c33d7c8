"""The InfluxDB sink: line protocol, coalescing, and an InfluxDB outage on the real servers."""

from __future__ import annotations

import time
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from quotaflow.core.contracts import TotalsBatch, identifier_problem
from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.dev.simulation import FleetSpec, simulate
from quotaflow.dev.truth_check import compare, read_daily_totals
from quotaflow.producers.publisher import ReportPublisher
from quotaflow.sinks.influx import Coalescer, line_protocol
from quotaflow.sinks.influxql import InfluxQL, quote_ident, quote_string
from quotaflow.streams.lag import LagProbe


def test_coalescer_keeps_the_latest_total_of_each_series() -> None:
    coalescer = Coalescer()
    assert coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 1, 2, 10, 20)]))
    assert coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 5, 6, 14, 24)]))
    assert not coalescer.update(b'{"node_id": "n1"}')
    assert sorted(coalescer.points()) == [
        "traffic_daily,node_id=n1,user_id=alice up_bytes=5i,down_bytes=6i,total_bytes=11i 86400",
        "traffic_monthly,node_id=n1,user_id=alice up_bytes=14i,down_bytes=24i,total_bytes=38i 0",
    ]


def test_coalescer_keeps_series_apart_and_drains_once() -> None:
    coalescer = Coalescer()
    assert coalescer.update(TotalsBatch.encode(
        "n1", 86400, 0, [("alice", 1, 2, 10, 20), ("bob", 3, 4, 30, 40)]
    ))
    assert coalescer.update(TotalsBatch.encode("n2", 86400, 0, [("alice", 7, 8, 70, 80)]))
    # the next day of the same month: a new daily series, the monthly one replaced
    assert coalescer.update(TotalsBatch.encode("n1", 172800, 0, [("alice", 9, 9, 19, 29)]))
    assert (len(coalescer), coalescer.totals) == (7, 8)
    lines = coalescer.drain()
    assert len(lines) == 7
    day = "traffic_daily,node_id=n1,user_id=alice"
    month = "traffic_monthly,node_id=n1,user_id=alice"
    assert f"{day} up_bytes=1i,down_bytes=2i,total_bytes=3i 86400" in lines
    assert f"{day} up_bytes=9i,down_bytes=9i,total_bytes=18i 172800" in lines
    assert f"{month} up_bytes=19i,down_bytes=29i,total_bytes=48i 0" in lines
    assert len(coalescer) == 0 and coalescer.drain() == []
    assert list(coalescer.points()) == []


def test_coalescer_refuses_what_is_not_a_totals_record() -> None:
    coalescer = Coalescer()
    negative = b'{"node_id": "n", "day": 0, "month": 0, "totals": [["u", -1, 0, 0, 0]]}'
    for bad in (b"", b"not json", b"[]", negative):
        assert not coalescer.update(bad)
    assert (len(coalescer), coalescer.totals) == (0, 0)


def test_tags_with_special_characters_are_escaped() -> None:
    # InfluxDB 1.x keeps a backslash in a tag value as it is: escaping it would double it.
    line = next(line_protocol({("day", "a,b=c d", "n\\1", 0): (1, 1)}))
    assert line.startswith("traffic_daily,node_id=n\\1,user_id=a\\,b\\=c\\ d ")


@pytest.mark.integration
def test_influxdb_outage_holds_offsets_and_loses_nothing(
    services: Any, settings: Settings, pipeline: Any
) -> None:
    sim = simulate(FleetSpec(nodes=5, users=120, days=2, malformed=0, seed=11))
    half = len(sim.lines) // 2
    with ReportPublisher(settings) as publisher:
        publisher.publish_lines(sim.lines[:half])
        publisher.flush()
        pipeline.wait()
        services.stop_influx()
        try:
            publisher.publish_lines(sim.lines[half:])
            publisher.flush()
            probe = LagProbe(settings)
            deadline = time.monotonic() + 60
            while probe.lag().raw and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(3.0)  # several flush attempts fail meanwhile
            lag = probe.lag()
            probe.close()
            assert lag.raw == 0 and lag.totals > 0, "the sink must hold its offsets"
        finally:
            services.start_influx()
    pipeline.wait()
    calendar = Calendar(ZoneInfo(settings.timezone))
    truth = {(u, n, calendar.label(d, "day")): (a, b) for (u, n, d), (a, b) in sim.truth.items()}
    result = compare(truth, read_daily_totals(settings))
    assert result.exact, result.summary()


# --- identifiers through InfluxDB 1.8's line protocol -------------------------------------
#
# A port of the parts of InfluxDB 1.8.10's models/points.go that split a write body into
# lines (scanLine), find a line's tags (scanMeasurement, scanTagsKey, scanTagsValue) and read
# them back (walkTags, unescapeTag). It is what decides whether an identifier round-trips.

AWKWARD_IDS = [
    "a\\b", "mid\\dle\\\\x", "a\\,b", "a\\=b", "a\\\\,b", "comma,id", "sp ace", "eq=ual",
    "quo'te", 'dq"uote', "ü日本語🎉", " ", ",", "=", "a,b=c d", "\\\\srv\\share", "x\\y\\z",
    '"=', 'a\\"b=c', "a\\\\\\,b",
]


def _influx_scan_line(buf: bytes, i: int) -> tuple[int, bytes]:
    start, quoted, fields, equals, commas = i, False, False, 0, 0
    while i < len(buf):
        c = buf[i : i + 1]
        if c == b"\\" and i + 2 < len(buf):
            i += 2
            continue
        if c == b" ":
            fields = True
        if fields:
            if not quoted and c == b"=":
                i, equals = i + 1, equals + 1
                continue
            if not quoted and c == b",":
                i, commas = i + 1, commas + 1
                continue
            if c == b'"' and equals > commas:
                i, quoted = i + 1, not quoted
                continue
        if c == b"\n" and not quoted:
            break
        i += 1
    return i, buf[start:i]


def _influx_key(line: bytes) -> bytes:
    """The series key (measurement and tags) of a line; ValueError where InfluxDB errs."""
    i = 0
    if not line or line[:1] == b",":
        raise ValueError("missing measurement")
    while True:  # scanMeasurement
        i += 1
        if i >= len(line):
            raise ValueError("missing fields")
        if line[i - 1 : i] == b"\\":
            continue
        if line[i : i + 1] == b" ":
            return line[:i]
        if line[i : i + 1] == b",":
            i += 1
            break
    while True:
        if i >= len(line) or line[i : i + 1] in (b" ", b",", b"="):  # scanTagsKey
            raise ValueError("missing tag key")
        while True:
            i += 1
            if i >= len(line) or (line[i : i + 1] in (b" ", b",") and line[i - 1 : i] != b"\\"):
                raise ValueError("missing tag value")
            if line[i : i + 1] == b"=" and line[i - 1 : i] != b"\\":
                i += 1
                break
        if i >= len(line) or line[i : i + 1] in (b",", b" "):  # scanTagsValue
            raise ValueError("missing tag value")
        while True:
            i += 1
            if i >= len(line):
                raise ValueError("missing fields")
            previous = line[i - 1 : i]
            if line[i : i + 1] == b"=" and previous != b"\\":
                raise ValueError("invalid tag format")
            if line[i : i + 1] == b"," and previous != b"\\":
                i += 1
                break
            if line[i : i + 1] == b" " and previous != b"\\":
                return line[:i]


def _influx_unescape_tag(value: bytes) -> bytes:
    if b"\\" not in value:
        return value
    for char in (b",", b" ", b"="):
        if char in value:
            value = value.replace(b"\\" + char, char)
    return value


def _influx_tags(key: bytes) -> dict[str, str]:
    def scan_to(i: int, stop: bytes) -> int:
        while i < len(key) and not (
            key[i : i + 1] == stop and (i == 0 or key[i - 1 : i] != b"\\")
        ):
            i += 1
        return i

    tags: dict[str, str] = {}
    i = scan_to(0, b",") + 1
    while i < len(key):
        end = scan_to(i, b"=")
        name = key[i:end]
        i = end + 1
        while i < len(key) and not (key[i : i + 1] == b"," and key[i - 1 : i] != b"\\"):
            i += 1
        tags[_influx_unescape_tag(name).decode()] = _influx_unescape_tag(key[end + 1 : i]).decode()
        i += 1
    return tags


def influx_1_8_parse(body: str) -> list[dict[str, str]]:
    """The tags of every point of a write body, as InfluxDB 1.8 reads them."""
    buf, pos, out = body.encode(), 0, []
    while pos < len(buf):
        pos, block = _influx_scan_line(buf, pos)
        pos += 1
        if block.strip():
            if b"\n" in block.rstrip(b"\n"):  # two lines taken as one: scanTime fails
                raise ValueError("point is invalid")
            out.append(_influx_tags(_influx_key(block.rstrip(b"\n"))))
    return out


def test_the_parser_port_reproduces_influxdb_1_8() -> None:
    """What the real server did with the old escaping: a trailing backslash broke the line."""
    with pytest.raises(ValueError, match="invalid tag format"):
        influx_1_8_parse("m,node_id=n,user_id=a\\\\ v=1i 0")
    assert influx_1_8_parse("m,node_id=n,user_id=a\\\\b v=1i 0") == [
        {"node_id": "n", "user_id": "a\\\\b"}  # a doubled backslash stays doubled
    ]
    # A backslash before a space makes the line splitter pair the backslashes and see the
    # space, then an `=` and a `"`: it thinks a quoted field runs on and merges two lines.
    two = 'm,node_id=n,user_id=a\\\\ \\\\="x v=1i 0\nm,node_id=n,user_id=b v=1i 0'
    with pytest.raises(ValueError):
        influx_1_8_parse(two)


@pytest.mark.parametrize("user_id", AWKWARD_IDS)
def test_allowed_identifiers_round_trip_through_line_protocol(user_id: str) -> None:
    assert identifier_problem(user_id) is None
    points = {("day", user_id, user_id, 86400): (1, 2), ("month", "bob", user_id, 0): (3, 4),
              ("day", "carol", "n", 86400): (5, 6)}
    assert influx_1_8_parse("\n".join(line_protocol(points))) == [
        {"node_id": user_id, "user_id": user_id},
        {"node_id": user_id, "user_id": "bob"},
        {"node_id": "n", "user_id": "carol"},
    ]


@hypothesis_settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
            lambda s: identifier_problem(s) is None
        )
        | st.text(st.sampled_from("\\ ,=\"'xé"), min_size=1, max_size=10).filter(
            lambda s: identifier_problem(s) is None
        ),
        min_size=2, max_size=6,
    )
)
def test_property_every_allowed_identifier_round_trips(ids: list[str]) -> None:
    points = {("day", user, ids[-1 - i], 86400 * i): (1, 1) for i, user in enumerate(ids)}
    parsed = influx_1_8_parse("\n".join(line_protocol(points)))
    assert parsed == [{"node_id": node, "user_id": user}
                      for (_, user, node, _), _ in points.items()]


@pytest.mark.integration
def test_awkward_identifiers_round_trip_through_influxdb(settings: Settings) -> None:
    """Written with the sink's line protocol, read back exactly with `quote_string`."""
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS
    from influxdb_client.domain.write_precision import WritePrecision
    from influxdb_client.rest import ApiException

    influxql = InfluxQL.from_settings(settings)
    influxql.create_database()
    trailing = "trailing\\"
    assert identifier_problem(trailing) == "must not end with a backslash"
    ids = [*AWKWARD_IDS, "plain"]
    points = {("day", user, f"node-{i}\\x", 86400): (i, 2 * i) for i, user in enumerate(ids, 1)}
    with InfluxDBClient(url=settings.influx_url, token=settings.influx_token.get_secret_value(),
                        org=settings.influx_org) as client:
        write_api = client.write_api(write_options=SYNCHRONOUS)
        write_api.write(
            bucket=settings.influx_bucket, record="\n".join(line_protocol(points)),
            write_precision=WritePrecision.S,
        )
        # Why the contract refuses a trailing backslash: no escaping can write it.
        with pytest.raises(ApiException, match="invalid tag format"):
            write_api.write(
                bucket=settings.influx_bucket, write_precision=WritePrecision.S,
                record=next(line_protocol({("day", trailing, "n", 0): (1, 1)})),
            )
    for (_, user, node, _), (up, down) in points.items():
        series = influxql.query(
            f"SELECT up_bytes, down_bytes, total_bytes FROM traffic_daily "
            f"WHERE user_id = {quote_string(user)} AND node_id = {quote_string(node)} "
            f"GROUP BY user_id, node_id"
        )
        assert [(s.tags, s.rows) for s in series] == [(
            {"node_id": node, "user_id": user},
            [{"time": 86400, "up_bytes": up, "down_bytes": down, "total_bytes": up + down}],
        )], user
    shown = influxql.query("SHOW TAG VALUES FROM traffic_daily WITH KEY = user_id")
    assert sorted(row["value"] for row in shown[0].rows) == sorted(ids)


def test_quote_string_follows_the_influxql_scanner() -> None:
    # influxql's ScanString knows the escapes \\ \' \" and \n; a raw newline ends the string
    # and the reader turns a carriage return into a newline, so CR cannot be written at all.
    assert quote_string("plain") == "'plain'"
    assert quote_string("it's") == "'it\\'s'"
    assert quote_string("a\\b\\") == "'a\\\\b\\\\'"
    assert quote_string('say "hi"') == "'say \"hi\"'"
    assert quote_string("two\nlines") == "'two\\nlines'"
    assert quote_ident('my "db"\n') == '"my \\"db\\"\\n"'
    for bad in ("a\rb", "\r\n"):
        with pytest.raises(ValueError, match="carriage return"):
            quote_string(bad)
        with pytest.raises(ValueError, match="carriage return"):
            quote_ident(bad)


def _influxql_scan_string(text: str) -> str:
    """influxql v1.1 ScanString after its reader, for a literal that quote_string made."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    ending, out, i = text[0], [], 1
    while True:
        ch = text[i]
        i += 1
        if ch == ending:
            assert i == len(text), "the literal ends early"
            return "".join(out)
        assert ch != "\n", "bad string"
        if ch == "\\":
            escaped = {"n": "\n", "\\": "\\", '"': '"', "'": "'"}[text[i]]
            i += 1
            out.append(escaped)
        else:
            out.append(ch)


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text().filter(lambda s: "\r" not in s))
def test_property_quoted_literals_read_back_exactly(value: str) -> None:
    assert _influxql_scan_string(quote_string(value)) == value
    assert _influxql_scan_string(quote_ident(value)) == value
