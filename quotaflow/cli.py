"""The `quotaflow` command line: local services, simulation, replay, the pipeline, queries.

Edges (Kafka, Faust, InfluxDB) are imported inside the commands that need them,
so `quotaflow --help` and the pure commands start fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import orjson
import typer
from rich.console import Console

from quotaflow.periods import Calendar
from quotaflow.settings import Settings
from quotaflow.simulation import FleetSpec, iter_truth_rows, simulate

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
local_app = typer.Typer(no_args_is_help=True, help="Run Kafka and InfluxDB on loopback.")
sink_app = typer.Typer(no_args_is_help=True, help="Run one sink in the foreground.")
app.add_typer(local_app, name="local")
app.add_typer(sink_app, name="sink")
console = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:
        console.print(f"[red]bad QUOTAFLOW_* setting:[/red] {exc}")
        raise typer.Exit(2) from None


# ---------------------------------------------------------------- local services


@local_app.command("up")
def local_up(
    env: Annotated[bool, typer.Option("--env", help="Print export lines only.")] = False,
) -> None:
    """Install (first time) and start Kafka and InfluxDB on loopback."""
    from quotaflow import local

    services = local.up()
    if env:
        for key, value in services.env().items():
            print(f"export {key}={value}")
    else:
        console.print(f"Kafka    {services.kafka_bootstrap}\nInfluxDB {services.influx_url}")
        console.print("Use them with: eval \"$(quotaflow local up --env)\"")


@local_app.command("down")
def local_down() -> None:
    """Stop what `local up` started."""
    from quotaflow import local

    local.down()


@local_app.command("status")
def local_status() -> None:
    """Say what runs where."""
    from quotaflow import local

    print(json.dumps(local.status(), indent=2, default=str))


# ---------------------------------------------------------------- producers


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
    out: Annotated[Path | None, typer.Option(help="Write JSON lines here, not to Kafka.")] = None,
    truth: Annotated[
        Path | None, typer.Option(help="Write ground truth JSON lines here (- for stdout).")
    ] = None,
) -> None:
    """Simulate a fleet: publish its reports to Kafka (or write them) and its ground truth."""
    settings = _settings()
    spec = FleetSpec(
        nodes=nodes, users=users, days=days, seed=seed, start=datetime.fromisoformat(start),
        interval_s=interval, malformed=malformed, timezone=settings.timezone,
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
        from producers.publisher import ReportPublisher, ensure_topics

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
    from producers.publisher import ReportPublisher, ensure_topics

    settings = _settings()
    ensure_topics(settings)
    with file.open("rb") as lines, ReportPublisher(settings) as publisher:
        reports, raw = publisher.publish_lines(lines)
        publisher.flush()
    console.print(f"published {reports} reports and {raw} lines as they were")
    if wait:
        _wait_for_pipeline(settings, timeout)


def _wait_for_pipeline(settings: Settings, timeout: float) -> None:
    from streams.lag import LagProbe

    probe = LagProbe(settings)
    try:
        lag = probe.wait_until_done(timeout)
    finally:
        probe.close()
    if not lag.done:
        console.print(f"[red]timed out[/red]: worker lag {lag.raw}, sink lag {lag.totals}")
        raise typer.Exit(1)
    console.print("everything published is in InfluxDB")


_PARSE_SOURCES = ("v2ray-stats-json", "openvpn-status", "ss-manager", "iptables", "wg-dump",
                  "prometheus")


@app.command("parse")
def parse_cmd(
    file: Annotated[Path, typer.Argument(help="The source's raw output; - for stdin.")],
    source: Annotated[str, typer.Option(help=f"One of: {', '.join(_PARSE_SOURCES)}.")],
    user_map: Annotated[
        Path | None, typer.Option(help="JSON object mapping source ids to user ids.")
    ] = None,
    up_metric: Annotated[str | None, typer.Option(help="prometheus: upload metric.")] = None,
    down_metric: Annotated[str | None, typer.Option(help="prometheus: download metric.")] = None,
    user_label: Annotated[
        str | None, typer.Option(help="prometheus: label naming the user.")
    ] = None,
    direction_label: Annotated[
        str | None, typer.Option(help="prometheus: label telling the direction.")
    ] = None,
    up_value: Annotated[str | None, typer.Option(help="prometheus: its upload value.")] = None,
    down_value: Annotated[str | None, typer.Option(help="prometheus: its download value.")] = None,
    match: Annotated[
        list[str] | None, typer.Option(help="prometheus: KEY=VALUE label filter, repeatable.")
    ] = None,
) -> None:
    """Print the readings a source's raw output yields, as JSON lines, to check a mapping."""
    from producers import parsers

    text = sys.stdin.read() if str(file) == "-" else file.read_text(errors="replace")
    try:
        if source == "v2ray-stats-json":
            counters = parsers.parse_v2ray_stats_json(text)
        elif source == "openvpn-status":
            counters = parsers.openvpn_counters(parsers.parse_openvpn_status(text))
        elif source == "ss-manager":
            counters = parsers.parse_ss_manager_stat(text)
        elif source == "iptables":
            counters = parsers.parse_iptables(text)
        elif source == "wg-dump":
            counters = parsers.parse_wg_dump(text)
        elif source == "prometheus":
            # without metric options, the v2ray-exporter layout is assumed
            mapping = (
                parsers.PrometheusMapping(
                    up_metric=up_metric, down_metric=down_metric or up_metric,
                    user_label=user_label or "user", direction_label=direction_label,
                    up_value=up_value, down_value=down_value,
                    match=dict(m.split("=", 1) for m in match or ()),
                )
                if up_metric
                else parsers.V2RAY_EXPORTER_MAPPING
            )
            counters = parsers.parse_prometheus(text, mapping)
        else:
            raise typer.BadParameter(f"--source must be one of {', '.join(_PARSE_SOURCES)}")
        if user_map is not None:
            counters = parsers.apply_user_map(counters, json.loads(user_map.read_text()))
    except (parsers.ParseError, ValueError) as exc:
        console.print(f"[red]cannot parse {file} as {source}:[/red] {exc}")
        raise typer.Exit(1) from None
    for counter in counters:
        print(orjson.dumps(dataclasses.asdict(counter)).decode())


