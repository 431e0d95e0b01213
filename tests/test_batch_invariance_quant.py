"""Batch invariance on the quantised (``--dtype auto``) SmolLM2 stage, where ``llama_shard.batching`` runs decode rows
unpadded with attention row by row, and ``LocalEngine`` (``llama-node run``) against ``run_step`` on both paths.

Controls show each check can fail: on this stage plain batched calls are not invariant (a row's logits change with
its batch-mates, a prompt's with its chunking), and the old unpadded ``LocalEngine`` call differs from ``run_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import local_greedy
from torch import Tensor, nn

from llama_shard import batching, fused
from llama_shard.batching import StepRow, run_step
from llama_shard.generate import LocalEngine
from llama_shard.ggml_linear import GGMLLinear
from llama_shard.loading import load_stage, open_source
from llama_shard.model import KVCache, Stage
from llama_shard.quant import QuantLinear, QuantMode
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec

LENGTHS = [45, 3, 17, 64, 65, 130, 200, 9]  # prompt lengths of slots 0..7: key counts in several 64-blocks
SCRATCH = 8
PROMPT = [(i * 7919) % 40000 + 100 for i in range(45)]  # 45 = 2*16 + 13 = 6*7 + 3 = 11*4 + 1


def _load(quantize: QuantMode | None) -> Stage:
    from llama_shard.embedded import smollm2_gguf_path

    source = open_source(smollm2_gguf_path())
    return load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=quantize)


@pytest.fixture(scope="module")
def packed() -> Stage:
    return _load(QuantMode.gguf)


@pytest.fixture(scope="module")
def cache(packed: Stage) -> KVCache:
    """Slots 0..7 hold prompts of ``LENGTHS``; slot 8 is the scratch slot (unused by a row-invariant stage)."""
    cache = packed.new_cache(SCRATCH + 1, batching.cache_len(384))
    gen = torch.Generator().manual_seed(0)
    for slot, n in enumerate(LENGTHS):
        prompt = torch.randint(100, 40000, (n,), generator=gen)
        run_step(packed, cache, [StepRow(slot, 0, prompt, prefill=True, logits=False)], SCRATCH)
    return cache


def _decode_row(slot: int) -> StepRow:
    return StepRow(slot, LENGTHS[slot], torch.tensor([1234 + slot]), prefill=False)


def _step(stage: Stage, cache: KVCache, rows: Sequence[StepRow]) -> list[Tensor]:
    out = run_step(stage, cache, rows, SCRATCH)
    return [o for o in out if o is not None]


def test_row_invariance_is_decided_by_the_module_types(packed: Stage, make_hf_llama: Callable[..., Path]) -> None:
    assert batching.row_invariant(packed)
    tiny = open_source(make_hf_llama())
    assert not batching.row_invariant(load_stage(tiny, ShardSpec.whole(4)))  # nn.Linear: padded convention
    stage = load_stage(tiny, ShardSpec.whole(4), quantize=QuantMode.int4)
    assert batching.row_invariant(stage)
    mixed = load_stage(tiny, ShardSpec.whole(4), quantize=QuantMode.int4)
    mixed.layers["2"].feed_forward.w2 = nn.Linear(160, 64, bias=False)  # one float linear: no longer invariant
    assert not batching.row_invariant(mixed)


@torch.inference_mode()
def test_quant_linears_give_the_same_row_for_any_m(packed: Stage) -> None:
    """The premise of the unpadded decode: a row of every packed linear is the same for M = 1..16 (and an fp32
    ``nn.Linear`` of the same shape is not, on MKL: the control)."""
    linears = {
        n: m
        for n, m in packed.named_modules()
        if isinstance(m, QuantLinear | GGMLLinear) and n.startswith(("layers.0.", "output"))
    }
    assert len(linears) == 5  # wqkv, wo, w13, w2, the tied Q8_0 head
    gen = torch.Generator().manual_seed(1)
    for name, m in linears.items():
        x = torch.randn(16, m.in_features, generator=gen)
        full = m(x)
        for rows in range(1, 16):
            assert torch.equal(m(x[:rows]), full[:rows]), f"{name}, M = {rows}"
    w, x = torch.randn(1536, 576, generator=gen), torch.randn(16, 576, generator=gen)
    full = F.linear(x, w)
    assert not all(torch.equal(F.linear(x[:rows], w), full[:rows]) for rows in range(1, 16))


def test_decode_rows_do_not_depend_on_their_step(packed: Stage, cache: KVCache) -> None:
    alone = [_step(packed, cache, [_decode_row(s)])[0] for s in range(8)]  # rewinds: each row is fed again below
    for n in (2, 4, 8):  # with 1, 3 and 7 others
        together = _step(packed, cache, [_decode_row(s) for s in range(n)])
        for s in range(n):
            assert torch.equal(together[s], alone[s]), f"slot {s} in a step of {n}"
    order = [5, 0, 7, 2]  # any order, and next to a prompt chunk (slot 8's scratch is not touched by these)
    chunk = StepRow(SCRATCH, 0, torch.tensor(PROMPT[:16]), prefill=True, logits=False)
    mixed = run_step(packed, cache, [_decode_row(s) for s in order] + [chunk], SCRATCH)
    for j, s in enumerate(order):
        assert torch.equal(mixed[j], alone[s]), f"slot {s} at {j} in a mixed step"


def _prompt_logits(stage: Stage, cache: KVCache, chunk: int, slot: int = 0) -> tuple[Tensor, Tensor]:
    last: Tensor | None = None
    for s in range(0, len(PROMPT), chunk):
        (last,) = run_step(stage, cache, [StepRow(slot, s, torch.tensor(PROMPT[s : s + chunk]), True)], SCRATCH)
    assert last is not None
    token = torch.tensor([int(last.argmax())])
    (after,) = run_step(stage, cache, [StepRow(slot, len(PROMPT), token, False)], SCRATCH)
    assert after is not None
    return last, after  # the prompt's logits, and the next step's (which read the KV the chunks wrote)


def test_prompt_logits_do_not_depend_on_chunking(packed: Stage) -> None:
    cache = packed.new_cache(1, batching.cache_len(128))
    whole, whole_next = _prompt_logits(packed, cache, len(PROMPT))
    for chunk in (1, 4, 7, 16, 32):
        last, after = _prompt_logits(packed, cache, chunk)
        assert torch.equal(last, whole), f"chunks of {chunk}"
        assert torch.equal(after, whole_next), f"the step after chunks of {chunk}"


@torch.inference_mode()
def test_control_plain_calls_are_not_invariant(packed: Stage, cache: KVCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the convention the checks above fail on this stage: plain batched decode (one attention call over the
    batch's key count) changes a row's logits, and on the eager path (``LLAMA_NODE_FUSED=0``; the fused path has no
    padding to take away) prompt chunks not padded to 16 tokens change the prompt's."""
    tokens = torch.tensor([[1234 + s] for s in range(8)])

    def plain(slots: list[int]) -> Tensor:
        batch = packed.batch(torch.tensor(slots), torch.tensor([LENGTHS[s] for s in slots]), 1)
        return packed(tokens[slots], batch, cache, last_only=True)[:, -1]

    alone = [plain([s])[0] for s in range(8)]
    together = plain(list(range(8)))
    assert not all(torch.equal(together[s], alone[s]) for s in range(8))

    unpadded = packed.new_cache(1, batching.cache_len(128))
    monkeypatch.setattr(batching, "ROW_MULTIPLE", 1)  # prompt chunks unpadded; decode rows are unpadded anyway
    monkeypatch.setenv("LLAMA_NODE_FUSED", "0")
    fused._decoders.clear()
    try:
        whole, _ = _prompt_logits(packed, unpadded, len(PROMPT))
        assert not all(torch.equal(_prompt_logits(packed, unpadded, c)[0], whole) for c in (1, 4, 7))
    finally:
        fused._decoders.clear()


