"""Plan quality: predicted tokens/s of the planner's split ÷ a memory-proportional split, on simulated clusters.

The memory-proportional split is the rule exo and llama.cpp RPC use: every device gets layers in proportion to its
memory (largest remainder, at least one each), in the order the devices are listed. Both splits are scored by the
same cost model (``coordinator/planner/cost.py``), so the ratio measures the placement, not the model of time.
A proportional split that puts a device over its memory is shown as OOM (the run would fail to load).

    python bench/plan_quality.py                  # the table
    python bench/plan_quality.py --json           # one JSON object
    python bench/plan_quality.py --plot out.png   # needs matplotlib
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import plot_grouped_bars, require_matplotlib, setup_logging  # noqa: E402

from coordinator.planner import DeviceProfile, PlanError, PlanOptions, WeightFormat, plan, preset  # noqa: E402
from coordinator.planner.cost import CostModel  # noqa: E402

D = DeviceProfile.declare


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    devices: tuple[DeviceProfile, ...]
    context: int = 8192
    weights: WeightFormat = WeightFormat.Q4_K_M
    heterogeneous: bool = True


SCENARIOS = (
    Scenario(
        "70B: 3 laptops (16 cpu, 32 cpu, 36 mps)",
        "llama-3.1-70b",
        (D("lap16", "16GB"), D("lap32", "32GB"), D("mac36", "36GB", "mps")),
    ),
    Scenario(
        "70B: 24GB GPU + 64GB Mac + 2x32GB CPU",
        "llama-3.1-70b",
        (D("gpu", "24GB", "cuda"), D("mac", "64GB", "mps", membw_gbs=300), D("cpu1", "32GB"), D("cpu2", "32GB")),
    ),
    Scenario(
        "70B: CPUs at 80/40/15 GB/s (64/32/32 GB)",
        "llama-3.1-70b",
        (D("new", "64GB", membw_gbs=80), D("mid", "32GB", membw_gbs=40), D("old", "32GB", membw_gbs=15)),
    ),
    Scenario(
        "8B: 12GB GPU + 32GB + 16GB CPUs",
        "llama-3.1-8b",
        (D("gpu", "12GB", "cuda"), D("cpu32", "32GB"), D("cpu16", "16GB")),
    ),
    Scenario(
        "8B: Mac 24GB + Pi-class 8GB (exo #489)",
        "llama-3.1-8b",
        (D("mac", "24GB", "mps"), D("pi", "8GB", tflops=0.05, membw_gbs=8)),
    ),
    Scenario(
        "405B: 4x64GB CPU + 128GB Mac",
        "llama-3.1-405b",
        (D("c1", "64GB"), D("c2", "64GB"), D("c3", "64GB"), D("c4", "64GB"), D("mac", "128GB", "mps", membw_gbs=400)),
    ),
    Scenario(
        "Mixtral: 24GB GPU + 2x16GB CPU",
        "mixtral-8x7b",
        (D("gpu", "24GB", "cuda"), D("cpu1", "16GB"), D("cpu2", "16GB")),
        context=4096,
    ),
    Scenario(
        "70B: 4 equal 24GB CPUs (control)",
        "llama-3.1-70b",
        tuple(D(f"n{i}", "24GB") for i in range(4)),
        heterogeneous=False,
    ),
)


def proportional_ranges(memories: Sequence[int], n_layers: int) -> list[tuple[int, int]]:
    """exo's ``allocate_layers_proportionally``: largest remainder, every device at least one layer."""
    total = sum(memories)
    raw = [n_layers * m / total for m in memories]
    counts = [max(1, math.floor(r)) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(counts) < n_layers:
        counts[by_remainder[i % len(raw)]] += 1
        i += 1
    while sum(counts) > n_layers:
        j = max(range(len(counts)), key=lambda k: counts[k])
        counts[j] -= 1
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


@dataclass(frozen=True)
class Row:
    scenario: str
    planned_tps: float
    planned_split: str
    proportional_tps: float
    proportional_split: str
    proportional_oom: bool
    heterogeneous: bool

    @property
    def ratio(self) -> float:
        return self.planned_tps / self.proportional_tps


def run(s: Scenario) -> Row:
    model = preset(s.model)
    options = PlanOptions(context=s.context, weights=s.weights)
    try:
        p = plan(model, s.devices, options)
        planned_tps = p.tokens_per_s
        planned_split = " ".join(f"{st.node}[{st.start},{st.end})" for st in p.stages)
    except PlanError as e:
        planned_tps, planned_split = 0.0, f"does not fit: {e.message}"
    cm = CostModel(model, s.devices, options)
    ranges = proportional_ranges([d.memory.bytes for d in s.devices], model.n_layers)
    stages = [cm.stage(d, a, b) for d, (a, b) in enumerate(ranges)]
    oom = any(st.used_bytes > st.memory_bytes for st in stages)
    return Row(
        scenario=s.name,
        planned_tps=planned_tps,
        planned_split=planned_split,
        proportional_tps=1e3 / sum(st.ms for st in stages),
        proportional_split=" ".join(f"{st.node}[{st.start},{st.end})" for st in stages),
        proportional_oom=oom,
        heterogeneous=s.heterogeneous,
    )


def _table(rows: Sequence[Row], geo: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="planned split vs memory-proportional split (predicted tokens/s, same cost model)",
        caption=f"geometric mean ratio over the heterogeneous clusters: {geo:.2f} (goal >= 1.3); "
        "OOM: the proportional split puts a device over its memory",
    )
    for col in ("scenario", "planned tok/s", "proportional tok/s", "ratio", "planned split", "proportional split"):
        table.add_column(col, justify="right" if "tok/s" in col or col == "ratio" else "left")
    for r in rows:
        table.add_row(
            r.scenario,
            f"{r.planned_tps:.2f}",
            f"{r.proportional_tps:.2f}" + " OOM" * r.proportional_oom,
            f"{r.ratio:.2f}",
            r.planned_split,
            r.proportional_split,
        )
    Console(width=240).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--plot", metavar="PNG", help="bar chart of tokens/s (needs matplotlib)")
    args = ap.parse_args(argv)
    setup_logging()
    if args.plot and not require_matplotlib():
        return 2
    rows = [run(s) for s in SCENARIOS]
    hetero = [r.ratio for r in rows if r.heterogeneous]
    geo = math.exp(sum(math.log(x) for x in hetero) / len(hetero))
    if args.json:
        out = {"rows": [{**r.__dict__, "ratio": r.ratio} for r in rows], "geomean_ratio_heterogeneous": geo}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        _table(rows, geo)
    if args.plot:
        plot_grouped_bars(
            args.plot,
            [r.scenario.split(":")[0] + str(i) for i, r in enumerate(rows)],
            {"planned": [r.planned_tps for r in rows], "memory-proportional": [r.proportional_tps for r in rows]},
            "llama-node plan vs memory-proportional split",
            "predicted tokens/s",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
