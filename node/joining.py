"""A node's side of joining: find the coordinator (mDNS or ``--coordinator``), join it, measure the link to it.

Secure join: read the coordinator's CA from its TLS handshake and check it against the token's hash (the pin),
then call Join over TLS trusting only that CA, with a fresh key's CSR and an HMAC proof of the token. The signed
certificate comes back; from then on every link is mutual TLS.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass

import grpc
from grpc import aio
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from node.advertise import COORDINATOR_SERVICE
from node.identity import (
    COORDINATOR_TLS_NAME,
    Identity,
    JoinToken,
    PinError,
    fetch_pinned_ca,
    key_pem,
    make_csr,
    new_key,
)
from node.probe import DeviceMeasurement, interfaces_summary
from protos.llama_node.v1 import cluster_pb2 as cpb
from protos.llama_node.v1 import cluster_pb2_grpc as cpb_grpc

log = logging.getLogger(__name__)


class JoinError(RuntimeError):
    """The coordinator refused this node, or could not be trusted."""


class CoordinatorUnreachableError(JoinError):
    """Nothing answers at the coordinator's address (yet)."""


@dataclass(frozen=True, slots=True)
class CoordinatorAddress:
    host: str
    port: int
    coordinator_id: str = ""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> CoordinatorAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--coordinator {text!r}: expected HOST:PORT")
        return cls(host.strip("[]"), int(port))


