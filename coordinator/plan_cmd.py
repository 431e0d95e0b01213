"""``llama-node plan``: placeholder until the planner lands (issue 5)."""

from __future__ import annotations

import typer


def plan_command(model: str = typer.Argument(..., help="model preset, config.json or GGUF")) -> None:
    """Plan how MODEL fits a set of declared devices (dry run)."""
    raise typer.Exit(code=1)
