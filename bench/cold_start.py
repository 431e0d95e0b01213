"""Cold start: from a fresh ``llama-node run --prompt … --max-tokens 1`` process to its first token, by stage,
with llama.cpp (llama-cpp-python) beside it.

Every measurement is a new Python process (nothing warm but the OS page cache, which the first, discarded warmup
round fills). Three kinds of process, run interleaved (A B C A B C …):

- ``llama-node`` probe: this file re-run with ``--probe llama-node``; it does what ``llama-node run`` does on
  its one-process path (``coordinator.run_cmd._Session``: import the CLI, ``open_source``, ``load_tokenizer``,
  ``load_stage`` with ``--dtype auto``'s packed GGUF mode, the first three under ``paused_gc`` where the tree has
  it, chat template, ``generate`` one token through ``LocalEngine``) and stamps the time after each stage; it
  skips typer's argument parsing (typer 0.29 imports pydantic for it), which only the real CLI's row counts;
- ``llama-node run``: the real CLI, ``run --prompt Hi --max-tokens 1``, timed to its first byte on stdout (the
  streamed token) and to its exit;
- ``llama.cpp`` probe: ``import llama_cpp``, ``Llama(model)`` (metadata, vocabulary and weights), ``eval`` of the
  same prompt ids, argmax.

Wall times are seconds from the parent's ``Popen`` (so "python up" includes interpreter start and ``site``); a
second table gives the CPU seconds (user + system, all threads) of each stage, which other load on a shared machine
disturbs far less than wall time. Both give each stage's median and the median time to the first token.

``--tree LABEL=DIR`` (repeatable) runs the llama-node processes against another checkout of the code
(``PYTHONPATH=DIR`` and cwd ``DIR``, ahead of the editable install; its own ``LLAMA_NODE_CACHE`` so the native
kernels are built once per tree), which is how before/after tables are made from one invocation::

    python bench/cold_start.py                                  # this checkout, 5 rounds, all cores
    python bench/cold_start.py --repeats 7 --threads 1
    mkdir /tmp/before && git archive <old-commit> | tar -x -C /tmp/before
    mkdir /tmp/after && git archive HEAD | tar -x -C /tmp/after
    python bench/cold_start.py --threads 1 --tree before=/tmp/before --tree after=/tmp/after
    python -X importtime -c "import coordinator.cli" 2>&1 | sort -t'|' -k2 -n | tail   # heavy imports
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    fmt,
    interleaved,
    load_average,
    median,
    packaged_gguf,
    print_table,
    setup_logging,
    warn_if_busy,
)

log = logging.getLogger("bench.cold_start")

#: Stage names in order; a probe reports the wall-clock time (``time.time()``) at the end of each.
NODE_STAGES = ("python up", "imports", "metadata", "tokenizer", "stage loaded", "first token")
CPP_STAGES = ("python up", "imports", "model loaded", "first token")
TO_FIRST = "→ first token"  # cumulative: spawn to the first token
PROMPT = "Hi"


# ------------------------------------------------------------------------------------------------- probes
def _stamp(marks: dict[str, float], cpu: dict[str, float], stage: str) -> None:
    marks[stage], cpu[stage] = time.time(), _cpu_seconds()


def _cpu_seconds() -> float:
    """CPU seconds (user + system, every thread) this process has used since it started."""
    t = os.times()
    return t.user + t.system


def probe_llama_node(model: Path, threads: int, context: int) -> dict[str, Any]:
    """What ``llama-node run MODEL --prompt Hi --max-tokens 1 --threads T`` does, stamped after each stage."""
    marks: dict[str, float] = {}
    cpu: dict[str, float] = {}
    _stamp(marks, cpu, "python up")
    import coordinator.run_cmd  # typer only; the console script has imported it when ``run`` starts

    # ``run`` imports torch and loads the model with the cyclic GC paused (``paused_gc``; older trees: not)
    with getattr(coordinator.run_cmd, "paused_gc", contextlib.nullcontext)():
        import torch

        import coordinator.cli  # noqa: F401  (the console script imports it before running the command)
        from llama_shard.generate import LocalEngine, generate
        from llama_shard.loading import load_stage, load_tokenizer, open_source
        from llama_shard.quant import QuantMode
        from llama_shard.sampling import SamplingParams
        from llama_shard.shard import ShardSpec

        torch.set_num_threads(threads)
        _stamp(marks, cpu, "imports")
        source = open_source(model)
        _stamp(marks, cpu, "metadata")
        tokenizer = load_tokenizer(source)
        _stamp(marks, cpu, "tokenizer")
        spec = ShardSpec.whole(source.config.n_layers)
        stage = load_stage(source, spec, dtype=torch.float32, quantize=QuantMode.gguf)
    _stamp(marks, cpu, "stage loaded")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    # as ``_Session._generate``: a KV cache for this answer only (prompt + max tokens), not all of --context
    max_len = min(context, source.config.max_seq_len, len(ids) + 1)
    result = generate(LocalEngine(stage, SamplingParams(), max_len), tokenizer, ids, max_tokens=1)
    _stamp(marks, cpu, "first token")
    return {"marks": marks, "cpu": cpu, "prompt_ids": ids, "token_ids": result.token_ids}


def probe_llama_cpp(model: Path, threads: int, context: int, prompt_ids: list[int]) -> dict[str, Any]:
    """llama.cpp's cold start on the same prompt ids: import, load (metadata + vocabulary + weights), prefill."""
    marks: dict[str, float] = {}
    cpu: dict[str, float] = {}
    _stamp(marks, cpu, "python up")
    import llama_cpp
    import numpy as np

    _stamp(marks, cpu, "imports")
    llm = llama_cpp.Llama(
        model_path=str(model), n_threads=threads, n_threads_batch=threads, n_ctx=context, verbose=False
    )
    _stamp(marks, cpu, "model loaded")
    llm.eval(prompt_ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    token = int(logits.argmax())
    _stamp(marks, cpu, "first token")
    return {"marks": marks, "cpu": cpu, "token_ids": [token]}


# --------------------------------------------------------------------------------------------- processes
def _env(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree.resolve()), *filter(None, [env.get("PYTHONPATH")])])
        # Its own kernel cache: the native kernels' build files name the source's path, so checkouts taking
        # turns on one cache would rebuild them (seconds to minutes) on every switch.
        env["LLAMA_NODE_CACHE"] = str(tree.resolve() / ".llama-node-cache")
    return env


