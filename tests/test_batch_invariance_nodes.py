"""Batch-invariant numerics over real node processes: a row's logits, returned by the last of 2 nodes, are bitwise the
same whatever shares its frame and however its prompt was chunked (``llama_shard.batching`` on every stage).

Two kinds of stages: dense fp32 on a tiny untied model, where plain batching is *not* invariant on this CPU (the
control test), so these tests can fail; and SmolLM2's GGUF blocks packed on the nodes (``quantize=gguf``, decode
rows unpadded: the packed kernel is row-invariant).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from pipeline_helpers import Cluster, local_greedy, pipeline_greedy, split, whole_stage

from coordinator.pipeline.client import PipelineClient
from coordinator.pipeline.local import StageOptions
from llama_shard.embedded import smollm2_gguf_path
from llama_shard.generate import LocalEngine
from llama_shard.loading import load_stage, open_source
from llama_shard.model import Stage
from llama_shard.quant import QuantMode
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec
from node.wire import RowInput

SLOTS = 9  # slots 0..7 decode, slot 8 reads prompts
LENGTHS = [10, 3, 17, 25, 8, 12, 30, 5]  # prompt lengths of slots 0..7: several positions, one 64-key block
PROMPT = [(i * 37) % 300 + 5 for i in range(37)]  # 37 = 2*16 + 5 = 9*4 + 1: chunks of 4 end with one token


@pytest.fixture(scope="module")
def model(make_hf_llama: Callable[..., Path]) -> Path:
    return make_hf_llama(num_hidden_layers=4, tie_word_embeddings=False)


@pytest.fixture(scope="module", params=["fp32", "packed"])
def kind(request: pytest.FixtureRequest, model: Path) -> tuple[Path, QuantMode | None]:
    """The model and weight mode on the nodes: the tiny model dense, or SmolLM2's GGUF blocks packed."""
    return (model, None) if request.param == "fp32" else (smollm2_gguf_path(), QuantMode.gguf)


@functools.cache
def reference(model: Path, mode: QuantMode | None) -> Stage:
    """The whole model in this process, held as the nodes hold their stages."""
    if mode is None:
        return whole_stage(model)
    source = open_source(model)
    return load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=mode)


@pytest.fixture(scope="module")
def pipe(
    tmp_path_factory: pytest.TempPathFactory, kind: tuple[Path, QuantMode | None]
) -> Iterator[tuple[Cluster, PipelineClient]]:
    model, mode = kind
    cluster = Cluster(2, tmp_path_factory.mktemp("catalog"))
    client = cluster.load(model, split(model, 2), StageOptions(slots=SLOTS, max_len=128, quantize=mode))
    yield cluster, client
    cluster.close_client(client)
    cluster.stop()


def _forward(pipe: tuple[Cluster, PipelineClient], rows: Sequence[RowInput]) -> list[torch.Tensor]:
    cluster, client = pipe
    out = cluster.runner.run(client.forward(rows))
    assert [o.request_id for o in out] == [r.request_id for r in rows]
    logits = [o.logits for o in out]
    assert all(x is not None for x in logits)
    return [x for x in logits if x is not None]


def _prompt(slot: int) -> list[int]:
    g = torch.Generator().manual_seed(slot)
    return torch.randint(3, 320, (LENGTHS[slot],), generator=g).tolist()


def _decode_row(slot: int) -> RowInput:
    return RowInput(100 + slot, slot, LENGTHS[slot], (7 + slot,), return_logits=True)


def _chunks(prompt: Sequence[int], chunk: int, request_id: int = 200, slot: int = 8) -> list[RowInput]:
    return [
        RowInput(request_id, slot, s, tuple(prompt[s : s + chunk]), return_logits=True, prefill=True)
        for s in range(0, len(prompt), chunk)
    ]


