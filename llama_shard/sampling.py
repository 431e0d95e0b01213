"""Choosing the next token: penalties, then greedy or temperature, top-k, top-p and min-p.

Randomness comes from ``(seed, position)`` alone, never from state carried between steps, so a request that is
replayed (on another node, after a failure) draws the same tokens. The penalties are a function of the token
history alone (``history[i]`` is the token at position ``i``: prompt, then generated), so they are just as
reproducible.

Penalties, in llama.cpp's order (``llama_sampler_penalties``), over a window of the history:

- ``repetition_penalty`` (CTRL, as transformers and llama.cpp apply it): a token seen in the window has its logit
  divided by the penalty when positive, multiplied when negative;
- ``frequency_penalty`` and ``presence_penalty`` (OpenAI's definition): ``logits[j] -= c[j] * frequency_penalty +
  (c[j] > 0) * presence_penalty`` where ``c[j]`` counts token ``j`` in the window from ``penalty_start`` on.

The window is the last ``penalty_last_n`` tokens (0: the whole history). ``penalty_start`` lets OpenAI's penalties
count generated tokens only (it is the prompt's length), while Ollama's, as llama.cpp's, count the prompt too.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llama_shard.errors import LlamaShardError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 0  # the penalties look at the last n tokens of the history; 0: all of it
    penalty_start: int = 0  # frequency and presence count history[penalty_start:] only (OpenAI: the prompt's length)

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (abs(self.frequency_penalty) <= 100, f"frequency_penalty must be in [-100, 100]: {self.frequency_penalty}"),
            (abs(self.presence_penalty) <= 100, f"presence_penalty must be in [-100, 100]: {self.presence_penalty}"),
            (self.penalty_last_n >= 0, f"penalty_last_n must be >= 0, got {self.penalty_last_n}"),
            (self.penalty_start >= 0, f"penalty_start must be >= 0, got {self.penalty_start}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlamaShardError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @staticmethod
    def random_seed() -> int:
        return secrets.randbits(63)


def step_generator(seed: int, position: int) -> torch.Generator:
    """A generator that depends only on the request's seed and the position being sampled."""
    mixed = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def apply_repetition_penalty(logits: Tensor, history: Iterable[int], penalty: float) -> Tensor:
    """CTRL-style penalty, as transformers applies it: divide positive logits, multiply negative ones."""
    ids = torch.tensor(sorted(set(history)), dtype=torch.long)
    if penalty == 1.0 or ids.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[ids]
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_penalties(logits: Tensor, history: Iterable[int], params: SamplingParams) -> Tensor:
    """``logits [V]`` after the repetition, frequency and presence penalties over ``history`` (see the module doc)."""
    if not params.penalised:
        return logits
    history = list(history)
    start = max(0, len(history) - params.penalty_last_n) if params.penalty_last_n > 0 else 0
    logits = apply_repetition_penalty(logits, history[start:], params.repetition_penalty)
    counted = [t for t in history[max(start, params.penalty_start) :] if 0 <= t < logits.numel()]
    if not counted or (params.frequency_penalty == 0.0 and params.presence_penalty == 0.0):
        return logits
    counts = torch.bincount(torch.tensor(counted, dtype=torch.long), minlength=logits.numel()).to(logits.dtype)
    return logits - counts * params.frequency_penalty - (counts > 0).to(logits.dtype) * params.presence_penalty


class SlotHistories:
    """The tokens fed so far to each KV slot, which the penalties look at: ``feed(slot, start, tokens)`` puts
    ``tokens`` at positions ``start..`` of the slot's sequence, dropping what it held from ``start`` on (a reused slot
    starts again at 0). Kept where the sampling happens, so nobody ships a whole context with every step."""

    def __init__(self) -> None:
        self._slots: dict[int, list[int]] = {}

    def feed(self, slot: int, start: int, tokens: Sequence[int]) -> list[int]:
        history = self._slots.setdefault(slot, [])
        del history[start:]
        history.extend(tokens)
        return history


def sample(logits: Tensor, params: SamplingParams, position: int, history: Iterable[int] = ()) -> int:
    """Pick a token from fp32 ``logits [V]`` for the token at ``position``; ``history[i]`` is the token at ``i``."""
    logits = logits.float()
    if params.penalised:
        logits = apply_penalties(logits, list(history), params)
    if params.greedy:
        return int(torch.argmax(logits))
    # finite (a repetition penalty of 1e-300 makes inf), then shifted so that the largest logit is 0: no temperature,
    # however small, overflows (a float32 logit over 1e-300 is inf, and inf - inf is nan); below float32's smallest
    # normal the draw is greedy, ties shared
    big = torch.finfo(torch.float32).max
    logits = logits.clamp(-big, big)
    logits = (logits - logits.max()) / max(params.temperature, torch.finfo(torch.float32).tiny)
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop_sorted = (sorted_probs.cumsum(0) - sorted_probs) >= params.top_p
        drop_sorted[0] = False  # also when top_p is 0 in float32 (a top_p under 1.2e-38 would drop every token)
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=step_generator(params.seed, position)))
