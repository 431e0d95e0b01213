"""Security of joining, on loopback with real processes and real TLS: the token, the CA pin, mutual TLS on every
node port, roles, and weights that never reach an unauthenticated peer.

The coordinator's join endpoint runs in this process (a real gRPC server on a real socket); nodes are real
`llama-node join` processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from coordinator.discovery import Discovery, NodeRegistry, describe_node
from coordinator.join_service import start_coordinator_server
from coordinator.pipeline.client import NodeClient
from coordinator.pipeline.engine import LoopThread
from coordinator.pipeline.local import StageOptions, load_pipeline
from coordinator.pki import ClusterCA
from llama_shard.shard import ShardSpec
from node.identity import JoinToken, Role
from protos import PROTOCOL_METADATA_KEY, PROTOCOL_VERSION
from protos.llama_node.v1 import cluster_pb2 as cpb
from protos.llama_node.v1 import cluster_pb2_grpc as cpb_grpc
from protos.llama_node.v1 import node_pb2 as pb
from protos.llama_node.v1 import node_pb2_grpc as pb_grpc
from tests.cluster_helpers import foreign_ca, free_port, start_impostor, start_join, stop, wait_for_log

META = ((PROTOCOL_METADATA_KEY, str(PROTOCOL_VERSION)),)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Coordinator:
    """The CA and the join endpoint on a loop thread; join log lines are recorded."""

    def __init__(self, state_dir: Path) -> None:
        self.ca = ClusterCA.load_or_create(state_dir)
        self.runner = LoopThread()
        self.records = Records()
        logging.getLogger("coordinator.join_service").addHandler(self.records)
        logging.getLogger("coordinator.join_service").setLevel(logging.INFO)
        self.server, self.port = self.runner.run(self._start())
        self.creds = self.ca.identity(Role.coordinator).channel_credentials()

    async def _start(self) -> tuple[aio.Server, int]:
        return await start_coordinator_server(self.ca, "test-coordinator", cpb.ListNodesReply, "127.0.0.1", 0)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        logging.getLogger("coordinator.join_service").removeHandler(self.records)
        self.runner.run(self.server.stop(0))
        self.runner.stop()


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    c = Coordinator(tmp_path_factory.mktemp("state"))
    yield c
    c.close()


def _join_args(coord: Coordinator, token: str, port: int, cache: Path) -> list[str]:
    return ["--token", token, "--coordinator", coord.address, "--address", "127.0.0.1", "--host", "127.0.0.1",
            "--port", str(port), "--no-mdns", "--cache-dir", str(cache), "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def member(coord: Coordinator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A node that joined with the right token; its address."""
    tmp = tmp_path_factory.mktemp("member")
    port = free_port()
    proc = start_join(_join_args(coord, str(coord.ca.token), port, tmp / "cache"), tmp / "join.log")
    try:
        wait_for_log(tmp / "join.log", "serving mutual TLS", proc)
        yield f"127.0.0.1:{port}"
    finally:
        stop([proc])


def _run_join_expecting_failure(coord: Coordinator, token: str, tmp: Path) -> str:
    proc = start_join(_join_args(coord, token, free_port(), tmp / "cache"), tmp / "join.log")
    try:
        code = proc.wait(60)
    finally:
        stop([proc])
    log = (tmp / "join.log").read_text()
    assert code == 3, log
    assert "serving" not in log
    return log


def test_wrong_secret_is_refused_at_join(coord: Coordinator, tmp_path: Path) -> None:
    # arrange: the right CA hash (so the node trusts the coordinator) but a wrong secret
    wrong = JoinToken(bytes(16), coord.ca.token.ca_sha256)
    # act
    log = _run_join_expecting_failure(coord, str(wrong), tmp_path)
    # assert: refused by the coordinator, which signed nothing
    assert "PERMISSION_DENIED" in log and "join token is wrong" in log
    assert any("refused node" in m for m in coord.records.messages)


def test_token_of_another_cluster_is_refused_before_anything_is_sent(coord: Coordinator, tmp_path: Path) -> None:
    before = list(coord.records.messages)
    other = foreign_ca().token
    log = _run_join_expecting_failure(coord, str(other), tmp_path)
    assert "the token pins" in log
    assert coord.records.messages == before  # the node never called Join: the pin failed first


def test_right_token_joins_and_status_needs_the_token(coord: Coordinator, member: str) -> None:
    assert any("proved the token" in m for m in coord.records.messages)

    async def list_nodes(proof: bytes) -> cpb.ListNodesReply:
        from node.identity import COORDINATOR_TLS_NAME

        creds = grpc.ssl_channel_credentials(coord.ca.cert_pem)
        options = [("grpc.ssl_target_name_override", COORDINATOR_TLS_NAME)]
        async with aio.secure_channel(coord.address, creds, options=options) as ch:
            return await cpb_grpc.CoordinatorStub(ch).ListNodes(cpb.ListNodesRequest(proof=proof), timeout=5)

    coord.runner.run(list_nodes(coord.ca.token.purpose_proof("status")))
    with pytest.raises(aio.AioRpcError) as e:
        coord.runner.run(list_nodes(b""))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(aio.AioRpcError):
        coord.runner.run(list_nodes(JoinToken(bytes(16), coord.ca.token.ca_sha256).purpose_proof("status")))


