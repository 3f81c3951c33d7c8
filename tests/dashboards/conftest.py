"""A simulated fleet with known ground truth, run once through the real pipeline.

Kafka, the worker, the sink and InfluxDB are the real ones (tests/conftest.py). The fleet
covers 400 days up to today noon in the billing zone, so every dashboard's today, month,
year, 30 days and 12 months have data, and three users have plans for this month (one
goes over quota, one past its 80 % warning, one stays low), so the quota panels have
data. The last two days are published after the rest has been written, so each planned
user's usage is written at least twice (the time-to-exhaustion panel needs a rate).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from quotaflow.core.plans import CalendarMonth, Plan
from quotaflow.core.settings import Settings
from quotaflow.dev.simulation import FleetSpec, Simulation, simulate

ZONE = "Europe/Berlin"
DAYS = 400


@dataclass
class Truth:
    """Raw bytes per (user, node, local day), and sums of them by period."""

    by_day: dict[tuple[str, str, datetime], int]
    now: datetime  # the instant the proof queries are resolved at, in ZONE
    plans: dict[str, Plan] = field(default_factory=dict)

    def total(self, period: str, node: str | None = None, user: str | None = None,
              nodes: set[str] | None = None) -> int:
        """Bytes of today (`day`), this `month` or this `year` (to `now`)."""
        today = self.now.date()
        out = 0
        for (u, n, day), total in self.by_day.items():
            if (node and n != node) or (user and u != user) or (nodes and n not in nodes):
                continue
            same = {"day": day.date() == today,
                    "month": (day.year, day.month) == (today.year, today.month),
                    "year": day.year == today.year}[period]
            if same and day.date() <= today:
                out += total
        return out

    def per_day(self, node: str | None = None, user: str | None = None) -> dict[datetime, int]:
        out: dict[datetime, int] = defaultdict(int)
        for (u, n, day), total in self.by_day.items():
            if (node is None or n == node) and (user is None or u == user):
                out[day] += total
        return dict(out)

    def nodes(self) -> list[str]:
        return sorted({n for _, n, _ in self.by_day})

    def users(self) -> list[str]:
        return sorted({u for u, _, _ in self.by_day})


@dataclass
class ProofFleet:
    settings: Settings
    sim: Simulation
    truth: Truth
    logs: Path
    published_ms: int  # wall clock when the first report was published


def _spec(now: datetime) -> FleetSpec:
    noon = now.astimezone(ZoneInfo(ZONE)).replace(hour=12, minute=0, second=0, microsecond=0)
    start = (noon.replace(tzinfo=None) - timedelta(days=DAYS)).replace(tzinfo=ZoneInfo(ZONE))
    return FleetSpec(
        nodes=4, users=24, days=DAYS, start=start.astimezone(UTC), interval_s=6 * 3600,
        timezone=ZONE, seed=3, malformed=3, nodes_per_user=(1, 3),
    )


def _truth(sim: Simulation, now: datetime) -> Truth:
    zone = ZoneInfo(ZONE)
    by_day = {
        (u, n, datetime.fromtimestamp(day, zone)): up + down
        for (u, n, day), (up, down) in sim.truth.items() if up + down
    }
    return Truth(by_day, now.astimezone(zone))


def _plans(truth: Truth) -> dict[str, Plan]:
    """Three month plans for the heaviest users of this month: over, near and under quota."""
    month = sorted(((truth.total("month", user=u), u) for u in truth.users()), reverse=True)
    (over_used, over), (near_used, near), (low_used, low) = month[:3]
    assert low_used > 0, "the fleet should give three users traffic this month"
    period = CalendarMonth(kind="calendar_month")
    return {
        over: Plan(user_id=over, quota_bytes=over_used // 2, period=period, timezone=ZONE,
                   warn_at=(0.8,), enabled=True),
        near: Plan(user_id=near, quota_bytes=int(near_used / 0.85), period=period,
                   timezone=ZONE, warn_at=(0.8,), enabled=True),
        low: Plan(user_id=low, quota_bytes=low_used * 10, period=period, timezone=ZONE,
                  warn_at=(0.8,), enabled=True),
    }


def _split(lines: list[bytes], cutoff: datetime) -> int:
    """The index of the first report observed at or after `cutoff`."""
    for index, line in enumerate(lines):
        try:
            body = orjson.loads(line)
            at = datetime.fromisoformat(body["observed_at"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if at >= cutoff:
            return index
    return len(lines)


@pytest.fixture(scope="package")
def proof_fleet(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProofFleet]:
    from quotaflow.admin import ensure_topics
    from quotaflow.catalog import publish_plans
    from quotaflow.producers.publisher import ReportPublisher
    from tests.conftest import Pipeline

    now = datetime.now(UTC)
    sim = simulate(_spec(now))
    truth = _truth(sim, now)
    truth.plans = _plans(truth)
    tag = uuid.uuid4().hex[:10]
    logs = tmp_path_factory.mktemp("proof-fleet")
    settings = Settings(
        kafka_bootstrap=services.kafka_bootstrap, influx_url=services.influx_url,
        topic_prefix=f"proof-{tag}", influx_bucket=f"proof_{tag}", partitions=4,
        state_dir=logs / "state", sink_flush_interval_s=0.5, status_interval_s=1.0,
        quota_report_interval_s=1.0, timezone=ZONE, lateness_days=DAYS + 20,
    )
    ensure_topics(settings)
    publish_plans(settings, list(truth.plans.values()))
    pipeline = Pipeline(settings, logs)
    pipeline.start("worker")
    pipeline.start("sink")
    try:
        published_ms = int(time.time() * 1000)
        split = _split(sim.lines, now - timedelta(days=2))
        for part in (sim.lines[:split], sim.lines[split:]):
            with ReportPublisher(settings) as publisher:
                publisher.publish_lines(part)
                publisher.flush()
            pipeline.wait(timeout_s=600)
        # the last quota states and node statuses are written
        time.sleep(2 * max(settings.sink_flush_interval_s, settings.status_interval_s,
                           settings.quota_report_interval_s))
        # the dashboards are looked at from now on: after every point was written
        truth.now = datetime.now(UTC).astimezone(ZoneInfo(ZONE))
        yield ProofFleet(settings, sim, truth, logs, published_ms)
    finally:
        pipeline.stop()
