"""Batch invariance of the bf16 fallback linears (``DenseLinear``): without the native kernels
(``LLAMA_NODE_KERNELS=0``, no compiler) the GGUF types with no int4 form (Q6_K, Q5_K, Q3_K, Q2_K) are held as bf16
copies. Where torch multiplies them with its reference kernel (``quant.reference_gemm``) a row's bits do not depend
on its batch-mates, so the stage is ``row_invariant`` and decode rows go unpadded; elsewhere it keeps the padding.

Controls show each check can fail: an fp32 ``DenseLinear`` (MKL) changes a row with M, and, declared invariant in
this stage, a decode row's logits with its batch-mates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf_util import hf_to_gguf
from torch import Tensor

from llama_shard import batching, kernels, quant
from llama_shard.batching import StepRow, run_step
from llama_shard.loading import load_stage, open_source
from llama_shard.model import KVCache, Stage
from llama_shard.quant import DenseLinear, QuantLinear, QuantMode
from llama_shard.shard import ShardSpec

pytestmark = pytest.mark.skipif(
    not quant.reference_gemm(torch.device("cpu"), torch.bfloat16),
    reason="oneDNN takes bf16 matmuls on this CPU: DenseLinear is not row-invariant here (the padded path)",
)

SLOTS = 6
SCRATCH = SLOTS
LENGTHS = [5, 17, 40, 64, 65, 3]
PROMPT = [(i * 7919) % 300 + 10 for i in range(37)]


@pytest.fixture(scope="module")
def no_kernels() -> Iterator[None]:
    """As with ``LLAMA_NODE_KERNELS=0``: torch's int4 kernel, and bf16 copies of the K-quants it cannot take."""
    saved = dict(kernels._state)
    kernels._state.clear()
    kernels._state["ok"] = False
    try:
        yield
    finally:
        kernels._state.clear()
        kernels._state.update(saved)


