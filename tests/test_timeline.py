"""``LLAMA_NODE_TIMELINE``: the coordinator and every node process stamp each frame's events, in the frame's order,
on one clock (what ``bench/timeline.py`` reads)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest
from pipeline_helpers import Cluster, pipeline_greedy

from coordinator.pipeline.local import StageOptions
from llama_shard.shard import ShardSpec
from node import timeline

STAGE_EVENTS = ["arrive", "start", "end", "out"]


def test_every_frame_is_stamped_in_order_by_each_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_hf_llama: Callable[..., Path]
) -> None:
    path = tmp_path / "timeline.txt"
    monkeypatch.setenv(timeline.ENV, str(path))  # the node processes read it as they start
    timeline.record_to(str(path))  # this process (the coordinator's side) imported the module already
    cluster = Cluster(2, tmp_path / "catalog")
    try:
        client = cluster.load(make_hf_llama(), [ShardSpec(0, 2, 4), ShardSpec(2, 4, 4)], StageOptions(max_len=64))
        tokens, _ = pipeline_greedy(cluster, client, [1, 5, 9], 4)
        cluster.close_client(client)
    finally:
        timeline.record_to(None)
        cluster.stop()
    assert len(tokens) == 4

    frames: dict[int, list[tuple[float, int, str]]] = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        pid, event, frame_id, t, *rows = line.split()
        assert rows == (["1"] if event == "send" else []), line  # a send's line ends with the frame's row count
        frames[int(frame_id)].append((float(t), int(pid), event))
    assert len(frames) == 4  # one frame per step
    coordinator = {pid for f in frames.values() for _, pid, e in f if e == "send"}
    assert len(coordinator) == 1
    for frame_id, events in frames.items():
        events.sort()
        names = [e for _, _, e in events]
        assert names == ["send", *STAGE_EVENTS, *STAGE_EVENTS, "recv"], (frame_id, names)
        pids = [pid for _, pid, _ in events]
        first, second = pids[1], pids[5]
        assert pids == [*coordinator, *[first] * 4, *[second] * 4, *coordinator], (frame_id, pids)
        assert len({first, second, *coordinator}) == 3  # three processes, one clock
