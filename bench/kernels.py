"""Microseconds per call of the quantised matmuls on SmolLM2-135M's shapes: the native kernel over raw GGUF blocks
(``llama_node::ggml_mm``), torch's int4 kernel on repacked planes (``QuantLinear``, the fallback without the native
kernel, for the types it takes), the bf16 ``DenseLinear`` that types without a packed kernel are dequantised into, and
fp32 ``F.linear`` on the dequantised weight.

They run interleaved (A B C D A B C D ...), each repetition timing a batch of calls, and the median per call is
reported with the ratios, so a load spike from other processes hits all three alike. The load average is printed.

``--baseline REV`` compares the native kernel only, as built from the kernel sources (``llama_shard/kernels/csrc``)
of git revision REV against the working tree's: the two builds live in separate processes (one library per
process), alternated once per repetition (base new base new ...).

``--baseline REV --step`` compares the whole fused decode step (``llama_shard.fused``: every layer and the head of
the packaged SmolLM2-135M Q4_1, f16 KV cache) instead, in ms per step of B decode rows (1, 4, 8), each in its own
KV slot at position 130 or 1000, at 1 thread and ``--threads``: attention's share grows with the position.

    python bench/kernels.py                    # M = 1 (decode), 2 threads
    python bench/kernels.py --threads 1 --m 1 --m 16
    python bench/kernels.py --threads 1 --type Q5_0 --type Q5_1 --type Q5_K   # only the shapes of these types
    python bench/kernels.py --baseline HEAD~1 --m 1 --m 16 --repeats 9
    python bench/kernels.py --baseline HEAD~1 --m 1 --m 16 --budget 0.003 --best-of 20   # on a busy machine
    python bench/kernels.py --baseline HEAD~1 --step --repeats 5 --budget 0.2 --best-of 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import baseline_tree, load_average, median, print_table, setup_logging, warn_if_busy  # noqa: E402

log = logging.getLogger("bench.kernels")
ROOT = Path(__file__).resolve().parent.parent

# (name, GGUF type, N, K): SmolLM2-135M's linears (wo, fused wqkv, fused w13, w2) and its tied Q8_0 head
SHAPES = [
    ("wo", "Q4_1", 576, 576),
    ("wqkv", "Q4_1", 960, 576),
    ("w13", "Q4_1", 3072, 576),
    ("w2", "Q4_1", 576, 1536),
    ("head", "Q8_0", 49152, 576),
    ("w13 Q4_0", "Q4_0", 3072, 576),
    ("w13 Q4_K", "Q4_K", 3072, 768),
    ("w13 Q6_K", "Q6_K", 3072, 768),
    ("w13 Q5_0", "Q5_0", 3072, 576),
    ("w13 Q5_1", "Q5_1", 3072, 576),
    ("w13 Q5_K", "Q5_K", 3072, 768),
    ("8B w2 Q5_K", "Q5_K", 4096, 14336),  # a Llama-3-8B ffn_down: weights from DRAM, not cache
    ("w13 Q3_K", "Q3_K", 3072, 768),
    ("w13 Q2_K", "Q2_K", 3072, 768),
    ("8B w2 Q3_K", "Q3_K", 4096, 14336),
    ("8B w2 Q2_K", "Q2_K", 4096, 14336),
]


def _shapes(types: list[str] | None) -> list[tuple[str, str, int, int]]:
    return [s for s in SHAPES if not types or s[1] in types]


def _per_call(fn: Callable[[], object], budget_s: float) -> float:
    """Seconds per call over a batch of calls lasting about ``budget_s``."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return elapsed / calls


