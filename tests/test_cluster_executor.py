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
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
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

    async def reopen(self, failed: FakePipeline) -> None:
        if self.client is failed:  # new streams: the fake's caches start empty, so replay must rebuild them
            await asyncio.sleep(0)  # opening them takes a round trip, in which other steps run (as Cluster.reopen)
            if self.client is not failed:
                return
            self.client, self.reopened = FakePipeline(bad=failed.bad), self.reopened + 1
            self.client.code = failed.code


@dataclass
class FakeRuntime:
    runner: LoopThread
    cluster: FakeCluster

    def close(self) -> None:
        pass


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]


def _answers(
    first: FakePipeline, cluster: FakeCluster, runner: LoopThread, on_runner: bool = False
) -> tuple[list[list[int]], ClusterExecutor]:
    """The tokens of ``PROMPTS``; ``on_runner``: the scheduler on the runtime's loop (as ``serve`` runs it)."""
    cluster.client = first
    runner.run(_set(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=5)  # type: ignore[arg-type]

    async def go() -> list[list[int]]:
        scheduler = Scheduler(executor, prefill_chunk=4)
        requests = [scheduler.submit(p, SamplingParams(), 12, frozenset()) for p in PROMPTS]
        answers = [[t async for t in r.tokens()] for r in requests]
        await scheduler.stop()
        assert all(r.finish_reason == "length" for r in requests), [r.finish for r in requests]
        return answers

    return (runner.run(go()) if on_runner else asyncio.run(go())), executor


async def _set(event: asyncio.Event) -> None:
    event.set()


@pytest.fixture()
def runner() -> Any:
    r = LoopThread()
    yield r
    r.stop()


@pytest.mark.parametrize("fail", [False, True], ids=["switch-between-steps", "step-fails-on-old-pipeline"])
def test_requests_survive_a_replan(runner: LoopThread, fail: bool) -> None:
    # arrange: the answers on one pipeline throughout
    expected, _ = _answers(FakePipeline(), FakeCluster(), runner)
    cluster = FakeCluster()
    old = FakePipeline(cluster, replan_after=6, fail=fail)
    old.next = new = FakePipeline()
    # act: a new pipeline (empty caches) replaces the old one after 6 frames, mid-prefill and mid-decode
    got, executor = _answers(old, cluster, runner)
    # assert: same tokens; the new pipeline was really used and the requests' rows were replayed into it
    assert got == expected
    assert new.frames > 0 and executor.replayed_rows > 0
    assert all(len(new.kv[s]) >= 1 for s in new.kv)


@pytest.mark.parametrize("fail", [False, True], ids=["switch-between-steps", "step-fails-on-old-pipeline"])
def test_on_the_runtimes_loop_a_step_is_its_task_and_the_answers_are_the_same(runner: LoopThread, fail: bool) -> None:
    # arrange: the answers with the scheduler on another loop (each step crosses threads), on one pipeline
    expected, _ = _answers(FakePipeline(), FakeCluster(), runner)
    cluster = FakeCluster()
    old = FakePipeline(cluster, replan_after=6, fail=fail)
    old.next = new = FakePipeline()
    # act: the scheduler on the runtime's loop, through a re-plan
    got, executor = _answers(old, cluster, runner, on_runner=True)

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
    expected, _ = _answers(FakePipeline(), FakeCluster(), runner)
    bad_prompt = [50, 51, 52]
    cluster = FakeCluster(depth=3)
    runner.run(_set(cluster.ready))
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
    assert cluster.reopened >= 1 and executor.replayed_rows > 0
    assert elapsed < 30, f"{elapsed:.1f} s: the executor waited for a re-plan that never comes"


class LocalErrorPipeline(FakePipeline):
    """A pipeline whose client raises before anything is sent (a row the wire format cannot carry)."""

    async def forward(self, rows: Sequence[RowInput]) -> list[RowOutput]:
        raise ValueError("Value out of range: 1035125872496")


def test_an_error_of_this_process_fails_the_step_without_waiting_for_a_replan(runner: LoopThread) -> None:
    """Only a stream's status or a closed stream means a node may be gone (worth failover_s of waiting for a
    re-plan); schemathesis found a step that failed to encode waiting 30 s, which looked like a hang."""
    cluster = FakeCluster(client=LocalErrorPipeline())
    runner.run(_set(cluster.ready))
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


@pytest.mark.parametrize("joins", ["prompt-chunks", "decode-rows"])
def test_a_refused_row_fails_alone_and_the_rows_sharing_its_step_get_their_answers(
    runner: LoopThread, joins: str
) -> None:
    """A node that refuses one row fails its whole frame, and the step's retry fails the same way: the step is then
    split, each row run alone, so only the refused request ends (with the node's reason, a 400: INVALID_ARGUMENT is
    about what the row carries), and the requests that shared its step get exactly their answers. ``joins``: the
    refused prompt chunk shares a step with the others' prompt chunks, or (arriving later) with their decode rows."""
    expected, _ = _answers(FakePipeline(), FakeCluster(), runner)
    cluster = FakeCluster(depth=1)  # one step in flight: every ready row is in it
    runner.run(_set(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=60)  # type: ignore[arg-type]

    async def go() -> list[tuple[str, int | None, str | None, list[int]]]:
        scheduler = Scheduler(executor, prefill_chunk=16)  # the three first chunks (7 + 3 + 3 tokens) fit one step
        good = [scheduler.submit(p, SamplingParams(), 12, frozenset()) for p in PROMPTS[:2]]
        if joins == "decode-rows":
            while not all(r.generated for r in good):
                await asyncio.sleep(0)
        bad = scheduler.submit([50, 51, 52], SamplingParams(), 12, frozenset())
        assert cluster.client is not None
        cluster.client.bad, cluster.client.code = {bad.id}, grpc.StatusCode.INVALID_ARGUMENT
        requests = [*good, bad]
        answers = await asyncio.wait_for(asyncio.gather(*(_collect(r) for r in requests)), 30)
        later = scheduler.submit(PROMPTS[2], SamplingParams(), 12, frozenset())
        answers.append(await asyncio.wait_for(_collect(later), 30))
        free = scheduler.stats()["free_slots"]
        await scheduler.stop()
        assert free == 4, "a slot was left behind"
        return [
            (r.finish_reason, r.finish.status if r.finish else None, r.finish.error if r.finish else None, tokens)
            for r, tokens in zip([*requests, later], answers, strict=True)
        ]

    cluster.client = FakePipeline()
    out = asyncio.run(go())
    # the requests beside the refused one, and one after it, get exactly their answers alone
    assert [(o[0], o[3]) for o in (out[0], out[1], out[3])] == [("length", e) for e in expected]
    # the refused one fails with the node's reason, as the request's fault
    reason, status, error, _ = out[2]
    assert (reason, status) == ("error", 400) and error is not None and "token id outside" in error, out[2]
    assert "AioRpcError" not in error, error
    assert executor.split_steps == 1


async def _collect(r: Any) -> list[int]:
    tokens: list[int] = []
    with contextlib.suppress(Exception):
        tokens.extend([t async for t in r.tokens()])
    return tokens


@pytest.mark.parametrize(("depth", "refused"), [(3, (2, 5)), (4, (0, 4))])
def test_two_refused_rows_in_steps_in_flight_together_fail_alone(
    runner: LoopThread, depth: int, refused: tuple[int, int]
) -> None:
    """Two requests a node refuses, in different steps of those in flight: each retry and each row run alone has the
    streams to itself (first attempts wait, those in flight land, and streams they broke are reopened), so neither
    refusal is blamed on a request retried or run alone beside the other. On the runtime's loop the order of events
    is fixed; here the old executor failed an innocent request (its retry took streams a first attempt holding the
    other refused row broke, or shared them with it)."""
    prompts = [[10 * i, 10 * i + 1, 10 * i + 2] for i in range(6)]

    def answers(refused: tuple[int, ...]) -> list[tuple[str, list[int]]]:
        cluster = FakeCluster(depth=depth, client=FakePipeline())
        runner.run(_set(cluster.ready))
        executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=8, max_len=64, failover_s=60)  # type: ignore[arg-type]

        async def go() -> list[tuple[str, list[int]]]:
            scheduler = Scheduler(executor, prefill_chunk=3)  # a prompt chunk per step
            requests = [scheduler.submit(p, SamplingParams(), 12, frozenset()) for p in prompts]
            assert cluster.client is not None
            cluster.client.bad = {requests[i].id for i in refused}
            out = await asyncio.wait_for(asyncio.gather(*(_collect(r) for r in requests)), 30)
            await scheduler.stop()
            return [(r.finish_reason, tokens) for r, tokens in zip(requests, out, strict=True)]

        return runner.run(go())

    expected = answers(())
    got = answers(refused)
    assert [reason == "error" for reason, _ in got] == [i in refused for i in range(6)], got
    assert [o for i, o in enumerate(got) if i not in refused] == [o for i, o in enumerate(expected) if i not in refused]


@dataclass
class LosingCluster(FakeCluster):
    """A cluster whose first node goes down at the ``lose_at``-th reopen: from then on the streams cannot be opened
    again (UNAVAILABLE, as ``PipelineClient.open`` raises with no node to connect to) until the runtime's re-plan
    replaces the pipeline, 50 ms later."""

    lose_at: int = 1
    attempts: int = 0
    lost: FakePipeline | None = None

    async def reopen(self, failed: FakePipeline) -> None:
        self.attempts += 1
        if self.attempts == self.lose_at:
            self.lost = failed
            asyncio.get_running_loop().call_later(0.05, self._replan, failed)
        if self.lost is failed and self.client is failed:
            raise aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "connection refused")
        await super().reopen(failed)

    def _replan(self, failed: FakePipeline) -> None:
        self.client = FakePipeline(bad=failed.bad)
        self.client.code = failed.code


