"""The InfluxDB sink's health points: `node_status` of every node, `pipeline` of every process.

`SinkHealth` keeps what the sink learns on the way (the `ReportSeen` of each totals
record it wrote, the time of each InfluxDB write, each report's freshness) and
turns it, every `QUOTAFLOW_STATUS_INTERVAL_S`, into points: one `node_status` point
per node it knows (so a node that stopped reporting shows `alive=false`) and the
sink's own `pipeline` point. The worker's `pipeline` points come as
`PipelineSnapshot` records on `<prefix>.metrics` and are written as they are
(`snapshot_point`). docs/influx-schema.md describes the fields.

After a restart the sink reads the last `node_status` point of each node written
within `QUOTAFLOW_NODE_FORGET_DAYS` back from InfluxDB (`seed_query`), so a node
that died while the sink was down is still written, as dead.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from quotaflow.core.contracts import ReportSeen
from quotaflow.core.health import (
    EpochCount,
    NodeBook,
    NodeStatus,
    PipelineSnapshot,
    Samples,
    dead_letter_fields,
    lag_fields,
)
from quotaflow.core.settings import Settings
from quotaflow.sinks.lines import point_line

NODE_STATUS = "node_status"
PIPELINE = "pipeline"
NS_PER_MS = 1_000_000


class HealthPoint(NamedTuple):
    """A `node_status` or `pipeline` point (nanosecond precision), and the record behind it.

    The sink's own points have no record: their origin is ("", -1, -1).
    """

    line: str
    origin: tuple[str, int, int]
    measurement: str
    tags: dict[str, str]

    @property
    def precision(self) -> Literal["ns"]:
        return "ns"

    def reading(self) -> dict[str, int | str]:
        """The point as a dead letter's reading: its measurement and tags (the line has all)."""
        return {"measurement": self.measurement, **self.tags}


def snapshot_point(snapshot: PipelineSnapshot, origin: tuple[str, int, int]) -> HealthPoint:
    """The `pipeline` point of a snapshot, at its time.

    >>> snapshot = PipelineSnapshot(process="worker", host="w1", at=1_700_000_000_123,
    ...                             fields={"lag": 2, "readings_per_s": 10.5})
    >>> print(snapshot_point(snapshot, ("qf.metrics", 0, 9)).line)
    pipeline,host=w1,process=worker lag=2i,readings_per_s=10.5 1700000000123000000
    """
    tags = {"process": snapshot.process, "host": snapshot.host}
    return HealthPoint(point_line(PIPELINE, tags, snapshot.fields, snapshot.at * NS_PER_MS),
                       origin, PIPELINE, tags)


def seed_query(forget_days: float) -> str:
    """The InfluxQL that reads each node's last `node_status` point (one point, all fields).

    >>> seed_query(7)
    'SELECT last(received_at) AS received_at, observed_at, epoch, readings, restarts, \
interval_s FROM node_status WHERE time > now() - 604800s GROUP BY node_id'
    """
    return ("SELECT last(received_at) AS received_at, observed_at, epoch, readings, restarts, "
            f"interval_s FROM {NODE_STATUS} WHERE time > now() - {int(forget_days * 86400)}s "
            "GROUP BY node_id")


def seeded_status(row: dict[str, Any]) -> NodeStatus | None:
    """A node's status from its last `node_status` point (a `seed_query` row); None if incomplete.

    >>> seeded_status({"received_at": 5100, "observed_at": 5000, "epoch": 7, "readings": 3,
    ...                "restarts": 1, "interval_s": 60.0})
    NodeStatus(observed_at=5000, received_at=5100, epoch=7, seq=-1, \
readings={-1: 3}, interval_ms=60000, epochs=EpochCount(base=1, floor=7, epochs=set()))
    """
    needed = ("received_at", "observed_at", "epoch", "readings", "restarts")
    if any(not isinstance(row.get(name), int) for name in needed):
        return None
    interval = row.get("interval_s")
    return NodeStatus(
        observed_at=row["observed_at"], received_at=row["received_at"], epoch=row["epoch"],
        seq=-1, readings={-1: row["readings"]},
        interval_ms=None if not isinstance(interval, (int, float)) else round(interval * 1000),
        epochs=EpochCount.seeded(row["restarts"], row["epoch"]),
    )


