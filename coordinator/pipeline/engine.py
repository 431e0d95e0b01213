"""``PipelineEngine``: the sync ``TokenEngine`` over an async ``PipelineClient``, so ``generate()`` runs unchanged.

The client lives on an event loop in a background thread (``LoopThread``); ``step`` submits one frame with one row
and waits for the sampled token. Sampling parameters and seed travel with every row; only the last stage samples.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch

from coordinator.pipeline.client import PipelineClient
from llama_shard.sampling import SamplingParams
from node.wire import RowInput

T = TypeVar("T")
_request_ids = itertools.count(1)


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` calls a coroutine on it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pipeline-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class PipelineEngine:
    """One request at a time in KV slot ``slot`` of every stage."""

    def __init__(
        self,
        client: PipelineClient,
        runner: LoopThread,
        params: SamplingParams,
        max_len: int,
        *,
        slot: int = 0,
        return_logits: bool = False,
    ) -> None:
        self.client, self.runner, self.params, self.max_len = client, runner, params, max_len
        self.slot, self.return_logits = slot, return_logits
        self.request_id = next(_request_ids)
        self.logits: list[torch.Tensor] = []  # with return_logits: the fp32 logits each step sampled from

    def step(self, tokens: Sequence[int], start: int) -> int:
        # generate() feeds the whole prompt at 0, then one token per step: only the first step is a prompt chunk
        row = RowInput(self.request_id, self.slot, start, tuple(tokens), self.params, self.return_logits, start == 0)
        (out,) = self.runner.run(self.client.forward([row]))
        if out.logits is not None:
            self.logits.append(out.logits)
        return out.token
