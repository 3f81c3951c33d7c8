"""The InfluxDB sink: `<prefix>.totals` in, `traffic_daily` and `traffic_monthly` points out.

Each point holds a period's running total, so writing the same series and time
again replaces it and redelivery never double-counts. The sink coalesces: per
flush it writes the latest total of each (user, node, period) once. Three parts:
the pure `Coalescer` (records in, lines out), the `InfluxWriter` (the only code
that talks to InfluxDB) and the runner `InfluxSink` (Kafka in, commits). It commits
its Kafka offsets only after InfluxDB accepted everything consumed before them, or
refused it for good: a point InfluxDB refuses for what it is (a field type conflict,
a parse error, a too large body) goes to `<prefix>.dead` and the rest of the batch
is written. While InfluxDB is down (no answer, a timeout, 5xx, 429) it pauses its
partitions, keeps its group membership, retries with backoff and catches up
afterwards; a stop request ends the retries at once, without committing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import ValidationError

from quotaflow.core.contracts import DeadLetter, PeriodKind, TotalsBatch
from quotaflow.core.settings import Settings
from quotaflow.core.topics import MAX_MESSAGE_BYTES
from quotaflow.sinks.influxql import InfluxQL, InfluxQLError, InfluxUnreachable

log = logging.getLogger("quotaflow.sinks.influx")

MEASUREMENTS: dict[PeriodKind, str] = {"day": "traffic_daily", "month": "traffic_monthly"}

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
SeriesKey = tuple[PeriodKind, str, str, int]  # period, user, node, start
Origin = tuple[int, int]  # partition and offset of the totals record that set a point


def _escape_tag(value: str) -> str:
    r"""A tag value for InfluxDB 1.x line protocol: `,`, `=` and space get a backslash.

    A backslash is not escaped: 1.x reads a character after a backslash as escaped,
    whatever precedes the backslash, and unescapes only `\,`, `\=` and `\ `, so it
    would keep `\\` as two backslashes. That also makes a tag value that ends with a
    backslash, or has one before a space, impossible to write; the contracts refuse
    such identifiers (`quotaflow.core.contracts.identifier_problem`).

    >>> print(_escape_tag("DOMAIN\\alice,b=c d"))
    DOMAIN\alice\,b\=c\ d
    """
    return value.replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def point_line(key: SeriesKey, up: int, down: int) -> str:
    """The line-protocol line (second precision) of one series' total."""
    period, user, node, start = key
    return (
        f"{MEASUREMENTS[period]},node_id={_escape_tag(node)},user_id={_escape_tag(user)} "
        f"up_bytes={up}i,down_bytes={down}i,total_bytes={up + down}i {start}"
    )


def line_protocol(points: Mapping[SeriesKey, tuple[int, int]]) -> Iterator[str]:
    """Line-protocol lines (second precision) for coalesced totals.

    >>> print(next(line_protocol({("day", "al ice", "n1", 1763683200): (1, 2)})))
    traffic_daily,node_id=n1,user_id=al\\ ice up_bytes=1i,down_bytes=2i,total_bytes=3i 1763683200
    """
    for key, (up, down) in points.items():
        yield point_line(key, up, down)


def _chunks(lines: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(lines), size):
        yield list(lines[start : start + size])


class HeldPoint(NamedTuple):
    """A coalesced point: its line, its series, its total and where the total came from."""

    line: str
    key: SeriesKey
    up: int
    down: int
    origin: Origin

    def reading(self) -> dict[str, int | str]:
        """The point as a dead letter's reading."""
        period, user, node, start = self.key
        return {"user_id": user, "node_id": node, "period": period, "start": start,
                "up": self.up, "down": self.down}


@dataclass
class SinkStats:
    """Counters for the status line."""

    records: int = 0
    totals: int = 0
    points: int = 0
    writes: int = 0
    failures: int = 0
    invalid: int = 0
    refused: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        """One line for logs and the status display."""
        return (
            f"records={self.records} totals={self.totals} points={self.points} "
            f"writes={self.writes} failures={self.failures} invalid={self.invalid} "
            f"refused={self.refused}"
        )


