"""``ClusterExecutor`` when the cluster re-plans under running requests: the new pipeline's KV caches are empty, so
each request's rows are replayed into it, and a step that failed on the replaced pipeline is retried there.

The pipelines are fakes with a real KV discipline: a row must start where its slot's cache ends (else the fake
raises, as a real stage would compute garbage), and the sampled token is a hash of the whole cached sequence (with
each row's ``prefill`` flag, where the wire carries it), so a lost, misplaced or differently fed token changes every
later answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import pytest

from coordinator.cluster_executor import ClusterExecutor
from coordinator.pipeline.engine import LoopThread
from coordinator.scheduler import Scheduler
from llama_shard.sampling import SamplingParams
from node.wire import RowInput, RowOutput
from tests.executor_fakes import PROMPTS, FakeCluster, FakePipeline, FakeRuntime, answers, set_event


@pytest.fixture()
def runner() -> Any:
    r = LoopThread()
    yield r
    r.stop()


@pytest.mark.parametrize("fail", [False, True], ids=["switch-between-steps", "step-fails-on-old-pipeline"])
def test_requests_survive_a_replan(runner: LoopThread, fail: bool) -> None:
    # arrange: the answers on one pipeline throughout
    expected, _ = answers(FakePipeline(), FakeCluster(), runner)
    cluster = FakeCluster()
    old = FakePipeline(cluster, replan_after=6, fail=fail)
    old.next = new = FakePipeline()
    # act: a new pipeline (empty caches) replaces the old one after 6 frames, mid-prefill and mid-decode
    got, executor = answers(old, cluster, runner)
    # assert: same tokens; the new pipeline was really used and the requests' rows were replayed into it
    assert got == expected
    assert new.frames > 0 and executor.replayed_rows > 0
    assert all(len(new.kv[s]) >= 1 for s in new.kv)


@pytest.mark.parametrize("fail", [False, True], ids=["switch-between-steps", "step-fails-on-old-pipeline"])
def test_on_the_runtimes_loop_a_step_is_its_task_and_the_answers_are_the_same(runner: LoopThread, fail: bool) -> None:
    # arrange: the answers with the scheduler on another loop (each step crosses threads), on one pipeline
    expected, _ = answers(FakePipeline(), FakeCluster(), runner)
    cluster = FakeCluster()
    old = FakePipeline(cluster, replan_after=6, fail=fail)
    old.next = new = FakePipeline()
    # act: the scheduler on the runtime's loop, through a re-plan
    got, executor = answers(old, cluster, runner, on_runner=True)

    async def one_step() -> bool:
        step = executor.run([])
        await step
        return isinstance(step, asyncio.Task) and step.get_loop() is runner.loop

    # assert: the same tokens, the rows replayed into the new pipeline; a step is a task of that loop (no thread hop)
    assert got == expected
    assert new.frames > 0 and executor.replayed_rows > 0
    assert runner.run(one_step())


def test_a_frame_a_node_fails_does_not_break_the_pipeline(runner: LoopThread) -> None:
    """A node error in one frame ends the stream all frames in flight share: the executor reopens the streams and
    retries the step once, so the failing request ends with an error, and requests running beside it or coming
    after it get exactly their answers (replayed into the reopened streams), at once rather than after failover_s."""
    expected, _ = answers(FakePipeline(), FakeCluster(), runner)
    bad_prompt = [50, 51, 52]
    cluster = FakeCluster(depth=3)
    runner.run(set_event(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=60)  # type: ignore[arg-type]

    async def go() -> tuple[list[tuple[str, list[int]]], float]:
        scheduler = Scheduler(executor, prefill_chunk=4)
        good = [scheduler.submit(p, SamplingParams(), 12, frozenset()) for p in PROMPTS[:2]]
        bad = scheduler.submit(bad_prompt, SamplingParams(), 12, frozenset())
        assert cluster.client is not None
        cluster.client.bad = {bad.id}
        t0 = asyncio.get_running_loop().time()
        out = []
        for r in [*good, bad]:
            tokens: list[int] = []
            with contextlib.suppress(Exception):
                tokens.extend([t async for t in r.tokens()])
            out.append((r.finish_reason, tokens))
        # INTERNAL (the node raised computing the row) is the server's fault: a 500, with the node's words
        assert bad.finish is not None and bad.finish.status == 500, bad.finish
        assert bad.finish.error == "the model failed on this request: ValueError: bad (INTERNAL)", bad.finish
        later = scheduler.submit(PROMPTS[2], SamplingParams(), 12, frozenset())
        tokens = [t async for t in later.tokens()]
        out.append((later.finish_reason, tokens))
        await scheduler.stop()
        return out, asyncio.get_running_loop().time() - t0

    cluster.client = FakePipeline()
    out, elapsed = asyncio.run(go())
    assert out[2][0] == "error"
    assert [out[0], out[1], out[3]] == [("length", expected[0]), ("length", expected[1]), ("length", expected[2])]
    assert cluster.reopened >= 1 and executor.replayed_rows == 0  # the reopened streams kept the caches
    assert elapsed < 30, f"{elapsed:.1f} s: the executor waited for a re-plan that never comes"


class LocalErrorPipeline(FakePipeline):
    """A pipeline whose client raises before anything is sent (a row the wire format cannot carry)."""

    async def forward(self, rows: Sequence[RowInput]) -> list[RowOutput]:
        raise ValueError("Value out of range: 1035125872496")


def test_an_error_of_this_process_fails_the_step_without_waiting_for_a_replan(runner: LoopThread) -> None:
    """Only a stream's status or a closed stream means a node may be gone (worth failover_s of waiting for a
    re-plan); schemathesis found a step that failed to encode waiting 30 s, which looked like a hang."""
    cluster = FakeCluster(client=LocalErrorPipeline())
    runner.run(set_event(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=60)  # type: ignore[arg-type]

    async def go() -> tuple[str, float]:
        scheduler = Scheduler(executor, prefill_chunk=4)
        t0 = asyncio.get_running_loop().time()
        request = scheduler.submit(PROMPTS[0], SamplingParams(), 4, frozenset())
        with contextlib.suppress(Exception):
            _ = [t async for t in request.tokens()]
        await scheduler.stop()
        return request.finish_reason, asyncio.get_running_loop().time() - t0

    reason, elapsed = asyncio.run(go())
    assert reason == "error"
    assert elapsed < 10, f"{elapsed:.1f} s: the step waited for a re-plan"
