"""Value types the planner works on: ``Memory``, ``DeviceProfile``, ``ModelProfile`` and the named presets.

Sizes: ``Memory.parse("16GB")`` is decimal (16 * 10^9 bytes), ``Memory.parse("16GiB")`` binary (16 * 2^30).
Every figure the planner shows in GB is decimal.

Device defaults per kind (used where a figure is not declared or measured; all are *effective*, sustained
figures, not datasheet peaks):

| kind | tflops | membw GB/s | link Gbit/s | latency ms | reserve | per-layer overhead ms |
|------|--------|------------|-------------|------------|---------|-----------------------|
| cpu  | 1.0    | 40         | 1.0         | 0.5        | 1.0 GB  | 0.03                  |
| cuda | 40.0   | 600        | 1.0         | 0.5        | 1.0 GB  | 0.05                  |
| mps  | 8.0    | 150        | 1.0         | 0.5        | 1.5 GB  | 0.08                  |

``latency_ms`` is the fixed cost of one message into or out of the device (gRPC + kernel + one LAN leg); a hop
between two nodes pays the sender's and the receiver's. ``reserve`` is memory kept back for the runtime itself
(Python, torch, a CUDA context, allocator slack). The per-layer overhead is the launch/dispatch cost of one
block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import total_ordering

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


@total_ordering
@dataclass(frozen=True, slots=True)
class Memory:
    """An amount of memory in bytes. ``16GB`` is decimal, ``16GiB`` binary."""

    bytes: int

    def __post_init__(self) -> None:
        if self.bytes < 0:
            raise ValueError(f"memory cannot be negative, got {self.bytes} bytes")

    @classmethod
    def parse(cls, text: str) -> Memory:
        """Parse ``16GB``, ``16GiB``, ``512MB``, ``1.5TB`` or a plain byte count.

        Raises:
            ValueError: the text is not a size.
        """
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f"not a memory size: {text!r} (write e.g. 16GB or 16GiB)")
        unit = (m.group(2) or "").lower().rstrip("b")
        return cls(round(float(m.group(1)) * _UNITS[unit]))

    @classmethod
    def from_gb(cls, gb: float) -> Memory:
        return cls(round(gb * 10**9))

    @classmethod
    def from_gib(cls, gib: float) -> Memory:
        return cls(round(gib * 2**30))

    @property
    def gb(self) -> float:
        return self.bytes / 10**9

    @property
    def gib(self) -> float:
        return self.bytes / 2**30

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.bytes + other.bytes)

    def __sub__(self, other: Memory) -> Memory:
        return Memory(max(0, self.bytes - other.bytes))

    def __lt__(self, other: Memory) -> bool:
        return self.bytes < other.bytes

    def __str__(self) -> str:
        return f"{self.gb:.2f} GB"


class DeviceKind(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


@dataclass(frozen=True, slots=True)
class KindDefaults:
    tflops: float
    membw_gbs: float
    link_gbits: float
    latency_ms: float
    reserve: Memory
    layer_overhead_ms: float


KIND_DEFAULTS: Mapping[DeviceKind, KindDefaults] = {
    DeviceKind.CPU: KindDefaults(1.0, 40.0, 1.0, 0.5, Memory.from_gb(1.0), 0.03),
    DeviceKind.CUDA: KindDefaults(40.0, 600.0, 1.0, 0.5, Memory.from_gb(1.0), 0.05),
    DeviceKind.MPS: KindDefaults(8.0, 150.0, 1.0, 0.5, Memory.from_gb(1.5), 0.08),
}


_SPEC_KEYS = ("kind", "tflops", "membw", "link", "latency")


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One machine as the planner sees it: what it can hold and how fast it is.

    Attributes:
        name: the node's name (unique in a cluster).
        memory: usable memory for this node's work (the runtime reserve is taken out of it).
        tflops: sustained compute, 10^12 FLOP/s.
        membw_gbs: sustained memory read bandwidth, GB/s.
        link_gbits: network link, Gbit/s.
        latency_ms: fixed cost of one message into or out of the node.
    """

    name: str
    kind: DeviceKind
    memory: Memory
    tflops: float
    membw_gbs: float
    link_gbits: float
    latency_ms: float
    reserve: Memory
    layer_overhead_ms: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a device needs a name")
        for attr in ("tflops", "membw_gbs", "link_gbits"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"device {self.name}: {attr} must be > 0, got {getattr(self, attr)}")
        if self.latency_ms < 0 or self.layer_overhead_ms < 0:
            raise ValueError(f"device {self.name}: latencies must be >= 0")

    @classmethod
    def declare(
        cls,
        name: str,
        memory: Memory | str,
        kind: DeviceKind | str = DeviceKind.CPU,
        *,
        tflops: float | None = None,
        membw_gbs: float | None = None,
        link_gbits: float | None = None,
        latency_ms: float | None = None,
        reserve: Memory | None = None,
        layer_overhead_ms: float | None = None,
    ) -> DeviceProfile:
        """A device with the documented defaults of its kind for every figure not given."""
        k = DeviceKind(kind)
        d = KIND_DEFAULTS[k]
        mem = Memory.parse(memory) if isinstance(memory, str) else memory
        return cls(
            name=name,
            kind=k,
            memory=mem,
            tflops=d.tflops if tflops is None else tflops,
            membw_gbs=d.membw_gbs if membw_gbs is None else membw_gbs,
            link_gbits=d.link_gbits if link_gbits is None else link_gbits,
            latency_ms=d.latency_ms if latency_ms is None else latency_ms,
            reserve=d.reserve if reserve is None else reserve,
            layer_overhead_ms=d.layer_overhead_ms if layer_overhead_ms is None else layer_overhead_ms,
        )

    @classmethod
    def from_spec(cls, spec: str) -> DeviceProfile:
        """Parse ``NAME=MEM[,kind=cpu|cuda|mps][,tflops=X][,membw=GB/s][,link=Gbit/s][,latency=ms]``.

        Raises:
            ValueError: a malformed spec, with what was wrong.
        """
        head, *rest = spec.split(",")
        name, sep, mem = head.partition("=")
        if not sep or not name.strip() or not mem.strip():
            raise ValueError(f"--device {spec!r}: expected NAME=MEM, e.g. laptop=16GB")
        fields: dict[str, str] = {}
        for item in rest:
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _SPEC_KEYS or not value.strip():
                raise ValueError(f"--device {spec!r}: bad field {item!r} (known: {', '.join(_SPEC_KEYS)})")
            fields[key] = value.strip()
        try:
            memory = Memory.parse(mem)
        except ValueError as e:
            raise ValueError(f"--device {spec!r}: {e}") from None
        try:
            kind = DeviceKind(fields.get("kind", "cpu").lower())
        except ValueError:
            raise ValueError(f"--device {spec!r}: kind must be cpu, cuda or mps") from None
        numbers: dict[str, float] = {}
        for key in ("tflops", "membw", "link", "latency"):
            if key in fields:
                try:
                    numbers[key] = float(fields[key])
                except ValueError:
                    msg = f"--device {spec!r}: {key} must be a number, got {fields[key]!r}"
                    raise ValueError(msg) from None
        return cls.declare(
            name.strip(),
            memory,
            kind,
            tflops=numbers.get("tflops"),
            membw_gbs=numbers.get("membw"),
            link_gbits=numbers.get("link"),
            latency_ms=numbers.get("latency"),
        )

    def with_memory(self, memory: Memory) -> DeviceProfile:
        return replace(self, memory=memory)