def _engine_greedy(engine: LocalEngine, prompt: Sequence[int], steps: int) -> tuple[list[int], list[Tensor]]:
    tokens, logits = [engine.step(prompt, 0)], []
    for i in range(steps - 1):
        assert engine.logits is not None
        logits.append(engine.logits)
        tokens.append(engine.step([tokens[-1]], len(prompt) + i))
    assert engine.logits is not None
    return tokens, [*logits, engine.logits]


@pytest.mark.parametrize("quantize", [None, QuantMode.gguf], ids=["float32", "packed"])
def test_local_engine_equals_run_step(packed: Stage, quantize: QuantMode | None) -> None:
    """``llama-node run`` (``LocalEngine``) computes what the nodes and ``serve`` compute (``run_step``), bit for bit;
    the control: the old engine's plain unpadded call does not."""
    stage = packed if quantize is not None else _load(None)
    prompt = PROMPT[:29]
    expected_tokens, expected = local_greedy([stage], prompt, 6)  # run_step, as every node runs it
    tokens, logits = _engine_greedy(LocalEngine(stage, SamplingParams(), 128), prompt, 6)
    assert tokens == expected_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, expected, strict=True))

    plain_cache = stage.new_cache(1, 128)
    with torch.inference_mode():
        x, plain = torch.tensor([prompt]), []
        for start, token in zip([0, *range(len(prompt), len(prompt) + 5)], [None, *expected_tokens[:5]], strict=True):
            x = x if token is None else torch.tensor([[token]])
            batch = stage.batch(torch.tensor([0]), torch.tensor([start]), x.shape[1])
            plain.append(stage(x, batch, plain_cache, last_only=True)[0, -1])
    assert not all(torch.equal(a, b) for a, b in zip(plain, expected, strict=True))
