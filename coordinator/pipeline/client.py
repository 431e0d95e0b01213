"""Async clients: ``NodeClient`` for one node's control calls, ``PipelineClient`` for the activation stream.

``PipelineClient`` holds one Forward stream to the first stage; the route of the others travels in its
OpenStream message and the stages connect to each other. With two or more stages it also holds a Results call
to the last stage, which sends the sampled tokens there directly (``direct_results``: the stages between relay
nothing back); the Forward stream then carries only the status of the chain, so an error anywhere still ends it.
Frames are matched to replies by ``frame_id``, so any number of ``forward`` calls may be in flight at once
(micro-batches pipelined across the stages); each frame's parts are written contiguously.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from node import timeline
from node.servicer import CHANNEL_OPTIONS, PROTOCOL_METADATA
from node.slices import SliceManifest
from node.wire import (
    DEFAULT_PART_BYTES,
    Frame,
    LoadRequest,
    RowInput,
    RowOutput,
    chunk_crc,
    frame_to_messages,
    load_request_to_pb,
    result_from_pb,
)
from protos import PROTOCOL_VERSION
from protos.llama_node.v1 import node_pb2 as pb
from protos.llama_node.v1 import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Bytes per PushSlice chunk.
PUSH_CHUNK_BYTES = 1 << 20


class ProtocolMismatchError(RuntimeError):
    pass


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> aio.Channel:
    """Mutual TLS with the coordinator's certificate (the join issue), or plain text for local/--insecure nodes."""
    if credentials is None:
        return aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


class NodeClient:
    """Control calls to one node (Health, LoadShard, PushSlice, ReleaseShard)."""

    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.channel = _channel(address, credentials)
        self.stub = pb_grpc.NodeStub(self.channel)

    async def health(self, timeout: float = 5.0) -> pb.HealthReply:
        """The node's health; raises ``ProtocolMismatchError`` when it speaks another protocol version."""
        reply = await self.stub.Health(pb.HealthRequest(), timeout=timeout)
        if reply.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"node {self.address} speaks llama-node protocol {reply.protocol_version}, this coordinator "
                f"speaks {PROTOCOL_VERSION}: run the same llama-node version on both"
            )
        return reply

    async def load(self, req: LoadRequest, on_progress: Callable[[int, int], None] | None = None) -> pb.LoadProgress:
        """Ask the node to hold ``req.spec``; returns the last progress message (READY or AWAITING_BYTES)."""
        last = pb.LoadProgress()
        call = self.stub.LoadShard(load_request_to_pb(req), metadata=PROTOCOL_METADATA)
        async for progress in call:
            last = progress
            if on_progress is not None:
                on_progress(progress.done_bytes, progress.total_bytes)
        return last

    async def push(
        self,
        blob: Path,
        manifest: SliceManifest,
        offset: int,
        on_progress: Callable[[int, int], None] | None = None,
        chunk_bytes: int = PUSH_CHUNK_BYTES,
    ) -> pb.PushSliceReply:
        """Send the slice's bytes from ``offset`` (where the node's partial copy ends)."""

        async def chunks() -> AsyncIterator[pb.SliceChunk]:
            with open(blob, "rb") as f:
                f.seek(offset)
                at = offset
                while data := await asyncio.to_thread(f.read, chunk_bytes):
                    yield pb.SliceChunk(slice_sha256=manifest.sha256, offset=at, data=data, crc32=chunk_crc(data))
                    at += len(data)
                    if on_progress is not None:
                        on_progress(at, manifest.nbytes)

        return await self.stub.PushSlice(chunks(), metadata=PROTOCOL_METADATA)

    async def release(self) -> bool:
        reply = await self.stub.ReleaseShard(pb.ReleaseShardRequest(), metadata=PROTOCOL_METADATA)
        return reply.released

    async def close(self) -> None:
        await self.channel.close()


#: How long a Results call that ended CANCELLED waits for the Forward stream's status, the cause (an earlier stage's).
UPSTREAM_STATUS_S = 5.0


