"""Rich progress bars for loading and pushing slices, one line per node and phase (on stderr)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn


@contextmanager
def slice_progress(enabled: bool = True) -> Iterator[Callable[[int, str, int, int], None]]:
    """Yields ``on_progress(node, phase, done, total)``; thread-safe, a no-op when not ``enabled``."""
    if not enabled:
        yield lambda _node, _phase, _done, _total: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    lock = threading.Lock()
    tasks: dict[tuple[int, str], TaskID] = {}
    with Progress(*columns, console=Console(stderr=True), transient=True) as bars:

        def update(node: int, phase: str, done: int, total: int) -> None:
            with lock:
                key = (node, phase)
                if key not in tasks:
                    tasks[key] = bars.add_task(f"node {node} {phase}", total=total)
                bars.update(tasks[key], completed=done, total=total)

        yield update