@pytest.mark.parametrize("lose_at", [1, 2, 3], ids=["retry-reopen", "reopen-after-retry", "reopen-after-alone"])
def test_a_node_lost_while_a_refused_rows_step_is_retried_is_waited_for(runner: LoopThread, lose_at: int) -> None:
    """The node that refused a row goes down before its streams are reopened (the retry's reopen, the one after the
    retry failed again, or the one after the refused row ran alone): the re-plan is waited for, as for a node lost
    mid-step, so the rows sharing the step still get exactly their answers and only the refused one fails (400)."""
    expected, _ = _answers(FakePipeline(), FakeCluster(), runner)
    cluster = LosingCluster(depth=1, lose_at=lose_at)
    runner.run(_set(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=10)  # type: ignore[arg-type]

    async def go() -> list[tuple[str, int | None, list[int]]]:
        scheduler = Scheduler(executor, prefill_chunk=4)
        good = [scheduler.submit(p, SamplingParams(), 12, frozenset()) for p in PROMPTS[:2]]
        while not all(r.generated for r in good):  # both decode: the refused chunk shares their step
            await asyncio.sleep(0)
        bad = scheduler.submit([50, 51, 52], SamplingParams(), 12, frozenset())
        assert cluster.client is not None
        cluster.client.bad, cluster.client.code = {bad.id}, grpc.StatusCode.INVALID_ARGUMENT
        requests = [*good, bad]
        answers = await asyncio.wait_for(asyncio.gather(*(_collect(r) for r in requests)), 30)
        await scheduler.stop()
        return [
            (r.finish_reason, r.finish.status if r.finish else None, a) for r, a in zip(requests, answers, strict=True)
        ]

    cluster.client = FakePipeline()
    out = asyncio.run(go())
    assert [(o[0], o[2]) for o in out[:2]] == [("length", e) for e in expected[:2]], out
    assert out[2][:2] == ("error", 400), out[2]
    assert cluster.lost is not None and cluster.client is not cluster.lost, "the node was never lost"


class GonePipeline(FakePipeline):
    """A pipeline whose first node is gone (and no re-plan replaces it)."""

    async def forward(self, rows: Sequence[RowInput]) -> list[RowOutput]:
        raise aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "connection refused",
                              'UNKNOWN:Error received from peer ipv4:10.0.0.7:50051 {created_time:"..."}')  # fmt: skip


