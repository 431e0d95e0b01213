"""Serving a node: a grpc.aio server on one TCP port, the servicer, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from grpc import aio

from node.service import NodeService, configure_torch
from node.servicer import CHANNEL_OPTIONS, NodeServicer, ProtocolInterceptor
from node.slices import SliceCache
from protos.llama_node.v1 import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


async def serve(
    *,
    host: str,
    port: int,
    threads: int,
    cache_dir: Path,
    cache_max_bytes: int,
    device: str = "cpu",
    port_file: Path | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT. With ``port 0`` the OS picks a port; ``port_file`` receives the one bound."""
    configure_torch(threads)
    service = NodeService(SliceCache(cache_dir, cache_max_bytes), device=device)
    servicer = NodeServicer(service)
    server = aio.server(interceptors=[ProtocolInterceptor()], options=CHANNEL_OPTIONS)
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    log.info(
        "node %s listening on %s:%d (%d torch threads, cache %s)", service.node_id, host, bound, threads, cache_dir
    )
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(bound))
        os.replace(tmp, port_file)  # the parent never reads a half-written port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("node %s stopping", service.node_id)
    await server.stop(grace=1.0)
    await servicer.close()
    service.compute.shutdown(wait=False, cancel_futures=True)