def main(
    threads: int, rows: list[int], repeats: int, budget_s: float, types: list[str] | None, best_of: int = 1
) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from ggml_reference import random_blocks
    from gguf import GGMLQuantizationType

    from llama_shard import kernels
    from llama_shard.ggml_linear import GGMLLinear
    from llama_shard.quant import PACKED_TYPES, DenseLinear, QuantLinear, dequantize_rows

    torch.set_num_threads(threads)
    if not kernels.available():
        raise SystemExit("the native kernel could not be built; nothing to compare")
    warn_if_busy("the kernel bench")
    load_before = load_average()
    table = []
    rng = np.random.default_rng(0)
    for name, type_name, n, k in _shapes(types):
        qtype = GGMLQuantizationType[type_name]
        raw = torch.from_numpy(random_blocks(qtype, n, k, rng)).view(n, -1)
        ggml = GGMLLinear(raw, qtype, k)
        int4 = QuantLinear.from_gguf(raw, qtype, k) if qtype in PACKED_TYPES else None
        w = dequantize_rows(raw, qtype, k)
        bf16 = DenseLinear(w)
        for m in rows:
            x = torch.randn(m, k)
            fns: dict[str, Callable[[], object]] = {"ggml": partial(ggml, x), "bf16": partial(bf16, x)}
            fns["fp32"] = partial(F.linear, x, w)
            if int4 is not None:
                fns["int4pack"] = partial(int4, x)
            times: dict[str, list[float]] = {key: [] for key in fns}
            with torch.inference_mode():
                for _ in range(repeats):
                    for key, fn in fns.items():
                        times[key].append(min(_per_call(fn, budget_s) for _ in range(best_of)))
            us = {key: median(v) * 1e6 for key, v in times.items()}
            int4_us = us.get("int4pack")
            table.append(
                [
                    name,
                    type_name,
                    f"{n}x{k}",
                    str(m),
                    f"{us['ggml']:.1f}",
                    f"{int4_us:.1f}" if int4_us else "-",
                    f"{us['bf16']:.1f}",
                    f"{us['fp32']:.1f}",
                    f"{int4_us / us['ggml']:.2f}x" if int4_us else "-",
                    f"{us['bf16'] / us['ggml']:.2f}x",
                    f"{us['fp32'] / us['ggml']:.2f}x",
                    f"{2 * m * n * k / us['ggml'] / 1e3:.1f}",
                ]
            )
    load_after = load_average()
    headers = ["matrix", "type", "NxK", "M", "ggml µs", "int4pack µs", "bf16 µs", "fp32 µs"]
    headers += ["int4pack/ggml", "bf16/ggml", "fp32/ggml", "GFLOP/s"]
    print_table(f"µs per call, {threads} threads, median of {repeats} interleaved repetitions", headers, table)
    print(f"load average: {load_before} before, {load_after} after; AVX2 path: {kernels.has_avx2()}")


def _ggml_times(
    threads: int, rows: list[int], budget_s: float, best_of: int, types: list[str] | None
) -> dict[str, float]:
    """One repetition of the native kernel alone: seconds per call for every shape and M, the fastest of ``best_of``
    batches (``--worker``). Shapes of a type this build has no kernel for are left out."""
    import numpy as np
    import torch
    from ggml_reference import random_blocks
    from gguf import GGMLQuantizationType

    from llama_shard import kernels

    torch.set_num_threads(threads)
    if not kernels.available():
        raise SystemExit("the native kernel could not be built")
    rng = np.random.default_rng(0)
    out = {}
    with torch.inference_mode():
        for name, type_name, n, k in _shapes(types):
            qtype = GGMLQuantizationType[type_name]
            raw = torch.from_numpy(random_blocks(qtype, n, k, rng)).view(n, -1)
            try:
                kernels.ggml_mm(torch.randn(1, k), raw[:1], int(qtype), k)
            except RuntimeError:  # an older build: unsupported GGML type
                continue
            w, kernel_type = _kernel_layout(raw, qtype, k)
            for m in rows:
                call = partial(kernels.ggml_mm, torch.randn(m, k), w, kernel_type, k)
                out[f"{name}|{type_name}|{n}x{k}|{m}"] = min(_per_call(call, budget_s) for _ in range(best_of))
    return out


# --step: decode rows per step, and the position they all decode at
STEP_ROWS = [1, 4, 8]
STEP_POSITIONS = [130, 1000]


def _step_times(threads: list[int], budget_s: float, best_of: int) -> dict[str, float]:
    """One repetition of the fused decode step of the packaged SmolLM2 (whole model, head included): seconds per step
    of B decode rows, each in its own KV slot at one position, for every thread count, B and position
    (``--worker --step``). The cache holds random f16 keys and values: attention's cost does not depend on them."""
    import torch
    from common import packaged_gguf

    from llama_shard import batching, fused
    from llama_shard.loading import load_stage, open_source
    from llama_shard.quant import QuantMode
    from llama_shard.shard import ShardSpec

    source = open_source(packaged_gguf())
    stage = load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=QuantMode.gguf)
    cache = stage.new_cache(max(STEP_ROWS), batching.cache_len(max(STEP_POSITIONS) + 1))
    gen = torch.Generator().manual_seed(0)
    for t in (*cache.k.values(), *cache.v.values()):
        t.copy_(torch.randn(t.shape, generator=gen))
    decoder = fused.decoder(stage, cache)
    if decoder is None:
        raise SystemExit("the packaged model has no fused decoder")
    out = {}
    with torch.inference_mode():
        for n in threads:
            torch.set_num_threads(n)
            for position in STEP_POSITIONS:
                for b in STEP_ROWS:
                    call = partial(decoder, torch.arange(1000, 1000 + b), cache, list(range(b)), [position] * b)
                    out[f"{n}|{b}|{position}"] = min(_per_call(call, budget_s) for _ in range(best_of))
    return out


