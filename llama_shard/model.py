"""The Llama decoder as math: RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU, and a *stage*.

A ``Stage`` is the model restricted to the half-open layer range of a ``ShardSpec``: it holds the token embedding
only if it is first, the final norm and head only if it is last, and its layers under their global indices
(``layers["17"]``). The whole model is the stage ``[0, n)``.

Shape legend: B batch rows, T new tokens per row, L cached length, D model dim, H query heads, K key/value heads,
E head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_shard.config import ModelConfig, RopeScaling
from llama_shard.shard import ShardSpec


class Linear(nn.Linear):
    """``nn.Linear`` that skips the random init of a meta weight: a ``Stage`` is built on the meta device and then
    loaded, and torch's ``kaiming_uniform_`` on meta runs its decompositions in Python (~0.1 ms a layer, ~20 ms of
    a cold start for SmolLM2's 211). A real weight is initialised as ``nn.Linear`` does."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight, in the same order as the HF reference (the casts are
        # skipped where they are no-ops: each is still a dispatched op). On CPU ``mean`` is ``sum`` then ``div_`` by
        # the count and ``pow(2)`` is ``x * x``: the same bits in cheaper ops (mean costs ~4x a sum for one row).
        # The in-place ops work on temporaries of this function and compute what their out-of-place forms would.
        if x.dtype == torch.float32:
            return (x * (x * x).sum(-1, keepdim=True).div_(x.shape[-1]).add_(self.eps).rsqrt_()).mul_(self.weight)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling, freq_factors: Tensor | None = None) -> Tensor:
    """Inverse frequencies ``[E/2]`` with the checkpoint's scaling applied (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:  # Llama 3.1 GGUF: the scaling is baked into an explicit per-frequency tensor
        return inv_freq / freq_factors.float()
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` (x ``[..., E]``) with the sign of ``rotate_half`` folded into
    ``sin_signed`` (``Batch.sin``): ``-a * s == a * -s`` exactly, so the bits are the reference's, in 4 ops not 8."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


#: positions the RoPE tables start with (they grow by doubling)
_ROPE_MIN_POSITIONS = 1024
#: a step of at most this many rows writes its KV as a narrow ``copy_`` per row; more rows: one ``index_put``
_MAX_SPAN_ROWS = 2


class KVCache:
    """Preallocated keys and values for the layers of one stage.

    ``k[layer]`` and ``v[layer]`` are ``[slots, max_len, K, E]``: one slot per sequence in flight. Positions come
    before heads so that writing T new tokens of B rows is one indexed assignment. Of ``dtype`` (the stage's
    ``kv_dtype``): new keys and values are cast to it when written (rounded to nearest even, for float16) and read
    back in the activation dtype, so attention computes in the activations' precision on the rounded values.
    """

    def __init__(
        self, config: ModelConfig, layers: range, slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (slots, max_len, config.n_kv_heads, config.head_dim)
        self.max_len, self.dtype = max_len, dtype
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


@dataclass(frozen=True, slots=True)
class Batch:
    """Where a batch of rows sits: its KV slots ``[B]``, absolute positions ``[B, T]`` and the visible keys.

    Built once per step by ``Stage.batch`` and shared by every layer of the step: everything a layer needs that
    does not depend on its weights is computed here once, not per layer.
    """

    slots: Tensor  # [B] long
    positions: Tensor  # [B, T] long
    cos: Tensor  # [B, T, 1, E] in the activation dtype
    sin: Tensor  # [B, T, 1, E] in the activation dtype, first half negated: rotate_half's sign folded in
    length: int  # L: keys 0..L-1 are read from the cache
    # [B, 1, T, L] additive (0 where visible, -inf where not, in the activation dtype: what SDPA makes of a bool
    # mask, made once per step instead of once per layer), None when every row sees all L keys
    mask: Tensor | None
    # when set, attention runs row by row (B = 1 each), row i over KV slot rows[i][0] with its own additive mask
    # rows[i][1] [1, 1, T, L_i] of its own key count L_i: a row's shapes then never depend on its batch-mates
    rows: tuple[tuple[int, Tensor], ...] | None = None
    # (slot, start) per row, when the KV writes are cheaper as one narrow copy per row than as one index_put
    spans: tuple[tuple[int, int], ...] | None = None
    # with rows and T = 1: attention by two small matmuls per row (Attention._decode_row) instead of SDPA
    row_matmul: bool = False


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Set by a quantised load (``llama_shard.quant``): wq, wk, wv as one matmul, and the three are removed.
        self.wqkv: nn.Module | None = None

    def forward(self, x: Tensor, batch: Batch, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        B, T, _ = x.shape
        H, K, E = self.n_heads, self.n_kv_heads, self.head_dim
        cos, sin = batch.cos, batch.sin
        if cos.dtype != x.dtype:  # tables are built in the stage's dtype; cast first as the reference does
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.wqkv is not None:
            qkv = self.wqkv(x).view(B, T, H + 2 * K, E)
            qk = apply_rope(qkv[:, :, : H + K], cos, sin)  # q and k heads in one go
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + K :]
        else:
            q = apply_rope(self.wq(x).view(B, T, H, E), cos, sin)
            k = apply_rope(self.wk(x).view(B, T, K, E), cos, sin)
            v = self.wv(x).view(B, T, K, E)
        # into the cache's dtype: a float16 cache rounds to nearest even, as the fused plan (kernels/csrc/decode.cpp)
        if batch.spans is not None:  # contiguous positions per row: a narrow copy_ is cheaper than an index_put
            for b, (slot, start) in enumerate(batch.spans):
                k_cache[slot, start : start + T].copy_(k[b])
                v_cache[slot, start : start + T].copy_(v[b])
        else:
            k_cache[batch.slots[:, None], batch.positions] = k.to(k_cache.dtype)
            v_cache[batch.slots[:, None], batch.positions] = v.to(v_cache.dtype)
        if batch.row_matmul and batch.rows is not None:
            outs = [self._decode_row(q[i], k_cache, v_cache, s, m[0]) for i, (s, m) in enumerate(batch.rows)]
            out = outs[0] if B == 1 else torch.cat(outs)  # [B, 1, H·E]
            return self.wo(out.to(x.dtype))
        if batch.rows is not None:
            rows = [self._attend_row(q[i : i + 1], k_cache, v_cache, s, m) for i, (s, m) in enumerate(batch.rows)]
            out = rows[0] if B == 1 else torch.cat(rows)  # [B, H, T, E]
            return self.wo(out.transpose(1, 2).reshape(B, T, H * E))
        # slice before gathering the rows, so only L positions are copied, not the whole cache (a view of a
        # one-slot cache would skip the copy, but SDPA is then ~30x slower on its strides with a 4096-token cache)
        keys = k_cache[:, : batch.length].index_select(0, batch.slots)  # [B, L, K, E]
        values = v_cache[:, : batch.length].index_select(0, batch.slots)
        if keys.dtype != x.dtype:
            keys, values = keys.to(x.dtype), values.to(x.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=batch.mask, enable_gqa=True
        )  # [B, H, T, E]
        return self.wo(out.transpose(1, 2).reshape(B, T, H * E))

    @staticmethod
    def _attend_row(q: Tensor, k_cache: Tensor, v_cache: Tensor, slot: int, mask: Tensor) -> Tensor:
        """One row's attention ``[1, H, T, E]``: its query ``[1, T, H, E]`` over its slot's first L keys (mask's)."""
        length = mask.shape[-1]
        keys = k_cache[slot : slot + 1, :length].transpose(1, 2)  # [1, K, L, E], read in place
        values = v_cache[slot : slot + 1, :length].transpose(1, 2)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)

    def _decode_row(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slot: int, bias: Tensor) -> Tensor:
        """One row's attention for one query, ``[1, 1, H·E]`` fp32: its query ``[1, H, E]`` over its slot's first
        L_i keys (``bias [1, 1, L_i]``), as two small matmuls with grouped-query heads by reshape (the G = H/K query
        heads of a KV head are adjacent, as ``repeat_kv`` pairs them). Fewer ops than SDPA for T = 1, but not cheaper
        here: see ``Stage.decode_matmul``, which turns it on.

        Row-invariant: it reads only the row's query, its own slot and its own key count.
        """
        K, E = self.n_kv_heads, self.head_dim
        length = bias.shape[-1]
        keys = k_cache[slot, :length]  # [L, K, E], read in place
        values = v_cache[slot, :length]
        if keys.dtype != torch.float32:
            keys, values, bias = keys.float(), values.float(), bias.float()
        qg = q.float().view(K, self.n_heads // K, E)  # [K, G, E]
        scores = torch.baddbmm(bias, qg, keys.permute(1, 2, 0), alpha=E**-0.5)  # [K, G, L], masked keys -inf
        out = torch.bmm(scores.softmax(-1), values.transpose(0, 1))  # [K, G, E]
        return out.view(1, 1, self.n_heads * E)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = Linear(config.dim, config.ffn_dim, bias=False)  # gate
        self.w2 = Linear(config.ffn_dim, config.dim, bias=False)  # down
        self.w3 = Linear(config.dim, config.ffn_dim, bias=False)  # up
        self.w13: nn.Module | None = None  # set by a quantised load: [w1; w3] as one matmul, the two removed

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate_up = self.w13(x)
            half = gate_up.shape[-1] // 2
            return self.w2(F.silu(gate_up[..., :half]).mul_(gate_up[..., half:]))  # in place: one allocation less
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One decoder layer. ``kernels/csrc/decode.cpp`` computes the same math for packed stages
    (``llama_shard.fused``): a change here must be made there too, or ``fused._build`` must decline the stage."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, batch: Batch, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        # the residual adds in place into the sublayers' fresh outputs (a + b == b + a bitwise): no allocation
        h = self.attention(self.attention_norm(x), batch, k_cache, v_cache).add_(x)
        return self.feed_forward(self.ffn_norm(h)).add_(h)


class Stage(nn.Module):
    """The layers ``spec.layers`` of a model, plus the embedding if first and norm + head if last.

    Build with ``Stage(config, spec)`` under ``torch.device("meta")`` and fill with ``load_state_dict(...,
    assign=True)`` (see ``llama_shard.loading``), so no memory is allocated for weights twice.
    """

    def __init__(self, config: ModelConfig, spec: ShardSpec) -> None:
        super().__init__()
        if spec.n_layers != config.n_layers:
            raise ValueError(f"shard {spec} does not match a {config.n_layers}-layer model")
        self.config, self.spec = config, spec
        # nn.Embedding / nn.Linear here; a quantised load swaps in modules from ``llama_shard.quant``.
        # ``_weight``: no random init (a stage is built on the meta device and loaded; torch 2.13's normal_ init
        # imports torch._dynamo and sympy: ~1.3 s of CPU and ~70 MB of RSS for nothing)
        self.tok_embeddings: nn.Module | None = (
            nn.Embedding(config.vocab_size, config.dim, _weight=torch.empty(config.vocab_size, config.dim))
            if spec.has_embed
            else None
        )
        self.layers = nn.ModuleDict({str(i): Block(config) for i in spec.layers})
        self.norm = RMSNorm(config.dim, config.norm_eps) if spec.has_head else None
        self.output: nn.Module | None = Linear(config.dim, config.vocab_size, bias=False) if spec.has_head else None
        self.inv_freq = torch.empty(0)
        self._rope: tuple[Tensor, Tensor] | None = None  # see _rope_table

    #: the KV cache's element type (``new_cache``); None: the compute dtype. ``llama_shard.loading.load_stage``
    #: sets it from ``llama_shard.config.kv_cache_dtype``: float16 for quantised stages, else the compute dtype.
    kv_dtype: torch.dtype | None = None

    #: decode rows of a row-by-row step (T = 1) attend by two small matmuls (``Attention._decode_row``), not SDPA.
    #: Off: it pays ~3% of a token at 1 thread, but at 2 threads MKL runs each tiny bmm as parallel regions, which on
    #: a busy 2-core machine cost milliseconds each (measured 13.7 ms per bmm vs 0.7 ms per SDPA call at load 7).
    decode_matmul: bool = False

    def setup_rope(self, freq_factors: Tensor | None = None) -> None:
        """Compute RoPE frequencies on the stage's device (after the weights are loaded)."""
        c = self.config
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, freq_factors).to(self.device)
        self._rope = None

    def _rope_table(self, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos`` and sign-folded ``sin`` ``[N, E]`` in ``dtype`` for positions ``0..N-1``, ``N >= n``: computed
        once (grown by doubling) with the per-position ops of the reference, so a step only slices or gathers."""
        table = self._rope
        if table is None or table[0].shape[0] < n or table[0].dtype != dtype or table[0].device != self.inv_freq.device:
            size = max(_ROPE_MIN_POSITIONS, 1 << (n - 1).bit_length())
            positions = torch.arange(size, device=self.inv_freq.device)
            freqs = positions[:, None].float() * self.inv_freq  # [N, E/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            half = freqs.shape[-1]
            cos = emb.cos().to(dtype)  # cast first as the reference does
            sin = emb.sin().to(dtype)
            table = self._rope = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))  # rotate_half's sign
        return table

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def new_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A zeroed cache of ``slots`` x ``max_len`` positions, in ``dtype`` (default: ``kv_dtype``)."""
        return KVCache(self.config, self.spec.layers, slots, max_len, dtype or self.kv_dtype or self.dtype, self.device)

    def batch(
        self,
        slots: Tensor,
        start: Tensor,
        n_tokens: int,
        *,
        min_length: int = 0,
        always_mask: bool = False,
        row_key_multiple: int = 0,
    ) -> Batch:
        """Positions, RoPE tables and mask for B rows that each add ``n_tokens`` at their own ``start``.

        ``min_length`` reads at least that many keys (the mask hides those past each position); ``always_mask``
        passes a mask even where every row sees all keys. ``row_key_multiple`` > 0: attention runs row by row,
        each row reading its own key count rounded up to that multiple, always masked (``Batch.rows``). All three
        fix kernel shapes (``llama_shard.batching``).
        """
        device, dtype = start.device, self.dtype
        positions = start[:, None] + torch.arange(n_tokens, device=device)  # [B, T]
        starts = start.tolist()
        last = max(starts) + n_tokens
        cos_table, sin_table = self._rope_table(last, dtype)
        if len(starts) == 1:  # one row: the tables' rows as views
            cos = cos_table[starts[0] : last][None, :, None]  # [1, T, 1, E]
            sin = sin_table[starts[0] : last][None, :, None]
        else:
            cos, sin = cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2)  # [B, T, 1, E]
        length = max(last, min_length)
        ninf = torch.tensor(float("-inf"), dtype=dtype, device=device)
        zero = torch.zeros((), dtype=dtype, device=device)
        spans = None
        if len(starts) <= _MAX_SPAN_ROWS:  # positions are start..start+T-1 per row: narrow copies, no index_put
            spans = tuple(zip(slots.tolist(), starts, strict=True))
        if row_key_multiple > 0:
            rows: list[tuple[int, Tensor]] = []
            for slot, s in zip(slots.tolist(), starts, strict=True):
                n = -(-(s + n_tokens) // row_key_multiple) * row_key_multiple
                visible = torch.arange(n, device=device) <= torch.arange(s, s + n_tokens, device=device)[:, None]
                rows.append((slot, zero.where(visible, ninf)[None, None]))  # [1, 1, T, L_i]
            matmul = n_tokens == 1 and self.decode_matmul
            return Batch(slots, positions, cos, sin, length, None, tuple(rows), spans, matmul)
        mask = None
        if always_mask or not (n_tokens == 1 and all(s == length - 1 for s in starts)):
            visible = torch.arange(length, device=device)[None, None, :] <= positions[:, :, None]
            mask = zero.where(visible, ninf).unsqueeze(1)  # [B, 1, T, L]
        return Batch(slots, positions, cos, sin, length, mask, spans=spans)

    def forward(self, x: Tensor, batch: Batch, cache: KVCache, *, last_only: bool = False, last: int = -1) -> Tensor:
        """Run this stage.

        Args:
            x: token ids ``[B, T]`` on the first stage, hidden states ``[B, T, D]`` elsewhere.
            batch: from ``Stage.batch``.
            cache: this stage's KV cache.
            last_only: on the last stage, compute logits for one position of each row only: ``last`` (by default
                the last one; a padded prompt chunk names its last real token).

        Returns:
            Logits ``[B, T or 1, V]`` (fp32) on the last stage, hidden states ``[B, T, D]`` elsewhere.
        """
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x.to(batch.cos.dtype)
        for i, layer in zip(self.spec.layers, self.layers.values(), strict=True):
            h = layer(h, batch, cache.k[i], cache.v[i])
        if self.norm is None or self.output is None:
            return h
        if last_only:
            h = h[:, -1:] if last == -1 else h[:, last : last + 1]
        return self.output(self.norm(h)).float()
