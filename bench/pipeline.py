"""Decode tokens/s in one process and through 1, 2, 3, 4 node processes on loopback, in one run.

Every configuration runs the same greedy decode (``--dtype auto``: the GGUF's blocks packed, in the one process and on
every node; ``--dtype float32``: dense fp32; the same torch threads per process) after the same prompt;
node configurations use the first N of four node processes started once, each holding a contiguous stage. The
ratio to the one-process run is the pipeline's overhead (goal: >= 0.95; exo lost 40% when a second machine joined,
llama.cpp RPC 33%). Each repetition runs the one process and then the pipeline, so a drift in machine load hits
both; the ratio is of their medians (``--best``: of their best repetitions, for a machine others load too). The
"1 process" row is the one measured next to the first node configuration.

    python bench/pipeline.py                       # embedded SmolLM2-135M Q4_1, 1..4 nodes, 48 tokens, 3 reps
    python bench/pipeline.py --nodes 1,2 --tokens 16 --reps 1 --json
    python bench/pipeline.py --dtype float32       # dense fp32 stages
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: this process shares cores with nodes

import torch  # noqa: E402

from coordinator.pipeline.client import NodeClient, PipelineClient  # noqa: E402
from coordinator.pipeline.engine import LoopThread, PipelineEngine  # noqa: E402
from coordinator.pipeline.local import LocalNodes, StageOptions, load_pipeline, weight_mode  # noqa: E402
from llama_shard.generate import LocalEngine, TokenEngine  # noqa: E402
from llama_shard.loading import load_stage, open_source  # noqa: E402
from llama_shard.sampling import SamplingParams  # noqa: E402
from llama_shard.shard import ShardSpec, split_evenly  # noqa: E402

log = logging.getLogger("bench.pipeline")


def decode_rate(engine: TokenEngine, prompt: list[int], tokens: int) -> float:
    """Greedy decode of ``tokens`` tokens after a prefill of ``prompt``; tokens/s of the decode alone."""
    token = engine.step(prompt, 0)
    t0 = time.perf_counter()
    for i in range(tokens):
        token = engine.step([token], len(prompt) + i)
    return tokens / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help=".gguf file or HF directory (default: embedded SmolLM2)")
    parser.add_argument("--nodes", default="1,2,3,4", help="node counts to run, comma-separated")
    parser.add_argument("--tokens", type=int, default=48, help="decode steps per measurement")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3, help="repetitions per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32"],
                        help="auto: GGUF blocks packed (one process and nodes alike); float32: dense")  # fmt: skip
    parser.add_argument("--best", action="store_true",
                        help="best of the repetitions instead of the median (a machine others load too)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    if args.model is None:
        from llama_shard.embedded import smollm2_gguf_path

        model = smollm2_gguf_path()
    else:
        model = Path(args.model)
    counts = [int(n) for n in args.nodes.split(",")]
    torch.set_num_threads(args.threads)
    source = open_source(model)
    config = source.config
    prompt = [(17 * i + 3) % config.vocab_size for i in range(args.prompt_tokens)]
    max_len = args.prompt_tokens + args.tokens + 1
    params = SamplingParams()

    mode = weight_mode(model, args.dtype)
    local = load_stage(source, ShardSpec.whole(config.n_layers), quantize=mode)

    def one_process() -> float:
        return decode_rate(LocalEngine(local, params, max_len), prompt, args.tokens)

    runner = LoopThread()
    results: list[tuple[str, float, float, float]] = []  # config, tok/s, ratio, ms per step over the baseline
    with LocalNodes(max(counts), threads=args.threads) as nodes, tempfile.TemporaryDirectory() as catalog:
        clients = runner.run(_clients(nodes.addresses))
        for n in counts:
            specs = split_evenly(config.n_layers, n)
            runner.run(
                load_pipeline(
                    clients[:n], model, specs, StageOptions(max_len=max_len, catalog_dir=Path(catalog), quantize=mode)
                )  # fmt: skip
            )
            client = runner.run(_open(nodes.addresses[:n]))
            # one process and the pipeline alternate (A B A B ...), so a change in the machine's load hits both; the
            # best of the repetitions is the least disturbed one of each
            pairs = [(one_process(), decode_rate(PipelineEngine(client, runner, params, max_len), prompt,
                                                 args.tokens)) for _ in range(args.reps)]  # fmt: skip
            runner.run(client.close())
            base, rate = (max(p[i] for p in pairs) if args.best else statistics.median(p[i] for p in pairs)
                          for i in (0, 1))  # fmt: skip
            if not results:
                results.append(("1 process", base, 1.0, 0.0))
            results.append((f"{n} node{'s' if n > 1 else ''}", rate, rate / base, 1000 / rate - 1000 / base))
            log.info("%d nodes vs one process, tok/s per repetition: %s", n,
                     ", ".join(f"{b:.1f}/{r:.1f}" for b, r in pairs))  # fmt: skip
        runner.run(_close(clients))
    runner.stop()
    _report(model.name, args, results)
    return 0


async def _clients(addresses: list[str]) -> list[NodeClient]:
    return [NodeClient(a) for a in addresses]


async def _open(addresses: list[str]) -> PipelineClient:
    client = PipelineClient(addresses)
    await client.open()
    return client


async def _close(clients: list[NodeClient]) -> None:
    for c in clients:
        await c.close()


def _report(model: str, args: argparse.Namespace, rows: list[tuple[str, float, float, float]]) -> None:
    load = os.getloadavg()[0]
    if args.json:
        out = {
            "model": model, "dtype": args.dtype, "tokens": args.tokens, "threads": args.threads, "reps": args.reps,
            "load_avg_1m": load, "cpus": os.cpu_count(),
            "results": [{"config": n, "decode_tok_s": round(m, 3), "ratio": round(q, 3), "overhead_ms": round(o, 2)}
                        for n, m, q, o in rows],
        }  # fmt: skip
        print(json.dumps(out))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"decode tok/s, {model} --dtype {args.dtype}, {args.tokens} tokens, "
                        f"{args.threads} thread(s)/process, {'best' if args.best else 'median'} of {args.reps} "
                        f"(load avg {load:.1f} on {os.cpu_count()} CPUs)")  # fmt: skip
    for col in ("config", "decode tok/s", "÷ 1 process", "ms/token over 1 process"):
        table.add_column(col, justify="right")
    for name, median, ratio, overhead in rows:
        table.add_row(name, f"{median:.2f}", f"{ratio:.3f}", f"{overhead:+.2f}")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
