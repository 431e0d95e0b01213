"""The ``llama-node`` command line. Each command is a thin wrapper; the work lives in importable modules.

Heavy modules (torch, grpc) are imported inside the commands, so ``llama-node --help`` and ``llama-node plan`` stay
fast and torch-free.
"""

from __future__ import annotations

import logging

import typer

from coordinator.cluster_cmd import cluster_command
from coordinator.plan_cmd import plan_command
from coordinator.run_cmd import run_command
from coordinator.serve_cmd import serve_command
from coordinator.status_cmd import status_command
from node.join_cmd import join_command
from node.node_cmd import node_command

app = typer.Typer(
    name="llama-node",
    help="Run one Llama across the machines of a household.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("run")(run_command)
app.command("plan")(plan_command)
app.command("node")(node_command)
app.command("serve")(serve_command)
app.command("join")(join_command)
app.command("cluster")(cluster_command)
app.command("status")(status_command)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # ``python -m coordinator.cli``: how ``serve --nodes N`` starts its local ``join`` nodes
    main()
