"""`quotaflow local`: Kafka and InfluxDB on loopback, for trying quotaflow and for its tests."""

from __future__ import annotations

import importlib.util
import json
from typing import Annotated

import typer

from quotaflow.cli._common import console, needs

app = typer.Typer(no_args_is_help=True, help="Run Kafka and InfluxDB on loopback.")


def _need_kafka_client() -> None:
    """`up` and `status` ask the broker for metadata with kafka-python (in either extra)."""
    if importlib.util.find_spec("kafka") is None:
        missing = ModuleNotFoundError("No module named 'kafka' (kafka-python)", name="kafka")
        raise needs("agent", missing)


@app.command("up")
def local_up(
    env: Annotated[bool, typer.Option("--env", help="Print export lines only.")] = False,
) -> None:
    """Install (first time) and start Kafka and InfluxDB on loopback."""
    from quotaflow.dev import local

    _need_kafka_client()
    services = local.up()
    if env:
        for key, value in services.env().items():
            print(f"export {key}={value}")
    else:
        console.print(f"Kafka    {services.kafka_bootstrap}\nInfluxDB {services.influx_url}")
        console.print("Use them with: eval \"$(quotaflow local up --env)\"")


@app.command("down")
def local_down() -> None:
    """Stop what `local up` started."""
    from quotaflow.dev import local

    local.down()


@app.command("status")
def local_status() -> None:
    """Say what runs where."""
    from quotaflow.dev import local

    _need_kafka_client()
    print(json.dumps(local.status(), indent=2, default=str))
