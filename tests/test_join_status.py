"""`llama-node status` against a real coordinator runtime with one joined node on loopback (found by --peer)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from coordinator.cluster import ClusterRuntime, ClusterSettings
from tests.cluster_helpers import LLAMA_NODE, free_port, start_join, stop


def test_status_lists_nodes_with_their_layers(tmp_path: Path, make_hf_llama: Callable[..., Path]) -> None:
    # arrange: a coordinator runtime (mDNS off: tests send nothing beyond loopback) and one joined node
    model = make_hf_llama(num_hidden_layers=2)
    port = free_port()
    settings = ClusterSettings(model=model, state_dir=tmp_path / "state", peers=[f"127.0.0.1:{port}"], mdns=False,
                               host="127.0.0.1", port=0, context=64, settle_s=0.2)  # fmt: skip
    runtime = ClusterRuntime(settings)
    proc = None
    try:
        token = (tmp_path / "state" / "token").read_text()
        proc = start_join(["--token", token, "--coordinator", f"127.0.0.1:{runtime.cluster.port}", "--address",
                           "127.0.0.1", "--host", "127.0.0.1", "--port", str(port), "--no-mdns", "--device", "cpu",
                           "--cache-dir", str(tmp_path / "cache")], tmp_path / "join.log")  # fmt: skip
        runtime.wait_ready(90)
        where = f"127.0.0.1:{runtime.cluster.port}"
        # act
        out = subprocess.run([LLAMA_NODE, "status", "--json", "--coordinator", where, "--state-dir",
                              str(tmp_path / "state")], capture_output=True, text=True, timeout=30)  # fmt: skip
        table = subprocess.run([LLAMA_NODE, "status", "--coordinator", where, "--state-dir", str(tmp_path / "state")],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        refused = subprocess.run([LLAMA_NODE, "status", "--coordinator", where, "--state-dir", str(tmp_path / "no")],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
        wrong = subprocess.run([LLAMA_NODE, "status", "--coordinator", where, "--token",
                                "lln1." + "0" * 32 + "." + token.split(".")[2]],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
    finally:
        if proc is not None:
            stop([proc])
        runtime.close()
    # assert
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (node,) = data["nodes"]
    assert node["address"] == f"127.0.0.1:{port}" and node["id"] and node["device"] == "cpu"
    assert node["memory"] > 0 and node["layers"] == [0, 2]
    assert data["state"] == "ready"
    assert node["id"] in table.stdout and "[0, 2)" in table.stdout
    assert refused.returncode == 2 and "no token" in refused.stderr
    assert wrong.returncode == 3 and "UNAUTHENTICATED" in wrong.stderr
