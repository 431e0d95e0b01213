"""Quantised linears (``llama_shard.quant``): exact decoding of GGUF blocks, and the kernel's error bound.

The int4 kernel rounds three things to bf16 (8 significant bits, relative rounding ≤ u = 2^-9): the activation,
each group's scale and zero, and the output. With ``w = Σ_planes (q - 8)·s + z`` and ``|w|_abs = Σ (|q - 8|·s + |z|)``
(the weight before cancellation; rounding s and z separately errs relative to that, not to w), each output obeys

    |y - x·w| ≤ 3u · Σ_k |x_k| |w|_abs[n, k] + u · |y|

(one u for x, one for s or z, one more in case the kernel rounds the dequantised weight to bf16 before its fp32
multiply-add; then u for the output). That is the elementwise bound asserted here. Decoding itself is exact: the
planes dequantise to exactly what gguf-py dequantises.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from llama_shard import kernels, quant
from llama_shard.ggml_linear import GGMLLinear
from llama_shard.loading import load_stage, open_source
from llama_shard.model import Stage
from llama_shard.quant import (
    DenseLinear,
    Int4Planes,
    QuantEmbedding,
    QuantLinear,
    QuantMode,
    gguf_planes,
    quantize_planes,
)
from llama_shard.shard import ShardSpec, split_evenly

sys.path.insert(0, str(Path(__file__).parent))
from gguf_util import encode, hf_to_gguf  # noqa: E402

Q = GGMLQuantizationType
U = 2.0**-9  # bf16 unit roundoff
PACKED = [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0, Q.Q5_0, Q.Q5_1]


def _blocks(qtype: GGMLQuantizationType, rows: int = 96, cols: int = 512, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[:, :32] += 3.0  # a group far from zero: Q4_1/Q4_K zeros dominate and cancel against (q - 8)·s
    raw, _ = encode(w, qtype)
    return raw


def _abs_weight(p: Int4Planes) -> torch.Tensor:
    n, k = p.shape
    s = p.scale.repeat_interleave(quant.GROUP, dim=1)
    z = p.zero.repeat_interleave(quant.GROUP, dim=1)
    return ((p.q.float() - 8).abs() * s.abs() + z.abs()).view(n, p.planes, k).sum(1)


def _assert_within_kernel_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, w_abs: torch.Tensor) -> None:
    exact = x.double() @ w.double().t()
    bound = 3 * U * (x.double().abs() @ w_abs.double().t()) + U * exact.abs() + 1e-6
    excess = ((y.double() - exact).abs() - bound).max().item()
    assert excess <= 0, f"an output is {excess:.3g} beyond the bf16 rounding bound"


@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_planes_decode_exactly_what_gguf_py_dequantises(qtype: GGMLQuantizationType) -> None:
    raw = _blocks(qtype)
    planes = gguf_planes(torch.from_numpy(raw), qtype, 512)
    assert torch.equal(planes.dequantize(), torch.from_numpy(dequantize(raw, qtype)))


@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_quant_linear_is_within_the_bf16_bound_of_the_dequantised_weight(qtype: GGMLQuantizationType) -> None:
    raw = _blocks(qtype)
    planes = gguf_planes(torch.from_numpy(raw), qtype, 512)
    w = torch.from_numpy(dequantize(raw, qtype))
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    y = QuantLinear.from_planes(planes)(x)
    assert y.dtype == torch.float32 and y.shape == (5, 96)
    _assert_within_kernel_bound(y, x, w, _abs_weight(planes))
    # and as a whole: a few bf16 roundings, far below the quantisation error itself (~5% for 4 bits)
    assert ((y - x @ w.t()).norm() / (x @ w.t()).norm()).item() < 4 * U


def test_numpy_packing_matches_torch_op_when_used() -> None:
    q = torch.randint(0, 16, (160, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ours = quant._pack_cpu(q)
    assert torch.equal(ours, torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


def test_fused_planes_equal_separate_linears() -> None:
    a, b = (gguf_planes(torch.from_numpy(_blocks(Q.Q4_1, rows=r, seed=r)), Q.Q4_1, 512) for r in (64, 32))
    x = torch.randn(3, 512)
    fused = QuantLinear.from_planes(Int4Planes.cat([a, b]))(x)
    assert torch.equal(fused, torch.cat([QuantLinear.from_planes(a)(x), QuantLinear.from_planes(b)(x)], dim=-1))


@pytest.mark.parametrize("bits", [4, 8])
def test_load_time_quantisation_error_is_half_a_step(bits: int) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    planes = quantize_planes(w, bits)
    w_hat = planes.dequantize()
    groups = w.view(64, -1, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15 if bits == 4 else groups.abs().amax(-1) / 127
    err = (w_hat - w).abs().view(64, -1, 32).amax(-1)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    x = torch.randn(4, 256)
    _assert_within_kernel_bound(QuantLinear.from_planes(planes)(x), x, w_hat, _abs_weight(planes))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q6_K], ids=lambda q: q.name)
def test_embedding_dequantises_exactly_the_looked_up_rows(qtype: GGMLQuantizationType) -> None:
    raw = _blocks(qtype, rows=40, cols=256)
    emb = QuantEmbedding(torch.from_numpy(raw), qtype, 256)
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    expected = torch.from_numpy(dequantize(raw, qtype)).view(40, 256)[ids]
    assert torch.equal(emb(ids), expected)


# --- whole stages from tiny GGUF files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(make_hf_llama: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    made: dict[tuple[GGMLQuantizationType, bool, str], Path] = {}

    def make(qtype: GGMLQuantizationType, tied: bool = False, head: str = "") -> Path:
        key = (qtype, tied, head)
        if key not in made:
            big = qtype == Q.Q4_K or head  # K-quants need rows of 256
            dims = {"hidden_size": 256, "intermediate_size": 512} if big else {}
            hf = make_hf_llama(tie_word_embeddings=tied, **dims)
            overrides = {head: Q.Q6_K} if head else None
            made[key] = hf_to_gguf(
                hf, tmp_path_factory.mktemp("q") / "m.gguf", weight_type=qtype, type_overrides=overrides
            )
        return made[key]

    return make


@pytest.fixture(params=["ggml", "int4pack"])
def packed_type(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type[torch.nn.Module]:
    """Both CPU paths of ``--dtype auto``: the native kernel over raw blocks (``GGMLLinear``) and the fallback
    without it (``QuantLinear``, torch's int4 kernel); returns the linear type the stage is expected to hold."""
    if request.param == "int4pack":
        monkeypatch.setattr(kernels, "available", lambda: False)
        return QuantLinear
    if not kernels.available():
        pytest.skip("the native kernel could not be built here")
    return GGMLLinear


def _prefill(stages: list[Stage], ids: torch.Tensor) -> torch.Tensor:
    h = ids
    for stage in stages:
        batch = stage.batch(torch.tensor([0]), torch.tensor([0]), ids.shape[1])
        h = stage(h, batch, stage.new_cache(1, 128))
    return h


IDS = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    ("qtype", "tied", "head"),
    [
        (Q.Q4_0, False, ""),
        (Q.Q4_1, True, ""),
        (Q.Q8_0, True, ""),
        (Q.Q4_K, False, ""),
        (Q.Q4_1, False, "output.weight"),
    ],
    ids=["q4_0", "q4_1_tied", "q8_0_tied", "q4_k", "q4_1_q6k_head"],
)
def test_quantised_stage_tracks_the_exact_fp32_stage(
    gguf_file: Callable[..., Path], qtype: GGMLQuantizationType, tied: bool, head: str, packed_type: type
) -> None:
    source = open_source(gguf_file(qtype, tied, head))
    exact = load_stage(source, ShardSpec.whole(4))
    packed = load_stage(source, ShardSpec.whole(4), quantize=QuantMode.gguf)
    layer = packed.layers["0"]
    assert isinstance(layer.get_submodule("attention.wqkv"), packed_type)
    assert isinstance(layer.get_submodule("feed_forward.w13"), packed_type)
    assert not hasattr(layer.get_submodule("attention"), "wq") and isinstance(packed.tok_embeddings, QuantEmbedding)
    assert isinstance(packed.output, DenseLinear if head and packed_type is QuantLinear else packed_type)
    with torch.inference_mode():
        a, b = _prefill([exact], IDS), _prefill([packed], IDS)
    # QuantLinear: 17 linears in sequence, each within a few bf16 roundings (≤ 4u ≈ 0.8% relative, see above): errors of
    # independent roundings add in quadrature, so ~sqrt(17)·4u ≈ 3% is the envelope; measured ≈ 0.4-0.7%.
    rel = ((a - b).norm() / a.norm()).item()
    # The native kernel (GGMLLinear) instead rounds each activation to 8 bits per block of 32, as llama.cpp does:
    # an error uniform in ±amax/254, i.e. an rms of amax/(127·√12) ≈ 2.3σ/440 ≈ 0.5% of a Gaussian block's σ
    # per linear, so √17 · 0.5% ≈ 2.1% for the whole stage, inside the same 3%; measured ≈ 0.7-1.1%.
    assert rel < 0.03, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_quantised_chained_stages_equal_the_whole_quantised_model(
    gguf_file: Callable[..., Path], packed_type: type
) -> None:
    source = open_source(gguf_file(Q.Q4_1, True))
    whole = load_stage(source, ShardSpec.whole(4), quantize=QuantMode.gguf)
    chain = [load_stage(source, spec, quantize=QuantMode.gguf) for spec in split_evenly(4, 2)]
    with torch.inference_mode():
        assert torch.equal(_prefill([whole], IDS), _prefill(chain, IDS))


