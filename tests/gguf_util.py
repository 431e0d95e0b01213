"""Test helper: write a tiny HF Llama directory as a GGUF, the way llama.cpp's ``convert_hf_to_gguf.py`` does.

What the converter does for the ``llama`` architecture, and this helper copies:

* metadata under ``llama.*`` (block count, lengths, head counts, RoPE base, RMS eps, vocab size), plus
  ``general.architecture`` and a minimal tokenizer (a token list, scores, types, bos/eos ids);
* tensor names ``token_embd``, ``blk.N.attn_q`` ... ``output_norm``, ``output``;
* the rows of Q and K permuted by ``LlamaModel.permute`` (per head, the two rotary halves interleaved);
* a ``rope_freqs`` tensor (and no scaling metadata) for ``llama3`` RoPE scaling, from ``generate_extra_tensors``;
* no ``output.weight`` when the checkpoint has no ``lm_head`` (tied embeddings, as in SmolLM2);
* 1-D tensors in F32, 2-D tensors in the requested type.

gguf-py can quantise F16, BF16 and Q4_0 ... Q8_0 but none of the K-quants, so ``encode`` has simple numpy
quantisers for Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (not llama.cpp's search for the best scales, but valid blocks of the
same layout: the tests check them through the loader and an independent dequantiser).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType
from gguf.quants import quantize
from safetensors.torch import load_file

Q = GGMLQuantizationType

#: HF name (``{i}`` = layer) -> GGUF name, as llama.cpp's tensor map has it for the llama architecture.
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
}

#: Types gguf-py quantises itself.
GGUF_PY_QUANTISES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1})


def permute(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: within each head, interleave the rows of the two rotary halves."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim: int, theta: float, rope: Mapping[str, Any]) -> torch.Tensor:
    """``rope_freqs`` as llama.cpp's ``LlamaModel.generate_extra_tensors`` computes it (one factor per frequency).

    The converter reads ``original_max_position_embeddings`` from the top of ``config.json`` (default 8192);
    transformers keeps it in the RoPE parameters, which is where real Llama 3.1 configs hold it too, so we take it
    from there (for Llama 3.1 both give 8192).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors: list[float] = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# ---- K-quant quantisers (gguf-py has none) -------------------------------------------------------------------


