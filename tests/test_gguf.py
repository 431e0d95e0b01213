"""GGUF: every supported tensor type read right, llama.cpp's conventions undone, bad files refused in one sentence.

The references here do not lean on what they test: each block format is dequantised by a numpy transcription of
ggml's ``dequantize_row_*`` (``ggml-quants.c``), and whole models are compared with transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ggml_reference import (
    random_blocks,
    reference_dequantize,
    write_one_tensor,
)
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf_util import HF_TO_GGUF, encode, hf_to_gguf, permute
from transformers import LlamaForCausalLM

from llama_shard.errors import ModelFormatError
from llama_shard.gguf_file import SUPPORTED_TYPES, GGUFFile
from llama_shard.loading import GGUFSource, load_stage, open_source
from llama_shard.model import Stage
from llama_shard.shard import ShardSpec, split_evenly

Q = GGMLQuantizationType
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # with head_dim 8 and this theta the four frequencies fall in all three llama3 bands (kept, smoothed, scaled)
    "original_max_position_embeddings": 256,
    "rope_theta": 500000.0,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha_tied": {"num_key_value_heads": 8, "tie_word_embeddings": True},
    "llama31": {"rope_parameters": LLAMA3_ROPE},
    "mqa_tied_llama31": {"num_key_value_heads": 1, "tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE},
    "head_dim_16": {"head_dim": 16},  # not dim / n_heads: the GGUF says so in attention.key_length
    # K-quants pack rows in super-blocks of 256 values, so every row length must be a multiple of 256
    "wide": {"hidden_size": 256, "intermediate_size": 512},
}


def test_the_types_under_test_are_the_supported_ones() -> None:
    assert set(TYPES) == set(SUPPORTED_TYPES)


# ---- each type, through the loader -----------------------------------------------------------------------------

ROWS, COLS = 6, 512  # not square, so a transposed read fails; 512 splits into blocks of 32 and of 256


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_loader_reads_random_blocks_as_ggml_defines_them(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    raw = random_blocks(qtype, ROWS, COLS, np.random.default_rng(int(qtype)))
    path = write_one_tensor(tmp_path / "t.gguf", "blk.0.ffn_up.weight", raw, qtype, COLS)
    ours = GGUFFile(path).tensor("blk.0.ffn_up.weight")
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (ROWS, COLS)
    np.testing.assert_array_equal(ours.numpy(), reference_dequantize(raw, qtype, (ROWS, COLS)))


def error_bound(qtype: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    """Largest ``|dequant(quant(x)) - x|`` each type allows, elementwise, for gguf-py's quantisers and ours.

    ``d`` is rounded to f16 (relative error 2^-11), so ``q * d`` moves by up to ``|q| * d * 2^-11`` more.
    """
    eps = 2.0**-11
    if qtype == Q.F32:
        return np.zeros_like(x)
    if qtype == Q.F16:
        return np.abs(x) * eps + 2.0**-24
    if qtype == Q.BF16:  # 8 significant bits, round to nearest
        return np.abs(x) * 2.0**-8
    block = GGML_QUANT_SIZES[qtype][0]
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
        b = x.reshape(-1, block)
        amax = np.abs(b).max(1, keepdims=True)
        if qtype == Q.Q8_0:  # d = amax / 127, nearest of [-127, 127]: half a step
            bound = amax / 127 * (0.5 + 127 * eps)
        else:  # d = -max / 2^(bits-1): the far end clips to 2^(bits-1) - 1, a whole step off
            levels = 8 if qtype == Q.Q4_0 else 16
            bound = amax / levels * (1 + levels * eps)
        return np.broadcast_to(bound * 1.0001, b.shape).reshape(x.shape)
    if qtype in (Q.Q4_1, Q.Q5_1):  # d = (max - min) / levels, q rounded to nearest, plus f16 d and m
        b = x.reshape(-1, block)
        lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
        levels = 15 if qtype == Q.Q4_1 else 31
        d = (hi - lo) / levels
        bound = d * (0.5 + levels * eps) + np.abs(lo) * eps
        return np.broadcast_to(bound * 1.0001, b.shape).reshape(x.shape)
    if qtype == Q.Q6_K:  # ours: sub-block scale >= amax/31 (so no clipping), at most one step d of 127 above it
        sub = np.abs(x.reshape(-1, 16, 16)).max(2)
        d = sub.max(1, keepdims=True) / 31 / 127 * (1 + 2 * eps)
        return np.broadcast_to(((sub / 31 + d) / 2 * 1.0001)[..., None], (len(sub), 16, 16)).reshape(x.shape)
    if qtype == Q.Q3_K:  # ours: the sub-block's extreme maps to -4 at scale amax/4, rounded to a step d of 31
        sub = np.abs(x.reshape(-1, 16, 16)).max(2)  # (-4 can overshoot 2d, the far end clips at 3: a step + 2d)
        d = sub.max(1, keepdims=True) / 4 / 31 * (1 + 2 * eps)
        return np.broadcast_to(((sub / 4 + 2.5 * d) * 1.0001)[..., None], (len(sub), 16, 16)).reshape(x.shape)
    if qtype == Q.Q2_K:  # ours: as Q4_K below, over sub-blocks of 16, 2-bit codes and 4-bit scales and mins
        sub = x.reshape(-1, 16, 16)
        lo = np.minimum(sub.min(2), 0)
        scale = (sub.max(2) - lo) / 3
        d = scale.max(1, keepdims=True) / 15 * (1 + 2 * eps)
        dmin = (-lo).max(1, keepdims=True) / 15 * (1 + 2 * eps)
        return np.broadcast_to((np.maximum(scale + d, dmin) / 2 * 1.0001)[..., None], sub.shape).reshape(x.shape)
    # Q4_K / Q5_K, ours: scale >= range/levels, min offset rounded to a step dmin; clipping costs <= dmin / 2
    levels = 15 if qtype == Q.Q4_K else 31
    sub = x.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(2), 0)
    scale = (sub.max(2) - lo) / levels
    d = scale.max(1, keepdims=True) / 63 * (1 + 2 * eps)
    dmin = (-lo).max(1, keepdims=True) / 63 * (1 + 2 * eps)
    bound = np.maximum(scale + d, dmin) / 2 * 1.0001
    return np.broadcast_to(bound[..., None], sub.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_loader_reads_quantised_weights_within_the_format_error(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(100 + int(qtype))
    x = (rng.standard_normal((ROWS, COLS)) * 0.02).astype(np.float32)
    x[:, ::97] *= 8  # a few outliers per row, as real weights have
    data, _ = encode(x, qtype)
    path = write_one_tensor(tmp_path / "t.gguf", "w.weight", data, qtype, COLS)
    ours = GGUFFile(path).tensor("w.weight").numpy()
    np.testing.assert_array_equal(ours, reference_dequantize(data, qtype, (ROWS, COLS)))
    err = np.abs(ours - x)
    bound = error_bound(qtype, x)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{qtype.name}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    if qtype != Q.F32:
        assert err.max() > 0  # really quantised, so the bound is being tested


# ---- whole models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_of(
    make_hf_llama: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[Path, Path]]:
    """``(variant, weight_type, **convert_kwargs)`` -> ``(hf_dir, gguf_path)``, converted once per module."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(variant: str, weight_type: GGMLQuantizationType = Q.F32, **kwargs: Any) -> tuple[Path, Path]:
        key = f"{variant}-{weight_type.name}-{sorted(kwargs.items())}"
        if key not in made:
            hf_dir = make_hf_llama(**VARIANTS[variant])
            out = tmp_path_factory.mktemp("gguf") / f"{variant}-{weight_type.name}.gguf"
            made[key] = hf_dir, hf_to_gguf(hf_dir, out, weight_type=weight_type, **kwargs)
        return made[key]

    return get