def test_quantised_stage_keeps_no_float_matrix(gguf_file: Callable[..., Path], packed_type: type) -> None:
    stage = load_stage(open_source(gguf_file(Q.Q4_0, True)), ShardSpec.whole(4), quantize=QuantMode.gguf)
    floats = {n: t.shape for n, t in stage.state_dict().items() if t.is_floating_point() and t.dim() == 2}
    assert floats == {}, floats  # only 1-D norms are float; every matrix is packed codes (+ small scale tables)


@pytest.mark.parametrize("mode", [QuantMode.int4, QuantMode.int8])
def test_safetensors_quantised_at_load(make_hf_llama: Callable[..., Path], mode: QuantMode, packed_type: type) -> None:
    source = open_source(make_hf_llama())
    exact = load_stage(source, ShardSpec.whole(4))
    packed = load_stage(source, ShardSpec.whole(4), quantize=mode)
    assert isinstance(packed.layers["3"].get_submodule("feed_forward.w2"), packed_type)
    with torch.inference_mode():
        a, b = _prefill([exact], IDS), _prefill([packed], IDS)
    rel = ((a - b).norm() / a.norm()).item()
    # int8: a step of |w|max/127 ≈ 2.1σ/127 per weight, an rms error ≈ 0.5% of σ, plus bf16 roundings.
    # int4 (asymmetric, 16 levels over a group's ≈ 4σ range): an rms error of ≈ 4σ/(15·√12) ≈ 8% per weight; the
    # 9 weight matrices a token meets in sequence (2 per attention/FFN pair and layer, plus the head) compound it
    # to ≈ √9 · 8% ≈ 23% on random weights (trained ones quantise better); int8 likewise to ≈ √9 · 0.5% ≈ 1.5%.
    # Measured: int8 ≈ 1.7%, int4 ≈ 18%.
    assert rel < (0.04 if mode == QuantMode.int8 else 0.3), rel
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > (0.999 if mode == QuantMode.int8 else 0.95)


