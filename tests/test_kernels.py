"""The native kernel (``llama_shard.kernels.ggml_mm``) and ``GGMLLinear`` over raw GGUF blocks.

Error bound. The kernel rounds each activation row to 8 bits per block ``b`` of 32: ``d_b = amax_b / 127`` and
``q = round(x · 127/amax_b)``, so ``x̂ = d_b q`` and ``|x - x̂| ≤ d_b / 2`` per element (round to nearest, no clamping
since ``|x| ≤ amax_b``; plus a few fp32 roundings of ``127/amax`` and the product, ≤ 2^-21 amax_b). Weight codes
and activation codes then multiply exactly in integers (pair sums of ``maddubs`` stay below 2^15: at most
2 · 128 · 127; the int16 partial sums too: 16 products of 4-bit codes or of Q2_K / Q3_K's codes (at most 7, so
14224 < 2^15), or 8 of 5-bit ones; Q2_K / Q3_K's per-16 scales and mins multiply those sums in int32), each block's
integer sum is scaled by ``d_w · d_x`` in fp32, and the fp32 sum over K has at most ``K/32 + 8`` roundings per term
(8 lanes, pairs of blocks, a horizontal sum of 3 levels, and the scalar sum of the Q4_1/Q5_1/Q2_K/Q4_K/Q5_K min
terms). ggml itself rounds the activation for Q2_K / Q3_K to Q8_K (one d per 256, so a coarser step than ours where
a block of 32 holds no outlier); here every type shares the blocks of 32. So, with
``u = 2^-24`` and ``|w|ₐ = |w - z| + |z|`` (``z``: the min term, that cancels against the codes in those types; 0
for the symmetric ones):

    |y - x·w| ≤ Σ_k (d_b(k)/2 + 2^-21 amax_b(k)) |w_k|  +  (K/32 + 16) · u · Σ_k |x̂_k| |w|ₐ_k

The first term is the activation rounding (llama.cpp's own), the second the fp32 arithmetic. A sharper check pins
the arithmetic itself: against ``x̂ · w`` (x̂ recomputed here exactly as the kernel does) only the second term is
allowed, so the kernel really computes llama.cpp's Q8 dot product, not merely something close to ``x · w``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llama_shard import batching, fused, kernels
from llama_shard.ggml_linear import (
    KERNEL_TYPES,
    X8,
    X8_TYPES,
    GGMLLinear,
    GGMLStack,
    TiedEmbedding,
    quantize_blocks,
    repack_x8,
    rows_x8,
    unrepack_x8,
)
from llama_shard.loading import load_stage, open_source
from llama_shard.model import Stage
from llama_shard.quant import DenseLinear, QuantEmbedding, QuantLinear, QuantMode
from llama_shard.shard import ShardSpec

sys.path.insert(0, str(Path(__file__).parent))
from ggml_reference import random_blocks, reference_dequantize  # noqa: E402
from gguf_util import hf_to_gguf  # noqa: E402

Q = GGMLQuantizationType
TYPES = sorted(KERNEL_TYPES, key=int)
U = 2.0**-24
# zeroing the codes (and fifth bits) leaves the min term z
CODE_BYTES = {
    Q.Q4_1: slice(4, 20),
    Q.Q5_1: slice(4, 24),
    Q.Q4_K: slice(16, 144),
    Q.Q5_K: slice(16, 176),
    Q.Q2_K: slice(16, 80),
}

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="the native kernel is disabled (LLAMA_NODE_KERNELS=0) or could not be built"
)
PATHS = [pytest.param(False, id="avx2"), pytest.param(True, id="scalar")]


def _case(qtype: GGMLQuantizationType, rows: int = 48, cols: int = 512, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random valid blocks ``[rows, bytes]``, their reference dequantisation ``w`` and ``|w|ₐ``."""
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(seed))
    w = reference_dequantize(raw, qtype, (rows, cols))
    z = np.zeros_like(w)
    if qtype in CODE_BYTES:
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]).copy()
        blocks[:, CODE_BYTES[qtype]] = 0
        z = reference_dequantize(blocks, qtype, (rows, cols))
    w_abs = np.abs(w - z) + np.abs(z)
    return torch.from_numpy(raw).view(rows, -1), torch.from_numpy(w), torch.from_numpy(w_abs)


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation rounding, recomputed: ``x̂`` and ``amax`` per element's block."""
    g = x.view(x.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    x_hat = (g * inv).round() * (amax / 127)  # torch.round: half to even, as the kernel
    return x_hat.view_as(x), amax.expand_as(g).reshape(x.shape)


def _activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 5] *= 30  # an outlier channel, as real hidden states have: its blocks get a coarse step
    return x


