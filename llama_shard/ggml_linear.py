"""Linears over raw GGUF blocks, computed by ``llama_shard.kernels`` (ggml's AVX2 dot products): no repacking.

A ``GGMLLinear`` holds a matrix exactly as the file stores it: uint8 ``[N, bytes per row]`` of Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K blocks, so its memory is the file's size for that tensor, and fusing
wq/wk/wv or w1/w3 is concatenating rows. ``--quantize int4|int8`` writes float weights into the same formats (Q4_1,
Q8_0).

Numerics, as llama.cpp's: each activation row is rounded to 8 bits per block of 32 (scale ``amax/127``), products
are exact integers, and each block's integer sum is scaled by ``d_w · d_x`` in fp32. So the error against
``x @ dequantised(w).T`` is the activation rounding, at most half a step ``amax_b/254`` per element of each block
``b``, summed with the weights' magnitudes (see ``tests/test_kernels.py`` for the bound), plus fp32 summation.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor, nn

from llama_shard import kernels
from llama_shard.quant import dequantize_rows

QT = GGMLQuantizationType

#: GGUF types the kernel computes on directly
KERNEL_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
)


def row_bytes(qtype: GGMLQuantizationType, cols: int) -> int:
    """Bytes of one row of ``cols`` values in ``qtype`` blocks."""
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} rows need a multiple of {block} values, got {cols}")
    return cols // block * size


class GGMLLinear(nn.Module):
    """``y = x @ w.T`` with ``w`` the raw GGUF blocks ``blocks`` (uint8 ``[N, bytes per row]``); no bias.

    Takes activations of any float dtype (computed in fp32) and returns that dtype.

    ``row_invariant``: a row's output is bitwise the same whatever the other rows of ``x``: each activation row is
    quantised on its own, and the kernel splits threads over N only, never K, with the same instructions per row
    for any M (``tests/test_kernels.py`` checks M = 1..16).
    """

    row_invariant = True

    def __init__(self, blocks: Tensor, qtype: GGMLQuantizationType, in_features: int) -> None:
        super().__init__()
        if qtype not in KERNEL_TYPES:
            raise ValueError(f"no kernel for {qtype.name}; supported: {sorted(t.name for t in KERNEL_TYPES)}")
        expected = row_bytes(qtype, in_features)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != expected:
            raise ValueError(f"{qtype.name} blocks for {in_features} columns must be uint8 [N, {expected}]")
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self._qtype = int(qtype)
        self.register_buffer("blocks", blocks.contiguous())

    blocks: Tensor

    def forward(self, x: Tensor) -> Tensor:
        # called ~120 times per decoded token: each skipped no-op (a view, a cast, an enum conversion) saves ~1 µs
        x2 = x.reshape(-1, self.in_features)
        y = kernels.ggml_mm(x2 if x2.dtype == torch.float32 else x2.float(), self.blocks, self._qtype, self.in_features)
        if x.dim() != 2:
            y = y.view(x.shape[:-1] + (self.out_features,))
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dequantize(self) -> Tensor:
        """The fp32 weight ``[N, K]`` the blocks stand for."""
        return dequantize_rows(self.blocks, self.qtype, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}"


def _f16_bytes(v: Tensor) -> Tensor:
    """fp32 ``[N, B]`` -> its fp16 little-endian bytes ``[N, B, 2]``."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(*v.shape, 2)


def quantize_blocks(w: Tensor, bits: int) -> tuple[Tensor, GGMLQuantizationType]:
    """A float weight ``[N, K]`` as GGUF blocks: ``bits`` 4 -> Q4_1 (a scale and a min per 32, as ``--quantize
    int4`` always did), 8 -> Q8_0 (a symmetric scale per 32). Codes are computed against the fp16-rounded scale and
    min that the blocks store, so the only error is the code rounding (half a step, plus the scale's fp16 rounding
    at a group's extremes).

    Returns:
        The blocks uint8 ``[N, bytes per row]`` and their type.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // 32, 32)
    if bits == 8:
        d = (g.abs().amax(-1) / 127).to(torch.float16).float()
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = (g * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
        blocks = torch.cat((_f16_bytes(d), q.view(torch.uint8)), dim=-1)
        return blocks.reshape(n, -1), QT.Q8_0
    if bits == 4:
        lo = g.amin(-1).to(torch.float16).float()
        d = ((g.amax(-1) - lo) / 15).to(torch.float16).float()
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = ((g - lo[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)  # element j in the low nibble of byte j, j + 16 in the high one
        blocks = torch.cat((_f16_bytes(d), _f16_bytes(lo), packed), dim=-1)
        return blocks.reshape(n, -1), QT.Q4_1
    raise ValueError(f"bits must be 4 or 8, got {bits}")