@dataclass(frozen=True, slots=True)
class StoredWeights:
    """Exact bytes of a model as a file stores them (from a GGUF header's tensor infos).

    ``layer_bytes[i]`` counts every tensor of block ``i`` (all its experts); ``expert_bytes[i]`` is one
    expert's share of block ``i`` (0 for dense blocks); ``head_bytes`` includes the final norm and, for a tied
    head, the embedding matrix again (the last stage holds its own copy).
    """

    label: str
    layer_bytes: tuple[int, ...]
    expert_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """The shape of a Llama-family decoder, enough to size and time every layer in any weight format.

    Attributes:
        ffn_dim: SwiGLU width of dense layers.
        n_experts / experts_per_token / expert_ffn_dim: routed experts of MoE layers (0 for dense models).
        shared_expert_ffn_dim: width of an always-on shared expert in MoE layers (Llama 4), 0 if none.
        moe_layers: indices of the MoE layers.
        is_70b_class: llama.cpp's ``LLM_TYPE_70B`` (80 layers, GQA), which bumps ``attn_v`` in K-quants.
        stored: exact bytes when read from a GGUF header; the planner uses them for ``weights=None``.
    """

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    n_experts: int = 0
    experts_per_token: int = 0
    expert_ffn_dim: int = 0
    shared_expert_ffn_dim: int = 0
    moe_layers: frozenset[int] = field(default_factory=frozenset)
    stored: StoredWeights | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.n_heads <= 0 or self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for attr in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"model {self.name}: {attr} must be > 0, got {getattr(self, attr)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.moe_layers:
            if not (0 < self.experts_per_token <= self.n_experts and self.expert_ffn_dim > 0):
                raise ValueError(
                    f"model {self.name}: MoE layers need 0 < experts_per_token ({self.experts_per_token}) "
                    f"<= n_experts ({self.n_experts}) and expert_ffn_dim > 0 ({self.expert_ffn_dim})"
                )
            bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"model {self.name}: MoE layer indices {bad} outside [0, {self.n_layers})")
        if self.stored is not None and len(self.stored.layer_bytes) != self.n_layers:
            raise ValueError(
                f"model {self.name}: stored weights list {len(self.stored.layer_bytes)} layers, "
                f"the shape has {self.n_layers}"
            )

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def is_70b_class(self) -> bool:
        return self.n_layers == 80 and self.n_heads != self.n_kv_heads and not self.is_moe

    # ---- parameter counts ----------------------------------------------------------------------------

    def attn_params(self) -> int:
        q = self.dim * self.n_heads * self.head_dim
        kv = self.dim * self.n_kv_heads * self.head_dim
        return 2 * q + 2 * kv + 2 * self.dim  # wq, wo, wk, wv, two norms

    def layer_params(self, i: int) -> int:
        """All parameters of block ``i`` (every expert of an MoE block)."""
        if i in self.moe_layers:
            routed = self.n_experts * 3 * self.dim * self.expert_ffn_dim
            return self._moe_always() + routed
        return self.attn_params() + 3 * self.dim * self.ffn_dim

    def _moe_always(self) -> int:
        """Attention, shared expert and router of an MoE block: what every token touches."""
        return self.attn_params() + 3 * self.dim * self.shared_expert_ffn_dim + self.dim * self.n_experts

    def layer_active_params(self, i: int) -> int:
        """Parameters one token touches in block ``i``."""
        if i in self.moe_layers:
            routed = self.experts_per_token * 3 * self.dim * self.expert_ffn_dim
            return self._moe_always() + routed
        return self.layer_params(i)

    def embed_params(self) -> int:
        return self.vocab_size * self.dim

    def head_params(self) -> int:
        """Final norm + output matrix (a tied head still needs its matrix on the last stage)."""
        return self.dim + self.vocab_size * self.dim

    def total_params(self) -> int:
        """Unique parameters (a tied head is counted once, as published counts do)."""
        head = self.dim if self.tie_embeddings else self.head_params()
        return self.embed_params() + head + sum(self.layer_params(i) for i in range(self.n_layers))

    def active_params(self) -> int:
        head = self.dim if self.tie_embeddings else self.head_params()
        return self.embed_params() + head + sum(self.layer_active_params(i) for i in range(self.n_layers))

    def kv_bytes_per_token_layer(self, bytes_per_element: float) -> float:
        """K and V of one token in one layer."""
        return 2 * self.n_kv_heads * self.head_dim * bytes_per_element


