"""``llama-node plan``: a dry run of the planner for declared devices, as a table or one JSON object.

Exit codes: 0 a plan, 2 bad input (a malformed ``--device``, an unknown model), 3 nothing fits.
Torch-free: only the planner and rich are imported.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum

import typer

from coordinator.planner import DeviceProfile, Objective, Plan, PlanError, PlanOptions, WeightFormat, plan
from coordinator.planner.loaders import ModelSourceError, load_model_profile

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_NO_FIT = 3


class KvType(StrEnum):
    F16 = "f16"
    F32 = "f32"


def _fail(message: str, code: int, as_json: bool, extra: dict[str, object] | None = None) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    if as_json:
        typer.echo(json.dumps({"error": message, **(extra or {})}))
    return typer.Exit(code=code)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _show(p: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    seqs = f"{p.batch} sequence(s)" + (f" x {p.micro_batches} micro-batches" if p.micro_batches > 1 else "")
    table = Table(title=f"{p.model} at {p.weights}, {p.context} tokens x {seqs}")
    columns = (
        "node",
        "kind",
        "layers",
        "weights GB",
        "KV GB",
        "workspace GB",
        "reserve GB",
        "free after GB",
        "predicted ms",
    )
    for col in columns:
        table.add_column(col, justify="left" if col in ("node", "kind", "layers") else "right")
    for s in p.stages:
        extras = "+".join(x for x, on in (("embed", s.embed), ("head", s.head)) if on)
        table.add_row(
            s.node,
            s.kind,
            f"[{s.start},{s.end})" + (f" {extras}" if extras else ""),
            _gb(s.weights_bytes),
            _gb(s.kv_bytes),
            _gb(s.workspace_bytes),
            _gb(s.reserve_bytes),
            _gb(s.free_bytes),
            f"{s.compute_ms:.1f} + {s.hop_ms:.1f} net",
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(
        f"predicted: {p.predicted_ms:.1f} ms per step, {p.tokens_per_s:.2f} tokens/s "
        f"({p.objective.value}; slowest stage {p.bottleneck_ms:.1f} ms)"
        + ("" if p.exact else " [heuristic search: many devices]")
    )
    for x in p.left_out:
        console.print(f"left out: {x.node}: {x.reason}")
    if p.experts:
        console.print(f"MoE: {len(p.experts)} MoE layers, each whole (all experts) on the node that holds it")


def plan_command(
    model: str = typer.Argument(..., help="model preset (llama-3.1-70b ...), config.json / HF directory, GGUF"),
    device: list[str] = typer.Option(  # noqa: B008 - typer's declaration style
        [],
        "--device",
        "-d",
        help="NAME=MEM[,kind=cpu|cuda|mps][,tflops=X][,membw=GB/s][,link=Gbit/s][,latency=ms]; MEM 16GB is "
        "decimal, 16GiB binary; undeclared figures take the kind's defaults (coordinator/planner/profiles.py)",
    ),
    context: int = typer.Option(4096, "--context", min=1, help="tokens of KV cache per sequence"),
    batch: int = typer.Option(1, "--batch", min=1, help="sequences decoded together (one micro-batch)"),
    micro_batches: int | None = typer.Option(
        None,
        "--micro-batches",
        min=1,
        help="micro-batches in flight (KV is sized for batch x this); default 1, or the number of devices "
        "with --objective throughput",
    ),
    weights: WeightFormat | None = typer.Option(  # noqa: B008
        None, "--weights", help="weight format (default: as stored for a GGUF file, else q4_k_m)"
    ),
    objective: Objective = typer.Option(  # noqa: B008
        Objective.LATENCY, "--objective", help="latency (one step) or throughput (slowest stage)"
    ),
    kv: KvType = typer.Option(KvType.F16, "--kv", help="KV cache element type"),  # noqa: B008
    as_json: bool = typer.Option(False, "--json", help="print the plan as one JSON object"),
) -> None:
    """Plan how MODEL fits a set of declared devices (dry run, nothing is loaded)."""
    try:
        profile = load_model_profile(model)
        devices = [DeviceProfile.from_spec(spec) for spec in device]
        if not devices:
            raise ValueError("declare at least one --device NAME=MEM")
        fmt = weights if weights is not None or profile.stored is not None else WeightFormat.Q4_K_M
        if micro_batches is None:
            micro_batches = len(devices) if objective is Objective.THROUGHPUT else 1
        options = PlanOptions(
            context=context,
            batch=batch,
            micro_batches=micro_batches,
            weights=fmt,
            objective=objective,
            kv_bytes_per_element=2.0 if kv is KvType.F16 else 4.0,
        )
        result = plan(profile, devices, options)
    except PlanError as e:
        raise _fail(
            e.message + "\n  would fit with: " + "; or ".join(e.suggestions),
            EXIT_NO_FIT,
            as_json,
            {"shortfall_bytes": e.shortfall_bytes, "suggestions": list(e.suggestions)},
        ) from None
    except KeyError as e:
        raise _fail(str(e.args[0]), EXIT_BAD_INPUT, as_json) from None
    except (ModelSourceError, ValueError) as e:
        raise _fail(str(e), EXIT_BAD_INPUT, as_json) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        _show(result)
