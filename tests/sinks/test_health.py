"""node_status and pipeline points, and /metrics, from the real worker and sink.

A simulated fleet (counter restarts, duplicates, malformed lines) goes through the
pipeline on the real Kafka and InfluxDB; the `node_status` points must say what
the fleet's last reports were, a node that stops reporting must turn dead, both
processes must write `pipeline` points and serve them on `/metrics`, and a
restarted sink must go on writing the nodes it knew.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from quotaflow.core.contracts import Counter, CounterReport
from quotaflow.core.partitioning import split_report
from quotaflow.core.settings import Settings
from quotaflow.dev.local import free_ports
from quotaflow.dev.simulation import FleetSpec, Simulation, simulate
from quotaflow.producers.publisher import ReportPublisher
from quotaflow.sinks.influxql import InfluxQL, InfluxQLError

pytestmark = pytest.mark.integration

T = TypeVar("T")

SPEC = FleetSpec(
    nodes=6, users=60, days=0.5, interval_s=600,
    start=datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=2),
    restart_rate=0.15, reorder_rate=0.0, duplicate_rate=0.05, malformed=3,
    name_prefix="h-",
)
DYING_INTERVAL_S = 4


def _free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest settings, with status points every second and both /metrics endpoints."""
    return settings.model_copy(update={
        "status_interval_s": 1.0, "worker_metrics_port": _free_port(),
        "sink_metrics_port": _free_port(), "metrics_address": "127.0.0.1",
    })


