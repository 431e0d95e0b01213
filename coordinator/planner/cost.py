"""The memory model and the cost model of one stage, precomputed as prefix sums so the search asks in O(1).

Memory of a stage ``[a, b)`` on device ``d``:
    weights (its blocks, whole MoE blocks with every expert; + embedding on the first stage; + final norm and
    output matrix on the last, a tied one counted again) + KV cache (``context`` tokens x ``batch`` x
    ``micro_batches`` sequences x its blocks) + activation workspace (one prefill chunk through one block,
    fp32: hidden states, q/k/v, the attention scores against the whole context, the FFN; + the logits of
    ``batch`` rows on the last stage) + the device's runtime reserve. It must not exceed the device's usable
    memory.

Time of one decode step (``batch`` tokens, one per sequence) through the stage, a roofline per stage:
    max(FLOPs / compute, bytes read / memory bandwidth) + per-block overhead + its network legs. FLOPs: 2 x
    active parameters per token + attention (4 x heads x head_dim x mean position) per block, x batch; the
    head adds 2 x vocab x dim per token. Bytes: the active weights once per step (for MoE, the expected number
    of distinct experts the batch routes to), the KV cache up to the mean position (``context / 2``) per
    sequence. Network: every stage receives and sends one message per step (latency of its own link each way);
    the payload is ``batch x dim`` hidden values at ``activation_bytes`` each between stages, token ids at
    either end. Tokens/s: ``batch x min(micro_batches / sum of stages, 1 / slowest stage)``; the latency
    objective minimises the sum, the throughput objective the slowest stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from coordinator.planner.profiles import DeviceProfile, ModelProfile
from coordinator.planner.weights import WeightFormat, WeightTable, weight_table


class Objective(StrEnum):
    LATENCY = "latency"  # minimise the time of one step through every stage (interactive decode)
    THROUGHPUT = "throughput"  # minimise the slowest stage (pipelined micro-batches)


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """What the plan is for.

    Attributes:
        context: tokens of KV cache per sequence.
        batch: sequences decoded together in one step (one micro-batch).
        micro_batches: micro-batches in flight through the pipeline; the KV cache holds ``batch x
            micro_batches`` sequences, and tokens/s is ``batch x min(micro_batches / step, 1 / slowest
            stage)``.
        weights: weight format; ``None`` uses the sizes stored in the model's GGUF file.
        kv_bytes_per_element: 2 for an f16/bf16 cache, 4 for fp32.
        activation_bytes: bytes per hidden value on the wire between stages.
        prefill_chunk: tokens per prefill chunk (sizes the workspace).
        keep_tolerance: with ``keep=``, accept plans up to this fraction slower to keep survivors' ranges.
        exact_max_devices: up to this many devices the search over orders and subsets is exact.
    """

    context: int = 4096
    batch: int = 1
    micro_batches: int = 1
    weights: WeightFormat | None = WeightFormat.Q4_K_M
    objective: Objective = Objective.LATENCY
    kv_bytes_per_element: float = 2.0
    activation_bytes: int = 2
    prefill_chunk: int = 256
    keep_tolerance: float = 0.10
    exact_max_devices: int = 8

    def __post_init__(self) -> None:
        for attr in ("context", "batch", "micro_batches", "prefill_chunk", "exact_max_devices"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"{attr} must be > 0, got {getattr(self, attr)}")
        if self.kv_bytes_per_element <= 0 or self.activation_bytes <= 0:
            raise ValueError("kv_bytes_per_element and activation_bytes must be > 0")
        if self.keep_tolerance < 0:
            raise ValueError(f"keep_tolerance must be >= 0, got {self.keep_tolerance}")


@dataclass(frozen=True, slots=True)
class Stage:
    """One node's slice: blocks ``[start, end)`` (half-open, global indices), embedding and/or head.

    Also its memory (the four parts and the device's usable total) and its share of one decode step.
    """

    node: str
    kind: str
    start: int
    end: int
    embed: bool
    head: bool
    weights_bytes: int
    kv_bytes: int
    workspace_bytes: int
    reserve_bytes: int
    memory_bytes: int
    compute_ms: float
    hop_ms: float

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def used_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.workspace_bytes + self.reserve_bytes

    @property
    def free_bytes(self) -> int:
        return self.memory_bytes - self.used_bytes

    @property
    def ms(self) -> float:
        return self.compute_ms + self.hop_ms


class CostModel:
    """Prefix sums of one (model, devices, options) triple; ``stage_ms`` and ``fits`` are O(1)."""

    def __init__(self, model: ModelProfile, devices: Sequence[DeviceProfile], options: PlanOptions) -> None:
        self.model, self.devices, self.options = model, tuple(devices), options
        self.table: WeightTable = weight_table(model, options.weights)
        o, m, t = options, model, self.table
        L, B = m.n_layers, o.batch
        self.L, self.n = L, len(self.devices)
        mean_pos = o.context / 2
        self.kv_layer = m.kv_bytes_per_token_layer(o.kv_bytes_per_element) * o.context * B * o.micro_batches
        # expected distinct experts B tokens route to, each picking k of E uniformly
        distinct = 0.0
        if m.is_moe:
            distinct = m.n_experts * (1 - (1 - m.experts_per_token / m.n_experts) ** B)
        attn_flops = 4 * m.n_heads * m.head_dim * mean_pos
        kv_read = m.kv_bytes_per_token_layer(o.kv_bytes_per_element) * mean_pos * B
        self.W = [0] * (L + 1)  # weight bytes held
        self.Wk = [0.0] * (L + 1)  # weight + KV bytes held
        self.F = [0.0] * (L + 1)  # FLOPs per step
        self.R = [0.0] * (L + 1)  # bytes read per step
        for i in range(L):
            read: float = t.active_bytes[i]
            if i in m.moe_layers:
                read = t.active_bytes[i] + (distinct - m.experts_per_token) * t.expert_bytes[i]
            self.W[i + 1] = self.W[i] + t.layer_bytes[i]
            self.Wk[i + 1] = self.Wk[i] + t.layer_bytes[i] + self.kv_layer
            self.F[i + 1] = self.F[i] + B * (2 * m.layer_active_params(i) + attn_flops)
            self.R[i + 1] = self.R[i] + read + kv_read
        self.head_flops = B * 2 * m.vocab_size * m.dim
        tokens = max(o.prefill_chunk, B)
        ffn = m.ffn_dim
        if m.is_moe:
            ffn = max(ffn, m.experts_per_token * m.expert_ffn_dim + m.shared_expert_ffn_dim)
        qkv = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim
        self.ws_base = 4 * tokens * (4 * m.dim + qkv + 2 * ffn) + 4 * tokens * m.n_heads * o.context
        self.ws_head = 4 * B * m.vocab_size * 2
        hidden_msg, token_msg = B * m.dim * o.activation_bytes, B * 4
        # cap[d][first][last]: bytes left for blocks + their KV
        self.cap: list[list[list[float]]] = []
        self.hop: list[list[list[float]]] = []
        for d in self.devices:
            caps = [[0.0, 0.0], [0.0, 0.0]]
            hops = [[0.0, 0.0], [0.0, 0.0]]
            for first in (0, 1):
                for last in (0, 1):
                    fixed = d.reserve.bytes + self.ws_base + (self.ws_head + t.head_bytes if last else 0)
                    caps[first][last] = d.memory.bytes - fixed - (t.embed_bytes if first else 0)
                    payload = (token_msg if first else hidden_msg) + (token_msg if last else hidden_msg)
                    hops[first][last] = 2 * d.latency_ms + payload * 8 / (d.link_gbits * 1e9) * 1e3
            self.cap.append(caps)
            self.hop.append(hops)

    def fits(self, d: int, a: int, b: int) -> bool:
        return self.Wk[b] - self.Wk[a] <= self.cap[d][a == 0][b == self.L]

    def compute_ms(self, d: int, a: int, b: int) -> float:
        dev = self.devices[d]
        flops, read = self.F[b] - self.F[a], self.R[b] - self.R[a]
        if b == self.L:
            flops += self.head_flops
            read += self.table.head_bytes
        t = max(flops / (dev.tflops * 1e12), read / (dev.membw_gbs * 1e9)) * 1e3
        return t + (b - a) * dev.layer_overhead_ms

    def stage_ms(self, d: int, a: int, b: int) -> float:
        return self.compute_ms(d, a, b) + self.hop[d][a == 0][b == self.L]

    def stage(self, d: int, a: int, b: int) -> Stage:
        dev, t = self.devices[d], self.table
        first, last = a == 0, b == self.L
        weights = self.W[b] - self.W[a] + (t.embed_bytes if first else 0) + (t.head_bytes if last else 0)
        return Stage(
            node=dev.name,
            kind=dev.kind.value,
            start=a,
            end=b,
            embed=first,
            head=last,
            weights_bytes=weights,
            kv_bytes=round(self.kv_layer * (b - a)),
            workspace_bytes=round(self.ws_base + (self.ws_head if last else 0)),
            reserve_bytes=dev.reserve.bytes,
            memory_bytes=dev.memory.bytes,
            compute_ms=self.compute_ms(d, a, b),
            hop_ms=self.hop[d][first][last],
        )

    def min_stage_bytes(self, d: int) -> float:
        """The least one stage on device ``d`` needs: its smallest block (middle stage) and fixed costs."""
        dev = self.devices[d]
        smallest = min((self.Wk[i + 1] - self.Wk[i] for i in range(self.L)), default=0.0)
        return smallest + dev.memory.bytes - self.cap[d][0][0]

    def feasible(self) -> bool:
        """Whether any ordered subset of the devices holds the model (exact up to 12 devices).

        ``reach[mask]`` is the furthest block boundary that non-last stages on ``mask`` can cover. Starting
        later never helps the next stage (fewer blocks, fewer bytes), so the furthest reach dominates and the
        search is exact over every order.
        """
        L, n = self.L, self.n
        if n > 12:
            order = sorted(range(n), key=lambda d: -self.devices[d].memory.bytes)
            a = 0
            for d in order:
                if self.fits(d, a, L):
                    return True
                b = a
                while b + 1 < L and self.fits(d, a, b + 1):
                    b += 1
                a = b
            return False
        reach = [-1] * (1 << n)
        reach[0] = 0
        for mask in range(1 << n):
            a = reach[mask]
            if a < 0:
                continue
            for d in range(n):
                if mask >> d & 1:
                    continue
                if self.fits(d, a, L):
                    return True
                b = a
                while b + 1 < L and self.fits(d, a, b + 1):
                    b += 1
                if b > a and b > reach[mask | 1 << d]:
                    reach[mask | 1 << d] = b
        return False
