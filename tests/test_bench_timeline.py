"""``bench/timeline.py``'s spacing analysis on a made-up timeline whose answers are known: where each frame is sent
in the cycle of the frames in flight with it, and how a stage's queueing splits into waiting behind another frame
(the stage still computing it) and waiting with the stage free (the hand-off to its compute thread)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_timeline() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # timeline.py imports its neighbours (common, concurrency) by name
    try:
        spec = importlib.util.spec_from_file_location("bench_timeline", BENCH / "timeline.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def two_frames(n: int) -> list[tuple[int, str, int, float]]:
    """2 frames in flight through 2 stages (pids 2 and 3; the coordinator is pid 1), a cycle of 10 ms per frame.

    Frame k is sent at 10*(k//2) + (0 or 3) ms: the gaps alternate 3 and 7 ms, so a send falls 0.3 or 0.7 of the way
    through the cycle. Stage 2 computes 4 ms from 1 ms after a send, so the frame sent 3 ms after another arrives
    1 ms before that one ends (behind it: 1 ms) and starts 0.5 ms after it ends (stage free: 0.5 ms)."""
    lines: list[tuple[int, str, int, float]] = []
    busy_until = 0.0
    for k in range(n):
        send = 10.0 * (k // 2) + (3.0 if k % 2 else 0.0)
        arrive = send + 1.0
        start = arrive if arrive >= busy_until else busy_until + 0.5
        end = start + 4.0
        busy_until = end
        s3 = end + 1.0
        events = [(1, "send", send), (2, "arrive", arrive), (2, "start", start), (2, "end", end), (2, "out", end),
                  (3, "arrive", s3), (3, "start", s3), (3, "end", s3 + 1.0), (3, "out", s3 + 1.0),
                  (1, "recv", s3 + 1.5)]  # fmt: skip
        lines += [(pid, event, k + 1, t / 1e3) for pid, event, t in events]
    return lines


def test_spacing_finds_the_gap_and_splits_the_queue(bench_timeline: ModuleType) -> None:
    out, in_flight = bench_timeline.spacing(two_frames(200))
    assert in_flight == 2
    gaps = out["send gap ÷ cycle"]
    assert sorted({round(g, 6) for g in gaps}) == [0.3, 0.7]
    assert statistics.mean(gaps) == pytest.approx(0.5)
    behind, free = out["S1 queue behind another frame"], out["S1 queue with the stage free"]
    assert statistics.mean(behind) == pytest.approx(0.5)  # 1 ms for every other frame
    assert max(behind) == pytest.approx(1.0)
    assert statistics.mean(free) == pytest.approx(0.25)  # 0.5 ms for the same frames
    assert max(out["S2 queue behind another frame"]) == 0.0
    assert max(out["S2 queue with the stage free"]) == pytest.approx(0.0)


def test_a_lone_frame_is_always_at_the_start_of_its_cycle(bench_timeline: ModuleType) -> None:
    lines = [line for line in two_frames(200) if line[2] % 2]  # only the frames sent at the cycle's start
    out, in_flight = bench_timeline.spacing(lines)
    assert in_flight == 1
    assert "send gap ÷ cycle" not in out  # one frame in flight: no gap to speak of
    assert max(out["S1 queue behind another frame"]) == 0.0
