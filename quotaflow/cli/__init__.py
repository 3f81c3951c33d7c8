"""The `quotaflow` command line, a leaf on top of everything else: one module per command group.

* `node`: `agent`, `push-receiver`, `parse` (what runs on a proxy node);
* `pipeline`: `worker`, `sink influx`, `run` (the central pipeline);
* `query`: `usage`, `top` (totals read back from InfluxDB);
* `dev`: `simulate`, `replay`, `check` (development and testing);
* `local`: `local up|down|status` (Kafka and InfluxDB on loopback).

Edges (Kafka, Faust, InfluxDB) are imported inside the commands that need them,
so `quotaflow --help` and a node's install (`quotaflow[agent]`) work without the
pipeline's libraries.
"""

from __future__ import annotations

import os

import typer

from quotaflow.cli import dev, local, node, pipeline, query

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Exact traffic accounting for proxy and VPN fleets, on Kafka, Faust and InfluxDB.",
)
for group in (node.app, pipeline.app, query.app, dev.app):
    app.add_typer(group)
app.add_typer(local.app, name="local")


def main() -> None:
    """Entry point of the `quotaflow` script."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