class PipelineClient:
    """The Forward stream into the first stage of ``addresses`` (stages in order)."""

    def __init__(
        self,
        addresses: Sequence[str],
        part_bytes: int = DEFAULT_PART_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("a pipeline needs at least one stage")
        self.addresses, self.part_bytes = list(addresses), part_bytes
        self.session = uuid.uuid4().hex
        self.direct = len(self.addresses) > 1  # the last stage answers on a Results call of this client's
        self._channel = _channel(self.addresses[0], credentials)
        self._last_channel = _channel(self.addresses[-1], credentials) if self.direct else None
        self._call: Any = None
        self._results: Any = None
        self._readers: list[asyncio.Task[None]] = []
        self._forward_reader: asyncio.Task[None] | None = None  # the Forward stream's (first of ``_readers``)
        self._pending: dict[int, asyncio.Future[tuple[RowOutput, ...]]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._error: BaseException | None = None

    async def open(self) -> None:
        self._call = pb_grpc.NodeStub(self._channel).Forward(metadata=PROTOCOL_METADATA)
        opening = pb.OpenStream(route=self.addresses[1:], session=self.session, direct_results=self.direct)
        await self._call.write(pb.ForwardMessage(open=opening))
        self._forward_reader = asyncio.create_task(self._read(self._call, answers=not self.direct))
        self._readers.append(self._forward_reader)
        if self._last_channel is not None:
            self._results = pb_grpc.NodeStub(self._last_channel).Results(
                pb.ResultsRequest(session=self.session), metadata=PROTOCOL_METADATA
            )
            self._readers.append(asyncio.create_task(self._read(self._results, answers=True)))

    async def _read(self, call: Any, answers: bool) -> None:
        """Settle the frames from ``call``'s replies. When it ends: on an error, fail every pending frame (either
        stream's error is the pipeline's); when it ends cleanly, only if it is the one that ``answers`` (the Forward
        stream of a direct-results pipeline ends before the Results call has delivered the last replies)."""
        try:
            async for reply in call:
                result = result_from_pb(reply)
                timeline.mark("recv", result.frame_id)
                future = self._pending.pop(result.frame_id, None)
                if future is not None and not future.done():
                    future.set_result(result.rows)
            error: BaseException = ConnectionError("the pipeline closed its Forward stream")
            failed = answers
        except aio.AioRpcError as e:
            error, failed = e, True
            forward = self._forward_reader
            if call is self._results and e.code() == grpc.StatusCode.CANCELLED and forward is not None:
                # a stage that fails a frame cancels the streams after it, so the last stage's Results call ends
                # CANCELLED; that stage's own status (INVALID_ARGUMENT, ...) comes up the Forward stream: wait for it
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(forward), UPSTREAM_STATUS_S)
        except asyncio.CancelledError:
            error, failed = ConnectionError("the pipeline client was closed"), True
        if self._error is None:
            self._error = error
        if not failed:
            return
        for other in (self._call, self._results):
            if other is not None and other is not call:
                other.cancel()  # the other stream ends too (no reader waits on a call that will never answer)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._error)
        self._pending.clear()

    @property
    def broken(self) -> bool:
        """Whether a stream of this client has ended (an error, or closed): every later frame fails."""
        return self._error is not None

    async def forward(self, rows: Sequence[RowInput]) -> list[RowOutput]:
        """Run one micro-batch through every stage; the sampled token (and logits if asked) of each row."""
        if self._call is None:
            await self.open()
        if self._error is not None:
            raise self._error
        frame = Frame(next(self._ids), 0, tuple(rows))
        timeline.mark("send", frame.frame_id, len(rows))
        future: asyncio.Future[tuple[RowOutput, ...]] = asyncio.get_running_loop().create_future()
        self._pending[frame.frame_id] = future
        async with self._write_lock:
            for message in frame_to_messages(frame, self.part_bytes):
                await self._call.write(message)
        return list(await future)

    async def close(self) -> None:
        if self._call is not None:
            with contextlib.suppress(aio.AioRpcError):
                await self._call.done_writing()
        if self._readers:
            _, waiting = await asyncio.wait(self._readers, timeout=5.0)
            for task in waiting:
                task.cancel()
        for call in (self._call, self._results):
            if call is not None:
                call.cancel()
        await self._channel.close()
        if self._last_channel is not None:
            await self._last_channel.close()
