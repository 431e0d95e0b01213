"""A row a node refuses fails alone, through the HTTP API of ``serve --nodes 2``'s cluster (``serve_cluster``: two
REAL local ``join`` processes, a stage each, the scheduler on a ``ClusterExecutor``) and ``create_app``.

A node that refuses one row fails its whole frame (and ends the stream every frame in flight shares), so every
request in that step used to fail with it. Now, when the step's retry fails too, the executor runs each of its rows
alone: the requests that shared the step finish with exactly the greedy tokens they give alone, and only the refused
one fails, with the node's reason.

What can reach a node and be refused by it per row? The API checks ids (``Backend.check_ids``) and lengths
(``Backend.room``, ``Scheduler.submit``) first, and ``serve`` always tells the API the embedding's size, so nothing
that a node refuses for what a row carries gets through from a well-formed model. The closest real case is a
malformed model whose tokenizer lists more ids than its embedding holds, served with that size unknown to the API
(``ModelInfo.vocab_size`` 0): here the embedding holds 288 rows while the tokenizer and the API accept 320 ids, and
an Ollama ``context`` with id 300 reaches the first node, which answers INVALID_ARGUMENT. That is the request's
own fault, so it gets a 400 with the node's words.

``--micro-batches 1`` puts every decode row in each step, so the refused prompt chunk, sent while two requests
decode, shares its step with their rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from coordinator.api.app import create_app
from coordinator.api.backend import ModelInfo
from coordinator.serve_cluster import ServedCluster
from llama_shard.loading import load_tokenizer, open_source
from tests.cluster_helpers import serve_two_local_nodes
from tests.tiny_served import serveable_tiny_llama

EMBED, CONTEXT, CHUNK, SLOTS, N = 288, 64, 16, 4, 40
INFO = ModelInfo("tiny", frozenset(), "/x/tiny", "safetensors", "llama", 1, 1, "F32", CONTEXT, 0.0)  # vocab: unknown
A, B, LATER = list(range(20, 30)), list(range(40, 50)), list(range(60, 70))
BAD = [5, 6, EMBED + 12, 7]  # an id the tokenizer has and the embedding lacks


def _serve(model: Path, state: Path) -> ServedCluster:
    """``serve --nodes 2 --micro-batches 1``'s cluster and backend on ``model`` (2 stages), once it is loaded."""
    assert load_tokenizer(open_source(model)).vocab_size > max(BAD)  # the API lets the id through
    return serve_two_local_nodes(model, INFO, state, micro_batches=1, slots=SLOTS, context=CONTEXT, chunk=CHUNK)


async def _generate(http: httpx.AsyncClient, ids: list[int], n: int = N) -> tuple[int, Any]:
    """Ollama ``/api/generate`` of ``n`` greedy tokens after ``ids``: the status, and the generated ids or the
    error (the reply's ``context`` is the prompt's ids and then the generated ones)."""
    body = {"model": "tiny", "prompt": "", "raw": True, "context": ids, "stream": False,
            "options": {"num_predict": n, "temperature": 0}}  # fmt: skip
    r = await http.post("/api/generate", json=body, timeout=60)
    reply = r.json()
    return r.status_code, reply["context"][len(ids) :] if r.status_code == 200 else reply.get("error")


def test_a_refused_row_fails_alone_and_the_rows_of_its_step_finish(
    make_hf_llama: Callable[..., Path], tmp_path: Path
) -> None:
    # arrange: the tiny model's greedy answers never end early (tiny_served), so each runs N tokens
    served = _serve(serveable_tiny_llama(make_hf_llama(vocab_size=EMBED), tmp_path / "tiny"), tmp_path / "state")
    scheduler = served.backend.scheduler
    assert scheduler is not None
    executor: Any = scheduler.executor

    async def go() -> tuple[dict[str, Any], list[Any], float, dict[str, int]]:
        transport = httpx.ASGITransport(app=create_app(served.backend))
        async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as http:
            try:
                alone = {name: await _generate(http, p) for name, p in (("a", A), ("b", B), ("later", LATER))}
                # act: the refused prompt while a and b decode (each step holds every decode row)
                a, b = (asyncio.ensure_future(_generate(http, p)) for p in (A, B))
                decoded = scheduler.decode_rows
                while scheduler.decode_rows < decoded + 3:  # a's and b's first decode rows: both are decoding
                    await asyncio.sleep(0.002)
                bad = await asyncio.wait_for(_generate(http, BAD, 8), 60)
                answers = [bad, *await asyncio.wait_for(asyncio.gather(a, b), 60)]
                t0 = time.monotonic()
                answers.append(await asyncio.wait_for(_generate(http, LATER), 60))
                return alone, answers, time.monotonic() - t0, scheduler.stats()
            finally:
                await scheduler.stop()  # closes the runtime and stops the local nodes

    try:
        alone, (bad, a, b, later), elapsed, stats = asyncio.run(go())
    finally:
        served.stop_local()  # again (idempotent): when the scheduler never closed the runtime
    assert all(status == 200 and len(ids) == N for status, ids in alone.values()), alone
    # (a) the requests that shared the refused row's step give exactly their answers alone
    assert a == alone["a"] and b == alone["b"], (a, b)
    # (b) the refused request gets a 400 with the node's reason
    assert bad[0] == 400 and f"token id outside the vocabulary of {EMBED}" in bad[1], bad
    # (c) a request after it runs at once, and no slot is left behind
    assert later == alone["later"] and elapsed < 10, (later, elapsed)
    assert stats["free_slots"] == SLOTS and stats["active"] == 0, stats
    # the refused row did share a step: that step was split
    assert executor.split_steps == 1
    # (d) the reopens went to the same stages, whose KV caches a and b kept: nothing was fed to them again (each
    # reopen used to replay their whole history, a frame per prompt chunk and per token, under the retry lock)
    assert executor.replayed_rows == 0, executor.replayed_rows