def _call_node(address: str, channel_factory: Callable[[], aio.Channel]) -> dict[str, grpc.StatusCode]:
    """Forward, LoadShard and Health on ``address``: each call's status code (OK when it got through)."""

    async def go() -> dict[str, grpc.StatusCode]:
        out: dict[str, grpc.StatusCode] = {}
        async with channel_factory() as ch:
            stub = pb_grpc.NodeStub(ch)
            calls = {
                "Health": lambda: stub.Health(pb.HealthRequest(), timeout=5, metadata=META),
                "LoadShard": lambda: _first(stub.LoadShard(pb.LoadShardRequest(), timeout=5, metadata=META)),
                "Forward": lambda: _first(
                    stub.Forward(iter([pb.ForwardMessage(open=pb.OpenStream())]), timeout=5, metadata=META)
                ),  # fmt: skip
            }
            for name, call in calls.items():
                try:
                    await call()
                    out[name] = grpc.StatusCode.OK
                except aio.AioRpcError as e:
                    out[name] = e.code()
        return out

    runner = LoopThread()
    try:
        return runner.run(go())
    finally:
        runner.stop()


async def _first(call: object) -> object:
    async for item in call:  # type: ignore[attr-defined]
        return item
    return None


REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED}


def test_plain_text_connections_fail(member: str) -> None:
    codes = _call_node(member, lambda: aio.insecure_channel(member))
    assert set(codes.values()) <= REFUSED, codes


def test_client_without_certificate_is_refused(member: str, coord: Coordinator) -> None:
    codes = _call_node(member, lambda: aio.secure_channel(member, grpc.ssl_channel_credentials(coord.ca.cert_pem)))
    assert set(codes.values()) <= REFUSED, codes


def test_certificate_from_another_ca_is_refused(member: str, coord: Coordinator) -> None:
    stranger = foreign_ca().issue("coordinator", Role.coordinator)
    # trusting our CA for the server side, presenting the stranger's certificate
    creds = grpc.ssl_channel_credentials(coord.ca.cert_pem, stranger.key_pem, stranger.cert_pem)
    codes = _call_node(member, lambda: aio.secure_channel(member, creds))
    assert set(codes.values()) <= REFUSED, codes


def test_roles_a_node_may_forward_but_not_load(member: str, coord: Coordinator) -> None:
    peer = coord.ca.issue("another-node", Role.node, ["127.0.0.1"])
    codes = _call_node(member, lambda: aio.secure_channel(member, peer.channel_credentials()))
    assert codes["Health"] == grpc.StatusCode.OK
    assert codes["LoadShard"] == grpc.StatusCode.PERMISSION_DENIED
    # authenticated and allowed: refused only because the node holds no shard yet
    assert codes["Forward"] == grpc.StatusCode.FAILED_PRECONDITION
    codes = _call_node(member, lambda: aio.secure_channel(member, coord.creds))
    assert codes["Health"] == grpc.StatusCode.OK
    assert codes["LoadShard"] == grpc.StatusCode.INVALID_ARGUMENT  # authenticated; the empty request is rejected


@pytest.fixture(scope="module")
def tiny(make_hf_llama: Callable[..., Path]) -> Path:
    return make_hf_llama(num_hidden_layers=2)


@pytest.mark.parametrize("impostor_kind", ["plain", "foreign-ca"])
def test_weights_never_reach_an_unauthenticated_peer(
    coord: Coordinator, tiny: Path, tmp_path: Path, impostor_kind: str
) -> None:
    runner = LoopThread()
    try:
        creds = (
            None if impostor_kind == "plain" else foreign_ca().issue("x", Role.node, ["127.0.0.1"]).server_credentials()
        )
        server, impostor, address = runner.run(start_impostor(creds))
        options = StageOptions(max_len=32, push=True, catalog_dir=tmp_path / "catalog")

        async def push(credentials: grpc.ChannelCredentials | None) -> None:
            client = NodeClient(address, credentials)
            try:
                await load_pipeline([client], tiny, [ShardSpec(0, 2, 2)], options)
            finally:
                await client.close()

        with pytest.raises(aio.AioRpcError) as e:
            runner.run(push(coord.creds))  # the coordinator always speaks mutual TLS to nodes
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert impostor.calls == [] and impostor.received == 0
        if impostor_kind == "plain":
            # control: a plain-text client would have handed the weights over: the impostor really records them
            with pytest.raises(aio.AioRpcError):
                runner.run(push(None))
            assert "PushSlice" in impostor.calls and impostor.received > 0
        runner.run(server.stop(0))
    finally:
        runner.stop()


def test_a_stranger_found_as_a_peer_is_not_listed(coord: Coordinator, member: str, tmp_path: Path) -> None:
    runner = LoopThread()
    try:
        server, impostor, stranger = runner.run(start_impostor(None))
        registry = NodeRegistry()

        async def discover() -> None:
            import asyncio

            d = Discovery(registry, coord.creds, [stranger, member], mdns=False, poll_s=0.2)
            await d.start()
            await asyncio.sleep(2.0)
            await d.stop()
            with pytest.raises(aio.AioRpcError):
                await describe_node(stranger, coord.creds)

        runner.run(discover())
        assert [r.address for r in registry.nodes.values()] == [member]
        assert impostor.calls == []
        runner.run(server.stop(0))
    finally:
        runner.stop()
