"""The InfluxDB sink: totals, quota states and quota commands in, InfluxDB points out.

One consumer reads four topics, and each record becomes points of its own:

- `<prefix>.totals`: `traffic_daily` and `traffic_monthly`. Each point holds a
  period's running total, raw and billed, so writing the same series and time again
  replaces it and redelivery never double-counts. Per flush the sink writes the
  latest total of each (user, node, period) once.
- `<prefix>.quota`: `quota_usage`, the latest quota state of each user per flush,
  stamped with the flush time.
- `<prefix>.control`: `quota_events`, one point per command, at its `issued_at`.
- `<prefix>.metrics`: `pipeline`, the worker's figures, one point per snapshot.

Every `QUOTAFLOW_STATUS_INTERVAL_S` the sink adds its own points
(`quotaflow.sinks.health`): `node_status` of every node it knows, from the report
each totals record came from, and its own `pipeline` point.

Three parts: the pure `Coalescer` (records in, lines out), the `InfluxWriter` (the
only code that talks to InfluxDB) and the runner `InfluxSink` (Kafka in, commits). It
commits its Kafka offsets only after InfluxDB accepted everything consumed before
them, or refused it for good: a point InfluxDB refuses for what it is (a field type
conflict, a parse error, a too large body) goes to `<prefix>.dead` and the rest of
the batch is written; so does a record that is not what its topic carries. While
InfluxDB is down (no answer, a timeout, 5xx, 429) it pauses its partitions, keeps
its group membership, retries with backoff and catches up afterwards; a stop
request ends the retries at once, without committing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError, KafkaError
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.rest import ApiException
from pydantic import ValidationError

from quotaflow import metrics
from quotaflow.core.contracts import DeadLetter, PeriodKind, ReportSeen, TotalsBatch, UserTotals
from quotaflow.core.health import PipelineSnapshot
from quotaflow.core.plans import Command, QuotaBatch
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES
from quotaflow.sinks.health import HealthPoint, SinkHealth, seed_query, snapshot_point
from quotaflow.sinks.influxql import InfluxQL, InfluxQLError, InfluxUnreachable
from quotaflow.sinks.lines import escape_tag, string_field

log = logging.getLogger("quotaflow.sinks.influx")

MEASUREMENTS: dict[PeriodKind, str] = {"day": "traffic_daily", "month": "traffic_monthly"}
QUOTA_USAGE = "quota_usage"
QUOTA_EVENTS = "quota_events"

OUTAGE_LOG_INTERVAL_S = 30.0
"""While InfluxDB stays unreachable, one log line per this many seconds."""

STOP_GRACE_S = 3.0
"""After a stop request, how long a write already under way may still take."""

PERMANENT_STATUSES = frozenset({400, 413, 422})
"""HTTP answers that refuse the points themselves: sending them again cannot help.

400 is InfluxDB 1.8's answer to a parse error, a field type conflict, points beyond
the retention policy and `max-values-per-tag`; 413 a body above `max-body-size`; 422
InfluxDB 2.x's to a schema conflict. Anything else (no answer, a timeout, 401/403/404
until the configuration or database is fixed, 429, 5xx) passes and is retried.
"""

T = TypeVar("T")
Precision = Literal["s", "ns"]
"""The unit of a line's timestamp: seconds for traffic and quota usage, nanoseconds for
quota events. One write request carries lines of one precision."""
PRECISIONS: tuple[Precision, ...] = ("s", "ns")
SeriesKey = tuple[PeriodKind, str, str, int]  # period, user, node, start
Origin = tuple[str, int, int]  # topic, partition and offset of the record that set a point
NO_ORIGIN: Origin = ("", -1, -1)
QuotaState = tuple[str, datetime, int, int | None, str]
"""A `QuotaBatch` row: user, period start, used bytes, allowance (None: unlimited), state."""

EVENT_SLOTS = 1_000_000
"""Nanoseconds in a millisecond, where a quota event's time holds its sub-millisecond slot
(`event_slot`)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def traffic_line(key: SeriesKey, up: int, down: int, billed_up: int, billed_down: int) -> str:
    """The line-protocol line (second precision) of one series' total, raw and billed."""
    period, user, node, start = key
    return (
        f"{MEASUREMENTS[period]},node_id={escape_tag(node)},user_id={escape_tag(user)} "
        f"up_bytes={up}i,down_bytes={down}i,total_bytes={up + down}i,"
        f"billed_up_bytes={billed_up}i,billed_down_bytes={billed_down}i,"
        f"billed_total_bytes={billed_up + billed_down}i {start}"
    )


