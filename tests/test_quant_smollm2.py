"""The packed (``--dtype auto``) path on the real SmolLM2-135M Q4_1 GGUF, against the exact fp32 path and llama.cpp.

Both of our paths read the same Q4_1/Q8_0 blocks, so the comparison isolates the kernel's arithmetic, not
quantisation. With the native kernel (``GGMLLinear``, the default on x86) that arithmetic is llama.cpp's: each
activation is rounded to 8 bits per block of 32 (a relative rms error of ~0.5% per linear, see ``test_quant``);
without it (``QuantLinear``), bf16 roundings (≤ 2^-9 relative each).

- greedy tokens, teacher-forced: along the exact path's greedy continuation, the packed path picks the same token
  at every step where the exact path's top two logits are more than ``TIE`` = 0.5 apart. 8-bit activations move
  the logits by up to ~1.5 (the maximum over 49k entries; the top tokens move less), so near-ties flip. Measured on
  these prompts: 1 flip in 96 steps with 1 thread (the first token of the France prompt, gap 0.08, where llama.cpp
  picks the packed path's token too); 7 with 2 threads (the fp32 path's MKL sums change with the thread count),
  all at gaps 0.03-0.19. A wrong kernel moves logits by whole units and flips confident tokens.
- mean per-token log-likelihood of a fixed text: within ``LL_BOUND`` = 0.01 nats (1% in perplexity). The per-token
  differences are rounding noise of either sign (measured with the native kernel: max 0.29 nats on one token, mean
  +0.0043 nats over 51; with bf16: 0.14 and 0.0009), so the mean shrinks with the text length; 0.01 is far below
  what one bit of quantisation costs (Q4 vs Q8 models differ by ~0.05-0.1 nats/token).
- llama.cpp on the same file rounds activations to 8 bits (Q8_1) for its Q4_1 dot products (with fp16 block
  scales where ours are fp32); its mean log-likelihood must be within ``LLAMA_CPP_LL_BOUND`` = 0.05 nats of both of
  ours. Measured: llama.cpp -4.1596, fp32 -4.1739 (-0.0142), packed -4.1695 (-0.0099) with the native kernel
  (-4.1730 with bf16); 0.05 leaves ~3.5x headroom.
"""

from __future__ import annotations

import logging

import pytest
import torch

from llama_shard.embedded import smollm2_gguf_path
from llama_shard.generate import LocalEngine
from llama_shard.loading import load_stage, load_tokenizer, open_source
from llama_shard.model import Stage
from llama_shard.quant import QuantMode
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec
from llama_shard.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three colours of the rainbow.",
]
STEPS = 32
TIE = 0.5
LL_BOUND = 0.01
LLAMA_CPP_LL_BOUND = 0.05
TEXT = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the spiral "
    "stairs, counted the one hundred and twelve steps out of habit, and checked the great lens for salt and "
    "dust. Outside, the sea was grey and restless."
)


@pytest.fixture(scope="module")
def stages() -> tuple[Stage, Stage, Tokenizer]:
    source = open_source(smollm2_gguf_path())
    spec = ShardSpec.whole(source.config.n_layers)
    exact = load_stage(source, spec)
    packed = load_stage(source, spec, quantize=QuantMode.gguf)
    assert exact.kv_dtype == torch.float32 and packed.kv_dtype == torch.float16  # the checks below are on f16 KV
    return exact, packed, load_tokenizer(source)


def _token_log_probs(stage: Stage, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = stage(x, stage.batch(torch.tensor([0]), torch.tensor([0]), len(ids)), stage.new_cache(1, 512))[0]
    return torch.log_softmax(logits.double(), -1)[:-1].gather(1, x[0, 1:, None])[:, 0]


def _greedy(stage: Stage, prompt: list[int], forced: list[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """``STEPS`` greedy tokens and the logits each was picked from (EOS ignored); ``forced``: feed these tokens
    instead of the stage's own picks (teacher forcing)."""
    engine = LocalEngine(stage, SamplingParams(), 512)
    tokens = [engine.step(prompt, 0)]
    assert engine.logits is not None
    logits = [engine.logits.clone()]
    for i in range(STEPS - 1):
        tokens.append(engine.step([(forced or tokens)[i]], len(prompt) + i))
        logits.append(engine.logits.clone())
    return tokens, logits


@pytest.mark.parametrize("prompt", PROMPTS)
def test_packed_greedy_tokens_follow_the_exact_path(stages: tuple[Stage, Stage, Tokenizer], prompt: str) -> None:
    exact, packed, tokenizer = stages
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    a, logits = _greedy(exact, ids)
    b, _ = _greedy(packed, ids, forced=a)
    flips = {i: (logits[i][a[i]] - logits[i][b[i]]).item() for i in range(STEPS) if a[i] != b[i]}
    log.info("%r: %d of %d greedy tokens the same; gaps where not: %s", prompt, STEPS - len(flips), STEPS, flips)
    assert all(gap < TIE for gap in flips.values()), (flips, a, b)


def test_packed_log_likelihood_is_the_exact_paths(stages: tuple[Stage, Stage, Tokenizer]) -> None:
    exact, packed, tokenizer = stages
    ids = tokenizer.encode(TEXT)
    lp_exact, lp_packed = _token_log_probs(exact, ids), _token_log_probs(packed, ids)
    diff = (lp_packed - lp_exact).mean().item()
    log.info(
        "mean log-likelihood over %d tokens: fp32 %.5f, packed %.5f (diff %+.5f, max per token %.3f)",
        len(ids) - 1, lp_exact.mean().item(), lp_packed.mean().item(), diff, (lp_packed - lp_exact).abs().max().item(),
    )  # fmt: skip
    assert abs(diff) < LL_BOUND


def test_log_likelihood_matches_llama_cpp(stages: tuple[Stage, Stage, Tokenizer]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    exact, packed, tokenizer = stages
    ids = tokenizer.encode(TEXT)
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf_path()), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    scores = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float64))
    lp_cpp = torch.log_softmax(scores, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    ours = {"fp32": _token_log_probs(exact, ids), "packed": _token_log_probs(packed, ids)}
    for name, lp in ours.items():
        diff = (lp - lp_cpp).mean().item()
        log.info("mean log-likelihood %s %.5f vs llama.cpp %.5f (diff %+.5f)", name, lp.mean(), lp_cpp.mean(), diff)
        assert abs(diff) < LLAMA_CPP_LL_BOUND, (name, diff)


def test_cli_dtype_auto_runs_the_packed_path_and_float32_the_exact_one() -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).with_name("llama-node"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    for dtype in ("auto", "float32"):
        argv = [cli, "run", "--prompt", "Hi", "--max-tokens", "4", "--context", "256", "--json", "--dtype", dtype]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=False)
        assert proc.returncode == 0, proc.stderr
        out[dtype] = (json.loads(proc.stdout), proc.stderr)
    assert "quantised (gguf)" in out["auto"][1] and "quantised" not in out["float32"][1]
    assert out["auto"][0]["token_ids"][:1] == out["float32"][0]["token_ids"][:1]