def test_q5_layers_stay_packed_without_the_kernel(
    make_hf_llama: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp's Q4_K_M / Q5_K_M of a model whose rows are not a multiple of 256 (SmolLM2's 576) hold attn_q/k/o and
    the FFN in Q5_0 / Q5_1, attn_v raised to Q8_0 in some layers: without the native kernel Q5_x are two int4 planes
    like Q8_0, not a bf16 copy. wq|wk|wv is one matmul where its types agree, and apart where they do not."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    overrides = {"blk.0.attn_v.weight": Q.Q8_0, "blk.1.attn_q.weight": Q.Q4_0, "blk.1.attn_k.weight": Q.Q4_0}
    path = hf_to_gguf(make_hf_llama(), tmp_path / "m.gguf", weight_type=Q.Q5_0, type_overrides=overrides)
    source = open_source(path)
    exact = load_stage(source, ShardSpec.whole(4))
    packed = load_stage(source, ShardSpec.whole(4), quantize=QuantMode.gguf)
    assert not [n for n, m in packed.named_modules() if isinstance(m, DenseLinear)]
    mixed, plain = packed.layers["0"].attention, packed.layers["2"].attention
    assert mixed.wqkv is None and {type(mixed.wq), type(mixed.wk), type(mixed.wv)} == {QuantLinear}
    assert isinstance(plain.wqkv, QuantLinear) and plain.wqkv.planes == 2
    with torch.inference_mode():
        a, b = _prefill([exact], IDS), _prefill([packed], IDS)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.03, rel  # the bound of test_quantised_stage_tracks_the_exact_fp32_stage (bf16 roundings only)
