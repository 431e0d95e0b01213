"""Repetition, frequency and presence penalties: the formulas on fixed logits, the window they look at, and a tiny
random Llama whose greedy answer falls into a loop that each penalty breaks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llama_shard.errors import LlamaShardError
from llama_shard.sampling import SamplingParams, apply_penalties, apply_repetition_penalty, sample

# token 1 leads token 2 by 0.5: greedy picks 1 unless a penalty takes at least 0.5 off it
LOGITS = torch.tensor([0.0, 3.0, 2.5, 1.0, -1.0])


def test_openai_formula_over_generated_counts() -> None:
    # arrange: a prompt of 3 tokens, then 5 generated ones
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    prompt, generated = [7, 7, 9], [3, 7, 3, 3, 11]
    params = SamplingParams(frequency_penalty=0.4, presence_penalty=-0.3, penalty_start=len(prompt))
    # act
    out = apply_penalties(logits, prompt + generated, params)
    # assert: logits[j] -= c[j] * frequency + (c[j] > 0) * presence, c counting generated tokens only
    expected = logits.clone()
    for j, c in {3: 3, 7: 1, 11: 1}.items():
        expected[j] -= c * 0.4 + 1 * -0.3
    assert torch.allclose(out, expected, atol=0, rtol=1e-6)
    assert out[9] == logits[9]  # in the prompt only: not counted


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(frequency_penalty=0.3),  # 3.0 - 2 * 0.3 = 2.4 < 2.5
        SamplingParams(presence_penalty=0.6),  # 3.0 - 0.6 = 2.4
        SamplingParams(repetition_penalty=1.25),  # 3.0 / 1.25 = 2.4
    ],
)
def test_a_penalty_moves_greedy_off_a_repeated_token(params: SamplingParams) -> None:
    history = [4, 1, 3, 1]
    assert sample(LOGITS, SamplingParams(), 4, history) == 1  # control: no penalty, the repeat wins
    assert sample(LOGITS, params, 4, history) == 2


def test_openai_penalties_skip_the_prompt_ctrl_penalty_does_not() -> None:
    history = [1, 1, 1, 3]  # token 1 is in the prompt (3 tokens) only
    assert sample(LOGITS, SamplingParams(frequency_penalty=2, presence_penalty=2, penalty_start=3), 4, history) == 1
    assert sample(LOGITS, SamplingParams(frequency_penalty=2, presence_penalty=2), 4, history) == 2
    assert sample(LOGITS, SamplingParams(repetition_penalty=2, penalty_start=3), 4, history) == 2


def test_window_is_the_last_n_tokens() -> None:
    history = [1, 1, 3, 4, 0]  # token 1 is 4 tokens back
    for params in (
        SamplingParams(repetition_penalty=2.0, penalty_last_n=3),
        SamplingParams(presence_penalty=1.0, penalty_last_n=3),
    ):
        assert sample(LOGITS, params, 5, history) == 1
    assert sample(LOGITS, SamplingParams(presence_penalty=1.0, penalty_last_n=5), 5, history) == 2
    assert sample(LOGITS, SamplingParams(presence_penalty=1.0), 5, history) == 2  # 0: the whole history


def test_llama_cpp_order_repeat_then_frequency_and_presence() -> None:
    # llama.cpp's llama_sampler_penalties: CTRL first, then -= count * freq + present, over the same window
    logits = torch.tensor([2.0, -1.0, 0.5, 4.0])
    history = [0, 0, 1, 3, 0]
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5, penalty_last_n=4)
    out = apply_penalties(logits, history, params)
    window_counts = {0: 2, 1: 1, 3: 1}  # the last 4 tokens: 0, 1, 3, 0
    expected = logits.clone()
    for j, c in window_counts.items():
        v = expected[j]
        expected[j] = (v / 2.0 if v > 0 else v * 2.0) - c * 0.25 - 0.5
    assert torch.equal(out, expected)
    assert torch.equal(apply_repetition_penalty(logits, history, 1.0), logits)


def test_seeded_draws_stay_a_function_of_seed_position_and_history() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=11, frequency_penalty=1.0, presence_penalty=1.0, penalty_start=2)
    history = [5, 6, 7, 8, 7]
    draws = [sample(logits, params, pos, history) for pos in range(40)]
    assert draws == [sample(logits.clone(), params, pos, tuple(history)) for pos in range(40)]
    unpenalised = SamplingParams(temperature=1.0, seed=11)
    assert draws == [sample(apply_penalties(logits, history, params), unpenalised, pos) for pos in range(40)]


@pytest.mark.parametrize(
    "bad",
    [
        {"frequency_penalty": 101.0},
        {"presence_penalty": -101.0},
        {"presence_penalty": float("nan")},
        {"penalty_last_n": -1},
        {"penalty_start": -2},
    ],
)
def test_bad_penalties_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(LlamaShardError):
        SamplingParams(**bad)  # type: ignore[arg-type]


def _greedy(model: Path, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    from llama_shard.generate import LocalEngine
    from llama_shard.loading import load_stage, open_source
    from llama_shard.shard import ShardSpec

    engine = LocalEngine(load_stage(open_source(model), ShardSpec.whole(4)), params, 64)
    out = [engine.step(prompt, 0)]
    while len(out) < n:
        out.append(engine.step([out[-1]], len(prompt) + len(out) - 1))
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(frequency_penalty=0.5, penalty_start=5),
        SamplingParams(presence_penalty=2.0, penalty_start=5),
        SamplingParams(repetition_penalty=1.5, penalty_last_n=64),
    ],
)
def test_tiny_llama_greedy_loop_is_broken_by_each_penalty(
    make_hf_llama: Callable[..., Path], params: SamplingParams
) -> None:
    # arrange: the property the test needs of the random weights, checked rather than assumed of a seed: the greedy
    # answer to this prompt ends in a loop (a cycle of at most 3 tokens over its last 12), as tiny random models do
    model, prompt = make_hf_llama(), [1, 5, 6, 7, 8]
    plain = _greedy(model, prompt, SamplingParams(), 20)
    assert any(plain[-12:] == (plain[-p:] * 12)[-12:] for p in (1, 2, 3)), f"no greedy loop to break: {plain}"
    # act
    penalised = _greedy(model, prompt, params, 20)
    # assert: the same start (nothing repeated yet), then no loop
    assert penalised[0] == plain[0] and penalised != plain
    assert len(set(penalised[-6:])) == 6 and len(set(penalised)) > len(set(plain)), (plain, penalised)
    assert penalised == _greedy(model, prompt, params, 20)  # deterministic