async def find_coordinator(ca_prefix: str | None, timeout: float | None = None) -> CoordinatorAddress:
    """The first coordinator advertised by mDNS (with ``ca_prefix``: only our cluster's), waiting up to
    ``timeout`` seconds (None: forever, reminding which interfaces are listened on every 15 s)."""
    found: asyncio.Queue[CoordinatorAddress] = asyncio.Queue()
    azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    tasks: set[asyncio.Task[None]] = set()

    async def resolve(zc: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zc, 3000):
            return
        props = info.decoded_properties
        if ca_prefix is not None and props.get("ca") != ca_prefix:
            log.info("ignoring coordinator %s: another cluster (CA %s…)", name, props.get("ca"))
            return
        for addr in info.parsed_addresses(IPVersion.V4Only):
            if not addr.startswith("127.") and info.port is not None:
                await found.put(CoordinatorAddress(addr, info.port, props.get("id") or ""))
                return

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.ensure_future(resolve(zeroconf, service_type, name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(azc.zeroconf, [COORDINATOR_SERVICE], handlers=[on_change])
    log.info("looking for a coordinator by mDNS (%s) on %s", COORDINATOR_SERVICE, "; ".join(interfaces_summary()))
    start = time.monotonic()
    try:
        while True:
            wait = 15.0 if timeout is None else max(0.0, min(15.0, timeout - (time.monotonic() - start)))
            try:
                where = await asyncio.wait_for(found.get(), wait)
                log.info("found coordinator %s at %s by mDNS", where.coordinator_id or "?", where)
                return where
            except TimeoutError:
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise JoinError(f"no coordinator found by mDNS in {timeout:.0f} s") from None
                log.warning("no coordinator found by mDNS yet (listening on %s); if multicast is blocked on this "
                            "network, pass --coordinator HOST:PORT", "; ".join(interfaces_summary()))  # fmt: skip
    finally:
        await browser.async_cancel()
        await azc.async_close()


def device_pb(m: DeviceMeasurement) -> cpb.DeviceInfo:
    return cpb.DeviceInfo(kind=m.kind, name=m.name, memory_total=m.memory_total, memory_free=m.memory_free,
                          tflops=m.tflops, membw_gbs=m.membw_gbs, host_id=m.host_id,
                          host_memory_free=m.host_memory_free, host_cores=m.host_cores,
                          threads=m.threads)  # fmt: skip


def coordinator_channel(where: CoordinatorAddress, credentials: grpc.ChannelCredentials | None) -> aio.Channel:
    if credentials is None:
        return aio.insecure_channel(str(where))
    options = [("grpc.ssl_target_name_override", COORDINATOR_TLS_NAME)]  # pinned by hash, not by name
    return aio.secure_channel(str(where), credentials, options=options)


async def join(
    where: CoordinatorAddress,
    token: JoinToken | None,
    node_id: str,
    addresses: list[str],
    port: int,
    device: DeviceMeasurement,
    timeout: float = 10.0,
) -> Identity | None:
    """Join the coordinator at ``where``; the node's identity (None when ``token`` is None: an insecure cluster).

    Raises:
        JoinError: refused (wrong token), or the coordinator is not the pinned one, or unreachable.
    """
    key = new_key()
    csr = make_csr(key, node_id) if token is not None else b""
    request = cpb.JoinRequest(node_id=node_id, csr_der=csr, proof=token.proof(csr) if token else b"",
                              addresses=addresses, port=port, device=device_pb(device))  # fmt: skip
    creds: grpc.ChannelCredentials | None = None
    ca_pem = b""
    if token is not None:
        try:
            ca_pem = await asyncio.to_thread(fetch_pinned_ca, where.host, where.port, token.ca_sha256, timeout)
        except PinError as e:
            raise JoinError(f"cannot join {where}: {e}") from None
        except OSError as e:
            raise CoordinatorUnreachableError(f"coordinator {where} unreachable: {e}") from None
        creds = grpc.ssl_channel_credentials(ca_pem)
    async with coordinator_channel(where, creds) as channel:
        try:
            reply = await cpb_grpc.CoordinatorStub(channel).Join(request, timeout=timeout)
        except aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and token is None:
                raise CoordinatorUnreachableError(f"coordinator {where} unreachable: {e.details()}") from None
            raise JoinError(f"coordinator {where} refused the join: {e.code().name}: {e.details()}") from None
    if token is None:
        log.warning("joined coordinator %s at %s WITHOUT authentication (--insecure)", reply.coordinator_id, where)
        return None
    if not reply.certificate_pem or reply.ca_pem != ca_pem:
        raise JoinError(f"coordinator {where} answered without a certificate signed by the pinned CA")
    log.info("joined coordinator %s at %s as %s; certificate signed for addresses %s", reply.coordinator_id, where,
             node_id, ", ".join(addresses))  # fmt: skip
    return Identity(key_pem(key), bytes(reply.certificate_pem), ca_pem)


async def measure_link(
    where: CoordinatorAddress,
    identity: Identity | None,
    token: JoinToken | None,
    pings: int = 5,
    payload_bytes: int = 4 << 20,
) -> cpb.LinkInfo:
    """Latency (median round trip of a small Echo) and bandwidth (one ``payload_bytes`` Echo) to the coordinator."""
    creds = grpc.ssl_channel_credentials(identity.ca_pem) if identity is not None else None
    proof = token.purpose_proof("echo") if token is not None else b""
    options: list[tuple[str, str | int]] = [("grpc.max_send_message_length", payload_bytes + 1024)]
    if creds is not None:
        options.append(("grpc.ssl_target_name_override", COORDINATOR_TLS_NAME))
    channel = (aio.secure_channel(str(where), creds, options=options) if creds is not None
               else aio.insecure_channel(str(where), options=options))  # fmt: skip
    async with channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        await stub.Echo(cpb.EchoRequest(proof=proof), timeout=10)  # connection set up outside the measurement
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            await stub.Echo(cpb.EchoRequest(payload=b"x", proof=proof), timeout=10)
            rtts.append(time.perf_counter() - t0)
        latency = statistics.median(rtts)
        t0 = time.perf_counter()
        await stub.Echo(cpb.EchoRequest(payload=bytes(payload_bytes), proof=proof), timeout=60)
        elapsed = max(time.perf_counter() - t0 - latency, 1e-6)
    link = cpb.LinkInfo(latency_ms=round(latency * 1e3, 3), bandwidth_gbits=round(payload_bytes * 8 / elapsed / 1e9, 3))
    log.info("link to coordinator %s: %.2f ms round trip, %.2f Gbit/s", where, link.latency_ms, link.bandwidth_gbits)
    return link