class SinkHealth:
    """The sink's node book, write latencies and freshness, and the points made of them.

    >>> settings = Settings(topic_prefix="qf", node_interval_s=60.0)
    >>> health = SinkHealth(settings, host="s1")
    >>> seen = ReportSeen(epoch=1, seq=4, observed_at=1_000_000, received_at=1_000_500,
    ...                   readings=20)
    >>> health.seed([])  # nothing in InfluxDB yet
    >>> health.written([("n1", seen, 2, True)], now_ms=1_002_000)  # written 1.5 s after
    >>> health.write_latency.add(12.0)
    >>> points = health.points(now_ms=1_010_500, lags={("qf.totals", 2): 1}, dead_letters=0,
    ...                        write_retries=1, points_written=44)
    >>> for point in points:  # doctest: +NORMALIZE_WHITESPACE
    ...     print(point.line.replace(",", ", "))  # (a space after each comma, to wrap here)
    node_status, node_id=n1 observed_at=1000000i, received_at=1000500i, epoch=1i,
    readings=20i, restarts=0i, age_s=10.0, alive=true 1010500000000
    pipeline, host=s1, process=sink dead_letters_invalid=0i, dead_letters_anomaly=0i,
    dead_letters_late=0i, dead_letters_stale_epoch=0i, dead_letters_stale_seq=0i,
    dead_letters_error=0i, write_retries=1i, points_written=44i, write_latency_ms_p50=12.0,
    write_latency_ms_p99=12.0, freshness_ms_p50=1500.0, freshness_ms_p99=1500.0, lag=1i,
    lag_totals_2=1i 1010500000000
    >>> health.snapshot.fields["points_written"]
    44
    """

    def __init__(
        self, settings: Settings, *, host: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.host = host or socket.gethostname()
        self.book = NodeBook(settings.node_interval_s, settings.node_forget_days * 86400)
        self.write_latency = Samples()  # ms per InfluxDB write request
        self.freshness = Samples()  # ms from a report's append to `.raw` to its point written
        self.seeded = False
        self.snapshot: PipelineSnapshot | None = None  # the latest, for `/metrics`
        self._clock = clock

    def written(self, seen: list[tuple[str, ReportSeen, int, bool]], now_ms: int) -> None:
        """InfluxDB took the points of these totals records at `now_ms`.

        Each is (node, its `ReportSeen`, partition, whether it had totals rows): the
        book learns of the report, and a record with rows gives a freshness sample.
        """
        for node_id, report, partition, rows in seen:
            self.book.update(node_id, report, partition)
            if rows:
                self.freshness.add(float(now_ms - report.received_at))

    def seed(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """Take each node's last `node_status` point (node, `seed_query` row) unless known."""
        for node_id, row in rows:
            status = seeded_status(row)
            if status is not None:
                self.book.seed(node_id, status)
        self.seeded = True

    def points(
        self, now_ms: int, lags: dict[tuple[str, int], int] | None, *, dead_letters: int,
        write_retries: int, points_written: int,
    ) -> list[HealthPoint]:
        """A `node_status` point per node (once seeded) and the sink's `pipeline` point."""
        points = []
        if self.seeded:
            for node_id, status in self.book.rows(now_ms):
                tags = {"node_id": node_id}
                points.append(HealthPoint(
                    point_line(NODE_STATUS, tags, status, now_ms * NS_PER_MS),
                    ("", -1, -1), NODE_STATUS, tags,
                ))
        fields: dict[str, int | float] = {
            **dead_letter_fields({"invalid": dead_letters}),
            "write_retries": write_retries,
            "points_written": points_written,
            **self.write_latency.take("write_latency_ms"),
            **self.freshness.take("freshness_ms"),
        }
        if lags is not None:
            fields |= lag_fields(self.settings.topic_prefix, lags)
        self.snapshot = PipelineSnapshot(process="sink", host=self.host, at=now_ms, fields=fields)
        points.append(snapshot_point(self.snapshot, ("", -1, -1)))
        return points
