"""The whole pipeline on real Kafka and InfluxDB against the simulator's ground truth."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from quotaflow.core.contracts import CounterReport, DeadLetter
from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.dev.simulation import FleetSpec, Simulation, simulate
from quotaflow.dev.truth_check import compare, read_daily_totals
from quotaflow.producers.publisher import ReportPublisher
from quotaflow.sinks.influxql import InfluxQL
from quotaflow.streams.lag import LagProbe

pytestmark = pytest.mark.integration

# 20 nodes x 500 users x 3 days across the 2026 spring DST change in New York
SPEC = FleetSpec(
    nodes=20, users=500, days=3, start=datetime(2026, 3, 7, 6, tzinfo=UTC),
    timezone="America/New_York", duplicate_rate=0.07, reorder_rate=0.04, malformed=12,
)


def _truth_by_label(sim: Simulation, tz: str) -> dict[tuple[str, str, str], tuple[int, int]]:
    calendar = Calendar(ZoneInfo(tz))
    return {(u, n, calendar.label(d, "day")): (up, down) for (u, n, d), (up, down) in
            sim.truth.items()}


def _publish(settings: Settings, lines: list[bytes]) -> None:
    with ReportPublisher(settings) as publisher:
        publisher.publish_lines(lines)
        publisher.flush()


def _assert_exact(settings: Settings, sim: Simulation) -> None:
    result = compare(_truth_by_label(sim, settings.timezone), read_daily_totals(settings))
    assert result.exact, result.summary()
    assert result.expected == len(sim.truth)
    # monthly totals agree with the days they sum
    months = sim.month_truth(ZoneInfo(settings.timezone))
    series = InfluxQL.from_settings(settings).query(
        "SELECT up_bytes, down_bytes FROM traffic_monthly GROUP BY user_id, node_id"
    )
    found = {
        (s.tags["user_id"], s.tags["node_id"], int(r["time"])): [r["up_bytes"], r["down_bytes"]]
        for s in series for r in s.rows
    }
    assert found == months


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest settings, billing in the fleet's timezone."""
    return settings.model_copy(update={"timezone": SPEC.timezone})


@pytest.fixture(scope="module")
def fleet() -> Simulation:
    sim = simulate(SPEC)
    assert sim.duplicates / sim.reports >= 0.05
    assert sim.reordered / sim.reports >= 0.02
    assert sim.restarts > 0 and sim.malformed == 12
    return sim


def test_fleet_totals_equal_ground_truth(fleet: Simulation, settings: Settings,
                                         pipeline: Any) -> None:
    _publish(settings, fleet.lines)
    pipeline.wait()
    _assert_exact(settings, fleet)

    dead = KafkaConsumer(
        settings.topics.dead, bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest", consumer_timeout_ms=5000,
    )
    letters = [DeadLetter.model_validate_json(m.value) for m in dead]
    dead.close()
    malformed = {line for line in fleet.lines if line.startswith(b"{") is False
                 or b"node-x" in line or line.startswith(b'{"node_id": ""')}
    assert {d.original() for d in letters} == malformed
    assert all(d.reason == "invalid" and d.detail for d in letters)


def test_waiting_ends_while_nodes_go_on_reporting(
    fleet: Simulation, settings: Settings, pipeline: Any
) -> None:
    """The worker commits at checkpoints, a second apart: with nodes reporting more
    often than that, raw is never empty at any one instant, and a wait for an empty
    raw never ended. Waiting is for what was published before it began."""
    import threading

    half = len(fleet.lines) // 2
    _publish(settings, fleet.lines[:half])
    stop = threading.Event()

    def go_on_reporting() -> None:
        rest = fleet.lines[half:]
        for start in range(0, len(rest), 10):
            if stop.wait(0.25):
                return
            _publish(settings, rest[start:start + 10])

    reporter = threading.Thread(target=go_on_reporting)
    reporter.start()
    try:
        pipeline.wait(60)  # fails the test if it does not end
        assert reporter.is_alive(), "the nodes stopped reporting before the wait ended"
    finally:
        stop.set()
        reporter.join()


def test_worker_killed_mid_stream_keeps_totals_exact(fleet: Simulation, settings: Settings,
                                                     pipeline: Any) -> None:
    rng = random.Random(5)
    parts = 4
    size = len(fleet.lines) // parts + 1
    probe = LagProbe(settings)
    killed_with_work_left = 0
    for start in range(0, len(fleet.lines), size):
        _publish(settings, fleet.lines[start:start + size])
        time.sleep(rng.uniform(0.5, 3.0))  # let the worker get into the middle of it
        pipeline.kill("worker")
        killed_with_work_left += probe.lag().raw > 0
        pipeline.start("worker")
    probe.close()
    assert killed_with_work_left >= 2, "the kills should interrupt the worker mid-stream"
    pipeline.wait()
    _assert_exact(settings, fleet)