def test_a_node_gone_for_good_is_reported_in_words_not_as_the_grpc_error(runner: LoopThread) -> None:
    """After ``failover_s`` with no re-plan the step fails: the user reads the node's status in one line, not the
    ``AioRpcError``'s repr (several lines, with a peer's address and gRPC's debug string)."""
    cluster = FakeCluster(client=GonePipeline())
    runner.run(_set(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=0.3)  # type: ignore[arg-type]

    async def go() -> str | None:
        scheduler = Scheduler(executor, prefill_chunk=4)
        request = scheduler.submit(PROMPTS[0], SamplingParams(), 4, frozenset())
        await _collect(request)
        await scheduler.stop()
        return request.finish.error if request.finish else None

    error = asyncio.run(go())
    assert error is not None and "connection refused (UNAVAILABLE)" in error, error
    assert "AioRpcError" not in error and "debug_error_string" not in error and "\n" not in error, error


@dataclass
class ReleasingCluster(FakeCluster):
    """A cluster whose nodes lose their stages (a node restarted, the shard released for a re-plan): from the
    ``release_at``-th frame on, every frame fails FAILED_PRECONDITION, on reopened streams too, until the re-plan
    replaces the pipeline (its stages loaded again) 200 ms later."""

    release_at: int = 4
    released: bool = False

    async def reopen(self, failed: FakePipeline) -> None:
        if self.client is failed:
            self.client, self.reopened = ReleasedPipeline(self), self.reopened + 1

    def replan(self) -> None:
        self.client = FakePipeline()


class ReleasedPipeline(FakePipeline):
    async def forward(self, rows: Sequence[RowInput]) -> list[RowOutput]:
        cluster = self.cluster
        assert isinstance(cluster, ReleasingCluster)
        if self.frames + 1 >= cluster.release_at and not cluster.released:
            cluster.released = True
            asyncio.get_running_loop().call_later(0.2, cluster.replan)
        if cluster.released:
            raise aio.AioRpcError(grpc.StatusCode.FAILED_PRECONDITION, aio.Metadata(), aio.Metadata(), "no shard")
        return await super().forward(rows)


def test_a_stage_released_under_the_steps_waits_for_the_replan_instead_of_failing_every_row(
    runner: LoopThread,
) -> None:
    """FAILED_PRECONDITION (the node holds no shard, or not the layers or slot state the frame expects) is about the
    pipeline, not a row: the executor waits for the re-plan as for a lost node, and the requests get their answers
    on the new pipeline. Before, the step was retried, split, and every row ended with a 500."""
    expected, _ = _answers(FakePipeline(), FakeCluster(), runner)
    cluster = ReleasingCluster(depth=1)
    got, executor = _answers(ReleasedPipeline(cluster), cluster, runner)
    assert got == expected and cluster.released
    assert executor.split_steps == 0


@pytest.mark.parametrize(("code", "splits"), [(grpc.StatusCode.INTERNAL, 1), (grpc.StatusCode.DATA_LOSS, 0)])
def test_a_node_that_fails_every_frame_is_split_once_not_every_step(
    runner: LoopThread, code: grpc.StatusCode, splits: int
) -> None:
    """A split whose every row failed (not the rows' fault) shows a node that fails every frame: later steps fail as a
    whole after their retry, instead of costing a frame and a reopen per row each. DATA_LOSS (the link's, not a
    row's) is never split."""
    cluster = FakeCluster(depth=1, client=FakePipeline(bad=set(range(1, 100))))  # every request's row fails
    assert cluster.client is not None
    cluster.client.code = code
    runner.run(_set(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=60)  # type: ignore[arg-type]

    async def go() -> list[str | None]:
        scheduler = Scheduler(executor, prefill_chunk=4)  # two 2-token prompts a step
        requests = [scheduler.submit([i, i + 1], SamplingParams(), 4, frozenset()) for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*(_collect(r) for r in requests)), 30)
        await scheduler.stop()
        return [r.finish.error if r.finish else None for r in requests]

    errors = runner.run(go())
    assert all(e is not None and f"({code.name})" in e for e in errors), errors
    assert executor.split_steps == splits