def ids_for(length: int, vocab: int = 320, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def run_chain(stages: list[Stage], ids: torch.Tensor) -> torch.Tensor:
    """``ids [1, T]`` through a chain of stages as one prefill."""
    h = ids
    with torch.no_grad():
        for stage in stages:
            batch = stage.batch(torch.tensor([0]), torch.tensor([0]), ids.shape[1])
            h = stage(h, batch, stage.new_cache(1, 256))
    return h


def hf_logits(hf_dir: Path, ids: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_file_holds_permuted_q_k_and_source_undoes_it(gguf_of: Callable[..., tuple[Path, Path]]) -> None:
    hf_dir, path = gguf_of("gqa")
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    source = GGUFSource(GGUFFile(path))
    for proj, ours, n_rows_heads in (("q_proj", "wq", 8), ("k_proj", "wk", 2)):
        w = hf[f"model.layers.1.self_attn.{proj}.weight"]
        in_file = source.gguf.tensor(f"blk.1.attn_{proj[0]}.weight")
        assert not torch.equal(in_file, w)  # the converter really permuted (the test below is not vacuous) ...
        assert torch.equal(in_file, permute(w, 8, n_rows_heads))
        assert torch.equal(source.get(f"layers.1.attention.{ours}.weight"), w)  # ... and the source undid it


@pytest.mark.parametrize("variant", ["gqa", "mha_tied", "mqa_tied_llama31", "head_dim_16"])
def test_f32_gguf_logits_match_transformers(gguf_of: Callable[..., tuple[Path, Path]], variant: str) -> None:
    hf_dir, path = gguf_of(variant)
    source = open_source(path)
    assert source.config.tie_embeddings == ("tied" in variant)
    ids = ids_for(200)
    expected = hf_logits(hf_dir, ids)
    ours = run_chain([load_stage(source, ShardSpec.whole(4))], ids)
    assert ours.shape == expected.shape
    assert max_diff(ours, expected) < (1e-4 if "llama31" in variant else 1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_chained_gguf_stages_equal_the_whole_model_bit_for_bit(
    gguf_of: Callable[..., tuple[Path, Path]], k: int
) -> None:
    _, path = gguf_of("mqa_tied_llama31")
    source = open_source(path)
    ids = ids_for(50, seed=k)
    whole = run_chain([load_stage(source, ShardSpec.whole(4))], ids)
    chain = run_chain([load_stage(source, ShardSpec(0, k, 4)), load_stage(source, ShardSpec(k, 4, 4))], ids)
    assert torch.equal(chain, whole)


def spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every tensor ``GGUFFile.tensor`` reads from now on."""
    reads: list[str] = []
    original = GGUFFile.tensor

    def tensor(self: GGUFFile, name: str) -> torch.Tensor:
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(GGUFFile, "tensor", tensor)
    return reads


def block_names(*layers: int) -> list[str]:
    return [HF_TO_GGUF[k].format(i=i) for i in layers for k in HF_TO_GGUF if "{i}" in k]


@pytest.mark.parametrize(
    ("variant", "head", "extra"),
    [("gqa", "output.weight", []), ("mqa_tied_llama31", "token_embd.weight", ["rope_freqs.weight"])],
)
def test_each_stage_reads_only_its_own_tensors(
    gguf_of: Callable[..., tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    head: str,
    extra: list[str],
) -> None:
    _, path = gguf_of(variant)
    source = open_source(path)
    reads = spy_reads(monkeypatch)
    expected = [
        ["token_embd.weight", *block_names(0)],
        block_names(1, 2),
        [*block_names(3), "output_norm.weight", head],  # a tied head reads the embedding, on the last stage only
    ]
    for spec, names in zip([ShardSpec(0, 1, 4), ShardSpec(1, 3, 4), ShardSpec(3, 4, 4)], expected, strict=True):
        reads.clear()
        load_stage(source, spec)
        assert sorted(reads) == sorted(names + extra), spec


def test_whole_tied_stage_reads_the_embedding_once_and_shares_it(
    gguf_of: Callable[..., tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = gguf_of("mqa_tied_llama31")
    reads = spy_reads(monkeypatch)
    stage = load_stage(open_source(path), ShardSpec.whole(4))
    assert reads.count("token_embd.weight") == 1
    assert stage.output is not None and stage.tok_embeddings is not None
    assert stage.output.weight is stage.tok_embeddings.weight


# ---- Llama 3.1: RoPE scaling as the rope_freqs tensor ----------------------------------------------------------


def test_llama31_gguf_carries_rope_freqs_not_scaling_metadata(gguf_of: Callable[..., tuple[Path, Path]]) -> None:
    hf_dir, path = gguf_of("llama31")
    gguf = GGUFFile(path)
    assert not [key for key in gguf.metadata if "rope.scaling" in key]
    assert "rope_freqs.weight" in gguf.tensor_names
    # llama.cpp's factors divide the plain frequencies into transformers' llama3 ones
    hf_inv_freq = LlamaForCausalLM.from_pretrained(hf_dir).model.rotary_emb.inv_freq
    plain = 1.0 / (500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))  # head_dim 8
    factors = gguf.tensor("rope_freqs.weight")
    assert factors.shape == (4,) and factors[0] == 1.0 and 1.0 < factors[1] < 8.0 and factors[2] == 8.0
    torch.testing.assert_close(plain / factors, hf_inv_freq, rtol=1e-6, atol=0)


def test_llama31_every_stage_applies_rope_freqs(gguf_of: Callable[..., tuple[Path, Path]]) -> None:
    hf_dir, path = gguf_of("llama31")
    source = open_source(path)
    assert source.config.rope_scaling.kind == "default"  # no metadata: only the tensor can scale
    hf_inv_freq = LlamaForCausalLM.from_pretrained(hf_dir).model.rotary_emb.inv_freq
    stages = [load_stage(source, spec) for spec in split_evenly(4, 4)]
    for stage in stages:
        torch.testing.assert_close(stage.inv_freq, hf_inv_freq, rtol=1e-6, atol=0)
    ids = ids_for(200)
    assert max_diff(run_chain(stages, ids), hf_logits(hf_dir, ids)) < 1e-4


def test_llama31_gguf_without_rope_freqs_would_not_match(gguf_of: Callable[..., tuple[Path, Path]]) -> None:
    """Control: the 1e-4 above can tell scaled from unscaled RoPE on this model and prompt."""
    hf_dir, path = gguf_of("llama31", drop=("rope_freqs.weight",))
    ids = ids_for(200)
    ours = run_chain([load_stage(open_source(path), ShardSpec.whole(4))], ids)
    assert max_diff(ours, hf_logits(hf_dir, ids)) > 1e-3  # ten times the tolerance at least


# ---- quantised models ------------------------------------------------------------------------------------------


def dequantised_hf_state(path: Path, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """HF weights from a GGUF's bytes by the reference dequantisers, with llama.cpp's Q/K permutation inverted."""
    to_hf = {v: k for k, v in HF_TO_GGUF.items()}
    state = {}
    for t in GGUFReader(path).tensors:
        if t.name == "rope_freqs.weight":
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        w = torch.from_numpy(reference_dequantize(t.data, Q(t.tensor_type), (-1, shape[-1])).reshape(shape).copy())
        parts = t.name.split(".")
        if parts[0] == "blk":
            hf_name = to_hf[".".join([parts[0], "{i}", *parts[2:]])].format(i=parts[1])
        else:
            hf_name = to_hf[t.name]
        if parts[-2] in ("attn_q", "attn_k"):
            rows = permute(torch.arange(w.shape[0]), n_heads, n_kv_heads if parts[-2] == "attn_k" else n_heads)
            w = w[torch.argsort(rows)]  # file row i is HF row rows[i]
        state[hf_name] = w
    return state


QUANTISED = [("gqa", Q.Q8_0), ("mha_tied", Q.Q8_0), ("wide", Q.Q6_K), ("wide", Q.Q5_K), ("wide", Q.Q4_K)]


@pytest.mark.parametrize(("variant", "qtype"), QUANTISED, ids=lambda v: getattr(v, "name", v))
def test_quantised_gguf_equals_transformers_on_the_dequantised_weights(
    gguf_of: Callable[..., tuple[Path, Path]], variant: str, qtype: GGMLQuantizationType
) -> None:
    hf_dir, path = gguf_of(variant, qtype)
    source = GGUFSource(GGUFFile(path))
    assert source.gguf.tensor_type("blk.0.attn_q.weight") == qtype
    state = dequantised_hf_state(path, source.config.n_heads, source.config.n_kv_heads)
    ids = ids_for(64)
    ours = run_chain([load_stage(source, ShardSpec.whole(4))], ids)
    assert max_diff(ours, hf_logits(hf_dir, ids, state)) < 1e-5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_quantised_logits_stay_close_to_f32(gguf_of: Callable[..., tuple[Path, Path]]) -> None:
    """Logits move by what the weights moved, not more.

    To first order, independent relative errors e_i in the weight matrices move the logits by their quadrature sum
    sqrt(sum e_i^2) times the gains of the paths from each matrix to the output, which are below 1 here (norms and
    residuals; measured: 0.57-0.64 of the sum). So the sum itself is the bound. The e_i are measured on the same
    files, and each type's dequantisation is pinned to the reference above, so this checks the model, not the
    weights. Errors also have to grow as bits drop.
    """
    ids = ids_for(64)
    errors = {}
    for qtype in (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K):
        hf_dir, path = gguf_of("wide", qtype)
        f32 = GGUFSource(GGUFFile(gguf_of("wide")[1]))
        quantised = GGUFSource(GGUFFile(path))
        names = [n for n in quantised.gguf.tensor_names if "norm" not in n]  # the 2-D weights
        weight_errors = [relative_error(quantised.gguf.tensor(n), f32.gguf.tensor(n)) for n in names]
        reference = run_chain([load_stage(f32, ShardSpec.whole(4))], ids)
        ours = run_chain([load_stage(quantised, ShardSpec.whole(4))], ids)
        errors[qtype] = relative_error(ours, reference)
        assert 0 < errors[qtype] <= math.sqrt(sum(e * e for e in weight_errors)), qtype.name
    assert errors[Q.Q8_0] < errors[Q.Q6_K] < errors[Q.Q5_K] < errors[Q.Q4_K], errors


# ---- bad files -------------------------------------------------------------------------------------------------


def load_all(path: Path, spec: ShardSpec | None = None) -> Stage:
    source = open_source(path)
    return load_stage(source, spec or ShardSpec.whole(source.config.n_layers))


def assert_one_sentence(err: pytest.ExceptionInfo[ModelFormatError], *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    for needle in needles:
        assert needle in message, message


def tensor_data_end(path: Path) -> int:
    return max(int(t.data_offset) + int(t.n_bytes) for t in GGUFReader(path).tensors)


@pytest.mark.parametrize("where", ["magic", "header", "metadata", "tensor_infos", "tensor_data", "last_byte"])
def test_truncated_gguf_is_a_model_format_error(
    gguf_of: Callable[..., tuple[Path, Path]], tmp_path: Path, where: str
) -> None:
    _, path = gguf_of("gqa", Q.Q8_0)
    data = path.read_bytes()
    first_data = min(int(t.data_offset) for t in GGUFReader(path).tensors)
    cut = {
        "magic": 3,
        "header": 12,
        "metadata": 200,
        "tensor_infos": first_data - 100,
        "tensor_data": (first_data + len(data)) // 2,
        "last_byte": tensor_data_end(path) - 1,
    }[where]
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:cut])
    with pytest.raises(ModelFormatError) as err:
        load_all(short)
    assert_one_sentence(err, "short.gguf")


@pytest.mark.parametrize("head", [b"", b"GGUF\x03\x00\x00\x00"])
def test_random_bytes_are_a_model_format_error(tmp_path: Path, head: bytes) -> None:
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(head + np.random.default_rng(len(head)).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelFormatError) as err:
        load_all(bad)
    assert_one_sentence(err, "noise.gguf")


def test_unsupported_architecture(gguf_of: Callable[..., tuple[Path, Path]]) -> None:
    _, path = gguf_of("gqa", arch="gpt2")
    assert GGUFFile(path).metadata["general.architecture"] == "gpt2"
    with pytest.raises(ModelFormatError) as err:
        open_source(path)
    assert_one_sentence(err, "unsupported architecture 'gpt2'")


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.IQ3_XXS, Q.IQ4_NL], ids=lambda t: t.name)
def test_unsupported_tensor_type(gguf_of: Callable[..., tuple[Path, Path]], qtype: GGMLQuantizationType) -> None:
    _, path = gguf_of("wide", type_overrides={"blk.1.ffn_up.weight": qtype})
    load_all(path, ShardSpec(2, 4, 4))  # a stage that does not hold the tensor is unaffected
    with pytest.raises(ModelFormatError) as err:
        load_all(path, ShardSpec(0, 2, 4))
    assert_one_sentence(err, "blk.1.ffn_up.weight", qtype.name, "unsupported")


def test_tensor_type_ggml_does_not_know(gguf_of: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    _, path = gguf_of("gqa")
    data = bytearray(path.read_bytes())
    # tensor info: name (u64 length + bytes), u32 n_dims, u64 dims..., u32 type, u64 offset
    name = b"blk.0.attn_v.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    type_at = at + 4 + 8 * int.from_bytes(data[at : at + 4], "little")
    assert int.from_bytes(data[type_at : type_at + 4], "little") == Q.F32
    data[type_at : type_at + 4] = (250).to_bytes(4, "little")
    bad = tmp_path / "odd_type.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as err:
        load_all(bad)
    assert_one_sentence(err, "odd_type.gguf")


def test_missing_tensor(gguf_of: Callable[..., tuple[Path, Path]]) -> None:
    _, path = gguf_of("gqa", drop=("blk.2.attn_k.weight",))
    load_all(path, ShardSpec(0, 2, 4))
    with pytest.raises(ModelFormatError) as err:
        load_all(path, ShardSpec(2, 4, 4))
    assert_one_sentence(err, "layers.2.attention.wk.weight", "missing")


def test_missing_metadata(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "bare.gguf", "llama")
    writer.add_embedding_length(64)
    writer.add_head_count(8)
    writer.add_vocab_size(10)
    writer.add_tensor("token_embd.weight", np.zeros((10, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError) as err:
        open_source(tmp_path / "bare.gguf")
    assert_one_sentence(err, "lacks llama.block_count")
