"""Choosing the next token: greedy, temperature, top-k, top-p, min-p and repetition penalty.

Randomness comes from ``(seed, position)`` alone, never from state carried between steps, so a request that is
replayed (on another node, after a failure) draws the same tokens.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
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

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlamaShardError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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


def sample(logits: Tensor, params: SamplingParams, position: int, history: Iterable[int] = ()) -> int:
    """Pick a token from fp32 ``logits [V]`` for the token at ``position``."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop_sorted = (sorted_probs.cumsum(0) - sorted_probs) >= params.top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=step_generator(params.seed, position)))
