"""The whole model in this process, run by one worker thread: a ``StepExecutor`` for the scheduler.

Batch invariance (a request's logits do not depend on who shares its step or how its prompt was chunked) comes
from ``llama_shard.batching``, which fixes the shapes of every call; ``tests/test_scheduler_invariance.py`` checks the
resulting logits bit for bit on SmolLM2.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from coordinator.scheduler import RowWork
from llama_shard import batching
from llama_shard.batching import StepRow
from llama_shard.model import Stage
from llama_shard.sampling import SlotHistories, sample

log = logging.getLogger(__name__)


class LocalExecutor:
    """Runs steps on a whole-model ``Stage`` in a worker thread, so the event loop never waits on compute."""

    depth = 1

    def __init__(self, stage: Stage, n_slots: int, max_len: int) -> None:
        if not (stage.spec.has_embed and stage.spec.has_head):
            raise ValueError(f"LocalExecutor needs the whole model, got stage {stage.spec}")
        if n_slots < 1 or max_len < 2:
            raise ValueError(f"need at least 1 slot and a context of 2, got {n_slots} slots of {max_len}")
        self.stage, self.n_slots, self.max_len = stage, n_slots, max_len
        self.cache_len = batching.cache_len(max_len)
        self.scratch = n_slots  # one more slot, written by padding rows and never read by a real one
        self.cache = stage.new_cache(n_slots + 1, self.cache_len)
        self.histories = SlotHistories()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stage")
        log.info("KV cache: %d slots x %d tokens, %s, %.1f MB", n_slots, max_len,
                 str(self.cache.dtype).removeprefix("torch."), self.cache.nbytes / 1e6)  # fmt: skip

    def run(self, rows: Sequence[RowWork]) -> asyncio.Future[list[int | None]]:
        return asyncio.get_running_loop().run_in_executor(self._pool, self.run_sync, list(rows))

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run_sync(self, rows: Sequence[RowWork]) -> list[int | None]:
        logits = batching.run_step(self.stage, self.cache, [self._row(r) for r in rows], self.scratch)
        out: list[int | None] = []
        for r, last in zip(rows, logits, strict=True):
            history = self.histories.feed(r.slot, r.start, r.tokens)
            if last is None or not r.sample:
                out.append(None)
            else:
                out.append(sample(last, r.params, r.start + len(r.tokens), history))
        return out

    # ------------------------------------------------------------------------------------------------ forward
    def _row(self, row: RowWork) -> StepRow:
        n = len(row.tokens)
        if n == 0 or row.start < 0 or row.start + n > self.max_len or (not row.prefill and n != 1):
            kind = "prefill chunk" if row.prefill else "decode row"
            raise ValueError(f"bad {kind}: {n} tokens at {row.start} (context {self.max_len})")
        x = torch.tensor(row.tokens, dtype=torch.long)
        return StepRow(row.slot, row.start, x, prefill=row.prefill, logits=row.sample or not row.prefill)

    @torch.inference_mode()
    def decode_logits(self, rows: Sequence[RowWork]) -> Tensor:
        """Logits ``[len(rows), V]`` for one new token per row."""
        out = batching.decode(self.stage, self.cache, [self._row(r) for r in rows], self.scratch)
        return torch.stack([o for o in out if o is not None])  # decode rows always want their logits

    @torch.inference_mode()
    def prefill_logits(self, row: RowWork) -> Tensor | None:
        """Feed one prompt chunk; the logits ``[V]`` after its last token when the row samples."""
        return batching.prefill(self.stage, self.cache, self._row(row))
