"""The InfluxDB sink: line protocol, coalescing, and an InfluxDB outage on the real servers."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from quotaflow.core.contracts import TotalsBatch, identifier_problem
from quotaflow.core.periods import Calendar
from quotaflow.core.plans import Command, QuotaBatch
from quotaflow.core.settings import Settings
from quotaflow.dev.simulation import FleetSpec, simulate
from quotaflow.dev.truth_check import compare, read_daily_totals
from quotaflow.producers.publisher import ReportPublisher
from quotaflow.sinks.influx import (
    EVENT_SLOTS,
    Coalescer,
    QuotaEventPoint,
    QuotaUsagePoint,
    TrafficPoint,
    line_protocol,
    quota_event_line,
)
from quotaflow.sinks.influxql import InfluxQL, quote_ident, quote_string
from quotaflow.streams.lag import LagProbe

DAILY = "traffic_daily,node_id=n1,user_id=alice"
MONTHLY = "traffic_monthly,node_id=n1,user_id=alice"


def _fields(up: int, down: int, billed_up: int | None = None,
            billed_down: int | None = None) -> str:
    """A traffic point's fields; billed as raw unless given."""
    billed_up = up if billed_up is None else billed_up
    billed_down = down if billed_down is None else billed_down
    return (f"up_bytes={up}i,down_bytes={down}i,total_bytes={up + down}i,"
            f"billed_up_bytes={billed_up}i,billed_down_bytes={billed_down}i,"
            f"billed_total_bytes={billed_up + billed_down}i")


def test_coalescer_keeps_the_latest_total_of_each_series() -> None:
    coalescer = Coalescer()
    assert coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 1, 2, 10, 20)]))
    assert coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 5, 6, 14, 24)]))
    assert not coalescer.update(b'{"node_id": "n1"}')
    assert sorted(coalescer.points()) == [
        f"{DAILY} {_fields(5, 6)} 86400",
        f"{MONTHLY} {_fields(14, 24)} 0",
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
    assert f"{DAILY} {_fields(1, 2)} 86400" in lines
    assert f"{DAILY} {_fields(9, 9)} 172800" in lines
    assert f"{MONTHLY} {_fields(19, 29)} 0" in lines
    assert len(coalescer) == 0 and coalescer.drain() == []
    assert list(coalescer.points()) == []


def test_billed_bytes_are_written_beside_the_raw_ones() -> None:
    coalescer = Coalescer()
    rows = [("alice", 100, 200, 1000, 2000, 150, 300, 1500, 3000),  # a rate of 1.5
            ("bob", 7, 9, 70, 90, 0, 0, 0, 0)]  # a free node
    assert coalescer.update(TotalsBatch.encode("n1", 86400, 0, rows))
    assert sorted(coalescer.drain()) == sorted([
        f"{DAILY} {_fields(100, 200, 150, 300)} 86400",
        f"{MONTHLY} {_fields(1000, 2000, 1500, 3000)} 0",
        f"traffic_daily,node_id=n1,user_id=bob {_fields(7, 9, 0, 0)} 86400",
        f"traffic_monthly,node_id=n1,user_id=bob {_fields(70, 90, 0, 0)} 0",
    ])


def test_rows_written_before_rates_existed_are_billed_as_raw() -> None:
    """Old 5-item rows, alone or beside 9-item ones in a record, as `TotalsBatch.rows()` says."""
    coalescer = Coalescer()
    old = b'{"node_id":"n1","day":86400,"month":0,"totals":[["alice",1,2,10,20]]}'
    assert coalescer.update(old)
    assert sorted(coalescer.drain()) == [f"{DAILY} {_fields(1, 2)} 86400",
                                         f"{MONTHLY} {_fields(10, 20)} 0"]
    mixed = TotalsBatch.encode("n1", 86400, 0, [("alice", 3, 4, 30, 40),
                                                ("bob", 1, 1, 1, 1, 2, 2, 2, 2)])
    assert coalescer.update(mixed)
    assert sorted(coalescer.drain()) == sorted([
        f"{DAILY} {_fields(3, 4)} 86400",
        f"{MONTHLY} {_fields(30, 40)} 0",
        f"traffic_daily,node_id=n1,user_id=bob {_fields(1, 1, 2, 2)} 86400",
        f"traffic_monthly,node_id=n1,user_id=bob {_fields(1, 1, 2, 2)} 0",
    ])


def _row_strategy() -> st.SearchStrategy[tuple[Any, ...]]:
    counter = st.integers(0, 2**63 - 1)
    user = st.sampled_from(["alice", "bob", "carol"])
    return (st.tuples(user, counter, counter, counter, counter)
            | st.tuples(user, counter, counter, counter, counter,
                        counter, counter, counter, counter))


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_row_strategy(), min_size=1, max_size=4), min_size=1, max_size=6))
def test_property_each_series_gets_the_last_row_raw_and_billed(
    records: list[list[tuple[Any, ...]]],
) -> None:
    coalescer = Coalescer()
    for rows in records:
        assert coalescer.update(TotalsBatch.encode("n", 86400, 0, rows))
    last = {row[0]: row if len(row) == 9 else (*row, *row[1:]) for rows in records for row in rows}
    expected = set()
    for user, du, dd, mu, md, bdu, bdd, bmu, bmd in last.values():
        expected.add(f"traffic_daily,node_id=n,user_id={user} {_fields(du, dd, bdu, bdd)} 86400")
        expected.add(f"traffic_monthly,node_id=n,user_id={user} {_fields(mu, md, bmu, bmd)} 0")
    assert set(coalescer.drain()) == expected and len(expected) == 2 * len(last)


def test_coalescer_refuses_what_is_not_a_totals_record() -> None:
    coalescer = Coalescer()
    negative = b'{"node_id": "n", "day": 0, "month": 0, "totals": [["u", -1, 0, 0, 0]]}'
    six = b'{"node_id": "n", "day": 0, "month": 0, "totals": [["u", 1, 0, 0, 0, 1]]}'
    for bad in (b"", b"not json", b"[]", negative, six):
        assert not coalescer.update(bad)
    assert (len(coalescer), coalescer.totals) == (0, 0)


def test_tags_with_special_characters_are_escaped() -> None:
    # InfluxDB 1.x keeps a backslash in a tag value as it is: escaping it would double it.
    line = next(line_protocol({("day", "a,b=c d", "n\\1", 0): (1, 1, 1, 1)}))
    assert line.startswith("traffic_daily,node_id=n\\1,user_id=a\\,b\\=c\\ d ")


# --- quota_usage: the latest quota state of each user, at the flush time ----------------

NOVEMBER = "2026-11-01T00:00:00+01:00"


def _quota(*rows: tuple[str, str, int, int | None, str]) -> bytes:
    return QuotaBatch.encode(list(rows))


