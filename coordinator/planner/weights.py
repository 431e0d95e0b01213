"""Bytes of every layer in each weight format, with llama.cpp's real per-tensor type choices.

Block types (bytes per block of weights): F32 4/1, F16/BF16 2/1, Q8_0 34/32, Q5_0 22/32, Q5_1 24/32, Q4_0
18/32, Q4_K 144/256, Q5_K 176/256, Q6_K 210/256. Norm vectors and MoE routers stay F32 in GGUF files.

``q4_k_m`` follows ``llama_tensor_get_type`` in llama.cpp's ``llama-quant.cpp``: Q4_K by default; ``attn_v``
and ``ffn_down`` are Q6_K on the layers ``use_more_bits`` picks (the first and last eighth and every third in
between); ``output`` (or a tied ``token_embd``) is Q6_K; the 70B shape bumps its other ``attn_v`` to Q5_K;
8-expert models (Mixtral) keep ``attn_k``/``attn_v`` at Q8_0 and ``attn_output`` at Q5_K; a row length that is
not a multiple of 256 falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16). ``q4_0`` and ``q8_0``
quantise every matrix except the head, which llama.cpp makes Q6_K (Q8_0 for ``q8_0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from coordinator.planner.profiles import ModelProfile

#: type -> (weights per block, bytes per block)
BLOCK: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_0": (32, 18),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


class WeightFormat(StrEnum):
    BF16 = "bf16"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_K_M = "q4_k_m"
    Q4_0 = "q4_0"


#: Formats from largest to smallest, for "a smaller format would fit" advice.
FORMATS_BY_SIZE = (
    WeightFormat.BF16,
    WeightFormat.F16,
    WeightFormat.Q8_0,
    WeightFormat.Q4_K_M,
    WeightFormat.Q4_0,
)


def tensor_bytes(qtype: str, rows: int, cols: int) -> int:
    """Bytes of a ``[rows, cols]`` matrix (``cols``: row length, ggml's ne0) in ``qtype``, after fallback."""
    t = qtype
    while cols % BLOCK[t][0]:
        t = _FALLBACK.get(t, "F16")
    per, size = BLOCK[t]
    return rows * (cols // per) * size


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True, slots=True)
class WeightTable:
    """Per-layer bytes of one model in one format.

    ``layer_bytes[i]``: block ``i`` whole (all experts); ``active_bytes[i]``: what one token reads of it
    (attention, router, shared expert and ``experts_per_token`` routed experts); ``expert_bytes[i]``: one
    routed expert (0 for dense blocks). ``head_bytes`` is final norm + output matrix; a tied head counts here
    *and* in ``embed_bytes``, because the first and last stages each hold a copy.
    """

    label: str
    layer_bytes: tuple[int, ...]
    active_bytes: tuple[int, ...]
    expert_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes


def _matrix_types(fmt: WeightFormat, model: ModelProfile, i: int) -> dict[str, str]:
    """The ggml type of each matrix of block ``i``."""
    if fmt is not WeightFormat.Q4_K_M:
        t = fmt.value.upper()
        return dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), t)
    more = _use_more_bits(i, model.n_layers)
    types = dict.fromkeys(("q", "k", "o", "gate", "up"), "Q4_K")
    types["v"] = "Q6_K" if more else ("Q5_K" if model.is_70b_class else "Q4_K")
    types["down"] = "Q6_K" if more else "Q4_K"
    if model.n_experts == 8:
        types["k"] = types["v"] = "Q8_0"
        types["o"] = "Q5_K"
    return types


def _layer(model: ModelProfile, fmt: WeightFormat, i: int) -> tuple[int, int, int]:
    """(whole bytes, active bytes, one routed expert's bytes) of block ``i``."""
    t = _matrix_types(fmt, model, i)
    d, hq, hkv = model.dim, model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    norm_t = "F32" if fmt not in (WeightFormat.BF16, WeightFormat.F16) else fmt.value.upper()
    attn = (
        tensor_bytes(t["q"], hq, d)
        + tensor_bytes(t["k"], hkv, d)
        + tensor_bytes(t["v"], hkv, d)
        + tensor_bytes(t["o"], d, hq)
        + 2 * tensor_bytes(norm_t, 1, d)
    )

    def ffn(width: int) -> int:
        if width == 0:
            return 0
        gate_up = tensor_bytes(t["gate"], width, d) + tensor_bytes(t["up"], width, d)
        return gate_up + tensor_bytes(t["down"], d, width)

    if i not in model.moe_layers:
        whole = attn + ffn(model.ffn_dim)
        return whole, whole, 0
    expert = ffn(model.expert_ffn_dim)
    always = attn + ffn(model.shared_expert_ffn_dim) + tensor_bytes("F32", model.n_experts, d)
    return always + model.n_experts * expert, always + model.experts_per_token * expert, expert


def weight_table(model: ModelProfile, fmt: WeightFormat | None) -> WeightTable:
    """Bytes per layer of ``model`` in ``fmt``; ``None`` means as stored in its file (``model.stored``).

    Raises:
        ValueError: ``fmt`` is None and the model carries no stored sizes.
    """
    if fmt is None:
        s = model.stored
        if s is None:
            raise ValueError(f"model {model.name} has no stored file sizes; choose a weight format")
        active = tuple(
            lb - (model.n_experts - model.experts_per_token) * eb if i in model.moe_layers else lb
            for i, (lb, eb) in enumerate(zip(s.layer_bytes, s.expert_bytes, strict=True))
        )
        return WeightTable(s.label, s.layer_bytes, active, s.expert_bytes, s.embed_bytes, s.head_bytes)
    layers = [_layer(model, fmt, i) for i in range(model.n_layers)]
    d, v = model.dim, model.vocab_size
    if fmt in (WeightFormat.BF16, WeightFormat.F16):
        embed_t = head_t = norm_t = fmt.value.upper()
    else:
        norm_t = "F32"
        embed_t = fmt.value.upper() if fmt is not WeightFormat.Q4_K_M else "Q4_K"
        head_t = "Q8_0" if fmt is WeightFormat.Q8_0 else "Q6_K"
        if model.tie_embeddings:  # llama.cpp quantises a tied token_embd as the output tensor
            embed_t = head_t
    embed = tensor_bytes(embed_t, v, d)
    head = tensor_bytes(head_t, v, d) + tensor_bytes(norm_t, 1, d)
    return WeightTable(
        fmt.value,
        tuple(x[0] for x in layers),
        tuple(x[1] for x in layers),
        tuple(x[2] for x in layers),
        embed,
        head,
    )
