"""A joined node at work: its gRPC server (Node + NodeInfo, mutual TLS unless insecure), its mDNS advertisement,
re-announcements when its free memory moves, and a goodbye on exit.

``run_member`` is what ``llama-node join`` runs: measure the device, find and join the coordinator, measure the
link, serve, advertise, and wait for SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from node.advertise import NODE_SERVICE, Advertiser, package_version
from node.authz import RoleInterceptor
from node.identity import Identity, JoinToken
from node.joining import (
    CoordinatorAddress,
    CoordinatorUnreachableError,
    device_pb,
    find_coordinator,
    join,
    measure_link,
)
from node.probe import DeviceMeasurement, measure_device, refresh_memory
from protos import PROTOCOL_VERSION
from protos.llama_node.v1 import cluster_pb2 as cpb
from protos.llama_node.v1 import cluster_pb2_grpc as cpb_grpc

log = logging.getLogger(__name__)

#: Re-announce when free memory moved by more than this fraction of the total (and at least 256 MB).
REANNOUNCE_FRACTION = 0.10


@dataclass
class MemberConfig:
    node_id: str
    name: str
    addresses: list[str]
    host: str
    port: int
    device: str
    memory_cap: int | None
    token: JoinToken | None  # None: --insecure
    coordinator: CoordinatorAddress | None  # None: find it by mDNS
    threads: int
    cache_dir: Path
    cache_max_bytes: int
    advertise: bool = True
    poll_s: float = 5.0
    parent_pid: int | None = None  # stop when this process is gone (local nodes of `serve --nodes N`)


class NodeInfoServicer(cpb_grpc.NodeInfoServicer):
    def __init__(self, describe: cpb.NodeDescription) -> None:
        self.description = describe

    async def Describe(self, request: cpb.DescribeRequest, context: aio.ServicerContext) -> cpb.NodeDescription:  # noqa: N802
        return self.description


async def _join_when_reachable(
    cfg: MemberConfig, device: DeviceMeasurement
) -> tuple[Identity | None, CoordinatorAddress]:
    """Find and join the coordinator, waiting while it is not up yet; a refusal or a failed pin ends the node."""
    delay = 0.5
    while True:
        where = cfg.coordinator or await find_coordinator(cfg.token.ca_sha256.hex()[:16] if cfg.token else None)
        try:
            return await join(where, cfg.token, cfg.node_id, cfg.addresses, cfg.port, device), where
        except CoordinatorUnreachableError as e:
            log.info("%s; retrying in %.1f s", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def txt_record(cfg: MemberConfig, device: DeviceMeasurement) -> dict[str, str]:
    """What the mDNS TXT record says: nothing secret."""
    return {"id": cfg.node_id, "ver": package_version(), "proto": str(PROTOCOL_VERSION),
            "kind": device.kind, "mem": str(device.memory_free), "memtotal": str(device.memory_total),
            "tflops": f"{device.tflops:.4f}", "tls": "0" if cfg.token is None else "1"}  # fmt: skip


def moved_a_lot(before: DeviceMeasurement, now: DeviceMeasurement) -> bool:
    threshold = max(REANNOUNCE_FRACTION * before.memory_total, 256e6)
    return abs(now.memory_free - before.memory_free) > threshold


async def _watch_parent(pid: int, stop: asyncio.Event, every_s: float = 1.0) -> None:
    """Set ``stop`` once process ``pid`` (the ``serve`` that started this node) is no longer this one's parent."""
    while not stop.is_set():
        if os.getppid() != pid:
            log.warning("the coordinator process %d that started this node is gone; stopping", pid)
            stop.set()
            return
        await asyncio.sleep(every_s)


async def run_member(cfg: MemberConfig, stop: asyncio.Event | None = None) -> None:
    """Join, serve and advertise until ``stop`` is set (or SIGTERM/SIGINT)."""
    from node.server import configure_torch
    from node.service import NodeService
    from node.servicer import CHANNEL_OPTIONS, NodeServicer, ProtocolInterceptor
    from node.slices import SliceCache
    from protos.llama_node.v1 import node_pb2_grpc as pb_grpc

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_parent(cfg.parent_pid, stop)) if cfg.parent_pid else None
    device = await asyncio.to_thread(measure_device, cfg.device, cfg.memory_cap, cfg.threads)
    if cfg.token is None:
        log.warning("INSECURE: --insecure node %s: no TLS, no authentication; anyone on this network can load, "
                    "read and drive it. Use only on a trusted test network.", cfg.node_id)  # fmt: skip
    joining = asyncio.create_task(_join_when_reachable(cfg, device))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({joining, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not joining.done():  # stopped while waiting for the coordinator
        joining.cancel()
        return
    stopping.cancel()
    identity, where = joining.result()
    link = await measure_link(where, identity, cfg.token)

    configure_torch(cfg.threads)
    service = NodeService(SliceCache(cfg.cache_dir, cfg.cache_max_bytes), device=device.kind, node_id=cfg.node_id)
    servicer = NodeServicer(service, identity.channel_credentials() if identity else None)
    description = cpb.NodeDescription(
        node_id=cfg.node_id, name=cfg.name, version=package_version(), protocol_version=PROTOCOL_VERSION,
        device=device_pb(device), link=link, addresses=cfg.addresses, port=cfg.port, secure=identity is not None,
    )  # fmt: skip
    info = NodeInfoServicer(description)
    interceptors = [RoleInterceptor(), ProtocolInterceptor()] if identity else [ProtocolInterceptor()]
    server = aio.server(interceptors=interceptors, options=CHANNEL_OPTIONS)
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    cpb_grpc.add_NodeInfoServicer_to_server(info, server)
    target = f"{cfg.host}:{cfg.port}"
    if identity is not None:
        bound = server.add_secure_port(target, identity.server_credentials())
    else:
        bound = server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"cannot listen on {target}")
    if bound != cfg.port:
        description.port = bound
    await server.start()
    log.info("node %s serving %s on %s:%d", cfg.node_id, "mutual TLS" if identity else "PLAIN TEXT (insecure)",
             cfg.host, bound)  # fmt: skip
    advertiser: Advertiser | None = None
    try:
        if cfg.advertise:
            advertiser = Advertiser(NODE_SERVICE, cfg.node_id, bound, cfg.addresses, txt_record(cfg, device))
            await advertiser.start()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.poll_s)
            if stop.is_set():
                break
            now = await asyncio.to_thread(refresh_memory, device, cfg.memory_cap)
            if moved_a_lot(device, now):
                log.info("free memory moved from %.2f GB to %.2f GB", device.memory_free / 1e9, now.memory_free / 1e9)
                device = now
                description.device.CopyFrom(device_pb(device))
                if advertiser is not None:
                    await advertiser.update(txt_record(cfg, device))
    finally:
        log.info("node %s stopping", cfg.node_id)
        if advertiser is not None:
            with contextlib.suppress(Exception):
                await advertiser.close()
        await server.stop(grace=1.0)
        await servicer.close()
        service.compute.shutdown(wait=False, cancel_futures=True)
        if watcher is not None:
            watcher.cancel()
