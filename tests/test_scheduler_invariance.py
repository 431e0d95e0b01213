"""Batch-invariant numerics, at the level of logits, on the real SmolLM2 weights and kernels: a request's logits row
is bitwise the same whatever shares its step and however its prompt was chunked (see coordinator/local_executor), on
the exact fp32 path (decode rows padded to 16) and the packed ``--dtype auto`` path (rows unpadded, attention row by
row)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from coordinator.local_executor import LocalExecutor
from coordinator.scheduler import RowWork
from llama_shard.quant import QuantMode
from llama_shard.sampling import SamplingParams

P = SamplingParams()


@pytest.fixture(scope="module", params=[None, QuantMode.gguf], ids=["float32", "packed"])
def executor(request: pytest.FixtureRequest) -> LocalExecutor:
    from llama_shard.embedded import smollm2_gguf_path
    from llama_shard.loading import load_stage, open_source
    from llama_shard.shard import ShardSpec

    source = open_source(smollm2_gguf_path())
    stage = load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=request.param)
    return LocalExecutor(stage, n_slots=12, max_len=384)


def prefill(ex: LocalExecutor, slot: int, prompt: Sequence[int], chunk: int) -> torch.Tensor:
    last = None
    for start in range(0, len(prompt), chunk):
        part = tuple(prompt[start : start + chunk])
        last = ex.prefill_logits(RowWork(slot, slot, start, part, True, start + chunk >= len(prompt), P))
    assert last is not None
    return last


PROMPT = [(i * 7919) % 40000 + 100 for i in range(45)]


def test_prompt_logits_do_not_depend_on_chunking(executor: LocalExecutor) -> None:
    whole = prefill(executor, 0, PROMPT, len(PROMPT))
    for chunk in (7, 16, 64):
        assert torch.equal(prefill(executor, 0, PROMPT, chunk), whole), f"chunk {chunk}"


def test_decode_logits_do_not_depend_on_the_batch(executor: LocalExecutor) -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [len(PROMPT), 3, 17, 64, 65, 130, 200, 9, 31, 100, 300, 8]  # key lengths in several 64-buckets
    prefill(executor, 0, PROMPT, 32)
    for slot in range(1, 12):
        prefill(executor, slot, torch.randint(100, 40000, (lengths[slot],), generator=gen).tolist(), 64)

    def row(slot: int) -> RowWork:
        return RowWork(slot, slot, lengths[slot], (1234 + slot,), False, True, P)

    alone = [executor.decode_logits([row(s)])[0] for s in range(12)]
    for size in (2, 3, 4, 7, 8, 12):
        together = executor.decode_logits([row(s) for s in range(size)])
        for s in range(size):
            assert torch.equal(together[s], alone[s]), f"slot {s} in a batch of {size}"
    # order within the step does not matter either, and every row equals its own single-row result
    rows = [row(s) for s in (5, 0, 9)]
    mixed = executor.decode_logits(rows)
    for j, r in enumerate(rows):
        assert torch.equal(mixed[j], executor.decode_logits([r])[0]), f"slot {r.slot}"
