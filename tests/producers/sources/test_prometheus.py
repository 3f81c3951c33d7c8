"""The prometheus source: v2ray-exporter's layout, a direction label, the start metric and
a real V2Ray restarted behind a page in v2ray-exporter's format."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from quotaflow.core.settings import Settings
from quotaflow.producers.sources import ParseError, SourceError
from quotaflow.producers.sources.prometheus import (
    V2RAY_EXPORTER_MAPPING,
    PrometheusCollector,
    PrometheusConfig,
    PrometheusMapping,
    PrometheusPage,
    parse_prometheus,
    read_prometheus,
)
from quotaflow.producers.sources.v2ray import V2RayStatsClient
from tests.producers.sources.helpers import (
    DIRECTION_MAPPING,
    LOCAL,
    Processes,
    billed_through_agent,
    listening,
    push_known_bytes,
    readings,
    sample,
    socks_http,
    wait_until,
)
from tests.producers.sources.test_v2ray import ALICE_PASSWORD, BOB_UUID, V2RayNode


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


# --------------------------------------------------------------------------- the start metric

_METRICS_PAGE = """# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 9
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.79551202345e+09
"""


def test_a_page_without_the_mapping_metrics_is_refused_with_a_hint() -> None:
    """v2ray-exporter's /metrics (its own Go metrics) instead of /scrape: no empty success."""
    with pytest.raises(ParseError, match="/scrape, not /metrics"):
        parse_prometheus(_METRICS_PAGE, V2RAY_EXPORTER_MAPPING)
    with pytest.raises(ParseError, match="no sample of up, down"):
        parse_prometheus(_METRICS_PAGE, PrometheusMapping(up_metric="up", down_metric="down"))


def test_an_idle_page_with_the_start_metric_is_no_traffic() -> None:
    page = read_prometheus("v2ray_up 1\nv2ray_uptime_seconds 42\n", V2RAY_EXPORTER_MAPPING)
    assert page == PrometheusPage([], 42.0)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('v2ray_traffic_uplink_bytes_total{dimension="user",target="a"} 1\nv2ray_up 0\n',
         "v2ray_up is 0"),
        ('v2ray_traffic_uplink_bytes_total{dimension="user",target="a"} 1\n', "no v2ray_uptime"),
        ('v2ray_uptime_seconds{a="1"} 5\nv2ray_uptime_seconds{a="2"} 6\n', "listed 2 times"),
        ("v2ray_uptime_seconds NaN\n", "not a time"),
        ("v2ray_uptime_seconds -3\n", "not a time"),
    ],
)
def test_the_start_metric_must_be_there_once(text: str, problem: str) -> None:
    with pytest.raises(ParseError, match=problem):
        read_prometheus(text, V2RAY_EXPORTER_MAPPING)


def test_start_metric_config() -> None:
    def config(**kwargs: object) -> PrometheusConfig:
        return PrometheusConfig.model_validate({"type": "prometheus", "url": "http://x/scrape",
                                                **kwargs})

    assert config().mapping().start_metric == "v2ray_uptime_seconds"
    assert config().mapping().start_kind == "uptime"
    started = config(start_metric="process_start_time_seconds").mapping()
    assert (started.start_metric, started.start_kind) == ("process_start_time_seconds",
                                                          "start_time")
    assert config(start_metric="").mapping().start_metric is None
    assert config(start_metric="born_at", start_metric_kind="start_time").mapping().start_kind \
        == "start_time"
    with pytest.raises(ValidationError, match="start_metric_kind"):
        config(start_metric="born_at")
    with pytest.raises(ValidationError, match="epoch comes from start_metric"):
        config(epoch="boot")
    config(start_metric="", epoch="boot")


class Page:
    """An HTTP endpoint serving whatever `text` holds (or what `make` returns) on every GET."""

    def __init__(self, make: Callable[[], str] | None = None) -> None:
        self.text = ""
        self.make = make
        self.paused = False  # answer 503, as an exporter that is down
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if page.paused:
                    self.send_error(503)
                    return
                body = (page.make() if page.make is not None else page.text).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOCAL, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{LOCAL}:{self.server.server_address[1]}/scrape"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def page() -> Iterator[Page]:
    served = Page()
    try:
        yield served
    finally:
        served.close()


def _traffic(uptime: float, down: int, start_metric: str = "v2ray_uptime_seconds") -> str:
    return (f'v2ray_traffic_downlink_bytes_total{{dimension="user",target="a"}} {down}\n'
            f"{start_metric} {uptime}\n")


