"""`quotaflow enforce`: the central enforcement consumer, for backends that are not node-local."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quotaflow.cli._common import load_settings, needs

app = typer.Typer()


@app.command("enforce")
def enforce_cmd(
    config: Annotated[
        Path, typer.Option("--config", help="The enforce.toml file (docs/enforcement.md).")
    ],
) -> None:
    """Apply the quota commands with backends that are not node-local (webhook, command).

    Group <prefix>-enforce-central, until SIGTERM/SIGINT; exit 78 on an unusable config.
    """
    try:
        from quotaflow.producers.enforce.consumer import run_central
    except ImportError as exc:
        raise needs("agent", exc) from None

    run_central(config, load_settings())
