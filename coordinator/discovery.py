"""Finding nodes: an asyncio zeroconf browser for ``_llama-node._tcp.local.`` and a ``--peer host:port`` list, both
feeding one ``NodeRegistry`` that says, in plain words, who came and who went.

A node is only listed once its own server answered ``Describe`` over mutual TLS (a certificate from this cluster's
CA for the address it was found at), so an mDNS advertisement from a stranger adds nothing. When nothing is found
for a while, the log says which interfaces were listened on and suggests ``--peer``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from node.advertise import NODE_SERVICE
from node.probe import interfaces_summary
from protos import PROTOCOL_METADATA_KEY, PROTOCOL_VERSION
from protos.llama_node.v1 import cluster_pb2 as cpb
from protos.llama_node.v1 import cluster_pb2_grpc as cpb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node as the coordinator reaches it: where, found how, and what it said about itself."""

    node_id: str
    address: str  # host:port
    source: str  # mdns or peer
    description: cpb.NodeDescription
    found_at: float  # time.time() when it was first listed

    def summary(self) -> str:
        d = self.description.device
        return f"{self.node_id} at {self.address} ({d.kind}, {d.memory_free / 1e9:.2f} GB free, via {self.source})"


Listener = Callable[[], None]


class NodeRegistry:
    """The nodes known now, by id. Listeners are called (on the event loop) after every change."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        self.changed = asyncio.Event()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def upsert(self, record: NodeRecord) -> None:
        old = self.nodes.get(record.node_id)
        if old is not None and old.address == record.address and old.description == record.description:
            return
        if old is not None:
            record = NodeRecord(record.node_id, record.address, old.source, record.description, old.found_at)
        self.nodes[record.node_id] = record
        log.info("node %s %s; node list: %s", "updated:" if old else "joined the list:", record.summary(),
                 self.describe())  # fmt: skip
        self._notify()

    def remove(self, node_id: str, why: str) -> None:
        if self.nodes.pop(node_id, None) is not None:
            log.info("node %s left (%s); node list: %s", node_id, why, self.describe())
            self._notify()

    def by_address(self, address: str) -> NodeRecord | None:
        return next((r for r in self.nodes.values() if r.address == address), None)

    def describe(self) -> str:
        if not self.nodes:
            return "empty"
        return f"{len(self.nodes)} node(s): " + "; ".join(r.summary() for r in self.nodes.values())

    def _notify(self) -> None:
        self.changed.set()
        for listener in self._listeners:
            listener()


async def describe_node(address: str, credentials: grpc.ChannelCredentials | None, timeout: float = 3.0
                        ) -> cpb.NodeDescription:  # fmt: skip
    """Ask the node at ``address`` what it is (mutual TLS when ``credentials``)."""
    channel = (aio.secure_channel(address, credentials) if credentials is not None
               else aio.insecure_channel(address))  # fmt: skip
    async with channel:
        reply = await cpb_grpc.NodeInfoStub(channel).Describe(
            cpb.DescribeRequest(), timeout=timeout, metadata=((PROTOCOL_METADATA_KEY, str(PROTOCOL_VERSION)),)
        )
    if reply.protocol_version != PROTOCOL_VERSION:
        raise ValueError(f"node {address} speaks llama-node protocol {reply.protocol_version}, this coordinator "
                         f"{PROTOCOL_VERSION}: run the same llama-node version on both")  # fmt: skip
    return reply


class Discovery:
    """mDNS browsing (unless ``mdns`` is False) and ``peers`` polling into ``registry``."""

    def __init__(
        self,
        registry: NodeRegistry,
        credentials: grpc.ChannelCredentials | None,
        peers: Sequence[str] = (),
        *,
        mdns: bool = True,
        poll_s: float = 2.0,
        quiet_warning_s: float = 10.0,
    ) -> None:
        self.registry, self.credentials, self.peers = registry, credentials, list(peers)
        self.mdns, self.poll_s, self.quiet_warning_s = mdns, poll_s, quiet_warning_s
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._mdns_names: dict[str, str] = {}  # mDNS instance name -> node id
        self.started_at = 0.0

    async def start(self, zc: AsyncZeroconf | None = None) -> None:
        self.started_at = time.time()
        if self.mdns:
            self._azc = zc or AsyncZeroconf(ip_version=IPVersion.V4Only)
            self._browser = AsyncServiceBrowser(self._azc.zeroconf, [NODE_SERVICE], handlers=[self._on_change])
            log.info("browsing mDNS for %s on %s", NODE_SERVICE, "; ".join(interfaces_summary()))
        if self.peers:
            log.info("polling peers %s", ", ".join(self.peers))
        self._spawn(self._poll_peers())
        self._spawn(self._watch_quiet())

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            node_id = self._mdns_names.pop(name, None)
            known = self.registry.nodes.get(node_id or "")
            if node_id is not None and known is not None and known.source == "mdns":
                self.registry.remove(node_id, "said goodbye by mDNS")
            return
        self._spawn(self._resolve(zeroconf, service_type, name))

    async def _resolve(self, zc: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zc, 3000) or info.port is None:
            log.warning("mDNS: %s did not resolve", name)
            return
        addresses = [a for a in info.parsed_addresses(IPVersion.V4Only) if not a.startswith("127.")]
        if not addresses:
            log.warning("mDNS: %s advertises no LAN address; ignored", name)
            return
        txt_id = info.decoded_properties.get("id") or ""
        for addr in addresses:
            address = f"{addr}:{info.port}"
            try:
                desc = await describe_node(address, self.credentials)
            except (aio.AioRpcError, ValueError) as e:
                why = f"{e.code().name}: {e.details()}" if isinstance(e, aio.AioRpcError) else str(e)
                log.warning("mDNS: %s (id %s) at %s did not prove membership of this cluster (%s); ignored", name,
                            txt_id, address, why)  # fmt: skip
                continue
            if txt_id and desc.node_id != txt_id:
                log.warning("mDNS: %s says id %s but its server says %s; ignored", name, txt_id, desc.node_id)
                return
            self._mdns_names[name] = desc.node_id
            self.registry.upsert(NodeRecord(desc.node_id, address, "mdns", desc, time.time()))
            return

    async def _poll_peers(self) -> None:
        while self.peers:
            for peer in self.peers:
                try:
                    desc = await describe_node(peer, self.credentials)
                except Exception as e:  # any failure means: not (or no longer) a member we can reach
                    known = self.registry.by_address(peer)
                    if known is not None and known.source == "peer":
                        self.registry.remove(known.node_id, f"peer {peer} stopped answering")
                    else:
                        log.debug("peer %s not answering: %r", peer, e)
                    continue
                self.registry.upsert(NodeRecord(desc.node_id, peer, "peer", desc, time.time()))
            await asyncio.sleep(self.poll_s)

    async def _watch_quiet(self) -> None:
        while True:
            await asyncio.sleep(self.quiet_warning_s)
            if not self.registry.nodes:
                log.warning(
                    "no node found in %.0f s. mDNS listened on %s. If multicast is blocked on this network, run "
                    "`llama-node join --coordinator THIS_HOST:PORT` on the nodes and give their addresses here with "
                    "--peer HOST:PORT (repeatable).", time.time() - self.started_at, "; ".join(interfaces_summary()),
                )  # fmt: skip