def test_uptime_epoch_is_stable_and_grows_on_restart(
    page: Page, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_790_000_123_456]
    collector = PrometheusCollector(PrometheusConfig(type="prometheus", url=page.url))
    monkeypatch.setattr(collector._clock, "now_ms", lambda: now[0])
    page.text = _traffic(100, 5)
    first = collector.collect()
    assert first.epoch == 1_790_000_020_000 and readings(first.counters) == {"a": (0, 5)}
    for step_s, uptime in [(1.4, 101), (30, 131), (600, 731)]:
        now[0] += int(step_s * 1000)
        page.text = _traffic(uptime, 6)
        assert collector.collect().epoch == first.epoch
    # A restart: uptime went down; more traffic than before it is no growth, a new epoch.
    now[0] += 2_000
    page.text = _traffic(1, 1_000_000)
    restarted = collector.collect()
    assert restarted.epoch > first.epoch
    # An agent restart in between keeps the epoch (state saved with each report).
    again = PrometheusCollector(PrometheusConfig(type="prometheus", url=page.url))
    again.restore(collector.state())
    monkeypatch.setattr(again._clock, "now_ms", lambda: now[0] + 5_000)
    page.text = _traffic(6, 1_000_000)
    assert again.collect().epoch == restarted.epoch


def test_start_time_epoch(page: Page) -> None:
    collector = PrometheusCollector(PrometheusConfig(
        type="prometheus", url=page.url, start_metric="process_start_time_seconds"))
    page.text = _traffic(1_790_000_000.25, 5, "process_start_time_seconds")
    assert collector.collect().epoch == 1_790_000_000_250
    assert collector.collect().epoch == 1_790_000_000_250
    page.text = _traffic(1_790_000_100.5, 1, "process_start_time_seconds")
    assert collector.collect().epoch == 1_790_000_100_500
    # A restart that reports an earlier start (the clock went back) still moves forward.
    page.text = _traffic(1_790_000_050, 1, "process_start_time_seconds")
    assert collector.collect().epoch == 1_790_000_100_501
    assert collector.collect().epoch == 1_790_000_100_501


def test_no_start_metric_warns_loudly_at_start(
    page: Page, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        collector = PrometheusCollector(
            PrometheusConfig(type="prometheus", url=page.url, start_metric=""))
    assert "NOT billed" in caplog.text and "start_metric" in caplog.text
    page.text = _traffic(5, 7)
    first = collector.collect()
    page.text = _traffic(1, 9)
    assert collector.collect().epoch == first.epoch  # constant: a restart is not seen


# --------------------------------------------------------------------------- real V2Ray


def go_float(value: float) -> str:
    """A sample value as client_golang writes it: Go's `strconv.AppendFloat(f, 'g', -1, 64)`,
    the shortest digits, with an exponent from 10^6 up (as in tests' sample pages)."""
    digits = Decimal(repr(float(value))).normalize()
    sign, numerals, exponent = digits.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, numerals))
    point = len(text) + exponent - 1  # the decimal exponent of the first digit
    if point < -4 or point >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{'-' if sign else ''}{mantissa}e{'+' if point >= 0 else '-'}{abs(point):02d}"
    return format(Decimal(repr(float(value))), "f").removesuffix(".0")


def exporter_page(api: str) -> str:
    """What v2ray-exporter (wi1dcard/v2ray-exporter) serves on /scrape for the V2Ray at `api`.

    It asks V2Ray for GetSysStats and QueryStats (every counter, no reset) on each
    scrape and names the counters `v2ray_<traffic>_<direction>_bytes_total` with
    `dimension` and `target` labels; when V2Ray cannot be asked, the page has only
    `v2ray_up 0`.
    """
    lines: list[str] = []

    def gauge(name: str, value: float, help_text: str) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                      f"{name} {go_float(value)}"])

    try:
        with V2RayStatsClient(api, timeout=2) as client:
            sys_stats = client.sys_stats()
            stats = client.query_stats("")
    except SourceError:
        gauge("v2ray_up", 0, "Indicate scrape succeeded or not")
        return "\n".join(lines) + "\n"
    families: dict[str, list[str]] = {}
    for name, value in stats:
        dimension, target, kind, direction = name.split(">>>")
        metric = f"v2ray_{kind}_{direction}_bytes_total"
        families.setdefault(metric, []).append(
            f'{metric}{{dimension="{dimension}",target="{target}"}} {go_float(value)}')
    for metric in sorted(families):
        lines.extend([f"# HELP {metric} Number of bytes", f"# TYPE {metric} counter",
                      *sorted(families[metric])])
    gauge("v2ray_goroutines", sys_stats["NumGoroutine"], "Number of goroutines")
    gauge("v2ray_scrape_duration_seconds", 0.0012, "Scrape duration in seconds")
    gauge("v2ray_up", 1, "Indicate scrape succeeded or not")
    gauge("v2ray_uptime_seconds", sys_stats["Uptime"], "V2Ray uptime in seconds")
    return "\n".join(lines) + "\n"


