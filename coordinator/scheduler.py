"""Continuous batching: many requests share the model, joining and leaving between steps.

The scheduler is an asyncio task on the HTTP server's event loop (with ``serve`` over a cluster, also the pipeline
client's); it never computes. Each *step* is a list of ``RowWork`` (one row per request: a decode token, or a chunk
of its prompt) handed to a ``StepExecutor``, which runs it somewhere else (a worker thread here, a pipeline of nodes
there) and answers with the sampled token of every row that asked for one. Up to ``depth`` steps are in flight at
once, so a pipeline of ``depth`` stages keeps every stage busy; a request is in at most one step at a time, since
its next row needs the token the last one produced.

Each admitted request owns one KV slot until it finishes, is cancelled or its client goes away. Requests beyond the
slots wait in a bounded queue; beyond that, ``submit`` raises ``QueueFullError`` (the API answers 429 with
``Retry-After``). Long prompts are fed in chunks of ``prefill_chunk`` tokens, at most one chunk per step, so decoding
requests keep getting a token every step while a long prompt is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llama_shard.sampling import SamplingParams

log = logging.getLogger(__name__)


class SchedulerError(Exception):
    """A request could not be accepted; ``status`` is the HTTP status to answer with."""

    status = 503

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RowError(Exception):
    """An executor's answer for one row in place of its token: that row failed (a node refused it), the step's other
    rows ran. ``status``: the HTTP status it deserves (400: what the request carries, 500: the server's fault)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


#: a row's outcome: its sampled token, None where none was asked, or why that row alone failed
RowResult = int | None | RowError


class QueueFullError(SchedulerError):
    status = 429


class NotReadyError(SchedulerError):
    status = 503


@dataclass(frozen=True, slots=True)
class RowWork:
    """One request's part of a step: ``tokens`` fed at positions ``start..start+len-1`` of KV slot ``slot``.

    ``sample`` asks for the token after them (the last prompt chunk, and every decode row). The penalties' history
    is kept where the sampling happens (``llama_shard.sampling.SlotHistories``), not shipped with every step.
    """

    request_id: int
    slot: int
    start: int
    tokens: tuple[int, ...]
    prefill: bool
    sample: bool
    params: SamplingParams


class StepExecutor(Protocol):
    """Runs steps of rows. ``run`` returns, for each row, the sampled token id, None where none was asked, or a
    ``RowError`` for a row that failed alone; an exception fails every row of the step."""

    n_slots: int
    max_len: int
    depth: int

    def run(self, rows: Sequence[RowWork]) -> Awaitable[Sequence[RowResult]]:
        """The step's outcome. An executor that computes elsewhere (a thread, a pipeline) should hand the step over
        before it returns, not when the awaitable is first awaited: the scheduler's loop first delivers the previous
        step's tokens to their streams (work of the same loop), and a step started after that starts late."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Finished:
    """The last item of a request's token stream."""

    reason: str  # "stop" (an end-of-turn token), "length" (max tokens), "cancelled" or "error"
    error: str | None = None
    status: int = 500  # with an error: the HTTP status it deserves (``RowError.status``)


@dataclass(eq=False)
class Request:
    """A request's state, owned by the scheduler; the API reads tokens from ``tokens()``."""

    id: int
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    eos: frozenset[int]
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    fed: int = 0  # prompt tokens already in the KV cache
    in_flight: bool = False
    done: bool = False
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0
    finish: Finished | None = None
    _queue: asyncio.Queue[int | Finished] = field(default_factory=asyncio.Queue)

    async def tokens(self) -> AsyncIterator[int]:
        """The generated ids (an end-of-turn id included) as they come; ends at the request's end."""
        while True:
            item = await self._queue.get()
            if isinstance(item, Finished):
                self.finish = item
                return
            yield item

    @property
    def finish_reason(self) -> str:
        return self.finish.reason if self.finish else "cancelled"


class Scheduler:
    """Admits requests into KV slots and keeps ``executor.depth`` steps of their rows in flight."""

    def __init__(self, executor: StepExecutor, *, max_queue: int | None = None, prefill_chunk: int = 32) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.executor = executor
        self.max_queue = 4 * executor.n_slots if max_queue is None else max_queue
        self.prefill_chunk = prefill_chunk
        self._ids = itertools.count(1)
        self._free = list(range(executor.n_slots))
        self._waiting: deque[Request] = deque()
        self._active: dict[int, Request] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._settled: deque[asyncio.Future[Sequence[RowResult]]] = deque()  # steps done, not yet applied
        self._outbox: list[tuple[Request, int | Finished]] | None = None  # held deliveries (see ``_loop``)
        self.steps = 0  # steps handed to the executor, and their decode rows and prompt tokens (``/stats``)
        self.decode_rows = 0
        self.prefill_tokens = 0

    # ------------------------------------------------------------------------------------------------ public
    @property
    def max_len(self) -> int:
        return self.executor.max_len

    def stats(self) -> dict[str, int]:
        return {
            "active": len(self._active),
            "waiting": len(self._waiting),
            "free_slots": len(self._free),
            "slots": self.executor.n_slots,
            "steps": self.steps,
            "decode_rows": self.decode_rows,
            "prefill_tokens": self.prefill_tokens,
        }

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for r in [*self._active.values(), *self._waiting]:
            self._end(r, Finished("error", "the server is shutting down"))
        await self.executor.close()

    def submit(self, prompt: Sequence[int], params: SamplingParams, max_tokens: int, eos: frozenset[int]) -> Request:
        """Queue a request. Raises ``QueueFullError`` when the queue is full, ``ValueError`` when it cannot fit."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if len(prompt) + max_tokens > self.max_len:
            raise ValueError(
                f"{len(prompt)} prompt tokens + {max_tokens} to generate exceed the context of {self.max_len}"
            )
        if not self._free and len(self._waiting) >= self.max_queue:
            raise QueueFullError(
                f"the server is busy: {len(self._active)} requests running and {len(self._waiting)} queued",
                retry_after_s=self._retry_after(),
            )
        self.start()
        r = Request(next(self._ids), list(prompt), params, max_tokens, eos)
        self._waiting.append(r)
        self._wake.set()
        return r

    def cancel(self, r: Request) -> None:
        """Stop a request (client gone, stop string seen); its slot is freed before the next step."""
        if r.done:
            return
        r.cancelled = True
        if r in self._waiting:
            self._waiting.remove(r)
            self._end(r, Finished("cancelled"))
        elif not r.in_flight:
            self._end(r, Finished("cancelled"))
        self._wake.set()

    # ------------------------------------------------------------------------------------------------ loop
    def _retry_after(self) -> int:
        return max(1, math.ceil(len(self._waiting) / max(1, self.executor.n_slots)))

    def _end(self, r: Request, finish: Finished) -> None:
        if r.done:
            return
        r.done = True
        r.t_end = time.perf_counter()
        self._active.pop(r.id, None)
        if r.slot is not None:
            self._free.append(r.slot)
            r.slot = None
        self._deliver(r, finish)

    def _deliver(self, r: Request, item: int | Finished) -> None:
        if self._outbox is not None:
            self._outbox.append((r, item))
        else:
            r._queue.put_nowait(item)

    def _step_done(self, fut: asyncio.Future[Sequence[RowResult]]) -> None:
        self._settled.append(fut)
        self._wake.set()

    def _admit(self) -> None:
        while self._free and self._waiting:
            r = self._waiting.popleft()
            r.slot = self._free.pop()
            r.t_admit = time.perf_counter()
            self._active[r.id] = r

    def _next_step(self) -> list[RowWork]:
        ready = [r for r in self._active.values() if not r.in_flight and not r.done]
        if not ready:
            return []
        # spread the rows over the micro-batches so that every pipeline stage has work
        share = math.ceil(len(self._active) / self.executor.depth)
        rows: list[RowWork] = []
        decoding = [r for r in ready if r.fed == len(r.prompt)]
        for r in decoding[:share]:
            assert r.slot is not None
            rows.append(
                RowWork(
                    r.id,
                    r.slot,
                    len(r.prompt) + len(r.generated) - 1,
                    (r.generated[-1],),
                    False,
                    True,
                    r.params,
                )
            )
        # prompt chunks: the oldest first, as many as fit in a budget of prefill_chunk tokens (at least one), so a
        # burst of short prompts starts together while a long prompt never holds a step for more than one chunk.
        # Chunks start at multiples of prefill_chunk whatever else runs: a prompt is always cut the same way.
        budget = self.prefill_chunk
        for r in sorted((r for r in ready if r.fed < len(r.prompt)), key=lambda q: q.id):
            assert r.slot is not None
            end = min(len(r.prompt), r.fed + self.prefill_chunk)
            if end - r.fed > budget and budget < self.prefill_chunk:
                break
            budget -= end - r.fed
            chunk = tuple(r.prompt[r.fed : end])
            last = end == len(r.prompt)
            rows.append(RowWork(r.id, r.slot, r.fed, chunk, True, last, r.params))
            if budget <= 0:
                break
        for row in rows:
            self._active[row.request_id].in_flight = True
        return rows

    def _apply(self, rows: Sequence[RowWork], tokens: Sequence[RowResult]) -> None:
        now = time.perf_counter()
        for row, token in zip(rows, tokens, strict=True):
            r = self._active.get(row.request_id)
            if r is None:
                continue
            r.in_flight = False
            if isinstance(token, RowError):
                log.warning("request %d failed: %s", r.id, token)
                self._end(r, Finished("error", str(token), token.status))
                continue
            if r.cancelled:
                self._end(r, Finished("cancelled"))
                continue
            if row.prefill:
                r.fed += len(row.tokens)
            if token is None:
                continue
            if not r.generated:
                r.t_first = now
            r.generated.append(token)
            self._deliver(r, token)
            if token in r.eos:
                self._end(r, Finished("stop"))
            elif len(r.generated) >= r.max_tokens:
                self._end(r, Finished("length"))

    def _fail(self, rows: Sequence[RowWork], error: BaseException) -> None:
        log.exception("a step of %d rows failed", len(rows), exc_info=error)
        for row in rows:
            r = self._active.get(row.request_id)
            if r is not None:
                r.in_flight = False
                self._end(r, Finished("error", f"the model failed: {error}"))

    async def _loop(self) -> None:
        """Start steps while fewer than ``depth`` are in flight, then sleep until one settles or a request comes or
        goes. A settled step's tokens reach their streams only after the next steps are handed over: the executor
        gets its next frame before this loop's event loop turns to the streams' work (SSE, detokenising)."""
        in_flight: dict[asyncio.Future[Sequence[RowResult]], list[RowWork]] = {}
        try:
            while True:
                for r in [r for r in self._active.values() if r.cancelled and not r.in_flight]:
                    self._end(r, Finished("cancelled"))
                self._admit()
                while len(in_flight) < self.executor.depth:
                    rows = self._next_step()
                    if not rows:
                        break
                    step: asyncio.Future[Sequence[RowResult]] = asyncio.ensure_future(self.executor.run(rows))
                    in_flight[step] = rows
                    step.add_done_callback(self._step_done)
                    self.steps += 1
                    self.decode_rows += sum(not r.prefill for r in rows)
                    self.prefill_tokens += sum(len(r.tokens) for r in rows if r.prefill)
                self._flush()
                if not self._settled:
                    self._wake.clear()
                    await self._wake.wait()
                self._outbox = []
                while self._settled:
                    done = self._settled.popleft()
                    rows = in_flight.pop(done)
                    if done.cancelled():
                        # not by ``stop`` (that cancels this task, and the ``finally`` drops the callbacks first):
                        # e.g. the pipeline client's loop closing under a pending step. ``exception()`` would raise
                        # CancelledError here and end this task, leaving every stream waiting forever.
                        self._fail(rows, RuntimeError("the step was cancelled"))
                        continue
                    error = done.exception()
                    if error is not None:
                        self._fail(rows, error)
                    else:
                        self._apply(rows, done.result())
        finally:
            self._flush()
            for fut in in_flight:
                fut.remove_done_callback(self._step_done)
                fut.cancel()
            self._settled.clear()

    def _flush(self) -> None:
        """Hand the held tokens and ends to their streams."""
        outbox, self._outbox = self._outbox, None
        for r, item in outbox or ():
            r._queue.put_nowait(item)
