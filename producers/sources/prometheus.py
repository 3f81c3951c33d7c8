"""A Prometheus text endpoint with per-user byte counters (v2ray-exporter's layout by default).

The source named `prometheus`. The counters' epoch comes from a start-time metric
of the page: `v2ray_uptime_seconds` by default (v2ray-exporter's, from V2Ray's
GetSysStats, as the `v2ray` source reads it), `process_start_time_seconds`, or
another (`start_metric`). Without one, a restart of the program behind the
exporter between two polls, followed by more traffic than before it, looks like
ordinary growth and the bytes before the restart are lost; the collector warns
at start. A page with none of the mapping's metrics is refused with a hint
(v2ray-exporter serves the per-user metrics on `/scrape`, not `/metrics`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field, model_validator

from quotaflow.core.contracts import MAX_COUNTER, Counter
from quotaflow.producers.sources._parsing import (
    MAX_EXACT_FLOAT,
    ParseError,
    add_traffic,
    apply_user_map,
    counters_of,
)
from quotaflow.producers.sources._runtime import (
    EpochKeeper,
    Snapshot,
    Source,
    SourceConfigBase,
    fetch,
)
from quotaflow.producers.sources.v2ray import SteadyClock, derive_epoch_ms

log = logging.getLogger(__name__)

StartKind = Literal["uptime", "start_time"]


def start_kind_of(metric: str) -> StartKind:
    """Whether a start metric is an uptime (seconds since the start) or a start time (Unix s).

    >>> start_kind_of("v2ray_uptime_seconds"), start_kind_of("process_start_time_seconds")
    ('uptime', 'start_time')
    """
    if "uptime" in metric:
        return "uptime"
    if "start_time" in metric:
        return "start_time"
    raise ValueError(
        f"cannot tell whether {metric!r} is an uptime or a start time: set start_metric_kind"
    )


def _metric_names(metric: str) -> frozenset[str]:
    """The sample names a configured metric name stands for."""
    if metric.endswith("_total"):
        return frozenset({metric})
    return frozenset({metric, metric + "_total"})


@dataclass(frozen=True)
class PrometheusMapping:
    """Which samples of a Prometheus exposition hold per-user traffic.

    Either two metrics (`up_metric`, `down_metric`), or one metric for both with a
    `direction_label` whose values `up_value`/`down_value` tell the directions (then
    `up_metric` and `down_metric` may be the same). The user is the value of
    `user_label`; `match` keeps only samples whose labels have these values.
    Metric names match with or without the `_total` suffix of counters, since
    prometheus_client adds or strips it. `start_metric` (one sample, no labels
    needed) tells when the counters started: seconds since then (`start_kind`
    "uptime") or the Unix time of it ("start_time").
    """

    up_metric: str
    down_metric: str
    user_label: str = "user"
    direction_label: str | None = None
    up_value: str | None = None
    down_value: str | None = None
    match: Mapping[str, str] = field(default_factory=dict)
    start_metric: str | None = None
    start_kind: StartKind = "uptime"

    def __post_init__(self) -> None:
        if not self.up_metric or not self.down_metric or not self.user_label:
            raise ValueError("PrometheusMapping needs up_metric, down_metric and user_label")
        if self.start_metric == "":
            raise ValueError("start_metric: a metric name, or None")
        if self.direction_label is None:
            if self.up_value is not None or self.down_value is not None:
                raise ValueError("up_value/down_value need a direction_label")
            if _metric_names(self.up_metric) & _metric_names(self.down_metric):
                raise ValueError("up_metric and down_metric are the same: set a direction_label")
        elif self.up_value is None or self.down_value is None or self.up_value == self.down_value:
            raise ValueError("a direction_label needs two different up_value and down_value")


V2RAY_EXPORTER_MAPPING: Final = PrometheusMapping(
    up_metric="v2ray_traffic_uplink_bytes_total",
    down_metric="v2ray_traffic_downlink_bytes_total",
    user_label="target",
    match={"dimension": "user"},
    start_metric="v2ray_uptime_seconds",
    start_kind="uptime",
)
"""The mapping for v2ray-exporter, which serves Xray/V2Ray user stats on `/scrape` as
`v2ray_traffic_uplink_bytes_total{dimension="user",target="EMAIL"}`, and V2Ray's
uptime (GetSysStats) as `v2ray_uptime_seconds`."""

WRONG_PAGE_HINT: Final = "v2ray-exporter serves the per-user metrics on /scrape, not /metrics"


def _sample_bytes(value: object, what: str) -> int:
    """A sample value as an exact byte count."""
    if isinstance(value, bool):
        raise ParseError(f"{what}: not a byte count: {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_COUNTER:
            raise ParseError(f"{what}: byte count {value} out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or not value.is_integer():
            raise ParseError(f"{what}: not a byte count: {value!r}")
        if value > MAX_EXACT_FLOAT:
            raise ParseError(f"{what}: {value!r} is too large to be an exact float byte count")
        return int(value)
    raise ParseError(f"{what}: not a number: {value!r:.40}")


@dataclass(frozen=True, slots=True)
class PrometheusPage:
    """What a page holds for the mapping: per-user counters and the start metric's value."""

    counters: list[Counter]
    start: float | None