def line_protocol(points: Mapping[SeriesKey, tuple[int, int, int, int]]) -> Iterator[str]:
    """Line-protocol lines (second precision) for coalesced totals.

    A total is up, down, billed up and billed down bytes.

    >>> points = {("day", "al ice", "n1", 1763683200): (1, 2, 1, 4)}
    >>> print(next(line_protocol(points)))  # doctest: +NORMALIZE_WHITESPACE
    traffic_daily,node_id=n1,user_id=al\\ ice
    up_bytes=1i,down_bytes=2i,total_bytes=3i,billed_up_bytes=1i,billed_down_bytes=4i,billed_total_bytes=5i
    1763683200
    """
    for key, (up, down, billed_up, billed_down) in points.items():
        yield traffic_line(key, up, down, billed_up, billed_down)


def quota_usage_line(state: QuotaState, at: int) -> str:
    """The line-protocol line (second precision) of a user's quota state at `at`.

    `allowance_bytes` is left out when the allowance is unlimited.

    >>> from datetime import timezone
    >>> start = datetime(2026, 11, 1, tzinfo=timezone(timedelta(hours=1)))
    >>> print(quota_usage_line(("alice", start, 40, None, "enabled"), 1763980000))
    ... # doctest: +NORMALIZE_WHITESPACE
    quota_usage,user_id=alice
    used_bytes=40i,state="enabled",period_start="2026-11-01T00:00:00+01:00"
    1763980000
    """
    user, period_start, used, allowance, state_name = state
    allowance_field = "" if allowance is None else f"allowance_bytes={allowance}i,"
    return (
        f"{QUOTA_USAGE},user_id={escape_tag(user)} used_bytes={used}i,{allowance_field}"
        f'state="{state_name}",period_start="{period_start.isoformat()}" {at}'
    )


def event_slot(threshold: float | None) -> int:
    """The nanoseconds a quota event's time has beyond its `issued_at` millisecond.

    The warnings of one batch share their `issued_at` and their tags (`warn`,
    `threshold`), so at the millisecond they would be one point, the last written
    replacing the others. A warning's slot is its threshold in millionths, which
    keeps them apart and in the order they were issued (ascending); every other
    command has slot 0. The slot is the command's own, so a command sent twice (the
    worker re-sends what Kafka may not have taken before a crash) is one point.

    >>> event_slot(0.5), event_slot(0.8), event_slot(None), event_slot(float("nan"))
    (500000, 800000, 0, 0)
    """
    if threshold is None or not 0 <= threshold < 1:  # also NaN: InfluxDB refuses that line
        return 0
    return min(round(threshold * EVENT_SLOTS), EVENT_SLOTS - 1)


def quota_event_line(command: Command) -> str:
    """The line-protocol line (nanosecond precision) of a command.

    The time is `issued_at` to the millisecond plus the command's `event_slot` in
    nanoseconds; `allowance_bytes` and `threshold` are left out when they are null.

    >>> command = Command.decode(b'{"command_id": "9f2c", "user_id": "alice",'
    ...     b' "action": "warn", "reason": "threshold", "period_start": "2026-11-01T00:00:00Z",'
    ...     b' "period_end": null, "used_bytes": 8, "allowance_bytes": 10, "threshold": 0.8,'
    ...     b' "issued_at": "2026-11-24T10:00:01.234Z"}')
    >>> print(quota_event_line(command))  # doctest: +NORMALIZE_WHITESPACE
    quota_events,action=warn,reason=threshold,user_id=alice
    command_id="9f2c",used_bytes=8i,allowance_bytes=10i,threshold=0.8
    1795514401234800000
    """
    fields = f"command_id={string_field(command.command_id)},used_bytes={command.used_bytes}i"
    if command.allowance_bytes is not None:
        fields += f",allowance_bytes={command.allowance_bytes}i"
    if command.threshold is not None:
        fields += f",threshold={float(command.threshold)!r}"
    millisecond = (command.issued_at - _EPOCH) // _MILLISECOND
    time_ns = millisecond * EVENT_SLOTS + event_slot(command.threshold)
    return (
        f"{QUOTA_EVENTS},action={command.action},reason={command.reason},"
        f"user_id={escape_tag(command.user_id)} {fields} {time_ns}"
    )


def _chunks(lines: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(lines), size):
        yield list(lines[start : start + size])


class HeldPoint(Protocol):
    """A point waiting for the next write: its line, and the record it came from."""

    @property
    def line(self) -> str:
        """The point in line protocol."""
        ...

    @property
    def precision(self) -> Precision:
        """The unit of the line's timestamp."""
        ...

    @property
    def origin(self) -> Origin:
        """The record that set the point (the last one, when several were coalesced)."""
        ...

    def reading(self) -> dict[str, int | str]:
        """The point as a dead letter's reading: its series and integer values."""
        ...