def _wait_until_totals_stop_coming(settings: Settings, quiet_s: float = 3.0) -> None:
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    partitions = [TopicPartition(settings.topics.totals, p) for p in range(settings.partitions)]
    deadline, last, since = time.monotonic() + 90, -1, time.monotonic()
    while True:
        ends = sum(consumer.end_offsets(partitions).values())
        if ends != last:
            last, since = ends, time.monotonic()
        elif ends and time.monotonic() - since >= quiet_s:
            break
        assert time.monotonic() < deadline, "the worker did not handle the messages"
        time.sleep(0.5)
    consumer.close()


def test_a_stopped_worker_acknowledges_what_it_handled_and_stops_promptly(
    fleet: Simulation, settings: Settings, pipeline: Any,
) -> None:
    """Stopping, Faust waits for every message the worker started on to be acknowledged,
    and the worker acknowledges only at a checkpoint: its last one runs as it stops.
    With checkpoints far apart, the handled messages are all unacknowledged then."""
    pipeline.kill("worker")
    pipeline.settings = settings.model_copy(update={"checkpoint_interval_s": 120.0})
    pipeline.start("worker")
    first = fleet.lines[:600]  # fewer messages than bring a checkpoint forward
    _publish(settings, first)
    _wait_until_totals_stop_coming(settings)  # the worker handled them all
    probe = LagProbe(settings)
    assert probe.lag().raw > 0, "no checkpoint yet: nothing committed"
    assert pipeline.terminate("worker", timeout_s=20.0) == 0
    assert probe.lag().raw == 0  # the last checkpoint acknowledged them, and Faust committed
    probe.close()
    pipeline.settings = settings
    pipeline.start("worker")
    _publish(settings, fleet.lines[len(first):])
    pipeline.wait()
    _assert_exact(settings, fleet)


def test_whole_reports_are_rerouted_and_future_clocks_refused(
    settings: Settings, pipeline: Any
) -> None:
    """A report sent unsplit to one partition is billed in full; one from 2099 is refused."""
    users = [f"whole-{i}" for i in range(40)]

    def report(seq: int, at: str, counters: list[tuple[str, int, int]]) -> bytes:
        return orjson.dumps({
            "node_id": "odd-node", "epoch": 1761000000000, "seq": seq, "observed_at": at,
            "counters": [{"user_id": u, "up": up, "down": down} for u, up, down in counters],
        })

    first = report(1, "2026-03-08T10:00:00Z", [(u, 1000, 5000) for u in users])
    later = report(2, "2026-03-08T11:00:00Z", [(u, 1500, 9000) for u in users])
    future = report(3, "2099-01-01T00:00:00Z", [("whole-0", 10**7, 9 * 10**7)])
    with ReportPublisher(settings) as publisher:
        for line in (first, later, future):
            publisher._producer.send(publisher.topic, value=line, partition=0)
        publisher.flush()
    pipeline.wait()
    day = {(u, n): t for (u, n, _), t in read_daily_totals(settings).items()}
    assert day == {(u, "odd-node"): (1500, 9000) for u in users}
    dead = KafkaConsumer(
        settings.topics.dead, bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest", consumer_timeout_ms=5000,
    )
    letters = [DeadLetter.model_validate_json(m.value) for m in dead]
    dead.close()
    assert [(d.reason, "in the future" in d.detail, d.original()) for d in letters] == [
        ("invalid", True, future)
    ]


def _offsets_before_midnight(settings: Settings) -> list[tuple[int, int]]:
    """Per raw partition, an offset holding a node's last cumulative report of a day
    whose next report in the partition is on a later day: billing past it would put
    its bytes on the wrong day."""
    calendar = Calendar(ZoneInfo(settings.timezone))
    consumer = KafkaConsumer(
        settings.topics.raw, bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest", consumer_timeout_ms=3000,
    )
    last: dict[tuple[int, str], tuple[int, int]] = {}  # (partition, node) -> (offset, day)
    chosen: dict[int, int] = {}
    for record in consumer:
        try:
            report = CounterReport.decode(record.value)
        except ValueError:
            continue
        if report.kind != "cumulative" or not report.counters:
            continue
        day, _ = calendar.starts(int(report.observed_at.timestamp()))
        key = (record.partition, report.node_id)
        before = last.get(key)
        if before is not None and before[1] < day and record.partition not in chosen:
            chosen[record.partition] = before[0]
        last[key] = (record.offset, day)
    consumer.close()
    return sorted(chosen.items())