def parse_prometheus(text: str, mapping: PrometheusMapping) -> list[Counter]:
    """Per-user counters from a Prometheus text exposition, picked out by `mapping`.

    See `read_prometheus`, which also reads the start metric.
    """
    return read_prometheus(text, mapping).counters


def read_prometheus(text: str, mapping: PrometheusMapping) -> PrometheusPage:
    """Per-user counters and the start metric of a Prometheus text exposition.

    Parsing is prometheus_client's; samples of the same user are summed (say, one
    per inbound). Samples without the user label, or with an empty one, are
    skipped (exporters often add totals without it). Values must be whole, finite
    and non-negative; a series listed twice, or a metric present both with and
    without `_total`, is refused as ambiguous. A page with no sample of the
    mapping's metrics is refused (the wrong URL, most likely), and so is one
    without the mapping's start metric, or with it twice.
    """
    up_names = _metric_names(mapping.up_metric)
    down_names = _metric_names(mapping.down_metric)
    wanted = up_names | down_names
    totals: dict[str, tuple[int, int]] = {}
    series: set[tuple[str, frozenset[tuple[str, str]]]] = set()
    names_seen: set[str] = set()
    starts: list[float] = []
    found = False
    up_sample: float | None = None
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises assorted exceptions on bad input
        raise ParseError(f"Prometheus exposition: cannot parse: {exc!r:.200}") from exc
    for family in families:
        for sample in family.samples:
            if sample.name == mapping.start_metric:
                starts.append(float(sample.value))
                continue
            if sample.name == "v2ray_up":
                up_sample = float(sample.value)
            if sample.name not in wanted:
                continue
            found = True
            labels = sample.labels
            if any(labels.get(k) != v for k, v in mapping.match.items()):
                continue
            identity = (sample.name, frozenset(labels.items()))
            if identity in series:
                raise ParseError(
                    f"Prometheus exposition: series {sample.name}{labels} listed twice"
                )
            series.add(identity)
            user = labels.get(mapping.user_label, "")
            if not user:
                continue
            if mapping.direction_label is None:
                is_up, is_down = sample.name in up_names, sample.name in down_names
            else:
                direction = labels.get(mapping.direction_label)
                is_up = sample.name in up_names and direction == mapping.up_value
                is_down = sample.name in down_names and direction == mapping.down_value
            if not is_up and not is_down:
                continue
            names_seen.add(sample.name)
            amount = _sample_bytes(sample.value, f"Prometheus sample {sample.name}{labels}")
            add_traffic(totals, user, amount if is_up else 0, amount if is_down else 0)
    for metric in (mapping.up_metric, mapping.down_metric):
        if len(_metric_names(metric) & names_seen) > 1:
            raise ParseError(
                f"Prometheus exposition: both {metric} and {metric}_total are present; "
                "name the one meant"
            )
    metrics = [mapping.up_metric, mapping.down_metric]
    if mapping.start_metric is not None:
        metrics.append(mapping.start_metric)
    if not found and not starts:
        raise ParseError(
            f"Prometheus exposition: no sample of {', '.join(dict.fromkeys(metrics))} on "
            f"the page: is it the right URL? ({WRONG_PAGE_HINT})"
        )
    start = None if mapping.start_metric is None else _start_value(mapping, starts, up_sample)
    return PrometheusPage(counters_of(totals), start)


def _start_value(mapping: PrometheusMapping, values: list[float], up: float | None) -> float:
    """The start metric's one value: seconds of uptime, or a Unix time, finite and >= 0."""
    name = mapping.start_metric
    if not values:
        why = (" (v2ray_up is 0: the exporter could not ask V2Ray)" if up == 0 else "")
        raise ParseError(
            f"Prometheus exposition: no {name} on the page{why}; without it a restart "
            f"cannot be told from growth ({WRONG_PAGE_HINT})"
        )
    if len(values) > 1:
        raise ParseError(f"Prometheus exposition: {name} is listed {len(values)} times")
    value = values[0]
    if not math.isfinite(value) or value < 0 or value > MAX_EXACT_FLOAT:
        raise ParseError(f"Prometheus exposition: {name} is {value!r}, not a time")
    return value


