"""The planner's rule for nodes on one machine (``coordinator.planner.hosts``) and required devices (``plan(...,
require=)``): N node processes on one host share its free memory and cores instead of each claiming all of them."""

from __future__ import annotations

import pytest

from coordinator.planner import (
    DeviceProfile,
    HostShare,
    Memory,
    Objective,
    PlanError,
    PlanOptions,
    plan,
    preset,
    share_hosts,
)
from coordinator.planner.hosts import water_fill

GB = 10**9
OPTIONS = PlanOptions(context=2048, batch=1)


def test_nodes_on_one_machine_split_its_free_memory() -> None:
    # arrange: two processes on machine h, each measured the machine's 8 GB free; a third node elsewhere
    devices = [DeviceProfile.declare(n, Memory(8 * GB)) for n in ("a", "b", "c")]
    shares = {"a": HostShare("h", Memory(8 * GB)), "b": HostShare("h", Memory(8 * GB)),
              "c": HostShare("other", Memory(8 * GB))}  # fmt: skip
    # act
    shared = share_hosts(devices, shares)
    # assert: a and b get half each, c (alone on its machine) keeps its own
    assert [d.memory.bytes for d in shared] == [4 * GB, 4 * GB, 8 * GB]
    assert [d.name for d in shared] == ["a", "b", "c"]


def test_a_capped_node_keeps_its_cap_and_the_others_split_the_rest() -> None:
    # arrange: a is capped at 1 GB (join --memory 1GB), b and c are not; the machine has 9 GB free
    devices = [DeviceProfile.declare("a", Memory(1 * GB)), DeviceProfile.declare("b", Memory(9 * GB)),
               DeviceProfile.declare("c", Memory(9 * GB))]  # fmt: skip
    shares = {n: HostShare("h", Memory(9 * GB)) for n in "abc"}
    # act
    shared = share_hosts(devices, shares)
    # assert
    assert [d.memory.bytes for d in shared] == [1 * GB, 4 * GB, 4 * GB]
    assert water_fill(10, [100, 2, 100]) == [4, 2, 4]
    assert sum(water_fill(7, [5, 5, 5])) <= 7


def test_more_threads_than_cores_share_the_cores() -> None:
    # arrange: 3 one-thread nodes on a 2-core machine; 2 one-thread nodes on a 4-core one
    devices = [DeviceProfile.declare(n, Memory(8 * GB), tflops=0.3, membw_gbs=9.0) for n in ("a", "b", "c", "d", "e")]
    shares = {**{n: HostShare("small", Memory(8 * GB), cores=2) for n in "abc"},
              **{n: HostShare("big", Memory(8 * GB), cores=4) for n in "de"}}  # fmt: skip
    # act
    shared = {d.name: d for d in share_hosts(devices, shares)}
    # assert: 2/3 of a core each on the small machine; a whole core each on the big one
    assert shared["a"].tflops == pytest.approx(0.2) and shared["a"].membw_gbs == pytest.approx(6.0)
    assert shared["d"].tflops == pytest.approx(0.3) and shared["d"].membw_gbs == pytest.approx(9.0)


def test_nodes_on_one_machine_get_its_best_measured_speed_and_equal_layers() -> None:
    # arrange: 3 one-thread nodes on a 2-core machine measured it at different moments (the others, or other work,
    # took part of the cores while each probed), as on a busy machine where `serve --nodes 3` starts them together
    model = preset("smollm2-135m")
    measured = {"a": (0.05, 12.0), "b": (0.02, 4.0), "c": (0.09, 20.0)}
    devices = [DeviceProfile.declare(n, Memory(8 * GB), tflops=t, membw_gbs=bw) for n, (t, bw) in measured.items()]
    shares = {n: HostShare("h", Memory(8 * GB), cores=2) for n in measured}
    options = PlanOptions(context=2048, batch=16, objective=Objective.THROUGHPUT)
    # act
    shared = share_hosts(devices, shares)
    chosen = plan(model, shared, options, require=set(measured))
    # assert: one machine, one speed (the best figure, scaled by 2 cores / 3 threads), so the layers are shared out
    # by the work they cost, not by which node probed at a quiet moment
    assert [d.tflops for d in shared] == pytest.approx([0.06] * 3)
    assert [d.membw_gbs for d in shared] == pytest.approx([40.0 / 3] * 3)
    assert max(s.compute_ms for s in chosen.stages) <= 1.2 * min(s.compute_ms for s in chosen.stages)


def test_a_node_alone_or_of_unknown_host_is_unchanged() -> None:
    devices = [DeviceProfile.declare("a", Memory(8 * GB)), DeviceProfile.declare("b", Memory(8 * GB))]
    assert share_hosts(devices, {"a": HostShare("", Memory(8 * GB)), "b": HostShare("", Memory(8 * GB))}) == devices
    assert share_hosts(devices, {"a": HostShare("h", Memory(8 * GB))}) == devices


def test_two_processes_on_one_machine_cannot_hold_what_only_two_machines_can() -> None:
    # arrange: Llama 3.1 8B (Q4_K_M, about 5 GB) needs more than one 4 GB machine holds
    model = preset("llama-3.1-8b")
    same = {"a": HostShare("h", Memory(4 * GB)), "b": HostShare("h", Memory(4 * GB))}
    apart = {"a": HostShare("h1", Memory(4 * GB)), "b": HostShare("h2", Memory(4 * GB))}
    devices = [DeviceProfile.declare(n, Memory(4 * GB)) for n in "ab"]
    # act / assert: two machines of 4 GB hold it; two processes on one 4 GB machine must not claim to
    assert len(plan(model, share_hosts(devices, apart), OPTIONS).stages) == 2
    with pytest.raises(PlanError):
        plan(model, share_hosts(devices, same), OPTIONS)


def test_required_devices_each_hold_a_stage() -> None:
    # arrange: one node holds the whole small model; by latency the planner would use one
    model = preset("smollm2-135m")
    devices = [DeviceProfile.declare(n, Memory(8 * GB)) for n in ("local0", "local1", "remote")]
    # act
    free = plan(model, devices, OPTIONS)
    required = plan(model, devices, OPTIONS, require={"local0", "local1"})
    balanced = plan(model, devices[:2], PlanOptions(context=2048, batch=4, objective=Objective.THROUGHPUT),
                    require={"local0", "local1"})  # fmt: skip
    # assert
    assert len(free.stages) == 1
    assert {"local0", "local1"} <= set(required.nodes)
    assert min(s.end - s.start for s in balanced.stages) >= 10  # balanced (the head's stage has a few blocks less)
    with pytest.raises(ValueError, match="not among the devices"):
        plan(model, devices, OPTIONS, require={"nowhere"})


def test_a_required_device_too_small_for_any_block_is_named() -> None:
    model = preset("llama-3.1-8b")
    devices = [DeviceProfile.declare("big", Memory(32 * GB)), DeviceProfile.declare("tiny", Memory(GB))]
    with pytest.raises(PlanError, match="tiny"):
        plan(model, devices, OPTIONS, require={"tiny"})
