"""The InfluxDB sink: line protocol, coalescing, and an InfluxDB outage on the real servers."""

from __future__ import annotations

import time
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from quotaflow.core.contracts import TotalsBatch
from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.dev.ledger_check import compare, read_daily_totals
from quotaflow.dev.simulation import FleetSpec, simulate
from quotaflow.producers.publisher import ReportPublisher
from quotaflow.sinks.influx import InfluxSink, line_protocol
from quotaflow.streams.lag import LagProbe


def test_absorb_keeps_the_latest_total_of_each_series() -> None:
    sink = InfluxSink(Settings())
    assert sink.absorb(TotalsBatch.encode("n1", 86400, 0, [("alice", 1, 2, 10, 20)]))
    assert sink.absorb(TotalsBatch.encode("n1", 86400, 0, [("alice", 5, 6, 14, 24)]))
    assert not sink.absorb(b'{"node_id": "n1"}')
    assert sorted(line_protocol(sink._pending)) == [
        "traffic_daily,node_id=n1,user_id=alice up_bytes=5i,down_bytes=6i,total_bytes=11i 86400",
        "traffic_monthly,node_id=n1,user_id=alice up_bytes=14i,down_bytes=24i,total_bytes=38i 0",
    ]


def test_tags_with_special_characters_are_escaped() -> None:
    line = next(line_protocol({("day", "a,b=c d", "n\\1", 0): (1, 1)}))
    assert line.startswith("traffic_daily,node_id=n\\\\1,user_id=a\\,b\\=c\\ d ")


@pytest.mark.integration
def test_influxdb_outage_holds_offsets_and_loses_nothing(
    services: Any, settings: Settings, pipeline: Any
) -> None:
    sim = simulate(FleetSpec(nodes=5, users=120, days=2, malformed=0, seed=11))
    half = len(sim.lines) // 2
    with ReportPublisher(settings) as publisher:
        publisher.publish_lines(sim.lines[:half])
        publisher.flush()
        pipeline.wait()
        services.stop_influx()
        try:
            publisher.publish_lines(sim.lines[half:])
            publisher.flush()
            probe = LagProbe(settings)
            deadline = time.monotonic() + 60
            while probe.lag().raw and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(3.0)  # several flush attempts fail meanwhile
            lag = probe.lag()
            probe.close()
            assert lag.raw == 0 and lag.totals > 0, "the sink must hold its offsets"
        finally:
            services.start_influx()
    pipeline.wait()
    calendar = Calendar(ZoneInfo(settings.timezone))
    truth = {(u, n, calendar.label(d, "day")): (a, b) for (u, n, d), (a, b) in sim.truth.items()}
    result = compare(truth, read_daily_totals(settings))
    assert result.exact, result.summary()