def _raw_ends(settings: Settings) -> dict[int, int]:
    """Each raw partition's log end offset."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    ends = consumer.end_offsets(
        [TopicPartition(settings.topics.raw, p) for p in range(settings.partitions)]
    )
    consumer.close()
    return {tp.partition: end for tp, end in ends.items()}


def _bill_losing_once(
    settings: Settings, fleet: Simulation, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
    lost: list[tuple[int, int]],
) -> str:
    """Bill the published fleet with a worker that drops these (partition, offset)s until
    it re-reads them, check the totals are exact, and return the worker's log."""
    from tests.conftest import Pipeline

    monkeypatch.setenv("QUOTAFLOW_FAULT_LOSE_OFFSETS", ",".join(f"{p}:{o}" for p, o in lost))
    pipeline = Pipeline(settings, tmp_path)
    pipeline.start("worker")
    pipeline.start("sink")
    try:
        pipeline.wait()
    finally:
        pipeline.stop()
    _assert_exact(settings, fleet)
    return (tmp_path / "worker.log").read_text(errors="replace")


def test_offsets_faust_never_hands_over_are_read_again_not_billed_past(
    fleet: Simulation, settings: Settings, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faust 0.15.3 skipped offsets after restarts, and billing past them lost bytes.

    The worker is told to lose, until it re-reads them, the first offset of every
    partition (a hole at the head), a node's last report before midnight (billing past
    it would put its bytes on the next day), and the last offset (a hole with nothing
    after it). It must notice each hole, re-read from it, and bill everything exactly
    once.
    """
    from quotaflow.admin import ensure_topics

    ensure_topics(settings)
    _publish(settings, fleet.lines)
    ends = _raw_ends(settings)
    midnight = _offsets_before_midnight(settings)
    assert len(midnight) == settings.partitions
    lost = sorted({(partition, offset) for partition, end in ends.items()
                   for offset in (0, end - 1)} | set(midnight))
    worker_log = _bill_losing_once(settings, fleet, tmp_path, monkeypatch, lost)
    assert "re-reading from" in worker_log


def test_partitions_that_deliver_nothing_are_read_again(
    fleet: Simulation, settings: Settings, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a Kafka outage, a restarted worker got one message of one raw partition and
    then nothing from any of the four, though their logs went on (seen once in a few
    runs of the agent's outage test). A partition that never delivered was not watched:
    the worker waited for it for ever. Here Faust hands over nothing from every partition
    with messages but the last until the worker re-reads it; each must be re-read from
    its start."""
    from quotaflow.admin import ensure_topics

    ensure_topics(settings)
    _publish(settings, fleet.lines)
    ends = _raw_ends(settings)
    silent = [partition for partition, end in sorted(ends.items()) if end][:-1]
    assert silent
    lost = [(partition, offset) for partition in silent for offset in range(ends[partition])]
    worker_log = _bill_losing_once(settings, fleet, tmp_path, monkeypatch, lost)
    # the same warning for the next partitions is held back as a repeat
    assert f"{settings.topics.raw}[{silent[0]}]: nothing arrives" in worker_log


def test_a_kafka_outage_is_waited_out_not_taken_for_a_stall(
    fleet: Simulation, settings: Settings, pipeline: Any, services: Any
) -> None:
    """A Kafka outage longer than the commit watchdog's 30 s made the worker exit 70, so a
    plain `quotaflow worker` stayed down; and each process logged ~75 errors a second."""
    half = len(fleet.lines) // 2
    _publish(settings, fleet.lines[:half])
    time.sleep(3.0)  # the worker is in the middle of it
    worker_log = pipeline.logs / "worker.log"
    before = worker_log.read_text(errors="replace").count("\n")
    services.stop_kafka()
    try:
        time.sleep(40.0)
        assert pipeline.processes["worker"].poll() is None, "the worker exited during the outage"
    finally:
        services.start_kafka()
    outage_lines = worker_log.read_text(errors="replace").splitlines()[before:]
    noisy = [line for line in outage_lines if "WARNING" in line or "ERROR" in line]
    assert len(noisy) < 200, f"{len(noisy)} warnings in 40 s: {noisy[:5]}"
    _publish(settings, fleet.lines[half:])
    pipeline.wait()
    assert pipeline.processes["worker"].poll() is None
    _assert_exact(settings, fleet)