def _durations(start: float, marks: dict[str, float], stages: Sequence[str]) -> dict[str, float]:
    """Each stage's duration from the previous mark (the first from ``start``), and the time to the first token."""
    out, previous = {}, start
    for stage in stages:
        out[stage] = marks[stage] - previous
        previous = marks[stage]
    out[TO_FIRST] = marks["first token"] - start
    return out


def run_probe(argv: list[str], tree: Path | None, stages: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a probe process; its JSON marks as durations (plus what it generated, under ``result``)."""
    start = time.time()
    proc = subprocess.run(argv, env=_env(tree), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(argv[:4])} … exited {proc.returncode}:\n{tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    cpu = _durations(0.0, result["cpu"], stages)  # CPU seconds: the first stage counts from the process's start
    return {**_durations(start, result["marks"], stages), "cpu": cpu, "result": result}


def run_cli(model: Path, tree: Path | None, threads: int, timeout: float) -> dict[str, Any]:
    """The real ``llama-node run``: seconds to its first stdout byte (the streamed token) and to its exit."""
    argv = [sys.executable, "-c", "from coordinator.cli import main; main()", "run", str(model)]
    argv += ["--prompt", PROMPT, "--max-tokens", "1", "--threads", str(threads), "--temperature", "0"]
    start, children = time.time(), _children_cpu()
    # cwd: ``python -c`` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.Popen(argv, env=_env(tree), cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_at = time.time()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"llama-node run did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0 or not first:
        tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-15:])
        raise RuntimeError(f"llama-node run exited {proc.returncode}:\n{tail}")
    end = time.time()
    cpu = {"process": _children_cpu() - children}  # the whole process: its CPU split by stage is not visible here
    return {TO_FIRST: first_at - start, "exit": end - first_at, "cpu": cpu}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children; runs are serial, so a delta is one
    return usage.ru_utime + usage.ru_stime


def _task(fn: Callable[..., dict[str, Any]], *args: Any) -> Callable[[], dict[str, Any]]:
    return lambda: fn(*args)


# ------------------------------------------------------------------------------------------------- report
COLUMNS: tuple[str, ...] = ("python up", "imports", "metadata", "tokenizer", "stage loaded", "model loaded")
COLUMNS += ("first token", TO_FIRST, "exit")


def _row(label: str, samples: list[dict[str, Any]], columns: Sequence[str], spread_of: str) -> list[str]:
    """Median of each column the samples have, and the range of ``spread_of``."""
    cells = [label]
    for column in columns:
        cells.append(fmt(median(s[column] for s in samples), 2) if column in samples[0] else "")
    spread = [s[spread_of] for s in samples if spread_of in s]
    cells.append(f"{min(spread):.2f}–{max(spread):.2f}" if spread else "")
    return cells


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="GGUF (default: the packaged SmolLM2-135M Q4_1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds (fill the page cache)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--context", type=int, default=4096, help="KV cache both engines reserve (tokens)")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR", help="code checkout to time")
    parser.add_argument("--no-cli", action="store_true", help="skip the real `llama-node run` processes")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="also print every sample as one JSON object")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--probe", choices=["llama-node", "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = (args.model or packaged_gguf()).resolve()
    if args.probe == "llama-node":
        print(json.dumps(probe_llama_node(model, args.threads, args.context)))
        return
    if args.probe == "llama.cpp":
        print(json.dumps(probe_llama_cpp(model, args.threads, args.context, json.loads(args.prompt_ids))))
        return

    setup_logging(args.verbose)
    trees: list[tuple[str, Path | None]] = [("", None)]
    if args.tree:
        trees = [(label, Path(path)) for label, _, path in (t.partition("=") for t in args.tree)]
    me = [sys.executable, str(Path(__file__).resolve()), str(model), "--threads", str(args.threads)]
    me += ["--context", str(args.context)]
    tasks: dict[str, Callable[[], dict[str, Any]]] = {}
    for label, tree in trees:
        name = f"llama-node {label}".strip()
        tasks[f"{name} (stages)"] = _task(run_probe, [*me, "--probe", "llama-node"], tree, NODE_STAGES, args.timeout)
        if not args.no_cli:
            tasks[f"{name} run"] = _task(run_cli, model, tree, args.threads, args.timeout)
    if not args.no_llama_cpp:
        first = run_probe([*me, "--probe", "llama-node"], trees[-1][1], NODE_STAGES, args.timeout)
        cpp = [*me, "--probe", "llama.cpp", "--prompt-ids", json.dumps(first["result"]["prompt_ids"])]
        tasks["llama.cpp"] = _task(run_probe, cpp, None, CPP_STAGES, args.timeout)

    load_before = load_average()
    log.info("%d rounds (+%d warmup) of %d processes, %d threads", args.repeats, args.warmup, len(tasks), args.threads)
    warn_if_busy()

    def progress(name: str, round_: int, sample: dict[str, Any]) -> None:
        log.info("%s, round %d: %.2f s to the first token", name, round_ + 1, sample[TO_FIRST])

    results = interleaved(tasks, args.repeats, warmup=args.warmup, on_result=progress)
    load_after = load_average()

    rows = [_row(name, samples, COLUMNS, TO_FIRST) for name, samples in results.items()]
    cpu_columns = [*COLUMNS[:-1], "process"]
    cpu_rows = [_row(name, [s["cpu"] for s in samples], cpu_columns, TO_FIRST) for name, samples in results.items()]
    setting = (
        f"{model.name}, prompt {PROMPT!r} + chat template, 1 token, {args.threads} threads, context {args.context}; "
        f"median of {args.repeats} interleaved rounds; load average {fmt(load_before, 2)} → {fmt(load_after, 2)} "
        f"on {os.cpu_count()} cores."
    )
    title = "Cold start: wall seconds per stage of a fresh process, from its spawn"
    caption = f"{setting} 'run' rows: the real CLI, to its first stdout byte, then on to its exit."
    print_table(title, ["process", *COLUMNS, f"{TO_FIRST} range"], rows, caption)
    title = "Cold start: CPU seconds (user + system, all threads) per stage"
    caption = f"{setting} 'process': the whole CLI process, exit included. Less sensitive to other load than wall."
    print_table(title, ["process", *cpu_columns, f"{TO_FIRST} range"], cpu_rows, caption)
    if args.json:
        print(json.dumps({n: [{k: v for k, v in s.items() if k != "result"} for s in ss] for n, ss in results.items()}))


if __name__ == "__main__":
    main()
