"""What every command group shares: the error console and the settings."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from quotaflow.core.settings import Settings

console = Console(stderr=True)


def load_settings() -> Settings:
    """The QUOTAFLOW_* settings, or exit 2 with what is wrong with them."""
    try:
        return Settings()
    except ValueError as exc:
        console.print(f"[red]bad QUOTAFLOW_* setting:[/red] {exc}")
        raise typer.Exit(2) from None


# The third-party libraries each install extra brings (see pyproject.toml).
EXTRA_LIBRARIES = {
    "agent": {"kafka", "grpc", "google", "aiohttp", "prometheus_client"},
    "pipeline": {"faust", "mode", "aiokafka", "kafka", "influxdb_client"},
}


def needs(extra: str, exc: ImportError) -> typer.Exit:
    """Say which install extra a command needs, when its libraries are missing.

    An ImportError of anything else is a bug, and raised as it is.
    """
    if (exc.name or "").split(".")[0] not in EXTRA_LIBRARIES[extra]:
        raise exc
    # escaped: rich would take "[pipeline]" for a style tag and drop it from the message
    console.print(
        f"[red]this command needs {escape(f'quotaflow[{extra}]')}[/red] "
        + escape(f"(pip install 'quotaflow[{extra}]'): {exc}")
    )
    return typer.Exit(2)
