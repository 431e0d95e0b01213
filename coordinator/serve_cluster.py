"""``llama-node serve`` over a cluster: the coordinator (CA, join endpoint, mDNS, discovery, plan, re-plan) behind the
HTTP API, and with ``--nodes N`` its own N local ``join`` processes as members of that cluster.

With ``--nodes N`` the local nodes join like any other (token, mutual TLS) and are given to discovery as peers; the
plan must give each of them a stage (the user asked for them) and may add the remote nodes that join, found by mDNS
or ``--peer``; when more join, it re-plans. The planner knows the local nodes share this machine (its free memory and
cores are shared out, ``coordinator.planner.hosts``). When the local nodes alone are enough (``--min-nodes`` at most
``N``), ``serve`` waits until they are loaded before it answers, as one machine with no set-up should; otherwise the
API answers 503 until enough nodes have joined.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.cluster_defaults import DEFAULT_JOIN_PORT, DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from coordinator.api.backend import ModelInfo
    from coordinator.cluster import ClusterRuntime
    from coordinator.cluster_executor import ClusterBackend
    from coordinator.local_members import LocalMembers
    from llama_shard.quant import QuantMode
    from llama_shard.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """The cluster could not start serving (a local node died, nothing fits, not ready in time)."""


@dataclass(frozen=True)
class ClusterFlags:
    """``serve``'s options for serving over a cluster (joined nodes, and ``nodes`` local ones)."""

    peer: list[str] = field(default_factory=list)
    insecure: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    join_port: int = DEFAULT_JOIN_PORT
    join_host: str = "0.0.0.0"
    min_nodes: int = 1
    no_mdns: bool = False
    quantize: QuantMode | None = None  # how the nodes hold the weights (``weight_mode``)
    nodes: int = 0  # local node processes to start
    threads: int = 1  # compute threads of each local node
    node_memory: str | None = None  # cap on the memory each local node offers (join --memory)
    micro_batches: int = 0  # frames in flight; 0: one per stage, stages on one machine at most one per core
    compute_dtype: str | None = None  # dense stages: bfloat16 or float16; None: float32
    kv_cache: str | None = None  # the KV cache dtype by name (serve resolves it: it sizes --kv-budget-mb with it)
    port_fallback: bool = False  # the default join port may be taken (another coordinator): use a free one


@dataclass
class ServedCluster:
    """The backend ``serve`` answers with, the runtime under it and its local nodes."""

    backend: ClusterBackend
    runtime: ClusterRuntime
    local: LocalMembers | None

    def wait_local_ready(self, timeout: float) -> None:
        """Block until the first pipeline is loaded. Raises ``ServeError`` with the reason when a local node exits,
        the plan fails, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        cluster = self.runtime.cluster
        while True:
            try:
                self.runtime.wait_ready(0.5)
                return
            except TimeoutError:
                pass
            dead = self.local.exited() if self.local is not None else []
            if dead:
                raise ServeError("; ".join(dead) + " before the pipeline was loaded (its log is above)")
            if cluster.state.startswith("not ready"):
                raise ServeError(f"cannot serve on the local nodes: {cluster.state.removeprefix('not ready: ')}")
            if time.monotonic() > deadline:
                raise ServeError(f"not ready after {timeout:.0f} s ({cluster.state})")

    def close_unserved(self) -> None:
        """Stop everything when the API never ran (the scheduler closes the runtime when it did)."""
        try:
            self.runtime.close()
        finally:
            self.stop_local()

    def stop_local(self) -> None:
        """Stop the local nodes (again: the scheduler's shutdown has stopped them unless the API never started)."""
        if self.local is not None:
            self.local.stop()


def serve_cluster(model: Path, info: ModelInfo, tokenizer: Tokenizer, flags: ClusterFlags, n_slots: int,
                  max_len: int, max_queue: int | None, prefill_chunk: int) -> ServedCluster:  # fmt: skip
    """Start the cluster (CA, join endpoint, mDNS, discovery), its local nodes, and the backend ``serve`` runs on
    it: 503 until a pipeline is loaded, then the scheduler's steps on it (``ClusterExecutor``)."""
    from coordinator.cluster import ClusterRuntime
    from coordinator.cluster_cmd import announce, cluster_settings
    from coordinator.cluster_executor import ClusterBackend, ClusterExecutor
    from coordinator.local_members import LocalMembers, local_address
    from coordinator.scheduler import Scheduler

    local: LocalMembers | None = None
    if flags.nodes:
        address, listen = local_address(flags.join_host)
        local = LocalMembers(flags.nodes, address=address, listen=listen, threads=flags.threads,
                             memory=flags.node_memory)  # fmt: skip
    required = local.addresses if local is not None else []
    settings = cluster_settings(model, [*flags.peer, *required], flags.insecure, flags.state_dir, flags.join_port,
                                max(flags.min_nodes, flags.nodes), max_len, flags.no_mdns, slots=n_slots,
                                join_host=flags.join_host, quantize=flags.quantize,
                                kv_cache=flags.kv_cache)  # fmt: skip
    settings.required, settings.port_fallback = required, flags.port_fallback
    settings.compute_dtype = flags.compute_dtype
    runtime = ClusterRuntime(settings)
    try:
        if local is not None:
            ca = runtime.cluster.ca
            host = "127.0.0.1" if flags.join_host in ("0.0.0.0", "::", "") else flags.join_host
            local.start(f"{host}:{runtime.cluster.port}", str(ca.token) if ca is not None else None)
        announce(runtime, flags.insecure, flags.join_host)
    except BaseException:
        runtime.close()
        if local is not None:
            local.stop()
        raise
    waiting = max(flags.min_nodes, flags.nodes)
    log.info("join endpoint on %s:%d; %s", flags.join_host, runtime.cluster.port,
             f"starting {flags.nodes} local node(s)" if flags.nodes >= flags.min_nodes else
             f"waiting for nodes (the API answers 503 until {waiting} node(s) joined and loaded)")  # fmt: skip
    executor = ClusterExecutor(runtime, n_slots, max_len, depth=flags.micro_batches or None,
                               on_close=local.stop if local is not None else None)  # fmt: skip
    scheduler = Scheduler(executor, max_queue=max_queue, prefill_chunk=prefill_chunk)
    return ServedCluster(ClusterBackend(info, tokenizer, max_len, scheduler, runtime=runtime), runtime, local)
