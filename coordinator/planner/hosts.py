"""Nodes that share one machine: their memory and cores are shared out before planning.

Each node measures its machine: several node processes on one machine (``serve --nodes N``, or a ``join`` beside
them) all see the same free memory and the same cores. Planned as they report themselves, N of them would each be
given the whole machine's free memory. ``share_hosts`` rewrites their ``DeviceProfile``s so that together they
claim no more than the machine has:

- **Memory**: the machine's free memory (``HostShare.pool``, the largest figure any of them reported: they measured
  the same memory at different moments) is split by water-filling. A node capped below an equal share (``join
  --memory``) keeps its cap, and the others split the rest equally. Each node still keeps its own runtime reserve
  out of its share (``DeviceProfile.reserve``): every process has its own Python and torch.
- **Compute** (CPU nodes): they measured the same cores, each at a moment when the others (and whatever else runs
  there) took a different part of them, so each is given the best figures any of them measured (compute and memory
  bandwidth): planned by their own, noisy, figures, identical nodes got very unequal layer ranges (SmolLM2 on 2 cores,
  3 nodes: [0, 24) [24, 28) [28, 30) in one start, [0, 8) [8, 22) [22, 30) in the next), and a pipeline runs at the
  pace of its slowest stage. The nodes' compute threads together may exceed the machine's cores; then those figures
  are scaled by ``cores / threads of all nodes on the machine``. Nodes on one GPU (``cuda:i``, ``mps``) take turns
  on it: each gets ``1/k`` of it.

A node that names no host (an older node, ``host == ""``) shares with no one. Pure: no I/O, no torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from coordinator.planner.profiles import DeviceKind, DeviceProfile, Memory


@dataclass(frozen=True, slots=True)
class HostShare:
    """What a node says about the machine (or GPU) it runs on.

    Attributes:
        host: the machine's identity; nodes with the same one share ``pool`` and ``cores``. ``""``: unknown.
        pool: memory free on the machine (or GPU) for all its nodes, before any node's own cap.
        cores: cores the machine gives its processes (0: unknown, no compute sharing).
        threads: this node's compute threads.
    """

    host: str
    pool: Memory
    cores: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.cores < 0 or self.threads < 1:
            raise ValueError(f"host {self.host!r}: cores must be >= 0 and threads >= 1, got {self.cores}, "
                             f"{self.threads}")  # fmt: skip


def water_fill(pool: int, caps: Sequence[int]) -> list[int]:
    """Split ``pool`` bytes among nodes that each take at most their cap: the smallest caps are met first, the
    rest is split equally. Returns each node's share, in the order of ``caps``."""
    shares = [0] * len(caps)
    left = pool
    order = sorted(range(len(caps)), key=lambda i: caps[i])
    for rank, i in enumerate(order):
        fair = left // (len(caps) - rank)
        shares[i] = min(caps[i], fair)
        left -= shares[i]
    return shares


def share_hosts(devices: Sequence[DeviceProfile], shares: Mapping[str, HostShare]) -> list[DeviceProfile]:
    """``devices`` with the memory and compute of nodes on one machine shared out (see the module docstring).

    Args:
        devices: the nodes as they measured themselves (``memory``: what each may use alone).
        shares: by device name, the machine each is on; a device missing here shares with no one.

    Returns:
        The devices in the same order; those alone on their machine unchanged.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(devices):
        share = shares.get(d.name)
        if share is not None and share.host:
            groups[share.host].append(i)
    out = list(devices)
    for members in groups.values():
        if len(members) < 2:
            continue
        pool = max(shares[devices[i].name].pool.bytes for i in members)
        given = water_fill(pool, [devices[i].memory.bytes for i in members])
        cores = max(shares[devices[i].name].cores for i in members)
        demand = sum(shares[devices[i].name].threads for i in members)
        cpu_factor, gpu_factor = min(1.0, cores / demand) if cores else 1.0, 1.0 / len(members)
        cpus = [devices[i] for i in members if devices[i].kind is DeviceKind.CPU]
        tflops = max((d.tflops for d in cpus), default=0.0)
        membw = max((d.membw_gbs for d in cpus), default=0.0)
        for i, memory in zip(members, given, strict=True):
            d = devices[i]
            if d.kind is DeviceKind.CPU:
                out[i] = replace(d, memory=Memory(memory), tflops=tflops * cpu_factor, membw_gbs=membw * cpu_factor)
            else:
                out[i] = replace(d, memory=Memory(memory), tflops=d.tflops * gpu_factor,
                                 membw_gbs=d.membw_gbs * gpu_factor)  # fmt: skip
    return out


__all__ = ["HostShare", "share_hosts", "water_fill"]
