"""Quantised weights that stay quantised: GGUF blocks repacked at load for torch's 4-bit matmul kernel.

This is the fallback path: where the native kernel (``llama_shard.kernels``, used through
``llama_shard.ggml_linear.GGMLLinear`` on the raw blocks) could not be built, is disabled (``LLAMA_NODE_KERNELS=0``),
or the stage is not on CPU (there the planes are dequantised to bf16). The shared pieces (``QuantEmbedding``,
``dequantize_rows``, ``QuantMode``) serve both paths.

The kernel is PyTorch's weight-only int4 matmul (``torch._weight_int4pack_mm_for_cpu``, group 32). It computes
``y = x @ w.T`` with ``w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]`` for 4-bit codes ``q`` and one
``(scale, zero)`` pair per group ``g = k // 32``, bf16 activations, scales and output (fp32 accumulation).

Every GGUF format whose blocks are an affine map of integer codes over groups of 32 fits that form:

- Q4_0 ``w = d (q - 8)``: scale d, zero 0.
- Q4_1 ``w = d q + m``: scale d, zero m + 8d.
- Q4_K ``w = d sc q - dmin m`` per sub-block of 32: scale d·sc, zero 8·d·sc - dmin·m.
- Q8_0 ``w = d q`` with 8-bit q: written as ``q + 128 = 16 hi + lo`` in two 4-bit *planes*. The planes sit side
  by side along K (``[hi | lo]``, each group in one plane) and the activation is repeated, so one call of the
  int4 kernel sums both: ``(hi - 8) · 16d + (lo - 8) · d + 8d``. The codes stay exact; only scales round.
- Q5_0 ``w = d (q - 16)`` / Q5_1 ``w = d q + m`` with 5-bit ``q = 16 hi + lo``: two planes as Q8_0's, the top bit
  (code hi + 7 / hi + 8, scale 16d, zero 0) and the low nibble (scale d, zero 8d / 8d + m). llama.cpp's K-quant
  mixes of models with rows that are not a multiple of 256 hold most tensors in these (Q4_K_M: Q5_0).
- ``int4`` / ``int8`` at load (``--quantize``, float checkpoints): the same two layouts, asymmetric int4 or
  symmetric int8 per group of 32, computed from the float weight.

What is not exact: scales and zeros are bf16 in this kernel (relative rounding ≤ 2^-9), and so is the activation
(also ≤ 2^-9) and the output. llama.cpp itself rounds activations to 8 bits (Q8_0/Q8_1) for these formats.

Formats with a scale per 16 weights (Q6_K, Q2_K, Q3_K) or 5-bit K-quant codes (Q5_K) are dequantised at load into a bf16
``DenseLinear`` (2 bytes per weight) — no packed kernel here takes groups under 32. The native kernel takes all of
them packed (``GGMLLinear``): a 2- or 3-bit file held in bf16 here is 5-6x its size.

The token embedding never needs the matrix: ``QuantEmbedding`` dequantises only the rows it looks up, from the
GGUF blocks (memory-mapped from the file, so untouched rows cost nothing).
"""

from __future__ import annotations

import logging
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K, dequantize
from torch import Tensor, nn

log = logging.getLogger(__name__)

GROUP = 32
_PACK_ROWS = 256  # rows packed per call: bounds the int32 temporary; a multiple of the kernel's row block


class QuantMode(StrEnum):
    """How a stage's linear weights are held.

    ``gguf``: keep a GGUF file's quantised blocks packed (the ``--dtype auto`` path); ``int4``/``int8``: quantise
    float weights group-wise at load.
    """

    gguf = "gguf"
    int4 = "int4"
    int8 = "int8"


QT = GGMLQuantizationType

#: GGUF types that are repacked for the int4 kernel, and how many 4-bit planes each takes.
PACKED_TYPES: dict[GGMLQuantizationType, int] = {QT.Q4_0: 1, QT.Q4_1: 1, QT.Q4_K: 1, QT.Q5_0: 2, QT.Q5_1: 2, QT.Q8_0: 2}


