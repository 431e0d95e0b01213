"""Property tests of the planner against brute force on small cases (hypothesis)."""

from __future__ import annotations

import itertools
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.planner import (
    DeviceProfile,
    Memory,
    ModelProfile,
    Objective,
    Plan,
    PlanError,
    PlanOptions,
    WeightFormat,
    plan,
    weight_table,
)
from coordinator.planner.cost import CostModel

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INF = float("inf")


@st.composite
def models(draw: st.DrawFn) -> ModelProfile:
    L = draw(st.integers(1, 6))
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    moe = draw(st.booleans())
    moe_layers = frozenset(draw(st.sets(st.integers(0, L - 1)))) if moe else frozenset()
    return ModelProfile(
        name="tiny",
        vocab_size=draw(st.integers(8, 400)),
        dim=heads * head_dim,
        n_layers=L,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        ffn_dim=draw(st.sampled_from([32, 64, 256])),
        tie_embeddings=draw(st.booleans()),
        n_experts=4 if moe_layers else 0,
        experts_per_token=2 if moe_layers else 0,
        expert_ffn_dim=64 if moe_layers else 0,
        shared_expert_ffn_dim=draw(st.sampled_from([0, 32])) if moe_layers else 0,
        moe_layers=moe_layers,
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[ModelProfile, list[DeviceProfile], PlanOptions]:
    model = draw(models())
    options = PlanOptions(
        context=draw(st.integers(1, 64)),
        batch=draw(st.integers(1, 3)),
        prefill_chunk=4,
        micro_batches=draw(st.integers(1, 2)),
        weights=draw(st.sampled_from(list(WeightFormat))),
        objective=draw(st.sampled_from(list(Objective))),
    )
    probe = CostModel(model, [DeviceProfile.declare("probe", Memory(0))], options)
    total = probe.table.total_bytes + round(probe.kv_layer * model.n_layers)
    workspace = round(probe.ws_base + probe.ws_head)
    n = draw(st.integers(1, 4))
    devices = []
    for i in range(n):
        reserve = Memory(draw(st.integers(0, 2000)))
        # the fixed parts (sometimes not even those) plus up to 3x a fair share of the model
        mem = reserve.bytes + workspace - draw(st.sampled_from([0, 0, 0, workspace // 2]))
        share = draw(st.sampled_from([0.0, 0.3, 0.6, 1.0, 1.2, 2.0, 3.0]))
        mem += round(share * total / n) + draw(st.integers(0, total // n))
        devices.append(
            DeviceProfile.declare(
                f"d{i}",
                Memory(mem),
                draw(st.sampled_from(["cpu", "cuda", "mps"])),
                tflops=draw(st.sampled_from([0.001, 0.01, 1.0])),
                membw_gbs=draw(st.sampled_from([0.01, 0.1, 10.0])),
                link_gbits=draw(st.sampled_from([0.001, 1.0])),
                latency_ms=draw(st.sampled_from([0.0, 0.01, 1.0])),
                reserve=reserve,
            )
        )
    return model, devices, options


def value(p: Plan) -> float:
    return p.predicted_ms if p.objective is Objective.LATENCY else p.bottleneck_ms


def brute_force(model: ModelProfile, devices: list[DeviceProfile], options: PlanOptions) -> float:
    """Every ordered subset of devices x every cut into contiguous ranges; memory checked on the Stage."""
    cm = CostModel(model, devices, options)
    L, best = model.n_layers, INF
    for k in range(1, len(devices) + 1):
        for order in itertools.permutations(range(len(devices)), k):
            for cuts in itertools.combinations(range(1, L), k - 1):
                bounds = (0, *cuts, L)
                stages = [cm.stage(d, bounds[i], bounds[i + 1]) for i, d in enumerate(order)]
                if any(s.used_bytes > s.memory_bytes for s in stages):
                    continue
                ms = [s.ms for s in stages]
                best = min(best, sum(ms) if options.objective is Objective.LATENCY else max(ms))
    return best


def try_plan(model: ModelProfile, devices: list[DeviceProfile], options: PlanOptions, **kw: object) -> Plan | None:
    try:
        return plan(model, devices, options, **kw)  # type: ignore[arg-type]
    except PlanError:
        return None


def check_shape(p: Plan, model: ModelProfile, devices: list[DeviceProfile]) -> None:
    assert p.stages[0].start == 0 and p.stages[-1].end == model.n_layers
    for s, t in itertools.pairwise(p.stages):
        assert s.end == t.start, "every layer exactly once, in order"
    assert all(s.end > s.start for s in p.stages)
    assert [s.embed for s in p.stages] == [i == 0 for i in range(len(p.stages))]
    assert [s.head for s in p.stages] == [i == len(p.stages) - 1 for i in range(len(p.stages))]
    names = [s.node for s in p.stages]
    left = [x.node for x in p.left_out]
    assert len(set(names)) == len(names) and not set(names) & set(left)
    assert sorted(names + left) == sorted(d.name for d in devices)
    memory = {d.name: d.memory.bytes for d in devices}
    for s in p.stages:
        assert s.used_bytes <= memory[s.node] and s.free_bytes >= 0, "no device over its memory"


@SETTINGS
@given(cases())
def test_plan_is_optimal_and_refused_only_when_nothing_fits(case: tuple) -> None:
    model, devices, options = case
    best = brute_force(model, devices, options)
    p = try_plan(model, devices, options)
    if best == INF:
        assert p is None, "planned where brute force finds nothing"
        return
    assert p is not None, f"refused, but brute force fits at {best}"
    check_shape(p, model, devices)
    assert abs(value(p) - best) <= 1e-9 * max(1.0, best), (value(p), best)


@SETTINGS
@given(cases(), st.data())
def test_more_memory_never_hurts(case: tuple, data: st.DataObject) -> None:
    model, devices, options = case
    p = try_plan(model, devices, options)
    i = data.draw(st.integers(0, len(devices) - 1))
    extra = data.draw(st.integers(0, 500_000))
    grown = [*devices]
    grown[i] = devices[i].with_memory(devices[i].memory + Memory(extra))
    q = try_plan(model, grown, options)
    if p is not None:
        assert q is not None, "more memory made a feasible case infeasible"
        assert value(q) <= value(p) * (1 + 1e-9) + 1e-12


@SETTINGS
@given(cases(), st.data())
def test_adding_a_machine_never_slows_the_cluster(case: tuple, data: st.DataObject) -> None:
    model, devices, options = case
    p = try_plan(model, devices, options)
    extra = DeviceProfile.declare(
        "new",
        Memory(data.draw(st.integers(0, 400_000))),
        data.draw(st.sampled_from(["cpu", "cuda"])),
        membw_gbs=data.draw(st.sampled_from([0.001, 1.0, 100.0])),
        reserve=Memory(0),
    )
    q = try_plan(model, [*devices, extra], options)
    if p is not None:
        assert q is not None and value(q) <= value(p) * (1 + 1e-9) + 1e-12
        if "new" in q.nodes:  # used only where it is strictly faster than without it
            assert value(q) < value(p)


def _reload(model: ModelProfile, options: PlanOptions, p: Plan, keep: Plan) -> int:
    t = weight_table(model, options.weights)
    prev = {s.node: s for s in keep.stages}
    total = 0
    for s in p.stages:
        old = prev.get(s.node)
        held = set() if old is None else set(range(old.start, old.end))
        total += sum(t.layer_bytes[i] for i in range(s.start, s.end) if i not in held)
        total += t.embed_bytes if s.embed and not (old and old.embed) else 0
        total += t.head_bytes if s.head and not (old and old.head) else 0
    return total


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.data())
def test_replan_keeps_survivors_within_tolerance(case: tuple, data: st.DataObject) -> None:
    model, devices, options = case
    first = try_plan(model, devices, options)
    if first is None or len(first.stages) < 2:
        return
    dead = data.draw(st.sampled_from(first.nodes))
    survivors = [d for d in devices if d.name != dead]
    options = replace(options, keep_tolerance=data.draw(st.sampled_from([0.0, 0.1, 0.5])))
    fresh = try_plan(model, survivors, options)
    kept = try_plan(model, survivors, options, keep=first)
    assert (fresh is None) == (kept is None)
    if fresh is None or kept is None:
        return
    check_shape(kept, model, survivors)
    assert value(kept) <= value(fresh) * (1 + options.keep_tolerance) + 1e-9
    assert kept.reload_bytes == _reload(model, options, kept, first)
    assert kept.reload_bytes <= _reload(model, options, fresh, first)
