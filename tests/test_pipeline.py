"""Real node processes on loopback: N-node pipelines against one process, pushed slices, mixed dtypes.

One set of four node processes serves the whole module (starting Python + torch is the slow part); every test
loads the stages it needs onto the first N of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import torch
from pipeline_helpers import Cluster, local_greedy, pipeline_greedy, split, whole_stage

from coordinator.pipeline.engine import PipelineEngine
from coordinator.pipeline.local import StageOptions
from coordinator.pipeline.weights import SliceCatalog
from llama_shard.batching import StepRow, cache_len, run_step
from llama_shard.embedded import smollm2_gguf_path
from llama_shard.loading import load_stage, open_source
from llama_shard.model import Stage
from llama_shard.sampling import SamplingParams, sample
from llama_shard.shard import ShardSpec
from node.slices import BlobSource, slice_tensor_names
from protos.llama_node.v1 import node_pb2 as pb

SMOL_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64]  # within the tiny models' vocabulary of 320


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(4, tmp_path_factory.mktemp("catalog"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def tiny(make_hf_llama: Callable[..., Path]) -> Path:
    return make_hf_llama(num_hidden_layers=4, tie_word_embeddings=True)


def _check_parity(cluster: Cluster, model: Path, n: int, steps: int, prompt: list[int] = PROMPT) -> None:
    expected_tokens, expected_logits = local_greedy([whole_stage(model)], prompt, steps)
    client = cluster.load(model, split(model, n))
    try:
        tokens, logits = pipeline_greedy(cluster, client, prompt, steps)
    finally:
        cluster.close_client(client)
    assert tokens == expected_tokens
    assert len(logits) == steps
    for ours, ref in zip(logits, expected_logits, strict=True):
        assert ours.dtype == torch.float32
        assert torch.equal(ours, ref), f"max diff {(ours - ref).abs().max().item()}"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_tiny_model_n_nodes_equal_one_process(cluster: Cluster, tiny: Path, n: int) -> None:
    _check_parity(cluster, tiny, n, steps=12)


def _penalised(stage: Stage, params: SamplingParams, steps: int, whole_history: bool) -> list[int]:
    """Sampled tokens in this process, penalised from every token fed so far (or, as a stage that forgot its
    history would, from the current row's tokens only)."""
    cache = stage.new_cache(2, cache_len(128))
    x, start, history, tokens = torch.tensor(PROMPT), 0, list(PROMPT), []
    for _ in range(steps):
        (out,) = run_step(stage, cache, [StepRow(0, start, x, prefill=start == 0)], scratch=1)
        assert out is not None
        tokens.append(sample(out, params, start + x.shape[0], history if whole_history else x.tolist()))
        history.append(tokens[-1])
        start += x.shape[0]
        x = torch.tensor([tokens[-1]])
    return tokens


def test_penalties_use_the_last_stages_own_history(cluster: Cluster, tiny: Path) -> None:
    """The last stage keeps what each slot was fed (the ids travel with every row) and penalises from it: a
    presence-penalised run over 3 nodes, run twice in the same slot (a restart at 0 forgets the first run), equals
    the in-process run with the whole history, which differs from one that sees the current row only."""
    params = SamplingParams(presence_penalty=1.3)
    expected = _penalised(whole_stage(tiny), params, 16, whole_history=True)
    assert expected != _penalised(whole_stage(tiny), params, 16, whole_history=False)
    client = cluster.load(tiny, split(tiny, 3))
    try:
        for _ in range(2):
            engine = PipelineEngine(client, cluster.runner, params, 128)
            tokens = [engine.step(PROMPT, 0)]
            for i in range(15):
                tokens.append(engine.step([tokens[-1]], len(PROMPT) + i))
            assert tokens == expected
    finally:
        cluster.close_client(client)


# Each SmolLM2 split dequantises the whole model again on the nodes (~15 s idle, over a minute on a busy 2-core
# box): 4 nodes (every relay hop) runs by default, 2 and 3 with ``-m slow``.
@pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow), 4])
def test_smollm2_n_nodes_equal_one_process(cluster: Cluster, n: int) -> None:
    _check_parity(cluster, smollm2_gguf_path(), n, steps=6, prompt=SMOL_PROMPT)


def test_untied_model_and_batched_rows(cluster: Cluster, make_hf_llama: Callable[..., Path]) -> None:
    """Two requests in one frame (different slots, different lengths) each get what they get alone."""
    from node.wire import RowInput

    model = make_hf_llama(num_hidden_layers=4, tie_word_embeddings=False)
    client = cluster.load(model, split(model, 2), StageOptions(slots=2, max_len=128))
    try:
        a, b = PROMPT[:6], PROMPT[3:]
        alone_a, _ = local_greedy([whole_stage(model)], a, 1)
        alone_b, _ = local_greedy([whole_stage(model)], b, 1)
        rows = [RowInput(11, 0, 0, tuple(a)), RowInput(12, 1, 0, tuple(b))]
        out = cluster.runner.run(client.forward(rows))
        assert [o.request_id for o in out] == [11, 12]
        assert [o.token for o in out] == [alone_a[0], alone_b[0]]
    finally:
        cluster.close_client(client)