def test_quota_usage_keeps_the_latest_state_of_each_user_at_the_flush_time() -> None:
    now = [1795514401.9]
    coalescer = Coalescer(clock=lambda: now[0])
    assert coalescer.update_quota(_quota(("alice", NOVEMBER, 10, 100, "enabled"),
                                         ("bob", NOVEMBER, 5, None, "enabled")))
    assert coalescer.update_quota(_quota(("alice", NOVEMBER, 80, 100, "enabled"),
                                         ("alice", NOVEMBER, 120, 100, "disabled")))
    assert (len(coalescer), coalescer.quota_states) == (2, 4)
    assert sorted(coalescer.drain()) == [
        'quota_usage,user_id=alice used_bytes=120i,allowance_bytes=100i,state="disabled",'
        f'period_start="{NOVEMBER}" 1795514401',
        # unlimited: no allowance_bytes at all
        f'quota_usage,user_id=bob used_bytes=5i,state="enabled",period_start="{NOVEMBER}"'
        " 1795514401",
    ]
    now[0] += 60  # the next flush stamps its own time; what was taken is gone
    assert coalescer.update_quota(_quota(("alice", "2026-12-01T00:00:00Z", 0, 100, "enabled")))
    assert coalescer.drain() == [
        'quota_usage,user_id=alice used_bytes=0i,allowance_bytes=100i,state="enabled",'
        'period_start="2026-12-01T00:00:00+00:00" 1795514461'
    ]


def test_quota_usage_escapes_user_ids_like_the_traffic() -> None:
    coalescer = Coalescer(clock=lambda: 0)
    assert coalescer.update_quota(_quota(("a,b=c d", NOVEMBER, 1, 2, "enabled")))
    [line] = coalescer.drain()
    assert line.startswith("quota_usage,user_id=a\\,b\\=c\\ d used_bytes=1i,")
    assert influx_1_8_parse(line) == [{"user_id": "a,b=c d"}]


def test_coalescer_refuses_what_is_not_a_quota_record() -> None:
    coalescer = Coalescer()
    for bad in (b"", b"[]", b'{"states": [["alice", "yesterday", 1, 2, "enabled"]]}',
                b'{"states": [["alice", "2026-11-01T00:00:00", 1, 2, "enabled"]]}',  # naive
                b'{"states": [["alice", "2026-11-01T00:00:00Z", -1, 2, "enabled"]]}',
                b'{"states": [["alice", "2026-11-01T00:00:00Z", 1, 2, "paused"]]}',
                b'{"states": [], "states": []}',
                TotalsBatch.encode("n", 0, 0, [("alice", 1, 2, 3, 4, 1, 2, 3, 4)])):
        assert not coalescer.update_quota(bad), bad
    assert (len(coalescer), coalescer.quota_states) == (0, 0)


_STATE = st.tuples(
    st.sampled_from(["alice", "bob", "carol", "dave"]),
    st.sampled_from([NOVEMBER, "2026-12-01T00:00:00+01:00"]),
    st.integers(0, 2**63 - 1),
    st.none() | st.integers(0, 2**63 - 1),
    st.sampled_from(["enabled", "disabled"]),
)


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_STATE, min_size=1, max_size=5), min_size=1, max_size=8),
       st.data())
def test_property_any_interleaving_of_quota_rows_gives_the_last_row_of_each_user(
    records: list[list[tuple[str, str, int, int | None, str]]], data: st.DataObject,
) -> None:
    """Records of several partitions arrive interleaved; each user keeps one partition."""
    partitions = {"alice": 0, "bob": 1, "carol": 0, "dave": 2}
    # the records of each partition in order, then any interleaving of the partitions
    per_partition: dict[int, list[bytes]] = {}
    for rows in records:
        for partition in sorted({partitions[row[0]] for row in rows}):
            mine = [row for row in rows if partitions[row[0]] == partition]
            per_partition.setdefault(partition, []).append(_quota(*mine))
    queues = {p: list(values) for p, values in per_partition.items()}
    coalescer = Coalescer(clock=lambda: 7)
    while queues:
        partition = data.draw(st.sampled_from(sorted(queues)))
        assert coalescer.update_quota(queues[partition].pop(0), ("t.quota", partition, 0))
        if not queues[partition]:
            del queues[partition]
    last = {row[0]: row for rows in records for row in rows}
    held = coalescer.take()
    assert all(isinstance(point, QuotaUsagePoint) for point in held)
    assert {point.state[0]: (point.state[2], point.state[3], point.state[4])
            for point in held} == {user: row[2:] for user, row in last.items()}
    assert len(held) == len(last)


# --- quota_events: one point per command, at issued_at ------------------------------------

ISSUED = datetime(2026, 11, 24, 10, 0, 1, 234000, tzinfo=UTC)
ISSUED_NS = 1795514401234 * EVENT_SLOTS


def _command(command_id: str = "c1", user_id: str = "alice", action: str = "warn",
             reason: str = "threshold", used: int = 80, allowance: int | None = 100,
             threshold: float | None = 0.8, issued_at: datetime = ISSUED) -> Command:
    return Command(
        command_id=command_id, user_id=user_id, action=action,
        reason=reason,
        period_start=datetime(2026, 11, 1, tzinfo=ZoneInfo("Europe/Berlin")),
        period_end=datetime(2026, 12, 1, tzinfo=ZoneInfo("Europe/Berlin")),
        used_bytes=used, allowance_bytes=allowance, threshold=threshold, issued_at=issued_at,
    )


def test_each_command_is_a_point_at_its_issued_at() -> None:
    coalescer = Coalescer()
    assert coalescer.add_command(_command("w5", threshold=0.5, used=50).encode(),
                                 ("t.control", 2, 41))
    assert coalescer.add_command(_command("w8").encode(), ("t.control", 2, 42))
    assert coalescer.add_command(
        _command("d1", action="disable", reason="quota", used=100, threshold=None,
                 issued_at=ISSUED + timedelta(milliseconds=5)).encode(), ("t.control", 2, 43))
    assert coalescer.add_command(
        _command("o1", user_id="bob", action="disable", reason="operator", used=7,
                 allowance=None, threshold=None).encode(), ("t.control", 1, 7))
    assert (len(coalescer), coalescer.commands) == (4, 4)
    held = coalescer.take()
    assert all(isinstance(p, QuotaEventPoint) and p.precision == "ns" for p in held)
    assert [p.line for p in held] == [
        # two warnings of one batch share issued_at: their thresholds, in millionths of
        # a millisecond, keep them apart
        'quota_events,action=warn,reason=threshold,user_id=alice command_id="w5",'
        f"used_bytes=50i,allowance_bytes=100i,threshold=0.5 {ISSUED_NS + 500_000}",
        'quota_events,action=warn,reason=threshold,user_id=alice command_id="w8",'
        f"used_bytes=80i,allowance_bytes=100i,threshold=0.8 {ISSUED_NS + 800_000}",
        'quota_events,action=disable,reason=quota,user_id=alice command_id="d1",'
        f"used_bytes=100i,allowance_bytes=100i {ISSUED_NS + 5 * EVENT_SLOTS}",
        # unlimited and not a warning: neither allowance_bytes nor threshold
        'quota_events,action=disable,reason=operator,user_id=bob command_id="o1",'
        f"used_bytes=7i {ISSUED_NS}",
    ]
    assert len(coalescer) == 0 and coalescer.drain() == []


