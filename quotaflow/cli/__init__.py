"""The `quotaflow` command line, a leaf on top of everything else: one module per command group.

* `node`: `agent`, `push-receiver`, `parse` (what runs on a proxy node);
* `pipeline`: `worker`, `sink influx`, `run` (the central pipeline);
* `query`: `usage`, `top` (totals read back from InfluxDB);
* `plans`: `plans import|set|show|list|delete|export` (users' quota plans);
* `nodes`: `nodes set|list` (nodes' billing rates);
* `control`: `control tail` (the quota commands, as they come);
* `enforce`: `enforce` (the central enforcement consumer);
* `dev`: `simulate`, `replay`, `check` (development and testing);
* `local`: `local up|down|status` (Kafka and InfluxDB on loopback);
* `dashboards`: `dashboards build|push` (the Grafana dashboards);
* `report`: `report` (PNG charts and an HTML page from the dashboards' queries).

Edges (Kafka, Faust, InfluxDB) are imported inside the commands that need them,
so `quotaflow --help` and a node's install (`quotaflow[agent]`) work without the
pipeline's libraries.
"""

from __future__ import annotations

import os

import typer

from quotaflow.cli import (
    control,
    dashboards,
    dev,
    enforce,
    local,
    node,
    nodes,
    pipeline,
    plans,
    query,
    report,
)

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Exact traffic accounting for proxy and VPN fleets, on Kafka, Faust and InfluxDB.",
)
for group in (node.app, pipeline.app, query.app, enforce.app, dev.app, report.app):
    app.add_typer(group)
app.add_typer(plans.app, name="plans")
app.add_typer(nodes.app, name="nodes")
app.add_typer(control.app, name="control")
app.add_typer(local.app, name="local")
app.add_typer(dashboards.app, name="dashboards")


def main() -> None:
    """Entry point of the `quotaflow` script."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
