"""A Prometheus text endpoint with per-user byte counters (v2ray-exporter's layout by default).

The source named `prometheus`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field

from quotaflow.core.contracts import MAX_COUNTER, Counter
from quotaflow.producers.sources._parsing import (
    MAX_EXACT_FLOAT,
    ParseError,
    add_traffic,
    counters_of,
)
from quotaflow.producers.sources._runtime import (
    ReadParseCollector,
    Source,
    SourceConfigBase,
    fetch,
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
    prometheus_client adds or strips it.
    """

    up_metric: str
    down_metric: str
    user_label: str = "user"
    direction_label: str | None = None
    up_value: str | None = None
    down_value: str | None = None
    match: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.up_metric or not self.down_metric or not self.user_label:
            raise ValueError("PrometheusMapping needs up_metric, down_metric and user_label")
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
)
"""The mapping for v2ray-exporter, which serves Xray/V2Ray user stats as
`v2ray_traffic_uplink_bytes_total{dimension="user",target="EMAIL"}`."""


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


def parse_prometheus(text: str, mapping: PrometheusMapping) -> list[Counter]:
    """Per-user counters from a Prometheus text exposition, picked out by `mapping`.

    Parsing is prometheus_client's; samples of the same user are summed (say, one
    per inbound). Samples without the user label, or with an empty one, are
    skipped (exporters often add totals without it). Values must be whole, finite
    and non-negative; a series listed twice, or a metric present both with and
    without `_total`, is refused as ambiguous.
    """
    up_names = _metric_names(mapping.up_metric)
    down_names = _metric_names(mapping.down_metric)
    wanted = up_names | down_names
    totals: dict[str, tuple[int, int]] = {}
    series: set[tuple[str, frozenset[tuple[str, str]]]] = set()
    names_seen: set[str] = set()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises assorted exceptions on bad input
        raise ParseError(f"Prometheus exposition: cannot parse: {exc!r:.200}") from exc
    for family in families:
        for sample in family.samples:
            if sample.name not in wanted:
                continue
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
    return counters_of(totals)


class PrometheusConfig(SourceConfigBase):
    """A Prometheus text endpoint (v2ray-exporter by default)."""

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
    timeout_s: float = 10.0

    def mapping(self) -> PrometheusMapping:
        """Which samples hold the traffic, as this config says."""
        return PrometheusMapping(
            up_metric=self.up_metric, down_metric=self.down_metric, user_label=self.user_label,
            direction_label=self.direction_label, up_value=self.up_value,
            down_value=self.down_value, match=self.match,
        )


def _collector(config: PrometheusConfig) -> ReadParseCollector:
    mapping = config.mapping()
    url, timeout = config.url, config.timeout_s
    return ReadParseCollector(
        lambda: fetch(url, timeout), lambda text: parse_prometheus(text, mapping),
        config.user_map, config.epoch,
    )


SOURCE = Source(
    name="prometheus",
    config=PrometheusConfig,
    collector=_collector,
    parse=lambda text: parse_prometheus(text, V2RAY_EXPORTER_MAPPING),
)