def test_a_command_sent_twice_is_one_point() -> None:
    """Redelivered to the sink, or re-sent by a worker after a crash (a new offset)."""
    value = _command().encode()
    coalescer = Coalescer()
    assert coalescer.add_command(value, ("t.control", 0, 17))
    assert coalescer.add_command(value, ("t.control", 0, 17))
    assert coalescer.add_command(value, ("t.control", 0, 3_000_018))
    first, redelivered, resent = coalescer.drain()
    assert first == redelivered == resent and first.endswith(f" {ISSUED_NS + 800_000}")


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.sets(st.floats(0.000001, 0.999999), min_size=1, max_size=6).filter(
    lambda thresholds: len({round(t * EVENT_SLOTS) for t in thresholds}) == len(thresholds)))
def test_property_the_warnings_of_one_batch_are_points_in_their_order(
    thresholds: set[float],
) -> None:
    """Thresholds at least a millionth apart (plans name a few, such as 0.5, 0.8, 0.95)."""
    coalescer = Coalescer()
    ordered = sorted(thresholds)
    for i, threshold in enumerate(ordered):  # the worker issues them in ascending order
        assert coalescer.add_command(_command(f"w{i}", threshold=threshold).encode())
    times = [int(line.rsplit(" ", 1)[1]) for line in coalescer.drain()]
    assert times == sorted(set(times)) and len(times) == len(ordered)
    assert all(ISSUED_NS <= t < ISSUED_NS + EVENT_SLOTS for t in times)  # within issued_at's ms


def test_an_event_time_keeps_the_milliseconds_and_drops_finer_parts() -> None:
    command = _command(issued_at=ISSUED + timedelta(microseconds=999), threshold=None)
    assert quota_event_line(command).endswith(f" {ISSUED_NS}")
    before_1970 = _command(issued_at=datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
                           threshold=0.25)
    assert quota_event_line(before_1970).endswith(f" {-1 * EVENT_SLOTS + 250_000}")


def test_command_ids_are_escaped_as_string_fields() -> None:
    awkward = 'say "hi", a=b c\\'
    line = quota_event_line(_command(awkward, user_id="a,b=c d"))
    assert 'command_id="say \\"hi\\", a=b c\\\\",' in line
    assert influx_1_8_parse(line) == [{"action": "warn", "reason": "threshold",
                                       "user_id": "a,b=c d"}]


def test_coalescer_refuses_what_is_not_a_command() -> None:
    good = _command().encode()
    coalescer = Coalescer()
    for bad in (b"", b"{}", good.replace(b'"warn"', b'"ban"'),
                good.replace(b'"issued_at":"2026-11-24T10:00:01.234Z"',
                             b'"issued_at":"2026-11-24T10:00:01"'),  # no offset
                good.replace(b'"used_bytes":80', b'"used_bytes":-1'),
                good.replace(b'"command_id":"c1"', b'"command_id":"c1","command_id":"c2"'),
                _quota(("alice", NOVEMBER, 1, 2, "enabled"))):
        assert not coalescer.add_command(bad), bad
    assert (len(coalescer), coalescer.commands) == (0, 0)


def test_a_dead_letter_reading_names_the_point() -> None:
    coalescer = Coalescer(clock=lambda: 0)
    coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 1, 2, 3, 4, 2, 4, 6, 8)]))
    coalescer.update_quota(_quota(("bob", NOVEMBER, 5, None, "enabled")))
    coalescer.add_command(_command(allowance=None).encode())
    held = coalescer.take()
    assert [type(p) for p in held] == [TrafficPoint, TrafficPoint, QuotaUsagePoint,
                                       QuotaEventPoint]
    readings = sorted((p.reading() for p in held), key=str)
    assert readings == sorted([
        {"user_id": "alice", "node_id": "n1", "period": "day", "start": 86400,
         "up": 1, "down": 2, "billed_up": 2, "billed_down": 4},
        {"user_id": "alice", "node_id": "n1", "period": "month", "start": 0,
         "up": 3, "down": 4, "billed_up": 6, "billed_down": 8},
        {"user_id": "bob", "period_start": NOVEMBER, "used_bytes": 5, "state": "enabled"},
        {"user_id": "alice", "action": "warn", "reason": "threshold", "command_id": "c1",
         "used_bytes": 80},
    ], key=str)


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
            assert lag.raw == 0 and lag.sink > 0, "the sink must hold its offsets"
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
    points = {("day", user_id, user_id, 86400): (1, 2, 1, 2),
              ("month", "bob", user_id, 0): (3, 4, 6, 8),
              ("day", "carol", "n", 86400): (5, 6, 5, 6)}
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
    points = {("day", user, ids[-1 - i], 86400 * i): (1, 1, 1, 1) for i, user in enumerate(ids)}
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
    points = {("day", user, f"node-{i}\\x", 86400): (i, 2 * i, 2 * i, 4 * i)
              for i, user in enumerate(ids, 1)}
    now = 1795514401
    quota = Coalescer(clock=lambda: now)
    for i, user in enumerate(ids):
        assert quota.update_quota(QuotaBatch.encode([(user, NOVEMBER, i, i + 1, "enabled")]))
        assert quota.add_command(_command(f'{user} "{i}"\\', user_id=user).encode(),
                                 ("t.control", 0, i))
    held = quota.take()
    with InfluxDBClient(url=settings.influx_url, token=settings.influx_token.get_secret_value(),
                        org=settings.influx_org) as client:
        write_api = client.write_api(write_options=SYNCHRONOUS)
        write_api.write(
            bucket=settings.influx_bucket, record="\n".join(line_protocol(points)),
            write_precision=WritePrecision.S,
        )
        for precision in ("s", "ns"):
            write_api.write(
                bucket=settings.influx_bucket, write_precision=precision,
                record="\n".join(p.line for p in held if p.precision == precision),
            )
        # Why the contract refuses a trailing backslash: no escaping can write it.
        with pytest.raises(ApiException, match="invalid tag format"):
            write_api.write(
                bucket=settings.influx_bucket, write_precision=WritePrecision.S,
                record=next(line_protocol({("day", trailing, "n", 0): (1, 1, 1, 1)})),
            )
    for (_, user, node, _), (up, down, billed_up, billed_down) in points.items():
        series = influxql.query(
            f"SELECT up_bytes, down_bytes, total_bytes, billed_up_bytes, billed_down_bytes, "
            f"billed_total_bytes FROM traffic_daily "
            f"WHERE user_id = {quote_string(user)} AND node_id = {quote_string(node)} "
            f"GROUP BY user_id, node_id"
        )
        assert [(s.tags, s.rows) for s in series] == [(
            {"node_id": node, "user_id": user},
            [{"time": 86400, "up_bytes": up, "down_bytes": down, "total_bytes": up + down,
              "billed_up_bytes": billed_up, "billed_down_bytes": billed_down,
              "billed_total_bytes": billed_up + billed_down}],
        )], user
    for measurement in ("traffic_daily", "quota_usage", "quota_events"):
        shown = influxql.query(f"SHOW TAG VALUES FROM {measurement} WITH KEY = user_id")
        assert sorted(row["value"] for row in shown[0].rows) == sorted(ids), measurement
    for i, user in enumerate(ids):
        [usage] = influxql.query(f"SELECT used_bytes, allowance_bytes FROM quota_usage "
                                 f"WHERE user_id = {quote_string(user)}")
        assert usage.rows == [{"time": now, "used_bytes": i, "allowance_bytes": i + 1}], user
        [event] = influxql.query(f"SELECT command_id FROM quota_events "
                                 f"WHERE user_id = {quote_string(user)}", epoch="ns")
        assert event.rows == [{"time": ISSUED_NS + 800_000,
                               "command_id": f'{user} "{i}"\\'}], user


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


