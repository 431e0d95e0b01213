"""Reference dequantisers for GGUF block formats, transcribed from ggml's ``dequantize_row_*`` (ggml-quants.c),
and small helpers that write one-tensor GGUF files. Kept apart from what they check: nothing here calls gguf-py's
dequantiser or the project's loader.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

Q = GGMLQuantizationType

# ---- reference dequantisers, transcribed from ggml-quants.c ---------------------------------------------------
# Each takes ``b``: uint8 ``[n_blocks, type_size]`` and returns float32 ``[n_blocks, block_size]``.


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row -> a float32 column ``[nb, 1]``."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (qs & 0xF).astype(np.int32), (qs >> 4).astype(np.int32)


def ref_f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float32)


def ref_f16(b: np.ndarray) -> np.ndarray:
    return _f16(b)


def ref_bf16(b: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an IEEE float32
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def ref_q8_0(b: np.ndarray) -> np.ndarray:  # block_q8_0 {f16 d; int8 qs[32]}
    return _f16(b[:, 0:2]) * np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.float32)


def ref_q4_0(b: np.ndarray) -> np.ndarray:  # {f16 d; u8 qs[16]}: y[j] = low nibble, y[j + 16] = high nibble
    lo, hi = _nibbles(b[:, 2:18])
    return (np.concatenate([lo, hi], 1) - 8).astype(np.float32) * _f16(b[:, 0:2])


def ref_q4_1(b: np.ndarray) -> np.ndarray:  # {f16 d, m; u8 qs[16]}
    lo, hi = _nibbles(b[:, 4:20])
    return np.concatenate([lo, hi], 1).astype(np.float32) * _f16(b[:, 0:2]) + _f16(b[:, 2:4])


def _q5_values(qh_bytes: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh is a little-endian uint32: bit j is the fifth bit of y[j], bit j + 16 that of y[j + 16]."""
    qh = np.ascontiguousarray(qh_bytes).view("<u4").astype(np.int64)  # [nb, 1]
    j = np.arange(16)
    lo, hi = _nibbles(qs)
    return np.concatenate([lo | (((qh >> j) & 1) << 4), hi | (((qh >> (j + 16)) & 1) << 4)], 1)


def ref_q5_0(b: np.ndarray) -> np.ndarray:  # {f16 d; u8 qh[4]; u8 qs[16]}
    return (_q5_values(b[:, 2:6], b[:, 6:22]) - 16).astype(np.float32) * _f16(b[:, 0:2])


def ref_q5_1(b: np.ndarray) -> np.ndarray:  # {f16 d, m; u8 qh[4]; u8 qs[16]}
    return _q5_values(b[:, 4:8], b[:, 8:24]).astype(np.float32) * _f16(b[:, 0:2]) + _f16(b[:, 2:4])


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7 over the 12 scale bytes: six-bit scales and mins ``[nb, 8]``."""
    s = s.astype(np.int32)
    sc, m = np.empty((len(s), 8), np.int32), np.empty((len(s), 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j], m[:, j] = s[:, j] & 63, s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0xF) | ((s[:, j - 4] >> 6) << 4)
            m[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, m


def _k_min(b: np.ndarray, high: np.ndarray | None, qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: four chunks of 64, each 32 low nibbles then 32 high nibbles of the same 32 bytes."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scale_min_k4(b[:, 4:16])
    y = np.empty((len(b), 256), np.float32)
    for c in range(4):
        lo, hi = _nibbles(qs[:, 32 * c : 32 * c + 32])
        if high is not None:  # Q5_K: bit 2c of qh[l] tops the low nibble, bit 2c + 1 the high one
            lo = lo + ((high >> (2 * c)) & 1).astype(np.int32) * 16
            hi = hi + ((high >> (2 * c + 1)) & 1).astype(np.int32) * 16
        for half, q in enumerate((lo, hi)):
            k = 2 * c + half
            d1, m1 = d * sc[:, k : k + 1].astype(np.float32), dmin * m[:, k : k + 1].astype(np.float32)
            y[:, 64 * c + 32 * half : 64 * c + 32 * half + 32] = d1 * q.astype(np.float32) - m1
    return y


def ref_q4_k(b: np.ndarray) -> np.ndarray:  # {f16 d, dmin; u8 scales[12]; u8 qs[128]}
    return _k_min(b, None, b[:, 16:144])


def ref_q5_k(b: np.ndarray) -> np.ndarray:  # {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}
    return _k_min(b, b[:, 16:48], b[:, 48:176])


def ref_q6_k(b: np.ndarray) -> np.ndarray:  # {u8 ql[128]; u8 qh[64]; int8 scales[16]; f16 d}
    d = _f16(b[:, 208:210])
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    y = np.empty((len(b), 256), np.float32)
    is_ = np.arange(32) // 16
    for n in range(2):  # two halves of 128: ql advances by 64, qh by 32, scales by 8
        ql = b[:, 64 * n : 64 * n + 64].astype(np.int32)
        qh = b[:, 128 + 32 * n : 128 + 32 * n + 32].astype(np.int32)
        sc = scales[:, 8 * n : 8 * n + 8]
        q1 = ((ql[:, :32] & 0xF) | (((qh >> 0) & 3) << 4)) - 32
        q2 = ((ql[:, 32:] & 0xF) | (((qh >> 2) & 3) << 4)) - 32
        q3 = ((ql[:, :32] >> 4) | (((qh >> 4) & 3) << 4)) - 32
        q4 = ((ql[:, 32:] >> 4) | (((qh >> 6) & 3) << 4)) - 32
        for quarter, q in enumerate((q1, q2, q3, q4)):
            start = 128 * n + 32 * quarter
            y[:, start : start + 32] = d * sc[:, is_ + 2 * quarter] * q.astype(np.float32)
    return y


def ref_q2_k(b: np.ndarray) -> np.ndarray:  # {u8 scales[16]; u8 qs[64]; f16 d, dmin}
    """Two chunks of 128 (qs advances by 32): pass p takes bits 2p of the chunk's 32 bytes, 16 values per scale."""
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    sc = b[:, 0:16].astype(np.int32)
    y = np.empty((len(b), 256), np.float32)
    for n in range(2):
        q = b[:, 16 + 32 * n : 48 + 32 * n].astype(np.int32)
        for p in range(4):
            for half in range(2):
                k = 8 * n + 2 * p + half  # the scale byte: low nibble scale, high nibble min
                dl = d * (sc[:, k : k + 1] & 0xF).astype(np.float32)
                ml = dmin * (sc[:, k : k + 1] >> 4).astype(np.float32)
                start = 128 * n + 32 * p + 16 * half
                y[:, start : start + 16] = dl * ((q[:, 16 * half : 16 * half + 16] >> (2 * p)) & 3) - ml
    return y


