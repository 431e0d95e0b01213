"""``python -m node`` is ``llama-node node`` (how the coordinator spawns local nodes)."""

from __future__ import annotations

import logging

import typer

from node.node_cmd import node_command


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    typer.run(node_command)


if __name__ == "__main__":
    main()