def test_go_float() -> None:
    assert [go_float(v) for v in (4096, 80272, 712634511, 1e6, 0.0012, 0, 1e21)] == [
        "4096", "80272", "7.12634511e+08", "1e+06", "0.0012", "0", "1e+21"]


@pytest.mark.integration
@pytest.mark.parametrize("start_metric", ["v2ray_uptime_seconds", ""])
def test_the_collector_bills_exactly_across_a_real_v2ray_restart(
    start_metric: str, node_software: None, processes: Processes, http_port: int,
    settings: Settings, pipeline: Any, tmp_path: Path,
) -> None:
    """Debian's V2Ray behind an exporter page in v2ray-exporter's /scrape format.

    Traffic, a restart of V2Ray, then more traffic than before the restart: with
    the uptime as the start metric the pipeline bills the bytes of both runs,
    exactly. Without a start metric (`start_metric = ""`) the same looks like
    growth and the bytes before the restart are lost, as docs/agent.md says. (That
    collector refuses an idle page, which it cannot tell from a wrong URL, so there
    some traffic comes first; its first reading is then a baseline.)
    """
    v2ray = V2RayNode(processes)
    api = f"{LOCAL}:{v2ray.api}"
    exporter = Page(lambda: exporter_page(api))
    before: dict[str, tuple[int, int]] = {}

    def users() -> dict[str, tuple[int, int]]:
        with V2RayStatsClient(api) as client:
            return readings(client.query_user_counters())

    def traffic() -> None:
        alice, bob = v2ray.ss_local(ALICE_PASSWORD), v2ray.vmess_client(BOB_UUID)
        push_known_bytes(alice, http_port)
        socks_http(bob, http_port)
        # V2Ray up for 15 s at least: the first poll after the restart (a few seconds
        # of traffic later) then sees a lower uptime than the last one before it.
        with V2RayStatsClient(api) as client:
            time.sleep(max(15 - client.sys_stats()["Uptime"], 0) + 2.0)  # polls see it all
        before.update(users())
        exporter.paused = True  # the restart and what follows fall between two polls
        [server] = [p for name, p in processes.started if name == "v2ray-server"]
        server.terminate()
        server.wait(timeout=10)
        processes.start("v2ray-server", ["v2ray", "-config",
                                         str(processes.folder / "v2ray-server.json")])
        wait_until("the restarted v2ray API", lambda: listening(v2ray.api))
        for _ in range(3):
            push_known_bytes(alice, http_port)
            socks_http(bob, http_port)
        exporter.paused = False

    warm: dict[str, tuple[int, int]] = {}
    if not start_metric:
        push_known_bytes(v2ray.ss_local(ALICE_PASSWORD), http_port)
        socks_http(v2ray.vmess_client(BOB_UUID), http_port)
        warm.update(users())
    try:
        billed = billed_through_agent(
            tmp_path, settings, pipeline,
            f'type = "prometheus"\nurl = "{exporter.url}"\nstart_metric = "{start_metric}"',
            traffic,
        )
        after = users()
    finally:
        exporter.close()
    assert set(before) == set(after) == {"alice@test", "bob@test"}
    assert all(after[u][1] > before[u][1] for u in after)  # more than before the restart
    expected = {u: (before[u][0] + after[u][0], before[u][1] + after[u][1]) for u in after}
    log = (tmp_path / "agent.log").read_text()
    if start_metric:
        assert billed == expected, log[-3000:]
    else:
        # Billed: after - warm. Lost: everything before the restart but the baseline.
        assert billed == {u: (after[u][0] - warm[u][0], after[u][1] - warm[u][1])
                          for u in after}, log[-3000:]
        assert "NOT billed" in log
