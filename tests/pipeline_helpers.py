"""Helpers for the pipeline tests: a set of real node processes, loading stages on them, and references."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch
from grpc import aio

from coordinator.pipeline.client import NodeClient, PipelineClient
from coordinator.pipeline.engine import LoopThread, PipelineEngine
from coordinator.pipeline.local import LocalNodes, StageOptions, load_pipeline
from llama_shard.batching import StepRow, cache_len, run_step
from llama_shard.loading import load_stage, open_source
from llama_shard.model import Stage
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec, split_evenly
from protos.llama_node.v1 import node_pb2 as pb

#: the replies of a raw stream and how it ended
Outcome = tuple[list[pb.ForwardReply], grpc.StatusCode, str]


async def drain(call: aio.UnaryStreamCall | aio.StreamStreamCall) -> Outcome:
    """Read ``call`` to its end: its replies, status code and details (an error status is not raised)."""
    replies: list[pb.ForwardReply] = []
    try:
        async for reply in call:
            replies.append(reply)
    except aio.AioRpcError:
        pass
    return replies, await call.code(), await call.details() or ""


class Cluster:
    """``n`` node processes, a loop thread, and a client per node; pipelines use the first k nodes."""

    def __init__(self, n: int, catalog_dir: Path) -> None:
        self.nodes = LocalNodes(n, threads=1)
        self.runner = LoopThread()
        self.catalog_dir = catalog_dir
        self.clients: list[NodeClient] = self.runner.run(self._clients())

    async def _clients(self) -> list[NodeClient]:
        return [NodeClient(a) for a in self.nodes.addresses]

    def load(self, model: Path, specs: Sequence[ShardSpec], options: StageOptions | None = None) -> PipelineClient:
        options = options or StageOptions(max_len=128)
        options.catalog_dir = self.catalog_dir
        clients = self.clients[: len(specs)]
        self.runner.run(load_pipeline(clients, model, specs, options))

        async def open_client() -> PipelineClient:
            client = PipelineClient(self.nodes.addresses[: len(specs)])
            await client.open()
            return client

        return self.runner.run(open_client())

    def close_client(self, client: PipelineClient) -> None:
        self.runner.run(client.close())

    def stop(self) -> None:
        async def close() -> None:
            for c in self.clients:
                await c.close()

        self.runner.run(close())
        self.runner.stop()
        self.nodes.stop()


def pipeline_greedy(
    cluster: Cluster, client: PipelineClient, prompt: Sequence[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the fp32 logits of each step through the node pipeline."""
    engine = PipelineEngine(client, cluster.runner, SamplingParams(), 128, return_logits=True)
    tokens = [engine.step(prompt, 0)]
    for i in range(steps - 1):
        tokens.append(engine.step([tokens[-1]], len(prompt) + i))
    return tokens, engine.logits


@torch.inference_mode()
def local_greedy(stages: Sequence[Stage], prompt: Sequence[int], steps: int,
                 link_dtypes: Sequence[torch.dtype] = ()) -> tuple[list[int], list[torch.Tensor]]:  # fmt: skip
    """The same in this process through ``stages`` in a chain (one stage: the whole model), with the padded shapes
    of ``llama_shard.batching`` as every node uses, activations cast to ``link_dtypes[i]`` between stage i and i+1
    as the wire does."""
    caches = [s.new_cache(2, cache_len(128)) for s in stages]  # slot 0, and slot 1 for padding rows
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    x, start = torch.tensor(list(prompt)), 0
    for _ in range(steps):
        h = x
        for i, (stage, cache) in enumerate(zip(stages, caches, strict=True)):
            if i > 0:
                h = h.to(link_dtypes[i - 1] if link_dtypes else torch.float32).to(stage.dtype)
            (out,) = run_step(stage, cache, [StepRow(0, start, h, prefill=start == 0)], scratch=1)
            assert out is not None
            h = out
        logits.append(h)
        tokens.append(int(h.argmax()))
        start += x.shape[0]
        x = torch.tensor([tokens[-1]])
    return tokens, logits


@functools.cache
def whole_stage(model: Path) -> Stage:
    source = open_source(model)
    return load_stage(source, ShardSpec.whole(source.config.n_layers))


def split(model: Path, n: int) -> list[ShardSpec]:
    return split_evenly(open_source(model).config.n_layers, n)