class TrafficPoint(NamedTuple):
    """A coalesced traffic point: its line, its series, the totals row that set it and where
    the row came from."""

    line: str
    key: SeriesKey
    row: UserTotals
    origin: Origin

    @property
    def precision(self) -> Precision:
        return "s"

    def reading(self) -> dict[str, int | str]:
        period, user, node, start = self.key
        up, down, billed_up, billed_down = _period_total(period, self.row)
        return {"user_id": user, "node_id": node, "period": period, "start": start,
                "up": up, "down": down, "billed_up": billed_up, "billed_down": billed_down}


class QuotaUsagePoint(NamedTuple):
    """A user's latest quota state, and the `<prefix>.quota` record it came from."""

    line: str
    state: QuotaState
    origin: Origin

    @property
    def precision(self) -> Precision:
        return "s"

    def reading(self) -> dict[str, int | str]:
        user, period_start, used, allowance, state_name = self.state
        reading: dict[str, int | str] = {
            "user_id": user, "period_start": period_start.isoformat(), "used_bytes": used,
            "state": state_name,
        }
        if allowance is not None:
            reading["allowance_bytes"] = allowance
        return reading


class QuotaEventPoint(NamedTuple):
    """A command, and the `<prefix>.control` record it came from."""

    line: str
    command: Command
    origin: Origin

    @property
    def precision(self) -> Precision:
        return "ns"

    def reading(self) -> dict[str, int | str]:
        command = self.command
        reading: dict[str, int | str] = {
            "user_id": command.user_id, "action": command.action, "reason": command.reason,
            "command_id": command.command_id, "used_bytes": command.used_bytes,
        }
        if command.allowance_bytes is not None:
            reading["allowance_bytes"] = command.allowance_bytes
        return reading


def _period_total(period: PeriodKind, row: UserTotals) -> tuple[int, int, int, int]:
    """A totals row's up, down, billed up and billed down bytes of the day or of the month.

    A row without billed bytes (written before node rates existed) is billed as raw, as
    `TotalsBatch.rows()` says; the coalescer holds rows as they came, since normalising
    every row on the way in would cost the hot path a tuple per row.

    >>> _period_total("month", ("alice", 1, 2, 10, 20)), _period_total("day", ("bob", *range(8)))
    ((10, 20, 10, 20), (0, 1, 4, 5))
    """
    # a raw-only row's slice of billed bytes is empty
    if period == "day":
        return row[1:3] + (row[5:7] or row[1:3])
    return row[3:5] + (row[7:9] or row[3:5])


@dataclass
class SinkStats:
    """Counters for the status line."""

    records: int = 0
    totals: int = 0
    quota_states: int = 0
    commands: int = 0
    points: int = 0
    writes: int = 0
    failures: int = 0
    invalid: int = 0
    refused: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """One line for logs and the status display."""
        return (
            f"records={self.records} totals={self.totals} quota_states={self.quota_states} "
            f"commands={self.commands} points={self.points} writes={self.writes} "
            f"failures={self.failures} invalid={self.invalid} refused={self.refused}"
        )


