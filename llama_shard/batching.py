"""Batch-invariant steps: a row's outputs do not depend on what shares its step or how its prompt was chunked.

Plain batched calls do not give that on CPU. Measured with torch 2.13 (MKL/oneDNN), a linear's row differs in the
last bits between M = 1, 2, 3 and M >= 4 flattened rows (GEMV vs GEMM kernels, and tail rows of small M), and
``scaled_dot_product_attention`` takes another path for one batch row or one query than for several, and its key
length changes its blocking. So every call made here has a shape drawn from a few fixed families, whatever the load:

* decode (one new token per row): the rows are padded to a multiple of ``ROW_MULTIPLE`` (at least
  ``ROW_MULTIPLE``) with scratch rows that write to a scratch KV slot, which no real row ever reads. Except on a
  ``row_invariant`` stage, whose every module gives a row the same bits for any number of rows (the packed int4
  kernel of ``QuantLinear`` does, and torch's reference bf16 kernel under a ``DenseLinear`` on a CPU without
  oneDNN's bf16; MKL's fp32 GEMM does not): there the rows go unpadded, and attention runs row by
  row (B = 1, one query, the row's own key count), so no shape a row meets depends on its batch-mates;
* prefill (a prompt chunk, of any length including 1): one row per call, its chunk padded with dummy inputs to a
  multiple of ``ROW_MULTIPLE`` tokens. The padding writes KV past the chunk, which the next real token overwrites
  before anyone can read it (the mask hides keys past each query's position). A row-invariant stage needs it too:
  attention over T queries is not the same per query for every T (measured on SmolLM2 Q4_1: chunks of 1, 4, 7
  tokens unpadded change the prompt's logits);
* the attention key length is rounded up to a multiple of ``KEY_MULTIPLE`` and a mask is always passed.

A token fed as a decode row and the same token fed as a one-token prompt chunk go through different families and
may differ in the last bits, so callers say which a row is (``StepRow.prefill``); a chunk of several tokens is
always prefill. Every stage of a pipeline applies the same convention, so a middle or last stage pads its
``[rows, tokens, D]`` activations exactly as the first stage padded the token ids.

A packed stage on CPU (``llama_shard.fused``) needs none of this: a step's tokens, decode rows and prompt chunks
alike, are rows of one native call, unpadded, each computed from its own token, position and slot only. There a
token's bits are the same in any step, any chunking, decoded or prefilled.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llama_shard.fused import FusedDecoder
from llama_shard.fused import decoder as fused_decoder
from llama_shard.model import Batch, KVCache, RMSNorm, Stage
from llama_shard.quant import DenseEmbedding, QuantEmbedding

ROW_MULTIPLE = 16
KEY_MULTIPLE = 64


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


#: leaf modules that work row by row whatever their type says (a gather, a per-row norm)
_ROW_WISE: tuple[type[nn.Module], ...] = (nn.Embedding, QuantEmbedding, DenseEmbedding, RMSNorm)
_row_invariant: weakref.WeakKeyDictionary[Stage, bool] = weakref.WeakKeyDictionary()


def row_invariant(stage: Stage) -> bool:
    """Whether every leaf module of ``stage`` gives a row's output bitwise the same whatever the other rows: its type
    is row-wise by nature (``_ROW_WISE``, an embedding) or the module says so (``row_invariant``: always for
    ``QuantLinear``, for a ``DenseLinear`` where its device and dtype take torch's reference kernel).
    ``nn.Linear`` does not (MKL's kernels depend on M), nor does any module that does not declare it."""
    known = _row_invariant.get(stage)
    if known is None:
        leaves = [m for m in stage.modules() if next(m.children(), None) is None]
        known = all(isinstance(m, _ROW_WISE) or getattr(m, "row_invariant", False) is True for m in leaves)
        _row_invariant[stage] = known
    return known


def cache_len(max_len: int) -> int:
    """Positions a KV slot needs for a context of ``max_len``: padding writes past it, keys are read in blocks."""
    return round_up(max_len + ROW_MULTIPLE, KEY_MULTIPLE)


@dataclass(frozen=True, slots=True)
class StepRow:
    """One row of a step: ``x`` enters KV slot ``slot`` at positions ``start..start+T-1``.

    ``x`` is ``[T]`` token ids on a first stage, ``[T, D]`` activations elsewhere. ``logits``: on a last stage,
    whether the caller wants the logits after the row's last token (a prompt chunk that does not sample need not).
    """

    slot: int
    start: int
    x: Tensor
    prefill: bool
    logits: bool = True

    @property
    def n_tokens(self) -> int:
        return int(self.x.shape[0])


def _batch(stage: Stage, slots: Sequence[int], starts: Sequence[int], n_tokens: int, per_row: bool) -> Batch:
    device = stage.device
    start = torch.tensor(starts, dtype=torch.long, device=device)
    length = round_up(max(starts) + n_tokens, KEY_MULTIPLE)
    slot_ids = torch.tensor(slots, dtype=torch.long, device=device)
    multiple = KEY_MULTIPLE if per_row else 0
    return stage.batch(slot_ids, start, n_tokens, min_length=length, always_mask=True, row_key_multiple=multiple)


def _pad(stage: Stage, xs: Sequence[Tensor], rows: int, tokens: int) -> Tensor:
    """Stack ``xs`` (each ``[t]`` or ``[t, D]``, t <= tokens) into ``[rows, tokens(, D)]``, zero-padded."""
    if stage.spec.has_embed:
        out = torch.zeros(rows, tokens, dtype=torch.long, device=stage.device)
    else:
        out = torch.zeros(rows, tokens, stage.config.dim, dtype=stage.dtype, device=stage.device)
    for i, x in enumerate(xs):
        out[i, : x.shape[0]] = x
    return out


def decode(stage: Stage, cache: KVCache, rows: Sequence[StepRow], scratch: int) -> list[Tensor | None]:
    """One token per row in one call: padded to ``ROW_MULTIPLE`` rows, or on a ``row_invariant`` stage unpadded with
    attention row by row. Per row: the logits ``[V]`` on a last stage (``None`` where not wanted), the activations
    ``[1, D]`` elsewhere."""
    for r in rows:
        if r.n_tokens != 1:
            raise ValueError(f"a decode row feeds one token, got {r.n_tokens} at {r.start}")
    n = len(rows)
    per_row = row_invariant(stage)
    fused = fused_decoder(stage, cache) if per_row else None
    if fused is not None:  # all the layers in one native call (llama_shard.fused)
        return _fused_step(fused, stage, cache, rows)
    padded = n if per_row else max(ROW_MULTIPLE, round_up(n, ROW_MULTIPLE))
    pad = padded - n
    x = _pad(stage, [r.x for r in rows], padded, 1)
    batch = _batch(stage, [r.slot for r in rows] + [scratch] * pad, [r.start for r in rows] + [0] * pad, 1, per_row)
    out = stage(x, batch, cache, last_only=True)  # [B', 1, V or D]
    if stage.spec.has_head:
        return [out[j, -1] if r.logits else None for j, r in enumerate(rows)]
    return [out[j] for j in range(n)]


def prefill(stage: Stage, cache: KVCache, row: StepRow) -> Tensor | None:
    """One prompt chunk, padded to a multiple of ``ROW_MULTIPLE`` tokens: the logits ``[V]`` after its last token on
    a last stage (``None`` where not wanted), the activations ``[T, D]`` elsewhere."""
    n = row.n_tokens
    if n == 0:
        raise ValueError(f"empty prompt chunk at {row.start}")
    fused = fused_decoder(stage, cache) if row_invariant(stage) else None
    if fused is not None:
        return _fused_step(fused, stage, cache, [row])[0]
    padded = round_up(n, ROW_MULTIPLE)
    x = _pad(stage, [row.x], 1, padded)
    batch = _batch(stage, [row.slot], [row.start], padded, row_invariant(stage))
    if not stage.spec.has_head:
        return stage(x, batch, cache)[0, :n]
    if not row.logits:
        stage(x, batch, cache, last_only=True)
        return None
    if row_invariant(stage):  # the head's row is the same for any M: compute it for the one row wanted
        return stage(x, batch, cache, last_only=True, last=n - 1)[0, -1]
    return stage(x, batch, cache, last_only=False)[0, n - 1]


def _fused_step(fused: FusedDecoder, stage: Stage, cache: KVCache, rows: Sequence[StepRow]) -> list[Tensor | None]:
    """All the rows' tokens as rows of one fused call, unpadded: per row, the logits ``[V]`` after its last token on a
    last stage (``None`` where not wanted), its activations ``[T, D]`` elsewhere."""
    x = torch.cat([r.x if stage.spec.has_embed else r.x.reshape(r.n_tokens, -1) for r in rows])
    slots = [r.slot for r in rows for _ in range(r.n_tokens)]
    positions = [p for r in rows for p in range(r.start, r.start + r.n_tokens)]
    ends = list(itertools.accumulate(r.n_tokens for r in rows))
    if stage.spec.has_head:
        wanted = [i for i, r in enumerate(rows) if r.logits]
        logits = iter(fused(x, cache, slots, positions, [ends[i] - 1 for i in wanted]))
        return [next(logits) if r.logits else None for r in rows]
    h = fused(x, cache, slots, positions)
    return [h[end - r.n_tokens : end] for r, end in zip(rows, ends, strict=True)]


@torch.inference_mode()
def run_step(stage: Stage, cache: KVCache, rows: Sequence[StepRow], scratch: int) -> list[Tensor | None]:
    """Run a step's rows: the decode rows together, each prompt chunk alone (on a fused stage, all in one call).
    ``scratch`` is a KV slot of ``cache`` that no real row uses. Per row, in order: see ``decode`` and ``prefill``."""
    fused = fused_decoder(stage, cache) if row_invariant(stage) else None
    if fused is not None:
        for r in rows:
            if r.n_tokens == 0 or (not r.prefill and r.n_tokens != 1):
                raise ValueError(
                    f"bad {'prompt chunk' if r.prefill else 'decode row'}: {r.n_tokens} tokens at {r.start}"
                )
        return _fused_step(fused, stage, cache, rows)
    out: list[Tensor | None] = [None] * len(rows)
    singles = [i for i, r in enumerate(rows) if not r.prefill]
    if singles:
        for i, o in zip(singles, decode(stage, cache, [rows[i] for i in singles], scratch), strict=True):
            out[i] = o
    for i, r in enumerate(rows):
        if r.prefill:
            out[i] = prefill(stage, cache, r)
    return out
