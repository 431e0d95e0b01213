"""The whole model in this process, run by one worker thread: a ``StepExecutor`` for the scheduler.

Batch invariance. A request's logits must not depend on who shares its step or how its prompt was chunked, so
greedy output alone and under load is the same. Plain batched calls do not give that on CPU: measured with torch
2.13 (MKL/oneDNN), a linear's row differs in the last bits between M = 1, 2, 3 and M >= 4 flattened rows (GEMV vs
GEMM kernels, and tail rows of small M), and ``scaled_dot_product_attention`` takes another path for one batch row
or one query than for several, and its key length changes its blocking. So every call here has a shape drawn from a
few fixed families, whatever the load:

* decode: the rows are padded to a multiple of ``ROW_MULTIPLE`` (at least ``ROW_MULTIPLE``) with scratch rows
  that write to a scratch KV slot; one query per row;
* prefill: one request at a time, its chunk padded with dummy tokens to a multiple of ``ROW_MULTIPLE`` (the
  padding writes KV past the chunk, which the next real token overwrites before anyone can read it);
* the attention key length is rounded up to a multiple of ``KEY_MULTIPLE`` and a mask is always passed.

``tests/test_scheduler_invariance.py`` checks the resulting logits bit for bit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from coordinator.scheduler import RowWork
from llama_shard.model import Batch, Stage
from llama_shard.sampling import sample

log = logging.getLogger(__name__)

ROW_MULTIPLE = 16
KEY_MULTIPLE = 64


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class LocalExecutor:
    """Runs steps on a whole-model ``Stage`` in a worker thread, so the event loop never waits on compute."""

    depth = 1

    def __init__(self, stage: Stage, n_slots: int, max_len: int) -> None:
        if not (stage.spec.has_embed and stage.spec.has_head):
            raise ValueError(f"LocalExecutor needs the whole model, got stage {stage.spec}")
        if n_slots < 1 or max_len < 2:
            raise ValueError(f"need at least 1 slot and a context of 2, got {n_slots} slots of {max_len}")
        self.stage, self.n_slots, self.max_len = stage, n_slots, max_len
        self.cache_len = round_up(max_len + ROW_MULTIPLE, KEY_MULTIPLE)
        self.scratch = n_slots  # one more slot, written by padding rows and never read by a real one
        self.cache = stage.new_cache(n_slots + 1, self.cache_len)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stage")
        log.info("KV cache: %d slots x %d tokens, %.1f MB", n_slots, max_len, self.cache.nbytes / 1e6)

    async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.run_sync, list(rows))

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run_sync(self, rows: Sequence[RowWork]) -> list[int | None]:
        out: list[int | None] = [None] * len(rows)
        decode = [i for i, r in enumerate(rows) if not r.prefill]
        if decode:
            logits = self.decode_logits([rows[i] for i in decode])
            for j, i in enumerate(decode):
                r = rows[i]
                out[i] = sample(logits[j], r.params, r.start + 1, r.history)
        for i, r in enumerate(rows):
            if r.prefill:
                last = self.prefill_logits(r)
                if r.sample and last is not None:
                    out[i] = sample(last, r.params, r.start + len(r.tokens), r.history)
        return out

    # ------------------------------------------------------------------------------------------------ forward
    def _batch(self, slots: list[int], starts: list[int], n_tokens: int, length: int) -> Batch:
        start = torch.tensor(starts, dtype=torch.long)
        positions = start[:, None] + torch.arange(n_tokens)  # [B, T]
        freqs = positions[..., None].float() * self.stage.inv_freq  # [B, T, E/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        keys = torch.arange(length)
        mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, L]
        return Batch(torch.tensor(slots, dtype=torch.long), positions, emb.cos(), emb.sin(), length, mask)

    @torch.inference_mode()
    def decode_logits(self, rows: Sequence[RowWork]) -> Tensor:
        """Logits ``[len(rows), V]`` for one new token per row."""
        n = len(rows)
        padded = max(ROW_MULTIPLE, round_up(n, ROW_MULTIPLE))
        pad = padded - n
        slots = [r.slot for r in rows] + [self.scratch] * pad
        starts = [r.start for r in rows] + [0] * pad
        for r in rows:
            if len(r.tokens) != 1 or not 0 <= r.start < self.max_len:
                raise ValueError(f"bad decode row: {len(r.tokens)} tokens at {r.start}")
        x = torch.tensor([[r.tokens[0]] for r in rows] + [[0]] * pad, dtype=torch.long)
        batch = self._batch(slots, starts, 1, round_up(max(starts) + 1, KEY_MULTIPLE))
        return self.stage(x, batch, self.cache, last_only=True)[:n, -1]

    @torch.inference_mode()
    def prefill_logits(self, row: RowWork) -> Tensor | None:
        """Feed one prompt chunk; the logits ``[V]`` after its last token when the row samples."""
        n = len(row.tokens)
        if n == 0 or row.start < 0 or row.start + n > self.max_len:
            raise ValueError(f"bad prefill chunk: {n} tokens at {row.start} (context {self.max_len})")
        padded = round_up(n, ROW_MULTIPLE)
        x = torch.tensor([list(row.tokens) + [0] * (padded - n)], dtype=torch.long)
        batch = self._batch([row.slot], [row.start], padded, round_up(row.start + padded, KEY_MULTIPLE))
        if not row.sample:
            self.stage(x, batch, self.cache, last_only=True)
            return None
        return self.stage(x, batch, self.cache, last_only=False)[0, n - 1]