class Coalescer:
    """The points of the next write: latest totals, latest quota states, every command.

    Pure state: records go in, line-protocol lines come out: one per traffic series
    (period, user, node, start) with its latest total, one per user with its latest
    quota state, stamped with `clock()` (Unix seconds) when the lines are taken, and
    one per command.

    >>> coalescer = Coalescer(clock=lambda: 1763980000.5)
    >>> coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 1, 2, 10, 20)]))
    True
    >>> coalescer.update(TotalsBatch.encode("n1", 86400, 0,  # billed at a rate of 2
    ...                                     [("alice", 5, 6, 14, 24, 10, 12, 28, 48)]))
    True
    >>> coalescer.update(b'{"node_id": "n1"}')  # not a TotalsBatch: nothing changes
    False
    >>> coalescer.update_quota(QuotaBatch.encode([("alice", "2026-11-01T00:00:00Z", 76, 100,
    ...                                            "enabled")]))
    True
    >>> len(coalescer), coalescer.totals, coalescer.quota_states
    (3, 4, 1)
    >>> for line in coalescer.drain():  # doctest: +NORMALIZE_WHITESPACE
    ...     print(line)
    traffic_daily,node_id=n1,user_id=alice
    up_bytes=5i,down_bytes=6i,total_bytes=11i,billed_up_bytes=10i,billed_down_bytes=12i,billed_total_bytes=22i
    86400
    traffic_monthly,node_id=n1,user_id=alice
    up_bytes=14i,down_bytes=24i,total_bytes=38i,billed_up_bytes=28i,billed_down_bytes=48i,billed_total_bytes=76i
    0
    quota_usage,user_id=alice
    used_bytes=76i,allowance_bytes=100i,state="enabled",period_start="2026-11-01T00:00:00+00:00"
    1763980000
    >>> len(coalescer), coalescer.drain()
    (0, [])
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._traffic: dict[SeriesKey, tuple[UserTotals, Origin]] = {}
        self._quota: dict[str, tuple[QuotaState, Origin]] = {}
        self._commands: list[tuple[Command, Origin]] = []
        self._health: list[HealthPoint] = []
        # (node, report, partition, had rows) of the totals records taken in
        self._seen: list[tuple[str, ReportSeen, int, bool]] = []
        self._clock = clock
        self.totals = 0  # user totals taken in (a day's and a month's per row)
        self.quota_states = 0  # quota rows taken in
        self.commands = 0  # commands taken in

    def __len__(self) -> int:
        return len(self._traffic) + len(self._quota) + len(self._commands) + len(self._health)

    def update(self, value: bytes, origin: Origin = NO_ORIGIN) -> bool:
        """Coalesce one totals record into the held points; False if it is malformed.

        `origin` (topic, partition, offset) names the record in dead letters of its points.
        """
        try:
            batch = TotalsBatch.decode(value)
        except ValidationError:
            return False
        traffic = self._traffic
        node, day, month = batch.node_id, batch.day, batch.month
        for row in batch.totals:
            held = (row, origin)
            user = row[0]
            traffic[("day", user, node, day)] = held
            traffic[("month", user, node, month)] = held
        self.totals += 2 * len(batch.totals)
        if batch.report is not None:
            self._seen.append((node, batch.report, origin[1], bool(batch.totals)))
        return True

    def update_quota(self, value: bytes, origin: Origin = NO_ORIGIN) -> bool:
        """Coalesce one `QuotaBatch` record: each user's latest row replaces the held one.

        False if the record is malformed (then nothing changes).
        """
        try:
            batch = QuotaBatch.decode(value)
        except ValidationError:
            return False
        quota = self._quota
        for state in batch.states:
            quota[state[0]] = (state, origin)
        self.quota_states += len(batch.states)
        return True

    def add_command(self, value: bytes, origin: Origin = NO_ORIGIN) -> bool:
        """Hold one `Command` record as a point of its own; False if it is malformed."""
        try:
            command = Command.decode(value)
        except ValidationError:
            return False
        self._commands.append((command, origin))
        self.commands += 1
        return True

    def add_snapshot(self, value: bytes, origin: Origin = NO_ORIGIN) -> bool:
        """Hold one `PipelineSnapshot` record as a `pipeline` point; False if it is malformed."""
        try:
            snapshot = PipelineSnapshot.decode(value)
        except ValidationError:
            return False
        self._health.append(snapshot_point(snapshot, origin))
        return True

    def add_health(self, points: Iterable[HealthPoint]) -> None:
        """Hold the sink's own `node_status` and `pipeline` points for the next write."""
        self._health.extend(points)

    def take_seen(self) -> list[tuple[str, ReportSeen, int, bool]]:
        """The reports of the totals records taken in since the last call: (node, report,
        partition, whether the record had rows)."""
        seen, self._seen = self._seen, []
        return seen

    def points(self) -> Iterator[str]:
        """The held points as line protocol, without letting go of them."""
        for key, (row, _) in self._traffic.items():
            yield traffic_line(key, *_period_total(key[0], row))
        now = int(self._clock())
        for state, _ in self._quota.values():
            yield quota_usage_line(state, now)
        for command, _ in self._commands:
            yield quota_event_line(command)
        for point in self._health:
            yield point.line

    def take(self) -> list[HeldPoint]:
        """The held points with their origin; the coalescer is empty afterwards."""
        held: list[HeldPoint] = [
            TrafficPoint(traffic_line(key, *_period_total(key[0], row)), key, row, origin)
            for key, (row, origin) in self._traffic.items()
        ]
        now = int(self._clock())
        held += [QuotaUsagePoint(quota_usage_line(state, now), state, origin)
                 for state, origin in self._quota.values()]
        held += [QuotaEventPoint(quota_event_line(command), command, origin)
                 for command, origin in self._commands]
        held += self._health
        self._traffic.clear()
        self._quota.clear()
        self._commands.clear()
        self._health = []
        return held

    def drain(self) -> list[str]:
        """The held points as line protocol; the coalescer is empty afterwards."""
        return [point.line for point in self.take()]


