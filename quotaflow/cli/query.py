"""Reading totals back from InfluxDB, and with them the quota state of a user who has a plan."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated
from zoneinfo import ZoneInfo

import typer
from rich.console import Console

from quotaflow.cli._common import console, load_settings, needs
from quotaflow.core.periods import Calendar

if TYPE_CHECKING:
    from quotaflow.sinks.influxql import InfluxQL

app = typer.Typer()


@app.command("usage")
def usage_cmd(
    user: Annotated[str, typer.Option(help="The user id.")],
    node: Annotated[str | None, typer.Option(help="Only this node.")] = None,
    period: Annotated[str, typer.Option(help="day or month.")] = "day",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
) -> None:
    """Read a user's totals back from InfluxDB, and the quota state when the user has a plan."""
    from rich.table import Table

    try:
        from quotaflow.sinks.influx import MEASUREMENTS
    except ImportError as exc:
        raise needs("pipeline", exc) from None
    from quotaflow.sinks.influxql import InfluxQL, InfluxQLError, quote_string

    if period not in MEASUREMENTS:
        raise typer.BadParameter("period must be day or month")
    settings = load_settings()
    where = f"user_id = {quote_string(user)}"
    if node:
        where += f" AND node_id = {quote_string(node)}"
    statement = (
        f"SELECT up_bytes, down_bytes, total_bytes FROM {MEASUREMENTS[period]} "
        f"WHERE {where} GROUP BY node_id"
    )
    client = InfluxQL.from_settings(settings)
    try:
        series = client.query(statement)
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
    _print_quota_state(client, user)


def _print_quota_state(client: InfluxQL, user: str) -> None:
    """The user's quota state (`quota_usage`), when the user has one: one line more."""
    from quotaflow.cli.plans import read_quota_usage
    from quotaflow.sinks.influxql import InfluxQLError

    try:
        usage = read_quota_usage(client, user)
    except InfluxQLError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if usage is not None:
        print(f"quota: {usage.usage_text()} in the period from {usage.period_start}, "
              f"{usage.state}")


@app.command("top")
def top_cmd(
    limit: Annotated[int, typer.Option(min=1, help="How many users.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
) -> None:
    """The heaviest users over everything in InfluxDB, all nodes together."""
    from rich.table import Table

    from quotaflow.sinks.influxql import InfluxQL, InfluxQLError

    settings = load_settings()
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
