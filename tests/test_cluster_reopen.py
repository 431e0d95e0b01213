"""``Cluster.reopen`` with REAL node processes: ``serve --nodes 2``'s cluster (``serve_cluster``: two local ``join``
processes, a stage each, the scheduler on a ``ClusterExecutor``), driven through its scheduler.

A node that refuses one frame ends the Forward stream that every frame in flight shares. The refused frame here is
a real one: a prompt holding a token id the first node's embedding lacks. The API answers such a prompt with a 400
(``Backend.check_ids``) before it reaches the scheduler, so the test submits it to the scheduler directly. The first
node answers INVALID_ARGUMENT, and:

- that request ends with an error naming the cause;
- the requests beside it finish with exactly the greedy tokens they give alone (the executor reopens the streams,
  replays their KV rows and retries the steps the broken stream took with it);
- a request after it runs on the reopened streams at once (no wait for a re-plan that never comes: failover_s).

The steps are cut so the bad row is alone in its step (``test_cluster_split`` has a refused row share its step): the
bad request is the oldest, its refused chunk is its second one and fills the prefill budget, and the others are
still in their prompts then, so no decode row joins it.

The test found two races. A culprit whose retry failed again reopened the streams after letting the retry lock go,
so the next victim's retry took the broken streams. And the last stage's Results call, cancelled by the refusing
stage, could end the frames CANCELLED before the Forward stream brought INVALID_ARGUMENT: no frame error, so the
executor waited failover_s for a re-plan and every request failed (about one run in four).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio

from coordinator.api.backend import ModelInfo
from coordinator.cluster import Cluster, ClusterSettings
from coordinator.pipeline import client as pipeline_client
from coordinator.pipeline.client import PipelineClient
from coordinator.scheduler import Request
from coordinator.serve_cluster import ServedCluster
from llama_shard.sampling import SamplingParams
from tests.cluster_helpers import serve_two_local_nodes
from tests.tiny_served import serveable_tiny_llama

VOCAB, CONTEXT, CHUNK, N = 320, 64, 4, 12
INFO = ModelInfo("tiny", frozenset(), "/x/tiny", "safetensors", "llama", 1, 1, "F32", CONTEXT, 0.0)
BAD = [5, 6, 7, 8, 9, 10, VOCAB + 80, 11]  # the second chunk holds an id past the embedding
A, B, LATER = list(range(20, 32)), list(range(40, 52)), list(range(60, 70))


def _serve(model: Path, state: Path) -> ServedCluster:
    """``serve --nodes 2 --micro-batches 3``'s cluster and scheduler on ``model`` (2 stages), once it is loaded."""
    return serve_two_local_nodes(model, INFO, state, micro_batches=3, slots=4, context=CONTEXT, chunk=CHUNK)


async def _answer(r: Request) -> list[int]:
    tokens: list[int] = []
    with contextlib.suppress(Exception):
        tokens.extend([t async for t in r.tokens()])
    return tokens


def test_a_refused_frame_reopens_the_streams_of_real_nodes(make_hf_llama: Callable[..., Path], tmp_path: Path) -> None:
    # arrange: the tiny model's greedy answers never end early (tiny_served), so each runs N tokens
    served = _serve(serveable_tiny_llama(make_hf_llama(), tmp_path / "tiny"), tmp_path / "state")
    scheduler = served.backend.scheduler
    assert scheduler is not None
    cluster = served.runtime.cluster
    greedy = SamplingParams()

    async def go() -> tuple[dict[str, list[int]], list[tuple[str, str | None, list[int]]], float, object, int]:
        scheduler.start()
        try:
            alone = {}
            for name, prompt in (("a", A), ("b", B), ("later", LATER)):
                alone[name] = await _answer(scheduler.submit(prompt, greedy, N, frozenset()))
            first = cluster.client
            # act: the bad request first (the oldest: its chunks go first), the others beside it
            bad, a, b = (scheduler.submit(p, greedy, N, frozenset()) for p in (BAD, A, B))
            answers = await asyncio.wait_for(asyncio.gather(*(_answer(r) for r in (bad, a, b))), 60)
            t0 = time.monotonic()
            later = scheduler.submit(LATER, greedy, N, frozenset())
            answers.append(await asyncio.wait_for(_answer(later), 60))
            elapsed = time.monotonic() - t0
            done = zip((bad, a, b, later), answers, strict=True)
            replayed = scheduler.executor.replayed_rows  # type: ignore[attr-defined]
            assert served.local is not None and not served.local.exited()  # the same nodes served throughout
            summary = [(r.finish_reason, r.finish.error if r.finish else None, t) for r, t in done]
            return alone, summary, elapsed, first, replayed
        finally:
            await scheduler.stop()  # closes the runtime and stops the local nodes

    try:
        alone, out, elapsed, first, replayed = asyncio.run(go())
    finally:
        served.stop_local()  # again (idempotent): when the scheduler never closed the runtime
    (bad_reason, bad_error, _), *good = out
    assert all(len(t) == N for t in alone.values())
    # (a) the refused request fails, and says why
    assert bad_reason == "error" and f"outside the vocabulary of {VOCAB}" in str(bad_error), out[0]
    # (b) the requests beside it give exactly their answers alone
    assert good[0] == ("length", None, alone["a"]) and good[1] == ("length", None, alone["b"]), good
    # (c) a request after it runs on the reopened streams, at once
    assert good[2] == ("length", None, alone["later"]), good[2]
    assert elapsed < 10, f"{elapsed:.1f} s: the executor waited for a re-plan that never comes"
    # the nodes' streams are new, and reach the same stages and KV caches: nothing was replayed into them
    assert cluster.client is not first and replayed == 0, replayed


def test_a_reopen_that_cannot_connect_closes_its_channels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The new streams' node is gone (nothing listens at the address): the reopen raises the open's own error
    (UNAVAILABLE, which the executor waits out like a lost node) and leaves no open channel behind."""
    unreachable = ["127.0.0.1:1", "127.0.0.1:2"]  # port 1: connection refused at once

    async def go() -> tuple[BaseException, list[aio.Channel]]:
        cluster = Cluster(ClusterSettings(model=tmp_path / "m", state_dir=tmp_path / "state", mdns=False))
        failed = PipelineClient(unreachable)
        cluster.client = failed
        made: list[aio.Channel] = []
        make = pipeline_client._channel

        def recording(address: str, credentials: grpc.ChannelCredentials | None) -> aio.Channel:
            made.append(make(address, credentials))
            return made[-1]

        monkeypatch.setattr(pipeline_client, "_channel", recording)
        with pytest.raises(aio.AioRpcError) as e:
            await asyncio.wait_for(cluster.reopen(failed), 10)
        await failed.close()
        return e.value, made

    error, made = asyncio.run(go())
    assert isinstance(error, aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
    assert len(made) == 2  # the new client's two channels (first and last stage)
    assert [c.get_state() for c in made] == [grpc.ChannelConnectivity.SHUTDOWN] * 2
