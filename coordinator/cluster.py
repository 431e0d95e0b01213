"""The cluster as the coordinator runs it: CA and join endpoint, its own mDNS advertisement, node discovery, and
discovered nodes → plan → loaded stages → a pipeline client. When the node list changes, it re-plans and reloads.

``ClusterRuntime`` runs all of it on a background event loop, for ``llama-node serve``/``cluster``:

    rt = ClusterRuntime(ClusterSettings(model=path, state_dir=dir))
    line = rt.join_command()          # the exact `llama-node join --token …` line, for the user
    rt.wait_ready(timeout=60)         # planned and loaded
    engine = rt.engine(params, max_len)            # a TokenEngine for llama_shard.generate.generate
    rows = await rt.forward(rows)                  # or: one micro-batch, from any event loop
    rt.serve(uvicorn_server)          # `serve`: the HTTP server (and its scheduler) on that same loop, until it exits

No torch at import time (``llama-node --help`` stays fast): the pipeline modules are imported when used.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.cluster_defaults import DEFAULT_JOIN_PORT, DEFAULT_STATE_DIR
from coordinator.discovery import Discovery, NodeRecord, NodeRegistry
from coordinator.join_service import start_coordinator_server
from coordinator.pki import ClusterCA
from node.advertise import COORDINATOR_SERVICE, Advertiser, package_version
from node.identity import Role
from node.probe import lan_addresses
from protos.llama_node.v1 import cluster_pb2 as cpb

if TYPE_CHECKING:
    import grpc
    import uvicorn
    from grpc import aio

    from coordinator.pipeline.client import NodeClient, PipelineClient
    from coordinator.pipeline.engine import LoopThread, PipelineEngine
    from coordinator.planner import DeviceProfile, HostShare, ModelProfile, Plan, PlanOptions
    from llama_shard.quant import QuantMode
    from llama_shard.sampling import SamplingParams
    from node.wire import RowInput, RowOutput

log = logging.getLogger(__name__)


@dataclass
class ClusterSettings:
    """What ``serve`` needs to run a cluster (the flags ``--peer``, ``--insecure``, ``--state-dir``, …)."""

    model: Path
    state_dir: Path = DEFAULT_STATE_DIR
    insecure: bool = False
    peers: Sequence[str] = ()
    host: str = "0.0.0.0"
    port: int = DEFAULT_JOIN_PORT
    mdns: bool = True
    addresses: Sequence[str] = ()  # to advertise; default: this machine's LAN addresses
    context: int = 2048
    slots: int = 1
    min_nodes: int = 1
    required: Sequence[str] = ()  # host:port of nodes that must each hold a stage (serve --nodes N's own)
    port_fallback: bool = False  # if ``port`` is taken, listen on any free port (serve --nodes, default port)
    compute_dtype: str | None = None  # dense stages compute in this torch dtype (bfloat16, float16); None: float32
    settle_s: float = 1.0
    push: bool = True  # stream slices from the coordinator (nodes need no copy of the model)
    quantize: QuantMode | None = None  # gguf: the nodes hold the file's blocks packed; None: dense float32
    kv_cache: str | None = None  # the nodes' KV cache dtype by name (--kv-cache); None: see ``kv_dtype``
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_dtype(self) -> str:
        """The KV cache dtype every stage allocates and the plan sizes (``llama_shard.config.kv_cache_dtype``)."""
        from llama_shard.config import kv_cache_dtype

        compute = self.compute_dtype or "float32"
        return kv_cache_dtype(quantised=self.quantize is not None, compute=compute, requested=self.kv_cache)


def plan_options(profile: ModelProfile, context: int, slots: int, kv_dtype: str) -> PlanOptions:
    """What the cluster plans for: the engine computes in fp32 (4-byte activations) and caches keys and values in
    ``kv_dtype`` (``ClusterSettings.kv_dtype``); weights are sized as ``profile`` stores them (a GGUF header, or
    ``node_profile``'s), else as bf16 (an HF checkpoint, held in fp32 by dense stages: undercounted by half). With
    more than one slot the scheduler keeps a frame per stage in flight, so the plan minimises the slowest stage
    (throughput); with one, the time through all of them."""
    from coordinator.planner import Objective, PlanOptions, WeightFormat
    from llama_shard.config import KV_CACHE_BYTES

    weights = None if profile.stored is not None else WeightFormat.BF16
    objective = Objective.THROUGHPUT if slots > 1 else Objective.LATENCY
    return PlanOptions(context=context, batch=slots, kv_bytes_per_element=KV_CACHE_BYTES[kv_dtype],
                       activation_bytes=4, weights=weights, objective=objective)  # fmt: skip


def device_profiles(records: Sequence[NodeRecord]) -> tuple[list[DeviceProfile], dict[str, HostShare]]:
    """The planner's view of the nodes (as they measured themselves), and the machine each says it is on."""
    from coordinator.planner import DeviceProfile, HostShare, Memory

    devices, shares = [], {}
    for r in records:
        d, link = r.description.device, r.description.link
        devices.append(DeviceProfile.declare(
            r.node_id, Memory(int(d.memory_free)), d.kind or "cpu", tflops=d.tflops or None,
            membw_gbs=d.membw_gbs or None, link_gbits=link.bandwidth_gbits or None,
            latency_ms=link.latency_ms or None,
        ))  # fmt: skip
        shares[r.node_id] = HostShare(d.host_id, Memory(int(d.host_memory_free or d.memory_free)),
                                      cores=int(d.host_cores), threads=max(1, int(d.threads)))  # fmt: skip
    return devices, shares


def pipeline_depth(stages: Sequence[NodeRecord]) -> int:
    """Frames to keep in flight through ``stages``: one per stage, but stages on one machine count for no more
    than the frames its cores compute at once (``cores // threads``).

    One frame per stage keeps every stage busy when each stage has its own cores (a cluster of machines). But every
    frame pays a fixed cost per layer (kernel calls, Python, gRPC), and the packed kernel's cost grows well under
    linearly with rows, so when node processes share a machine's cores, a frame more buys overlap at the price of
    a dearer row. On 2 cores with 3 local nodes (1 thread each), 8 streams (``bench/timeline.py``, load average 2):
    two frames of 4 rows compute 1.28 frames at once at 3.76 ms of compute per row (340 rows/s); three (3, 3, 2
    rows) 1.58 at 4.53 ms (350); four of 2 rows 1.75 at 5.70 ms (307). With other work on those cores, three
    frames fall behind two (210 and 241 tok/s against 254 and 270): the extra compute thread waits for a core.
    """
    per_host: dict[str, list[NodeRecord]] = {}
    depth = 0
    for r in stages:
        if r.description.device.host_id and r.description.device.host_cores:
            per_host.setdefault(r.description.device.host_id, []).append(r)
        else:
            depth += 1
    for members in per_host.values():
        d = members[0].description.device
        depth += min(len(members), max(1, int(d.host_cores) // max(1, int(d.threads))))
    return max(1, depth)


def node_profile(profile: ModelProfile, packed: bool) -> ModelProfile:
    """``profile`` with the bytes the nodes will hold. Packed stages keep a GGUF's blocks at their stored size (types
    without a packed kernel become bf16 at load, which the stored sizes undercount). Dense stages of a GGUF hold 4
    bytes a weight, not its stored size."""
    import dataclasses

    from coordinator.planner.profiles import StoredWeights

    if packed or profile.stored is None:
        return profile
    layers = tuple(4 * profile.layer_params(i) for i in range(profile.n_layers))
    experts = tuple(4 * 3 * profile.dim * profile.expert_ffn_dim if i in profile.moe_layers else 0
                    for i in range(profile.n_layers))  # fmt: skip
    stored = StoredWeights("F32", layers, experts, 4 * profile.embed_params(), 4 * profile.head_params())
    return dataclasses.replace(profile, stored=stored)


class Cluster:
    """Runs on one event loop; see the module docstring."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.s = settings
        self.coordinator_id = f"{socket.gethostname().split('.')[0] or 'coordinator'}-{secrets.token_hex(3)}"
        self.ca: ClusterCA | None = None
        self.credentials: grpc.ChannelCredentials | None = None
        self.registry = NodeRegistry()
        self.discovery: Discovery | None = None
        self.state = "waiting for nodes"
        self.plan: Plan | None = None
        self.stage_nodes: list[tuple[str, str, int, int]] = []  # (node id, address, start, end) in order
        self.depth = 1  # frames in flight through the current pipeline (``pipeline_depth``)
        self.client: PipelineClient | None = None
        self.ready = asyncio.Event()
        self.port = 0
        self._server: aio.Server | None = None
        self._advertiser: Advertiser | None = None
        self._replanner: asyncio.Task[None] | None = None
        self._clients: list[NodeClient] = []

    async def start(self) -> None:
        if self.s.insecure:
            log.warning("INSECURE: --insecure coordinator: no TLS, no join token; any machine on this network can "
                        "join, read the weights and drive the nodes. Use only on a trusted test network.")  # fmt: skip
        else:
            self.ca = ClusterCA.load_or_create(self.s.state_dir)
            self.credentials = self.ca.identity(Role.coordinator).channel_credentials()
        try:
            self._server, self.port = await start_coordinator_server(
                self.ca, self.coordinator_id, self.snapshot, self.s.host, self.s.port
            )
        except (OSError, RuntimeError) as e:
            if not self.s.port_fallback or self.s.port == 0:
                raise OSError(f"cannot listen for joining nodes on {self.s.host}:{self.s.port}: {e}") from None
            log.warning("port %d is taken (another coordinator?); nodes join this one at another port", self.s.port)
            self._server, self.port = await start_coordinator_server(
                self.ca, self.coordinator_id, self.snapshot, self.s.host, 0
            )
        self.discovery = Discovery(self.registry, self.credentials, self.s.peers, mdns=self.s.mdns)
        await self.discovery.start()
        if self.s.mdns:
            addresses = list(self.s.addresses) or lan_addresses()
            ca = self.ca.token.ca_sha256.hex()[:16] if self.ca else ""
            txt = {"id": self.coordinator_id, "ver": package_version(), "role": "coordinator", "ca": ca,
                   "tls": "1" if self.ca else "0"}  # fmt: skip
            self._advertiser = Advertiser(COORDINATOR_SERVICE, self.coordinator_id, self.port, addresses, txt)
            await self._advertiser.start()
        self._replanner = asyncio.create_task(self._replan_loop())

    def join_command(self, address: str | None = None) -> str:
        """The line to run on other machines (``--coordinator`` too when ``address`` is given)."""
        where = f" --coordinator {address}:{self.port}" if address else ""
        if self.ca is None:
            return f"llama-node join --insecure{where}"
        return f"llama-node join --token {self.ca.token}{where}"

    async def _replan_loop(self) -> None:
        while True:
            await self.registry.changed.wait()
            await asyncio.sleep(self.s.settle_s)  # let a burst of arrivals settle into one plan
            self.registry.changed.clear()
            current = {(n, a) for n, a, _, _ in self.stage_nodes}
            known = {(r.node_id, r.address) for r in self.registry.nodes.values()}
            if self.client is not None and current == known:
                continue
            if len(known) < self.s.min_nodes:
                self.state = f"waiting for nodes ({len(known)} of {self.s.min_nodes})"
                log.info("%s", self.state)
                continue
            try:
                await self.replan()
            except Exception as e:
                self.state = f"not ready: {e}"
                log.error("cannot serve with the nodes known now: %s", e)

    async def replan(self) -> None:
        """Plan over the nodes known now, load the stages, and open the pipeline."""
        import torch

        from coordinator.pipeline.client import NodeClient, PipelineClient
        from coordinator.pipeline.local import StageOptions, load_pipeline
        from coordinator.planner import plan, share_hosts
        from coordinator.planner.loaders import load_model_profile
        from llama_shard.shard import ShardSpec

        self.ready.clear()
        records = dict(self.registry.nodes)
        self.state = f"planning over {len(records)} node(s)"
        from llama_shard.quant import QuantMode

        packed = self.s.quantize == QuantMode.gguf
        profile = node_profile(load_model_profile(str(self.s.model)), packed)
        devices, shares = device_profiles(list(records.values()))
        required = {r.node_id for r in records.values() if r.address in set(self.s.required)}
        options = plan_options(profile, self.s.context, self.s.slots, self.s.kv_dtype)
        chosen = plan(profile, share_hosts(devices, shares), options, keep=self.plan, require=required)
        stages = [(s.node, records[s.node].address, s.start, s.end) for s in chosen.stages]
        where = "; ".join(
            f"{n} at {a} holds layers [{b}, {e}) and {s.kv_bytes / 1e6:.1f} MB of KV"
            for (n, a, b, e), s in zip(stages, chosen.stages, strict=True)
        )
        log.info("plan over %d node(s): %s (%s KV cache); predicted %.1f ms/token", len(records), where,
                 self.s.kv_dtype, chosen.predicted_ms)  # fmt: skip
        self.state = "loading"
        specs = [ShardSpec(b, e, profile.n_layers) for _, _, b, e in stages]
        clients = [NodeClient(a, self.credentials) for _, a, _, _ in stages]
        dtypes = [getattr(torch, self.s.compute_dtype)] * len(stages) if self.s.compute_dtype else []
        local = [a in set(self.s.required) for _, a, _, _ in stages]  # this machine's nodes read the file itself
        stage_options = StageOptions(dtypes, slots=self.s.slots, max_len=self.s.context, push=self.s.push,
                                     local=local, catalog_dir=self.s.state_dir / "catalog",
                                     quantize=self.s.quantize, kv_cache=self.s.kv_dtype)  # fmt: skip
        try:
            await load_pipeline(clients, self.s.model, specs, stage_options)
            client = PipelineClient([a for _, a, _, _ in stages], credentials=self.credentials)
            await _open(client)
        except BaseException:
            for c in clients:
                await c.close()
            raise
        old, old_clients = self.client, self._clients
        self.client, self._clients, self.plan, self.stage_nodes = client, clients, chosen, stages
        self.depth = pipeline_depth([records[s.node] for s in chosen.stages])
        for c in old_clients:
            await c.close()
        if old is not None:
            await old.close()
        self.state = "ready"
        self.ready.set()
        log.info("ready: %d stage(s) loaded; node list: %s", len(stages), self.registry.describe())

    async def reopen(self, failed: PipelineClient) -> PipelineClient | None:
        """New Forward streams to the same loaded stages in place of ``failed``, which a node ended with an error of
        one frame (the nodes are up and keep their stages and KV caches); returns them, or None when the pipeline was
        replaced already. The executor moves the requests in progress onto them without replaying anything."""
        from coordinator.pipeline.client import PipelineClient

        if self.client is not failed:
            return None
        client = PipelineClient(failed.addresses, credentials=self.credentials)
        await _open(client)
        if self.client is not failed:  # re-planned meanwhile
            await client.close()
            return None
        self.client = client
        log.warning("a node failed a frame: the pipeline's streams are opened again (nodes and stages unchanged)")
        await failed.close()
        return client

    def snapshot(self) -> cpb.ListNodesReply:
        """The node list with the layers the plan gives each (for ``llama-node status``)."""
        layers = {n: (b, e) for n, _, b, e in self.stage_nodes}
        reply = cpb.ListNodesReply(model=self.s.model.name, state=self.state, coordinator_id=self.coordinator_id)
        for r in self.registry.nodes.values():
            status = cpb.NodeStatus(node=r.description, address=r.address, source=r.source)
            if r.node_id in layers:
                status.has_layers = True
                status.layer_start, status.layer_end = layers[r.node_id]
            reply.nodes.append(status)
        return reply

    async def close(self) -> None:
        if self._replanner is not None:
            self._replanner.cancel()
        if self._advertiser is not None:
            await self._advertiser.close()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.client is not None:
            await self.client.close()
        for c in self._clients:
            await c.close()
        if self._server is not None:
            await self._server.stop(grace=1.0)


async def _open(client: PipelineClient) -> None:
    """``client.open()``; when it fails, the client's channels are closed (a gone node would otherwise leave them open
    for good) and the open's error is the one raised, not one from the close."""
    try:
        await client.open()
    except BaseException:
        try:
            await client.close()
        except Exception:
            log.debug("closing a pipeline client that failed to open", exc_info=True)
        raise


class ClusterRuntime:
    """A ``Cluster`` on its own event loop thread, usable from synchronous code and from other event loops."""

    def __init__(self, settings: ClusterSettings) -> None:
        from coordinator.pipeline.engine import LoopThread

        self.runner: LoopThread = LoopThread()
        self._serving = False  # the loop runs an HTTP server (``serve``)
        self.cluster: Cluster = self.runner.run(self._make(settings))
        try:
            self.runner.run(self.cluster.start())
        except BaseException:
            self.runner.stop()
            raise

    @staticmethod
    async def _make(settings: ClusterSettings) -> Cluster:
        return Cluster(settings)

    def join_command(self, address: str | None = None) -> str:
        return self.cluster.join_command(address)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until a plan is loaded. Raises TimeoutError."""
        self.runner.run(asyncio.wait_for(self.cluster.ready.wait(), timeout))

    def engine(self, params: SamplingParams, max_len: int, slot: int = 0) -> PipelineEngine:
        from coordinator.pipeline.engine import PipelineEngine

        if self.cluster.client is None:
            raise RuntimeError("the cluster is not ready")
        return PipelineEngine(self.cluster.client, self.runner, params, max_len, slot=slot)

    async def forward(self, rows: Sequence[RowInput]) -> list[RowOutput]:
        """One micro-batch through the current pipeline, awaited from any event loop."""

        async def go() -> list[RowOutput]:
            await self.cluster.ready.wait()
            assert self.cluster.client is not None
            return await self.cluster.client.forward(rows)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(go(), self.runner.loop))

    def serve(self, server: uvicorn.Server) -> None:
        """Run the HTTP ``server`` on this runtime's event loop until it exits, its signals handled as by
        ``uvicorn.run``. The scheduler then shares the loop of the pipeline's streams: a step goes out and its tokens
        come back with no hop between threads (two wake-ups of another thread per step, and their GIL hand-overs)."""

        async def serve() -> SystemExit | None:
            try:
                await server.serve()
            except SystemExit as e:  # uvicorn exits where it cannot start (a port taken): out of run(), not the loop
                return e
            return None

        self._serving = True
        try:
            with server.capture_signals():  # in this (the main) thread; serve() on the loop's thread captures none
                exited = self.runner.run(serve())
        finally:
            self._serving = False
            self.runner.stop()
        if exited is not None:
            raise exited

    def close(self) -> None:
        """Close the cluster and stop its loop (after ``serve`` returns, when the loop serves HTTP: the server's
        shutdown closes the cluster from that loop)."""
        try:
            self.runner.run(self.cluster.close(), timeout=10)
        finally:
            if not self._serving:
                self.runner.stop()
