"""The scheduler's steps on the cluster's current pipeline (``llama-node serve``: joined nodes and ``--nodes N``).

``serve`` runs the HTTP server on the pipeline client's event loop (the ``ClusterRuntime``'s), so a step is a task
of that loop. Called from another loop, a step is handed over with ``run_coroutine_threadsafe`` and awaited from the
caller's loop, so neither loop ever waits on the other. The pipeline changes:
when a node joins (or a peer stops answering) the runtime re-plans, loads the new stages and opens a new
``PipelineClient``. The executor picks the new client up between steps. The new stages' KV caches are empty, so
before a request's next row goes there, the rows it already fed are *replayed* into it, cut exactly as they were
first fed (batch-invariant numerics: the cache is rebuilt bit for bit, and greedy or seeded output is unchanged).
A step that fails on a pipeline that has since been replaced is retried on the new one, the same way. A frame that
a node fails (it refuses a row, or raises computing it) ends the streams every frame in flight shares: they are
reopened to the same stages and the step is retried once; when the retry fails too, each of its rows runs alone, so
only the rows the node refuses fail (a ``RowError`` each, with the node's reason) and the rest of the step completes.
The reopened streams reach the same stages, which keep their KV caches, so nothing is replayed into them: each
request's slot log moves to the new client. Replay stays the fallback where a node answers that it no longer knows a
request (FAILED_PRECONDITION: it restarted, or lost the slot): every request fed through those streams is replayed.
Errors that are not about a row are not split: FAILED_PRECONDITION (other than a forgotten request) waits for the
re-plan like a lost node, DATA_LOSS fails the step after its retry, and so does any frame error once a split saw the
node fail every row alone.

``ClusterBackend`` answers 503 with ``Retry-After`` and the cluster's state while no pipeline is loaded (no node
has joined yet, or too few are left), so clients know to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grpc import aio

from coordinator.api.backend import Backend
from coordinator.api.errors import ApiError
from coordinator.scheduler import RowError, RowResult, RowWork

if TYPE_CHECKING:
    from coordinator.cluster import ClusterRuntime
    from coordinator.pipeline.client import PipelineClient
    from coordinator.scheduler import Scheduler
    from llama_shard.sampling import SamplingParams
    from node.wire import RowInput

log = logging.getLogger(__name__)

Segment = tuple[int, tuple[int, ...], bool]  # (start position, tokens, prefill) of one row as it was fed


def _row_input(request_id: int, slot: int, segment: Segment, params: SamplingParams) -> RowInput:
    """A ``RowInput`` for a segment, ``prefill`` included (it decides how a one-token prompt chunk is computed, so a
    replay must keep it). ``node.wire`` (torch) is imported on the first step, not with this module."""
    start, tokens, prefill = segment
    return _wire_row()(request_id, slot, start, tokens, params, False, prefill)


@functools.cache
def _wire_row() -> type[RowInput]:
    from node.wire import RowInput

    return RowInput


#: statuses a node gives one frame (a refused row, an exception while computing it, a frame corrupted on the way);
#: any other error of a stream means a node or link is gone, and the re-plan over the survivors is waited for:
#: UNAVAILABLE, CANCELLED, ... and FAILED_PRECONDITION, a stage that is not what the pipeline expects (no shard, the
#: shard released for a re-plan, other layers or route): a row run alone fails the same way, and only a new pipeline
#: runs it. One FAILED_PRECONDITION is a frame error all the same (``_forgotten``): a slot whose KV is not what the
#: coordinator fed, which reopened streams with the requests replayed into them mend
_FRAME_CODES = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "DATA_LOSS", "INTERNAL"})

#: of those, the statuses that may be about one row, worth running the step's rows alone to find it (DATA_LOSS is
#: the link's: the step is retried once on reopened streams, then fails as a whole)
_ROW_CODES = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE", "INTERNAL"})


#: of those, the statuses about what a row carries (its ids, its positions): the request's fault, an HTTP 400
_REQUEST_CODES = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE"})


def _code(e: BaseException) -> str | None:
    code = getattr(e, "code", None)
    return getattr(code(), "name", None) if callable(code) else None


def _details(e: BaseException) -> str:
    """A node's words for its status (``AioRpcError.details``), or the error's own text."""
    return (e.details() or "") if isinstance(e, aio.AioRpcError) else str(e)


def _frame_error(e: BaseException) -> bool:
    return _code(e) in _FRAME_CODES or _forgotten(e)


def _forgotten(e: BaseException) -> bool:
    """Whether a node refused a row because its slot does not hold the request's positions (``StageHost._check``:
    "unknown request", "row starts at ... but slot ... holds"): it lost the KV it was fed, so a replay is due."""
    if _code(e) != "FAILED_PRECONDITION":
        return False
    details = _details(e)
    return "unknown request" in details or "row starts at" in details


def _row_error(e: BaseException) -> RowError:
    """What a request whose row a node failed *alone* is told: the node's own words, and a 400 when they are about
    what the row carries (the API checks ids and lengths first, so this is a node that knows better), else a 500."""
    code, details = (e.code().name if isinstance(e, aio.AioRpcError) else ""), _details(e)
    if code in _REQUEST_CODES:
        return RowError(f"a node refused this request: {details}", 400)
    return RowError(f"the model failed on this request: {details} ({code})", 500)


@dataclass(slots=True)
class _SlotLog:
    """What one request has fed into its KV slot, and on which pipeline client that cache lives."""

    request_id: int
    slot: int
    params: SamplingParams
    segments: list[Segment]
    client: PipelineClient | None

    @property
    def fed(self) -> int:
        return self.segments[-1][0] + len(self.segments[-1][1]) if self.segments else 0


class ClusterExecutor:
    """Steps on ``runtime``'s current pipeline; waits for one, replays requests into a new one.

    ``wait_s``: how long a step waits for a pipeline to be loaded before failing its requests. ``failover_s``: after
    a failed step, how long to wait for a re-plan to replace the failed pipeline before giving up. ``depth``: frames
    in flight (``--micro-batches``); None: the cluster's ``pipeline_depth`` of each new pipeline. ``on_close``: called
    after the runtime is closed (``serve --nodes`` stops its local node processes).
    """

    def __init__(
        self,
        runtime: ClusterRuntime,
        n_slots: int,
        max_len: int,
        *,
        wait_s: float = 300.0,
        failover_s: float = 30.0,
        depth: int | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.runtime, self.n_slots, self.max_len = runtime, n_slots, max_len
        self.wait_s, self.failover_s = wait_s, failover_s
        self.fixed_depth, self.on_close = depth, on_close
        self.depth = depth or runtime.cluster.depth
        self.replayed_rows = 0  # rows fed again into a new pipeline (visible to tests and logs)
        self.split_steps = 0  # steps whose rows were run one by one to find the row a node refuses
        self._futile = False  # a split failed every row, not by the rows' fault: no more splits until a step runs
        self._current: PipelineClient | None = None
        self._slots: dict[int, _SlotLog] = {}
        self._retry = asyncio.Lock()  # steps retried after a frame error run one at a time
        # ... and alone on the streams (``_retrying``): first attempts wait at ``_open`` while a retry runs, and the
        # retry starts once those in flight (``_flying``) have landed (``_landed``): answered, or failed by a break
        self._open, self._landed = asyncio.Event(), asyncio.Event()
        self._open.set()
        self._landed.set()
        self._flying = 0

    def run(self, rows: Sequence[RowWork]) -> asyncio.Future[list[RowResult]]:
        """Hands the step to the runtime's event loop now; the future settles on the caller's loop. Called on that
        loop (``serve`` runs the HTTP server there), the step is a task of it: no hop between threads."""
        loop = self.runtime.runner.loop
        if asyncio.get_running_loop() is loop:
            return loop.create_task(self._run(list(rows)))
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._run(list(rows)), loop))

    async def close(self) -> None:
        try:
            await asyncio.to_thread(self.runtime.close)
        finally:
            if self.on_close is not None:
                await asyncio.to_thread(self.on_close)

    # ------------------------------------------------------------------------ on the runtime's event loop
    async def _run(self, rows: list[RowWork]) -> list[RowResult]:
        try:
            return await self._attempts(rows)
        except aio.AioRpcError as e:
            # the user reads the node's status in one line, not the error's repr (several lines: a peer's address,
            # gRPC's debug string); the log keeps the whole error (``from e``)
            raise RuntimeError(f"{e.details() or 'a node failed'} ({e.code().name})") from e

    async def _attempts(self, rows: list[RowWork]) -> list[RowResult]:
        """The step: a first attempt, a retry on reopened streams, then each row alone (see the module's docstring)."""
        while True:
            while not self._open.is_set():  # a retry runs (``_retrying``): this step waits for it
                await self._open.wait()
            client = await self._client()
            if not self._open.is_set():  # a retry began while this waited for a pipeline
                continue
            try:
                return await self._flight(client, rows)
            except Exception as e:
                if _frame_error(e):
                    log.warning("a step of %d rows failed (%s); retrying it on reopened streams", len(rows), e)
                    self._forget_if_lost(client, e)
                    break
                if await self._lost(client, e):
                    log.warning("a step of %d rows failed on the old pipeline (%s); retrying on the new one", len(rows),
                                e)  # fmt: skip
                    continue
                raise
        # A node that fails one frame ends the stream every frame in flight shares, so this step may be another's
        # victim: it runs again on reopened streams, one such retry at a time and with no other step on them, so that
        # failing again is its own doing (neither the culprit's retry nor a step holding another refused row shares
        # the streams with a victim's retry, or with a row run alone below).
        async with self._retrying():
            try:
                return await self._retry_step(rows)
            except Exception as e:
                if not _frame_error(e):
                    raise
                if len(rows) == 1:
                    return [_row_error(e)]  # it ran alone already
                if (_code(e) not in _ROW_CODES and not _forgotten(e)) or self._futile:
                    raise  # not about a row, or a node that fails every frame: run alone, each row would fail too
                # (a forgotten request's log is cleared: run alone, it is replayed first, and the culprit found)
                log.warning("a step of %d rows failed again (%s); running each row alone", len(rows), _row_error(e))
            return await self._alone(rows)

    async def _alone(self, rows: list[RowWork]) -> list[RowResult]:
        """Each row in a frame of its own (under ``_retrying``); a row a node fails then gets a ``RowError``.

        A frame fails as a whole, so which rows a node refuses is found by running each alone: the rows that shared
        the step with the culprit complete, only the culprit fails. The cost is bounded by the step: one single-row
        frame per row (a step has at most a row per slot) and one reopen per row refused; a reopen replays nothing
        (``_reopen``). A failed frame may have written KV at the stages before the refusing one; running the row again
        writes the same positions (a stage takes a row that starts at or before its slot's length), so nothing stale
        is ever read, and a slot log gains a row only once its step succeeded, so no row is assumed fed that was not."""
        t0 = time.perf_counter()
        outcomes: list[RowResult] = []
        for row in rows:
            try:
                outcomes.extend(await self._retry_step([row]))
            except Exception as e:
                if not _frame_error(e):
                    raise
                outcomes.append(_row_error(e))
        self.split_steps += 1
        refused = [r.request_id for r, o in zip(rows, outcomes, strict=True) if isinstance(o, RowError)]
        if all(isinstance(o, RowError) and o.status >= 500 for o in outcomes):
            self._futile = True
            log.warning("a node failed each of %d rows alone: later steps that fail twice are not split", len(rows))
        log.warning("split a step of %d rows: request(s) %s refused, the others ran (%.2f s)", len(rows), refused,
                    time.perf_counter() - t0)  # fmt: skip
        return outcomes

    async def _flight(self, client: PipelineClient, rows: list[RowWork]) -> list[RowResult]:
        """A step's first attempt, counted in flight until it lands (answered, or failed by a break of the stream)."""
        self._flying += 1
        self._landed.clear()
        try:
            outcome = await self._step(client, rows)
            self._futile = False  # the node runs frames again
            return outcome
        finally:
            self._flying -= 1
            if not self._flying:
                self._landed.set()

    @contextlib.asynccontextmanager
    async def _retrying(self) -> AsyncIterator[None]:
        """The retry lock, held with no first attempt on the streams: new ones wait, those in flight land first."""
        async with self._retry:
            self._open.clear()
            try:
                await self._landed.wait()
                yield
            finally:
                self._open.set()

    async def _retry_step(self, rows: list[RowWork]) -> list[RowResult]:
        """One attempt of ``rows`` under ``_retrying``, on streams no frame error has broken (a step that landed
        before this one may have broken them); a lost node's re-plan is waited for here. A frame error is raised
        after the streams it broke are reopened, before the lock is let go (reopened after it, the next retry took
        the broken streams). A node gone meanwhile fails the reopen (UNAVAILABLE): that is waited out like a node lost
        mid-step, here or in the next attempt, and the frame error is still the row's."""
        while True:
            client = await self._client()
            try:
                if client.broken:
                    await self._reopen(client)
                    client = await self._client()
                return await self._step(client, rows)
            except Exception as e:
                if _frame_error(e):
                    self._forget_if_lost(client, e)
                    with contextlib.suppress(aio.AioRpcError, ConnectionError):
                        await self._reopen(client)
                    raise
                if await self._lost(client, e):
                    log.warning("a retried step of %d rows failed on the old pipeline (%s); retrying on the new one",
                                len(rows), e)  # fmt: skip
                    continue
                raise

    async def _reopen(self, failed: PipelineClient) -> None:
        """New streams in place of ``failed`` (``Cluster.reopen``) to the same stages, which keep their KV caches: the
        requests fed through ``failed`` continue on them without a replay (a request 1,000 tokens in replayed ~1,000
        frames per reopen, and a split reopens once per refused row). None back: a re-plan replaced ``failed``
        meanwhile, its stages are new and empty, and the slot logs stay on ``failed``, so ``_replay`` rebuilds them."""
        client = await self.runtime.cluster.reopen(failed)
        if client is None:
            return
        for slot_log in self._slots.values():
            if slot_log.client is failed:
                slot_log.client = client
        if self._current is failed:
            self._current = client  # the same pipeline: no "switching" (``_client``)

    def _forget_if_lost(self, client: PipelineClient, e: BaseException) -> None:
        """A node that no longer knows a request (``_forgotten``: it restarted behind the same address) has lost
        every slot fed through ``client``: those requests are replayed on their next step, as into a new pipeline."""
        if not _forgotten(e):
            return
        lost = [s for s in self._slots.values() if s.client is client]
        for slot_log in lost:
            slot_log.client = None
        log.warning("a node no longer knows request(s) fed through these streams (%s); replaying %d request(s)",
                    _details(e), len(lost))  # fmt: skip

    async def _lost(self, client: PipelineClient, e: BaseException) -> bool:
        """Whether ``e`` means a node or link is gone (the stream's status, or the stream closed) and a re-plan has
        replaced ``client``; an error of this process (a row the wire cannot carry, a bug) is no such thing."""
        return isinstance(e, (aio.AioRpcError, ConnectionError)) and await self._replaced(client)

    async def _step(self, client: PipelineClient, rows: list[RowWork]) -> list[RowResult]:
        logs = [self._log_for(r, client) for r in rows]
        await self._replay(client, logs)
        outputs = await client.forward(
            [_row_input(r.request_id, r.slot, (r.start, r.tokens, r.prefill), r.params) for r in rows]
        )
        for r, slot_log in zip(rows, logs, strict=True):
            slot_log.segments.append((r.start, r.tokens, r.prefill))
            slot_log.client = client
        tokens = {o.request_id: o.token for o in outputs}
        return [tokens.get(r.request_id) if r.sample else None for r in rows]

    async def _client(self) -> PipelineClient:
        """The pipeline to use now, once one is loaded (waits while the cluster plans or loads)."""
        cluster = self.runtime.cluster
        try:
            if not cluster.ready.is_set():  # wait_for makes a task of its own: not on every step
                await asyncio.wait_for(cluster.ready.wait(), self.wait_s)
        except TimeoutError:
            raise RuntimeError(f"no pipeline within {self.wait_s:.0f} s: {cluster.state}") from None
        client = cluster.client
        assert client is not None
        if client is not self._current:
            if self._current is not None:
                log.info("switching to the new pipeline (%d stages); requests in progress are replayed into it",
                         len(cluster.stage_nodes))  # fmt: skip
            self._current = client
            self.depth = self.fixed_depth or cluster.depth
            log.info("%d stage(s), %d micro-batch(es) in flight", len(cluster.stage_nodes), self.depth)
        return client

    def _log_for(self, row: RowWork, client: PipelineClient) -> _SlotLog:
        slot_log = self._slots.get(row.slot)
        if slot_log is None or slot_log.request_id != row.request_id:
            if row.start != 0:
                raise RuntimeError(f"request {row.request_id} continues at {row.start} in a slot it never fed")
            slot_log = _SlotLog(row.request_id, row.slot, row.params, [], client)  # a new request: nothing to replay
            self._slots[row.slot] = slot_log
        elif slot_log.fed != row.start:
            raise RuntimeError(f"request {row.request_id} continues at {row.start} but fed {slot_log.fed} tokens")
        return slot_log

    async def _replay(self, client: PipelineClient, logs: Sequence[_SlotLog]) -> None:
        """Feed ``client`` the rows each request fed into an older pipeline: a frame per round, a row per request."""
        stale = [s for s in logs if s.client is not client and s.segments]
        if not stale:
            return
        t0 = time.perf_counter()
        rounds = max(len(s.segments) for s in stale)
        for i in range(rounds):
            rows = [_row_input(s.request_id, s.slot, s.segments[i], s.params) for s in stale if i < len(s.segments)]
            await client.forward(rows)
            self.replayed_rows += len(rows)
        for s in stale:
            s.client = client
        log.info("replayed %d request(s) into the new pipeline (%d frames, %.2f s)", len(stale), rounds,
                 time.perf_counter() - t0)  # fmt: skip

    async def _replaced(self, failed: PipelineClient) -> bool:
        """Whether the cluster replaces ``failed`` with another pipeline within ``failover_s``."""
        deadline = time.monotonic() + self.failover_s
        cluster = self.runtime.cluster
        while time.monotonic() < deadline:
            if cluster.client is not failed and cluster.client is not None:
                return True
            await asyncio.sleep(0.2)
        return False


@dataclass
class ClusterBackend(Backend):
    """A ``Backend`` that answers 503 (with the cluster's state) while the cluster has no pipeline to run on."""

    runtime: ClusterRuntime | None = None

    def ready_scheduler(self) -> Scheduler:
        if self.runtime is not None:
            c = self.runtime.cluster
            if c.client is None or c.state.startswith(("waiting", "not ready")):
                hint = "; run `llama-node join` on the machines that should serve it" if c.client is None else ""
                raise ApiError(503, f"the model is not ready: {c.state}{hint}", retry_after_s=5)
        return super().ready_scheduler()
