"""The ``llama-node`` command line. Each command is a thin wrapper; the work lives in importable modules.

Each command's module is imported only when that command is looked up (``_LazyCommands``): ``llama-node run``
imports ``coordinator.run_cmd`` and none of plan's planner, serve's or cluster's modules (issue #8, cold start).
``--help`` and a mistyped command's suggestions still see every command, in the order of ``COMMANDS``. Heavy
modules (torch, grpc) are imported inside the commands, so ``llama-node --help`` and ``llama-node plan`` stay fast
and torch-free.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import typer
from typer.core import TyperGroup

#: command name -> (module, function): the order is ``--help``'s
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("coordinator.run_cmd", "run_command"),
    "plan": ("coordinator.plan_cmd", "plan_command"),
    "node": ("node.node_cmd", "node_command"),
    "serve": ("coordinator.serve_cmd", "serve_command"),
    "join": ("node.join_cmd", "join_command"),
    "cluster": ("coordinator.cluster_cmd", "cluster_command"),
    "status": ("coordinator.status_cmd", "status_command"),
}


def command_function(name: str) -> Callable[..., Any]:
    """The function behind command ``name`` (imports its module)."""
    module, attr = COMMANDS[name]
    fn: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return fn


def _build_command(name: str) -> typer.core.TyperCommand:
    """The click command typer makes of ``name``'s function, as it would for a command registered on ``app``."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(command_function(name))
    command = typer.main.get_command(single)  # one command, no callback: the command itself, not a group
    assert isinstance(command, typer.core.TyperCommand)
    return command


class _LazyCommands(MutableMapping[str, Any]):
    """A group's ``commands``: every name of ``COMMANDS`` from the start, each command built on first access."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}
        self._extra: dict[str, Any] = {}  # added with ``add_command``

    def __getitem__(self, name: str) -> Any:
        if name in self._extra:
            return self._extra[name]
        if name not in COMMANDS:
            raise KeyError(name)
        if name not in self._built:
            self._built[name] = _build_command(name)
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._extra[name] = command

    def __delitem__(self, name: str) -> None:
        del self._extra[name]

    def __iter__(self) -> Iterator[str]:
        yield from COMMANDS
        yield from (n for n in self._extra if n not in COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS) + sum(n not in COMMANDS for n in self._extra)


class _LazyGroup(TyperGroup):
    """``app``'s click group, with ``_LazyCommands`` for its commands."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _LazyCommands()


app = typer.Typer(
    name="llama-node",
    help="Run one Llama across the machines of a household.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_LazyGroup,
)


@app.callback()
def _group() -> None:
    """No options of its own: it makes typer build ``app`` as a group (``_LazyGroup``) with no command registered."""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # ``python -m coordinator.cli``: how ``serve --nodes N`` starts its local ``join`` nodes
    main()
