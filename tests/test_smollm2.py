"""The real SmolLM2-135M GGUF: greedy tokens in fp32 equal transformers' (GGUF dequantised to fp32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llama_shard.embedded import smollm2_gguf_path
from llama_shard.generate import LocalEngine, generate
from llama_shard.loading import load_stage, load_tokenizer, open_source
from llama_shard.model import Stage
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec
from llama_shard.tokenizer import Tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three colours of the rainbow.",
]
STEPS = 24


@pytest.fixture(scope="module")
def ours() -> tuple[Stage, Tokenizer]:
    source = open_source(smollm2_gguf_path())
    return load_stage(source, ShardSpec.whole(source.config.n_layers)), load_tokenizer(source)


@pytest.fixture(scope="module")
def reference() -> Any:
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_transformers(ours: tuple[Stage, Tokenizer], reference: Any, prompt: str) -> None:
    stage, tokenizer = ours
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    result = generate(LocalEngine(stage, SamplingParams(), max_len=256), tokenizer, ids, max_tokens=STEPS)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=STEPS,
            do_sample=False,
            eos_token_id=sorted(tokenizer.eos_ids),
            pad_token_id=2,
        )[0, len(ids) :].tolist()  # stops at EOS, which it keeps, as ours does
    assert result.token_ids == expected
    assert result.text.strip()  # a real answer, not an empty string


def test_prefill_logits_close_to_transformers(ours: tuple[Stage, Tokenizer], reference: Any) -> None:
    stage, tokenizer = ours
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
        batch = stage.batch(torch.tensor([0]), torch.tensor([0]), len(ids))
        got = stage(torch.tensor([ids]), batch, stage.new_cache(1, 64))
    assert (got - expected).abs().max().item() < 1e-4
