"""The fused decode step (``llama_shard.fused``: all of a packed stage's layers in one native call) against the
eager packed path it replaces, on a tiny random Llama with grouped-query heads (8 query heads over 2 KV heads).

Both paths round each activation to 8 bits per block of 32 before every matmul (``llama_shard.ggml_linear``), and
that rounding, not the fused code's order of fp32 operations, dominates their distance from exact arithmetic. So
the accuracy check is relative: against the dense fp32 model (the exact path), the fused logits must be about as
close as the eager packed logits are (within 1.25x of the eager error, plus a small absolute slack). A bug in
the fused math (a wrong head mapping, RoPE, norm or residual) moves the logits by far more: the control swaps two
layers' KV caches and must fail that check.

Bitwise checks: a row's fused logits are the same alone or with other rows at other positions, at 1 or 2 threads,
and through two fused stages (a 2-node pipeline's split) as through one. Greedy tokens on a real model are checked
where the packed path always was (``tests/test_quant_smollm2.py``): its decode steps now run fused.
"""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from llama_shard import batching, fused, kernels
from llama_shard.batching import StepRow, run_step
from llama_shard.loading import load_stage, open_source
from llama_shard.model import KVCache, Stage
from llama_shard.quant import QuantMode
from llama_shard.shard import ShardSpec

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the native kernels could not be built")

PROMPT = torch.tensor([5, 17, 99, 3, 250, 41, 7, 8, 123, 64, 300, 2, 11])
FORCED = torch.tensor([9, 44, 181, 6, 73, 210, 15, 99, 31, 5, 260, 140, 77, 20, 1, 66, 7, 3, 301, 48])
SCRATCH = 7
_REAL_BUILD = fused._build


@pytest.fixture(autouse=True)
def _fresh_decoders() -> Iterator[None]:
    fused._decoders.clear()
    yield
    fused._decoders.clear()


@pytest.fixture(scope="module")
def tiny(make_hf_llama: Callable[..., Path]) -> Path:
    return make_hf_llama()


def _stage(path: Path, quantize: QuantMode | None, layers: tuple[int, int] = (0, 4)) -> Stage:
    return load_stage(open_source(path), ShardSpec(layers[0], layers[1], 4), quantize=quantize)


def _teacher_forced(
    stages: list[Stage],
    *,
    fused_on: bool,
    monkeypatch: pytest.MonkeyPatch,
    after_prefill: Callable[[list[KVCache]], None] = lambda caches: None,
    kv_dtype: torch.dtype | None = None,
) -> Tensor:
    """Prefill PROMPT, then decode FORCED one token at a time: the logits of each decode step ``[len(FORCED), V]``.
    ``kv_dtype``: the caches' (default: each stage's ``kv_dtype``, float16 for a packed one)."""
    monkeypatch.setenv("LLAMA_NODE_FUSED", "1" if fused_on else "0")
    fused._decoders.clear()
    caches = [s.new_cache(SCRATCH + 1, batching.cache_len(64), kv_dtype) for s in stages]

    def step(row: StepRow) -> Tensor:
        x: Tensor | None = None
        for stage, cache in zip(stages, caches, strict=True):
            r = row if x is None else StepRow(row.slot, row.start, x, row.prefill)
            (x,) = run_step(stage, cache, [r], SCRATCH)
            assert x is not None
        return x

    step(StepRow(0, 0, PROMPT, prefill=True))
    after_prefill(caches)
    out = [step(StepRow(0, len(PROMPT) + i, t.view(1), prefill=False)) for i, t in enumerate(FORCED)]
    return torch.stack([o.reshape(-1) for o in out])


def _error(x: Tensor, exact: Tensor) -> float:
    return float((x - exact).abs().mean())


