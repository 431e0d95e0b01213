"""Decode on all cores while something else runs: ``llama-node run`` at ``--threads`` = all cores, with the cores
to itself and with one core kept busy by a plain spinning process (a browser tab, a compile), under OpenMP's wait
policies.

The native kernels split every matmul and attention call over torch's OpenMP threads, some 200 parallel regions a
token, each ending at a barrier. A thread that reaches the barrier first *spins* (libgomp's default,
``GOMP_SPINCOUNT`` 300,000); when another process holds the core of the thread it waits for, it spins away its time
slice, and so does the next region. ``OMP_WAIT_POLICY=PASSIVE`` makes the waiting thread sleep instead (each wake
costs a futex round trip), and one thread fewer than cores needs no barrier partner at all. llama-node sets neither:
the environment decides (see the README's note on shared machines).

Each variant runs as its own ``llama-node run`` process, interleaved round by round; the table gives the median
prefill and decode tok/s the CLI reports::

    python bench/contention.py                        # 3 rounds, loads none and busy, every variant
    python bench/contention.py --rounds 5 --tokens 128
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, llama_node_command, load_average, median, print_table, setup_logging  # noqa: E402

log = logging.getLogger("bench.contention")

#: variant -> (threads less than --threads, the OpenMP environment it sets)
VARIANTS: dict[str, tuple[int, dict[str, str]]] = {
    "spin (OpenMP default)": (0, {}),
    "OMP_WAIT_POLICY=PASSIVE": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "one thread fewer, spin": (1, {}),
}
_RATES = re.compile(r"prompt tokens at ([\d.]+) tok/s, \d+ generated at ([\d.]+) tok/s")


def _environment(policy: dict[str, str]) -> dict[str, str]:
    """This process's environment with the caller's OpenMP wait settings replaced by the variant's."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return env | policy


def _run_once(threads: int, tokens: int, env: dict[str, str]) -> tuple[float, float]:
    cmd = [*llama_node_command(), "run", "--threads", str(threads), "--prompt", "Why is the sky blue?"]
    done = subprocess.run([*cmd, "--max-tokens", str(tokens)], env=env, capture_output=True, text=True, timeout=900)
    found = _RATES.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"llama-node run failed ({done.returncode}): {done.stderr[-2000:]}")
    return float(found.group(1)), float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--loads", default="none,busy", help="comma-separated: none, busy (one core spun)")
    args = parser.parse_args()
    setup_logging()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    load_before = load_average()
    for load in args.loads.split(","):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            time.sleep(0.5)
            for r in range(args.rounds):
                for name, (fewer, policy) in VARIANTS.items():
                    rates = _run_once(max(1, args.threads - fewer), args.tokens, _environment(policy))
                    log.info("load %s, round %d, %s: prefill %.1f, decode %.1f tok/s", load, r, name, *rates)
                    results.setdefault((load, name), []).append(rates)
        finally:
            if hog is not None:
                hog.kill()
    rows = []
    for (load, name), runs in results.items():
        decode = [d for _, d in runs]
        rows.append([load, name, fmt(median(p for p, _ in runs)), fmt(median(decode)), " ".join(map(fmt, decode))])
    print_table(
        f"llama-node run, {args.threads} threads: tok/s with the cores free and with one core busy",
        ["load", "variant", "prefill tok/s", "decode tok/s", "decode, each round"],
        rows,
        caption=f"median of {args.rounds} interleaved rounds, {args.tokens} tokens; load average "
        f"{fmt(load_before)} → {fmt(load_average())} on {os.cpu_count()} cores",
    )


if __name__ == "__main__":
    main()