def ref_q3_k(b: np.ndarray) -> np.ndarray:  # {u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d}
    """As Q2_K's codes, minus 4 where the value's bit of ``hmask`` (bit 4n + p of byte l) is clear; 6-bit scales:
    low 4 bits from ``scales[k % 8]`` (k >= 8: the high nibble), high 2 from ``scales[8 + k % 4] >> 2 (k / 4)``."""
    d = _f16(b[:, 108:110])
    s = b[:, 96:108].astype(np.int32)
    hm = b[:, 0:32].astype(np.int32)
    y = np.empty((len(b), 256), np.float32)
    for n in range(2):
        q = b[:, 32 + 32 * n : 64 + 32 * n].astype(np.int32)
        for p in range(4):
            bit = 4 * n + p
            for half in range(2):
                k = 8 * n + 2 * p + half
                scale = ((s[:, k % 8] >> (4 * (k // 8))) & 0xF) | (((s[:, 8 + k % 4] >> (2 * (k // 4))) & 3) << 4)
                dl = d * (scale[:, None] - 32).astype(np.float32)
                part = slice(16 * half, 16 * half + 16)
                code = ((q[:, part] >> (2 * p)) & 3) - np.where((hm[:, part] >> bit) & 1, 0, 4)
                start = 128 * n + 32 * p + 16 * half
                y[:, start : start + 16] = dl * code.astype(np.float32)
    return y


REFERENCE: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: ref_f32,
    Q.F16: ref_f16,
    Q.BF16: ref_bf16,
    Q.Q8_0: ref_q8_0,
    Q.Q4_0: ref_q4_0,
    Q.Q4_1: ref_q4_1,
    Q.Q5_0: ref_q5_0,
    Q.Q5_1: ref_q5_1,
    Q.Q2_K: ref_q2_k,
    Q.Q3_K: ref_q3_k,
    Q.Q4_K: ref_q4_k,
    Q.Q5_K: ref_q5_k,
    Q.Q6_K: ref_q6_k,
}

#: Byte offsets of the f16 scale fields in one block (random bytes there could be inf or NaN).
F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q5_0: (0,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
              Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}  # fmt: skip


def reference_dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int]) -> np.ndarray:
    """The bytes of a tensor ``[rows, cols]`` of ``qtype``, dequantised by the transcriptions above."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, size)
    return REFERENCE[qtype](blocks).reshape(shape)


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid bytes of a ``[rows, cols]`` tensor: random quants and scales, finite f16 ``d``/``m``."""
    block, size = GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    if qtype == Q.F32:
        return rng.standard_normal(n).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal(n).astype(np.float16).view(np.uint8)
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if qtype == Q.BF16:  # any bits but an all-ones exponent (inf/NaN)
        bits = raw.view(np.uint16)
        bits[(bits & 0x7F80) == 0x7F80] ^= 0x4000
    for offset in F16_FIELDS.get(qtype, ()):
        raw[:, offset : offset + 2] = (rng.standard_normal((n, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return raw.reshape(-1)


def write_one_tensor(path: Path, name: str, data: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> Path:
    """A GGUF holding one tensor; packed types as uint8 rows (gguf-py derives the shape from the type)."""
    writer = GGUFWriter(path, "llama")
    if qtype == Q.F32:
        writer.add_tensor(name, data.view(np.float32).reshape(-1, cols))
    elif qtype == Q.F16:
        writer.add_tensor(name, data.view(np.float16).reshape(-1, cols))
    else:
        block, size = GGML_QUANT_SIZES[qtype]
        writer.add_tensor(name, data.view(np.uint8).reshape(-1, cols // block * size), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
