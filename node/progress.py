"""Progress bars on the node's own terminal for slices being received and loaded (rich, on stderr).

Only when stderr is a terminal: a node spawned by a coordinator or a test logs a line when a transfer ends instead.
"""

from __future__ import annotations

import logging
import sys
import threading

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

log = logging.getLogger(__name__)


class NodeBars:
    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._lock = threading.Lock()
        self._tasks: dict[str, TaskID] = {}
        self._bars: Progress | None = None

    def update(self, what: str, done: int, total: int) -> None:
        """Thread-safe; ``what`` names one transfer ("receive [0, 15) of 30")."""
        if not self.enabled:
            return
        with self._lock:
            if self._bars is None:
                columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
                self._bars = Progress(*columns, console=Console(stderr=True))
                self._bars.start()
            if what not in self._tasks:
                self._tasks[what] = self._bars.add_task(what, total=total)
            self._bars.update(self._tasks[what], completed=done, total=total)

    def done(self, what: str, nbytes: int, seconds: float) -> None:
        log.info("%s: %.1f MB in %.1f s (%.1f MB/s)", what, nbytes / 1e6, seconds, nbytes / 1e6 / max(seconds, 1e-9))
        with self._lock:
            task = self._tasks.pop(what, None)
            if self._bars is not None and task is not None:
                self._bars.remove_task(task)
                if not self._tasks:
                    self._bars.stop()
                    self._bars = None
