"""A loaded stage and its KV cache, answering frames: validate everything first, then compute.

Each KV slot belongs to one request at a time. A row with ``start == 0`` (re)starts its slot; a later row must
name the slot's request and continue at or before its length (a row before the end rewinds, which is how a stage
replays inputs it received). Only the last stage samples, from the request's own parameters; it keeps each slot's
token history for the repetition penalty, from the token ids that travel with every row.

Every stage computes with the shapes of ``llama_shard.batching`` (decode rows padded to a fixed row multiple, each
prompt chunk alone and padded, keys read in blocks, a mask always), so a row's logits do not depend on what else
shares its frame or how its prompt was chunked. The padding rows write to one scratch KV slot past the ``slots``
that LoadShard asked for, so every node has one whatever the coordinator numbers its slots.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import torch

from llama_shard import batching
from llama_shard.batching import StepRow
from llama_shard.model import KVCache, Stage
from llama_shard.sampling import SlotHistories, sample
from node.wire import Frame, FrameResult, RowInput, RowOutput, WireError, dtype_name

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Slot:
    request_id: int = -1
    length: int = 0


class StageHost:
    """Runs frames through one stage. Not thread-safe: one compute thread calls ``run``."""

    def __init__(
        self,
        stage: Stage,
        *,
        slots: int,
        max_len: int,
        input_dtype: torch.dtype,
        output_dtype: torch.dtype,
    ) -> None:
        self.stage, self.spec, self.config = stage, stage.spec, stage.config
        self.slots, self.max_len = slots, max_len
        self.input_dtype, self.output_dtype = input_dtype, output_dtype
        self.scratch = slots  # written by padding rows only, never read by a real one
        self.cache: KVCache = stage.new_cache(slots + 1, batching.cache_len(max_len))
        self._slots = [_Slot() for _ in range(slots)]
        self._histories = SlotHistories()  # the last stage's: what each slot was fed, for the penalties

    # ---- validation ---------------------------------------------------------------------------------------

    def _check(self, frame: Frame) -> None:
        bad, pre = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
        if frame.layer != self.spec.start:
            raise WireError(
                pre, f"this node holds layers {self.spec}; frame {frame.frame_id} enters layer {frame.layer}"
            )
        seen: set[int] = set()
        for r in frame.rows:
            if not 0 <= r.slot < self.slots:
                raise WireError(bad, f"slot {r.slot} out of range (this stage has {self.slots})")
            if r.slot in seen:
                raise WireError(bad, f"slot {r.slot} appears twice in frame {frame.frame_id}")
            seen.add(r.slot)
            if r.start + len(r.tokens) > self.max_len:
                raise WireError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"request {r.request_id}: positions up to {r.start + len(r.tokens)} "
                    f"exceed the context of {self.max_len}",
                )
            slot = self._slots[r.slot]
            if r.start > 0 and slot.request_id != r.request_id:
                raise WireError(pre, f"unknown request {r.request_id} in slot {r.slot} (it starts at position 0)")
            if r.start > slot.length:
                raise WireError(
                    pre,
                    f"request {r.request_id}: row starts at {r.start} but slot {r.slot} holds {slot.length} positions",
                )
            if self.spec.has_embed and any(not 0 <= t < self.config.vocab_size for t in r.tokens):
                raise WireError(
                    bad, f"request {r.request_id}: token id outside the vocabulary of {self.config.vocab_size}"
                )
        if self.spec.has_embed:
            if frame.hidden is not None:
                raise WireError(bad, "the first stage takes token ids, not activations")
            return
        h = frame.hidden
        if h is None:
            raise WireError(bad, f"frame {frame.frame_id} for layer {frame.layer} carries no activations")
        if h.dtype != self.input_dtype:
            raise WireError(
                bad, f"activations are {dtype_name(h.dtype)}; this link carries {dtype_name(self.input_dtype)}"
            )
        expected = (frame.n_tokens, self.config.dim)
        if tuple(h.shape) != expected:
            raise WireError(bad, f"activations have shape {list(h.shape)}, expected {list(expected)}")

    # ---- compute ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, frame: Frame) -> Frame | FrameResult:
        """The frame for the next stage, or the sampled tokens on the last stage."""
        self._check(frame)
        rows: list[StepRow] = []
        at = 0
        for r in frame.rows:
            n = len(r.tokens)
            if self.spec.has_embed:
                x = torch.tensor(r.tokens, dtype=torch.long)  # [n]
            else:
                assert frame.hidden is not None
                x = frame.hidden[at : at + n]  # [n, D]
            rows.append(StepRow(r.slot, r.start, x, prefill=r.prefill or n > 1))
            at += n
        out = batching.run_step(self.stage, self.cache, rows, self.scratch)
        for r in frame.rows:
            slot = self._slots[r.slot]
            slot.request_id, slot.length = r.request_id, r.start + len(r.tokens)
        if self.spec.has_head:
            return FrameResult(
                frame.frame_id, tuple(self._sample(r, o) for r, o in zip(frame.rows, out, strict=True) if o is not None)
            )
        packed = torch.cat([o for o in out if o is not None]).to("cpu", self.output_dtype)  # [sum of token counts, D]
        return Frame(frame.frame_id, self.spec.end, frame.rows, packed)

    def _sample(self, row: RowInput, logits: torch.Tensor) -> RowOutput:
        history = self._histories.feed(row.slot, row.start, row.tokens)
        token = sample(logits, row.sampling, row.start + len(row.tokens), history)
        return RowOutput(row.request_id, token, logits.float().clone() if row.return_logits else None)
