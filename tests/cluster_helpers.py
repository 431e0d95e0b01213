"""Helpers for the join tests: `llama-node join` processes, free ports, and impostor servers that record what reaches
them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from grpc import aio

from coordinator.api.backend import ModelInfo
from coordinator.cluster import plan_options
from coordinator.pipeline.local import stop_processes
from coordinator.pki import ClusterCA
from coordinator.planner import DeviceProfile, Memory, PlanError, plan
from coordinator.planner.loaders import load_model_profile
from coordinator.serve_cluster import ClusterFlags, ServedCluster, serve_cluster
from llama_shard.loading import load_tokenizer, open_source
from protos import PROTOCOL_VERSION
from protos.llama_node.v1 import node_pb2 as pb
from protos.llama_node.v1 import node_pb2_grpc as pb_grpc

LLAMA_NODE = str(Path(sys.executable).parent / "llama-node")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_join(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``llama-node join ARGS`` with its output in ``log_path``."""
    out = open(log_path, "wb")  # noqa: SIM115 - closed with the process by the caller's stop()
    return subprocess.Popen([LLAMA_NODE, "join", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    stop_processes(procs, timeout)


def wait_for_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    """Wait until ``text`` appears in the log (or the process exits); the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before logging {text!r}:\n{log}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged within {timeout:.0f} s:\n{path.read_text(errors='replace')}")


class ImpostorNode(pb_grpc.NodeServicer):
    """A server posing as a node: asks for the slice's bytes and records every call and byte that reaches it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.received = 0

    async def Health(self, request: pb.HealthRequest, context: aio.ServicerContext) -> pb.HealthReply:  # noqa: N802
        self.calls.append("Health")
        return pb.HealthReply(protocol_version=PROTOCOL_VERSION, node_id="impostor", state=pb.HealthReply.IDLE)

    async def LoadShard(  # noqa: N802
        self, request: pb.LoadShardRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.LoadProgress]:
        self.calls.append("LoadShard")
        yield pb.LoadProgress(state=pb.LoadProgress.AWAITING_BYTES, total_bytes=request.manifest.nbytes)

    async def PushSlice(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.SliceChunk], context: aio.ServicerContext
    ) -> pb.PushSliceReply:
        self.calls.append("PushSlice")
        async for chunk in request_iterator:
            self.received += len(chunk.data)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "impostor hangs up after stealing the bytes")
        raise AssertionError("unreachable")


async def start_impostor(credentials: grpc.ServerCredentials | None) -> tuple[aio.Server, ImpostorNode, str]:
    """An impostor on loopback, plain text or TLS with ``credentials``; (server, servicer, address)."""
    servicer = ImpostorNode()
    server = aio.server()
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    port = (
        server.add_insecure_port("127.0.0.1:0")
        if credentials is None
        else server.add_secure_port("127.0.0.1:0", credentials)
    )
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


def foreign_ca() -> ClusterCA:
    """Another cluster's CA: certificates from it are well-formed and useless here."""
    return ClusterCA.create("stranger")


def memory_cap_for(
    model: Path, nodes: int, context: int, slots: int, upper: int = 8 * 10**9, kv_dtype: str = "float16"
) -> int:
    """A per-node memory cap at which ``nodes`` equal nodes hold the model and ``nodes - 1`` cannot, whatever the
    nodes' speeds: halfway between the least cap for ``nodes`` and the least for ``nodes - 1`` (bisections over the
    planner). Not the least cap itself: a node's real profile can ask a few kB more than these declared ones (the
    LAN test's three nodes were "short by 0.00 GB" at it). ``kv_dtype``: the cluster's KV cache (a GGUF at ``--dtype
    auto`` is packed: float16)."""
    profile = load_model_profile(str(model))
    options = plan_options(profile, context, slots, kv_dtype)

    def fits(cap: int, n: int) -> bool:
        try:
            plan(profile, [DeviceProfile.declare(f"n{i}", Memory(cap)) for i in range(n)], options)
        except PlanError:
            return False
        return True

    def least(n: int, hi: int) -> int:
        lo = 0
        while hi - lo > 1000:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid, n) else (mid, hi)
        return hi

    assert fits(upper, nodes), f"{nodes} nodes of {upper} bytes cannot hold the model"
    need = least(nodes, upper)
    fewer = least(nodes - 1, upper) if fits(upper, nodes - 1) else upper
    assert fewer > need + 2000, f"the model is too small to need {nodes} nodes at any cap"
    return (need + fewer) // 2


def serve_two_local_nodes(
    model: Path, info: ModelInfo, state: Path, *, micro_batches: int, slots: int, context: int, chunk: int
) -> ServedCluster:
    """``serve --nodes 2 --micro-batches M``'s cluster (2 real ``join`` processes, a stage each) on ``model``, once it
    is loaded; the caller closes it."""
    flags = ClusterFlags(state_dir=state, join_port=free_port(), join_host="127.0.0.1", no_mdns=True, nodes=2,
                         micro_batches=micro_batches)  # fmt: skip
    served = serve_cluster(model, info, load_tokenizer(open_source(model)), flags, slots, context, None, chunk)
    try:
        served.wait_local_ready(120)
    except BaseException:
        served.close_unserved()
        raise
    return served
