"""What every command group shares: the error console and the settings."""

from __future__ import annotations

import typer
from rich.console import Console

from quotaflow.core.settings import Settings

console = Console(stderr=True)


def load_settings() -> Settings:
    """The QUOTAFLOW_* settings, or exit 2 with what is wrong with them."""
    try:
        return Settings()
    except ValueError as exc:
        console.print(f"[red]bad QUOTAFLOW_* setting:[/red] {exc}")
        raise typer.Exit(2) from None


def needs(extra: str, exc: ImportError) -> typer.Exit:
    """Say which install extra a command needs, when its libraries are missing."""
    console.print(
        f"[red]this command needs quotaflow[{extra}][/red] "
        f"(pip install 'quotaflow[{extra}]'): {exc}"
    )
    return typer.Exit(2)
