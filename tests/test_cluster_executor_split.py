"""``ClusterExecutor`` when a node fails a frame: the step is retried on reopened streams (nothing replayed:
the stages keep their caches), then its rows run alone so that only a refused row fails; errors that are not a
row's (a node lost, a stage released, a node failing every frame) are waited out or fail the step once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio

from coordinator.cluster_executor import ClusterExecutor
from coordinator.pipeline.engine import LoopThread
from coordinator.scheduler import Scheduler
from llama_shard.sampling import SamplingParams
from node.wire import RowInput, RowOutput
from tests.executor_fakes import PROMPTS, FakeCluster, FakePipeline, FakeRuntime, answers, collect, set_event


@pytest.fixture()
def runner() -> Any:
    r = LoopThread()
    yield r
    r.stop()


async def _refused_beside_two_decoding(
    executor: ClusterExecutor, cluster: FakeCluster
) -> list[tuple[str, int | None, list[int]]]:
    """Two requests decode; a third, whose rows the node refuses (INVALID_ARGUMENT), joins their step. Each
    request's finish reason, HTTP status and tokens."""
    scheduler = Scheduler(executor, prefill_chunk=4)
    good = [scheduler.submit(p, SamplingParams(), 12, frozenset()) for p in PROMPTS[:2]]
    while not all(r.generated for r in good):  # both decode: the refused chunk shares their step
        await asyncio.sleep(0)
    bad = scheduler.submit([50, 51, 52], SamplingParams(), 12, frozenset())
    assert cluster.client is not None
    cluster.client.bad, cluster.client.code = {bad.id}, grpc.StatusCode.INVALID_ARGUMENT
    requests = [*good, bad]
    got = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in requests)), 30)
    await scheduler.stop()
    return [(r.finish_reason, r.finish.status if r.finish else None, a) for r, a in zip(requests, got, strict=True)]


@pytest.mark.parametrize("joins", ["prompt-chunks", "decode-rows"])
def test_a_refused_row_fails_alone_and_the_rows_sharing_its_step_get_their_answers(
    runner: LoopThread, joins: str
) -> None:
    """A node that refuses one row fails its whole frame, and the step's retry fails the same way: the step is then
    split, each row run alone, so only the refused request ends (with the node's reason, a 400: INVALID_ARGUMENT is
    about what the row carries), and the requests that shared its step get exactly their answers. ``joins``: the
    refused prompt chunk shares a step with the others' prompt chunks, or (arriving later) with their decode rows."""
    expected, _ = answers(FakePipeline(), FakeCluster(), runner)
    cluster = FakeCluster(depth=1)  # one step in flight: every ready row is in it
    runner.run(set_event(cluster.ready))
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
        answers = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in requests)), 30)
        later = scheduler.submit(PROMPTS[2], SamplingParams(), 12, frozenset())
        answers.append(await asyncio.wait_for(collect(later), 30))
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
        runner.run(set_event(cluster.ready))
        executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=8, max_len=64, failover_s=60)  # type: ignore[arg-type]

        async def go() -> list[tuple[str, list[int]]]:
            scheduler = Scheduler(executor, prefill_chunk=3)  # a prompt chunk per step
            requests = [scheduler.submit(p, SamplingParams(), 12, frozenset()) for p in prompts]
            assert cluster.client is not None
            cluster.client.bad = {requests[i].id for i in refused}
            out = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in requests)), 30)
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

    async def reopen(self, failed: FakePipeline) -> FakePipeline | None:
        self.attempts += 1
        if self.attempts == self.lose_at:
            self.lost = failed
            asyncio.get_running_loop().call_later(0.05, self._replan, failed)
        if self.lost is failed and self.client is failed:
            raise aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "connection refused")
        return await super().reopen(failed)

    def _replan(self, failed: FakePipeline) -> None:
        self.client = FakePipeline(bad=failed.bad)
        self.client.code = failed.code


