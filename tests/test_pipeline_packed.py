"""Packed slices on real node processes: SmolLM2's GGUF blocks stay packed on the nodes (``quantize=gguf``).

Two packed nodes give the one packed process's tokens and logits bit for bit, whether each node reads its own copy
of the file or gets its slice pushed (as a slice GGUF in its cache); a packed node's RSS is a fraction of a dense
float32 one; a weight mode a node cannot honour is INVALID_ARGUMENT and the node goes on serving.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc import aio
from pipeline_helpers import Cluster, local_greedy, pipeline_greedy, split

from coordinator.pipeline.local import StageOptions, load_pipeline
from coordinator.pipeline.weights import SliceCatalog, load_shard
from llama_shard.embedded import smollm2_gguf_path
from llama_shard.loading import GGUFSource, load_stage, open_source
from llama_shard.model import Stage
from llama_shard.quant import QuantMode
from llama_shard.shard import ShardSpec
from node.packed import SliceGGUFSource, is_packed, write_slice_gguf
from node.servicer import PROTOCOL_METADATA
from node.slices import slice_tensor_names
from node.wire import LoadRequest, chunk_crc, load_request_to_pb
from protos.llama_node.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

SMOL = smollm2_gguf_path()
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]
PACKED = StageOptions(max_len=128, quantize=QuantMode.gguf)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(2, tmp_path_factory.mktemp("catalog"))
    yield c
    c.stop()


@functools.cache
def packed_stage(spec: ShardSpec) -> Stage:
    return load_stage(open_source(SMOL), spec, quantize=QuantMode.gguf)


def _greedy(cluster: Cluster, options: StageOptions, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    client = cluster.load(SMOL, split(SMOL, 2), options)
    try:
        return pipeline_greedy(cluster, client, PROMPT, steps)
    finally:
        cluster.close_client(client)


def test_two_packed_nodes_equal_one_packed_process(cluster: Cluster) -> None:
    whole = ShardSpec.whole(30)
    expected_tokens, expected_logits = local_greedy([packed_stage(whole)], PROMPT, 8)
    # the same chain in this process, split as the nodes are
    chained, chained_logits = local_greedy([packed_stage(s) for s in split(SMOL, 2)], PROMPT, 8)
    assert chained == expected_tokens
    assert all(torch.equal(a, b) for a, b in zip(chained_logits, expected_logits, strict=True))

    tokens, logits = _greedy(cluster, PACKED, 8)
    assert tokens == expected_tokens
    for ours, ref in zip(logits, expected_logits, strict=True):
        assert torch.equal(ours, ref), f"max diff {(ours - ref).abs().max().item()}"


def test_a_slice_gguf_holds_the_files_blocks(tmp_path: Path) -> None:
    source = open_source(SMOL)
    assert isinstance(source, GGUFSource)
    spec = ShardSpec(15, 30, 30)  # the tied head: the embedding's blocks serve as the output matrix
    catalog = SliceCatalog(tmp_path / "catalog")
    manifest = catalog.manifest(SMOL, source, spec, blob=True, packed=True)
    assert is_packed(manifest) and [t.name for t in manifest.tensors] == slice_tensor_names(source, spec)
    # raw blocks: a Q4_1 slice is ~5 bits a weight, not the 32 of its decoded floats
    floats = catalog.manifest(SMOL, source, spec)
    assert manifest.nbytes < floats.nbytes / 5, (manifest.nbytes, floats.nbytes)

    path = write_slice_gguf(catalog.blob_path(manifest), manifest, source.config, tmp_path / "slice.gguf")
    sliced = SliceGGUFSource(path, source.config)
    for name in slice_tensor_names(source, spec):
        raw, qtype, cols = sliced.blocks(name)
        raw0, qtype0, cols0 = source.blocks(name)
        assert (qtype, cols) == (qtype0, cols0) and np.array_equal(raw.numpy(), raw0.numpy()), name
        assert torch.equal(sliced.get(name), source.get(name)), name


def test_pushed_packed_slices_equal_the_nodes_own_copies(cluster: Cluster) -> None:
    local_tokens, local_logits = _greedy(cluster, PACKED, 6)
    pushed = StageOptions(max_len=128, quantize=QuantMode.gguf, push=True)
    push_tokens, push_logits = _greedy(cluster, pushed, 6)
    assert push_tokens == local_tokens
    assert all(torch.equal(a, b) for a, b in zip(push_logits, local_logits, strict=True))
    # each node keeps its slice as a slice GGUF, and a second load takes it from there without a push
    caches = [Path(cluster.nodes._tmp.name) / f"cache{i}" for i in range(2)]
    assert all(len(list(c.glob("*.gguf"))) == 1 and not list(c.glob("*.slice")) for c in caches)
    seen: list[str] = []
    again = StageOptions(max_len=128, quantize=QuantMode.gguf, push=True, catalog_dir=cluster.catalog_dir,
                         on_progress=lambda _n, phase, _d, _t: seen.append(phase))  # fmt: skip
    cluster.runner.run(load_pipeline(cluster.clients, SMOL, split(SMOL, 2), again))
    assert "push" not in seen


def test_a_packed_push_resumes_after_a_broken_stream(cluster: Cluster) -> None:
    source = open_source(SMOL)
    spec = ShardSpec(1, 3, 30)  # a slice no other test pushes, small enough for one message
    catalog = SliceCatalog(cluster.catalog_dir)
    manifest = catalog.manifest(SMOL, source, spec, blob=True, packed=True)
    blob = catalog.blob_path(manifest).read_bytes()
    req = LoadRequest("smol", spec, source.config, manifest, None, max_len=64, quantize=QuantMode.gguf)
    client = cluster.clients[1]
    assert cluster.runner.run(client.load(req)).have_bytes == 0
    half = len(blob) // 2 + 7  # mid-tensor

    async def broken() -> pb.PushSliceReply:
        async def chunks() -> AsyncIterator[pb.SliceChunk]:
            yield pb.SliceChunk(slice_sha256=manifest.sha256, offset=0, data=blob[:half], crc32=chunk_crc(blob[:half]))

        return await client.stub.PushSlice(chunks(), metadata=PROTOCOL_METADATA)

    assert not cluster.runner.run(broken()).complete
    assert cluster.runner.run(client.load(req)).have_bytes == half
    final = cluster.runner.run(load_shard(client, req, catalog.blob_path(manifest)))
    assert final.state == pb.LoadProgress.READY


def _load_status(cluster: Cluster, request: pb.LoadShardRequest) -> tuple[grpc.StatusCode, str]:
    async def go() -> tuple[grpc.StatusCode, str]:
        try:
            async for _ in cluster.clients[0].stub.LoadShard(request, metadata=PROTOCOL_METADATA):
                pass
        except aio.AioRpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""

    return cluster.runner.run(go())


def test_a_weight_mode_the_node_cannot_honour_is_invalid_argument(
    cluster: Cluster, make_hf_llama: Callable[..., Path]
) -> None:
    source = open_source(SMOL)
    spec = ShardSpec(0, 2, 30)
    catalog = SliceCatalog(cluster.catalog_dir)
    packed = catalog.manifest(SMOL, source, spec, packed=True)
    floats = catalog.manifest(SMOL, source, spec)
    hf = make_hf_llama(num_hidden_layers=2)
    hf_source = open_source(hf)
    hf_manifest = catalog.manifest(hf, hf_source, ShardSpec(0, 2, 2))

    def request(local: Path, manifest: object, mode: QuantMode | None, config: object = source.config,
                spec: ShardSpec = spec) -> pb.LoadShardRequest:  # fmt: skip
        return load_request_to_pb(LoadRequest("m", spec, config, manifest, str(local), max_len=32, quantize=mode))  # type: ignore[arg-type]

    unknown = request(SMOL, packed, QuantMode.gguf)
    unknown.quantize = "int3"
    cases = {
        "unknown mode": unknown,
        "gguf mode with a safetensors dir": request(
            hf, hf_manifest, QuantMode.gguf, hf_source.config, ShardSpec(0, 2, 2)
        ),  # fmt: skip
        "gguf mode with a float manifest": request(SMOL, floats, QuantMode.gguf),
        "dense mode with a packed manifest": request(SMOL, packed, None),
    }
    for what, req in cases.items():
        code, details = _load_status(cluster, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {code} {details}"
        log.info("%s: %s", what, details)
    # the node goes on serving: it answers Health and loads a good request
    assert cluster.runner.run(cluster.clients[0].health()).protocol_version > 0
    assert _load_status(cluster, request(SMOL, packed, QuantMode.gguf)) == (grpc.StatusCode.OK, "")


def test_a_packed_node_holds_a_fraction_of_a_dense_ones_memory(tmp_path: Path) -> None:
    """The same stage (the second half of SmolLM2 with its tied head) on two fresh node processes."""
    spec = ShardSpec(15, 30, 30)
    fresh = Cluster(2, tmp_path)
    try:
        idle = [fresh.runner.run(c.health()).rss_bytes for c in fresh.clients]
        dense = StageOptions(max_len=64, catalog_dir=tmp_path)
        packed = StageOptions(max_len=64, catalog_dir=tmp_path, quantize=QuantMode.gguf)
        fresh.runner.run(load_pipeline(fresh.clients[:1], SMOL, [spec], dense))
        fresh.runner.run(load_pipeline(fresh.clients[1:], SMOL, [spec], packed))
        rss = [fresh.runner.run(c.health()).rss_bytes for c in fresh.clients]
    finally:
        fresh.stop()
    dense_mb, packed_mb = ((r - i) / 1e6 for r, i in zip(rss, idle, strict=True))
    log.info("node RSS for %s: idle %.0f / %.0f MB; dense fp32 %.0f MB (+%.0f), packed %.0f MB (+%.0f)", spec,
                idle[0] / 1e6, idle[1] / 1e6, rss[0] / 1e6, dense_mb, rss[1] / 1e6, packed_mb)  # fmt: skip
    # fp32: 15 layers (212 MB) + the 49152 x 576 head (113 MB); packed: ~63 MB of blocks
    assert dense_mb > 250, dense_mb
    assert packed_mb < 0.35 * dense_mb, (packed_mb, dense_mb)


def test_int4_on_the_nodes_equals_int4_in_one_process(cluster: Cluster, make_hf_llama: Callable[..., Path]) -> None:
    """``--quantize int4`` of a float checkpoint: each node quantises its own slice at load, as one process would."""
    model = make_hf_llama(num_hidden_layers=4, tie_word_embeddings=True)
    source = open_source(model)
    specs = split(model, 2)
    stages = [load_stage(source, s, quantize=QuantMode.int4) for s in specs]
    prompt = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64]
    expected_tokens, expected_logits = local_greedy(stages, prompt, 6)
    client = cluster.load(model, specs, StageOptions(max_len=128, quantize=QuantMode.int4))
    try:
        tokens, logits = pipeline_greedy(cluster, client, prompt, 6)
    finally:
        cluster.close_client(client)
    assert tokens == expected_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))


def test_weight_mode_and_the_planners_bytes(make_hf_llama: Callable[..., Path]) -> None:
    """``--dtype auto`` packs a GGUF (on nodes as in one process); the planner sizes packed stages by the file's blocks
    and dense ones at 4 bytes a weight."""
    from coordinator.cluster import node_profile
    from coordinator.pipeline.local import weight_mode
    from coordinator.planner.loaders import load_model_profile

    hf = make_hf_llama(num_hidden_layers=2)
    assert weight_mode(SMOL, "auto") == QuantMode.gguf
    assert weight_mode(SMOL, "float32") is None and weight_mode(hf, "auto") is None
    assert weight_mode(hf, "auto", "int4") == QuantMode.int4

    profile = load_model_profile(str(SMOL))
    assert node_profile(profile, packed=True) is profile
    dense = node_profile(profile, packed=False)
    assert dense.stored is not None and profile.stored is not None
    assert dense.stored.layer_bytes[0] == 4 * profile.layer_params(0)
    assert sum(profile.stored.layer_bytes) < sum(dense.stored.layer_bytes) / 5  # Q4_1: ~5 bits a weight


def test_pipeline_depth_counts_a_machines_stages_up_to_its_cores() -> None:
    """A frame per stage, but the stages on one machine no more than its cores compute at once."""
    from coordinator.cluster import pipeline_depth
    from coordinator.discovery import NodeRecord
    from protos.llama_node.v1 import cluster_pb2 as cpb

    def node(host: str, cores: int, threads: int = 1) -> NodeRecord:
        device = cpb.DeviceInfo(kind="cpu", host_id=host, host_cores=cores, threads=threads)
        return NodeRecord(f"{host}-{id(device)}", "x:1", "peer", cpb.NodeDescription(device=device), 0.0)

    assert pipeline_depth([node("h", 2), node("h", 2), node("h", 2)]) == 2
    assert pipeline_depth([node("h", 2), node("h", 2), node("other", 8)]) == 3
    assert pipeline_depth([node("h", 16, threads=10**6)] * 3) == 1
    assert pipeline_depth([node("", 0), node("", 0)]) == 2  # nodes that name no machine: one frame each
