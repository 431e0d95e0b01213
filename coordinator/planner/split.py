"""The split: contiguous block ranges and the order of the nodes, by dynamic programming.

Search (exact up to ``options.exact_max_devices`` devices): ``best[mask][b]`` is the least cost of covering
blocks ``[0, b)`` with stages on exactly the devices in ``mask``, in any order. A stage's cost depends only on
its device and ``[a, b)`` (its network legs are charged to itself, see ``cost.py``), so extending ``(mask,
a)`` by a device ``d`` and a range ``[a, b)`` is all the search needs, and every ordered subset of the devices
is covered. Cost combines by sum (per-token latency) or by max (the slowest stage, for pipelined throughput).
The plan is the cheapest ``best[mask][L]``; among equally cheap ones the fewest devices. A device therefore
joins only when the predicted time with it is strictly lower than the best without it, so adding a machine
never makes the prediction worse (exo #489, distributed-llama #262); for every left-out device the plan says
why, with the numbers. Beyond that many devices, the same DP runs over a few fixed orders (fastest first,
largest first), devices may be skipped, and the result is marked ``exact=False``.

Required devices (``require=``, e.g. the local node processes the user asked for): only plans that give each of
them a stage count (in the heuristic search, a required device is never skipped).

Re-planning: with ``keep=previous_plan`` the search is repeated with a penalty per byte a node would have to
load that it does not hold already; of the plans within ``options.keep_tolerance`` of the best, the one that
reloads least wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.planner.cost import CostModel, Objective, PlanOptions, Stage
from coordinator.planner.explain import PlanError, diagnose
from coordinator.planner.profiles import DeviceProfile, ModelProfile

log = logging.getLogger(__name__)

INF = float("inf")
_REL_TIE = 1e-9


@dataclass(frozen=True, slots=True)
class LeftOut:
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The stages in pipeline order and why the other devices are not in it.

    Attributes:
        predicted_ms: one decode step of ``batch`` tokens through every stage and link. bottleneck_ms: the
        slowest stage (what pipelined throughput is bound by). experts: for MoE models, layer -> node ->
        expert ids it holds (whole layers here; the MoE issue spreads
            experts of one layer over several nodes). ``None`` for dense models.
        reload_bytes: with ``keep=``, bytes the nodes must load that they did not hold in the previous plan.
        exact: whether the search covered every order and subset.
    """

    model: str
    weights: str
    context: int
    batch: int
    micro_batches: int
    objective: Objective
    stages: tuple[Stage, ...]
    left_out: tuple[LeftOut, ...]
    predicted_ms: float
    bottleneck_ms: float
    experts: Mapping[int, Mapping[str, frozenset[int]]] | None = None
    reload_bytes: int | None = None
    exact: bool = True

    @property
    def tokens_per_s(self) -> float:
        """``batch`` tokens per step; with micro-batches in flight, bounded by the slowest stage."""
        if self.predicted_ms <= 0:
            return INF
        return self.batch * 1e3 * min(self.micro_batches / self.predicted_ms, 1 / self.bottleneck_ms)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.node for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "model": self.model,
            "weights": self.weights,
            "context": self.context,
            "batch": self.batch,
            "micro_batches": self.micro_batches,
            "objective": self.objective.value,
            "predicted_ms": self.predicted_ms,
            "bottleneck_ms": self.bottleneck_ms,
            "tokens_per_s": self.tokens_per_s,
            "exact": self.exact,
            "reload_bytes": self.reload_bytes,
            "stages": [
                {
                    "node": s.node,
                    "kind": s.kind,
                    "start": s.start,
                    "end": s.end,
                    "embed": s.embed,
                    "head": s.head,
                    "weights_bytes": s.weights_bytes,
                    "kv_bytes": s.kv_bytes,
                    "workspace_bytes": s.workspace_bytes,
                    "reserve_bytes": s.reserve_bytes,
                    "memory_bytes": s.memory_bytes,
                    "free_bytes": s.free_bytes,
                    "compute_ms": s.compute_ms,
                    "hop_ms": s.hop_ms,
                }
                for s in self.stages
            ],
            "left_out": [{"node": x.node, "reason": x.reason} for x in self.left_out],
            "experts": None
            if self.experts is None
            else {
                str(layer): {node: sorted(ids) for node, ids in hosts.items()} for layer, hosts in self.experts.items()
            },
        }


StageCost = Callable[[int, int, int], float]


def _mask_dp(cm: CostModel, cost: StageCost, use_max: bool) -> tuple[list[list[float]], list[list[int]]]:
    """``best[mask][b]`` and parents ``a * n + d`` over every ordered subset of the devices."""
    L, n = cm.L, cm.n
    best = [[INF] * (L + 1) for _ in range(1 << n)]
    parent = [[-1] * (L + 1) for _ in range(1 << n)]
    best[0][0] = 0.0
    Wk, cap = cm.Wk, cm.cap
    for mask in range(1 << n):
        row = best[mask]
        for a in range(L):
            base = row[a]
            if base == INF:
                continue
            first = a == 0
            for d in range(n):
                if mask >> d & 1:
                    continue
                nrow, prow = best[mask | 1 << d], parent[mask | 1 << d]
                cap_mid, cap_last, wa = cap[d][first][False], cap[d][first][True], Wk[a]
                for b in range(a + 1, L + 1):
                    w = Wk[b] - wa
                    # Wk grows with b and cap_last <= cap_mid, so the first miss ends this device's ranges
                    if w > (cap_last if b == L else cap_mid):
                        break
                    c = cost(d, a, b)
                    v = (c if c > base else base) if use_max else base + c
                    if v < nrow[b]:
                        nrow[b], prow[b] = v, a * n + d
    return best, parent