@torch.inference_mode()
def test_control_plain_batching_is_not_invariant_for_this_model(model: Path) -> None:
    """Unpadded batched rows of this model differ from the same rows alone, and a chunked prompt from a whole one."""
    stage = whole_stage(model)
    cache = stage.new_cache(8, 128)
    for slot in range(8):
        ids = torch.tensor([_prompt(slot)])
        stage(ids, stage.batch(torch.tensor([slot]), torch.tensor([0]), ids.shape[1]), cache)
    tokens = torch.tensor([[7 + s] for s in range(8)])

    def decode(slots: list[int]) -> torch.Tensor:
        batch = stage.batch(torch.tensor(slots), torch.tensor([LENGTHS[s] for s in slots]), 1)
        return stage(tokens[slots], batch, cache, last_only=True)[:, -1]

    alone = decode([0])[0]
    assert not all(torch.equal(decode(list(range(n)))[0], alone) for n in (2, 4, 8))

    def prompt_logits(chunk: int) -> torch.Tensor:
        out = torch.empty(0)
        for s in range(0, len(PROMPT), chunk):
            x = torch.tensor([PROMPT[s : s + chunk]])
            out = stage(x, stage.batch(torch.tensor([0]), torch.tensor([s]), x.shape[1]), cache, last_only=True)
        return out[0, -1]

    whole = prompt_logits(len(PROMPT))
    assert not all(torch.equal(prompt_logits(c), whole) for c in (4, 7, 16))


def test_decode_rows_do_not_depend_on_their_frame(pipe: tuple[Cluster, PipelineClient]) -> None:
    for slot in range(8):
        _forward(pipe, [RowInput(100 + slot, slot, 0, tuple(_prompt(slot)), return_logits=True, prefill=True)])
    # each decode row alone; sending it again rewinds its slot to the same position
    alone = [_forward(pipe, [_decode_row(s)])[0] for s in range(8)]
    for n in (2, 4, 8):  # with 1, 3 and 7 others
        together = _forward(pipe, [_decode_row(s) for s in range(n)])
        for s in range(n):
            assert torch.equal(together[s], alone[s]), f"slot {s} in a frame of {n}"
    # any order, and next to a prompt chunk in the same frame
    order = [5, 0, 7, 2]
    mixed = _forward(pipe, [_decode_row(s) for s in order] + _chunks(PROMPT, 16)[:1])
    for j, s in enumerate(order):
        assert torch.equal(mixed[j], alone[s]), f"slot {s} at {j} in a mixed frame"


def test_prompt_logits_do_not_depend_on_chunking(
    pipe: tuple[Cluster, PipelineClient], kind: tuple[Path, QuantMode | None]
) -> None:
    def run(chunk: int, load: bool) -> tuple[torch.Tensor, torch.Tensor]:
        last = torch.empty(0)
        for row in _chunks(PROMPT, chunk):
            # under load: each chunk shares its frame with decode rows of the other slots
            others = [_decode_row(s) for s in range(len(row.tokens) % 8)] if load else []
            last = _forward(pipe, [*others, row])[-1]
        token = int(last.argmax())
        (after,) = _forward(pipe, [RowInput(200, 8, len(PROMPT), (token,), return_logits=True)])
        return last, after  # the prompt's logits, and the next step's (which read the KV the chunks wrote)

    whole, whole_next = run(len(PROMPT), load=False)
    for chunk, load in ((16, False), (7, True), (4, False), (4, True), (1, False)):
        last, after = run(chunk, load)
        assert torch.equal(last, whole), f"chunks of {chunk}, under load: {load}"
        assert torch.equal(after, whole_next), f"the step after chunks of {chunk}, under load: {load}"

    # the same convention in this process on the whole model gives the same bits as the two nodes
    _, expected = local_greedy([reference(*kind)], PROMPT, 2)
    assert torch.equal(expected[0], whole) and torch.equal(expected[1], whole_next)


def test_run_in_one_process_equals_run_over_the_nodes(
    pipe: tuple[Cluster, PipelineClient], kind: tuple[Path, QuantMode | None]
) -> None:
    """``llama-node run`` (``LocalEngine``) and ``run --nodes 2`` (``PipelineEngine``): the same tokens and logits."""
    tokens, logits = pipeline_greedy(*pipe, PROMPT, 6)
    engine = LocalEngine(reference(*kind), SamplingParams(), 128)
    local = [engine.step(PROMPT, 0)]
    local_logits = [engine.logits]
    for i in range(5):
        local.append(engine.step([local[-1]], len(PROMPT) + i))
        local_logits.append(engine.logits)
    assert local == tokens
    assert all(a is not None and torch.equal(a, b) for a, b in zip(local_logits, logits, strict=True))