# --- the runner against fakes of Kafka and InfluxDB: refusals, outages, stopping -----------

class _Record:
    def __init__(self, offset: int, value: bytes | None) -> None:
        self.offset, self.value = offset, value


TOPICS = Settings().topics  # those of `_fake_sink`'s settings


class FakeConsumer:
    """What the sink uses of AIOKafkaConsumer: positions advance as getmany returns records.

    It is assigned `partitions` partitions of each of the sink's three topics.
    """

    def __init__(self, partitions: int = 1) -> None:
        from aiokafka.structs import TopicPartition

        self.tp = lambda p, topic=TOPICS.totals: TopicPartition(topic, p)
        self.assigned = {self.tp(p, topic) for p in range(partitions)
                         for topic in (TOPICS.totals, TOPICS.quota, TOPICS.control)}
        self.queue: list[tuple[Any, _Record]] = []
        self.sent: dict[Any, list[_Record]] = {}
        self.positions: dict[Any, int] = {}
        self.paused: set[Any] = set()
        self.commits: list[dict[Any, int]] = []
        self.on_idle: Any = None
        self.on_poll: Any = None  # e.g. a rebalance while the sink waits in a poll

    def add(self, partition: int, value: bytes | None, topic: str = TOPICS.totals) -> _Record:
        tp = self.tp(partition, topic)
        offset = len(self.sent.setdefault(tp, []))
        record = _Record(offset, value)
        self.sent[tp].append(record)
        self.queue.append((tp, record))
        return record

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assignment(self) -> set[Any]:
        return set(self.assigned)

    def pause(self, *tps: Any) -> None:
        self.paused.update(tps)

    def resume(self, *tps: Any) -> None:
        self.paused.difference_update(tps)

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, Any]:
        import asyncio

        if self.on_poll is not None:
            self.on_poll()
        out: dict[Any, list[_Record]] = {}
        for tp, record in list(self.queue):
            if tp in self.assigned and tp not in self.paused:
                self.queue.remove((tp, record))
                out.setdefault(tp, []).append(record)
                self.positions[tp] = record.offset + 1
        if not out:
            if self.on_idle is not None:
                self.on_idle()
            await asyncio.sleep(min(timeout_ms / 1000, 0.01))
        return out

    def seek(self, tp: Any, offset: int) -> None:
        self.queue = [(t, r) for t, r in self.queue if t != tp]
        self.queue += [(tp, r) for r in self.sent[tp][offset:]]
        self.positions[tp] = offset

    async def commit(self) -> None:
        self.commits.append(dict(self.positions))


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int | None]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, partition: int | None = None,
                   **_: Any) -> Any:
        import asyncio

        self.sent.append((topic, value, partition))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def send_and_wait(self, topic: str, value: bytes, partition: int | None = None,
                            **_: Any) -> None:
        await (await self.send(topic, value, partition))

    def letters(self) -> list[Any]:
        from quotaflow.core.contracts import DeadLetter

        return [DeadLetter.decode(value) for _, value, _ in self.sent]


def _influx_400(message: str) -> Exception:
    """An ApiException as the async client raises it for InfluxDB 1.8's answer."""
    import json

    from influxdb_client.rest import ApiException

    exc = ApiException(status=400, reason="Bad Request")
    exc.body = (json.dumps({"error": message}) + "\n").encode()
    return exc


class FakeInflux:
    """InfluxDB 1.8 as the sink sees it: takes lines, refuses some, or is unreachable."""

    def __init__(self, *, down_for: int = 0, poison: str = "\x00",
                 down_at_start: bool = False) -> None:
        self.down_at_start = down_at_start  # the database check fails too
        self.down_for = down_for  # the first attempts that fail as if InfluxDB were down
        self.poison = poison  # lines containing this are refused like a field type conflict
        self.points: dict[str, str] = {}  # series and time -> fields, as InfluxDB keeps them
        self.precisions: dict[str, str] = {}  # series and time -> the precision it came with
        self.attempts = self.failures = self.successes = 0

    def __call__(self, *_: Any, **__: Any) -> FakeInflux:
        return self  # stands in for the InfluxWriter class

    async def write(self, lines: Any, precision: str = "s") -> None:
        self.attempts += 1
        if self.failures < self.down_for:
            self.failures += 1
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 8086)")
        refused = [line for line in lines if self.poison in line]
        for line in lines:
            if line not in refused:
                key, fields, stamp = line.rsplit(" ", 2)
                self.points[f"{key} {stamp}"] = fields
                self.precisions[f"{key} {stamp}"] = precision
        if refused:  # 1.8 writes the rest and names neither the points nor the series
            raise _influx_400(
                'partial write: field type conflict: input field "up_bytes" on measurement '
                f'"traffic_daily" is type integer, already exists as type float '
                f"dropped={len(refused)}"
            )
        self.successes += 1

    async def ensure_database(self) -> None:
        if self.down_at_start:
            raise ConnectionRefusedError(111, "Connect call failed")

    async def close(self) -> None:
        pass


