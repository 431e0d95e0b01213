"""``llama-node node``: serve whatever stage the coordinator gives this process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "llama-node" / "slices"


def node_command(
    port: int = typer.Option(50051, "--port", "-p", min=0, max=65535, help="TCP port (0: any free port)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0 for the LAN)"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads for this node's compute"),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, "--cache-dir", help="where received slices are kept"),
    cache_gb: float = typer.Option(20.0, "--cache-gb", min=0.0, help="size cap of the slice cache (GB)"),
    device: str = typer.Option("cpu", "--device", help="torch device for the stage"),
    port_file: Path | None = typer.Option(None, "--port-file", help="write the bound port here once listening"),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR"),
) -> None:
    """Start a node process that hosts whatever stage it is given."""
    logging.getLogger().setLevel(log_level.upper())
    # Several nodes share few cores: OpenMP threads must sleep, not spin, between layers. Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import asyncio

    from node.server import serve

    asyncio.run(
        serve(
            host=host,
            port=port,
            threads=threads,
            cache_dir=cache_dir,
            cache_max_bytes=int(cache_gb * 1e9),
            device=device,
            port_file=port_file,
        )
    )
