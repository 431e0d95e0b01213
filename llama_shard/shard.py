"""``ShardSpec``: one slice of a model, as plain data.

Layer ranges are half-open, ``[start, end)``, everywhere in this project. Layers keep their global index on every
node, so ``layers.17`` and the KV cache of layer 17 mean the same thing wherever they live.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama_shard.errors import LlamaShardError


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """The slice ``[start, end)`` of an ``n_layers``-layer model.

    The first slice holds the token embedding, the last one the final norm and the head. ``experts`` is ``None``
    for "every expert of the MoE layers in range"; the MoE issue uses a subset.
    """

    start: int
    end: int
    n_layers: int
    experts: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.n_layers:
            raise LlamaShardError(f"invalid layer range [{self.start}, {self.end}) for a {self.n_layers}-layer model")

    @classmethod
    def whole(cls, n_layers: int) -> ShardSpec:
        return cls(0, n_layers, n_layers)

    @property
    def has_embed(self) -> bool:
        return self.start == 0

    @property
    def has_head(self) -> bool:
        return self.end == self.n_layers

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def __str__(self) -> str:
        return f"[{self.start}, {self.end}) of {self.n_layers}"


def split_evenly(n_layers: int, n_stages: int) -> list[ShardSpec]:
    """Contiguous stages whose sizes differ by at most one layer (the planner does better with real devices)."""
    if not 1 <= n_stages <= n_layers:
        raise LlamaShardError(f"cannot split {n_layers} layers into {n_stages} stages")
    base, extra = divmod(n_layers, n_stages)
    specs, start = [], 0
    for i in range(n_stages):
        end = start + base + (1 if i < extra else 0)
        specs.append(ShardSpec(start, end, n_layers))
        start = end
    return specs