@pytest.fixture(scope="module")
def stage(no_kernels: None, make_hf_llama: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Stage:
    """llama.cpp's Q4_K_M layout in small: Q4_K (int4 planes) with a Q6_K head and ffn_down in layer 1 (bf16)."""
    hf = make_hf_llama(hidden_size=256, intermediate_size=512)  # K-quants need rows of 256
    overrides = {"output.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q6_K, "blk.2.attn_output.weight": Q.Q6_K}
    path = hf_to_gguf(hf, tmp_path_factory.mktemp("dense") / "m.gguf", weight_type=Q.Q4_K, type_overrides=overrides)
    return load_stage(open_source(path), ShardSpec.whole(4), quantize=QuantMode.gguf)


@pytest.fixture(scope="module")
def cache(stage: Stage) -> KVCache:
    cache = stage.new_cache(SLOTS + 1, batching.cache_len(160))
    gen = torch.Generator().manual_seed(0)
    for slot, n in enumerate(LENGTHS):
        prompt = torch.randint(10, 300, (n,), generator=gen)
        run_step(stage, cache, [StepRow(slot, 0, prompt, prefill=True, logits=False)], SCRATCH)
    return cache


def test_the_fallback_stage_holds_bf16_copies_and_is_row_invariant(stage: Stage) -> None:
    dense = [n for n, m in stage.named_modules() if isinstance(m, DenseLinear)]
    assert dense == ["layers.1.feed_forward.w2", "layers.2.attention.wo", "output"]
    assert isinstance(stage.layers["0"].attention.wqkv, QuantLinear)  # Q4_K: int4 planes
    assert batching.row_invariant(stage)


def test_only_the_reference_kernel_is_declared_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(64, 32)
    assert DenseLinear(w).row_invariant
    assert not DenseLinear(w, torch.float32).row_invariant  # MKL
    assert not quant.reference_gemm(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # an AVX-512 / AMX CPU
    assert not DenseLinear(w).row_invariant


@torch.inference_mode()
def test_dense_linears_give_the_same_row_for_any_m(stage: Stage) -> None:
    """The premise: each bf16 linear's row is the same alone as among M = 2..40 rows (past ``ROW_MULTIPLE``, as a
    busy step's decode rows); the control, an fp32 ``DenseLinear`` of the same weight, is not."""
    gen = torch.Generator().manual_seed(1)
    for name, m in stage.named_modules():
        if not isinstance(m, DenseLinear):
            continue
        x = torch.randn(40, m.in_features, generator=gen)
        alone = torch.cat([m(x[i : i + 1]) for i in range(40)])
        for rows in (2, 3, 4, 5, 15, 16, 17, 33, 40):
            assert torch.equal(m(x[:rows]), alone[:rows]), f"{name}, M = {rows}"
    w, x = torch.randn(1536, 576, generator=gen), torch.randn(40, 576, generator=gen)
    fp32 = DenseLinear(w, torch.float32)
    alone = torch.cat([fp32(x[i : i + 1]) for i in range(40)])
    assert not all(torch.equal(fp32(x[:rows]), alone[:rows]) for rows in (2, 3, 4, 5, 16, 17, 40))


def _decode_row(slot: int) -> StepRow:
    return StepRow(slot, LENGTHS[slot], torch.tensor([123 + slot]), prefill=False)


def _step(stage: Stage, cache: KVCache, rows: list[StepRow]) -> list[Tensor]:
    return [o for o in run_step(stage, cache, rows, SCRATCH) if o is not None]


def test_decode_rows_do_not_depend_on_their_step(stage: Stage, cache: KVCache) -> None:
    alone = [_step(stage, cache, [_decode_row(s)])[0] for s in range(SLOTS)]  # rewinds: fed again below
    for n in (2, 3, SLOTS):
        together = _step(stage, cache, [_decode_row(s) for s in range(n)])
        for s in range(n):
            assert torch.equal(together[s], alone[s]), f"slot {s} in a step of {n}"
    order = [4, 0, 5, 2]
    chunk = StepRow(SCRATCH, 0, torch.tensor(PROMPT[:16]), prefill=True, logits=False)
    mixed = run_step(stage, cache, [_decode_row(s) for s in order] + [chunk], SCRATCH)
    for j, s in enumerate(order):
        assert torch.equal(mixed[j], alone[s]), f"slot {s} at {j} in a mixed step"


def test_control_a_linear_that_is_not_invariant_fails_the_decode_check(
    stage: Stage, cache: KVCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decode check above can fail: the same bf16 copies held in fp32 (MKL, whose kernels depend on M) but
    declared invariant change a row's logits with its batch-mates."""
    held = {n: m for n, m in stage.named_modules() if isinstance(m, DenseLinear)}
    monkeypatch.setattr(quant, "reference_gemm", lambda device, dtype: True)
    try:
        for m in held.values():
            m.weight = m.weight.float()
        assert batching.row_invariant(stage)
        alone = [_step(stage, cache, [_decode_row(s)])[0] for s in range(SLOTS)]
        together = _step(stage, cache, [_decode_row(s) for s in range(SLOTS)])
    finally:
        for m in held.values():
            m.weight = m.weight.bfloat16()  # exact: the fp32 copy holds bf16 values
    assert not all(torch.equal(together[s], alone[s]) for s in range(SLOTS))


def _prompt_logits(stage: Stage, cache: KVCache, chunk: int) -> tuple[Tensor, Tensor]:
    last: Tensor | None = None
    for s in range(0, len(PROMPT), chunk):
        (last,) = run_step(stage, cache, [StepRow(0, s, torch.tensor(PROMPT[s : s + chunk]), True)], SCRATCH)
    assert last is not None
    (after,) = run_step(stage, cache, [StepRow(0, len(PROMPT), torch.tensor([int(last.argmax())]), False)], SCRATCH)
    assert after is not None
    return last, after


def test_prompt_logits_do_not_depend_on_chunking(stage: Stage) -> None:
    cache = stage.new_cache(SLOTS + 1, batching.cache_len(128))
    whole, whole_next = _prompt_logits(stage, cache, len(PROMPT))
    for chunk in (1, 5, 16, 20):
        last, after = _prompt_logits(stage, cache, chunk)
        assert torch.equal(last, whole), f"chunks of {chunk}"
        assert torch.equal(after, whole_next), f"the step after chunks of {chunk}"


def test_f_linear_is_what_dense_linear_runs() -> None:
    """The bits checked above are torch's bf16 ``F.linear``'s: ``DenseLinear`` adds no arithmetic of its own."""
    w, x = torch.randn(48, 64), torch.randn(3, 64)
    assert torch.equal(DenseLinear(w)(x), F.linear(x.bfloat16(), w.bfloat16()).float())
