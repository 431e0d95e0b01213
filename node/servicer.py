"""The ``Node`` gRPC service: decode with ``node.wire``, call ``NodeService``/``StageHost``, encode.

Forward: the first message of a stream opens it with the route of the stages after this one. This node opens its
own Forward stream to ``route[0]`` (passing on ``route[1:]``), computes every frame on the compute thread in
arrival order, writes the result frame downstream, and relays the replies that come back up. The last stage
answers with sampled tokens itself: up its stream, or (``OpenStream.direct_results``) on the Results call of the
stream's session, which the coordinator holds to the last stage, so the stages between relay no replies. An error
(bad frame, or a status from downstream) ends this stream with its status (and a direct-results stream's Results
call with the same); other streams and the node go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from node import timeline
from node.authz import with_behaviour
from node.service import NodeService, NodeState
from node.slices import PartialSlice, SliceMismatchError
from node.stage_host import StageHost
from node.wire import (
    MAX_MESSAGE_BYTES,
    FrameAssembler,
    FrameResult,
    PendingFrame,
    WireError,
    chunk_crc,
    frame_to_messages,
    load_request_from_pb,
    result_to_pb,
    spec_to_pb,
)
from protos import PROTOCOL_METADATA_KEY, PROTOCOL_VERSION
from protos.llama_node.v1 import node_pb2 as pb
from protos.llama_node.v1 import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
PROTOCOL_METADATA = ((PROTOCOL_METADATA_KEY, str(PROTOCOL_VERSION)),)
_HEALTH = "/llama_node.v1.Node/Health"
#: How long the replies of a direct-results stream wait for their Results call after the stream ended.
RESULTS_UNCLAIMED_S = 60.0
_STATES = {NodeState.idle: pb.HealthReply.IDLE, NodeState.loading: pb.HealthReply.LOADING,
           NodeState.ready: pb.HealthReply.READY}  # fmt: skip


class ProtocolInterceptor(aio.ServerInterceptor):
    """Refuses every call (but Health, which reports the version) that does not speak this protocol version."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method == _HEALTH or handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        theirs = metadata.get(PROTOCOL_METADATA_KEY)
        if theirs == str(PROTOCOL_VERSION):
            return handler
        message = (
            f"protocol mismatch: this node speaks llama-node protocol {PROTOCOL_VERSION}, the caller "
            f"{'sent no version' if theirs is None else f'speaks {theirs!r}'}; run the same llama-node version"
        )

        async def refuse(_request: Any, context: aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)

        return with_behaviour(handler, refuse)


def _step(host: StageHost, pending: PendingFrame) -> list[pb.ForwardMessage] | pb.ForwardReply:
    """On the compute thread: the frame made from its bytes (``FrameAssembler.take``), run through the stage, and its
    result encoded (the messages for the next stage, the rows passed on as they came; or the reply with the tokens),
    so the event loop only reads and writes messages: less work there, and no torch call that would hand the GIL to
    the compute thread and wait to get it back."""
    frame = pending.build()
    timeline.mark("start", frame.frame_id)
    result = host.run(frame)
    timeline.mark("end", frame.frame_id)
    if isinstance(result, FrameResult):
        return result_to_pb(result)
    return list(frame_to_messages(result, rows_pb=pending.rows_pb if result.rows is frame.rows else None))


def _report(out: asyncio.Queue[Any], error: BaseException) -> None:
    """End a Forward stream with ``error``: a peer's status or bad input as it is, anything else as INTERNAL."""
    if not isinstance(error, WireError | aio.AioRpcError):
        log.error("Forward failed", exc_info=error)
        error = WireError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
    out.put_nowait(error)