@pytest.mark.parametrize("lose_at", [1, 2, 3], ids=["retry-reopen", "reopen-after-retry", "reopen-after-alone"])
def test_a_node_lost_while_a_refused_rows_step_is_retried_is_waited_for(runner: LoopThread, lose_at: int) -> None:
    """The node that refused a row goes down before its streams are reopened (the retry's reopen, the one after the
    retry failed again, or the one after the refused row ran alone): the re-plan is waited for, as for a node lost
    mid-step, so the rows sharing the step still get exactly their answers and only the refused one fails (400)."""
    expected, _ = answers(FakePipeline(), FakeCluster(), runner)
    cluster = LosingCluster(depth=1, lose_at=lose_at)
    runner.run(set_event(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=10)  # type: ignore[arg-type]

    cluster.client = FakePipeline()
    out = asyncio.run(_refused_beside_two_decoding(executor, cluster))
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
    runner.run(set_event(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=0.3)  # type: ignore[arg-type]

    async def go() -> str | None:
        scheduler = Scheduler(executor, prefill_chunk=4)
        request = scheduler.submit(PROMPTS[0], SamplingParams(), 4, frozenset())
        await collect(request)
        await scheduler.stop()
        return request.finish.error if request.finish else None

    error = asyncio.run(go())
    assert error is not None and "connection refused (UNAVAILABLE)" in error, error
    assert "AioRpcError" not in error and "debug_error_string" not in error and "\n" not in error, error


class ForgetfulPipeline(FakePipeline):
    """A pipeline whose node answers as ``StageHost`` does a row of a request its slot does not hold."""

    async def forward(self, rows: Sequence[RowInput]) -> list[RowOutput]:
        for r in rows:
            if self.broken is None and r.start > len(self.kv.get(r.slot, [])):
                details = f"unknown request {r.request_id} in slot {r.slot} (it starts at position 0)"
                self.broken = aio.AioRpcError(grpc.StatusCode.FAILED_PRECONDITION, aio.Metadata(), aio.Metadata(),
                                              details)  # fmt: skip
        return await super().forward(rows)


def test_a_node_that_restarted_behind_its_address_gets_the_requests_replayed(runner: LoopThread) -> None:
    """Reopened streams replay nothing (the stages keep their caches), but a node that restarted has lost them: it
    answers FAILED_PRECONDITION "unknown request", and the requests fed through those streams are replayed, so they
    still end with exactly their answers."""
    expected, _ = answers(FakePipeline(), FakeCluster(), runner)
    cluster = FakeCluster(depth=1, restarts=True)
    runner.run(set_event(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=60)  # type: ignore[arg-type]

    cluster.client = ForgetfulPipeline()
    out = asyncio.run(_refused_beside_two_decoding(executor, cluster))
    assert [(o[0], o[2]) for o in out[:2]] == [("length", e) for e in expected[:2]], out
    assert out[2][:2] == ("error", 400), out[2]
    assert cluster.reopened >= 1 and executor.replayed_rows > 0


@dataclass
class ReleasingCluster(FakeCluster):
    """A cluster whose nodes lose their stages (a node restarted, the shard released for a re-plan): from the
    ``release_at``-th frame on, every frame fails FAILED_PRECONDITION, on reopened streams too, until the re-plan
    replaces the pipeline (its stages loaded again) 200 ms later."""

    release_at: int = 4
    released: bool = False

    async def reopen(self, failed: FakePipeline) -> FakePipeline | None:
        if self.client is not failed:
            return None
        self.client, self.reopened = ReleasedPipeline(self), self.reopened + 1
        return self.client

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
    expected, _ = answers(FakePipeline(), FakeCluster(), runner)
    cluster = ReleasingCluster(depth=1)
    got, executor = answers(ReleasedPipeline(cluster), cluster, runner)
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
    runner.run(set_event(cluster.ready))
    executor = ClusterExecutor(FakeRuntime(runner, cluster), n_slots=4, max_len=64, failover_s=60)  # type: ignore[arg-type]

    async def go() -> list[str | None]:
        scheduler = Scheduler(executor, prefill_chunk=4)  # two 2-token prompts a step
        requests = [scheduler.submit([i, i + 1], SamplingParams(), 4, frozenset()) for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*(collect(r) for r in requests)), 30)
        await scheduler.stop()
        return [r.finish.error if r.finish else None for r in requests]

    errors = runner.run(go())
    assert all(e is not None and f"({code.name})" in e for e in errors), errors
    assert executor.split_steps == splits