@needs_kernel
@pytest.mark.parametrize("scalar", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_kernel_is_within_the_q8_activation_bound(qtype: GGMLQuantizationType, scalar: bool) -> None:
    raw, w, w_abs = _case(qtype)
    x = _activations(7, 512)
    y = kernels.ggml_mm(x, raw, int(qtype), 512, scalar=scalar).double()
    x_hat, amax = _q8(x)
    arithmetic = (512 / 32 + 16) * U * (x_hat.double().abs() @ w_abs.double().t())
    rounding = (amax.double() / 254 + 2.0**-21 * amax.double()) @ w.double().abs().t()
    exact = x.double() @ w.double().t()
    assert ((y - exact).abs() - rounding - arithmetic).max() <= 0
    # the sharper check: exactly llama.cpp's dot product of the rounded activation, up to fp32 summation
    assert ((y - x_hat.double() @ w.double().t()).abs() - arithmetic).max() <= 0
    # and the bound is not loose by orders of magnitude: the rounding term is what the error is made of
    assert (y - exact).abs().max() > 0.05 * rounding.max()


@needs_kernel
@pytest.mark.parametrize("scalar", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_a_row_is_bitwise_the_same_for_any_m_and_thread_count(qtype: GGMLQuantizationType, scalar: bool) -> None:
    raw, _, _ = _case(qtype, rows=40)
    x = _activations(16, 512, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = kernels.ggml_mm(x, raw, int(qtype), 512, scalar=scalar)
        for m in range(1, 16):
            assert torch.equal(kernels.ggml_mm(x[:m], raw, int(qtype), 512, scalar=scalar), full[:m]), m
            assert torch.equal(kernels.ggml_mm(x[m:], raw, int(qtype), 512, scalar=scalar), full[m:]), m
        torch.set_num_threads(1)
        assert torch.equal(kernels.ggml_mm(x, raw, int(qtype), 512, scalar=scalar), full)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("scalar", PATHS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_an_output_is_bitwise_the_same_for_any_slice_of_weight_rows(qtype: GGMLQuantizationType, scalar: bool) -> None:
    """The kernel runs groups of 8 weight rows per pass (a short last group repeats its last row): where a row falls
    in its group, and whether its group is short, changes none of its bits."""
    raw, _, _ = _case(qtype, rows=45)
    x = _activations(5, 512, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = kernels.ggml_mm(x, raw, int(qtype), 512, scalar=scalar)
        for a, b in [(0, 1), (3, 4), (1, 9), (7, 23), (13, 45), (44, 45), (8, 16), (5, 40)]:
            part = kernels.ggml_mm(x, raw[a:b].contiguous(), int(qtype), 512, scalar=scalar)
            assert torch.equal(part, full[:, a:b]), (a, b)
        torch.set_num_threads(1)
        assert torch.equal(kernels.ggml_mm(x, raw, int(qtype), 512, scalar=scalar), full)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("scalar", PATHS)
@pytest.mark.parametrize("qtype", sorted(X8_TYPES, key=int), ids=lambda q: q.name)
def test_the_repacked_layout_gives_the_raw_layouts_bits(qtype: GGMLQuantizationType, scalar: bool) -> None:
    """Q4_0 / Q4_1 / Q8_0 repacked 8 rows at a time (5 full groups; the 5 rows after them stay raw): every output
    bitwise the raw kernel's, for any M and thread count; rows read back from the layout are the raw rows."""
    raw, _, _ = _case(qtype, rows=45)
    packed = repack_x8(raw, qtype)
    assert packed.shape == raw.shape and not torch.equal(packed, raw) and torch.equal(packed[40:], raw[40:])
    assert torch.equal(unrepack_x8(packed, qtype), raw)
    ids = torch.tensor([44, 0, 7, 8, 39, 40, 21, 21])
    assert torch.equal(rows_x8(packed, qtype, ids), raw[ids])
    x = _activations(16, 512, seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = kernels.ggml_mm(x, raw, int(qtype), 512, scalar=scalar)
        kind = int(qtype) | X8
        for m in range(1, 17):
            assert torch.equal(kernels.ggml_mm(x[:m], packed, kind, 512, scalar=scalar), full[:m]), m
            assert torch.equal(kernels.ggml_mm(x[16 - m :], packed, kind, 512, scalar=scalar), full[16 - m :]), m
        torch.set_num_threads(1)
        assert torch.equal(kernels.ggml_mm(x, packed, kind, 512, scalar=scalar), full)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("qtype", sorted(X8_TYPES, key=int), ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [8, 13, 40, 45])
@pytest.mark.parametrize("piece", [4096, 16])
def test_repack_x8_is_the_byte_order_its_docstring_defines(
    qtype: GGMLQuantizationType, rows: int, piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``repack_x8``'s strided copies give exactly the per-byte order of ``_x8_index`` (no kernel needed), also for
    blocks that are a view at an odd byte offset (rows of a file mapping or of a fused stack), and when it works
    ``piece`` rows at a time (16: 40 and 45 rows take three pieces, the last one short)."""
    from llama_shard import ggml_linear
    from llama_shard.ggml_linear import _x8_index

    monkeypatch.setattr(ggml_linear, "REPACK_ROWS", piece)

    width = 6 * GGML_QUANT_SIZES[qtype][1]  # 6 blocks per row
    base = torch.randint(0, 256, (rows + 1, width + 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for raw in (base[:rows, :width].contiguous(), base[1:, 1:]):  # contiguous; a strided view at offset width + 2
        full = rows // 8 * 8
        grouped = raw[:full].reshape(full // 8, 8 * width).index_select(1, _x8_index(qtype, 6)).view(full, width)
        packed = repack_x8(raw, qtype)
        assert torch.equal(packed, torch.cat((grouped, raw[full:])))
        assert torch.equal(unrepack_x8(packed, qtype), raw)


@needs_kernel
@pytest.mark.parametrize("qtype", sorted(X8_TYPES, key=int), ids=lambda q: q.name)
def test_the_repacked_kernels_give_the_raw_bits_across_threads(qtype: GGMLQuantizationType) -> None:
    """51 full groups (the AVX2 driver's pairs of groups, one left alone, split between threads) and 3 raw rows:
    every M from 1 to 9 (tiles of 4, 2 and 1 rows; 8 or 16 weight rows per pass), 1 and 2 threads, the raw bits."""
    raw, _, _ = _case(qtype, rows=8 * 51 + 3, seed=7)
    packed, kind = repack_x8(raw, qtype), int(qtype) | X8
    x = _activations(9, 512, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        full = kernels.ggml_mm(x, raw, int(qtype), 512)
        for n in (1, 2):
            torch.set_num_threads(n)
            for m in range(1, 10):
                assert torch.equal(kernels.ggml_mm(x[:m], packed, kind, 512), full[:m]), (n, m)
                assert torch.equal(kernels.ggml_mm(x[9 - m :], packed, kind, 512), full[9 - m :]), (n, m)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_a_repacked_linear_computes_and_dequantises_as_the_raw_one() -> None:
    raw, w, _ = _case(Q.Q4_1, rows=20, cols=256)
    x = _activations(3, 256)
    linear, plain = GGMLLinear(raw.clone(), Q.Q4_1, 256), GGMLLinear(raw.clone(), Q.Q4_1, 256, repack=False)
    assert linear.repacked == kernels.has_avx2() and not plain.repacked
    assert torch.equal(linear.dequantize(), w) and torch.equal(linear.raw_blocks(), raw)
    y = linear(x)
    assert torch.equal(y, plain(x))
    ids = torch.tensor([[3, 19], [0, 8]])
    assert torch.equal(TiedEmbedding(linear)(ids), TiedEmbedding(plain)(ids))  # a tied head's rows in either layout
    assert torch.equal(TiedEmbedding(plain)(ids), QuantEmbedding(raw, Q.Q4_1, 256)(ids))
    assert linear.unrepack_() is linear and not linear.repacked and torch.equal(linear.blocks, raw)
    assert torch.equal(linear(x), y)


@needs_kernel
def test_odd_block_counts_and_rows_split_across_threads() -> None:
    """K = 160 (five blocks: the kernel's pairs plus a single one) and N not a multiple of anything."""
    raw, w, _ = _case(Q.Q4_0, rows=37, cols=160)
    x = _activations(3, 160)
    y = GGMLLinear(raw, Q.Q4_0, 160)(x)
    x_hat, _ = _q8(x)
    torch.testing.assert_close(y.double(), x_hat.double() @ w.double().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantise_equals_the_ggml_reference(qtype: GGMLQuantizationType) -> None:
    raw, w, _ = _case(qtype, rows=8, cols=256)
    assert torch.equal(GGMLLinear(raw, qtype, 256).dequantize(), w)


@needs_kernel
def test_fused_rows_equal_separate_linears() -> None:
    (a, _, _), (b, _, _) = _case(Q.Q4_1, rows=64, seed=3), _case(Q.Q4_1, rows=32, seed=4)
    x = _activations(3, 512)
    fused = GGMLLinear(torch.cat([a, b]), Q.Q4_1, 512)(x)
    assert torch.equal(fused, torch.cat([GGMLLinear(a, Q.Q4_1, 512)(x), GGMLLinear(b, Q.Q4_1, 512)(x)], dim=-1))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_blocks_are_within_half_a_step(bits: int) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    blocks, qtype = quantize_blocks(w, bits)
    assert qtype == (Q.Q4_1 if bits == 4 else Q.Q8_0)
    w_hat = torch.from_numpy(reference_dequantize(blocks.numpy(), qtype, (64, 256)))
    g = w.view(64, -1, 32)
    step = (g.amax(-1) - g.amin(-1)) / 15 if bits == 4 else g.abs().amax(-1) / 127
    err = (w_hat - w).abs().view(64, -1, 32).amax(-1)
    # half a step, plus the fp16 rounding of the stored scale (2^-11 relative) over up to 15 (127) steps
    assert (err <= step * (0.5 + (15 if bits == 4 else 127) * 2.0**-11) + 1e-7).all()


def test_the_fallback_is_used_without_the_kernel(make_hf_llama: Callable[..., Path]) -> None:
    """``LLAMA_NODE_KERNELS=0`` (as where no compiler is found): torch's int4 kernel, the same stage otherwise."""
    code = (
        "import sys; from llama_shard import kernels; from llama_shard.loading import load_stage, open_source;"
        "from llama_shard.quant import QuantMode, QuantLinear; from llama_shard.shard import ShardSpec;"
        "s = load_stage(open_source(sys.argv[1]), ShardSpec.whole(4), quantize=QuantMode.int4);"
        "assert not kernels.available(); assert isinstance(s.layers['0'].attention.wqkv, QuantLinear); print('ok')"
    )
    env = {**os.environ, "LLAMA_NODE_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(make_hf_llama())], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_failed_build_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv("LLAMA_NODE_KERNELS", raising=False)

    def fail() -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_build", fail)
    assert not kernels.available() and not kernels.available()
    assert [r.levelname for r in caplog.records if "could not build" in r.message] == ["WARNING"]


@needs_kernel
def test_smollm2_tied_head_is_held_once() -> None:
    from llama_shard.embedded import smollm2_gguf_path

    source = open_source(smollm2_gguf_path())
    stage = load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=QuantMode.gguf)
    assert isinstance(stage.output, GGMLLinear) and stage.output.qtype == Q.Q8_0
    assert isinstance(stage.tok_embeddings, QuantEmbedding)
    assert stage.tok_embeddings.raw.data_ptr() == stage.output.blocks.data_ptr()
    linears = [m for m in stage.modules() if isinstance(m, GGMLLinear | QuantLinear)]
    assert all(isinstance(m, GGMLLinear) for m in linears)
    file_bytes = sum(source.gguf.blocks(name)[0].numel() for name in source.gguf.tensor_names)
    held = sum(m.blocks.numel() for m in linears)
    norms = sum(t.numel() * 4 for n, t in stage.state_dict().items() if n.endswith("norm.weight"))
    assert held + norms == file_bytes  # the file's bytes (F32 norms, quantised blocks), none repacked or duplicated


# the type of every matrix, and single tensors of another: q5_k_m as llama.cpp mixes in Q6_K (head, some ffn_down);
# q3_k_m and q2_k as llama.cpp's mixes (the head Q6_K, ffn_down and attn_output a type or two up), except attn_v,
# which llama.cpp also raises but that makes wqkv a stack of two types (see test_a_mixed_type_wqkv_... below)
Q5_FILES = {
    "q5_0": (Q.Q5_0, {}),
    "q5_1": (Q.Q5_1, {}),
    "q5_k_m": (Q.Q5_K, {"output.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q6_K}),
}
Q23_FILES = {
    "q3_k_m": (Q.Q3_K, {"output.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q4_K, "blk.2.attn_output.weight": Q.Q4_K}),
    "q2_k": (Q.Q2_K, {"output.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q3_K, "blk.2.attn_output.weight": Q.Q3_K}),
}


def _logits(stage: Stage, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return stage(ids, stage.batch(torch.tensor([0]), torch.tensor([0]), ids.shape[1]), stage.new_cache(1, 64))


@needs_kernel
@pytest.mark.parametrize("name", [*Q5_FILES, *Q23_FILES])
def test_a_low_bit_gguf_stays_packed_and_tracks_the_fp32_model(
    make_hf_llama: Callable[..., Path], tmp_path: Path, name: str
) -> None:
    """A Q5_0 / Q5_1 / Q5_K / Q3_K / Q2_K file loads with every linear as the file's blocks (no bf16
    ``DenseLinear``), and its logits stay close to the exact path's (the same file, dequantised to fp32): the error
    budget of ``tests/test_quant.py`` for the 8-bit activation rounding of 17 linears in sequence (≈ 2% expected, 3%
    allowed). The weights' own bits do not enter it: both paths hold the same weights; the activation's rounding error
    relative to a dot product is about 1/127/√3 per linear, whatever the weight type."""
    qtype, overrides = {**Q5_FILES, **Q23_FILES}[name]
    hf = make_hf_llama(hidden_size=256, intermediate_size=512)  # K-quants need rows of 256
    source = open_source(hf_to_gguf(hf, tmp_path / "m.gguf", weight_type=qtype, type_overrides=overrides))
    exact = load_stage(source, ShardSpec.whole(4))
    packed = load_stage(source, ShardSpec.whole(4), quantize=QuantMode.gguf)
    linears = {n: m for n, m in packed.named_modules() if isinstance(m, GGMLLinear | QuantLinear | DenseLinear)}
    assert len(linears) == 4 * 4 + 1 and all(isinstance(m, GGMLLinear) for m in linears.values()), linears
    types = {n: m.qtype for n, m in linears.items() if isinstance(m, GGMLLinear)}
    assert types["output"] == overrides.get("output.weight", qtype)
    assert types["layers.1.feed_forward.w2"] == overrides.get("blk.1.ffn_down.weight", qtype)
    assert {types[f"layers.0.{m}"] for m in ("attention.wqkv", "attention.wo", "feed_forward.w13")} == {qtype}
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(7))
    a, b = _logits(exact, ids), _logits(packed, ids)
    assert ((a - b).norm() / a.norm()).item() < 0.03
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    # the serving path: the whole stage in one native call (``llama_shard.fused``) takes the Q5 blocks too
    cache = packed.new_cache(2, batching.cache_len(64))
    assert fused.decoder(packed, cache) is not None
    (last,) = batching.run_step(packed, cache, [batching.StepRow(0, 0, ids[0], prefill=True)], 1)
    assert last is not None
    assert ((last.reshape(-1) - a[0, -1]).norm() / a[0, -1].norm()).item() < 0.03


@needs_kernel
def test_a_mixed_type_wqkv_stays_packed_and_fused(make_hf_llama: Callable[..., Path], tmp_path: Path) -> None:
    """llama.cpp's Q3_K_M and Q2_K raise attn_v (to Q5_K / Q4_K in the first layers) above attn_q / attn_k: that layer
    holds wq|wk and wv as two packed parts of one ``GGMLStack`` and stays close to the exact path, and the stage still
    decodes through the fused plan (``tests/test_fused_mixed.py`` compares it with the eager path)."""
    hf = make_hf_llama(hidden_size=256, intermediate_size=512)
    overrides = {"output.weight": Q.Q6_K, "blk.0.attn_v.weight": Q.Q5_K, "blk.1.attn_v.weight": Q.Q4_K}
    source = open_source(hf_to_gguf(hf, tmp_path / "m.gguf", weight_type=Q.Q3_K, type_overrides=overrides))
    exact = load_stage(source, ShardSpec.whole(4))
    packed = load_stage(source, ShardSpec.whole(4), quantize=QuantMode.gguf)
    linears = {n: m for n, m in packed.named_modules() if isinstance(m, GGMLLinear | QuantLinear | DenseLinear)}
    assert len(linears) == 4 * 4 + 1 + 2 and all(isinstance(m, GGMLLinear) for m in linears.values()), linears
    wqkv = packed.layers["0"].attention.wqkv
    assert isinstance(wqkv, GGMLStack) and [p.qtype for p in wqkv.parts] == [Q.Q3_K, Q.Q5_K]
    assert packed.layers["2"].attention.wqkv.qtype == Q.Q3_K
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(7))
    a, b = _logits(exact, ids), _logits(packed, ids)
    assert ((a - b).norm() / a.norm()).item() < 0.03
    cache = packed.new_cache(2, batching.cache_len(64))
    assert fused.decoder(packed, cache) is not None
    (last,) = batching.run_step(packed, cache, [batching.StepRow(0, 0, ids[0], prefill=True)], 1)
    assert last is not None
    assert ((last.reshape(-1) - a[0, -1]).norm() / a[0, -1].norm()).item() < 0.03