def _fake_sink(monkeypatch: pytest.MonkeyPatch, influx: FakeInflux,
               consumer: FakeConsumer, **kwargs: Any) -> tuple[Any, FakeProducer]:
    from quotaflow.sinks import influx as module

    dead = FakeProducer()
    monkeypatch.setattr(module, "AIOKafkaConsumer", lambda *a, **k: consumer)
    monkeypatch.setattr(module, "AIOKafkaProducer", lambda *a, **k: dead)
    monkeypatch.setattr(module, "InfluxWriter", influx)
    settings = Settings(sink_flush_interval_s=0.001, sink_batch_lines=8)
    return module.InfluxSink(settings, **kwargs), dead


def _daily(influx: FakeInflux, user: str, node: str, day: int) -> str | None:
    return influx.points.get(f"traffic_daily,node_id={node},user_id={user} {day}")


async def test_a_refused_point_is_dead_lettered_and_the_rest_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from quotaflow.core.contracts import DeadLetter

    influx = FakeInflux(poison="traffic_daily,node_id=n2,user_id=poisoned ")
    consumer = FakeConsumer(partitions=2)
    sink, dead = _fake_sink(monkeypatch, influx, consumer, max_backoff_s=0.05)
    users = [f"u{i}" for i in range(30)]
    consumer.add(0, TotalsBatch.encode("n1", 86400, 0, [(u, 1, 2, 3, 4) for u in users[:15]]))
    poisoned = consumer.add(1, TotalsBatch.encode("n2", 86400, 0, [("poisoned", 5, 6, 7, 8)]))
    consumer.add(1, TotalsBatch.encode("n1", 86400, 0, [(u, 1, 2, 3, 4) for u in users[15:]]))
    consumer.on_idle = lambda: influx.successes and sink.stop()
    await asyncio.wait_for(sink.run(), timeout=10)

    for user in users:
        assert _daily(influx, user, "n1", 86400) == _fields(1, 2)
    assert _daily(influx, "poisoned", "n2", 86400) is None
    [letter] = dead.letters()
    assert letter.reason == "invalid" and "field type conflict" in letter.detail
    assert "dropped" not in letter.detail
    assert (letter.topic, letter.partition, letter.offset) == (
        sink.settings.topics.totals, 1, poisoned.offset)
    assert letter.original() == (
        f"traffic_daily,node_id=n2,user_id=poisoned {_fields(5, 6)} 86400".encode()
    )
    assert letter.readings == ({"user_id": "poisoned", "node_id": "n2", "period": "day",
                                "start": 86400, "up": 5, "down": 6,
                                "billed_up": 5, "billed_down": 6},)
    assert dead.sent[0][0] == sink.settings.topics.dead and dead.sent[0][2] == 1
    assert isinstance(DeadLetter.decode(dead.sent[0][1]), DeadLetter)
    assert consumer.commits[-1] == {consumer.tp(0): 1, consumer.tp(1): 2}
    assert sink.stats.refused == 1


async def test_refused_points_are_found_by_bisection(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    influx = FakeInflux(poison="user_id=bad")
    consumer = FakeConsumer()
    sink, dead = _fake_sink(monkeypatch, influx, consumer, max_backoff_s=0.05)
    users = [f"bad{i}" if i % 17 == 3 else f"ok{i}" for i in range(100)]
    consumer.add(0, TotalsBatch.encode("n", 86400, 0, [(u, i, i, i, i) for i, u in
                                                       enumerate(users)]))
    consumer.on_idle = lambda: influx.attempts and sink.stop()
    await asyncio.wait_for(sink.run(), timeout=10)
    bad = [u for u in users if u.startswith("bad")]
    refused = {(r["user_id"], r["period"]) for d in dead.letters() for r in d.readings}
    assert refused == {(u, p) for u in bad for p in ("day", "month")}
    assert len(influx.points) == 2 * (len(users) - len(bad))
    assert consumer.commits[-1] == {consumer.tp(0): 1}


async def test_stop_ends_the_retries_without_committing(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    influx = FakeInflux(down_for=10**9)
    consumer = FakeConsumer()
    sink, _ = _fake_sink(monkeypatch, influx, consumer, max_backoff_s=30.0)
    consumer.add(0, TotalsBatch.encode("n", 86400, 0, [("alice", 1, 2, 3, 4)]))
    task = asyncio.ensure_future(sink.run())
    while influx.failures < 2:  # the second attempt starts after the first backoff (0.5 s)
        await asyncio.sleep(0.01)
    started = time.monotonic()
    sink.stop()
    await asyncio.wait_for(task, timeout=5)
    assert time.monotonic() - started < 1.0
    assert consumer.commits == []


async def test_stop_ends_the_wait_for_influxdb_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    influx = FakeInflux(down_for=10**9, down_at_start=True)
    consumer = FakeConsumer()
    sink, _ = _fake_sink(monkeypatch, influx, consumer)
    task = asyncio.ensure_future(sink.run())
    await asyncio.sleep(0.3)
    sink.stop()
    await asyncio.wait_for(task, timeout=5)
    assert consumer.commits == []


async def test_records_of_partitions_assigned_during_an_outage_are_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebalance hands the sink a new partition while InfluxDB is down."""
    import asyncio

    consumer = FakeConsumer(partitions=1)

    def rebalance() -> None:  # after the sink paused what it had, during a poll
        if influx.failures == 2 and consumer.tp(1) not in consumer.assigned:
            consumer.assigned.add(consumer.tp(1))
            consumer.add(1, TotalsBatch.encode("n", 86400, 0, [("newcomer", 1, 2, 3, 4)]))

    influx = FakeInflux(down_for=4)
    consumer.on_poll = rebalance
    sink, _ = _fake_sink(monkeypatch, influx, consumer, max_backoff_s=0.05)
    consumer.add(0, TotalsBatch.encode("n", 86400, 0, [("alice", 1, 2, 3, 4)]))
    consumer.on_idle = lambda: influx.successes and not consumer.queue and sink.stop()
    await asyncio.wait_for(sink.run(), timeout=10)
    assert consumer.commits
    # every record below a committed offset is in InfluxDB
    for tp, position in consumer.commits[-1].items():
        for record in consumer.sent[tp][:position]:
            for user, *_ in TotalsBatch.decode(record.value).totals:
                assert _daily(influx, user, "n", 86400) is not None, (tp, user)
    assert consumer.commits[-1].get(consumer.tp(1)) == 1


async def test_an_outage_is_logged_once_and_its_end_with_its_duration(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    influx = FakeInflux(down_for=25)
    consumer = FakeConsumer()
    sink, _ = _fake_sink(monkeypatch, influx, consumer, max_backoff_s=0.01)
    consumer.add(0, TotalsBatch.encode("n", 86400, 0, [("alice", 1, 2, 3, 4)]))
    consumer.on_idle = lambda: influx.successes and sink.stop()
    # a test that ran `quotaflow.logs.setup()` may have left a RepeatFilter on this handler
    monkeypatch.setattr(caplog.handler, "filters", [])
    with caplog.at_level(logging.INFO, logger="quotaflow.sinks.influx"):
        await asyncio.wait_for(sink.run(), timeout=10)
    lines = [r for r in caplog.records if r.name == "quotaflow.sinks.influx"]
    assert influx.failures == 25 and influx.successes
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING and "unreachable" in lines[0].getMessage()
    assert "recovered after" in lines[1].getMessage()
    assert "25 failed attempts" in lines[1].getMessage()


async def test_a_long_outage_is_logged_every_interval(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from quotaflow.sinks import influx as module

    monkeypatch.setattr(module, "OUTAGE_LOG_INTERVAL_S", 0.2, raising=False)
    influx = FakeInflux(down_for=10**9)
    consumer = FakeConsumer()
    sink, _ = _fake_sink(monkeypatch, influx, consumer, max_backoff_s=0.01)
    consumer.add(0, TotalsBatch.encode("n", 86400, 0, [("alice", 1, 2, 3, 4)]))
    monkeypatch.setattr(caplog.handler, "filters", [])  # see the test above
    with caplog.at_level(logging.INFO, logger="quotaflow.sinks.influx"):
        task = asyncio.ensure_future(sink.run())
        await asyncio.sleep(1.1)
        sink.stop()
        await asyncio.wait_for(task, timeout=5)
    lines = [r.getMessage() for r in caplog.records if r.name == "quotaflow.sinks.influx"]
    assert influx.failures > 20
    assert 4 <= len(lines) <= 8, lines
    assert sum("still unreachable" in line for line in lines) >= 3, lines


# --- the sink process on the real servers: quota data, a refused point, SIGTERM in an outage

def _start_sink(settings: Settings, log_path: Any) -> Any:
    import subprocess
    import sys

    from tests.conftest import settings_env

    return subprocess.Popen(
        [sys.executable, "-m", "quotaflow", "sink", "influx"], env=settings_env(settings),
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )


def _publish(settings: Settings, records: list[tuple[str, int, bytes | None]]) -> list[int]:
    """Publish (topic, partition, value) records in order (None: a keyed tombstone); their
    offsets."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    sent = [producer.send(topic, value=value, partition=partition,
                          key=b"tombstone" if value is None else None)
            for topic, partition, value in records]
    producer.flush()
    offsets = [future.get(timeout=30).offset for future in sent]
    producer.close()
    return offsets


