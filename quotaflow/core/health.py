"""The pipeline's view of itself: node status and process metrics, pure.

Two things are reported to InfluxDB (docs/influx-schema.md) and, for the
processes, on a Prometheus `/metrics` endpoint:

- `node_status`: per node, the latest report the worker billed (`ReportSeen` on
  its totals records), how old it is and whether the node is alive. `NodeBook` is
  the sink's record of it.
- `pipeline`: per process (worker, sink) a `PipelineSnapshot` every status
  interval: cumulative counters, rates over the interval, percentiles over the
  interval (`Samples`), consumer lag. The worker publishes its snapshots to
  `<prefix>.metrics`; the sink writes them with its own.

>>> snapshot = PipelineSnapshot(process="worker", host="h1", at=1_000,
...                             fields={"readings_total": 12, "readings_per_s": 1.2})
>>> PipelineSnapshot.decode(snapshot.encode()) == snapshot
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from quotaflow.core.contracts import DeadReason, ReportSeen

Process = Literal["worker", "sink"]
DEAD_REASONS: tuple[DeadReason, ...] = (
    "invalid", "anomaly", "late", "stale-epoch", "stale-seq", "error",
)
COUNTER_FIELDS = frozenset({
    "readings_total", "reports_total", "late_reports", "stale_reports", "commands_issued",
    "write_retries", "points_written",
    *(f"dead_letters_{reason.replace('-', '_')}" for reason in DEAD_REASONS),
})
"""The `pipeline` fields that count since the process started; the others are gauges."""

FieldName = Annotated[StrictStr, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=200)]


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (`p` in 0..100) of non-empty `values`.

    >>> percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50), percentile(range(1, 101), 99)
    (3.0, 99)
    """
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


class Samples:
    """Values of one interval (write latencies, freshness); `take()` summarises and clears.

    >>> latency = Samples()
    >>> latency.take()  # nothing in the interval: no figures at all
    {}
    >>> for ms in (3.0, 1.0, 2.0):
    ...     latency.add(ms)
    >>> latency.take("write_latency_ms")
    {'write_latency_ms_p50': 2.0, 'write_latency_ms_p99': 3.0}
    >>> latency.take()
    {}
    """

    def __init__(self) -> None:
        self._values: list[float] = []

    def add(self, value: float) -> None:
        """Note one value."""
        self._values.append(value)

    def extend(self, values: Iterable[float]) -> None:
        """Note several values."""
        self._values.extend(values)

    def take(self, name: str = "value") -> dict[str, float]:
        """`<name>_p50` and `<name>_p99` of the values since the last take (none if empty)."""
        values, self._values = self._values, []
        if not values:
            return {}
        return {f"{name}_p50": float(percentile(values, 50)),
                f"{name}_p99": float(percentile(values, 99))}


class Rate:
    """A cumulative counter's rate per second between two readings.

    >>> rate = Rate(count=0, at=0.0)
    >>> rate.per_s(50, at=10.0), rate.per_s(50, at=20.0), rate.per_s(80, at=20.0)
    (5.0, 0.0, 0.0)
    """

    def __init__(self, count: int = 0, at: float = 0.0) -> None:
        self._count, self._at = count, at

    def per_s(self, count: int, at: float) -> float:
        """Per second since the previous call (0.0 when no time passed)."""
        elapsed = at - self._at
        rate = (count - self._count) / elapsed if elapsed > 0 else 0.0
        self._count, self._at = count, at
        return float(rate)


def dead_letter_fields(counts: dict[str, int]) -> dict[str, int]:
    """`dead_letters_<reason>` for every reason, 0 for those not seen ('-' becomes '_').

    >>> dead_letter_fields({"stale-seq": 2, "invalid": 1})["dead_letters_stale_seq"]
    2
    >>> len(dead_letter_fields({}))
    6
    """
    return {f"dead_letters_{r.replace('-', '_')}": counts.get(r, 0) for r in DEAD_REASONS}


