"""`quotaflow report`: PNG charts (and an HTML page) from the dashboards' queries."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from quotaflow.cli._common import load_settings, needs, tell

app = typer.Typer()


@app.command("report")
def report_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the PNGs (and index.html).")],
    user: Annotated[str | None, typer.Option(
        help="The user whose quota burn is drawn (default: the fullest quota).")] = None,
    node: Annotated[str | None, typer.Option(
        help="The node whose 30 days and 12 months are drawn (default: the busiest).")] = None,
    with_html: Annotated[bool, typer.Option("--html", help="Also write index.html.")] = False,
) -> None:
    """Draw the key dashboard views from InfluxDB, for operators without Grafana."""
    try:
        from quotaflow.dashboards.report import write_report
    except ImportError as exc:
        raise needs("dashboards", exc) from None
    from quotaflow.sinks.influxql import InfluxQL, InfluxQLError

    settings = load_settings()
    try:
        charts = write_report(InfluxQL.from_settings(settings), out, settings.timezone,
                              datetime.now(UTC), user=user, node=node, with_html=with_html)
    except InfluxQLError as exc:
        tell(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    for chart in charts:
        print(out / chart.file)
    if with_html:
        print(out / "index.html")
    if not charts:
        tell("[yellow]InfluxDB has no traffic to draw[/yellow]")