def _until(what: Callable[[], T | None], timeout_s: float, why: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = what()
        except InfluxQLError:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {why}")
        time.sleep(0.5)


def _expected_status(sim: Simulation) -> dict[str, dict[str, int]]:
    """Per node, what its last report says, and its restarts (a reference: the node's
    distinct epochs among its valid reports, less the first)."""
    last: dict[str, CounterReport] = {}
    epochs: dict[str, set[int]] = {}
    for line in sim.lines:
        try:
            report = CounterReport.decode(line)
        except ValueError:
            continue
        known = last.get(report.node_id)
        key = (report.observed_at, report.epoch, report.seq)
        if known is None or key > (known.observed_at, known.epoch, known.seq):
            last[report.node_id] = report
        epochs.setdefault(report.node_id, set()).add(report.epoch)
    restarts = {node: len(seen) - 1 for node, seen in epochs.items()}
    return {
        node: {"observed_at": int(report.observed_at.timestamp() * 1000),
               "epoch": report.epoch, "readings": len(report.counters),
               "restarts": restarts[node]}
        for node, report in last.items()
    }


def _last_status(influx: InfluxQL) -> dict[str, dict[str, Any]]:
    series = influx.query(
        "SELECT last(received_at) AS received_at, observed_at, epoch, readings, restarts, "
        "interval_s, age_s, alive FROM node_status GROUP BY node_id", epoch="ms")
    return {s.tags["node_id"]: s.rows[0] for s in series}


def _last_pipeline(influx: InfluxQL, process: str) -> dict[str, Any] | None:
    series = influx.query(f"SELECT * FROM pipeline WHERE process = '{process}' "
                          "ORDER BY time DESC LIMIT 1", epoch="ms")
    return series[0].rows[0] if series else None


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _dying_reports(node: str) -> list[CounterReport]:
    now = datetime.now(UTC).replace(microsecond=0)
    return [
        CounterReport(node_id=node, epoch=1_763_000_000_000, seq=seq,
                      observed_at=now - timedelta(seconds=DYING_INTERVAL_S * (3 - seq)),
                      counters=(Counter(user_id="h-dying-user", up=seq * 10, down=seq * 20),))
        for seq in (1, 2, 3)
    ]


def test_node_status_and_pipeline_points_from_a_simulated_fleet(
    settings: Settings, pipeline: Any
) -> None:
    sim = simulate(SPEC)
    assert sim.restarts > 0
    expected = _expected_status(sim)
    assert any(e["restarts"] > 0 for e in expected.values())
    with ReportPublisher(settings) as publisher:
        publisher.publish_lines(sim.lines)
        publisher.flush()
    pipeline.wait()
    influx = InfluxQL.from_settings(settings)

    # a node that reports every 4 s, then stops: alive, then dead after 3 intervals
    dying = "h-dying"
    dying_reports = _dying_reports(dying)  # once: a second boundary may pass while publishing
    with ReportPublisher(settings) as publisher:
        for report in dying_reports:
            publisher.publish(report)
        publisher.flush()
    sent_at_ms = time.time() * 1000
    last_observed = int(dying_reports[-1].observed_at.timestamp() * 1000)
    alive = _until(lambda: (s := _last_status(influx).get(dying))
                   and s["observed_at"] == last_observed and s, 30, "the dying node's status")
    assert alive["alive"] is True and alive["interval_s"] == DYING_INTERVAL_S
    assert alive["readings"] == 1 and alive["epoch"] == 1_763_000_000_000
    assert abs(alive["received_at"] - sent_at_ms) < 5000
    dead = _until(lambda: (s := _last_status(influx).get(dying)) and not s["alive"] and s,
                  60, "the dying node to be written as dead")
    assert dead["age_s"] >= 3 * DYING_INTERVAL_S
    assert dead["received_at"] == alive["received_at"]

    # every fleet node: its last report, its restarts, alive (its interval is 10 min)
    status = _last_status(influx)
    assert set(status) == set(expected) | {dying}
    published_ms = time.time() * 1000
    for node, want in expected.items():
        got = status[node]
        assert {k: got[k] for k in want} == want, node
        assert got["alive"] is True and abs(got["interval_s"] - SPEC.interval_s) < 0.01, node
        assert 0 <= published_ms - got["received_at"] < 300_000, node

    # the worker's pipeline points: what it billed, refused, and its lag drained to 0
    valid = [CounterReport.decode(line) for line in sim.lines if _valid(line)]
    valid += dying_reports
    fragments = [f for r in valid for f in split_report(r, settings.partitions).values()]
    worker = _until(lambda: (p := _last_pipeline(influx, "worker")) and p["lag"] == 0
                    and p["readings_total"] == sum(len(f.counters) for f in fragments) and p,
                    30, "the worker's point with everything billed and no lag")
    assert worker["reports_total"] == len(fragments)
    assert worker["dead_letters_invalid"] == SPEC.malformed
    assert worker["readings_per_s"] >= 0.0 and worker["reports_per_s"] >= 0.0
    assert worker["late_reports"] == 0 and worker["commands_issued"] == 0
    assert {f"lag_raw_{p}" for p in range(settings.partitions)} <= set(worker)
    rates = influx.query("SELECT max(readings_per_s) FROM pipeline WHERE process = 'worker'")
    assert rates[0].rows[0]["max"] > 0

    # the sink's: points written, write latency, freshness, lag on its four topics
    sink = _until(lambda: _last_pipeline(influx, "sink"), 10, "the sink's point")
    assert sink["points_written"] > 2 * len(sim.truth)
    assert sink["dead_letters_invalid"] == 0
    for topic in ("totals", "quota", "control", "metrics"):
        assert {f"lag_{topic}_{p}" for p in range(settings.partitions)} <= set(sink), topic
    figures = influx.query(
        "SELECT max(write_latency_ms_p99) AS latency, min(freshness_ms_p50) AS fresh_low, "
        "max(freshness_ms_p50) AS p50, max(freshness_ms_p99) AS p99 "
        "FROM pipeline WHERE process = 'sink'")[0].rows[0]
    assert 0 < figures["latency"] < 30_000  # ms
    assert 0 < figures["fresh_low"] <= figures["p50"] <= figures["p99"] < 300_000

    # the queries docs/influx-schema.md gives (the dashboards' InfluxQL)
    nodes = {s.tags["node_id"]: s.rows[0] for s in influx.query(
        "SELECT last(alive) AS alive, last(age_s) AS age_s, last(received_at) AS received_at "
        "FROM node_status WHERE time > now() - 1h GROUP BY node_id")}
    assert nodes[dying]["alive"] is False and set(nodes) == set(status)
    [lags] = influx.query("SELECT last(/^lag_raw_/) FROM pipeline WHERE process = 'worker' "
                          "AND time > now() - 1h")
    assert {k: v for k, v in lags.rows[0].items() if k != "time"} == {
        f"last_lag_raw_{p}": 0 for p in range(settings.partitions)}
    [sink_lags] = influx.query("SELECT last(/^lag_/) FROM pipeline WHERE process = 'sink' "
                               "AND time > now() - 1h")
    assert sink_lags.rows[0]["last_lag_totals_0"] is not None
    assert sink_lags.rows[0]["last_lag_raw_0"] is None  # the worker's field
    [history] = influx.query(
        "SELECT observed_at, received_at, epoch, readings, restarts, interval_s, age_s, alive "
        f"FROM node_status WHERE node_id = '{dying}' ORDER BY time DESC LIMIT 3")
    assert history.rows[0]["alive"] is False
    ages = [row["age_s"] for row in history.rows]
    assert ages == sorted(ages, reverse=True) and len(set(ages)) == 3
    [worst] = influx.query("SELECT max(freshness_ms_p99), max(write_latency_ms_p99) "
                           "FROM pipeline WHERE process = 'sink' AND time > now() - 1h")
    assert worst.rows[0]["max"] > 0 and worst.rows[0]["max_1"] > 0

    # /metrics of both processes holds the same figures as their latest points
    scraped = _scrape(settings.worker_metrics_port)
    worker_now = _last_pipeline(influx, "worker")
    assert worker_now is not None
    assert scraped[("quotaflow_readings_total", (("process", "worker"),))] == \
        worker_now["readings_total"]
    assert scraped[("quotaflow_dead_letters_total",
                    (("process", "worker"), ("reason", "invalid")))] == SPEC.malformed
    assert ("quotaflow_partition_lag",
            (("partition", "0"), ("process", "worker"), ("topic", "raw"))) in scraped
    sink_scraped = _scrape(settings.sink_metrics_port)
    assert sink_scraped[("quotaflow_points_written_total", (("process", "sink"),))] > 0
    assert ("quotaflow_partition_lag",
            (("partition", "3"), ("process", "sink"), ("topic", "totals"))) in sink_scraped

    # a restarted sink reads its nodes back from InfluxDB and goes on writing them
    pipeline.kill("sink")
    restarted_ns = time.time_ns()
    pipeline.start("sink")
    after = _until(lambda: {s.tags["node_id"]: s.rows[0] for s in influx.query(
        "SELECT last(received_at) AS received_at, restarts, alive FROM node_status "
        f"WHERE time > {restarted_ns} GROUP BY node_id", epoch="ms")
        if s.rows} or None, 60, "node_status points of the restarted sink")
    assert set(after) == set(status)
    assert after[dying]["alive"] is False
    assert all(after[n]["restarts"] == status[n]["restarts"] for n in status)
    assert all(after[n]["received_at"] == status[n]["received_at"] for n in status)


def _valid(line: bytes) -> bool:
    try:
        CounterReport.decode(line)
    except ValueError:
        return False
    return True


def test_pipeline_points_influxdb_refuses_are_dead_lettered(
    settings: Settings, tmp_path: Any
) -> None:
    """A field type conflict on `pipeline` (a field written as a string before): the worker's
    snapshot and the sink's own point are dead-lettered, the one naming its record, the
    other none, and the sink goes on."""
    import signal

    from kafka import KafkaConsumer

    from quotaflow.admin import ensure_topics
    from quotaflow.core.contracts import DeadLetter
    from quotaflow.core.health import PipelineSnapshot
    from tests.sinks.test_influx import _publish, _start_sink

    ensure_topics(settings)
    influx = InfluxQL.from_settings(settings)
    influx.create_database()
    now_ns = time.time_ns()
    request = urllib.request.Request(
        f"{settings.influx_url}/write?db={settings.influx_bucket}", method="POST",
        data=(f'pipeline,host=old,process=worker readings_total="x" {now_ns}\n'
              f'pipeline,host=old,process=sink points_written="x" {now_ns}').encode())
    urllib.request.urlopen(request, timeout=10).close()
    snapshot = PipelineSnapshot(process="worker", host="w1", at=now_ns // 1_000_000 + 5,
                                fields={"readings_total": 7, "lag": 0})
    [offset] = _publish(settings, [(settings.topics.metrics, 2, snapshot.encode())])
    sink = _start_sink(settings, tmp_path / "sink.log")
    try:
        dead = KafkaConsumer(settings.topics.dead, bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=1000)
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + 60
        while len({letter.topic for letter in letters}) < 2 and time.monotonic() < deadline:
            letters += [DeadLetter.decode(m.value) for m in dead]
        dead.close()
        by_topic = {letter.topic: letter for letter in letters}
        worker = by_topic[settings.topics.metrics]
        assert (worker.partition, worker.offset, worker.reason) == (2, offset, "invalid")
        assert "field type conflict" in worker.detail
        assert worker.readings == ({"measurement": "pipeline", "process": "worker",
                                    "host": "w1"},)
        assert worker.original().startswith(b"pipeline,host=w1,process=worker ")
        own = by_topic[""]
        assert (own.partition, own.offset) == (-1, -1) and "field type conflict" in own.detail
        assert own.readings[0]["process"] == "sink"
        assert sink.poll() is None, "the sink goes on"
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(timeout=30)
    assert sink.returncode == 0