def lag_fields(prefix: str, lags: dict[tuple[str, int], int]) -> dict[str, int]:
    """`lag` (the sum) and `lag_<topic>_<partition>` for (topic, partition) -> lag.

    The topic is named without the deployment's prefix, `.` becoming `_`:

    >>> lag_fields("qf", {("qf.raw", 0): 3, ("qf.control", 1): 0})
    {'lag': 3, 'lag_raw_0': 3, 'lag_control_1': 0}
    """
    fields = {"lag": sum(lags.values())}
    for (topic, partition), lag in sorted(lags.items(), key=lambda item: item[0][1]):
        name = topic.removeprefix(f"{prefix}.").replace(".", "_").replace("-", "_")
        fields[f"lag_{name}_{partition}"] = lag
    return fields


class PipelineSnapshot(BaseModel):
    """One process's figures at `at` (Unix ms); a record on `<prefix>.metrics`.

    `fields` are the `pipeline` measurement's fields: integers stay integers and
    floats floats, as InfluxDB fixes a field's type.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    process: Process
    host: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    at: StrictInt
    fields: dict[FieldName, StrictInt | StrictFloat]

    def encode(self) -> bytes:
        """The wire form: JSON."""
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, data: bytes | str) -> PipelineSnapshot:
        """Read and validate the wire form; raises `pydantic.ValidationError`."""
        return cls.model_validate_json(data)


MAX_EPOCHS_KEPT = 4096
"""A node's distinct epochs an `EpochCount` keeps before it keeps only the count."""


@dataclass(slots=True)
class EpochCount:
    """The restarts of a node's counters: the distinct epochs seen, less the first.

    A report's fragments reach the sink through different partitions, which it
    reads at different paces, so an epoch can come after a later one: every epoch
    not seen before counts, wherever it falls. A partition's ledger sees only the
    epochs of the fragments in that partition, so the node's count is the sink's.
    After a sink restart the count goes on from the one written last (`seeded`),
    and the epochs up to the one written then count as seen.

    >>> count = EpochCount()
    >>> [count.update(e) for e in (5, 5, 9, 7, 9, 3)]
    [0, 0, 1, 2, 2, 3]
    >>> seeded = EpochCount.seeded(restarts=4, epoch=9)
    >>> [seeded.update(e) for e in (7, 9, 12, 10, 12)]
    [4, 4, 5, 6, 6]
    """

    base: int = -1  # restarts before the epochs kept; -1: the first epoch is no restart
    floor: int = -1  # epochs up to this one count as seen
    epochs: set[int] = field(default_factory=set)

    @classmethod
    def seeded(cls, restarts: int, epoch: int) -> EpochCount:
        """The count a sink wrote last: `restarts`, with `epoch` the latest epoch then."""
        return cls(base=restarts, floor=epoch)

    @property
    def restarts(self) -> int:
        return max(0, self.base + len(self.epochs))

    def update(self, epoch: int) -> int:
        """Note a fragment's epoch; the restarts so far."""
        if epoch > self.floor and epoch not in self.epochs:
            self.epochs.add(epoch)
            if len(self.epochs) > MAX_EPOCHS_KEPT:  # keep the count, not the epochs
                self.base += len(self.epochs)
                self.floor, self.epochs = max(self.epochs), set()
        return self.restarts


@dataclass(slots=True)
class NodeStatus:
    """What the sink knows of one node: its latest report and what came before."""

    observed_at: int  # Unix ms, the latest report's
    received_at: int  # Unix ms, when that report was appended to `<prefix>.raw`
    epoch: int
    seq: int  # -1 when seeded from InfluxDB (which does not keep it)
    readings: dict[int, int] = field(default_factory=dict)  # partition -> readings
    interval_ms: int | None = None  # between the last two distinct observed_at
    epochs: EpochCount = field(default_factory=EpochCount)  # the node's restarts

    def fields(self, now_ms: int, default_interval_s: float) -> dict[str, int | float | bool]:
        """The `node_status` fields at `now_ms` (Unix ms, the sink's clock)."""
        age_s = (now_ms - self.received_at) / 1000
        interval_s = None if self.interval_ms is None else self.interval_ms / 1000
        fields: dict[str, int | float | bool] = {
            "observed_at": self.observed_at, "received_at": self.received_at,
            "epoch": self.epoch, "readings": sum(self.readings.values()),
            "restarts": self.epochs.restarts,
        }
        if interval_s is not None:
            fields["interval_s"] = interval_s
        fields["age_s"] = float(age_s)
        fields["alive"] = age_s < 3 * (interval_s or default_interval_s)
        return fields