def _f16_at_least(v: np.ndarray) -> np.ndarray:
    """The f16 nearest ``v`` that is not below it (so a scale rounded to f16 still covers its range)."""
    h = v.astype(np.float16)
    return np.where(h.astype(np.float32) < v, np.nextafter(h, np.float16(np.inf)), h).astype(np.float16)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` with 0 where ``b`` is 0 (an all-zero sub-block)."""
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b != 0)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12 bytes ``get_scale_min_k4`` reads. ``sc``, ``m``: ``[nb, 8]``."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def _quantise_k_min(x: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K / Q5_K: super-blocks of 256, eight sub-blocks of 32 with 6-bit scale and min; ``x = d*sc*q - dmin*m``."""
    levels = (1 << bits) - 1
    sub = x.reshape(-1, 8, 32)
    mn = np.minimum(sub.min(-1), 0)  # [nb, 8] the min is <= 0, stored as a positive offset
    scale_need, min_need = (sub.max(-1) - mn) / levels, -mn
    d = _f16_at_least(scale_need.max(-1) / 63)  # [nb]
    dmin = _f16_at_least(min_need.max(-1) / 63)
    sc = np.clip(np.ceil(_div(scale_need, d[:, None].astype(np.float32))), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_div(min_need, dmin[:, None].astype(np.float32))), 0, 63).astype(np.uint8)
    s = d[:, None].astype(np.float32) * sc  # what the dequantiser multiplies by, in f32
    offset = dmin[:, None].astype(np.float32) * m
    q = np.clip(np.rint(_div(sub + offset[..., None], s[..., None])), 0, levels).astype(np.uint8)  # [nb, 8, 32]
    head = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack_scales_k4(sc, m)]
    pairs = q.reshape(-1, 4, 2, 32)  # values 64c + l and 64c + 32 + l share byte 32c + l
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    if bits == 4:
        return np.concatenate([*head, qs], axis=1)
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for k in range(8):  # bit k of qh[l] is the fifth bit of sub-block k's value l
        qh |= ((q[:, k] >> 4) & 1) << k
    return np.concatenate([*head, qh, qs], axis=1)


def _quantise_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: super-blocks of 256, sixteen sub-blocks of 16 with int8 scales; ``x = d*sc*(q - 32)``."""
    sub = x.reshape(-1, 16, 16)
    scale_need = np.abs(sub).max(-1) / 31  # [nb, 16] keeps q - 32 in [-31, 31]
    d = _f16_at_least(scale_need.max(-1) / 127)
    sc = np.clip(np.ceil(_div(scale_need, d[:, None].astype(np.float32))), 0, 127).astype(np.int8)
    s = d[:, None].astype(np.float32) * sc
    q = (np.clip(np.rint(_div(sub, s[..., None])), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    # per 128 values n: ql[64n + l] holds quarters 0 (low) and 2 (high), ql[64n + 32 + l] quarters 1 and 3,
    # qh[32n + l] the top two bits of quarters 0..3 at bits 0, 2, 4, 6
    ql = np.stack([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], 2)
    qh = sum(((q[:, :, j] >> 4) & 3) << (2 * j) for j in range(4))
    parts = [ql.reshape(-1, 128), np.asarray(qh, np.uint8).reshape(-1, 64), sc.view(np.uint8)]
    return np.concatenate([*parts, d.view(np.uint8).reshape(-1, 2)], axis=1)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """Codes 0..3 ``[nb, 256]`` -> Q2_K / Q3_K's 64 ``qs`` bytes: value 128n + 32p + l in bits 2p of byte 32n + l."""
    parts = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return sum(parts[:, :, p] << (2 * p) for p in range(4)).reshape(-1, 64).astype(np.uint8)


def _quantise_q2_k(x: np.ndarray) -> np.ndarray:
    """Q2_K: sixteen sub-blocks of 16 with a 4-bit scale and min each; ``x = d*sc*q - dmin*m``, q in 0..3."""
    sub = x.reshape(-1, 16, 16)
    mn = np.minimum(sub.min(-1), 0)
    scale_need, min_need = (sub.max(-1) - mn) / 3, -mn
    d, dmin = _f16_at_least(scale_need.max(-1) / 15), _f16_at_least(min_need.max(-1) / 15)
    sc = np.clip(np.ceil(_div(scale_need, d[:, None].astype(np.float32))), 0, 15).astype(np.uint8)
    m = np.clip(np.rint(_div(min_need, dmin[:, None].astype(np.float32))), 0, 15).astype(np.uint8)
    s, offset = d[:, None].astype(np.float32) * sc, dmin[:, None].astype(np.float32) * m
    q = np.clip(np.rint(_div(sub + offset[..., None], s[..., None])), 0, 3).reshape(-1, 256)
    tail = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)]
    return np.concatenate([sc | (m << 4), _pack_2bit(q), *tail], axis=1)


def _quantise_q3_k(x: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen sub-blocks of 16 with a signed 6-bit scale; ``x = d*sc*q``, q in -4..3 (the value of largest
    magnitude maps to -4, as llama.cpp's ``make_q3_quants`` arranges by the scale's sign)."""
    sub = x.reshape(-1, 16, 16)
    extreme = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1)[..., 0]  # [nb, 16]
    scale_need = -extreme / 4
    d = _f16_at_least(np.abs(scale_need).max(-1) / 31)
    sc = np.clip(np.rint(_div(scale_need, d[:, None].astype(np.float32))), -32, 31).astype(np.int32)
    s = d[:, None].astype(np.float32) * sc
    u = (np.clip(np.rint(_div(sub, s[..., None])), -4, 3) + 4).astype(np.uint8).reshape(-1, 256)  # 0..7
    biased = (sc + 32).astype(np.uint8)  # 6 bits: low 4 in a nibble of bytes 0..7, high 2 in bytes 8..11
    scales = np.empty((len(sc), 12), np.uint8)
    scales[:, 0:8] = (biased[:, 0:8] & 0xF) | ((biased[:, 8:16] & 0xF) << 4)
    high = biased >> 4
    scales[:, 8:12] = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    top = (u >> 2).reshape(-1, 8, 32)  # the third bit of 32-block j's value l: bit j of hmask[l]
    hmask = sum(top[:, j] << j for j in range(8)).astype(np.uint8)
    return np.concatenate([hmask, _pack_2bit(u & 3), scales, d.view(np.uint8).reshape(-1, 2)], axis=1)


def encode(w: np.ndarray, qtype: GGMLQuantizationType, seed: int = 0) -> tuple[np.ndarray, GGMLQuantizationType]:
    """``w`` ``[rows, cols]`` (float32) as the bytes (or floats) of ``qtype`` for ``GGUFWriter.add_tensor``.

    Types with no quantiser here (IQ2_XXS, ...) get random bytes of the right size: only for files that the
    loader must reject.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if w.shape[-1] % block:
        raise ValueError(f"rows of {w.shape[-1]} values do not split into {qtype.name} blocks of {block}")
    if qtype in GGUF_PY_QUANTISES:
        return quantize(w, qtype), qtype
    rows = w.shape[0]
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw = _quantise_k_min(w.reshape(-1, 256), 4 if qtype == Q.Q4_K else 5)
    elif qtype == Q.Q6_K:
        raw = _quantise_q6_k(w.reshape(-1, 256))
    elif qtype in (Q.Q2_K, Q.Q3_K):
        raw = (_quantise_q2_k if qtype == Q.Q2_K else _quantise_q3_k)(w.reshape(-1, 256))
    else:
        raw = np.random.default_rng(seed).integers(0, 256, (rows, w.shape[-1] // block * nbytes), dtype=np.uint8)
    return raw.reshape(rows, -1), qtype


def add_tensor(writer: GGUFWriter, name: str, w: np.ndarray, qtype: GGMLQuantizationType) -> None:
    data, raw_type = encode(w, qtype)
    # F32/F16 arrays carry their type in their dtype; packed types are uint8 rows plus raw_dtype
    writer.add_tensor(name, data, raw_dtype=None if raw_type in (Q.F32, Q.F16) else raw_type)


def _gguf_name(hf_name: str) -> str | None:
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        key = ".".join([*parts[:2], "{i}", *parts[3:]])
        return HF_TO_GGUF[key].format(i=parts[2]) if key in HF_TO_GGUF else None
    return HF_TO_GGUF.get(hf_name)


def hf_to_gguf(
    hf_dir: Path,
    out: Path,
    *,
    weight_type: GGMLQuantizationType = Q.F32,
    type_overrides: Mapping[str, GGMLQuantizationType] | None = None,
    drop: Collection[str] = (),
    arch: str = "llama",
) -> Path:
    """Convert ``hf_dir`` (``config.json`` + ``model.safetensors``) into the GGUF ``out``.

    Args:
        weight_type: the type of every 2-D weight (1-D norms and ``rope_freqs`` stay F32, as the converter does).
        type_overrides: GGUF tensor name -> type, for single tensors (e.g. an unsupported type).
        drop: GGUF tensor names to leave out (a broken file).
        arch: ``general.architecture`` and the metadata key prefix (a non-llama one makes a file to reject).
    """
    cfg = json.loads((hf_dir / "config.json").read_text())
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope_type = rope.get("rope_type", rope.get("type"))

    writer = GGUFWriter(out, arch)
    writer.add_name(hf_dir.name)
    file_type = getattr(LlamaFileType, "ALL_F32" if weight_type == Q.F32 else f"MOSTLY_{weight_type.name}", None)
    if file_type is not None:
        writer.add_file_type(int(file_type))
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if "head_dim" in cfg:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":  # llama3 scaling travels as the rope_freqs tensor instead, with no metadata
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(cfg["vocab_size"])])
    writer.add_token_scores([0.0] * cfg["vocab_size"])
    writer.add_token_types([1] * cfg["vocab_size"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])

    overrides = dict(type_overrides or {})
    for hf_name, tensor in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        name = _gguf_name(hf_name)
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name!r}")
        if name in drop:
            continue
        if hf_name.endswith("q_proj.weight"):
            tensor = permute(tensor, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute(tensor, n_head, n_kv)
        qtype = overrides.get(name, weight_type if tensor.ndim == 2 else Q.F32)
        add_tensor(writer, name, tensor.float().numpy(), qtype)
    if rope_type == "llama3" and "rope_freqs.weight" not in drop:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(head_dim, theta, rope).numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