def test_pushed_slices_equal_slices_read_from_disk(cluster: Cluster, tiny: Path, tmp_path: Path) -> None:
    source = open_source(tiny)
    specs = split(tiny, 2)
    catalog = SliceCatalog(cluster.catalog_dir)
    for spec in specs:  # the blob holds exactly the slice's tensors, byte for byte as read from disk
        manifest = catalog.manifest(tiny, source, spec, blob=True)
        blob = BlobSource(source.config, manifest, catalog.blob_path(manifest))
        assert [t.name for t in manifest.tensors] == slice_tensor_names(source, spec)
        for name in slice_tensor_names(source, spec):
            assert torch.equal(blob.get(name), source.get(name))

    from_disk = cluster.load(tiny, specs)
    disk_tokens, disk_logits = pipeline_greedy(cluster, from_disk, PROMPT, 8)
    cluster.close_client(from_disk)
    pushed = cluster.load(tiny, specs, StageOptions(max_len=128, push=True))
    push_tokens, push_logits = pipeline_greedy(cluster, pushed, PROMPT, 8)
    cluster.close_client(pushed)
    assert push_tokens == disk_tokens
    assert all(torch.equal(a, b) for a, b in zip(push_logits, disk_logits, strict=True))

    # a second load finds the slice in the node's disk cache instead of asking for the bytes again
    from coordinator.pipeline.local import load_pipeline

    seen: list[tuple[int, str]] = []
    opts = StageOptions(max_len=128, push=True, catalog_dir=cluster.catalog_dir,
                        on_progress=lambda node, phase, _d, _t: seen.append((node, phase)))  # fmt: skip
    cluster.runner.run(load_pipeline(cluster.clients[:2], tiny, specs, opts))
    assert not [p for p in seen if p[1] == "push"]


def test_push_resumes_after_a_broken_stream(cluster: Cluster, make_hf_llama: Callable[..., Path]) -> None:
    from coordinator.pipeline.weights import load_shard
    from node.servicer import PROTOCOL_METADATA
    from node.wire import LoadRequest, chunk_crc

    model = make_hf_llama(num_hidden_layers=4, tie_word_embeddings=True, hidden_size=96)  # a slice no node has
    source = open_source(model)
    spec = ShardSpec(0, 4, 4)
    catalog = SliceCatalog(cluster.catalog_dir)
    manifest = catalog.manifest(model, source, spec, blob=True)
    blob = catalog.blob_path(manifest).read_bytes()
    req = LoadRequest("tiny", spec, source.config, manifest, None, max_len=64)
    client = cluster.clients[3]

    first = cluster.runner.run(client.load(req))
    assert first.state == pb.LoadProgress.AWAITING_BYTES and first.have_bytes == 0
    half = len(blob) // 2

    async def broken() -> pb.PushSliceReply:  # a stream that ends halfway, as a dropped connection would
        async def chunks() -> AsyncIterator[pb.SliceChunk]:
            yield pb.SliceChunk(slice_sha256=manifest.sha256, offset=0, data=blob[:half], crc32=chunk_crc(blob[:half]))

        return await client.stub.PushSlice(chunks(), metadata=PROTOCOL_METADATA)

    assert not cluster.runner.run(broken()).complete
    again = cluster.runner.run(client.load(req))
    assert again.state == pb.LoadProgress.AWAITING_BYTES and again.have_bytes == half
    pushed: list[int] = []
    final = cluster.runner.run(
        load_shard(client, req, catalog.blob_path(manifest), on_push=lambda d, _t: pushed.append(d))
    )
    assert final.state == pb.LoadProgress.READY
    assert pushed[-1] == len(blob) and pushed[0] > half  # only the second half was sent


def test_mixed_dtype_chain(cluster: Cluster, tiny: Path) -> None:
    """fp32 stage → bf16 link → bf16 stage: equal to the same chain with the same casts in this process."""
    specs = split(tiny, 2)
    dtypes = [torch.float32, torch.bfloat16]
    source = open_source(tiny)
    stages = [load_stage(source, s, dtype=d) for s, d in zip(specs, dtypes, strict=True)]
    expected_tokens, expected_logits = local_greedy(stages, PROMPT, 8, link_dtypes=[torch.bfloat16])
    client = cluster.load(tiny, specs, StageOptions(compute_dtypes=dtypes, max_len=128))
    try:
        tokens, logits = pipeline_greedy(cluster, client, PROMPT, 8)
    finally:
        cluster.close_client(client)
    assert tokens == expected_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, expected_logits, strict=True))


@pytest.mark.slow
def test_run_nodes_cli_gives_the_one_process_answer() -> None:
    import json
    import subprocess
    import sys

    def run(*extra: str) -> dict[str, object]:
        cmd = [sys.executable, "-c", "from coordinator.cli import main; main()", "run", "-p", "What is 2+2?",
               "-n", "8", "--json", "--seed", "1", "--threads", "1", *extra]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
        return dict(json.loads(out.stdout))

    alone, piped = run(), run("--nodes", "2")
    assert piped["token_ids"] == alone["token_ids"] and piped["text"] == alone["text"]
