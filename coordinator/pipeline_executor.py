"""The scheduler's steps on a pipeline of node processes: each step is one frame, ``depth`` frames in flight.

How many micro-batches to keep in flight is a trade between two things. One per stage keeps every stage busy when
each stage has its own cores (a cluster of machines). But every frame pays a fixed cost per layer (kernel calls,
Python, gRPC), and the packed kernel's cost grows well under linearly with rows (SmolLM2, 10 layers: 1 row 17 ms,
8 rows 43 ms), so when the node processes share a machine's cores, fewer, fuller frames give more tokens per second:
on 2 cores with 3 local nodes, 8 streams decode at 63 tok/s in one frame, 51 in two, 34 in three (median of 3,
load average 6). ``local_depth`` therefore caps the depth of local node processes at the cores they can use at once.

The ``PipelineClient`` lives on its own event loop thread (``LoopThread``); a step is handed to it with
``run_coroutine_threadsafe`` and awaited from the HTTP server's loop, so neither loop ever waits on the other.
Only the last stage samples; the rows carry their sampling parameters and seed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.pipeline.local import LocalPipeline, StageOptions
from coordinator.scheduler import RowWork

if TYPE_CHECKING:
    import torch

    from llama_shard.quant import QuantMode

log = logging.getLogger(__name__)


def local_depth(n_nodes: int, threads: int) -> int:
    """Micro-batches in flight for ``n_nodes`` node processes of ``threads`` threads each on this machine: one per
    stage, but no more than the frames its cores can compute at once (see the module docstring)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n_nodes, cores // max(1, threads)))


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
        depth: int | None = None,
    ) -> None:
        self.n_slots, self.max_len = n_slots, max_len
        self.depth = depth or local_depth(n_nodes, threads)
        dtypes = [dtype] * n_nodes if dtype is not None else []
        options = StageOptions(dtypes, slots=n_slots, max_len=max_len, quantize=quantize)
        self.pipeline = LocalPipeline(model, n_nodes, options, threads=threads)
        log.info("pipeline of %d node processes: %s; %d micro-batch(es) in flight", n_nodes,
                 ", ".join(self.pipeline.nodes.addresses), self.depth)  # fmt: skip

    async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
        from node.wire import RowInput

        inputs = [RowInput(r.request_id, r.slot, r.start, r.tokens, r.params, prefill=r.prefill) for r in rows]
        future = asyncio.run_coroutine_threadsafe(self.pipeline.client.forward(inputs), self.pipeline.runner.loop)
        outputs = await asyncio.wrap_future(future)
        tokens = {o.request_id: o.token for o in outputs}
        return [tokens.get(r.request_id) if r.sample else None for r in rows]

    async def close(self) -> None:
        await asyncio.to_thread(self.pipeline.close)
