"""mDNS advertisement (zeroconf): nodes as ``_llama-node._tcp.local.``, the coordinator as ``_llama-coord._tcp.local.``

TXT records carry no secret: the node's id, versions, device kind, memory and compute (the coordinator, its id and
a prefix of its CA hash, so a node picks its own cluster's coordinator when several share a LAN). Instance names
are the node id, unique per process even where machines share a hostname. Only the given LAN addresses are
advertised, never 127.x. ``update`` re-announces new TXT values; ``close`` says goodbye.
"""

from __future__ import annotations

import importlib.metadata
import logging
import socket
from collections.abc import Mapping, Sequence

from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

log = logging.getLogger(__name__)

NODE_SERVICE = "_llama-node._tcp.local."
COORDINATOR_SERVICE = "_llama-coord._tcp.local."


def package_version() -> str:
    try:
        return importlib.metadata.version("llama-node")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def instance_name(label: str, service_type: str) -> str:
    """``label.service_type`` with the label made DNS-safe and at most 63 bytes."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)[:63]
    return f"{safe}.{service_type}"


class Advertiser:
    """One service registered by mDNS on every interface (IPv4), for as long as it is open."""

    def __init__(
        self,
        service_type: str,
        label: str,
        port: int,
        addresses: Sequence[str],
        properties: Mapping[str, str],
        zc: AsyncZeroconf | None = None,
    ) -> None:
        addresses = [a for a in addresses if not a.startswith("127.")]  # loopback is nobody else's way in
        if not addresses:
            raise ValueError("nothing to advertise: no LAN address (loopback is never advertised)")
        self._own_zc = zc is None
        self.zc = zc or AsyncZeroconf(ip_version=IPVersion.V4Only)
        self.info = ServiceInfo(
            service_type,
            instance_name(label, service_type),
            port=port,
            properties=dict(properties),
            server=f"{instance_name(label, 'local.').split('.')[0]}.local.",
            addresses=[socket.inet_aton(a) for a in addresses],
        )
        self.addresses = list(addresses)

    async def start(self) -> None:
        await self.zc.async_register_service(self.info, allow_name_change=False)
        log.info("advertised as %s on addresses %s port %d (TXT %s)", self.info.name, ", ".join(self.addresses),
                 self.info.port, _txt(self.info))  # fmt: skip

    async def update(self, properties: Mapping[str, str]) -> None:
        self.info = ServiceInfo(
            self.info.type, self.info.name, port=self.info.port, properties=dict(properties),
            server=self.info.server, addresses=self.info.addresses,
        )  # fmt: skip
        await self.zc.async_update_service(self.info)
        log.info("re-announced %s (TXT %s)", self.info.name, _txt(self.info))

    async def close(self) -> None:
        try:
            goodbye = await self.zc.async_unregister_service(self.info)
            await goodbye  # the goodbye packets are really sent before the sockets close
            log.info("said goodbye: %s is no longer advertised", self.info.name)
        finally:
            if self._own_zc:
                await self.zc.async_close()


def _txt(info: ServiceInfo) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(info.decoded_properties.items()))