class Coalescer:
    """The latest total of each series (period, user, node, start) since the last drain.

    Pure state: totals records go in, line-protocol lines come out, one per series.

    >>> coalescer = Coalescer()
    >>> coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 1, 2, 10, 20)]))
    True
    >>> coalescer.update(TotalsBatch.encode("n1", 86400, 0, [("alice", 5, 6, 14, 24)]))
    True
    >>> coalescer.update(b'{"node_id": "n1"}')  # not a TotalsBatch: nothing changes
    False
    >>> len(coalescer), coalescer.totals
    (2, 4)
    >>> for line in coalescer.drain():
    ...     print(line)
    traffic_daily,node_id=n1,user_id=alice up_bytes=5i,down_bytes=6i,total_bytes=11i 86400
    traffic_monthly,node_id=n1,user_id=alice up_bytes=14i,down_bytes=24i,total_bytes=38i 0
    >>> len(coalescer), coalescer.drain()
    (0, [])
    """

    def __init__(self) -> None:
        self._latest: dict[SeriesKey, tuple[int, int, Origin]] = {}
        self.totals = 0  # user totals taken in (a day's and a month's per row)

    def __len__(self) -> int:
        return len(self._latest)

    def update(self, value: bytes, origin: Origin = (-1, -1)) -> bool:
        """Coalesce one totals record into the held points; False if it is malformed.

        `origin` (partition, offset) names the record in dead letters of its points.
        """
        try:
            batch = TotalsBatch.decode(value)
        except ValidationError:
            return False
        latest = self._latest
        node, day, month = batch.node_id, batch.day, batch.month
        for user, day_up, day_down, month_up, month_down in batch.totals:
            latest[("day", user, node, day)] = (day_up, day_down, origin)
            latest[("month", user, node, month)] = (month_up, month_down, origin)
        self.totals += 2 * len(batch.totals)
        return True

    def points(self) -> Iterator[str]:
        """The held points as line protocol, without letting go of them."""
        for key, (up, down, _) in self._latest.items():
            yield point_line(key, up, down)

    def take(self) -> list[HeldPoint]:
        """The held points with their series and origin; the coalescer is empty afterwards."""
        held = [HeldPoint(point_line(key, up, down), key, up, down, origin)
                for key, (up, down, origin) in self._latest.items()]
        self._latest.clear()
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

    async def write(self, lines: Sequence[str]) -> None:
        """Write lines (second precision) in one request.

        Raises `WriteRefused` when InfluxDB refuses the points themselves, and
        whatever the client raised when the write may succeed if tried again.
        """
        try:
            await self._write_api.write(
                bucket=self.settings.influx_bucket,
                record="\n".join(lines),
                write_precision=WritePrecision.S,  # type: ignore[arg-type]
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


class InfluxSink:
    """Consumes totals, coalesces them and writes them to InfluxDB, never dropping one.

    The runner: Kafka in, a `Coalescer` in between, an `InfluxWriter` out. Offsets
    are committed only after InfluxDB accepted every point consumed before them,
    or refused it for good and it went to `<prefix>.dead`.
    """

    def __init__(self, settings: Settings, *, max_backoff_s: float = 30.0) -> None:
        self.settings = settings
        self.stats = SinkStats()
        self.max_backoff_s = max_backoff_s
        self.coalescer = Coalescer()
        self._stopping = asyncio.Event()
        self._stop_deadline: float | None = None
        self._outage = _OutageLog()

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
        self, writer: InfluxWriter, consumer: AIOKafkaConsumer, lines: list[str]
    ) -> dict[str, str]:
        """Write the lines; the refused ones come back with InfluxDB's reason.

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
                try:
                    await self._until_stopped(writer.write(chunk))
                except _Stopped:
                    raise
                except Exception as exc:  # the client raises many types
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
            partition, offset = point.origin
            sent.append(await dead.send(
                topics.dead,
                value=DeadLetter.encode(
                    "invalid", reason, topic=topics.totals, partition=partition,
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
            settings.topics.totals,
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
        await consumer.start()
        await dead.start()
        try:
            await self._serve(consumer, dead, writer)
        except _Stopped:
            log.info("stopped before everything held was written; those offsets stay")
        finally:
            await consumer.stop()
            await dead.stop()
            await writer.close()

    async def _serve(
        self, consumer: AIOKafkaConsumer, dead: AIOKafkaProducer, writer: InfluxWriter
    ) -> None:
        settings = self.settings
        coalescer = self.coalescer
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
        last_flush = time.monotonic()
        while not self._stopping.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=20_000)
            for tp, records in batches.items():
                for record in records:
                    self.stats.records += 1
                    origin = (tp.partition, record.offset)
                    if record.value is None or not coalescer.update(record.value, origin):
                        self.stats.invalid += 1
                        await dead.send_and_wait(
                            settings.topics.dead,
                            value=DeadLetter.encode(
                                "invalid", "not a TotalsBatch record", topic=tp.topic,
                                partition=tp.partition, offset=record.offset,
                                payload=record.value,
                            ),
                            partition=tp.partition,
                        )
            self.stats.totals = coalescer.totals
            now = time.monotonic()
            if (
                now - last_flush >= settings.sink_flush_interval_s
                or len(coalescer) >= settings.sink_batch_lines * 4
            ):
                await self._flush(writer, consumer, dead)
                last_flush = now
        await self._flush(writer, consumer, dead)

    async def _flush(
        self, writer: InfluxWriter, consumer: AIOKafkaConsumer, dead: AIOKafkaProducer
    ) -> None:
        """Write everything held, dead-letter what InfluxDB refused, then commit.

        Raises `_Stopped`, committing nothing, when stop is asked before all was written.
        """
        held = self.coalescer.take()
        if held:
            refused = await self._write_all(writer, consumer, [point.line for point in held])
            if refused:
                await self._dead_letter(dead, held, refused)
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


async def _log_status(sink: InfluxSink) -> None:
    while True:
        await asyncio.sleep(10.0)
        log.info("%s", sink.stats.line())
