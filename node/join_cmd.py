"""``llama-node join``: measure this machine, join the cluster with its token, serve a stage, advertise by mDNS."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

import typer

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "llama-node" / "slices"


def join_command(
    token: str | None = typer.Option(
        None, "--token", envvar="LLAMA_NODE_TOKEN", help="the join token `llama-node serve` printed"
    ),  # fmt: skip
    coordinator: str | None = typer.Option(
        None, "--coordinator", "-c", help="HOST:PORT of the coordinator (default: find it by mDNS)"
    ),  # fmt: skip
    name: str | None = typer.Option(None, "--name", help="this node's name (default: the hostname)"),
    port: int = typer.Option(50051, "--port", "-p", min=0, max=65535, help="TCP port of the node's gRPC server"),
    memory: str | None = typer.Option(None, "--memory", help="cap on the memory this node offers, e.g. 12GB"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 or mps"),
    address: list[str] = typer.Option(
        [],
        "--address",
        help="IP to advertise and certify (repeatable; default: every LAN address of this machine, never 127.x)",
    ),  # fmt: skip
    host: str = typer.Option("0.0.0.0", "--host", help="address to listen on"),
    no_mdns: bool = typer.Option(
        False,
        "--no-mdns",
        help="do not advertise by mDNS (needs --coordinator; the coordinator then finds this node by --peer)",
    ),  # fmt: skip
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no token: ONLY for trusted test networks"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads for this node's compute"),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, "--cache-dir", help="where received slices are kept"),
    cache_gb: float = typer.Option(20.0, "--cache-gb", min=0.0, help="size cap of the slice cache (GB)"),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR"),
    parent_pid: int | None = typer.Option(None, "--parent-pid", hidden=True, help="stop when this parent is gone"),
) -> None:
    """Join a cluster: this machine serves whatever layers the coordinator plans for it."""
    logging.getLogger().setLevel(log_level.upper())
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # several processes may share the cores
    import asyncio

    from node.identity import JoinToken, TokenError
    from node.joining import CoordinatorAddress, JoinError
    from node.member import MemberConfig, run_member
    from node.probe import lan_addresses, parse_size

    if insecure == (token is not None):
        typer.echo("error: give --token (from `llama-node serve`) or, on a trusted test network, --insecure", err=True)
        raise typer.Exit(2)
    try:
        parsed = JoinToken.parse(token) if token is not None else None
        where = CoordinatorAddress.parse(coordinator) if coordinator else None
        cap = parse_size(memory) if memory else None
    except (TokenError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if no_mdns and coordinator is None:
        typer.echo("error: --no-mdns needs --coordinator HOST:PORT", err=True)
        raise typer.Exit(2)
    addresses = list(address) or lan_addresses()
    if not addresses:
        typer.echo("error: this machine has no LAN address; pass --address IP", err=True)
        raise typer.Exit(2)
    base = name or socket.gethostname().split(".")[0] or "node"
    cfg = MemberConfig(
        node_id=f"{base}-{secrets.token_hex(3)}", name=base, addresses=addresses, host=host, port=port,
        device=device, memory_cap=cap, token=parsed, coordinator=where, threads=threads, cache_dir=cache_dir,
        cache_max_bytes=int(cache_gb * 1e9), advertise=not no_mdns, parent_pid=parent_pid,
    )  # fmt: skip
    try:
        asyncio.run(run_member(cfg))
    except JoinError as e:
        log.error("%s", e)
        raise typer.Exit(3) from None