@pytest.mark.parametrize("quantize", [QuantMode.int8, QuantMode.int4])
def test_fused_is_as_accurate_as_the_eager_packed_path(
    tiny: Path, quantize: QuantMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    packed, dense = _stage(tiny, quantize), _stage(tiny, None)
    assert packed.kv_dtype == torch.float16 and dense.kv_dtype == torch.float32  # fused and eager: both on f16 KV
    assert fused.decoder(packed, packed.new_cache(1, 64)) is not None
    assert fused.decoder(dense, dense.new_cache(1, 64)) is None  # nn.Linear: the eager path
    exact = _teacher_forced([dense], fused_on=True, monkeypatch=monkeypatch)
    eager = _teacher_forced([packed], fused_on=False, monkeypatch=monkeypatch)
    one = _teacher_forced([packed], fused_on=True, monkeypatch=monkeypatch)
    assert not torch.equal(one, eager)  # the switch really changes the path
    e_eager, e_fused = _error(eager, exact), _error(one, exact)
    assert e_fused <= 1.25 * e_eager + 1e-3, (e_fused, e_eager)


def test_the_portable_code_path_is_as_accurate(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's scalar code (CPUs without AVX2, e.g. Apple's) against the same bound as the AVX2 code."""
    packed, dense = _stage(tiny, QuantMode.int4), _stage(tiny, None)
    exact = _teacher_forced([dense], fused_on=True, monkeypatch=monkeypatch)
    eager = _teacher_forced([packed], fused_on=False, monkeypatch=monkeypatch)
    avx2 = _teacher_forced([packed], fused_on=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(fused, "_build", functools.partial(_REAL_BUILD, scalar=True))
    scalar = _teacher_forced([packed], fused_on=True, monkeypatch=monkeypatch)
    assert not torch.equal(scalar, avx2)  # really the other code
    assert _error(scalar, exact) <= 1.25 * _error(eager, exact) + 1e-3


def test_the_accuracy_check_catches_a_wrong_layer(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: decoding with layers 1 and 2 reading each other's keys and values is far outside the bound."""
    packed, dense = _stage(tiny, QuantMode.int8), _stage(tiny, None)
    exact = _teacher_forced([dense], fused_on=True, monkeypatch=monkeypatch)
    eager = _teacher_forced([packed], fused_on=False, monkeypatch=monkeypatch)

    def swap(caches: list[KVCache]) -> None:
        for kv in (caches[0].k, caches[0].v):
            first = kv[1].clone()
            kv[1].copy_(kv[2])
            kv[2].copy_(first)

    wrong = _teacher_forced([packed], fused_on=True, monkeypatch=monkeypatch, after_prefill=swap)
    assert _error(wrong, exact) > 1.25 * _error(eager, exact) + 1e-3


@torch.inference_mode()
def test_a_row_is_the_same_whatever_else_is_in_the_step(tiny: Path) -> None:
    stage = _stage(tiny, QuantMode.int4)
    cache = stage.new_cache(SCRATCH + 1, batching.cache_len(96))
    lengths = [13, 3, 40, 64, 65, 1]
    gen = torch.Generator().manual_seed(1)
    for slot, n in enumerate(lengths):
        run_step(stage, cache, [StepRow(slot, 0, torch.randint(3, 320, (n,), generator=gen), True)], SCRATCH)
    rows = [StepRow(s, n, torch.tensor([10 + s]), prefill=False) for s, n in enumerate(lengths)]
    assert fused.decoder(stage, cache) is not None
    snapshot = {i: (cache.k[i].clone(), cache.v[i].clone()) for i in cache.k}
    threads = torch.get_num_threads()

    def restore() -> None:
        for i, (k, v) in snapshot.items():
            cache.k[i].copy_(k)
            cache.v[i].copy_(v)

    together = run_step(stage, cache, rows, SCRATCH)
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for j, row in enumerate(rows):
                restore()
                (alone,) = run_step(stage, cache, [row], SCRATCH)
                assert alone is not None and together[j] is not None
                assert torch.equal(alone, together[j]), (n_threads, j)
    finally:
        torch.set_num_threads(threads)


def test_two_fused_stages_equal_one(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _teacher_forced([_stage(tiny, QuantMode.int4)], fused_on=True, monkeypatch=monkeypatch)
    halves = [_stage(tiny, QuantMode.int4, (0, 2)), _stage(tiny, QuantMode.int4, (2, 4))]
    assert torch.equal(_teacher_forced(halves, fused_on=True, monkeypatch=monkeypatch), whole)


def test_a_stage_is_freed_with_its_decoder(tiny: Path) -> None:
    """The decoders are cached per stage: a node that loads another slice must not keep the old one alive."""
    stage = _stage(tiny, QuantMode.int4)
    cache = stage.new_cache(2, 64)
    assert fused.decoder(stage, cache) is not None
    gone = weakref.ref(stage)
    del stage, cache
    gc.collect()
    assert gone() is None and len(fused._decoders) == 0


def test_the_plan_rejects_a_cache_of_another_shape(tiny: Path) -> None:
    stage = _stage(tiny, QuantMode.int4)
    decoder = fused.decoder(stage, stage.new_cache(2, 64))
    assert decoder is not None
    wrong = [torch.zeros(2, 64, 3, 8) for _ in range(4)]  # 3 KV heads of 8, not 2 of 8
    with pytest.raises(RuntimeError, match="caches must be contiguous fp32"):
        decoder.plan.bind_cache(wrong, wrong)


def test_a_token_is_the_same_in_any_chunking_decoded_or_prefilled(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the fused path a prompt's last logits are the same for any chunk size, and a token fed as a decode row
    gives the same bits as fed as a one-token chunk (the eager path keeps these apart: ``llama_shard.batching``)."""
    stage = _stage(tiny, QuantMode.int4)
    monkeypatch.setenv("LLAMA_NODE_FUSED", "1")

    def last_logits(chunk: int, *, decode_last: bool = False) -> Tensor:
        cache = stage.new_cache(2, batching.cache_len(64))
        tokens = PROMPT[:-1] if decode_last else PROMPT
        out = None
        for at in range(0, len(tokens), chunk):
            (out,) = run_step(stage, cache, [StepRow(0, at, tokens[at : at + chunk], prefill=True)], 1)
        if decode_last:
            (out,) = run_step(stage, cache, [StepRow(0, len(tokens), PROMPT[-1:], prefill=False)], 1)
        assert out is not None
        return out

    whole = last_logits(len(PROMPT))
    for chunk in (1, 2, 5, 8):
        assert torch.equal(last_logits(chunk), whole), chunk
    assert torch.equal(last_logits(4, decode_last=True), whole)