def _kernel_layout(raw: Any, qtype: Any, k: int) -> tuple[Any, int]:
    """The blocks and type id as ``GGMLLinear`` hands them to the kernel (Q4_0 / Q4_1 repacked 8 rows at a time),
    or raw where this build's kernel has no repacked layout (an older revision under ``--baseline``)."""
    import torch

    from llama_shard import kernels
    from llama_shard.ggml_linear import GGMLLinear

    linear = GGMLLinear(raw, qtype, k)
    try:
        kernels.ggml_mm(torch.randn(1, k), linear.blocks, linear._qtype, k)
    except RuntimeError:  # this build does not know the repacked type id
        return raw, int(qtype)
    return linear.blocks, linear._qtype


def compare(
    rev: str,
    threads: int,
    rows: list[int],
    repeats: int,
    budget_s: float,
    best_of: int,
    types: list[str] | None,
    step: bool = False,
) -> None:
    """The native kernel (``step``: the fused decode step) of ``rev`` against the working tree's, alternating
    processes once per repetition."""
    warn_if_busy("the kernel bench")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="kernels-baseline-") as tmp:
        base_root = baseline_tree(rev, Path(tmp))
        envs = {
            "base": {**os.environ, "PYTHONPATH": str(base_root)},  # its build is cached under its sources' hash
            "new": {**os.environ, "PYTHONPATH": str(ROOT)},
        }
        argv = [sys.executable, __file__, "--worker", "--threads", str(threads), "--budget", str(budget_s)]
        argv += ["--best-of", str(best_of)]
        argv += [a for m in rows for a in ("--m", str(m))]
        argv += [a for t in types or [] for a in ("--type", t)]
        argv += ["--step"] if step else []

        def run(which: str) -> dict[str, float]:
            done = subprocess.run(argv, env=envs[which], check=True, capture_output=True, text=True)
            return dict(json.loads(done.stdout.strip().splitlines()[-1]))

        for which in envs:  # builds (~30 s each the first time) and warms up outside the timed repetitions
            run(which)
        times: dict[str, dict[str, list[float]]] = {which: {} for which in envs}
        for _ in range(repeats):
            for which in envs:
                for key, seconds in run(which).items():
                    times[which].setdefault(key, []).append(seconds)
    load_after = load_average()
    if step:
        _step_table(rev, times, repeats, best_of)
        print(f"load average: {load_before} before, {load_after} after")
        return
    table = []
    for key, base in times["base"].items():
        if key not in times["new"]:
            continue
        name, type_name, shape, m = key.split("|")
        old_us, new_us = median(base) * 1e6, median(times["new"][key]) * 1e6
        n, k = (int(v) for v in shape.split("x"))
        gflops = 2 * int(m) * n * k / new_us / 1e3
        table.append([name, type_name, shape, m, f"{old_us:.1f}", f"{new_us:.1f}", f"{old_us / new_us:.2f}x"])
        table[-1].append(f"{gflops:.1f}")
    headers = ["matrix", "type", "NxK", "M", f"{rev} µs", "working tree µs", "speedup", "GFLOP/s"]
    title = f"native kernel µs per call, {threads} threads, median of {repeats} alternating processes"
    title += f" (each the best of {best_of} batches)" if best_of > 1 else ""
    print_table(title, headers, table)
    print(f"load average: {load_before} before, {load_after} after")


def _step_table(rev: str, times: dict[str, dict[str, list[float]]], repeats: int, best_of: int) -> None:
    table = []
    for key, base in times["base"].items():
        n, b, position = key.split("|")
        old_ms, new_ms = median(base) * 1e3, median(times["new"][key]) * 1e3
        table.append([n, b, position, f"{old_ms:.2f}", f"{new_ms:.2f}", f"{old_ms / new_ms:.2f}x"])
    headers = ["threads", "rows", "position", f"{rev} ms", "working tree ms", "speedup"]
    title = f"fused decode step ms, median of {repeats} alternating processes (each the best of {best_of} batches)"
    print_table(title, headers, table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--m", type=int, action="append", help="rows per call (repeatable; default 1)")
    parser.add_argument("--type", action="append", help="only the shapes of this GGUF type (repeatable)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per timed batch of calls")
    parser.add_argument("--baseline", metavar="REV", help="compare the native kernel with git revision REV's")
    parser.add_argument(
        "--best-of",
        type=int,
        default=1,
        help="each repetition keeps the fastest of this many batches (on a loaded machine a multi-threaded call now "
        "and then waits a whole time slice for a descheduled thread)",
    )
    parser.add_argument("--step", action="store_true", help="with --baseline: the fused decode step, not the matmuls")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one repetition, JSON out
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    if args.worker and args.step:
        print(json.dumps(_step_times(sorted({1, args.threads}), args.budget, args.best_of)))
    elif args.worker:
        print(json.dumps(_ggml_times(args.threads, args.m or [1], args.budget, args.best_of, args.type)))
    elif args.baseline:
        compare(
            args.baseline, args.threads, args.m or [1], args.repeats, args.budget, args.best_of, args.type, args.step
        )
    else:
        main(args.threads, args.m or [1], args.repeats, args.budget, args.type, args.best_of)
