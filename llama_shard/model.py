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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight, in the same order as the HF reference.
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


class KVCache:
    """Preallocated keys and values for the layers of one stage.

    ``k[layer]`` and ``v[layer]`` are ``[slots, max_len, K, E]``: one slot per sequence in flight. Positions come
    before heads so that writing T new tokens of B rows is one indexed assignment.
    """

    def __init__(
        self, config: ModelConfig, layers: range, slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (slots, max_len, config.n_kv_heads, config.head_dim)
        self.max_len = max_len
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


@dataclass(frozen=True, slots=True)
class Batch:
    """Where a batch of rows sits: its KV slots ``[B]``, absolute positions ``[B, T]`` and the visible keys.

    Built once per step by ``Stage.batch`` and shared by every layer of the step.
    """

    slots: Tensor  # [B] long
    positions: Tensor  # [B, T] long
    cos: Tensor  # [B, T, E]
    sin: Tensor  # [B, T, E]
    length: int  # L: keys 0..L-1 are read from the cache
    mask: Tensor | None  # [B, 1, T, L] bool, None when every row sees all L keys
    # when set, attention runs row by row (B = 1 each), row i over KV slot rows[i][0] with its own mask
    # rows[i][1] [1, 1, T, L_i] of its own key count L_i: a row's shapes then never depend on its batch-mates
    rows: tuple[tuple[int, Tensor], ...] | None = None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # Set by a quantised load (``llama_shard.quant``): wq, wk, wv as one matmul, and the three are removed.
        self.wqkv: nn.Module | None = None

    def forward(self, x: Tensor, batch: Batch, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        B, T, _ = x.shape
        if self.wqkv is not None:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split((self.n_heads * self.head_dim, kv_width, kv_width), dim=-1)
            q = q.view(B, T, self.n_heads, self.head_dim)
            k = k.view(B, T, self.n_kv_heads, self.head_dim)
            v = v.view(B, T, self.n_kv_heads, self.head_dim)
        else:
            q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
            k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
            v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        cos = batch.cos.unsqueeze(2).to(x.dtype)  # [B, T, 1, E], cast first as the reference does
        sin = batch.sin.unsqueeze(2).to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache[batch.slots[:, None], batch.positions] = k.to(k_cache.dtype)
        v_cache[batch.slots[:, None], batch.positions] = v.to(v_cache.dtype)
        if batch.rows is not None:
            rows = [self._attend_row(q[i : i + 1], k_cache, v_cache, s, m) for i, (s, m) in enumerate(batch.rows)]
            out = torch.cat(rows)  # [B, H, T, E]
            return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        # slice before gathering the rows, so only L positions are copied, not the whole cache (a view of a
        # one-slot cache would skip the copy, but SDPA is then ~30x slower on its strides with a 4096-token cache)
        keys = k_cache[:, : batch.length].index_select(0, batch.slots).to(x.dtype)  # [B, L, K, E]
        values = v_cache[:, : batch.length].index_select(0, batch.slots).to(x.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=batch.mask, enable_gqa=True
        )  # [B, H, T, E]
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    @staticmethod
    def _attend_row(q: Tensor, k_cache: Tensor, v_cache: Tensor, slot: int, mask: Tensor) -> Tensor:
        """One row's attention ``[1, H, T, E]``: its query ``[1, T, H, E]`` over its slot's first L keys (mask's)."""
        length = mask.shape[-1]
        keys = k_cache[slot : slot + 1, :length].to(q.dtype).transpose(1, 2)  # [1, K, L, E], read in place
        values = v_cache[slot : slot + 1, :length].to(q.dtype).transpose(1, 2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # up
        self.w13: nn.Module | None = None  # set by a quantised load: [w1; w3] as one matmul, the two removed

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, batch: Batch, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), batch, k_cache, v_cache)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.tok_embeddings: nn.Module | None = nn.Embedding(config.vocab_size, config.dim) if spec.has_embed else None
        self.layers = nn.ModuleDict({str(i): Block(config) for i in spec.layers})
        self.norm = RMSNorm(config.dim, config.norm_eps) if spec.has_head else None
        self.output: nn.Module | None = nn.Linear(config.dim, config.vocab_size, bias=False) if spec.has_head else None
        self.inv_freq = torch.empty(0)

    def setup_rope(self, freq_factors: Tensor | None = None) -> None:
        """Compute RoPE frequencies on the stage's device (after the weights are loaded)."""
        c = self.config
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, freq_factors).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def new_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.config, self.spec.layers, slots, max_len, dtype or self.dtype, self.device)

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
        positions = start[:, None] + torch.arange(n_tokens, device=start.device)  # [B, T]
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, E/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        length = max(int(positions.max()) + 1, min_length)
        if row_key_multiple > 0:
            rows: list[tuple[int, Tensor]] = []
            for slot, pos in zip(slots.tolist(), positions, strict=True):
                n = -(-(int(pos[-1]) + 1) // row_key_multiple) * row_key_multiple
                keys = torch.arange(n, device=start.device)
                rows.append((slot, (keys[None, :] <= pos[:, None])[None, None]))  # [1, 1, T, L_i]
            return Batch(slots, positions, emb.cos(), emb.sin(), length, None, tuple(rows))
        mask = None
        if always_mask or not (n_tokens == 1 and bool((start == length - 1).all())):
            keys = torch.arange(length, device=start.device)
            mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, T, L]
        return Batch(slots, positions, emb.cos(), emb.sin(), length, mask)

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
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x.to(self.dtype)
        for i, layer in self.layers.items():
            h = layer(h, batch, cache.k[int(i)], cache.v[int(i)])
        if self.norm is None or self.output is None:
            return h
        if last_only:
            h = h[:, -1:] if last == -1 else h[:, last : last + 1]
        return self.output(self.norm(h)).float()