class NodeBook:
    """The latest report of every node, from the `ReportSeen` of its totals records.

    A report is split into fragments, one per partition, each with its own totals
    record: the fragments of the latest report (same epoch and seq) add up their
    readings. An older report (a redelivery, a late one) changes nothing but the
    restarts (`EpochCount`). A node is alive while its latest report is younger
    than 3 report intervals (its last two `observed_at` apart; `default_interval_s`
    until two were seen).

    >>> book = NodeBook(default_interval_s=60.0, forget_after_s=86_400.0)
    >>> def seen(seq, observed_s, readings, epoch=1):
    ...     return ReportSeen(epoch=epoch, seq=seq, observed_at=observed_s * 1000,
    ...                       received_at=observed_s * 1000 + 200, readings=readings)
    >>> book.update("n1", seen(1, 1000, 3), partition=0)
    >>> book.update("n1", seen(1, 1000, 2), partition=1)  # the report's other fragment
    >>> book.update("n1", seen(1, 1000, 2), partition=1)  # delivered again: counted once
    >>> [(node, f["readings"], f["alive"], "interval_s" in f) for node, f in book.rows(1100_000)]
    [('n1', 5, True, False)]
    >>> book.update("n1", seen(1, 1010, 4, epoch=2), partition=0)
    >>> book.update("n1", seen(9, 900, 9), partition=3)  # an older report: ignored
    >>> [(f["epoch"], f["readings"], f["restarts"], f["interval_s"]) for _, f in book.rows(0)]
    [(2, 4, 1, 10.0)]
    >>> [(f["age_s"], f["alive"]) for _, f in book.rows(1040_200)]  # 30 s < 3 x 10 s
    [(30.0, False)]
    >>> book.rows(1010_200 + 86_400_000)  # silent for a day: forgotten
    []
    """

    def __init__(self, default_interval_s: float, forget_after_s: float) -> None:
        self.default_interval_s = default_interval_s
        self.forget_after_ms = forget_after_s * 1000
        self.nodes: dict[str, NodeStatus] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def update(self, node_id: str, seen: ReportSeen, partition: int) -> None:
        """Take one totals record's `ReportSeen`, from `partition`."""
        known = self.nodes.get(node_id)
        if known is None:
            known = self.nodes[node_id] = NodeStatus(
                seen.observed_at, seen.received_at, seen.epoch, seen.seq,
                {partition: seen.readings},
            )
            known.epochs.update(seen.epoch)
            return
        known.epochs.update(seen.epoch)
        new = (seen.observed_at, seen.epoch, seen.seq)
        old = (known.observed_at, known.epoch, known.seq)
        if new == old:
            known.readings[partition] = seen.readings
            known.received_at = max(known.received_at, seen.received_at)
        elif new > old:
            if seen.observed_at > known.observed_at:
                known.interval_ms = seen.observed_at - known.observed_at
            known.observed_at, known.received_at = seen.observed_at, seen.received_at
            known.epoch, known.seq = seen.epoch, seen.seq
            known.readings = {partition: seen.readings}

    def seed(self, node_id: str, status: NodeStatus) -> None:
        """Take a node's status as the sink wrote it last (after a restart), unless known."""
        self.nodes.setdefault(node_id, status)

    def rows(self, now_ms: int) -> list[tuple[str, dict[str, int | float | bool]]]:
        """(node, `node_status` fields) of every node heard from within the forget window.

        Nodes silent for longer are dropped from the book.
        """
        for node_id in [n for n, s in self.nodes.items()
                        if now_ms - s.received_at >= self.forget_after_ms]:
            del self.nodes[node_id]
        return [(node_id, status.fields(now_ms, self.default_interval_s))
                for node_id, status in sorted(self.nodes.items())]


def counter_fields(fields: dict[str, int | float]) -> Iterator[str]:
    """The names among `fields` that are cumulative counters (`COUNTER_FIELDS`).

    >>> list(counter_fields({"lag": 1, "points_written": 2, "dead_letters_late": 0}))
    ['points_written', 'dead_letters_late']
    """
    return (name for name in fields if name in COUNTER_FIELDS)