def _walk(cm: CostModel, parent: list[list[int]], mask: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    b = cm.L
    while b > 0:
        code = parent[mask][b]
        a, d = divmod(code, cm.n)
        out.append((d, a, b))
        mask ^= 1 << d
        b = a
    return out[::-1]


Ranges = list[tuple[int, int, int]]  # (device, start, end)


def _chain_dp(cm: CostModel, cost: StageCost, use_max: bool, order: Sequence[int],
              required: int = 0) -> tuple[float, Ranges]:  # fmt: skip
    """The same DP over one fixed order where devices may be skipped (for large clusters), except ``required``."""
    L = cm.L
    best = [0.0] + [INF] * L
    trail: list[list[tuple[int, int, int]]] = [[] for _ in range(L + 1)]
    for d in order:
        new_trail: list[list[tuple[int, int, int]]]
        if required >> d & 1:  # not skippable: only ranges extended by d survive
            new, new_trail = [INF] * (L + 1), [[] for _ in range(L + 1)]
        else:
            new, new_trail = best[:], [t[:] for t in trail]
        for a in range(L):
            if best[a] == INF:
                continue
            for b in range(a + 1, L + 1):
                if not cm.fits(d, a, b):
                    break
                c = cost(d, a, b)
                v = max(best[a], c) if use_max else best[a] + c
                if v < new[b]:
                    new[b], new_trail[b] = v, [*trail[a], (d, a, b)]
        best, trail = new, new_trail
    return best[L], trail[L]


def _search(cm: CostModel, cost: StageCost, required: int = 0
            ) -> tuple[float, list[tuple[int, int, int]], dict[int, str]]:  # fmt: skip
    """(objective, stages as (device, a, b), reasons for the devices left out); every device in the bit mask
    ``required`` has a stage."""
    use_max = cm.options.objective is Objective.THROUGHPUT
    unit = "ms/token" if not use_max else "ms slowest stage"
    n = cm.n
    if n > cm.options.exact_max_devices:
        orders = [
            sorted(range(n), key=lambda d: -cm.devices[d].membw_gbs),
            sorted(range(n), key=lambda d: -cm.devices[d].memory.bytes),
        ]
        value, stages = min((_chain_dp(cm, cost, use_max, o, required) for o in orders), key=lambda r: r[0])
        used = {d for d, _, _ in stages}
        note = f"not used by the best of {len(orders)} orders searched ({n} devices: heuristic search)"
        heuristic = dict.fromkeys((d for d in range(n) if d not in used), note)
        return value, stages, heuristic
    best, parent = _mask_dp(cm, cost, use_max)
    finals = [(best[m][cm.L], m.bit_count(), m) for m in range(1, 1 << n)
              if best[m][cm.L] < INF and m & required == required]  # fmt: skip
    if not finals:
        return INF, [], {}
    top = min(v for v, _, _ in finals)

    # equally fast: fewest devices, then the most memory (headroom), then the lowest cost
    def mem(m: int) -> int:
        return sum(cm.devices[d].memory.bytes for d in range(n) if m >> d & 1)

    tied = [f for f in finals if f[0] <= top * (1 + _REL_TIE) + 1e-12]
    value, _, mask = min(tied, key=lambda f: (f[1], -mem(f[2]), f[0]))
    why: dict[int, str] = {}
    for d in range(n):
        if mask >> d & 1:
            continue
        with_d = [v for v, _, m in finals if m >> d & 1]
        if with_d:
            w = min(with_d)
            tie = w <= value * (1 + _REL_TIE) + 1e-12
            verdict = "no faster with it" if tie else "it would slow the cluster"
            why[d] = f"{verdict}: the best plan using it predicts {w:.2f} {unit}, this one {value:.2f}"
        else:
            need = cm.min_stage_bytes(d)
            dev = cm.devices[d]
            if need > dev.memory.bytes:
                why[d] = (
                    f"too little memory: one stage needs at least {need / 1e9:.2f} GB "
                    f"(one block + its KV + workspace + reserve), it has {dev.memory}"
                )
            else:
                why[d] = "no plan that fits memory can use it"
    return value, _walk(cm, parent, mask), why


def _reload_cost(cm: CostModel, keep: Plan) -> Callable[[int, int, int], int]:
    prev = {s.node: s for s in keep.stages}
    t = cm.table

    def reload(d: int, a: int, b: int) -> int:
        s = prev.get(cm.devices[d].name)
        held = 0 if s is None else max(0, cm.W[min(b, s.end)] - cm.W[max(a, s.start)])
        extra = t.embed_bytes if a == 0 and not (s and s.embed) else 0
        extra += t.head_bytes if b == cm.L and not (s and s.head) else 0
        return cm.W[b] - cm.W[a] - held + extra

    return reload


def _objective(stages: Sequence[Stage], objective: Objective) -> float:
    ms = [s.ms for s in stages]
    return sum(ms) if objective is Objective.LATENCY else max(ms)


def plan(
    model: ModelProfile,
    devices: Sequence[DeviceProfile],
    options: PlanOptions | None = None,
    *,
    keep: Plan | None = None,
    require: Collection[str] = (),
) -> Plan:
    """Place ``model`` on ``devices``: contiguous block ranges, node order, left-out devices, predicted speed.

    Args:
        model: shape and sizes of the model.
        devices: candidate nodes (names unique).
        options: context, batch, weight format, objective.
        keep: the previous plan; prefer keeping surviving nodes' ranges within ``options.keep_tolerance``.
        require: names of devices that must each hold a stage (the local nodes ``serve --nodes N`` started).

    Returns:
        The plan with the least predicted time per decode step (or slowest stage, for ``THROUGHPUT``).

    Raises:
        PlanError: nothing fits (with every required device holding a stage); says by how much and what would.
        ValueError: bad input (duplicate names, no devices, a required name that is not a device).
    """
    options = options or PlanOptions()
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ValueError(f"device names must be unique, got {names}")
    if not devices:
        raise ValueError("no devices to plan on")
    unknown = sorted(set(require) - set(names))
    if unknown:
        raise ValueError(f"required devices {unknown} are not among the devices {names}")
    required = sum(1 << i for i, name in enumerate(names) if name in set(require))
    cm = CostModel(model, devices, options)
    value, chosen, why = _search(cm, cm.stage_ms, required)
    if not chosen:
        if required and _search(cm, cm.stage_ms)[1]:
            raise _required_error(model, cm, [names[i] for i in range(len(names)) if required >> i & 1])
        raise diagnose(model, devices, options)
    reload_bytes: int | None = None
    if keep is not None:
        reload = _reload_cost(cm, keep)
        total_gb = max(cm.table.total_bytes / 1e9, 1e-9)
        candidates = [(value, sum(reload(*s) for s in chosen), chosen)]
        for k in range(-3, 7):
            lam = value * max(options.keep_tolerance, 1e-3) / total_gb * 2.0**k  # ms per GB reloaded

            def penalised(d: int, a: int, b: int, lam: float = lam) -> float:
                return cm.stage_ms(d, a, b) + lam * reload(d, a, b) / 1e9

            _, st, _ = _search(cm, penalised, required)
            if st:
                v = _objective([cm.stage(*s) for s in st], options.objective)
                candidates.append((v, sum(reload(*s) for s in st), st))
        best_value = value
        ok = [c for c in candidates if c[0] <= best_value * (1 + options.keep_tolerance) + 1e-12]
        value, reload_bytes, chosen = min(ok, key=lambda c: (c[1], c[0]))
        for d in range(cm.n):
            if d not in why and d not in {s[0] for s in chosen}:
                why[d] = (
                    f"left out to keep the surviving nodes' ranges ({value:.2f} vs best "
                    f"{best_value:.2f}, within the {options.keep_tolerance:.0%} tolerance)"
                )
    stages = tuple(cm.stage(*s) for s in chosen)
    used = {s[0] for s in chosen}
    left = tuple(LeftOut(cm.devices[d].name, why.get(d, "not used")) for d in range(cm.n) if d not in used)
    experts: dict[int, dict[str, frozenset[int]]] | None = None
    if model.is_moe:
        all_experts = frozenset(range(model.n_experts))
        experts = {i: {s.node: all_experts} for s in stages for i in range(s.start, s.end) if i in model.moe_layers}
    result = Plan(
        model=model.name,
        weights=cm.table.label,
        context=options.context,
        batch=options.batch,
        micro_batches=options.micro_batches,
        objective=options.objective,
        stages=stages,
        left_out=left,
        predicted_ms=sum(s.ms for s in stages),
        bottleneck_ms=max(s.ms for s in stages),
        experts=experts,
        reload_bytes=reload_bytes,
        exact=cm.n <= options.exact_max_devices,
    )
    log.debug("plan %s: %s, %.2f ms/step", model.name, [(s.node, s.start, s.end) for s in stages], value)
    return result


def _required_error(model: ModelProfile, cm: CostModel, required: Sequence[str]) -> PlanError:
    """The model fits the devices, but not with a stage on each required one (one is too small for any block)."""
    small = [f"{cm.devices[d].name} ({cm.devices[d].memory}, one stage needs {cm.min_stage_bytes(d) / 1e9:.2f} GB)"
             for d in range(cm.n) if cm.devices[d].name in required]  # fmt: skip
    return PlanError(f"{model.name} fits these devices, but not with a stage on each of {', '.join(required)}: "
                     f"{'; '.join(small)}", 0, 0, 0,
                     ["give the required nodes more memory, or run fewer of them"])  # fmt: skip


__all__ = ["LeftOut", "Plan", "PlanError", "plan"]