class PrometheusConfig(SourceConfigBase):
    """A Prometheus text endpoint (v2ray-exporter's `/scrape` by default)."""

    type: Literal["prometheus"]
    url: str
    up_metric: str = V2RAY_EXPORTER_MAPPING.up_metric
    down_metric: str = V2RAY_EXPORTER_MAPPING.down_metric
    user_label: str = V2RAY_EXPORTER_MAPPING.user_label
    direction_label: str | None = None
    up_value: str | None = None
    down_value: str | None = None
    match: dict[str, str] = Field(
        default_factory=lambda: dict(V2RAY_EXPORTER_MAPPING.match)
    )
    # The counters' start: "" for none (then restarts can lose bytes; a WARNING at start).
    start_metric: str = V2RAY_EXPORTER_MAPPING.start_metric or ""
    start_metric_kind: StartKind | None = None  # default: from the name
    timeout_s: float = 10.0

    @model_validator(mode="after")
    def _check_start(self) -> PrometheusConfig:
        if self.start_metric:
            if self.epoch != "constant":
                raise ValueError("epoch comes from start_metric; leave `epoch` out, or set "
                                 'start_metric = "" to use it')
            if self.start_metric_kind is None:
                start_kind_of(self.start_metric)
        return self

    def mapping(self) -> PrometheusMapping:
        """Which samples hold the traffic and the start, as this config says."""
        start = self.start_metric or None
        return PrometheusMapping(
            up_metric=self.up_metric, down_metric=self.down_metric, user_label=self.user_label,
            direction_label=self.direction_label, up_value=self.up_value,
            down_value=self.down_value, match=self.match, start_metric=start,
            start_kind=self.start_metric_kind or (start_kind_of(start) if start else "uptime"),
        )


class PrometheusCollector:
    """Polls the page; the epoch is the start the start metric tells, kept stable.

    An uptime goes through `derive_epoch_ms`, like V2Ray's own uptime in the `v2ray`
    source (with the same `SteadyClock` for "now"): stable from poll to poll, and
    later (a new epoch, which the ledger bills from zero) once the program
    restarted. A start time is the epoch itself (in ms), raised above the last one
    if a restart reports an earlier one. Without a start metric the epoch is
    `epoch` ("constant" or "boot"), and a WARNING at start says what that costs.
    """

    def __init__(self, config: PrometheusConfig) -> None:
        self.config = config
        self.mapping = config.mapping()
        self._keeper = EpochKeeper(config.epoch)
        self._clock = SteadyClock()
        self._epoch: int | None = None
        self._start: float | None = None  # the start metric's last value
        if self.mapping.start_metric is None:
            log.warning(
                "prometheus collector %s: no start_metric, so the epoch is %s: a restart of "
                "the program behind the exporter between two polls, followed by more traffic "
                "than before it, looks like growth, and the bytes before the restart are NOT "
                "billed. Set start_metric (v2ray_uptime_seconds, process_start_time_seconds, "
                "...) if the page has one", config.url, config.epoch,
            )

    def collect(self) -> Snapshot:
        page = read_prometheus(fetch(self.config.url, self.config.timeout_s), self.mapping)
        counters = apply_user_map(page.counters, self.config.user_map)
        if page.start is None:
            return Snapshot(self._keeper.epoch(), counters)
        return Snapshot(self._epoch_of(page.start), counters)

    def _epoch_of(self, start: float) -> int:
        previous, previous_start = self._epoch, self._start
        if self.mapping.start_kind == "uptime":
            uptime, before = int(start), None if previous_start is None else int(previous_start)
            epoch = derive_epoch_ms(self._clock.now_ms(), uptime, previous, before)
        elif previous is not None and start == previous_start:
            epoch = previous
        else:
            epoch = round(start * 1000)
            if previous is not None and epoch <= previous:
                epoch = previous + 1
        self._epoch, self._start = epoch, start
        return epoch

    def state(self) -> Any:
        return {"epoch": self._epoch, "start": self._start, "clock": self._clock.state(),
                "constant": self._keeper.state()}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        if isinstance(state.get("epoch"), int) and not isinstance(state["epoch"], bool):
            self._epoch = state["epoch"]
        if isinstance(state.get("start"), int | float) and not isinstance(state["start"], bool):
            self._start = float(state["start"])
        self._clock.restore(state.get("clock"))
        self._keeper.restore(state.get("constant"))


SOURCE = Source(
    name="prometheus",
    config=PrometheusConfig,
    collector=PrometheusCollector,
    parse=lambda text: parse_prometheus(text, V2RAY_EXPORTER_MAPPING),
)