@app.command("agent")
def agent_cmd(
    config: Annotated[Path, typer.Option("--config", help="The agent's TOML file.")],
) -> None:
    """Run the node agent: collectors, the durable outbox and the sender."""
    from producers.agent import run_agent

    run_agent(config)


@app.command("push-receiver")
def push_receiver_cmd(
    config: Annotated[Path, typer.Option("--config", help="The agent's TOML file.")],
) -> None:
    """Run the panel push endpoint (Xboard/V2Board UniProxy push) with its outbox."""
    from producers.agent import run_push_receiver

    run_push_receiver(config)


# ---------------------------------------------------------------- pipeline


@app.command("worker")
def worker_cmd(loglevel: str = "WARNING") -> None:
    """Run the Faust stream worker in the foreground."""
    from streams.app import run_worker

    run_worker(_settings(), loglevel=loglevel)


@sink_app.command("influx")
def sink_influx_cmd() -> None:
    """Run the InfluxDB sink in the foreground."""
    from sinks.influx import run_sink

    run_sink(_settings())


@app.command("run")
def run_cmd(
    seconds: Annotated[float | None, typer.Option(help="Stop after this long.")] = None,
) -> None:
    """Run the whole single-machine pipeline (worker and sinks) until SIGINT/SIGTERM."""
    from rich.live import Live

    from producers.publisher import ensure_topics
    from streams.lag import LagProbe

    settings = _settings()
    ensure_topics(settings)
    commands = {"worker": ["worker"], "influx-sink": ["sink", "influx"]}
    children = {name: _spawn(args) for name, args in commands.items()}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    probe = LagProbe(settings)
    started = time.monotonic()
    restarts = 0
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not stopping:
                for name, process in children.items():
                    if process.poll() is not None:  # e.g. Kafka was gone too long: start again
                        console.print(f"[yellow]{name} exited ({process.returncode}); "
                                      "restarting[/yellow]")
                        restarts += 1
                        time.sleep(1.0)
                        children[name] = _spawn(commands[name])
                try:
                    lag = probe.lag()
                    text = f"worker lag {lag.raw:>8}  sink lag {lag.totals:>8}"
                except Exception as exc:  # the display must not stop the pipeline
                    text = f"lag unknown ({type(exc).__name__})"
                live.update(f"quotaflow run  {time.monotonic() - started:7.0f}s  {text}"
                            f"  restarts {restarts}")
                if seconds is not None and time.monotonic() - started >= seconds:
                    break
                time.sleep(1.0)
    finally:
        probe.close()
        for process in children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in children.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    """Start `quotaflow ARGS` as a child process with this environment."""
    return subprocess.Popen([sys.executable, "-m", "quotaflow", *args])


