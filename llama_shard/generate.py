"""The generation loop, independent of where the layers run.

``generate`` drives any ``TokenEngine`` — one stage in this process (``LocalEngine``) or a pipeline of nodes — and
owns what is the same everywhere: stopping at EOS/EOT, stop strings and max tokens, incremental detokenisation and
the prefill/decode timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from llama_shard import batching
from llama_shard.batching import StepRow
from llama_shard.errors import ContextLengthError
from llama_shard.model import KVCache, Stage
from llama_shard.sampling import SamplingParams, sample

if TYPE_CHECKING:
    from llama_shard.tokenizer import Tokenizer


class TokenEngine(Protocol):
    """Feeds tokens of one request at ``start`` and returns the token sampled after them."""

    max_len: int

    def step(self, tokens: Sequence[int], start: int) -> int: ...


class LocalEngine:
    """The whole model in this process, one request at a time in KV slot 0.

    It computes with the shapes of ``llama_shard.batching``, as every node and ``serve`` do, so ``llama-node run``
    gives the same bits with or without ``--nodes``: the prompt is a prefill chunk, each later token a decode row
    (as ``PipelineEngine`` marks them). A stage that pads decode rows gets slot 1 as their scratch slot.
    """

    def __init__(self, stage: Stage, params: SamplingParams, max_len: int) -> None:
        if not (stage.spec.has_embed and stage.spec.has_head):
            raise ValueError(f"LocalEngine needs the whole model, got stage {stage.spec}")
        self.stage, self.params, self.max_len = stage, params, max_len
        scratch_slots = 0 if batching.row_invariant(stage) else 1  # a row-invariant stage never pads decode rows
        self.cache: KVCache = stage.new_cache(1 + scratch_slots, batching.cache_len(max_len))
        self.history: list[int] = []
        self.logits: Tensor | None = None  # the logits ``[V]`` of the last step

    def step(self, tokens: Sequence[int], start: int) -> int:
        row = StepRow(0, start, torch.tensor(list(tokens), dtype=torch.long), prefill=start == 0)
        (logits,) = batching.run_step(self.stage, self.cache, [row], scratch=1)
        assert logits is not None  # a last stage returns the logits a row asks for
        self.logits = logits
        self.history.extend(tokens)
        return sample(logits, self.params, start + len(tokens), self.history)


class StopStrings:
    """Holds back text that may be the start of a stop string, so a stop split across tokens is never shown."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return delta, False
        text = self.pending + delta
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            self.pending = ""
            return text[: min(hits)[0]], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass(slots=True)
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def generate(
    engine: TokenEngine,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    eos_ids: frozenset[int] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate up to ``max_tokens`` tokens after ``prompt_ids``.

    ``token_ids`` includes a generated EOS; ``text`` excludes it, stop strings and special tokens. ``on_text``
    receives the text as it becomes final, and the deltas add up to ``text``.
    """
    prompt = list(prompt_ids)
    if not prompt:
        raise ContextLengthError("the prompt is empty")
    if len(prompt) >= engine.max_len:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens; the context holds {engine.max_len} (room for none to generate)"
        )
    max_tokens = min(max_tokens, engine.max_len - len(prompt))
    eos = tokenizer.eos_ids if eos_ids is None else eos_ids
    result = GenerationResult(prompt_ids=prompt)
    decoder = tokenizer.incremental_decoder()
    stops = StopStrings(stop)
    emit = on_text or (lambda _text: None)
    stopped = False

    t0 = time.perf_counter()
    token = engine.step(prompt, 0)
    t1 = time.perf_counter()
    result.prefill_s = t1 - t0
    position = len(prompt)
    while True:
        result.token_ids.append(token)
        if token in eos:
            result.finish_reason = "stop"
            break
        visible, stopped = stops.push(decoder.push(token))
        result.text += visible
        if visible:
            emit(visible)
        if stopped:
            result.finish_reason = "stop"
            break
        if len(result.token_ids) >= max_tokens:
            break
        token = engine.step([token], position)
        position += 1
    result.decode_s = time.perf_counter() - t1
    tail = ""
    if not stopped:  # the decoder's held-back bytes, then the text held back for a possible stop string
        visible, stopped = stops.push(decoder.flush())
        tail = visible if stopped else visible + stops.flush()
        if stopped:
            result.finish_reason = "stop"
    if tail:
        result.text += tail
        emit(tail)
    return result