def _publish_totals(settings: Settings, records: list[tuple[int, bytes]]) -> None:
    _publish(settings, [(settings.topics.totals, partition, value)
                        for partition, value in records])


def _wait_committed(settings: Settings, log_path: Any, timeout_s: float = 90.0) -> None:
    """Wait until the sink has committed everything published to its three topics."""
    topics = settings.topics
    probe = LagProbe(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while any(probe.behind(topic, topics.influx_sink_group)
                  for topic in (topics.totals, topics.quota, topics.control)):
            if time.monotonic() > deadline:
                pytest.fail(f"the sink did not commit; log: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    finally:
        probe.close()


def _stored(settings: Settings, measurement: str) -> dict[tuple[str, str, int], Any]:
    series = InfluxQL.from_settings(settings).query(
        f"SELECT up_bytes, down_bytes, total_bytes FROM {measurement} GROUP BY user_id, node_id"
    )
    return {(s.tags["user_id"], s.tags["node_id"], r["time"]):
            (r["up_bytes"], r["down_bytes"], r["total_bytes"]) for s in series for r in s.rows}


@pytest.mark.integration
def test_billed_totals_quota_states_and_commands_reach_influxdb(
    services: Any, settings: Settings, tmp_path: Any
) -> None:
    """The sink process on the real servers, read back with the InfluxQL documented for it."""
    import signal
    import urllib.request

    from kafka import KafkaConsumer

    from quotaflow.admin import ensure_topics
    from quotaflow.core.contracts import DeadLetter
    from quotaflow.core.partitioning import partition_of

    ensure_topics(settings)
    topics = settings.topics
    influxql = InfluxQL.from_settings(settings)
    influxql.create_database()
    day, month = 1795478400, 1793491200  # 2026-11-24 and 2026-11-01, UTC
    alice, bob = (partition_of(user, settings.partitions) for user in ("alice", "bob"))
    assert alice != bob

    def usage(user: str, used: int, allowance: int | None, state: str) -> bytes:
        return _quota((user, NOVEMBER, used, allowance, state))

    log_path = tmp_path / "sink.log"
    sink = _start_sink(settings, log_path)
    try:
        # totals with billed bytes (a rate of 1.5 on node-a), and an old record without
        _publish(settings, [
            (topics.totals, 0, TotalsBatch.encode("node-a", day, month, [
                ("alice", 100, 200, 1000, 2000, 150, 300, 1500, 3000)])),
            (topics.totals, 2, b'{"node_id": "node-b", "day": %d, "month": %d,'
                               b' "totals": [["bob", 7, 9, 70, 90]]}' % (day, month)),
            (topics.quota, alice, usage("alice", 100, 1000, "enabled")),
        ])
        _wait_committed(settings, log_path)
        [first] = influxql.query("SELECT last(used_bytes) FROM quota_usage "
                                 "WHERE user_id = 'alice'")
        assert first.rows[0]["last"] == 100
        time.sleep(1.1)  # the next flush is in another second: a point of its own

        # two warnings of one batch share their issued_at to the millisecond, and a
        # disable follows in the same second; bad records come first on both topics;
        # one warning is sent twice
        later = ISSUED + timedelta(milliseconds=400)
        bad_quota = b'{"states": [["alice", "yesterday", 1, 2, "enabled"]]}'
        bad_command = b'{"command_id": "broken", "user_id": "alice"}'
        warn_50 = _command("w50", threshold=0.5, used=500, allowance=1000).encode()
        warn_80 = _command("w80", threshold=0.8, used=800, allowance=1000).encode()
        nan = _command("nan", threshold=None, issued_at=later).encode().replace(
            b'"threshold":null', b'"threshold":NaN')  # refused by the contract
        disable = _command("d1", action="disable", reason="quota", used=1200, allowance=1000,
                           threshold=None, issued_at=later).encode()
        operator = _command("op1", user_id="bob", action="disable", reason="operator",
                            used=5000, allowance=None, threshold=None).encode()
        records = [
            (topics.quota, alice, bad_quota),
            (topics.quota, alice, usage("alice", 900, 1000, "enabled")),
            (topics.quota, alice, usage("alice", 1200, 1000, "disabled")),
            (topics.quota, bob, usage("bob", 5000, None, "enabled")),
            (topics.control, alice, bad_command),
            (topics.control, alice, None),  # a tombstone: not a command either
            (topics.control, alice, warn_50),
            (topics.control, alice, warn_80),
            (topics.control, alice, nan),
            (topics.control, alice, warn_80),  # re-sent by a worker after a crash: one point
            (topics.control, alice, disable),
            (topics.control, bob, operator),
        ]
        offsets = dict(zip([value for _, _, value in records], _publish(settings, records),
                           strict=True))
        _wait_committed(settings, log_path)
        assert sink.poll() is None, "the sink keeps running"

        # traffic: billed beside raw; the old record billed as raw
        fields = ("up_bytes, down_bytes, total_bytes, billed_up_bytes, billed_down_bytes, "
                  "billed_total_bytes")
        stored = {
            (s.name, s.tags["user_id"], s.tags["node_id"]): [tuple(r.values()) for r in s.rows]
            for measurement in ("traffic_daily", "traffic_monthly")
            for s in influxql.query(f"SELECT {fields} FROM {measurement} "
                                    f"GROUP BY user_id, node_id")
        }
        assert stored == {
            ("traffic_daily", "alice", "node-a"): [(day, 100, 200, 300, 150, 300, 450)],
            ("traffic_monthly", "alice", "node-a"): [(month, 1000, 2000, 3000, 1500, 3000, 4500)],
            ("traffic_daily", "bob", "node-b"): [(day, 7, 9, 16, 7, 9, 16)],
            ("traffic_monthly", "bob", "node-b"): [(month, 70, 90, 160, 70, 90, 160)],
        }

        # quota_usage: last() is the latest state; one point per flush that had one
        [last] = influxql.query("SELECT last(used_bytes) FROM quota_usage "
                                "WHERE user_id = 'alice'")
        assert last.rows[0]["last"] == 1200
        [history] = influxql.query("SELECT used_bytes, allowance_bytes, state, period_start "
                                   "FROM quota_usage WHERE user_id = 'alice'")
        assert len(history.rows) >= 2 and history.rows[0]["used_bytes"] == 100
        assert [r["time"] for r in history.rows] == sorted({r["time"] for r in history.rows})
        assert {k: v for k, v in history.rows[-1].items() if k != "time"} == {
            "used_bytes": 1200, "allowance_bytes": 1000, "state": "disabled",
            "period_start": NOVEMBER}
        [unlimited] = influxql.query("SELECT * FROM quota_usage WHERE user_id = 'bob'")
        assert [{k: v for k, v in r.items() if k != "time"} for r in unlimited.rows] == [
            {"allowance_bytes": None, "period_start": NOVEMBER, "state": "enabled",
             "used_bytes": 5000, "user_id": "bob"}]
        assert influxql.query("SELECT count(allowance_bytes) FROM quota_usage "
                              "WHERE user_id = 'bob'") == []

        # quota_events: one point per command, at issued_at (ns, the offset below the ms)
        events = {
            (s.tags["user_id"], s.tags["action"], s.tags["reason"]): s.rows
            for s in influxql.query("SELECT command_id, used_bytes, allowance_bytes, threshold "
                                    "FROM quota_events GROUP BY user_id, action, reason",
                                    epoch="ns")
        }
        assert events == {
            ("alice", "warn", "threshold"): [
                {"time": ISSUED_NS + 500_000, "command_id": "w50", "used_bytes": 500,
                 "allowance_bytes": 1000, "threshold": 0.5},
                {"time": ISSUED_NS + 800_000, "command_id": "w80", "used_bytes": 800,
                 "allowance_bytes": 1000, "threshold": 0.8},
            ],
            ("alice", "disable", "quota"): [
                {"time": ISSUED_NS + 400 * EVENT_SLOTS, "command_id": "d1", "used_bytes": 1200,
                 "allowance_bytes": 1000, "threshold": None}],
            ("bob", "disable", "operator"): [
                {"time": ISSUED_NS, "command_id": "op1",
                 "used_bytes": 5000, "allowance_bytes": None, "threshold": None}],
        }
        [in_one_second] = influxql.query(
            "SELECT count(command_id) FROM quota_events WHERE user_id = 'alice' "
            "AND time >= '2026-11-24T10:00:01Z' AND time < '2026-11-24T10:00:02Z'")
        assert in_one_second.rows[0]["count"] == 3

        field_types = {
            measurement: {r["fieldKey"]: r["fieldType"] for r in series.rows}
            for measurement in ("traffic_daily", "quota_usage", "quota_events")
            for series in influxql.query(f"SHOW FIELD KEYS FROM {measurement}")
        }
        assert field_types == {
            "traffic_daily": dict.fromkeys(
                ["billed_down_bytes", "billed_total_bytes", "billed_up_bytes", "down_bytes",
                 "total_bytes", "up_bytes"], "integer"),
            "quota_usage": {"allowance_bytes": "integer", "period_start": "string",
                            "state": "string", "used_bytes": "integer"},
            "quota_events": {"allowance_bytes": "integer", "command_id": "string",
                             "threshold": "float", "used_bytes": "integer"},
        }

        # the bad records and the refused point are in .dead, with the reason
        consumer = KafkaConsumer(topics.dead, bootstrap_servers=settings.kafka_bootstrap,
                                 auto_offset_reset="earliest", consumer_timeout_ms=5000)
        letters = {(d.topic, d.offset): d for d in
                   (DeadLetter.decode(m.value) for m in consumer)}
        consumer.close()
        assert set(letters) == {(topics.quota, offsets[bad_quota]),
                                (topics.control, offsets[bad_command]),
                                (topics.control, offsets[None]),
                                (topics.control, offsets[nan])}
        assert letters[topics.control, offsets[None]].detail == "not a Command record: no value"
        assert letters[topics.quota, offsets[bad_quota]].detail.startswith(
            "not a QuotaBatch record: states.0.1: Input should be a valid datetime")
        assert letters[topics.control, offsets[bad_command]].detail.startswith(
            "not a Command record: ")
        assert letters[topics.control, offsets[bad_command]].original() == bad_command
        refused = letters[topics.control, offsets[nan]]
        assert refused.detail == "not a Command record: threshold: Input should be a finite number"
        assert refused.partition == alice and refused.original() == nan

        # a command point InfluxDB refuses (a float used_bytes already in its shard, a
        # week of 2030) is dead-lettered with its command; the command after it is written
        far = datetime(2030, 1, 9, 12, tzinfo=UTC)
        far_ns = int(far.timestamp()) * 10**9
        urllib.request.urlopen(urllib.request.Request(
            f"{settings.influx_url}/write?db={settings.influx_bucket}&precision=ns",
            method="POST", data=(f"quota_events,action=warn,reason=threshold,user_id=carol "
                                 f"used_bytes=1.5 {far_ns}").encode(),
        ), timeout=10).close()
        conflicting = _command("conflict", allowance=None, issued_at=far + timedelta(hours=1))
        after = _command("after", issued_at=ISSUED + timedelta(seconds=5))
        [conflict_at, _] = _publish(settings, [(topics.control, alice, conflicting.encode()),
                                               (topics.control, alice, after.encode())])
        _wait_committed(settings, log_path)
        consumer = KafkaConsumer(topics.dead, bootstrap_servers=settings.kafka_bootstrap,
                                 auto_offset_reset="earliest", consumer_timeout_ms=5000)
        [letter] = [d for d in (DeadLetter.decode(m.value) for m in consumer)
                    if (d.topic, d.offset) == (topics.control, conflict_at)]
        consumer.close()
        assert "field type conflict" in letter.detail and letter.partition == alice
        assert letter.original().startswith(
            b'quota_events,action=warn,reason=threshold,user_id=alice '
            b'command_id="conflict",used_bytes=80i,threshold=0.8 ')
        assert letter.readings == ({"user_id": "alice", "action": "warn", "reason": "threshold",
                                    "command_id": "conflict", "used_bytes": 80},)
        [written] = influxql.query("SELECT command_id FROM quota_events "
                                   "WHERE command_id = 'after'")
        assert len(written.rows) == 1
        assert sink.poll() is None
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
    assert sink.returncode == 0


@pytest.mark.integration
def test_a_point_influxdb_refuses_is_dead_lettered_and_the_sink_goes_on(
    services: Any, settings: Settings, tmp_path: Any
) -> None:
    """A field type conflict in one series: its point is dead-lettered, the rest written."""
    import signal
    import urllib.request

    from kafka import KafkaConsumer

    from quotaflow.admin import ensure_topics
    from quotaflow.core.contracts import DeadLetter

    ensure_topics(settings)
    InfluxQL.from_settings(settings).create_database()
    # InfluxDB 1.8 keeps a field's type per measurement and shard (7 days here): a float
    # up_bytes refuses every integer daily point of that week, so the others are elsewhere.
    week = 7 * 86400
    bad_day, good_day, month = 2900 * week + 86400, 2902 * week + 86400, 2900 * week
    urllib.request.urlopen(urllib.request.Request(
        f"{settings.influx_url}/write?db={settings.influx_bucket}&precision=s", method="POST",
        data=f"traffic_daily,node_id=node-p,user_id=poisoned up_bytes=1.5 {bad_day}".encode(),
    ), timeout=10).close()
    users = [f"user-{i}" for i in range(40)]
    records = [(p, TotalsBatch.encode(f"node-{p}", good_day, month,
                                      [(u, 1, i, 2, 2 * i) for i, u in enumerate(users[p::4])]))
               for p in range(4)]
    poison = TotalsBatch.encode("node-p", bad_day, month, [("poisoned", 5, 6, 7, 8)])
    records.insert(2, (1, poison))
    records.append((1, TotalsBatch.encode("node-q", good_day, month, [("after", 9, 9, 9, 9)])))
    _publish_totals(settings, records)
    log_path = tmp_path / "sink.log"
    sink = _start_sink(settings, log_path)
    try:
        _wait_committed(settings, log_path)
        assert sink.poll() is None, "the sink keeps running"
        daily, monthly = _stored(settings, "traffic_daily"), _stored(settings, "traffic_monthly")
        for p in range(4):
            for i, user in enumerate(users[p::4]):
                assert daily[(user, f"node-{p}", good_day)] == (1, i, 1 + i)
                assert monthly[(user, f"node-{p}", month)] == (2, 2 * i, 2 + 2 * i)
        assert daily[("after", "node-q", good_day)] == (9, 9, 18)
        assert daily[("poisoned", "node-p", bad_day)] == (1.5, None, None)
        assert monthly[("poisoned", "node-p", month)] == (7, 8, 15)

        dead = KafkaConsumer(settings.topics.dead, bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
        letters = [(m.partition, DeadLetter.decode(m.value)) for m in dead]
        dead.close()
        assert len(letters) == 1, letters
        partition, letter = letters[0]
        assert partition == 1 and letter.reason == "invalid"
        assert "field type conflict" in letter.detail and letter.topic == settings.topics.totals
        assert letter.readings == ({"user_id": "poisoned", "node_id": "node-p", "period": "day",
                                    "start": bad_day, "up": 5, "down": 6,
                                    "billed_up": 5, "billed_down": 6},)
        assert letter.original().startswith(b"traffic_daily,node_id=node-p,user_id=poisoned ")

        # and it goes on: later totals are written and committed
        _publish_totals(settings, [(3, TotalsBatch.encode("node-z", good_day, month,
                                                          [("later", 1, 1, 1, 1)]))])
        _wait_committed(settings, log_path)
        assert _stored(settings, "traffic_daily")[("later", "node-z", good_day)] == (1, 1, 2)
        assert sink.poll() is None
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
    assert sink.returncode == 0


@pytest.mark.integration
def test_sigterm_stops_the_sink_within_seconds_while_influxdb_is_down(
    services: Any, settings: Settings, tmp_path: Any
) -> None:
    import signal

    from quotaflow.admin import ensure_topics

    ensure_topics(settings)
    InfluxQL.from_settings(settings).create_database()
    log_path = tmp_path / "sink.log"
    first = TotalsBatch.encode("n", 86400, 0, [("before", 1, 1, 1, 1)])
    during = TotalsBatch.encode("n", 86400, 0, [("during", 2, 2, 2, 2)])

    def stop_within(process: Any, limit_s: float) -> float:
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=limit_s)
        except Exception:
            process.kill()
            process.wait()
            pytest.fail(f"SIGTERM did not stop the sink; log: {log_path.read_text()[-3000:]}")
        return time.monotonic() - started

    sink = _start_sink(settings, log_path)
    try:
        _publish_totals(settings, [(0, first)])
        _wait_committed(settings, log_path)
        services.stop_influx()
        try:
            _publish_totals(settings, [(0, during)])
            deadline = time.monotonic() + 30
            while "unreachable" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2.0)  # into the backoff
            assert stop_within(sink, 6.0) < 6.0
            probe = LagProbe(settings)
            behind = probe.behind(settings.topics.totals, settings.topics.influx_sink_group)
            probe.close()
            assert behind == 1, "what was not written must not be committed"
            # a sink that starts while InfluxDB is down stops as promptly
            sink = _start_sink(settings, log_path)
            time.sleep(4.0)
            assert sink.poll() is None
            assert stop_within(sink, 6.0) < 6.0
        finally:
            services.start_influx()
        sink = _start_sink(settings, log_path)
        _wait_committed(settings, log_path)
        assert _stored(settings, "traffic_daily")[("during", "n", 86400)] == (2, 2, 4)
    finally:
        if sink.poll() is None:
            sink.send_signal(signal.SIGTERM)
            sink.wait(timeout=30)
