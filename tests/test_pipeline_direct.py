"""Direct results (``OpenStream.direct_results``): the last stage answers the coordinator on its Results call.

Two real node processes hold layers [0, 2) and [2, 4) of a tiny model. The tokens come on the Results call and
never up the Forward chain; an error anywhere still reaches the coordinator as a gRPC status (on the Forward
stream, and on the Results call when the last stage fails), and nothing hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch
from grpc import aio
from pipeline_helpers import Cluster, Outcome, drain

from coordinator.pipeline.local import StageOptions
from llama_shard.shard import ShardSpec
from node.servicer import PROTOCOL_METADATA
from node.wire import Frame, RowInput, frame_to_messages
from protos.llama_node.v1 import node_pb2 as pb
from protos.llama_node.v1 import node_pb2_grpc as pb_grpc

SPECS = [ShardSpec(0, 2, 4), ShardSpec(2, 4, 4)]
DIM = 64


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, make_hf_llama: Callable[..., Path]) -> Iterator[Cluster]:
    c = Cluster(2, tmp_path_factory.mktemp("catalog"))
    model = make_hf_llama(num_hidden_layers=4)
    c.model = model  # type: ignore[attr-defined]
    c.close_client(c.load(model, SPECS, StageOptions(slots=2, max_len=64)))
    yield c
    c.stop()


def _direct(cluster: Cluster, node: int, route: Sequence[str], frames: Sequence[Frame], session: str) -> list[Outcome]:
    """A raw Forward stream to ``node`` with ``direct_results`` and the last stage's Results call for ``session``:
    how each ended (Forward first)."""

    async def go() -> list[Outcome]:
        stub = pb_grpc.NodeStub(cluster.clients[node].channel)
        last = pb_grpc.NodeStub(cluster.clients[-1].channel)
        results = last.Results(pb.ResultsRequest(session=session), metadata=PROTOCOL_METADATA)

        async def requests() -> AsyncIterator[pb.ForwardMessage]:
            yield pb.ForwardMessage(open=pb.OpenStream(route=list(route), session=session, direct_results=True))
            for f in frames:
                for m in frame_to_messages(f):
                    yield m

        forward = stub.Forward(requests(), metadata=PROTOCOL_METADATA)
        return list(await asyncio.gather(drain(forward), drain(results)))

    return cluster.runner.run(go(), timeout=60)


def test_tokens_skip_the_stages_between(cluster: Cluster) -> None:
    frames = [Frame(1, 0, (RowInput(5, 0, 0, (1, 2, 3)),)), Frame(2, 0, (RowInput(6, 1, 0, (4, 5)),))]
    (up, up_code, _), (replies, code, details) = _direct(cluster, 0, cluster.nodes.addresses[1:], frames, "s-ok")
    assert up == [] and up_code == grpc.StatusCode.OK
    assert code == grpc.StatusCode.OK, details
    assert [r.frame_id for r in replies] == [1, 2] and [r.rows[0].request_id for r in replies] == [5, 6]


def test_an_error_on_the_last_stage_ends_both_calls_with_its_status(cluster: Cluster) -> None:
    bad = Frame(1, 2, (RowInput(5, 0, 0, (1, 2, 3)),), torch.randn(3, DIM + 1))  # wrong shape
    (up, up_code, up_details), (replies, code, details) = _direct(cluster, 1, (), [bad], "s-bad")
    assert not up and not replies
    assert up_code == code == grpc.StatusCode.INVALID_ARGUMENT, (up_details, details)
    assert "shape" in details and "shape" in up_details


def test_an_error_before_the_last_stage_reaches_the_coordinator(cluster: Cluster) -> None:
    vocab = 320
    bad = Frame(1, 0, (RowInput(5, 0, 0, (vocab + 1,)),))  # refused by the first stage

    async def go() -> Outcome:
        stub = pb_grpc.NodeStub(cluster.clients[0].channel)

        async def requests() -> AsyncIterator[pb.ForwardMessage]:
            route = cluster.nodes.addresses[1:]
            yield pb.ForwardMessage(open=pb.OpenStream(route=route, session="s-first", direct_results=True))
            for m in frame_to_messages(bad):
                yield m

        return await drain(stub.Forward(requests(), metadata=PROTOCOL_METADATA))

    replies, code, details = cluster.runner.run(go(), timeout=60)
    assert not replies and code == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in details


def test_a_session_has_one_results_call(cluster: Cluster) -> None:
    async def go() -> tuple[grpc.StatusCode, str]:
        stub = pb_grpc.NodeStub(cluster.clients[-1].channel)
        first = stub.Results(pb.ResultsRequest(session="s-twice"), metadata=PROTOCOL_METADATA)
        await asyncio.sleep(0.2)  # the first call is being served
        second = stub.Results(pb.ResultsRequest(session="s-twice"), metadata=PROTOCOL_METADATA)
        _, code, details = await drain(second)
        first.cancel()
        return code, details

    code, details = cluster.runner.run(go(), timeout=30)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "read already" in details


def test_the_pipeline_client_fails_fast_when_the_last_stage_fails(cluster: Cluster) -> None:
    """Last in the module: it releases the last stage's shard."""
    client = cluster.load(cluster.model, SPECS, StageOptions(slots=2, max_len=64))  # type: ignore[attr-defined]
    assert client.direct
    rows = [RowInput(9, 0, 0, (1, 2, 3))]
    assert cluster.runner.run(client.forward(rows), timeout=30)[0].request_id == 9
    assert cluster.runner.run(cluster.clients[1].release(), timeout=30)
    with pytest.raises(aio.AioRpcError) as e:
        cluster.runner.run(client.forward([RowInput(9, 0, 3, (4,))]), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "released" in (e.value.details() or "")
    with pytest.raises(aio.AioRpcError):  # the client stays failed (the executor fails over to a new one)
        cluster.runner.run(client.forward(rows), timeout=30)
    cluster.close_client(client)