def _llama4(name: str, n_experts: int, interleave: int) -> ModelProfile:
    return ModelProfile(
        name=name,
        vocab_size=202048,
        dim=5120,
        n_layers=48,
        n_heads=40,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=16384,
        max_seq_len=1048576 if n_experts == 128 else 10485760,
        n_experts=n_experts,
        experts_per_token=1,
        expert_ffn_dim=8192,
        shared_expert_ffn_dim=8192,
        # transformers' Llama4TextConfig: MoE layers are interleave-1, 2*interleave-1, ...
        moe_layers=frozenset(range(interleave - 1, 48, interleave)),
    )


#: Published shapes (the HF ``config.json`` of each model; Llama 4 text decoder only).
PRESETS: Mapping[str, ModelProfile] = {
    "smollm2-135m": ModelProfile("smollm2-135m", 49152, 576, 30, 9, 3, 1536, tie_embeddings=True),
    "llama-3.2-1b": ModelProfile(
        "llama-3.2-1b", 128256, 2048, 16, 32, 8, 8192, head_dim=64, tie_embeddings=True, max_seq_len=131072
    ),
    "llama-3.2-3b": ModelProfile(
        "llama-3.2-3b", 128256, 3072, 28, 24, 8, 8192, head_dim=128, tie_embeddings=True, max_seq_len=131072
    ),
    "llama-3.1-8b": ModelProfile("llama-3.1-8b", 128256, 4096, 32, 32, 8, 14336, max_seq_len=131072),
    "llama-3.1-70b": ModelProfile("llama-3.1-70b", 128256, 8192, 80, 64, 8, 28672, max_seq_len=131072),
    "llama-3.1-405b": ModelProfile("llama-3.1-405b", 128256, 16384, 126, 128, 8, 53248, max_seq_len=131072),
    "mixtral-8x7b": ModelProfile(
        "mixtral-8x7b",
        32000,
        4096,
        32,
        32,
        8,
        14336,
        max_seq_len=32768,
        n_experts=8,
        experts_per_token=2,
        expert_ffn_dim=14336,
        moe_layers=frozenset(range(32)),
    ),
    "llama-4-scout": _llama4("llama-4-scout", 16, 1),
    "llama-4-maverick": _llama4("llama-4-maverick", 128, 2),
}


def preset(name: str) -> ModelProfile:
    """A named preset. Raises ``KeyError`` with the known names."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})") from None
