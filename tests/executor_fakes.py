"""The fakes behind the ``ClusterExecutor`` tests (``test_cluster_executor``, ``test_cluster_executor_split``).

The pipelines are fakes with a real KV discipline: a row must start where its slot's cache ends (else the fake
raises, as a real stage would compute garbage), and the sampled token is a hash of the whole cached sequence (with
each row's ``prefill`` flag, where the wire carries it), so a lost, misplaced or differently fed token changes every
later answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from coordinator.cluster_executor import ClusterExecutor
from coordinator.pipeline.engine import LoopThread
from coordinator.scheduler import Scheduler
from llama_shard.sampling import SamplingParams
from node.wire import RowInput, RowOutput


class FakePipeline:
    """A pipeline whose per-slot cache is the list of tokens fed; ``on_forward`` may re-plan (or fail) mid-run."""

    def __init__(
        self,
        cluster: FakeCluster | None = None,
        *,
        replan_after: int = -1,
        fail: bool = False,
        bad: set[int] | None = None,
    ) -> None:
        self.kv: dict[int, list[tuple[int, bool]]] = {}  # (token, fed as prefill) per position
        self.frames = 0
        self.cluster, self.replan_after, self.fail = cluster, replan_after, fail
        self.next: FakePipeline | None = None
        self.bad = bad or set()  # request ids a node fails with ``code``, which ends the stream (every later frame too)
        self.code = grpc.StatusCode.INTERNAL
        self.broken: aio.AioRpcError | None = None

    async def forward(self, rows: Sequence[RowInput]) -> list[RowOutput]:
        await asyncio.sleep(0)
        self.frames += 1
        refused = [r.request_id for r in rows if r.request_id in self.bad]
        if self.broken is None and refused:
            details = (
                "ValueError: bad"
                if self.code == grpc.StatusCode.INTERNAL
                else f"request {refused[0]}: token id outside the vocabulary of 500"
            )
            self.broken = aio.AioRpcError(self.code, aio.Metadata(), aio.Metadata(), details)
        if self.broken is not None:
            raise self.broken
        if self.frames == self.replan_after:
            assert self.cluster is not None and self.next is not None
            self.cluster.client = self.next  # a node joined: the runtime loaded a new pipeline
            if self.fail:
                raise ConnectionError("the pipeline client was closed")
        out = []
        for r in rows:
            cache = self.kv.setdefault(r.slot, [])
            if r.start == 0:
                cache.clear()
            if r.start != len(cache):
                raise AssertionError(f"slot {r.slot}: row at {r.start} but {len(cache)} cached")
            cache.extend((t, bool(getattr(r, "prefill", False))) for t in r.tokens)
            digest = hashlib.sha256(repr(cache).encode()).digest()
            out.append(RowOutput(r.request_id, 3 + int.from_bytes(digest[:4]) % 500))
        return out


@dataclass
class FakeCluster:
    client: FakePipeline | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    state: str = "ready"
    stage_nodes: list[tuple[str, str, int, int]] = field(default_factory=lambda: [("a", "x:1", 0, 1)])
    depth: int = 1  # frames in flight through the current pipeline (``Cluster.depth``)
    reopened: int = 0

    restarts: bool = False  # a node restarted behind its address: the reopened streams reach empty caches

    async def reopen(self, failed: FakePipeline) -> FakePipeline | None:
        if self.client is failed:  # new streams to the same stages: the caches they hold stay (unless ``restarts``)
            await asyncio.sleep(0)  # opening them takes a round trip, in which other steps run (as Cluster.reopen)
            if self.client is not failed:
                return None
            self.client, self.reopened = type(failed)(bad=failed.bad), self.reopened + 1
            self.client.code = failed.code
            if not self.restarts:
                self.client.kv = failed.kv
            return self.client
        return None


@dataclass
class FakeRuntime:
    runner: LoopThread
    cluster: FakeCluster

    def close(self) -> None:
        pass


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]


def answers(
    first: FakePipeline, cluster: FakeCluster, runner: LoopThread, on_runner: bool = False
) -> tuple[list[list[int]], ClusterExecutor]:
    """The tokens of ``PROMPTS``; ``on_runner``: the scheduler on the runtime's loop (as ``serve`` runs it)."""
    cluster.client = first
    runner.run(set_event(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=5)  # type: ignore[arg-type]

    async def go() -> list[list[int]]:
        scheduler = Scheduler(executor, prefill_chunk=4)
        requests = [scheduler.submit(p, SamplingParams(), 12, frozenset()) for p in PROMPTS]
        answers = [[t async for t in r.tokens()] for r in requests]
        await scheduler.stop()
        assert all(r.finish_reason == "length" for r in requests), [r.finish for r in requests]
        return answers

    return (runner.run(go()) if on_runner else asyncio.run(go())), executor


async def set_event(event: asyncio.Event) -> None:
    event.set()


async def collect(r: Any) -> list[int]:
    tokens: list[int] = []
    with contextlib.suppress(Exception):
        tokens.extend([t async for t in r.tokens()])
    return tokens