class WriteRefused(Exception):
    """InfluxDB refused a write for what it holds (see `PERMANENT_STATUSES`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def dropped(self) -> int | None:
        """How many points InfluxDB dropped, where it says (1.x `partial write: ... dropped=N`)."""
        found = re.search(r"\bdropped=(\d+)\s*$", self.message)
        return int(found.group(1)) if found else None

    def unparsable(self, lines: Iterable[str]) -> dict[str, str]:
        """The lines the message names as unparsable (1.x names them), with the parser's reason."""
        named: dict[str, str] = {}
        for line in lines:
            mark = f"unable to parse '{line}': "
            at = self.message.find(mark)
            if at >= 0:
                rest = self.message[at + len(mark):].split("\n", 1)[0]
                named[line] = "unable to parse: " + re.sub(r"\s*dropped=\d+\s*$", "", rest)
        return named

    def reason(self) -> str:
        """The refusal for a dead letter: no line (it holds the values), no point count."""
        message = re.sub(r"unable to parse '.*?': ", "unable to parse: ", self.message)
        message = re.sub(r"\s*dropped=\d+\s*$", "", message)
        return f"InfluxDB refused the point (HTTP {self.status}): {message[:500]}"


def refusal(exc: BaseException) -> WriteRefused | None:
    """The permanent refusal `exc` stands for, or None if the write may succeed when retried."""
    if isinstance(exc, WriteRefused):
        return exc
    if not isinstance(exc, ApiException) or exc.status not in PERMANENT_STATUSES:
        return None
    return WriteRefused(exc.status, _error_message(exc))


def _error_message(exc: ApiException) -> str:
    """InfluxDB's own words: `error` (1.x) or `message` (2.x) of the body, or the header."""
    body: Any = exc.body
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if isinstance(body, str) and body.strip():
        try:
            parsed = json.loads(body)
        except ValueError:
            return body.strip()
        if isinstance(parsed, dict):
            for key in ("error", "message"):
                if isinstance(parsed.get(key), str):
                    return str(parsed[key])
        return body.strip()
    headers: Any = exc.headers or {}
    for header in ("X-Influxdb-Error", "X-Platform-Error-Code"):
        value = headers.get(header)
        if value:
            return str(value)
    return str(exc.reason or "no reason given")


