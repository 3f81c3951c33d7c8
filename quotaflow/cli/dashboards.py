"""`quotaflow dashboards build|push`: the Grafana dashboards as code (quotaflow.dashboards)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from quotaflow.cli._common import load_settings, needs, tell

app = typer.Typer(no_args_is_help=True, help="Grafana dashboards: build the JSON, push it.")

Zone = Annotated[
    str | None,
    typer.Option(help="The billing zone of the dashboards (default: QUOTAFLOW_TIMEZONE)."),
]


def _zone(timezone: str | None) -> str:
    return timezone or load_settings().timezone


@app.command("build")
def build_cmd(
    out: Annotated[Path | None, typer.Option(help="Folder for <uid>.json (default: "
                                             "dashboards/build/).")] = None,
    timezone: Zone = None,
) -> None:
    """Write the dashboards' JSON, built with grafana-foundation-sdk."""
    try:
        from quotaflow.dashboards.boards import BUILD_DIR, write_build
    except ImportError as exc:
        raise needs("dashboards", exc) from None
    for path in write_build(_zone(timezone), out or BUILD_DIR):
        print(path)


@app.command("push")
def push_cmd(
    url: Annotated[str, typer.Option(help="Grafana's root URL.")],
    token: Annotated[str, typer.Option(envvar="GRAFANA_TOKEN",
                                       help="A service account token (or GRAFANA_TOKEN).")],
    folder: Annotated[str, typer.Option(help="The folder (title); created if missing.")] =
        "quotaflow",
    datasource: Annotated[str | None, typer.Option(
        help="The InfluxDB data source the dashboards select (by name).")] = None,
    create_datasource: Annotated[bool, typer.Option(
        help="Create --datasource when missing, InfluxQL on QUOTAFLOW_INFLUX_URL and "
             "QUOTAFLOW_INFLUX_BUCKET.")] = False,
    timezone: Zone = None,
) -> None:
    """Upload the dashboards through Grafana's HTTP API; again replaces them (same uids)."""
    try:
        from quotaflow.dashboards.boards import build_all
        from quotaflow.dashboards.push import InfluxSource, PushError, push
    except ImportError as exc:
        raise needs("dashboards", exc) from None
    settings = load_settings()
    source = None
    if create_datasource:
        if not datasource:
            raise typer.BadParameter("--create-datasource needs --datasource NAME")
        source = InfluxSource(datasource, settings.influx_url, settings.influx_bucket,
                              settings.influx_token.get_secret_value())
    try:
        result = push(url, token, build_all(timezone or settings.timezone), folder=folder,
                      datasource=datasource, create_datasource=source)
    except PushError as exc:
        tell(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    if result.folder_created:
        tell(f"created the folder {escape(folder)!r}")
    if result.datasource_created:
        tell(f"created the data source {escape(datasource or '')!r}")
    for dashboard in result.dashboards:
        print(f"{url.rstrip('/')}{dashboard}")
