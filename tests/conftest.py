"""Shared fixtures: tiny random-weight HF Llama models saved with ``save_pretrained`` (the reference)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)


#: The tiny ``LlamaConfig`` the tests build models of (``make_hf_llama``'s, before its overrides).
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="session")
def make_hf_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build, save and cache a tiny random ``LlamaForCausalLM``; returns its directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    made: dict[str, Path] = {}

    def make(**overrides: Any) -> Path:
        kwargs: dict[str, Any] = {**TINY_LLAMA, **overrides}
        # the key is the whole config, so ``make()`` and ``make(num_hidden_layers=4)`` are one model; the weights are
        # a function of the key alone (a stable hash, not ``hash()``), never of which models a session made before
        key = repr(sorted(kwargs.items()))
        if key not in made:
            # a forked RNG: making a model leaves the global generator as it found it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(key.encode()))
                model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
                # random init leaves norms at 1; perturb them so a wrong norm cannot hide
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if "norm" in name:
                            p.add_(torch.randn_like(p) * 0.1)
            path = tmp_path_factory.mktemp("hf_llama")
            model.save_pretrained(path)
            made[key] = path
        return made[key]

    return make
