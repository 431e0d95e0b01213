"""Linears over GGUF blocks, computed by ``llama_shard.kernels`` (ggml's AVX2 dot products).

A ``GGMLLinear`` holds a matrix as the file's bytes: uint8 ``[N, bytes per row]`` of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K,
Q3_K, Q4_K, Q5_K or Q6_K blocks, so its memory is the file's size for that tensor, and fusing wq/wk/wv or w1/w3 is
concatenating rows (where their types differ, a ``GGMLStack`` holds one ``GGMLLinear`` per run of one type). Q4_0, Q4_1
and Q8_0 are reordered at load 8 rows at a time (``repack_x8``: the same bytes, laid out for the AVX2 kernel, see
``csrc/ggml_x8.cpp``); the other types stay as the file stores them. ``--quantize int4|int8`` writes float weights into
the same formats (Q4_1, Q8_0).

Numerics, as llama.cpp's: each activation row is rounded to 8 bits per block of 32 (scale ``amax/127``), products
are exact integers, and each block's integer sum is scaled by ``d_w · d_x`` in fp32. So the error against
``x @ dequantised(w).T`` is the activation rounding, at most half a step ``amax_b/254`` per element of each block
``b``, summed with the weights' magnitudes (see ``tests/test_kernels.py`` for the bound), plus fp32 summation.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor, nn

from llama_shard import kernels
from llama_shard.quant import QuantEmbedding, dequantize_rows

QT = GGMLQuantizationType

#: GGUF types the kernel computes on directly
KERNEL_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
)


#: GGUF types repacked 8 rows at a time at load (``repack_x8``)
X8_TYPES: frozenset[GGMLQuantizationType] = frozenset({QT.Q4_0, QT.Q4_1, QT.Q8_0})
X8 = 0x100  # the kernel's type id of a repacked matrix: the GGUF id | X8


@functools.cache
def _x8_index(qtype: GGMLQuantizationType, nb: int) -> Tensor:
    """Byte o of a repacked group of 8 rows (``8 * nb`` blocks) is byte ``index[o]`` of the 8 raw rows' bytes."""
    size = GGML_QUANT_SIZES[qtype][1]
    head = 4 if qtype == QT.Q4_1 else 2  # the fp16 fields before the codes
    row = nb * size  # bytes per raw row
    order = [lane * row + f + j for f in range(0, head, 2) for lane in range(8) for j in range(2)]
    order += [lane * row + head + 4 * h + j for h in range((size - head) // 4) for lane in range(8) for j in range(4)]
    block = torch.tensor(order)  # group-block 0; block b is at + b * size in the raw rows
    return (block[None, :] + size * torch.arange(nb)[:, None]).reshape(-1)


def _aligned(t: Tensor, n: int) -> Tensor:
    """``t`` (uint8, last dim contiguous) if it can be viewed as ``n``-byte elements, else an aligned copy of it."""
    if t.storage_offset() % n == 0 and t.stride(-1) == 1 and all(s % n == 0 for s in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


#: rows of a matrix that ``repack_x8`` reorders at a time: its temporary copies stay this small (~4 MiB here for
#: SmolLM2's 49152-row Q8_0 head, whose whole aligned copy added 30 MB to the peak RSS of a run)
REPACK_ROWS = 4096


def repack_x8(blocks: Tensor, qtype: GGMLQuantizationType) -> Tensor:
    """Raw ``qtype`` blocks ``[N, bytes per row]`` -> the same shape, each full group of 8 rows reordered by block.

    Group-block b of rows 8g..8g+7 (8 blocks' bytes): the 8 rows' fp16 ``d``, then (Q4_1) their ``m``, then chunks
    of 32 bytes, chunk h holding the 8 rows' code bytes 4h..4h+3 in row order (4 chunks for Q4_0 / Q4_1, 8 for
    Q8_0). Rows after the last full group are kept as they are. One copy; the input is not modified.

    Two strided copies (the fp16 fields as int16, the code chunks as int32) instead of a per-byte ``index_select``
    (``_x8_index``, which ``unrepack_x8`` still uses): ~5x faster, and this runs on every weight at load. Done
    ``REPACK_ROWS`` rows at a time, so the aligned copy it may need is of a slice, not of the matrix.
    """
    n, width = blocks.shape
    full = n // 8 * 8
    out = torch.empty(n, width, dtype=torch.uint8, device=blocks.device)
    for r in range(0, full, REPACK_ROWS):
        _repack_rows(blocks[r : min(r + REPACK_ROWS, full)], qtype, out[r : min(r + REPACK_ROWS, full)])
    out[full:] = blocks[full:]
    return out


def _repack_rows(blocks: Tensor, qtype: GGMLQuantizationType, out: Tensor) -> None:
    """``repack_x8`` of ``blocks`` (a whole number of groups of 8 rows) into ``out``, contiguous, of its shape."""
    rows, width = blocks.shape
    size = GGML_QUANT_SIZES[qtype][1]
    nb, groups = width // size, rows // 8
    head = 4 if qtype == QT.Q4_1 else 2  # the fp16 fields before the codes
    src = _aligned(blocks.reshape(groups, 8, nb, size), 2)
    grouped = out.view(groups, nb, 8 * size)
    fields = grouped[..., : 8 * head].view(torch.int16).view(groups, nb, head // 2, 8)  # [group, block, field, row]
    fields.copy_(src[..., :head].view(torch.int16).permute(0, 2, 3, 1))
    codes = _aligned(src[..., head:], 4)  # a copy for Q4_0 / Q8_0, whose 4-byte chunks are 2 bytes off alignment
    chunks = grouped[..., 8 * head :].view(torch.int32).view(groups, nb, (size - head) // 4, 8)  # [group, block, h, r]
    chunks.copy_(codes.view(torch.int32).permute(0, 2, 3, 1))


def unrepack_x8(blocks: Tensor, qtype: GGMLQuantizationType) -> Tensor:
    """The inverse of ``repack_x8``: the raw GGUF blocks, a new tensor."""
    n, width = blocks.shape
    full = n // 8 * 8
    inverse = torch.argsort(_x8_index(qtype, width // GGML_QUANT_SIZES[qtype][1]))
    raw = blocks[:full].reshape(full // 8, 8 * width).index_select(1, inverse).view(full, width)
    return torch.cat((raw, blocks[full:])) if full < n else raw


def rows_x8(blocks: Tensor, qtype: GGMLQuantizationType, ids: Tensor) -> Tensor:
    """Rows ``ids`` of repacked blocks as raw GGUF rows ``[len(ids), bytes per row]``."""
    n, width = blocks.shape
    full = n // 8 * 8
    out = blocks.index_select(0, ids)  # right as it is for the rows after the last full group
    grouped = ids < full
    if bool(grouped.any()):
        sel = ids[grouped]
        inverse = torch.argsort(_x8_index(qtype, width // GGML_QUANT_SIZES[qtype][1])).view(8, width)
        groups = blocks[:full].reshape(full // 8, 8 * width).index_select(0, sel // 8)
        out[grouped] = groups.gather(1, inverse[sel % 8])
    return out


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

    def __init__(
        self,
        blocks: Tensor,
        qtype: GGMLQuantizationType,
        in_features: int,
        *,
        repack: bool | None = None,
        copy: bool = False,
    ) -> None:
        """``copy``: the buffer must not share ``blocks``' memory (e.g. a file mapping); a repacked layout is a new
        tensor anyway, so only the raw one is cloned."""
        super().__init__()
        if qtype not in KERNEL_TYPES:
            raise ValueError(f"no kernel for {qtype.name}; supported: {sorted(t.name for t in KERNEL_TYPES)}")
        expected = row_bytes(qtype, in_features)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != expected:
            raise ValueError(f"{qtype.name} blocks for {in_features} columns must be uint8 [N, {expected}]")
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        if repack is None:  # the repacked layout pays on the AVX2 path only (the scalar one unpacks it per call)
            repack = qtype in X8_TYPES and blocks.shape[0] >= 8 and kernels.has_avx2()
        #: whether ``blocks`` is in the ``repack_x8`` layout (the kernel's type id then carries ``X8``)
        self.repacked = bool(repack) and qtype in X8_TYPES
        self._qtype = int(qtype) | (X8 if self.repacked else 0)
        if self.repacked:
            blocks = repack_x8(blocks, qtype)
        elif copy and blocks.is_contiguous():
            blocks = blocks.clone()
        self.register_buffer("blocks", blocks.contiguous())

    blocks: Tensor

    def forward(self, x: Tensor) -> Tensor:
        # called ~120 times per decoded token: each skipped no-op (a view, a cast, an enum conversion) saves ~1 µs
        x2 = x.reshape(-1, self.in_features)
        y = kernels.ggml_mm(x2 if x2.dtype == torch.float32 else x2.float(), self.blocks, self._qtype, self.in_features)
        if x.dim() != 2:
            y = y.view(x.shape[:-1] + (self.out_features,))
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def raw_blocks(self) -> Tensor:
        """The blocks as the GGUF file lays them out (a copy if ``repacked``, else ``blocks`` itself)."""
        return unrepack_x8(self.blocks, self.qtype) if self.repacked else self.blocks

    def unrepack_(self) -> GGMLLinear:
        """Back to the file's layout in place (for a matrix that other code reads by rows: a tied embedding)."""
        if self.repacked:
            self.blocks = unrepack_x8(self.blocks, self.qtype)
            self.repacked, self._qtype = False, int(self.qtype)
        return self

    def dequantize(self) -> Tensor:
        """The fp32 weight ``[N, K]`` the blocks stand for."""
        return dequantize_rows(self.raw_blocks(), self.qtype, self.in_features)

    def extra_repr(self) -> str:
        layout = ", repacked x8" if self.repacked else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}{layout}"


class GGMLStack(nn.Module):
    """The row-stack of ``GGMLLinear`` parts of different types, as one linear: ``y = x @ cat(w_0, w_1, ...).T``.

    llama.cpp's Q3_K_M and Q2_K mixes store attn_v (and some ffn_up / attn_k) in another type than attn_q in the same
    layer, so wq|wk|wv (or w1|w3) cannot be one matrix of blocks; this holds each run of one type as a part and runs
    each part's kernel into its own columns of one output (``kernels.ggml_mm_parts``: the activations rounded once),
    so its outputs are q|k|v as a one-type ``GGMLLinear``'s, and the fused plan (``llama_shard.fused``) takes it too.
    A column's bits are those of its part computed alone; ``row_invariant`` as ``GGMLLinear``.
    """

    row_invariant = True

    def __init__(self, parts: list[GGMLLinear]) -> None:
        super().__init__()
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("the parts of a stacked linear must have the same number of columns")
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)

    @property
    def linears(self) -> list[GGMLLinear]:
        """The parts, typed (``nn.ModuleList`` holds them as modules)."""
        return list(self.parts)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        parts = self.linears
        blocks, qtypes = [p.blocks for p in parts], [p._qtype for p in parts]
        y = kernels.ggml_mm_parts(x2 if x2.dtype == torch.float32 else x2.float(), blocks, qtypes, self.in_features)
        if x.dim() != 2:
            y = y.view(x.shape[:-1] + (self.out_features,))
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dequantize(self) -> Tensor:
        """The fp32 weight ``[N, K]`` the parts stand for, stacked."""
        return torch.cat([p.dequantize() for p in self.linears])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class TiedEmbedding(QuantEmbedding):
    """The token embedding of a tied head: rows looked up in the head ``GGMLLinear``'s blocks, in either layout
    (one copy of the matrix: ``raw`` is the head's ``blocks``)."""

    def __init__(self, head: GGMLLinear) -> None:
        super().__init__(head.blocks, head.qtype, head.in_features)
        self.repacked = head.repacked

    def forward(self, ids: Tensor) -> Tensor:
        if not self.repacked:
            return super().forward(ids)
        rows = rows_x8(self.raw, self.qtype, ids.reshape(-1).cpu())
        return dequantize_rows(rows, self.qtype, self.dim).view(*ids.shape, self.dim).to(ids.device)


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