# ---------------------------------------------------------------- queries


@app.command("usage")
def usage_cmd(
    user: Annotated[str, typer.Option(help="The user id.")],
    node: Annotated[str | None, typer.Option(help="Only this node.")] = None,
    period: Annotated[str, typer.Option(help="day or month.")] = "day",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
) -> None:
    """Read a user's totals back from InfluxDB."""
    from rich.table import Table

    from sinks.influx import MEASUREMENTS
    from sinks.influxql import InfluxQL, InfluxQLError, quote_string

    if period not in MEASUREMENTS:
        raise typer.BadParameter("period must be day or month")
    settings = _settings()
    where = f"user_id = {quote_string(user)}"
    if node:
        where += f" AND node_id = {quote_string(node)}"
    statement = (
        f"SELECT up_bytes, down_bytes, total_bytes FROM {MEASUREMENTS[period]} "
        f"WHERE {where} GROUP BY node_id"
    )
    try:
        series = InfluxQL.from_settings(settings).query(statement)
    except InfluxQLError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    calendar = Calendar(ZoneInfo(settings.timezone))
    rows = [
        {
            "user_id": user, "node_id": s.tags.get("node_id", ""),
            period: calendar.label(int(r["time"]), period),
            "up": r["up_bytes"], "down": r["down_bytes"], "total": r["total_bytes"],
        }
        for s in series for r in s.rows
    ]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table(title=f"{user}: traffic per {period} ({settings.timezone})")
    for column in ("node_id", period, "up", "down", "total"):
        table.add_column(column, justify="right" if column in ("up", "down", "total") else "left")
    for row in rows:
        table.add_row(*(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c])
                        for c in ("node_id", period, "up", "down", "total")))
    Console().print(table)


@app.command("top")
def top_cmd(
    limit: Annotated[int, typer.Option(min=1, help="How many users.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
) -> None:
    """The heaviest users over everything in InfluxDB, all nodes together."""
    from rich.table import Table

    from sinks.influxql import InfluxQL, InfluxQLError

    settings = _settings()
    statement = (
        "SELECT sum(up_bytes) AS up, sum(down_bytes) AS down, sum(total_bytes) AS total "
        "FROM traffic_daily GROUP BY user_id"
    )
    try:
        series = InfluxQL.from_settings(settings).query(statement)
    except InfluxQLError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    rows = sorted(
        ({"user_id": s.tags["user_id"], **{k: s.rows[0][k] for k in ("up", "down", "total")}}
         for s in series if s.rows),
        key=lambda row: -int(row["total"]),
    )[:limit]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table(title=f"top {limit} users, all nodes and days")
    for column in ("user_id", "up", "down", "total"):
        table.add_column(column, justify="left" if column == "user_id" else "right")
    for row in rows:
        table.add_row(row["user_id"], *(f"{row[c]:,}" for c in ("up", "down", "total")))
    Console().print(table)


@app.command("check")
def check_cmd(
    truth: Annotated[Path, typer.Option(help="Ground truth from `simulate --truth`.")],
) -> None:
    """Compare every (user, node, day) total in InfluxDB with a ground-truth file."""
    from sinks.ledger_check import compare_with_truth

    settings = _settings()
    result = compare_with_truth(settings, truth)
    console.print(result.summary())
    if not result.exact:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the `quotaflow` script."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()

