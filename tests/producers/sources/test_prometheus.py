"""The prometheus source: v2ray-exporter's layout and a direction label."""

from __future__ import annotations

import pytest

from quotaflow.producers.sources import ParseError
from quotaflow.producers.sources.prometheus import (
    V2RAY_EXPORTER_MAPPING,
    PrometheusMapping,
    parse_prometheus,
)
from tests.producers.sources.helpers import (
    DIRECTION_MAPPING,
    readings,
    sample,
)


def test_prometheus_v2ray_exporter_sample() -> None:
    counters = parse_prometheus(sample("prometheus-v2ray-exporter.prom"), V2RAY_EXPORTER_MAPPING)
    assert readings(counters) == {
        "alice@example.com": (18273645, 712634511),
        "bob@example.com": (0, 4096),
    }


def test_prometheus_direction_label_sample() -> None:
    counters = parse_prometheus(sample("prometheus-direction-label.prom"), DIRECTION_MAPPING)
    assert readings(counters) == {"alice": (18274645, 712636511), "bob": (0, 4096)}


def test_prometheus_match_filter() -> None:
    mapping = PrometheusMapping(
        up_metric="xray_user_traffic_bytes",
        down_metric="xray_user_traffic_bytes",
        direction_label="direction",
        up_value="uplink",
        down_value="downlink",
        match={"inbound": "trojan"},
    )
    counters = parse_prometheus(sample("prometheus-direction-label.prom"), mapping)
    assert readings(counters) == {"alice": (1000, 2000)}


@pytest.mark.parametrize(
    ("text", "metric"),
    [
        # typed counter without _total: prometheus_client renames the samples
        ('# TYPE up_bytes counter\nup_bytes{user="a"} 5\n', "up_bytes"),
        ('# TYPE up_bytes counter\nup_bytes{user="a"} 5\n', "up_bytes_total"),
        ('# TYPE up_bytes_total counter\nup_bytes_total{user="a"} 5\n', "up_bytes"),
        ('# TYPE up_bytes_total counter\nup_bytes_total{user="a"} 5\n', "up_bytes_total"),
        ('up_bytes_total{user="a"} 5\n', "up_bytes_total"),
        ('up_bytes{user="a"} 5\n', "up_bytes"),
        ('# TYPE up_bytes gauge\nup_bytes{user="a"} 5\n', "up_bytes"),
    ],
)
def test_prometheus_total_suffix(text: str, metric: str) -> None:
    mapping = PrometheusMapping(up_metric=metric, down_metric="down_bytes")
    assert readings(parse_prometheus(text, mapping)) == {"a": (5, 0)}


def test_prometheus_sums_same_user_and_skips_unlabelled() -> None:
    text = 'up{user="a",in="x"} 5\nup{user="a",in="y"} 6\nup 100\nup{user=""} 7\ndown{user="b"} 1\n'
    mapping = PrometheusMapping(up_metric="up", down_metric="down")
    assert readings(parse_prometheus(text, mapping)) == {"a": (11, 0), "b": (0, 1)}


@pytest.mark.parametrize(
    "text",
    [
        'up{user="a"} NaN\n',
        'up{user="a"} +Inf\n',
        'up{user="a"} -1\n',
        'up{user="a"} 1.5\n',
        'up{user="a"} 1e300\n',
        'up{user="a"} 9223372036854775808\n',
        'up{user="a"} 1\nup{user="a"} 2\n',  # the same series twice
        'up{user="a"} 1\nup_total{user="b"} 2\n',  # both spellings present
        'up{user="a} 1\n',
    ],
)
def test_prometheus_refuses_garbage(text: str) -> None:
    with pytest.raises(ParseError):
        parse_prometheus(text, PrometheusMapping(up_metric="up", down_metric="down"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"up_metric": "x", "down_metric": "x"},
        {"up_metric": "x", "down_metric": "x_total"},
        {"up_metric": "x", "down_metric": "y", "up_value": "u"},
        {"up_metric": "x", "down_metric": "x", "direction_label": "d", "up_value": "u"},
        {
            "up_metric": "x",
            "down_metric": "x",
            "direction_label": "d",
            "up_value": "u",
            "down_value": "u",
        },
        {"up_metric": "", "down_metric": "y"},
    ],
)
def test_prometheus_mapping_validation(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        PrometheusMapping(**kwargs)  # type: ignore[arg-type]
