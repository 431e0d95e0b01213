"""Where a frame's time goes on a loopback pipeline: compute, queueing and each hop between processes.

    python bench/timeline.py                      # 3 local nodes, 8 streams for 15 s
    python bench/timeline.py --streams 1 --seconds 10

Starts ``llama-node serve --nodes N`` (as ``bench/concurrency.py`` does) with ``LLAMA_NODE_TIMELINE`` set, so the
coordinator and the node processes write timestamps of each frame's events (``node/timeline.py``), drives
``--streams`` concurrent streaming completions for ``--seconds``, and prints, per segment of a frame's path, the
median and mean milliseconds over the frames of the middle of the run (the first 20% and last 10% dropped).
The summary line gives the frames computing at once on average (compute time of all frames ÷ wall time): with
``--micro-batches`` frames in flight, what the rest of a frame's cycle costs in lost compute; and the rows per
frame (mean, and how many frames carried each count), which decide what a row's compute costs. With frames
in flight together it also gives where each send falls in their cycle (p10/p50/p90 of the gap to the send before ÷
the cycle: 0.5 every time for 2 evenly spaced frames), and splits each stage's queueing (arrive → start) into the
wait behind another frame (frames bunched at that stage) and the wait with the stage free.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, load_average, print_table, setup_logging  # noqa: E402
from concurrency import level, start_server  # noqa: E402

log = logging.getLogger("bench.timeline")

ENV = "LLAMA_NODE_TIMELINE"  # node.timeline.ENV (not imported: the bench stays free of the package's imports)


def segments(
    lines: list[tuple[int, str, int, float]], frame_rows: dict[int, int] | None = None
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Milliseconds of each segment over the frames that went through every stage, and a summary; with each frame's
    rows, the summary has the compute milliseconds per row too (all stages): tokens/s is about the frames computing
    at once ÷ that."""
    frame_rows = frame_rows or {}
    coord = next(pid for pid, event, _, _ in lines if event == "send")
    frames: dict[int, list[tuple[float, int, str]]] = collections.defaultdict(list)
    for pid, event, fid, t in lines:
        frames[fid].append((t, pid, event))
    ids = sorted(frames)
    ids = ids[len(ids) // 5 : len(ids) - len(ids) // 10]
    n_stages = max(sum(e == "start" for _, _, e in frames[f]) for f in ids)
    out: dict[str, list[float]] = collections.defaultdict(list)
    compute, t_first, t_last, rows, rows_compute = 0.0, float("inf"), 0.0, 0, 0.0
    for fid in ids:
        events = sorted(frames[fid])
        first = {(pid, e): t for t, pid, e in reversed(events)}  # each (process, event)'s first time
        stages = [pid for _, pid, e in events if e == "start"]
        if len(stages) != n_stages or (coord, "send") not in first or (coord, "recv") not in first:
            continue
        path = [("coordinator send", first[coord, "send"])]
        for i, pid in enumerate(stages, 1):
            arrive = max(t for t, p, e in events if p == pid and e == "arrive")
            path += [(f"S{i} arrive", arrive), (f"S{i} start", first[pid, "start"]), (f"S{i} end", first[pid, "end"]),
                     (f"S{i} out", first[pid, "out"])]  # fmt: skip
            compute += first[pid, "end"] - first[pid, "start"]
            if fid in frame_rows:
                rows_compute += first[pid, "end"] - first[pid, "start"]
        rows += frame_rows.get(fid, 0)
        path.append(("coordinator recv", first[coord, "recv"]))
        for (a, ta), (b, tb) in zip(path, path[1:], strict=False):
            out[f"{a} → {b}"].append((tb - ta) * 1e3)
        out["whole frame"].append((path[-1][1] - path[0][1]) * 1e3)
        t_first, t_last = min(t_first, path[0][1]), max(t_last, path[-1][1])
    sends = sorted(t for pid, e, _, t in lines if pid == coord and e == "send")
    recvs = sorted(t for pid, e, _, t in lines if pid == coord and e == "recv")
    recvs = recvs[len(recvs) // 5 : len(recvs) - len(recvs) // 10]
    turn = [(sends[i] - t) * 1e3 for t in recvs if (i := bisect.bisect_right(sends, t)) < len(sends)]
    out["coordinator recv → its next send"] = turn
    summary = {"frames": len(out["whole frame"]), "frames_computing": compute / max(t_last - t_first, 1e-9),
               "compute_ms_per_row": rows_compute * 1e3 / rows if rows else float("nan")}  # fmt: skip
    return out, summary


def spacing(lines: list[tuple[int, str, int, float]]) -> tuple[dict[str, list[float]], int]:
    """How the frames in flight together are spaced, and what each stage's queueing waits for; and how many frames
    were in flight (the most common count at a send).

    - ``send gap ÷ cycle``: each send's distance from the send before it, as a fraction of the cycle of ``M`` gaps
      it begins (``M`` frames in flight; evenly spaced frames give 1/M every time; absent when ``M`` is 1);
    - per stage, its arrive → start split in two (ms): behind another frame (the stage still computing the frame
      before), and with the stage free (the hand-off to its compute thread, or no core for it). Pacing the frames
      can only shorten the first.
    """
    coord = next(pid for pid, event, _, _ in lines if event == "send")
    events: dict[tuple[int, int], dict[str, float]] = collections.defaultdict(dict)
    for pid, event, fid, t in lines:
        seen = events[pid, fid]
        # a frame sent in parts arrives when its last part does; every other event counts at its first stamp
        seen[event] = max(t, seen.get(event, t)) if event == "arrive" else min(t, seen.get(event, t))
    sent = sorted((e["send"], fid) for (pid, fid), e in events.items() if pid == coord and "send" in e)
    keep = {fid for _, fid in sent[len(sent) // 5 : len(sent) - len(sent) // 10]}  # as ``segments``
    recvs = sorted(e["recv"] for (pid, _), e in events.items() if pid == coord and "recv" in e)
    sends = [t for t, _ in sent]
    flying = [i + 1 - bisect.bisect_right(recvs, t) for i, (t, fid) in enumerate(sent) if fid in keep]
    depth = max(1, collections.Counter(flying).most_common(1)[0][0]) if flying else 1
    out: dict[str, list[float]] = {}
    if depth > 1:
        out["send gap ÷ cycle"] = [(sends[i] - sends[i - 1]) / (sends[i - 1 + depth] - sends[i - 1])
                                   for i in range(1, len(sent) - depth + 1) if sent[i][1] in keep]  # fmt: skip
    # stage i is the process that starts the frames i-th (ordered by how long after its send a frame starts there)
    per_pid: dict[int, list[tuple[int, dict[str, float]]]] = collections.defaultdict(list)
    for (pid, fid), e in events.items():
        if pid != coord and {"arrive", "start", "end"} <= e.keys():
            per_pid[pid].append((fid, e))
    since_send = {pid: statistics.median(e["start"] - events[coord, fid]["send"] for fid, e in done if fid in keep)
                  for pid, done in per_pid.items() if any(fid in keep for fid, _ in done)}  # fmt: skip
    for i, pid in enumerate(sorted(since_send, key=since_send.__getitem__), 1):
        done = sorted(per_pid[pid], key=lambda item: item[1]["start"])
        behind, free = [], []
        for j, (fid, e) in enumerate(done):
            if fid not in keep:
                continue
            busy_until = done[j - 1][1]["end"] if j else e["arrive"]  # the stage's frame before this one
            behind.append(max(0.0, min(e["start"], busy_until) - e["arrive"]) * 1e3)
            free.append((e["start"] - max(e["arrive"], busy_until)) * 1e3)
        out[f"S{i} queue behind another frame"], out[f"S{i} queue with the stage free"] = behind, free
    return out, depth


def read(path: Path) -> tuple[list[tuple[int, str, int, float]], dict[int, int]]:
    """The events, and each frame's row count (the last field of a coordinator send)."""
    events, rows = [], {}
    for line in path.read_text().splitlines():
        pid, event, fid, t, *n = line.split()
        events.append((int(pid), event, int(fid), float(t)))
        if n:
            rows[int(fid)] = int(n[0])
    return events, rows


def spread(deciles: list[float]) -> str:
    return "/".join(f"{deciles[i]:.2f}" for i in (0, 4, 8)) if deciles else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument(
        "--slots",
        type=int,
        default=16,
        help="serve --slots (16: as bench/concurrency.py's levels; with one slot the plan minimises the "
        "sum of the stages, not the slowest, and may give one node nearly every layer)",
    )
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per node process")
    ap.add_argument("--micro-batches", type=int, default=0, help="serve --micro-batches (0: the server's default)")
    ap.add_argument("--keep", help="also copy the raw timeline here")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.txt"
        os.environ[ENV] = str(path)
        proc, url = start_server(args.nodes, max(args.slots, args.streams), 256 + args.max_tokens, args.threads, "auto",
                                 args.micro_batches)  # fmt: skip
        try:
            asyncio.run(level(url, "smollm2", 1, 4))  # warm-up
            path.write_text("")  # the frames from here on
            t0, tps = time.monotonic(), []
            while time.monotonic() - t0 < args.seconds:
                tps.append(asyncio.run(level(url, "smollm2", args.streams, args.max_tokens))[0])
        finally:
            proc.terminate()
            proc.wait(30)
        lines, frame_rows = read(path)
        if args.keep:
            Path(args.keep).write_text(path.read_text())
    segs, summary = segments(lines, frame_rows)
    spaced, summary["frames_in_flight"] = spacing(lines)
    gaps = spaced.pop("send gap ÷ cycle", [])
    summary["send_gap_deciles"] = statistics.quantiles(gaps, n=10) if len(gaps) > 1 else []
    segs.update(spaced)
    summary["tokens_per_s"] = statistics.median(tps)
    ids = sorted(frame_rows)[len(frame_rows) // 5 : len(frame_rows) - len(frame_rows) // 10]  # as ``segments``
    counts = collections.Counter(frame_rows[i] for i in ids)
    summary["rows_per_frame"] = statistics.mean(frame_rows[i] for i in ids) if ids else float("nan")
    by_rows = dict(sorted(counts.items()))
    if args.json:
        print(json.dumps({"segments_ms": {k: {"p50": statistics.median(v), "mean": statistics.mean(v)}
                                          for k, v in segs.items() if v},
                          "frames_by_rows": by_rows, **summary}))  # fmt: skip
        return
    rows = [[k, fmt(statistics.median(v), 2), fmt(statistics.mean(v), 2), len(v)] for k, v in segs.items() if v]
    caption = (f"{args.nodes} local nodes, {args.streams} streams, {summary['tokens_per_s']:.1f} tok/s (median of "
               f"{len(tps)} rounds), {summary['frames_computing']:.2f} frames computing at once on average, "
               f"{summary['rows_per_frame']:.2f} rows per frame (frames by rows: {by_rows}), "
               f"{summary['compute_ms_per_row']:.2f} ms of compute per row, {summary['frames_in_flight']} frames "
               f"in flight, send gap ÷ cycle p10/p50/p90 {spread(summary['send_gap_deciles'])}, "
               f"load avg {load_average() or 0:.1f}")  # fmt: skip
    print_table("A frame's path (ms)", ["segment", "p50", "mean", "frames"], rows, caption)


if __name__ == "__main__":
    main()