class _Results:
    """The replies of one direct-results Forward stream on the last stage, for its Results call: replies, then
    ``None`` (the stream ended) or the ``WireError`` it ended with."""

    __slots__ = ("queue", "taken")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[pb.ForwardReply | BaseException | None] = asyncio.Queue()
        self.taken = False  # a Results call reads it


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, service: NodeService, channel_credentials: grpc.ChannelCredentials | None = None) -> None:
        self.service = service
        self._results: dict[str, _Results] = {}  # session -> the replies its Results call reads
        self._channels: dict[str, aio.Channel] = {}
        self._credentials = channel_credentials  # mutual TLS to the next stage (the join issue); None: plain text

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the compute thread, awaited."""
        return await self._start(fn, *args)

    def _start(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue ``fn(*args)`` on the compute thread (which runs its work in order) and return the future of its
        result. The thread settles the asyncio future itself with one ``call_soon_threadsafe``, instead of
        ``run_in_executor``'s concurrent future chained to an asyncio one (locks, a condition and a callback chain
        per frame): about 55 us less per frame and stage."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():  # the awaiting task was cancelled
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        def work() -> None:
            try:
                result, error = fn(*args), None
            except BaseException as e:
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop closed while this ran (the node is stopping)
                loop.call_soon_threadsafe(settle, result, error)

        self.service.compute.submit(work)
        return future

    async def Health(self, request: pb.HealthRequest, context: aio.ServicerContext) -> pb.HealthReply:  # noqa: N802
        s = self.service
        reply = pb.HealthReply(
            protocol_version=PROTOCOL_VERSION, node_id=s.node_id, state=_STATES[s.state],
            load_done_bytes=s.load_done, load_total_bytes=s.load_total, rss_bytes=s.rss_bytes, device=s.device,
        )  # fmt: skip
        if s.spec is not None:
            reply.spec.CopyFrom(spec_to_pb(s.spec))
        return reply

    async def LoadShard(  # noqa: N802 - generated servicer name
        self, request: pb.LoadShardRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.LoadProgress]:
        queue: asyncio.Queue[pb.LoadProgress] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def progress(_phase: str, done: int, total: int) -> None:
            msg = pb.LoadProgress(state=pb.LoadProgress.LOADING, done_bytes=done, total_bytes=total)
            loop.call_soon_threadsafe(queue.put_nowait, msg)

        try:
            req = load_request_from_pb(request)
            job = asyncio.ensure_future(self._run(self.service.load, req, progress))
            while not job.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({job, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            outcome = job.result()
        except WireError as e:
            await context.abort(e.code, e.message)
        total = req.manifest.nbytes
        if outcome.ready:
            yield pb.LoadProgress(state=pb.LoadProgress.READY, done_bytes=total, total_bytes=total,
                                  from_cache=outcome.from_cache)  # fmt: skip
        else:
            yield pb.LoadProgress(state=pb.LoadProgress.AWAITING_BYTES, total_bytes=total,
                                  have_bytes=outcome.have_bytes)  # fmt: skip

    async def PushSlice(  # noqa: N802 - generated servicer name
        self, request_iterator: AsyncIterator[pb.SliceChunk], context: aio.ServicerContext
    ) -> pb.PushSliceReply:
        partial: PartialSlice | None = None
        bars, t0, what = self.service.bars, time.perf_counter(), ""
        try:
            async for chunk in request_iterator:
                if partial is None:
                    partial = self.service.open_push(bytes(chunk.slice_sha256))
                    what = f"receive {partial.sha.hex()[:12]}"
                elif bytes(chunk.slice_sha256) != partial.sha:
                    raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "one PushSlice stream carries one slice")
                if chunk.offset != partial.have:
                    raise WireError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"chunk at offset {chunk.offset}; expected {partial.have}"
                    )
                if chunk_crc(chunk.data) != chunk.crc32:
                    raise WireError(grpc.StatusCode.DATA_LOSS, f"chunk at offset {chunk.offset} fails its crc32")
                try:
                    partial.append(chunk.data)
                except ValueError as e:
                    raise WireError(grpc.StatusCode.OUT_OF_RANGE, str(e)) from None
                except SliceMismatchError as e:
                    raise WireError(grpc.StatusCode.DATA_LOSS, str(e)) from None
                bars.update(what, partial.have, partial.total)
                if partial.have == partial.total:
                    await asyncio.to_thread(self.service.finish_push, partial)
                    bars.done(what, partial.total, time.perf_counter() - t0)
                    return pb.PushSliceReply(received_bytes=partial.total, complete=True)
            return pb.PushSliceReply(received_bytes=partial.have if partial else 0, complete=False)
        except WireError as e:
            await context.abort(e.code, e.message)
            raise  # unreachable: abort raises
        finally:
            if partial is not None:
                partial.close()

    async def ReleaseShard(self, request: pb.ReleaseShardRequest, context: aio.ServicerContext) -> pb.ReleaseShardReply:  # noqa: N802
        return pb.ReleaseShardReply(released=await self._run(self.service.release))

    # ---- Forward ------------------------------------------------------------------------------------------

    def _channel(self, address: str) -> aio.Channel:
        if address not in self._channels:
            if self._credentials is None:
                self._channels[address] = aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            else:
                self._channels[address] = aio.secure_channel(address, self._credentials, options=CHANNEL_OPTIONS)
        return self._channels[address]

    async def Forward(  # noqa: N802 - generated servicer name
        self, request_iterator: AsyncIterator[pb.ForwardMessage], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardReply]:
        out: asyncio.Queue[pb.ForwardReply | BaseException | None] = asyncio.Queue()
        tasks: list[asyncio.Task[None]] = []
        downstream: Any = None
        box: _Results | None = None
        ended: BaseException | None = WireError(grpc.StatusCode.CANCELLED, "the Forward stream was cancelled")
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                ended = None
                return
            if first.WhichOneof("kind") != "open":
                raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "a Forward stream starts with an OpenStream message")
            opened = first.open
            if opened.direct_results and not opened.route:
                box = self._results_box(opened.session)
            host = self.service.host
            if host is None:
                raise WireError(grpc.StatusCode.FAILED_PRECONDITION, "this node holds no shard (LoadShard first)")
            route = list(opened.route)
            if host.spec.has_head == bool(route):
                raise WireError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"layers {host.spec} {'end the model' if host.spec.has_head else 'need a next stage'}, "
                    f"but the route has {len(route)} more stage(s)",
                )
            # the headers now: a direct-results stream yields no reply, and headers sent together with the final
            # status fail in gRPC core (a logged ExecuteBatchError traceback) when the server stops as it ends
            await context.send_initial_metadata(())
            if route:
                stub = pb_grpc.NodeStub(self._channel(route[0]))
                downstream = stub.Forward(metadata=PROTOCOL_METADATA)
                await downstream.write(pb.ForwardMessage(open=pb.OpenStream(
                    route=route[1:], session=opened.session, direct_results=opened.direct_results
                )))  # fmt: skip
                tasks.append(asyncio.create_task(self._relay(downstream, out)))
            emit = out.put_nowait if box is None else box.queue.put_nowait
            tasks.append(asyncio.create_task(self._pump(request_iterator, downstream, emit, out)))
            finished = 0
            while finished < len(tasks):
                item = await out.get()
                if item is None:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
            ended = None
        except WireError as e:
            ended = e
            log.warning("Forward refused: %s (%s)", e.message, e.code.name)
            await context.abort(e.code, e.message)
        except aio.AioRpcError as e:
            ended = WireError(e.code(), f"from the next stage: {e.details()}")
            await context.abort(ended.code, ended.message)
        finally:
            for t in tasks:
                t.cancel()
            if downstream is not None:
                downstream.cancel()
            if box is not None:
                self._end_results(opened.session, box, ended)

    async def _pump(
        self,
        request_iterator: AsyncIterator[pb.ForwardMessage],
        downstream: Any,
        emit: Callable[[pb.ForwardReply], None],
        out: asyncio.Queue[Any],
    ) -> None:
        """Assemble frames and queue each on the compute thread as soon as it is whole; ``_send`` passes the results
        on in the same order. So a frame that arrives while another computes starts the moment that one ends, not
        after its result has been encoded and written and the next frame read (the event loop's work per frame)."""
        computed: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(computed, downstream, emit, out))
        try:
            assembler = FrameAssembler()
            async for msg in request_iterator:
                if msg.WhichOneof("kind") != "part":
                    raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "OpenStream may only be the first message")
                pending = assembler.take(msg.part)
                if pending is None:
                    continue
                timeline.mark("arrive", pending.frame_id)
                host = self.service.host
                if host is None:
                    raise WireError(grpc.StatusCode.FAILED_PRECONDITION, "the shard was released")
                computed.put_nowait(self._start(_step, host, pending))
            computed.put_nowait(None)
            await sender
        except Exception as e:
            _report(out, e)
        finally:
            sender.cancel()

    async def _send(
        self,
        computed: asyncio.Queue[asyncio.Future[Any] | None],
        downstream: Any,
        emit: Callable[[pb.ForwardReply], None],
        out: asyncio.Queue[Any],
    ) -> None:
        """Each computed frame, in order: its activations downstream, or (on the last stage) its tokens to ``emit``,
        encoded already on the compute thread (``_step``)."""
        try:
            while (future := await computed.get()) is not None:
                result = await future
                if timeline.enabled():
                    timeline.mark("out", result[0].part.frame_id if isinstance(result, list) else result.frame_id)
                if isinstance(result, list):
                    for m in result:
                        await downstream.write(m)
                else:
                    emit(result)
            if downstream is not None:
                await downstream.done_writing()
            out.put_nowait(None)
        except Exception as e:
            _report(out, e)

    async def _relay(self, downstream: Any, out: asyncio.Queue[Any]) -> None:
        """The replies (none with direct results) and then the status of the next stage's stream, up this one."""
        try:
            async for reply in downstream:
                out.put_nowait(reply)
            out.put_nowait(None)
        except aio.AioRpcError as e:
            out.put_nowait(e)

    # ---- Results --------------------------------------------------------------------------------------------

    def _results_box(self, session: str) -> _Results:
        box = self._results.get(session)
        if box is None:
            box = self._results[session] = _Results()
        return box

    def _end_results(self, session: str, box: _Results, error: BaseException | None) -> None:
        """The Forward stream of ``session`` ended (``error``: how); its Results call ends the same way. A box that
        no Results call took is dropped a while later (the coordinator went away before it asked)."""
        box.queue.put_nowait(error)
        if not box.taken:
            asyncio.get_running_loop().call_later(RESULTS_UNCLAIMED_S, self._drop_results, session, box)

    def _drop_results(self, session: str, box: _Results) -> None:
        if self._results.get(session) is box and not box.taken:
            del self._results[session]

    async def Results(  # noqa: N802 - generated servicer name
        self, request: pb.ResultsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardReply]:
        box = self._results_box(request.session)
        if box.taken:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"session {request.session!r} is read already")
        box.taken = True
        try:
            while (item := await box.queue.get()) is not None and not isinstance(item, BaseException):
                yield item
        finally:
            if self._results.get(request.session) is box:
                del self._results[request.session]
        if isinstance(item, WireError):
            await context.abort(item.code, item.message)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
