"""Development commands: simulate a fleet, replay a file, check InfluxDB against ground truth."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo

import orjson
import typer

from quotaflow.cli._common import console, load_settings
from quotaflow.core.periods import Calendar
from quotaflow.core.settings import Settings
from quotaflow.dev.simulation import FleetSpec, iter_truth_rows, simulate

app = typer.Typer()


@app.command("simulate")
def simulate_cmd(
    nodes: Annotated[int, typer.Option(min=1)] = 20,
    users: Annotated[int, typer.Option(min=1)] = 500,
    days: Annotated[float, typer.Option(min=0.05)] = 3.0,
    seed: int = 7,
    start: Annotated[str, typer.Option(help="First report time, ISO 8601.")] = (
        "2026-11-01T00:00:00+00:00"
    ),
    interval: Annotated[int, typer.Option(help="Seconds between a node's reports.")] = 3600,
    malformed: int = 12,
    name_prefix: Annotated[
        str, typer.Option(help="Put before node and user names (keeps fleets apart).")
    ] = "",
    out: Annotated[Path | None, typer.Option(help="Write JSON lines here, not to Kafka.")] = None,
    truth: Annotated[
        Path | None, typer.Option(help="Write ground truth JSON lines here (- for stdout).")
    ] = None,
) -> None:
    """Simulate a fleet: publish its reports to Kafka (or write them) and its ground truth."""
    settings = load_settings()
    spec = FleetSpec(
        nodes=nodes, users=users, days=days, seed=seed, start=datetime.fromisoformat(start),
        interval_s=interval, malformed=malformed, timezone=settings.timezone,
        name_prefix=name_prefix,
    )
    sim = simulate(spec)
    calendar = Calendar(ZoneInfo(settings.timezone))
    if truth is not None:
        rows = b"".join(orjson.dumps(r) + b"\n" for r in iter_truth_rows(sim, calendar))
        if str(truth) == "-":
            sys.stdout.buffer.write(rows)
        else:
            truth.write_bytes(rows)
    if out is not None:
        out.write_bytes(b"".join(line + b"\n" for line in sim.lines))
    else:
        from quotaflow.admin import ensure_topics
        from quotaflow.producers.publisher import ReportPublisher

        ensure_topics(settings)
        with ReportPublisher(settings) as publisher:
            publisher.publish_lines(sim.lines)
            publisher.flush()
    console.print(
        f"{sim.reports} reports ({sim.readings} readings) from {nodes} nodes: "
        f"{sim.duplicates} duplicated, {sim.reordered} reordered, {sim.restarts} restarts, "
        f"{sim.malformed} malformed lines; truth: {len(sim.truth)} (user, node, day) totals"
    )


@app.command("replay")
def replay_cmd(
    file: Path,
    wait: Annotated[bool, typer.Option(help="Exit 0 only once InfluxDB reflects it all.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 300.0,
) -> None:
    """Publish a JSON-lines file in order; lines that are no report go as they are."""
    from quotaflow.admin import ensure_topics
    from quotaflow.producers.publisher import ReportPublisher

    settings = load_settings()
    ensure_topics(settings)
    with file.open("rb") as lines, ReportPublisher(settings) as publisher:
        reports, raw = publisher.publish_lines(lines)
        publisher.flush()
    console.print(f"published {reports} reports and {raw} lines as they were")
    if wait:
        _wait_for_pipeline(settings, timeout)


def _wait_for_pipeline(settings: Settings, timeout: float) -> None:
    from quotaflow.streams.lag import LagProbe

    probe = LagProbe(settings)
    try:
        lag = probe.wait_until_done(timeout)
    finally:
        probe.close()
    if not lag.done:
        console.print(f"[red]timed out[/red]: worker lag {lag.raw}, sink lag {lag.sink}")
        raise typer.Exit(1)
    console.print("everything published is in InfluxDB")




@app.command("check")
def check_cmd(
    truth: Annotated[Path, typer.Option(help="Ground truth from `simulate --truth`.")],
) -> None:
    """Compare every (user, node, day) total in InfluxDB with a ground-truth file."""
    from quotaflow.dev.truth_check import compare_with_truth

    settings = load_settings()
    result = compare_with_truth(settings, truth)
    console.print(result.summary())
    if not result.exact:
        raise typer.Exit(1)
