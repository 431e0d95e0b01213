"""The fused step's grouped-query attention (``csrc/attention.cpp``: a KV head's query heads computed together, each
key and value converted once) gives every head the bits of the per-head kernel it replaced, bitwise.

Through ``kernels.decode_attention``, the attention of ``DecodePlan``: decode rows at many positions (key counts
around the 4-key groups of ``dot4``, the 8-lane padding of the softmax and the 32-key blocks of the grouped passes;
small steps below the parallel threshold and large ones above), a prompt chunk (rows sharing a slot, each seeing the
keys the rows before it wrote in the same call) and the two together, over fp16 and fp32 caches, for grouped configs
(8 heads over 2 KV heads, SmolLM2's 9 over 3), plain multi-head (4 over 4), and head sizes whose value pass has a
tail of 8-lane chunks (24, 80), at 1 and 2 threads and every split of a group into units of work. A control checks
the reference is attention (against float64 softmax(qk/√E)·v), so the bitwise check compares two real results.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from llama_shard import kernels

pytestmark = pytest.mark.skipif(
    not kernels.available() or not kernels.has_avx2(), reason="needs the native kernels' AVX2 code (the grouped path)"
)

MAX_LEN = 288
# (slot, position) per decode row: key counts 1..4, 5, 8, 9, 31..34, 64, 65, 131, 257, 280
DECODE = [(0, 0), (1, 3), (2, 4), (3, 7), (4, 8), (0, 30), (1, 31), (2, 32), (3, 33), (4, 63), (0, 64), (1, 130)]
DECODE += [(2, 256), (3, 279)]
CHUNK = [(5, p) for p in range(27, 45)]  # a prompt chunk: one slot, consecutive positions


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _case(
    heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, rows: list[tuple[int, int]], seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random q/k/v rows and a cache filled with random keys and values. Queries are scaled so that scores spread
    over tens of units: softmax weights from ~1 to below exp8's cutoff at -87 (exact zeros) in one row."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(len(rows), (heads + 2 * kv_heads) * head_dim, generator=g)
    qkv[:, : heads * head_dim] *= 4.0
    k = torch.randn(6, MAX_LEN, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(6, MAX_LEN, kv_heads, head_dim, generator=g).to(dtype)
    return qkv, k, v


def _run(
    qkv: Tensor, k: Tensor, v: Tensor, rows: list[tuple[int, int]], heads: int, *, grouped: bool = True, parts: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """The attention output and the caches after (copies of k and v, written by the call)."""
    kc, vc = k.clone(), v.clone()
    slots, positions = [s for s, _ in rows], [p for _, p in rows]
    out = kernels.decode_attention(qkv, kc, vc, slots, positions, heads, grouped=grouped, parts=parts)
    return out, kc, vc


CONFIGS = [(8, 2, 64), (9, 3, 64), (4, 4, 64), (8, 2, 24), (6, 2, 80)]
ROWS = {"decode": DECODE, "chunk": CHUNK, "mixed": DECODE[::2] + CHUNK + DECODE[1::2]}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "h{}-kv{}-e{}".format(*c))
@pytest.mark.parametrize("rows", list(ROWS), ids=str)
def test_grouped_heads_have_the_per_head_bits(config: tuple[int, int, int], dtype: torch.dtype, rows: str) -> None:
    heads, kv_heads, head_dim = config
    chosen = ROWS[rows]
    qkv, k, v = _case(heads, kv_heads, head_dim, dtype, chosen)
    torch.set_num_threads(1)
    ref, k_ref, v_ref = _run(qkv, k, v, chosen, heads, grouped=False)
    group = heads // kv_heads
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for parts in sorted({0, 1, 2, group}):
            out, k_out, v_out = _run(qkv, k, v, chosen, heads, grouped=True, parts=parts)
            assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
            diff = (out != ref).nonzero()
            assert diff.numel() == 0, f"{threads} threads, parts {parts}: {diff.shape[0]} differ, first {diff[0]}"


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_alone_has_its_bits_in_any_batch(threads: int) -> None:
    """Batch invariance of the grouped kernel itself: each row alone (one unit per KV head, the split of a lone
    row's groups across threads) equals that row in the whole batch (alone on the cache the batch wrote: rows of the
    batch share slots)."""
    heads, kv_heads, head_dim = 9, 3, 64
    rows = DECODE
    qkv, k, v = _case(heads, kv_heads, head_dim, torch.float16, rows, seed=1)
    torch.set_num_threads(threads)
    together, k_after, v_after = _run(qkv, k, v, rows, heads)
    for b, row in enumerate(rows):
        alone, _, _ = _run(qkv[b : b + 1], k_after, v_after, [row], heads)
        assert torch.equal(alone[0], together[b]), row


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_reference_is_attention(dtype: torch.dtype) -> None:
    """Control: the per-head kernel (and so the grouped one) is softmax(q·k/√E)·v over keys 0..position, each query
    head reading KV head h // (H/K), after the row's own key and value are written (chunk rows: the earlier rows'
    too)."""
    heads, kv_heads, head_dim = 8, 2, 64
    rows = DECODE + CHUNK
    qkv, k, v = _case(heads, kv_heads, head_dim, dtype, rows, seed=2)
    out, kc, vc = _run(qkv, k, v, rows, heads, grouped=False)
    q = qkv[:, : heads * head_dim].view(len(rows), heads, head_dim).double()
    for b, (slot, pos) in enumerate(rows):
        written = qkv[b, heads * head_dim :].view(2, kv_heads, head_dim).to(dtype)
        assert torch.equal(kc[slot, pos], written[0]) and torch.equal(vc[slot, pos], written[1])
        keys = kc[slot, : pos + 1].double()  # [n, K, E]
        values = vc[slot, : pos + 1].double()
        for h in range(heads):
            kv = h // (heads // kv_heads)
            p = torch.softmax(keys[:, kv] @ q[b, h] / math.sqrt(head_dim), dim=0)
            expected = p @ values[:, kv]
            got = out[b, h * head_dim : (h + 1) * head_dim].double()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
