"""Local node processes and a pipeline over them: what ``llama-node run --nodes N`` and the tests use.

Nodes are real child processes (``python -m node``, a fresh interpreter: nothing is forked after gRPC or torch
started), each on its own loopback TCP port, with one torch thread each and passive OpenMP waiting by default.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from coordinator.pipeline.client import NodeClient, PipelineClient
    from coordinator.pipeline.engine import LoopThread
    from llama_shard.quant import QuantMode
    from llama_shard.shard import ShardSpec

log = logging.getLogger(__name__)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM to each process still running, then SIGKILL to those not gone ``timeout`` seconds later."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class LocalNodes:
    """``n`` node processes on 127.0.0.1; ``addresses`` once they listen. Stop with ``stop()`` (or ``with``)."""

    def __init__(
        self,
        n: int,
        *,
        threads: int = 1,
        cache_dir: Path | None = None,
        log_level: str = "WARNING",
        startup_timeout: float = 60.0,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="llama-node-")
        tmp = Path(self._tmp.name)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads)}
        port_files = [tmp / f"node{i}.port" for i in range(n)]
        for i, port_file in enumerate(port_files):
            cmd = [sys.executable, "-m", "node", "--port", "0", "--threads", str(threads),
                   "--port-file", str(port_file), "--cache-dir", str(cache_dir or tmp / f"cache{i}"),
                   "--log-level", log_level]  # fmt: skip
            self.procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + startup_timeout
        for proc, port_file in zip(self.procs, port_files, strict=True):
            while not port_file.exists():
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"node process exited with code {proc.returncode} before listening")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"node process did not listen within {startup_timeout:.0f} s")
                time.sleep(0.05)
            self.addresses.append(f"127.0.0.1:{int(port_file.read_text())}")
        log.info("started %d node processes: %s", n, ", ".join(self.addresses))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self, timeout: float = 10.0) -> None:
        stop_processes(self.procs, timeout)
        self._tmp.cleanup()

    def __enter__(self) -> LocalNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class StageOptions:
    """How each stage is held: compute dtype per stage (the link dtype between two stages is the wider need:
    float32 unless a stage computes in half precision), KV slots and length, and where the bytes come from.

    ``quantize``: ``gguf`` keeps a GGUF file's blocks packed on every node (the slices are the file's blocks, pushed
    or verified in place; the stages compute and exchange float32 activations); ``int4``/``int8`` quantise float
    weights at load; ``None``: dense in ``compute_dtypes``. See ``weight_mode`` for what ``--dtype`` means."""

    compute_dtypes: Sequence[torch.dtype] = ()
    slots: int = 1
    max_len: int = 2048
    push: bool = False  # stream the slices from the coordinator instead of the nodes' own copies
    local: Sequence[bool] = ()  # with push: stage i reads the model file itself (a node on this machine)
    quantize: QuantMode | None = None
    kv_cache: str | None = None  # the KV cache dtype by name; None: kv_cache_dtype's choice for each stage
    catalog_dir: Path | None = None
    on_progress: Callable[[int, str, int, int], None] | None = field(default=None, repr=False)


def weight_mode(model: Path, dtype: str, quantize: str | None = None) -> QuantMode | None:
    """How stages hold their weights for ``--dtype``/``--quantize``, the same in one process and on nodes: an
    explicit ``--quantize`` wins; ``auto`` keeps a GGUF file's blocks packed; a float dtype is dense (``float32``
    is the exact path); ``auto`` on a float checkpoint is dense float32."""
    from llama_shard.quant import QuantMode

    if quantize:
        return QuantMode(quantize)
    if dtype == "auto" and model.is_file() and model.suffix == ".gguf":
        return QuantMode.gguf
    return None


def link_dtypes(compute: Sequence[torch.dtype]) -> list[torch.dtype]:
    """The wire dtype of each link between stage i and i+1: float32 between float32 stages, else the half
    precision one of them computes in (converted at the edges)."""
    import torch

    out = []
    for a, b in zip(compute, compute[1:], strict=False):
        halves = [d for d in (a, b) if d != torch.float32]
        out.append(halves[0] if halves else torch.float32)
    return out


async def load_pipeline(
    clients: Sequence[NodeClient], model: Path, specs: Sequence[ShardSpec], options: StageOptions
) -> None:
    """Give stage ``i`` to ``clients[i]`` and wait until every node holds its slice."""
    import torch

    from coordinator.pipeline.weights import SliceCatalog, load_shard
    from llama_shard.config import kv_cache_dtype
    from llama_shard.loading import open_source
    from llama_shard.quant import QuantMode
    from node.wire import LoadRequest

    for c in clients:
        await c.health()
    source = open_source(model)
    catalog = SliceCatalog(options.catalog_dir or Path.home() / ".cache" / "llama-node" / "coordinator")
    packed = options.quantize == QuantMode.gguf
    if options.quantize is not None or not options.compute_dtypes:  # quantised stages compute in float32
        compute = [torch.float32] * len(specs)
    else:
        compute = list(options.compute_dtypes)
    links = link_dtypes(compute)
    jobs = []
    for i, (client, spec) in enumerate(zip(clients, specs, strict=True)):
        push = options.push and not (i < len(options.local) and options.local[i])
        manifest = await asyncio.to_thread(catalog.manifest, model, source, spec, blob=push, packed=packed)
        compute_name = str(compute[i]).removeprefix("torch.")
        kv = kv_cache_dtype(quantised=options.quantize is not None, compute=compute_name, requested=options.kv_cache)
        req = LoadRequest(
            model_id=model.name, spec=spec, config=source.config, manifest=manifest,
            local_path=None if push else str(model.resolve()), compute_dtype=compute[i],
            input_dtype=links[i - 1] if i > 0 else torch.float32,
            output_dtype=links[i] if i < len(links) else torch.float32,
            slots=options.slots, max_len=options.max_len, quantize=options.quantize, kv_dtype=getattr(torch, kv),
        )  # fmt: skip

        def progress(phase: str, i: int = i) -> Callable[[int, int], None]:
            return lambda done, total: options.on_progress and options.on_progress(i, phase, done, total)

        blob = catalog.blob_path(manifest) if push else None
        jobs.append(load_shard(client, req, blob, on_push=progress("push"), on_load=progress("load")))
    await asyncio.gather(*jobs)


class LocalPipeline:
    """N local node processes holding contiguous stages of ``model``, and the client of their pipeline."""

    def __init__(self, model: Path, n_nodes: int, options: StageOptions, *, threads: int = 1,
                 node_cache_dir: Path | None = None) -> None:  # fmt: skip
        from coordinator.pipeline.client import PipelineClient
        from coordinator.pipeline.engine import LoopThread
        from llama_shard.loading import open_source
        from llama_shard.shard import split_evenly

        config = open_source(model).config
        self.specs = split_evenly(config.n_layers, n_nodes)
        self.options = options
        self.nodes = LocalNodes(n_nodes, threads=threads, cache_dir=node_cache_dir)
        self.runner: LoopThread = LoopThread()
        try:
            self.clients: list[NodeClient] = self.runner.run(self._clients())
            self.runner.run(load_pipeline(self.clients, model, self.specs, options))
            self.client: PipelineClient = self.runner.run(self._pipeline_client(PipelineClient))
        except BaseException:
            self.close()
            raise

    async def _clients(self) -> list[NodeClient]:
        from coordinator.pipeline.client import NodeClient

        return [NodeClient(a) for a in self.nodes.addresses]

    async def _pipeline_client(self, cls: type[PipelineClient]) -> PipelineClient:
        client = cls(self.nodes.addresses)
        await client.open()
        return client

    def close(self) -> None:
        async def shutdown() -> None:
            if hasattr(self, "client"):
                await self.client.close()
            for c in getattr(self, "clients", []):
                await c.close()

        try:
            self.runner.run(shutdown(), timeout=10)
        finally:
            self.runner.stop()
            self.nodes.stop()

    def __enter__(self) -> LocalPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
