"""Bad input on the wire gets a gRPC status, and the node process goes on serving.

One real node process holds layers [2, 4) of a tiny 4-layer model (the last stage: it takes activations and
samples); the tests speak to it with raw protobuf messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch
from grpc import aio
from pipeline_helpers import Cluster, Outcome, drain

from coordinator.pipeline.local import StageOptions
from llama_shard.loading import open_source
from llama_shard.shard import ShardSpec
from node.servicer import PROTOCOL_METADATA
from node.wire import DEFAULT_PART_BYTES, Frame, LoadRequest, RowInput, chunk_crc, frame_to_messages, tensor_bytes
from protos import PROTOCOL_VERSION
from protos.llama_node.v1 import node_pb2 as pb
from protos.llama_node.v1 import node_pb2_grpc as pb_grpc

DIM = 64
SPEC = ShardSpec(2, 4, 4)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, make_hf_llama: Callable[..., Path]) -> Iterator[Cluster]:
    cluster = Cluster(1, tmp_path_factory.mktemp("catalog"))
    model = make_hf_llama(num_hidden_layers=4)
    cluster.model = model  # type: ignore[attr-defined]
    client = cluster.load(model, [SPEC], StageOptions(slots=2, max_len=64))
    cluster.close_client(client)
    yield cluster
    cluster.stop()


def _frame(rows: Sequence[RowInput], hidden: torch.Tensor | None, layer: int = 2, frame_id: int = 1) -> Frame:
    return Frame(frame_id, layer, tuple(rows), hidden)


def _messages(frame: Frame, route: Sequence[str] = ()) -> list[pb.ForwardMessage]:
    return [pb.ForwardMessage(open=pb.OpenStream(route=list(route))), *frame_to_messages(frame)]


def _send(
    cluster: Cluster,
    messages: Sequence[pb.ForwardMessage],
    metadata: tuple[tuple[str, str], ...] = PROTOCOL_METADATA,
    send_limit: int | None = None,
) -> Outcome:
    """Send messages on a fresh Forward stream; the replies and how the stream ended. ``send_limit`` raises this
    client's own message limit (to see the node's)."""

    async def go() -> Outcome:
        stub = cluster.clients[0].stub
        if send_limit is not None:
            options = [("grpc.max_send_message_length", send_limit)]
            stub = pb_grpc.NodeStub(aio.insecure_channel(cluster.nodes.addresses[0], options=options))

        async def requests() -> AsyncIterator[pb.ForwardMessage]:
            for m in messages:
                yield m

        # a request iterator, not call.write(): a write racing the node's early abort would turn the node's
        # status into a local INTERNAL on this side
        return await drain(stub.Forward(requests(), metadata=metadata))

    return cluster.runner.run(go(), timeout=60)


def _good(cluster: Cluster, request_id: int = 7) -> None:
    """A well-formed frame is answered, and the node process is alive."""
    hidden = torch.randn(3, DIM)
    replies, code, details = _send(cluster, _messages(_frame([RowInput(request_id, 0, 0, (1, 2, 3))], hidden)))
    assert code == grpc.StatusCode.OK, details
    assert [r.request_id for r in replies[0].rows] == [request_id]
    health = cluster.runner.run(cluster.clients[0].health())
    assert health.state == pb.HealthReply.READY
    assert all(p.poll() is None for p in cluster.nodes.procs)


def test_a_good_frame_is_answered(node: Cluster) -> None:
    _good(node)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT),
        ("short_bytes", grpc.StatusCode.INVALID_ARGUMENT),
        ("tokens_instead_of_activations", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown_request", grpc.StatusCode.FAILED_PRECONDITION),
        ("layer_not_held", grpc.StatusCode.FAILED_PRECONDITION),
        ("slot_out_of_range", grpc.StatusCode.INVALID_ARGUMENT),
        ("past_the_context", grpc.StatusCode.OUT_OF_RANGE),
        ("no_open_message", grpc.StatusCode.INVALID_ARGUMENT),
        ("route_past_the_last_stage", grpc.StatusCode.FAILED_PRECONDITION),
        ("oversized_message", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_bad_frames_get_a_status_and_the_node_stays_up(node: Cluster, case: str, expected: grpc.StatusCode) -> None:
    row = RowInput(1, 0, 0, (1, 2, 3))
    good = torch.randn(3, DIM)
    messages: list[pb.ForwardMessage]
    if case == "wrong_dtype":
        messages = _messages(_frame([row], good.to(torch.bfloat16)))
    elif case == "wrong_shape":
        messages = _messages(_frame([row], torch.randn(3, DIM + 1)))
    elif case == "short_bytes":
        messages = _messages(_frame([row], good))
        messages[1].part.data = messages[1].part.data[:-4]
    elif case == "tokens_instead_of_activations":
        messages = _messages(_frame([row], None))
    elif case == "unknown_request":
        messages = _messages(_frame([RowInput(999, 1, 5, (1,))], torch.randn(1, DIM)))
    elif case == "layer_not_held":
        messages = _messages(_frame([row], good, layer=0))
    elif case == "slot_out_of_range":
        messages = _messages(_frame([RowInput(1, 5, 0, (1, 2, 3))], good))
    elif case == "past_the_context":
        messages = _messages(_frame([RowInput(1, 0, 0, tuple(range(70)))], torch.randn(70, DIM)))
    elif case == "no_open_message":
        messages = _messages(_frame([row], good))[1:]
    elif case == "route_past_the_last_stage":
        # refused at the open message: send nothing after it (a frame racing the node's abort could surface on
        # this side as a local INTERNAL instead of the node's status)
        messages = _messages(_frame([row], good), route=["127.0.0.1:1"])[:1]
    else:  # one message of 9 MiB, over the 8 MiB limit
        big = torch.randn(9 * (1 << 20) // (4 * DIM), DIM)
        part = pb.FramePart(frame_id=1, layer=2, data=tensor_bytes(big), last=True)
        messages = [pb.ForwardMessage(open=pb.OpenStream()), pb.ForwardMessage(part=part)]
    replies, code, details = _send(node, messages, send_limit=64 << 20)
    assert code == expected, details
    assert not replies
    _good(node)


def test_a_long_prefill_is_chunked_below_the_message_limit(node: Cluster) -> None:
    n = 60
    hidden = torch.randn(n, DIM)
    frame = _frame([RowInput(3, 1, 0, tuple(range(n)))], hidden)
    parts = list(frame_to_messages(frame, part_bytes=4096))
    assert len(parts) == -(-n * DIM * 4 // 4096) and all(len(p.part.data) <= 4096 for p in parts)
    replies, code, details = _send(node, [pb.ForwardMessage(open=pb.OpenStream()), *parts])
    assert code == grpc.StatusCode.OK, details
    assert len(replies) == 1 and DEFAULT_PART_BYTES > 4096


@pytest.mark.parametrize("metadata", [(), (("llama-node-protocol", "999"),)])
def test_a_protocol_mismatch_is_refused_with_a_clear_message(
    node: Cluster, metadata: tuple[tuple[str, str], ...]
) -> None:
    replies, code, details = _send(node, [pb.ForwardMessage(open=pb.OpenStream())], metadata)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "protocol" in details and f"speaks llama-node protocol {PROTOCOL_VERSION}" in details
    _good(node)


def test_corrupted_chunks_are_refused(node: Cluster, make_hf_llama: Callable[..., Path]) -> None:
    from coordinator.pipeline.weights import SliceCatalog

    model = make_hf_llama(num_hidden_layers=4, hidden_size=32, num_attention_heads=4)
    source = open_source(model)
    spec = ShardSpec(0, 2, 4)
    catalog = SliceCatalog(node.catalog_dir)
    manifest = catalog.manifest(model, source, spec, blob=True)
    blob = catalog.blob_path(manifest).read_bytes()
    client = node.clients[0]
    req = LoadRequest("tiny32", spec, source.config, manifest, None, max_len=64)
    assert node.runner.run(client.load(req)).state == pb.LoadProgress.AWAITING_BYTES

    def push(chunks: list[pb.SliceChunk]) -> tuple[grpc.StatusCode, str]:
        async def go() -> tuple[grpc.StatusCode, str]:
            async def gen() -> AsyncIterator[pb.SliceChunk]:
                for c in chunks:
                    yield c

            try:
                await client.stub.PushSlice(gen(), metadata=PROTOCOL_METADATA)
            except aio.AioRpcError as e:
                return e.code(), e.details() or ""
            return grpc.StatusCode.OK, ""

        return node.runner.run(go())

    sha = manifest.sha256
    code, details = push([pb.SliceChunk(slice_sha256=sha, offset=0, data=blob[:1000], crc32=chunk_crc(blob[:999]))])
    assert code == grpc.StatusCode.DATA_LOSS and "crc32" in details
    flipped = bytes([blob[0] ^ 1]) + blob[1:]  # right crc for wrong bytes: caught by the tensor sha256
    code, details = push([pb.SliceChunk(slice_sha256=sha, offset=0, data=flipped, crc32=chunk_crc(flipped))])
    assert code == grpc.StatusCode.DATA_LOSS and "sha256" in details
    code, _ = push([pb.SliceChunk(slice_sha256=b"\0" * 32, offset=0, data=b"x", crc32=chunk_crc(b"x"))])
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # nobody asked for that slice
    # the node still serves its stage (a pushed slice replaces it only once complete)
    _good(node, request_id=8)
