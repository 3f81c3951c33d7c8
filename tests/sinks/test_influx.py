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


# --- the runner against fakes of Kafka and InfluxDB: refusals, outages, stopping -----------

class _Record:
    def __init__(self, offset: int, value: bytes) -> None:
        self.offset, self.value = offset, value


class FakeConsumer:
    """What the sink uses of AIOKafkaConsumer: positions advance as getmany returns records."""

    def __init__(self, topic: str, partitions: int = 1) -> None:
        from aiokafka.structs import TopicPartition

        self.topic = topic
        self.tp = lambda p: TopicPartition(topic, p)
        self.assigned = {self.tp(p) for p in range(partitions)}
        self.queue: list[tuple[Any, _Record]] = []
        self.sent: dict[Any, list[_Record]] = {}
        self.positions: dict[Any, int] = {}
        self.paused: set[Any] = set()
        self.commits: list[dict[Any, int]] = []
        self.on_idle: Any = None
        self.on_poll: Any = None  # e.g. a rebalance while the sink waits in a poll

    def add(self, partition: int, value: bytes) -> _Record:
        tp = self.tp(partition)
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
        self.attempts = self.failures = self.successes = 0

    def __call__(self, *_: Any, **__: Any) -> FakeInflux:
        return self  # stands in for the InfluxWriter class

    async def write(self, lines: Any) -> None:
        self.attempts += 1
        if self.failures < self.down_for:
            self.failures += 1
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 8086)")
        refused = [line for line in lines if self.poison in line]
        for line in lines:
            if line not in refused:
                key, fields, stamp = line.rsplit(" ", 2)
                self.points[f"{key} {stamp}"] = fields
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
    consumer = FakeConsumer("p.totals", partitions=2)
    sink, dead = _fake_sink(monkeypatch, influx, consumer, max_backoff_s=0.05)
    users = [f"u{i}" for i in range(30)]
    consumer.add(0, TotalsBatch.encode("n1", 86400, 0, [(u, 1, 2, 3, 4) for u in users[:15]]))
    poisoned = consumer.add(1, TotalsBatch.encode("n2", 86400, 0, [("poisoned", 5, 6, 7, 8)]))
    consumer.add(1, TotalsBatch.encode("n1", 86400, 0, [(u, 1, 2, 3, 4) for u in users[15:]]))
    consumer.on_idle = lambda: influx.successes and sink.stop()
    await asyncio.wait_for(sink.run(), timeout=10)

    for user in users:
        assert _daily(influx, user, "n1", 86400) == "up_bytes=1i,down_bytes=2i,total_bytes=3i"
    assert _daily(influx, "poisoned", "n2", 86400) is None
    [letter] = dead.letters()
    assert letter.reason == "invalid" and "field type conflict" in letter.detail
    assert "dropped" not in letter.detail
    assert (letter.topic, letter.partition, letter.offset) == (
        sink.settings.topics.totals, 1, poisoned.offset)
    assert letter.original() == (
        b"traffic_daily,node_id=n2,user_id=poisoned up_bytes=5i,down_bytes=6i,total_bytes=11i"
        b" 86400"
    )
    assert letter.readings == ({"user_id": "poisoned", "node_id": "n2", "period": "day",
                                "start": 86400, "up": 5, "down": 6},)
    assert dead.sent[0][0] == sink.settings.topics.dead and dead.sent[0][2] == 1
    assert isinstance(DeadLetter.decode(dead.sent[0][1]), DeadLetter)
    assert consumer.commits[-1] == {consumer.tp(0): 1, consumer.tp(1): 2}
    assert sink.stats.refused == 1


async def test_refused_points_are_found_by_bisection(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    influx = FakeInflux(poison="user_id=bad")
    consumer = FakeConsumer("p.totals")
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
    consumer = FakeConsumer("p.totals")
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
    consumer = FakeConsumer("p.totals")
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

    consumer = FakeConsumer("p.totals", partitions=1)

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
    consumer = FakeConsumer("p.totals")
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
    consumer = FakeConsumer("p.totals")
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


# --- the sink process on the real servers: a refused point, and SIGTERM during an outage ---

def _start_sink(settings: Settings, log_path: Any) -> Any:
    import subprocess
    import sys

    from tests.conftest import settings_env

    return subprocess.Popen(
        [sys.executable, "-m", "quotaflow", "sink", "influx"], env=settings_env(settings),
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )


def _publish_totals(settings: Settings, records: list[tuple[int, bytes]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    for partition, value in records:
        producer.send(settings.topics.totals, value=value, partition=partition)
    producer.flush()
    producer.close()


def _wait_committed(settings: Settings, log_path: Any, timeout_s: float = 90.0) -> None:
    probe = LagProbe(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while probe.behind(settings.topics.totals, settings.topics.influx_sink_group):
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
                                    "start": bad_day, "up": 5, "down": 6},)
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
