"""Sampling rules and the generation loop (stop conditions, streaming) with a scripted engine."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from llama_shard.embedded import smollm2_gguf_path
from llama_shard.errors import ContextLengthError, LlamaShardError
from llama_shard.generate import StopStrings, generate
from llama_shard.gguf_file import gguf_metadata
from llama_shard.sampling import SamplingParams, apply_repetition_penalty, sample
from llama_shard.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata(smollm2_gguf_path()))


class ScriptedEngine:
    """Returns a fixed token sequence, recording what it was fed."""

    def __init__(self, script: Sequence[int], max_len: int = 512) -> None:
        self.script, self.max_len, self.fed = list(script), max_len, []

    def step(self, tokens: Sequence[int], start: int) -> int:
        self.fed.append((list(tokens), start))
        return self.script[len(self.fed) - 1]


def test_greedy_is_argmax_and_ignores_seed() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(seed=1), 5) == 1 == sample(logits, SamplingParams(seed=2), 5)


def test_seed_and_position_decide_the_draw() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits, p, pos) for pos in range(50)]
    assert draws == [sample(logits, p, pos) for pos in range(50)]  # same seed, same positions
    assert draws != [sample(logits, SamplingParams(temperature=1.0, seed=8), pos) for pos in range(50)]
    assert len(set(draws)) > 10  # positions draw independently


def test_top_k_top_p_min_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def support(p: SamplingParams) -> set[int]:
        return {sample(logits, p, pos) for pos in range(300)}

    assert support(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert support(SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert support(SamplingParams(temperature=1.0, top_p=0.5)) == {0}
    assert support(SamplingParams(temperature=1.0, min_p=0.25)) == {0, 1, 2}  # 0.15 >= 0.125, 0.05 < 0.125
    assert support(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}


def test_repetition_penalty_matches_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    history = [3, 7, 7, 20, 49]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits[None].clone())[0]
    assert torch.equal(apply_repetition_penalty(logits, history, 1.3), expected)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}, {"top_k": -3}])
def test_bad_sampling_parameters_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(LlamaShardError):
        SamplingParams(**bad)  # type: ignore[arg-type]


def test_stop_string_split_across_pushes_is_never_emitted() -> None:
    stops = StopStrings(["</end>"])
    out = [stops.push(d) for d in ["Hello </", "en", "d> more"]]
    assert out == [("Hello ", False), ("", False), ("", True)]


def test_generate_stops_at_eos_keeps_it_in_ids_not_text(tokenizer: Tokenizer) -> None:
    words = tokenizer.encode("The sky is blue")
    eos = next(iter(tokenizer.eos_ids))
    engine = ScriptedEngine([*words, eos, *words])
    streamed: list[str] = []
    result = generate(engine, tokenizer, [1, 2, 3], max_tokens=50, on_text=streamed.append)
    assert result.token_ids == [*words, eos] and result.finish_reason == "stop"
    assert result.text == "The sky is blue" == "".join(streamed)
    assert engine.fed[0] == ([1, 2, 3], 0) and engine.fed[1] == ([words[0]], 3)  # prefill, then one at a time


def test_generate_stop_string_and_max_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("alpha beta gamma delta epsilon")
    result = generate(ScriptedEngine(ids), tokenizer, [5], max_tokens=50, stop=[" gam"])
    assert result.text == "alpha beta" and result.finish_reason == "stop"
    result = generate(ScriptedEngine(ids), tokenizer, [5], max_tokens=2)
    assert result.token_ids == ids[:2] and result.finish_reason == "length"


def test_generate_streams_split_utf8_whole(tokenizer: Tokenizer) -> None:
    text = "snow ❄️ and 雪 and 🏔️"
    ids = tokenizer.encode(text)
    streamed: list[str] = []
    result = generate(ScriptedEngine(ids), tokenizer, [5], max_tokens=len(ids), on_text=streamed.append)
    assert result.text == text == "".join(streamed)
    assert all("\ufffd" not in s for s in streamed)


def test_prompt_that_fills_the_context_is_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(ContextLengthError, match="the context holds 8"):
        generate(ScriptedEngine([], max_len=8), tokenizer, list(range(8)), max_tokens=4)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-38, 1e-30])
def test_tiny_temperature_draws_the_argmax_not_nan(temperature: float) -> None:
    # logits / 1e-300 overflow float32 (and 5e-324 is 0 there); the sampler shifts the logits first
    logits = torch.randn(500, generator=torch.Generator().manual_seed(4)) * 10
    for kw in ({}, {"top_k": 5}, {"top_p": 0.3}, {"min_p": 0.5}):
        params = SamplingParams(temperature=temperature, seed=3, **kw)  # type: ignore[arg-type]
        assert {sample(logits, params, pos) for pos in range(20)} == {int(logits.argmax())}


@pytest.mark.parametrize("top_p", [2.2e-311, 1e-46, 1e-300])
def test_top_p_below_float32s_smallest_keeps_the_first_token(top_p: float) -> None:
    # a valid top_p (> 0) that is 0 in float32 made the cumulative-mass test drop every token, and multinomial
    # raised on all-zero probabilities: the node failed the frame (found by the schemathesis run)
    logits = torch.randn(500, generator=torch.Generator().manual_seed(6)) * 3
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=1)
    assert {sample(logits, params, pos) for pos in range(10)} == {int(logits.argmax())}


def test_extreme_repetition_penalty_never_makes_nan() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(5)) * 10
    history = [int(i) for i in torch.topk(logits, 3).indices]  # positive logits / 1e-300: inf in float32
    for temperature in (0.0, 1e-300, 0.7, 2.0):
        params = SamplingParams(temperature=temperature, repetition_penalty=1e-300, seed=1, top_p=0.9)
        assert {sample(logits, params, pos, history) for pos in range(10)} <= set(history)
