"""The worker's `pipeline` snapshot: what it billed, refused and issued, and its lag.

Built every `QUOTAFLOW_STATUS_INTERVAL_S` (default 10 s) by the worker's timer,
published to `<prefix>.metrics` for the InfluxDB sink to write, and served on
`/metrics` when `QUOTAFLOW_WORKER_METRICS_PORT` is set. Nothing here runs per
message: the counters are the `WorkerStats` the handler keeps anyway, and the lag is
the worker's consumer's own view (`consumer_lags`), without another Kafka client.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable

from quotaflow.core.health import PipelineSnapshot, Rate, dead_letter_fields, lag_fields
from quotaflow.core.settings import Settings
from quotaflow.streams.billing import WorkerStats


class WorkerHealth:
    """The worker's figures (docs/influx-schema.md, `pipeline`, process `worker`).

    >>> from quotaflow.streams.billing import WorkerStats
    >>> stats = WorkerStats(messages=10, readings=400)
    >>> health = WorkerHealth(Settings(topic_prefix="qf"), stats, host="w1", clock=lambda: 0.0)
    >>> stats.messages, stats.readings = 30, 1400
    >>> health.commands_issued = 2
    >>> stats.count_dead("late")
    >>> snapshot = health.snapshot({("qf.raw", 0): 4, ("qf.raw", 1): 0}, now=10.0)
    >>> snapshot.process, snapshot.host, snapshot.at
    ('worker', 'w1', 10000)
    >>> {k: v for k, v in snapshot.fields.items() if not k.startswith("dead_letters_")}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'readings_per_s': 100.0, 'reports_per_s': 2.0, 'readings_total': 1400,
     'reports_total': 30, 'late_reports': 0, 'stale_reports': 0, 'commands_issued': 2,
     'lag': 4, 'lag_raw_0': 4, 'lag_raw_1': 0}
    >>> snapshot.fields["dead_letters_late"], snapshot.fields["dead_letters_invalid"]
    (1, 0)
    """

    def __init__(
        self, settings: Settings, stats: WorkerStats, *, host: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.host = host or socket.gethostname()
        self.commands_issued = 0  # commands handed to the producer
        now = clock()
        self._readings = Rate(stats.readings, now)
        self._reports = Rate(stats.messages, now)

    def snapshot(self, lags: dict[tuple[str, int], int] | None, now: float) -> PipelineSnapshot:
        """The figures at `now` (Unix s); rates since the previous snapshot; no lag if None."""
        stats = self.stats
        fields: dict[str, int | float] = {
            "readings_per_s": self._readings.per_s(stats.readings, now),
            "reports_per_s": self._reports.per_s(stats.messages, now),
            "readings_total": stats.readings,
            "reports_total": stats.messages,
            "late_reports": stats.late,
            "stale_reports": stats.stale,
            "commands_issued": self.commands_issued,
            **dead_letter_fields(stats.dead_letters),
        }
        if lags is not None:
            fields |= lag_fields(self.settings.topic_prefix, lags)
        return PipelineSnapshot(process="worker", host=self.host, at=int(now * 1000),
                                fields=fields)


def consumer_lags(
    topic: str, partitions: Iterable[int], highwater: Callable[[int], int | None],
    committed: Callable[[int], int | None],
) -> dict[tuple[str, int], int]:
    """Per partition, the log's end (as the consumer last fetched it) - the group's commit.

    A partition whose end is not known yet (nothing fetched) is left out; one with no
    commit yet counts from offset 0.

    >>> ends, commits = {0: 120, 1: 50, 2: None}, {0: 100, 1: None, 2: 3}
    >>> consumer_lags("qf.raw", [0, 1, 2], ends.get, commits.get)
    {('qf.raw', 0): 20, ('qf.raw', 1): 50}
    """
    lags = {}
    for partition in partitions:
        end = highwater(partition)
        if end is not None:
            lags[(topic, partition)] = max(end - (committed(partition) or 0), 0)
    return lags