class InfluxWriter:
    """The only code that talks to InfluxDB: writes lines, creates the database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client = InfluxDBClientAsync(
            url=settings.influx_url,
            token=settings.influx_token.get_secret_value(),
            org=settings.influx_org,
            enable_gzip=True,
            timeout=30_000,
        )
        self._write_api = self._client.write_api()

    async def write(self, lines: Sequence[str], precision: Precision = "s") -> None:
        """Write lines whose timestamps are in `precision` in one request.

        Raises `WriteRefused` when InfluxDB refuses the points themselves, and
        whatever the client raised when the write may succeed if tried again.
        """
        try:
            await self._write_api.write(
                bucket=self.settings.influx_bucket,
                record="\n".join(lines),
                write_precision=precision,  # type: ignore[arg-type]
            )
        except ApiException as exc:
            refused = refusal(exc)
            if refused is not None:
                raise refused from None
            raise

    async def ensure_database(self) -> None:
        """Create the 1.x database; raises only while InfluxDB does not answer.

        InfluxDB 2.x refuses CREATE DATABASE: there the bucket must exist already,
        and a refusal is logged and otherwise ignored.
        """
        s = self.settings
        influxql = InfluxQL(s.influx_url, s.influx_bucket, s.influx_token.get_secret_value(),
                            timeout=5.0)  # short: a stop request waits for this thread
        try:
            await asyncio.to_thread(influxql.create_database)
        except InfluxUnreachable:
            raise
        except InfluxQLError as exc:
            log.warning("could not create database %r (%s); writing to it as it is",
                        self.settings.influx_bucket, exc)

    async def last_node_status(self) -> list[tuple[str, dict[str, Any]]]:
        """Each node's last `node_status` point within the forget window (`seed_query`);
        raises `InfluxQLError` while InfluxDB does not answer."""
        s = self.settings
        influxql = InfluxQL(s.influx_url, s.influx_bucket, s.influx_token.get_secret_value(),
                            timeout=5.0)  # short: a stop request waits for this thread
        found = await asyncio.to_thread(
            influxql.query, seed_query(s.node_forget_days), "ms")
        return [(series.tags.get("node_id", ""), row) for series in found for row in series.rows]

    async def close(self) -> None:
        """Release the HTTP session."""
        await self._client.close()  # type: ignore[no-untyped-call]


class _Stopped(Exception):
    """A stop request ended a write or a wait; what was not written is not committed."""


class _OutageLog:
    """One warning when InfluxDB becomes unreachable, one per interval while it stays so,
    and one when it answers again, with how long it took."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.attempts = 0
        self._last = 0.0

    def failed(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        self.attempts += 1
        if self.since is None:
            self.since = self._last = now
            log.warning("InfluxDB unreachable (%s: %s); holding offsets, retrying with backoff",
                        what, _brief(exc))
        elif now - self._last >= OUTAGE_LOG_INTERVAL_S:
            self._last = now
            log.warning("InfluxDB still unreachable after %.0fs, %d failed attempts (%s)",
                        now - self.since, self.attempts, _brief(exc))

    def recovered(self) -> None:
        if self.since is not None:
            log.warning("InfluxDB recovered after %.1fs, %d failed attempts",
                        time.monotonic() - self.since, self.attempts)
        self.since, self.attempts = None, 0


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


Contract = type[TotalsBatch] | type[QuotaBatch] | type[Command] | type[PipelineSnapshot]


class _Input(NamedTuple):
    """A topic the sink consumes: the contract of its records and how the coalescer holds one."""

    contract: Contract
    hold: Callable[[bytes, Origin], bool]


def _invalid_detail(contract: Contract, value: bytes | None) -> str:
    """Why a record is not a `contract` record, for its dead letter (only on that path).

    >>> _invalid_detail(Command, b'{"user_id": "alice"}')
    'not a Command record: command_id: Field required'
    """
    problem = "no value" if value is None else "malformed"
    if value is not None:
        try:
            contract.decode(value)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            # a union's members are named by their types in `loc`: left out
            where = ".".join(str(part) for part in error["loc"] if "[" not in str(part))
            problem = f"{where}: {error['msg']}" if where else error["msg"]
    return f"not a {contract.__name__} record: {problem}"[:500]


class InfluxSink:
    """Consumes totals, quota states and commands and writes them to InfluxDB, never dropping one.

    The runner: Kafka in (one consumer of `<prefix>.totals`, `.quota`, `.control` and
    `.metrics`),
    a `Coalescer` in between, an `InfluxWriter` out. Offsets are committed only after
    InfluxDB accepted every point consumed before them, or refused it for good and it
    went to `<prefix>.dead`.
    """

    def __init__(self, settings: Settings, *, max_backoff_s: float = 30.0) -> None:
        self.settings = settings
        self.stats = SinkStats()
        self.max_backoff_s = max_backoff_s
        self.coalescer = Coalescer()
        self._stopping = asyncio.Event()
        self._stop_deadline: float | None = None
        self._outage = _OutageLog()
        self.health = SinkHealth(settings)

    def _inputs(self) -> dict[str, _Input]:
        """The topics the sink consumes, each with its contract and the coalescer's method."""
        topics, coalescer = self.settings.topics, self.coalescer
        return {
            topics.totals: _Input(TotalsBatch, coalescer.update),
            topics.quota: _Input(QuotaBatch, coalescer.update_quota),
            topics.control: _Input(Command, coalescer.add_command),
            topics.metrics: _Input(PipelineSnapshot, coalescer.add_snapshot),
        }

    def stop(self) -> None:
        """Ask `run()` to flush what it holds and return, within a few seconds."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + STOP_GRACE_S
        self._stopping.set()

    async def _until_stopped(self, work: Awaitable[T]) -> T:
        """Await `work`; once stop was asked and the grace period is over, cancel it."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                left = max((self._stop_deadline or 0.0) - time.monotonic(), 0.0)
                await asyncio.wait({task}, timeout=left)
            if not task.done():
                raise _Stopped
            return task.result()
        finally:
            stopping.cancel()
            task.cancel()

    async def _idle(self, consumer: AIOKafkaConsumer | None, seconds: float) -> None:
        """Wait `seconds` with the consumer paused; raise `_Stopped` as soon as stop is asked.

        The paused consumer is polled now and then: aiokafka leaves the group when
        `getmany` is not called for `max_poll_interval_ms` (5 min). A poll returns
        records only of a partition that a rebalance assigned after the last pause;
        they are not held or written yet, so the consumer is moved back to the first of
        them (`seek`) and fetches them again once it resumes: none is skipped, and no
        commit covers them before they are written.
        """
        deadline = time.monotonic() + seconds
        while True:
            if self._stopping.is_set():
                raise _Stopped
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if consumer is None:
                try:
                    await asyncio.wait_for(self._stopping.wait(), left)
                except TimeoutError:
                    return
                continue
            consumer.pause(*consumer.assignment())
            fetched = await consumer.getmany(timeout_ms=max(int(min(left, 0.5) * 1000), 1))
            for tp, records in fetched.items():
                if records:
                    consumer.seek(tp, records[0].offset)
                    consumer.pause(tp)

    async def _write_all(
        self, writer: InfluxWriter, consumer: AIOKafkaConsumer, lines: list[str],
        precision: Precision,
    ) -> dict[str, str]:
        """Write the lines (all of `precision`); the refused ones come back with InfluxDB's reason.

        A refused chunk is not sent again as a whole: the lines InfluxDB names are
        refused; where it names none, a chunk InfluxDB dropped entirely is refused and
        any other is halved until each refused line stands alone. (InfluxDB 1.x writes
        the rest of a partially refused chunk; writing those points again is harmless.)
        Other errors are retried with backoff while the consumer is paused; raises
        `_Stopped` when stop is asked before everything was written.
        """
        refused: dict[str, str] = {}
        pending = list(reversed(list(_chunks(lines, self.settings.sink_batch_lines))))
        backoff = min(0.5, self.max_backoff_s)
        paused = False
        try:
            while pending:
                chunk = pending.pop()
                began = time.monotonic()
                try:
                    await self._until_stopped(writer.write(chunk, precision))
                except _Stopped:
                    raise
                except Exception as exc:  # the client raises many types
                    self.health.write_latency.add((time.monotonic() - began) * 1000)
                    refused_exc = refusal(exc)
                    if refused_exc is None:  # passing: InfluxDB may take it later
                        pending.append(chunk)
                        self.stats.failures += 1
                        self._outage.failed("write", exc)
                        paused = True
                        await self._idle(consumer, backoff)
                        backoff = min(backoff * 2, self.max_backoff_s)
                        if backoff >= self.max_backoff_s:
                            try:
                                await self._until_stopped(writer.ensure_database())
                            except _Stopped:
                                raise
                            except Exception as db_exc:
                                log.debug("database check failed: %s", db_exc)
                        continue
                    self._outage.recovered()
                    self.stats.writes += 1
                    named = refused_exc.unparsable(chunk)
                    if named:
                        refused.update(named)
                        rest = [line for line in chunk if line not in named]
                        if rest:
                            pending.append(rest)
                    elif len(chunk) == 1 or refused_exc.dropped == len(chunk):
                        refused.update(dict.fromkeys(chunk, refused_exc.reason()))
                    else:
                        middle = len(chunk) // 2
                        pending += [chunk[middle:], chunk[:middle]]
                    continue
                self.health.write_latency.add((time.monotonic() - began) * 1000)
                self._outage.recovered()
                self.stats.writes += 1
                backoff = min(0.5, self.max_backoff_s)
        finally:
            if paused:
                consumer.resume(*consumer.assignment())
        self.stats.points += len(lines) - len(refused)
        return refused

    async def _dead_letter(
        self, dead: AIOKafkaProducer, held: list[HeldPoint], refused: dict[str, str]
    ) -> None:
        """Send every refused point to `<prefix>.dead`, and wait until Kafka has them all."""
        topics = self.settings.topics
        sent = []
        for point in held:
            reason = refused.get(point.line)
            if reason is None:
                continue
            topic, partition, offset = point.origin
            sent.append(await dead.send(
                topics.dead,
                value=DeadLetter.encode(
                    "invalid", reason, topic=topic, partition=partition,
                    offset=offset, payload=point.line.encode(), readings=(point.reading(),),
                ),
                partition=partition if partition >= 0 else None,
            ))
        await asyncio.gather(*sent)
        self.stats.refused += len(sent)
        reasons = sorted(set(refused.values()))
        log.warning("InfluxDB refused %d point(s), sent to %s: %s%s", len(sent), topics.dead,
                    "; ".join(reasons[:3]), " ..." if len(reasons) > 3 else "")

    async def run(self) -> None:
        """Consume and write until `stop()`; commits only what InfluxDB has accepted."""
        settings = self.settings
        consumer = AIOKafkaConsumer(
            *self._inputs(),
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.topics.influx_sink_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES * 2,
            fetch_max_bytes=MAX_MESSAGE_BYTES * 4,
        )
        dead = AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
        )
        writer = InfluxWriter(settings)
        endpoint = metrics.serve(settings.sink_metrics_port, settings.metrics_address)
        await consumer.start()
        await dead.start()
        try:
            await self._serve(consumer, dead, writer, endpoint)
        except _Stopped:
            log.info("stopped before everything held was written; those offsets stay")
        finally:
            await consumer.stop()
            await dead.stop()
            await writer.close()
            if endpoint is not None:
                endpoint.close()

    async def _serve(
        self, consumer: AIOKafkaConsumer, dead: AIOKafkaProducer, writer: InfluxWriter,
        endpoint: metrics.MetricsEndpoint | None = None,
    ) -> None:
        settings = self.settings
        coalescer = self.coalescer
        inputs = self._inputs()
        while True:
            try:
                await self._until_stopped(writer.ensure_database())
                self._outage.recovered()
                break
            except _Stopped:
                raise
            except Exception as exc:
                self._outage.failed("database check", exc)
                await self._idle(None, 1.0)
        last_flush = last_status = time.monotonic()
        while not self._stopping.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=20_000)
            for tp, records in batches.items():
                contract, hold = inputs[tp.topic]
                for record in records:
                    self.stats.records += 1
                    origin = (tp.topic, tp.partition, record.offset)
                    if record.value is None or not hold(record.value, origin):
                        self.stats.invalid += 1
                        await dead.send_and_wait(
                            settings.topics.dead,
                            value=DeadLetter.encode(
                                "invalid", _invalid_detail(contract, record.value),
                                topic=tp.topic, partition=tp.partition, offset=record.offset,
                                payload=record.value,
                            ),
                            partition=tp.partition,
                        )
            self.stats.totals = coalescer.totals
            self.stats.quota_states = coalescer.quota_states
            self.stats.commands = coalescer.commands
            now = time.monotonic()
            if (
                now - last_flush >= settings.sink_flush_interval_s
                or len(coalescer) >= settings.sink_batch_lines * 4
            ):
                await self._flush(writer, consumer, dead)
                last_flush = now
            if now - last_status >= settings.status_interval_s:
                last_status = now
                await self._flush(writer, consumer, dead)  # the node book is up to date
                await self._write_health(writer, consumer, endpoint)
                await self._flush(writer, consumer, dead)
        await self._flush(writer, consumer, dead)

    async def _write_health(
        self, writer: InfluxWriter, consumer: AIOKafkaConsumer,
        endpoint: metrics.MetricsEndpoint | None,
    ) -> None:
        """Hold this interval's `node_status` points and the sink's `pipeline` point."""
        health, stats = self.health, self.stats
        if not health.seeded:
            try:
                health.seed(await writer.last_node_status())
            except InfluxQLError as exc:  # nodes are written once InfluxDB has answered
                log.warning("cannot read the last node_status points yet: %s", _brief(exc))
        points = health.points(
            int(time.time() * 1000), await _consumer_lags(consumer),
            dead_letters=stats.invalid + stats.refused, write_retries=stats.failures,
            points_written=stats.points,
        )
        self.coalescer.add_health(points)
        if endpoint is not None and health.snapshot is not None:
            endpoint.update(health.snapshot)


    async def _flush(
        self, writer: InfluxWriter, consumer: AIOKafkaConsumer, dead: AIOKafkaProducer
    ) -> None:
        """Write everything held, dead-letter what InfluxDB refused, then commit.

        Raises `_Stopped`, committing nothing, when stop is asked before all was written.
        """
        held = self.coalescer.take()
        seen = self.coalescer.take_seen()
        if held:
            refused: dict[str, str] = {}
            for precision in PRECISIONS:
                lines = [point.line for point in held if point.precision == precision]
                if lines:
                    refused |= await self._write_all(writer, consumer, lines, precision)
            if refused:
                await self._dead_letter(dead, held, refused)
        if seen:
            self.health.written(seen, int(time.time() * 1000))
        try:
            await consumer.commit()
        except CommitFailedError as exc:  # a rebalance took the partitions; they are re-read
            log.warning("offset commit failed after a rebalance: %s", exc)


def run_sink(settings: Settings) -> None:
    """Run the InfluxDB sink in the foreground until SIGINT/SIGTERM."""
    import signal

    sink = InfluxSink(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sink.stop)
        status = asyncio.create_task(_log_status(sink))
        try:
            await sink.run()
        finally:
            status.cancel()

    asyncio.run(main())


async def _consumer_lags(consumer: AIOKafkaConsumer) -> dict[tuple[str, int], int] | None:
    """The group's lag on each partition assigned to `consumer`: end offset - committed.

    None when Kafka does not answer within a few seconds (the point then has no lag).
    """
    assigned = sorted(consumer.assignment())
    try:
        async with asyncio.timeout(5.0):
            ends = await consumer.end_offsets(assigned)
            lags = {}
            for tp in assigned:
                committed = await consumer.committed(tp)
                lags[(tp.topic, tp.partition)] = max(ends.get(tp, 0) - (committed or 0), 0)
            return lags
    except (KafkaError, TimeoutError) as exc:
        log.debug("consumer lag unknown for now: %s", exc)
        return None


async def _log_status(sink: InfluxSink) -> None:
    while True:
        await asyncio.sleep(10.0)
        log.info("%s", sink.stats.line())