class Int4Planes:
    """Codes ``q [N, P·K]`` (uint8, 0..15) and ``scale``/``zero`` ``[N, P·K/32]`` fp32: the unpacked kernel form.

    ``w[n, k] = sum over planes p of (q[n, p·K + k] - 8) · scale + zero`` (group of the column in that plane).
    """

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, planes: int) -> None:
        self.q, self.scale, self.zero, self.planes = q, scale, zero, planes

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] // self.planes

    def dequantize(self) -> Tensor:
        """The float weight ``[N, K]`` the planes stand for (fp32 math, for tests)."""
        n, k = self.shape
        s = self.scale.repeat_interleave(GROUP, dim=1)
        z = self.zero.repeat_interleave(GROUP, dim=1)
        w = (self.q.float() - 8) * s + z
        return w.view(n, self.planes, k).sum(1)

    def rows(self, index: Tensor) -> Int4Planes:
        return Int4Planes(self.q[index], self.scale[index], self.zero[index], self.planes)

    @staticmethod
    def cat(parts: list[Int4Planes]) -> Int4Planes:
        """Stack along N (fusing wq/wk/wv or w1/w3); all parts need the same K and plane count."""
        planes = {p.planes for p in parts}
        if len(planes) != 1:
            raise ValueError(f"cannot fuse weights with different plane counts {sorted(planes)}")
        return Int4Planes(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            planes.pop(),
        )


