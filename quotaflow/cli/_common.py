"""What every command group shares: the error console, the settings, Kafka failures."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape

from quotaflow.core.settings import Settings

if TYPE_CHECKING:
    from quotaflow.catalog import Snapshot

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
    "dashboards": {"grafana_foundation_sdk", "grafana_client", "matplotlib", "niquests"},
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



def tell(message: str) -> None:
    """A message for the operator, on stderr: rich markup, not wrapped (it may be copied)."""
    console.print(message, highlight=False, soft_wrap=True)


@contextmanager
def catalog_failures() -> Iterator[None]:
    """Exit 1 with the message when Kafka fails (`quotaflow.catalog.CatalogError`).

    Raises the `needs("pipeline")` exit when kafka-python is missing.
    """
    try:
        from quotaflow.catalog import CatalogError
    except ImportError as exc:
        raise needs("pipeline", exc) from None
    try:
        yield
    except CatalogError as exc:
        tell(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None


def warn_left_out(snapshot: Snapshot[Any]) -> None:
    """Tell the operator about records of a compacted topic that were left out."""
    for problem in snapshot.problems:
        tell(f"[yellow]left out:[/yellow] {escape(str(problem))}")
