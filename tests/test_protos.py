"""The wire format: committed stubs match the .proto, and conversions round-trip exactly."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from llama_shard.config import ModelConfig, RopeScaling
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec
from node.slices import SliceManifest, TensorDigest
from node.wire import (
    Frame,
    FrameAssembler,
    FrameResult,
    RowInput,
    RowOutput,
    WireError,
    config_from_pb,
    config_to_pb,
    frame_to_messages,
    manifest_from_pb,
    manifest_to_pb,
    result_from_pb,
    result_to_pb,
    sampling_to_pb,
    spec_from_pb,
    spec_to_pb,
)
from protos import PROTOCOL_VERSION
from protos.llama_node.v1 import node_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None or importlib.util.find_spec("mypy_protobuf") is None,
    reason="needs grpcio-tools and mypy-protobuf (the test extra)",
)
def test_committed_stubs_match_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_frames_round_trip_through_parts() -> None:
    rows = (
        RowInput(1, 0, 0, (5, 6, 7), SamplingParams(temperature=0.7, top_p=0.9, seed=2**62 + 3), True),
        RowInput(2, 3, 10, (8,), SamplingParams(top_k=5, repetition_penalty=1.3, min_p=0.05)),
    )
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        hidden = torch.randn(4, 48).to(dtype)
        parts = list(frame_to_messages(Frame(9, 12, rows, hidden), part_bytes=100))
        assert len(parts) == -(-hidden.numel() * hidden.element_size() // 100)
        assembler = FrameAssembler()
        frames = [assembler.push(m.part) for m in parts]
        assert frames[:-1] == [None] * (len(parts) - 1)
        frame = frames[-1]
        assert frame is not None and frame.rows == rows and frame.layer == 12 and frame.frame_id == 9
        assert frame.hidden is not None and frame.hidden.dtype == dtype and torch.equal(frame.hidden, hidden)


def test_each_assembled_frame_carries_its_own_rows_as_they_came() -> None:
    # a stage passes on the rows it was sent; with the rows kept as the assembler's last-frame state, a frame whose
    # compute was still queued when the next frame arrived would have passed on that next frame's rows
    first = (RowInput(1, 0, 4, (5,)), RowInput(2, 1, 9, (6,), SamplingParams(temperature=0.5, seed=7)))
    second = (RowInput(3, 2, 0, (7, 8)),)
    assembler = FrameAssembler()
    pending = []
    for fid, rows in ((1, first), (2, second)):
        (msg,) = frame_to_messages(Frame(fid, 3, rows, torch.randn(sum(len(r.tokens) for r in rows), 8)))
        pending.append(assembler.take(msg.part))
    a, b = pending
    assert a is not None and b is not None
    assert (a.frame_id, b.frame_id) == (1, 2)
    assert [r.request_id for r in a.rows_pb] == [1, 2] and [r.request_id for r in b.rows_pb] == [3]
    assert a.build().rows == first and b.build().rows == second
    # passed on unchanged: the message a stage sends from the rows it got is the one it would encode anew
    out = Frame(1, 5, first, torch.zeros(2, 8))
    (again,) = frame_to_messages(out, rows_pb=a.rows_pb)
    (fresh,) = frame_to_messages(out)
    assert again.SerializeToString() == fresh.SerializeToString()


def test_a_frame_claiming_more_bytes_than_allowed_is_refused_before_allocation() -> None:
    part = pb.FramePart(frame_id=1, layer=1, hidden=pb.TensorHeader(dtype=pb.DTYPE_FLOAT32, shape=[1 << 30, 1 << 10],
                        nbytes=1 << 42), rows=[pb.Row(tokens=[1])])  # fmt: skip
    with pytest.raises(WireError) as e:
        FrameAssembler().push(part)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_results_config_spec_and_manifest_round_trip() -> None:
    result = FrameResult(4, (RowOutput(1, 17, torch.randn(320)), RowOutput(2, 3, None)))
    back = result_from_pb(pb.ForwardReply.FromString(result_to_pb(result).SerializeToString()))
    assert back.frame_id == 4 and [r.token for r in back.rows] == [17, 3]
    assert back.rows[0].logits is not None and result.rows[0].logits is not None
    assert torch.equal(back.rows[0].logits, result.rows[0].logits) and back.rows[1].logits is None

    config = ModelConfig(vocab_size=320, dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=160, norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
                         bos_token_id=1, eos_token_ids=(2, 3), tie_embeddings=True)  # fmt: skip
    assert config_from_pb(config_to_pb(config)) == config
    for spec in (ShardSpec(0, 4, 4), ShardSpec(1, 3, 4, frozenset({0, 5}))):
        assert spec_from_pb(spec_to_pb(spec)) == spec

    tensors = (TensorDigest("a", "float32", (2, 3), 24, b"\1" * 32), TensorDigest("b", "bfloat16", (4,), 8, b"\2" * 32))
    manifest = SliceManifest.of(tensors)
    assert manifest_from_pb(manifest_to_pb(manifest)) == manifest
    tampered = manifest_to_pb(manifest)
    tampered.tensors[0].sha256 = b"\3" * 32  # the slice hash no longer matches its tensors
    with pytest.raises(WireError):
        manifest_from_pb(tampered)


def test_a_client_refuses_a_node_of_another_protocol_version() -> None:
    import asyncio

    from grpc import aio

    from coordinator.pipeline.client import NodeClient, ProtocolMismatchError
    from protos.llama_node.v1 import node_pb2_grpc as pb_grpc

    class FutureNode(pb_grpc.NodeServicer):
        async def Health(self, request: pb.HealthRequest, context: aio.ServicerContext) -> pb.HealthReply:  # noqa: N802
            return pb.HealthReply(protocol_version=99)

    async def go() -> str:
        server = aio.server()
        pb_grpc.add_NodeServicer_to_server(FutureNode(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = NodeClient(f"127.0.0.1:{port}")
        try:
            await client.health()
        except ProtocolMismatchError as e:
            return str(e)
        finally:
            await client.close()
            await server.stop(None)
        return "accepted"

    message = asyncio.run(go())
    assert "speaks llama-node protocol 99" in message and f"speaks {PROTOCOL_VERSION}" in message


def test_an_ollama_window_past_uint32_still_goes_on_the_wire() -> None:
    # Ollama's repeat_last_n has no upper bound; 1035125872496 (from schemathesis) overflowed Row's uint32 field
    from coordinator.api.backend import sampling_params

    params = sampling_params(
        temperature=0.8, top_p=0.9, top_k=40, min_p=None, repetition_penalty=1.1, seed=7, penalty_last_n=1035125872496
    )
    assert sampling_to_pb(params).penalty_last_n == 2**32 - 1


def test_rows_encode_their_own_sampling_step_after_step() -> None:
    """A request's rows reuse the encoding of its ``SamplingParams`` object; every row still decodes to itself."""
    import gc

    from node.wire import _row_from_pb, _row_to_pb

    for seed in range(50):  # new objects, some of them at the address of one freed before
        params = SamplingParams(temperature=0.5, top_k=seed + 1, seed=seed)
        for start in (0, 7):
            row = RowInput(seed, 1, start, (3, 4), params, False, start == 0)
            assert _row_from_pb(_row_to_pb(row)) == row
        del params
        gc.collect()
