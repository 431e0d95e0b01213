"""The continuous-batching scheduler over a fake executor: joining and leaving between steps, chunked prefill,
micro-batches in flight, cancellation freeing slots, and the bounded queue."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from coordinator.scheduler import QueueFullError, Request, RowWork, Scheduler
from llama_shard.sampling import SamplingParams

GREEDY = SamplingParams()


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """No pytest-asyncio here: each test runs on its own fresh event loop."""

    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(asyncio.wait_for(test(), timeout=20))

    return wrapper


class FakeExecutor:
    """Answers each sampling row with ``(last token + 1) % 1000`` after a short delay; records every step."""

    def __init__(self, n_slots: int = 4, max_len: int = 64, depth: int = 1, delay_s: float = 0.001) -> None:
        self.n_slots, self.max_len, self.depth, self.delay_s = n_slots, max_len, depth, delay_s
        self.steps: list[list[RowWork]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
        self.steps.append(list(rows))
        slots = [r.slot for r in rows]
        assert len(slots) == len(set(slots)), "a slot twice in one step"
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.delay_s)
        self.in_flight -= 1
        return [(r.tokens[-1] + 1) % 1000 if r.sample else None for r in rows]

    async def close(self) -> None:
        pass


async def collect(s: Scheduler, prompt: list[int], n: int, eos: frozenset[int] = frozenset()) -> list[int]:
    r = s.submit(prompt, GREEDY, n, eos)
    return [t async for t in r.tokens()]


@run_async
async def test_requests_join_and_leave_between_steps() -> None:
    ex = FakeExecutor(n_slots=2)
    s = Scheduler(ex, prefill_chunk=4)
    outs = await asyncio.gather(
        collect(s, [1, 2, 3], 5), collect(s, [10] * 9, 3), collect(s, [100], 2), collect(s, [7, 8], 4)
    )
    assert outs == [[4, 5, 6, 7, 8], [11, 12, 13], [101, 102], [9, 10, 11, 12]]
    assert s.stats()["free_slots"] == 2 and s.stats()["active"] == 0
    # the 9-token prompt went in chunks of at most 4, at positions 0, 4, 8
    chunks = [(r.start, len(r.tokens)) for step in ex.steps for r in step if r.prefill and r.tokens[0] == 10]
    assert chunks == [(0, 4), (4, 4), (8, 1)]
    # decode rows of different requests shared steps
    assert any(sum(not r.prefill for r in step) == 2 for step in ex.steps)
    # /stats counts the steps, their decode rows and their prompt tokens
    assert s.stats()["steps"] == len(ex.steps)
    assert s.stats()["decode_rows"] == sum(not r.prefill for step in ex.steps for r in step)
    assert s.stats()["prefill_tokens"] == 3 + 9 + 1 + 2
    await s.stop()


@run_async
async def test_eos_ends_a_request_and_frees_its_slot() -> None:
    s = Scheduler(FakeExecutor(n_slots=1))
    assert await collect(s, [5], 10, eos=frozenset({8})) == [6, 7, 8]
    assert s.stats()["free_slots"] == 1
    await s.stop()


@run_async
async def test_micro_batches_in_flight_up_to_depth() -> None:
    ex = FakeExecutor(n_slots=8, depth=3, delay_s=0.005)
    s = Scheduler(ex)
    await asyncio.gather(*(collect(s, [i * 10], 6) for i in range(6)))
    assert ex.max_in_flight == 3
    await s.stop()


@run_async
async def test_cancel_frees_the_slot_and_a_waiting_request_runs() -> None:
    ex = FakeExecutor(n_slots=1, delay_s=0.002)
    s = Scheduler(ex, max_queue=1)
    long = s.submit([1], GREEDY, 50, frozenset())
    waiting = s.submit([500], GREEDY, 2, frozenset())
    got = []
    async for t in long.tokens():
        got.append(t)
        if len(got) == 3:
            s.cancel(long)
    assert long.finish_reason == "cancelled" and len(got) <= 4
    assert [t async for t in waiting.tokens()] == [501, 502]
    counters = {"steps": 0, "decode_rows": 0, "prefill_tokens": 0}
    assert s.stats() | counters == {"active": 0, "waiting": 0, "free_slots": 1, "slots": 1, **counters}
    await s.stop()


@run_async
async def test_full_queue_is_refused_with_retry_after() -> None:
    s = Scheduler(FakeExecutor(n_slots=1, delay_s=0.01), max_queue=1)
    first = s.submit([1], GREEDY, 3, frozenset())
    await asyncio.sleep(0.005)  # admitted
    s.submit([2], GREEDY, 3, frozenset())
    with pytest.raises(QueueFullError) as e:
        s.submit([3], GREEDY, 3, frozenset())
    assert e.value.status == 429 and (e.value.retry_after_s or 0) >= 1
    s.cancel(first)
    await s.stop()


@run_async
async def test_requests_that_cannot_fit_are_refused() -> None:
    s = Scheduler(FakeExecutor(max_len=16))
    with pytest.raises(ValueError, match="exceed the context of 16"):
        s.submit(list(range(10)), GREEDY, 7, frozenset())
    with pytest.raises(ValueError, match="empty"):
        s.submit([], GREEDY, 1, frozenset())
    await s.stop()


@run_async
async def test_a_failing_step_ends_its_requests_with_an_error() -> None:
    class Broken(FakeExecutor):
        async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
            raise RuntimeError("node lost")

    s = Scheduler(Broken())
    r = s.submit([1], GREEDY, 3, frozenset())
    assert [t async for t in r.tokens()] == []
    assert r.finish is not None and r.finish.reason == "error" and "node lost" in (r.finish.error or "")
    assert s.stats()["free_slots"] == 4
    await s.stop()


@run_async
async def test_short_prompts_start_together_within_the_prefill_budget() -> None:
    ex = FakeExecutor(n_slots=4)
    s = Scheduler(ex, prefill_chunk=8)
    await asyncio.gather(*(collect(s, [i] * 3, 1) for i in range(4)), collect(s, [9] * 20, 1))
    first = ex.steps[0]
    assert [len(r.tokens) for r in first] == [3, 3], "two 3-token prompts fit a budget of 8; the third waits"
    long_chunks = [len(r.tokens) for step in ex.steps for r in step if r.tokens[0] == 9]
    assert long_chunks == [8, 8, 4]  # never more than one chunk of a long prompt per step
    await s.stop()


@run_async
async def test_next_step_is_handed_over_before_the_tokens_reach_their_streams() -> None:
    """A settled step's token is held until the request's next row has gone to the executor (which then computes
    while the event loop does the streams' work); tokens and the end still come in order."""
    seen: list[int] = []  # tokens already in the stream's queue when each decode row was handed over

    class Recording(FakeExecutor):
        def run(self, rows: Sequence[RowWork]) -> Coroutine[Any, Any, list[int | None]]:
            seen.append(request._queue.qsize())  # when the step is handed over (before it is awaited)
            return super().run(rows)

    s = Scheduler(Recording(n_slots=1))
    request = s.submit([1, 2], GREEDY, 4, frozenset())
    assert [t async for t in request.tokens()] == [3, 4, 5, 6]
    assert request.finish is not None and request.finish.reason == "length"
    assert seen == [0, 0, 0, 0]  # the prompt's row, then each decode row before the token it follows was delivered
    await s.stop()


@run_async
async def test_a_cancelled_step_fails_its_rows_and_the_scheduler_goes_on() -> None:
    """A step future cancelled by someone other than ``stop`` (the runtime loop closing while a cross-loop step is
    pending) ends that step's requests with an error; the scheduler task lives on and serves the next request."""

    class CancelsFirst(FakeExecutor):
        def run(self, rows: Sequence[RowWork]) -> Any:
            if not self.steps:
                self.steps.append(list(rows))
                fut: asyncio.Future[list[int | None]] = asyncio.get_running_loop().create_future()
                fut.get_loop().call_soon(fut.cancel)
                return fut
            return super().run(rows)

    async def drain(r: Request) -> list[int]:
        return [t async for t in r.tokens()]

    s = Scheduler(CancelsFirst(n_slots=1))
    r = s.submit([1], GREEDY, 3, frozenset())
    assert await asyncio.wait_for(drain(r), timeout=5) == []  # before the fix: never ends
    assert r.finish is not None and r.finish.reason == "error" and "cancelled" in (r.finish.error or "")
    assert s.stats()["free_slots"] == 1
    assert await collect(s, [5], 2) == [6, 7]
    await s.stop()