def _f16(raw: np.ndarray) -> Tensor:
    """Little-endian fp16 from two bytes per value ``[..., 2]`` -> fp32 ``[...]``."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """``[..., 16]`` bytes -> ``out [..., 32]``: low nibbles are elements 0..15, high nibbles 16..31."""
    np.bitwise_and(qs, 0x0F, out=out[..., :16])
    np.right_shift(qs, 4, out=out[..., 16:])


def _q8_planes(codes: Tensor, d: Tensor) -> Int4Planes:
    """Symmetric 8-bit ``w = d · codes`` (codes int8 ``[N, K]``, d ``[N, K/32]``) as hi/lo 4-bit planes."""
    u = (codes.numpy().view(np.uint8) ^ 0x80).reshape(codes.shape)  # two's complement + 128 = flip the top bit
    q = np.empty((u.shape[0], 2, u.shape[1]), dtype=np.uint8)  # [N, 2K]: hi plane, then lo plane
    np.right_shift(u, 4, out=q[:, 0])
    np.bitwise_and(u, 0x0F, out=q[:, 1])
    scale = torch.cat((16 * d, d), dim=1)
    zero = torch.cat((torch.zeros_like(d), 8 * d), dim=1)  # (hi-8)16d + (lo-8)d + 8d = d(u - 128)
    return Int4Planes(torch.from_numpy(q).view(u.shape[0], -1), scale, zero, 2)


def _q5_planes(r: np.ndarray, qtype: GGMLQuantizationType, cols: int) -> Int4Planes:
    """Q5_0 ``w = d (q - 16)`` / Q5_1 ``w = d q + m`` with ``q = 16 hi + lo`` as two planes, as Q8_0: the top bit
    (code ``hi + 7`` resp. ``hi + 8``, scale ``16 d``, zero 0) and the low nibble (code ``lo``, scale ``d``, zero
    ``8 d`` resp. ``8 d + m``). The zeros are those of Q4_0 / Q4_1's own plane, so rounding them to bf16 costs what
    it costs those types; a zero of ``-128 d`` (the top bit's offset folded in) would err by a quarter of a step."""
    n = r.shape[0]
    head = 2 if qtype == QT.Q5_0 else 4  # d (and m) before the 4 bytes of top bits
    b = r.reshape(n, -1, head + 20)
    qh = np.ascontiguousarray(b[..., head : head + 4]).view("<u4")  # [N, blocks, 1]: bit j is element j's top bit
    q = np.empty((n, 2, b.shape[1], 32), dtype=np.uint8)  # [N, plane, block, element]: top-bit plane, then low
    np.bitwise_and(np.right_shift(qh, np.arange(32, dtype=np.uint32)), 1, out=q[:, 0], casting="unsafe")
    q[:, 0] += 7 if qtype == QT.Q5_0 else 8
    _nibbles(b[..., head + 4 :], q[:, 1])
    d = _f16(b[..., 0:2])
    low_zero = 8 * d if qtype == QT.Q5_0 else 8 * d + _f16(b[..., 2:4])
    scale = torch.cat((16 * d, d), dim=1)
    zero = torch.cat((torch.zeros_like(d), low_zero), dim=1)
    return Int4Planes(torch.from_numpy(q).view(n, 2 * cols), scale, zero, 2)


def gguf_planes(raw: Tensor, qtype: GGMLQuantizationType, cols: int) -> Int4Planes:
    """Decode GGUF blocks ``raw`` (uint8 ``[N, bytes per row]``) of a ``PACKED_TYPES`` type into int4 planes.

    The bit twiddling is numpy, which is fast on uint8 (torch's uint8 ops are not).
    """
    n = raw.shape[0]
    r = raw.numpy()
    if qtype in (QT.Q4_0, QT.Q4_1):
        size = 18 if qtype == QT.Q4_0 else 20
        b = r.reshape(n, -1, size)
        q = np.empty((n, b.shape[1], 32), dtype=np.uint8)
        _nibbles(b[..., size - 16 :], q)
        d = _f16(b[..., 0:2])
        zero = torch.zeros_like(d) if qtype == QT.Q4_0 else _f16(b[..., 2:4]) + 8 * d  # d q + m = (q - 8) d + m + 8d
        return Int4Planes(torch.from_numpy(q).view(n, cols), d, zero, 1)
    if qtype == QT.Q4_K:
        b = r.reshape(n, -1, 144)  # 256 weights: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of codes
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc_np, m_np = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
        sc = torch.from_numpy(sc_np.astype(np.float32)).view(n, -1, 8)
        mn = torch.from_numpy(m_np.astype(np.float32)).view(n, -1, 8)
        scale = d[..., None] * sc  # as gguf/llama.cpp compute them, in fp32
        zero = 8 * scale - dmin[..., None] * mn
        qs = b[..., 16:144].reshape(n, -1, 4, 32)  # byte i of chunk c: low nibble sub-block 2c, high 2c+1
        q = np.empty((n, qs.shape[1], 4, 2, 32), dtype=np.uint8)
        np.bitwise_and(qs, 0x0F, out=q[..., 0, :])
        np.right_shift(qs, 4, out=q[..., 1, :])
        return Int4Planes(torch.from_numpy(q).view(n, cols), scale.reshape(n, -1), zero.reshape(n, -1), 1)
    if qtype in (QT.Q5_0, QT.Q5_1):
        return _q5_planes(r, qtype, cols)
    if qtype == QT.Q8_0:
        b = r.reshape(n, -1, 34)
        d = _f16(b[..., 0:2])
        codes = torch.from_numpy(np.ascontiguousarray(b[..., 2:34]).view(np.int8).reshape(n, cols))
        return _q8_planes(codes, d)
    raise ValueError(f"{qtype.name} has no int4-plane form")


def quantize_planes(w: Tensor, bits: int) -> Int4Planes:
    """Group-wise (32) quantisation of a float weight ``[N, K]``: asymmetric int4 or symmetric int8 (``--quantize``)."""
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    if bits == 4:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        return Int4Planes(q.view(n, k), scale, lo + 8 * scale, 1)  # (q - 8)s + lo + 8s = qs + lo
    if bits == 8:
        d = (g.abs().amax(-1) / 127).clamp_min(1e-12)
        codes = (g / d[..., None]).round().clamp(-127, 127).to(torch.int8)
        return _q8_planes(codes.view(n, k), d)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def _pack_numpy(q: Tensor) -> Tensor:
    """The x86 (AVX2/AVX512) layout of ``_convert_weight_to_int4pack_for_cpu``, from uint8 codes, in numpy.

    Per block of 32 rows, byte ``k·16 + d`` holds rows ``d`` (low nibble) and ``d + 16`` (high) of column k.
    ``_FAST_PACK`` checks this against torch's own op once; elsewhere torch's op is used.
    """
    n, k = q.shape
    b = q.numpy().reshape(n // 32, 2, 16, k)
    packed = (b[:, 0] | (b[:, 1] << 4)).transpose(0, 2, 1)  # [N/32, K, 16]
    return torch.from_numpy(np.ascontiguousarray(packed)).view(n, k // 2)


def _fast_pack_matches() -> bool:
    q = torch.randint(0, 16, (64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        return torch.equal(_pack_numpy(q), torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
    except RuntimeError:
        return False


_FAST_PACK: bool | None = None


def _pack_cpu(q: Tensor) -> Tensor:
    global _FAST_PACK
    if _FAST_PACK is None:
        _FAST_PACK = _fast_pack_matches()
        log.debug("numpy int4 packing %s", "matches torch's layout" if _FAST_PACK else "unavailable: using torch's op")
    if _FAST_PACK and q.shape[0] % 32 == 0:
        return _pack_numpy(q)
    parts = [
        torch._convert_weight_to_int4pack_for_cpu(q[i : i + _PACK_ROWS].to(torch.int32, copy=False).contiguous(), 1)
        for i in range(0, q.shape[0], _PACK_ROWS)
    ]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class QuantLinear(nn.Module):
    """``y = x @ w.T`` with ``w`` held as packed int4 planes (see the module docstring); no bias.

    Takes activations of any float dtype and returns that dtype; the kernel runs in bf16.

    ``row_invariant``: a row's output is bitwise the same whatever the other rows of ``x`` (measured for M = 1..16
    on torch 2.13 x86, checked by ``tests/test_batch_invariance_quant.py``), so ``llama_shard.batching`` need not pad.
    """

    row_invariant = True

    def __init__(self, packed: Tensor, scale_zeros: Tensor, out_features: int, in_features: int, planes: int) -> None:
        super().__init__()
        self.out_features, self.in_features, self.planes = out_features, in_features, planes
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zeros", scale_zeros)

    @staticmethod
    def _check(n: int, k: int) -> None:
        if n % 16 or k % GROUP:
            raise ValueError(f"int4 packing needs out_features % 16 == 0 and in_features % 32 == 0, got {n}x{k}")

    @classmethod
    def from_planes(cls, planes: Int4Planes) -> QuantLinear:
        n, k = planes.shape
        cls._check(n, k)
        # [groups, N, 2]: the kernel's (scale, zero) layout
        sz = torch.stack((planes.scale, planes.zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        return cls(_pack_cpu(planes.q), sz, n, k, planes.planes)

    @classmethod
    def from_gguf(cls, raw: Tensor, qtype: GGMLQuantizationType, cols: int, chunk: int = 2048) -> QuantLinear:
        """Decode and pack ``chunk`` rows at a time into preallocated buffers, so a big matrix (the head) never
        has a full-size temporary."""
        n, planes = raw.shape[0], PACKED_TYPES[qtype]
        cls._check(n, cols)
        packed = torch.empty(n, planes * cols // 2, dtype=torch.uint8)
        sz = torch.empty(planes * cols // GROUP, n, 2, dtype=torch.bfloat16)
        for i in range(0, n, chunk):
            p = gguf_planes(raw[i : i + chunk], qtype, cols)
            packed[i : i + chunk] = _pack_cpu(p.q)
            sz[:, i : i + chunk, 0] = p.scale.t()
            sz[:, i : i + chunk, 1] = p.zero.t()
        return cls(packed, sz, n, cols, planes)

    packed: Tensor
    scale_zeros: Tensor

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xb = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.planes > 1:
            xb = xb.repeat(1, self.planes)
        y = torch._weight_int4pack_mm_for_cpu(xb, self.packed, GROUP, self.scale_zeros)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, planes={self.planes}"


def reference_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch multiplies ``dtype`` matrices on ``device`` with its reference kernel (``at::native::cpublas``),
    where each output is one dot product over K, accumulated in fp32, in the same order for M = 1 (gemv) and M > 1
    (gemm), with threads splitting the outputs, never K: a row's bits do not depend on the other rows. That is torch's
    path for bf16 / fp16 on a CPU without oneDNN's bf16 / fp16 support (no AVX-512 / AMX / Arm bf16). Not fp32 (MKL),
    not CUDA or MPS (cuBLAS / MPS pick kernels by M), not where oneDNN takes the call."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return True
    ops = torch.ops.mkldnn
    return not (ops._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported())


class DenseLinear(nn.Module):
    """The fallback: a dequantised weight held in ``dtype`` (bf16), as a buffer so ``Stage.dtype`` ignores it.

    ``row_invariant`` where torch's reference kernel multiplies it (``reference_gemm``: bf16 on a CPU without
    oneDNN's bf16, as where the native kernels are not built), so ``llama_shard.batching`` need not pad decode rows
    for it (checked by ``tests/test_batch_invariance_dense.py``); elsewhere False, and the stage keeps the padded
    convention.
    """

    def __init__(self, weight: Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.to(dtype).contiguous())

    weight: Tensor

    @property
    def row_invariant(self) -> bool:
        return reference_gemm(self.weight.device, self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def _gguf_block_bytes(qtype: GGMLQuantizationType) -> tuple[int, int]:
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qtype]


def dequantize_rows(raw: Tensor, qtype: GGMLQuantizationType, cols: int) -> Tensor:
    """Rows of GGUF blocks ``[R, bytes per row]`` -> fp32 ``[R, cols]`` (Q8_0 in torch, others via gguf-py)."""
    r = raw.shape[0]
    if qtype == QT.Q8_0:
        b = raw.view(r, -1, 34)
        d = b[..., 0:2].contiguous().view(torch.float16).float()  # [R, blocks, 1]
        return (d * b[..., 2:34].contiguous().view(torch.int8).float()).view(r, cols)
    if qtype == QT.F32:
        return raw.contiguous().view(torch.float32).view(r, cols).clone()
    if qtype in (QT.F16, QT.BF16):
        dt = torch.float16 if qtype == QT.F16 else torch.bfloat16
        return raw.contiguous().view(dt).view(r, cols).float()
    return torch.from_numpy(np.ascontiguousarray(dequantize(raw.numpy(), qtype), dtype=np.float32)).view(r, cols)


class QuantEmbedding(nn.Module):
    """Token embedding over GGUF rows: looks up ``raw[ids]`` and dequantises only those rows (fp32 out).

    ``raw`` is uint8 ``[V, bytes per row]`` and is usually a view of the memory-mapped file (not a buffer, so it is
    neither copied by ``.to`` nor counted as a parameter).
    """

    def __init__(self, raw: Tensor, qtype: GGMLQuantizationType, dim: int) -> None:
        super().__init__()
        block, nbytes = _gguf_block_bytes(qtype)
        if raw.shape[1] != dim // block * nbytes:
            raise ValueError(f"{qtype.name} rows of {raw.shape[1]} bytes do not hold {dim} values")
        self.raw, self.qtype, self.dim = raw, qtype, dim

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.raw.index_select(0, ids.reshape(-1).cpu())
        return dequantize_rows(rows, self.qtype, self.dim).view(*ids.shape, self.dim).to(ids.device)


def linear_from_planes(planes: Int4Planes, device: torch.device) -> nn.Module:
    """A ``QuantLinear`` on CPU; elsewhere (CUDA, MPS) the planes dequantised to a bf16 ``DenseLinear``."""
    if device.type == "cpu":
        return QuantLinear.from_planes(planes)
    return DenseLinear(planes.dequantize()).to(device)


class DenseEmbedding(nn.Module):
    """A token embedding held in a compact float dtype (bf16/fp16); looks rows up and returns them as fp32."""

    def __init__(self, weight: Tensor, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous().to(device))

    weight: Tensor

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).float()
