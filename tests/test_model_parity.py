"""Parity with transformers on tiny random Llama models: logits, greedy tokens, and chained stages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from llama_shard.loading import load_stage, open_source
from llama_shard.model import Stage
from llama_shard.shard import ShardSpec, split_evenly

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha_tied": {"num_key_value_heads": 8, "tie_word_embeddings": True},
    "llama3_rope": {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}},
    "linear_rope": {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    "mqa_tied_llama3": {
        "num_key_value_heads": 1,
        "tie_word_embeddings": True,
        "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0},
    },
}


def _logits(stages: list[Stage], ids: torch.Tensor) -> torch.Tensor:
    """Run ``ids [1, T]`` through a chain of stages as a prefill."""
    h = ids
    for stage in stages:
        cache = stage.new_cache(1, 256)
        batch = stage.batch(torch.tensor([0]), torch.tensor([0]), ids.shape[1])
        h = stage(h, batch, cache)
    return h


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(make_hf_llama: Callable[..., Path], variant: str) -> None:
    path = make_hf_llama(**VARIANTS[variant])
    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stage = load_stage(open_source(path), ShardSpec.whole(4))
    ids = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(7))  # past the llama3 old ctx
    with torch.no_grad():
        expected = reference(ids).logits
    ours = _logits([stage], ids)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["gqa", "mqa_tied_llama3"])
def test_greedy_tokens_match_transformers(make_hf_llama: Callable[..., Path], variant: str) -> None:
    path = make_hf_llama(**VARIANTS[variant])
    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stage = load_stage(open_source(path), ShardSpec.whole(4))
    prompt = [5, 17, 99, 3, 250, 41, 7]

    expected = list(prompt)
    with torch.no_grad():
        for _ in range(32):  # reference: full recompute each step, no cache
            expected.append(int(reference(torch.tensor([expected])).logits[0, -1].argmax()))

    # ours: prefill then one token at a time through the KV cache
    cache = stage.new_cache(1, 64)
    slot = torch.tensor([0])
    ours = list(prompt)
    with torch.no_grad():
        x, start = torch.tensor([prompt]), 0
        for _ in range(32):
            logits = stage(x, stage.batch(slot, torch.tensor([start]), x.shape[1]), cache, last_only=True)
            start += x.shape[1]
            ours.append(int(logits[0, -1].argmax()))
            x = torch.tensor([[ours[-1]]])
    assert ours == expected


@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_chained_stages_equal_whole_model_bit_for_bit(make_hf_llama: Callable[..., Path], n_stages: int) -> None:
    path = make_hf_llama(**VARIANTS["mqa_tied_llama3"])
    source = open_source(path)
    whole = load_stage(source, ShardSpec.whole(4))
    chain = [load_stage(source, spec) for spec in split_evenly(4, n_stages)]
    ids = torch.randint(0, 320, (1, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(_logits(chain, ids), _logits([whole], ids))


def test_stage_holds_only_its_own_tensors(make_hf_llama: Callable[..., Path]) -> None:
    path = make_hf_llama(**VARIANTS["mqa_tied_llama3"])
    source = open_source(path)
    first, middle, last = (load_stage(source, spec) for spec in split_evenly(4, 3))
    assert first.tok_embeddings is not None and first.output is None
    assert middle.tok_embeddings is None and middle.output is None and set(middle.layers) == {"2"}
    assert last.output is not None and last.tok_embeddings is None  # tied head loaded as output only
    assert set(first.layers) == {"0", "1"} and set(last.layers) == {"3"}


def test_batched_decode_rows_match_single_rows(make_hf_llama: Callable[..., Path]) -> None:
    """Two sequences at different positions in one batch give what each gives alone."""
    stage = load_stage(open_source(make_hf_llama()), ShardSpec.whole(4))
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    cache = stage.new_cache(2, 32)
    singles = []
    with torch.no_grad():
        for slot, p in enumerate(prompts):
            stage(torch.tensor([p]), stage.batch(torch.tensor([slot]), torch.tensor([0]), len(p)), cache)
        batch = stage.batch(torch.tensor([0, 1]), torch.tensor([5, 3]), 1)
        both = stage(torch.tensor([[20], [21]]), batch, cache, last_only=True)
        for slot, p in enumerate(prompts):
            alone = stage.new_cache(1, 32)
            stage(torch.tensor([p]), stage.batch(torch.tensor([0]), torch.tensor([0]), len(p)), alone)
            b = stage.batch(torch.tensor([0]), torch.tensor([len(p)]), 1)
            singles.append(stage(torch.tensor([[20 + slot]]), b, alone, last_only=True))
    assert (both - torch.cat(singles)).abs().max().item() < 1e-5
