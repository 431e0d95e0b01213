"""A frame's path through the pipeline, as timestamps: where its time goes between processes (``bench/timeline.py``).

With ``LLAMA_NODE_TIMELINE=PATH`` in its environment, every process (the coordinator and the node processes it
starts) appends one line per event to PATH: ``pid event frame_id seconds``, the seconds on CLOCK_MONOTONIC, which
all processes of one machine share, so the lines of a loopback cluster line up. Unset (the normal case), ``mark``
does nothing. Events, in a frame's order:

- coordinator ``send``: the pipeline client starts encoding the frame (the line ends with the frame's row count);
- each stage ``arrive`` (the frame's last part read by its event loop), ``start`` and ``end`` (its compute on the
  compute thread, tensor decoding excluded) and ``out`` (the event loop has the encoded result and starts writing it);
- coordinator ``recv``: the last stage's reply read.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TextIO

ENV = "LLAMA_NODE_TIMELINE"

_out: TextIO | None = None


def record_to(path: str | None) -> None:
    """Append this process's events to ``path`` from now on (None: stop); done at import from ``ENV``."""
    global _out
    if _out is not None:
        _out.close()
    _out = None
    if path is not None:
        try:
            _out = open(path, "a", buffering=1)  # noqa: SIM115 - open until stopped, line by line
        except OSError as e:
            logging.getLogger(__name__).warning("no frame timeline: cannot write %s (%s)", path, e)


def enabled() -> bool:
    return _out is not None


def mark(event: str, frame_id: int, rows: int | None = None) -> None:
    """Record ``event`` of frame ``frame_id`` now (nothing unless ``LLAMA_NODE_TIMELINE`` is set); ``rows``, where
    given, ends the line."""
    if _out is not None:
        tail = "" if rows is None else f" {rows}"
        _out.write(f"{os.getpid()} {event} {frame_id} {time.monotonic():.6f}{tail}\n")


record_to(os.environ.get(ENV) or None)
