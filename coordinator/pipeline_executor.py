"""The scheduler's steps on a pipeline of node processes: each step is one frame, ``depth`` frames in flight.

The ``PipelineClient`` lives on its own event loop thread (``LoopThread``); a step is handed to it with
``run_coroutine_threadsafe`` and awaited from the HTTP server's loop, so neither loop ever waits on the other.
Only the last stage samples; the rows carry their sampling parameters and seed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.pipeline.local import LocalPipeline, StageOptions
from coordinator.scheduler import RowWork

if TYPE_CHECKING:
    import torch

    from llama_shard.quant import QuantMode

log = logging.getLogger(__name__)


class PipelineExecutor:
    """``n_nodes`` local node processes holding contiguous slices; one frame per step, one per stage in flight."""

    def __init__(
        self,
        model: Path,
        n_nodes: int,
        n_slots: int,
        max_len: int,
        *,
        threads: int = 1,
        quantize: QuantMode | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.n_slots, self.max_len = n_slots, max_len
        self.depth = max(1, n_nodes)  # one micro-batch per stage keeps every stage busy
        dtypes = [dtype] * n_nodes if dtype is not None else []
        options = StageOptions(dtypes, slots=n_slots, max_len=max_len, quantize=quantize)
        self.pipeline = LocalPipeline(model, n_nodes, options, threads=threads)
        log.info("pipeline of %d node processes: %s", n_nodes, ", ".join(self.pipeline.nodes.addresses))

    async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
        from node.wire import RowInput

        inputs = [RowInput(r.request_id, r.slot, r.start, r.tokens, r.params, prefill=r.prefill) for r in rows]
        future = asyncio.run_coroutine_threadsafe(self.pipeline.client.forward(inputs), self.pipeline.runner.loop)
        outputs = await asyncio.wrap_future(future)
        tokens = {o.request_id: o.token for o in outputs}
        return [tokens.get(r.request_id) if r.sample else None for r in rows]

    async def close(self) -> None:
        await asyncio.to_thread(self.pipeline.close)
