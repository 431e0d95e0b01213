"""``llama-node serve`` as the coordinator over joined nodes, all real processes on loopback (no mDNS: ``--no-mdns``
on every side, nodes given with ``--peer``).

Before any node joins, the API answers 503 with ``Retry-After`` and the reason, and the log shows the join line;
then two ``llama-node join`` processes (each capped with ``--memory`` so that the model needs both) join with the
printed token, the coordinator plans and loads, the official ``openai`` client gets the same greedy text as
``llama-node run --json``, and ``llama-node status --json`` lists both nodes with their layers.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import openai

from coordinator.planner.loaders import load_model_profile
from llama_shard.embedded import smollm2_gguf_path
from tests.cluster_helpers import LLAMA_NODE, free_port, memory_cap_for, start_join, stop, wait_for_log

QUESTION = "What is the capital of France?"
N = 12
CONTEXT, SLOTS = 256, 4


def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not up in {timeout:.0f} s:\n{log.read_text(errors='replace')}")


def test_serve_over_joined_nodes(tmp_path: Path) -> None:
    # arrange: the reference answer (in its own process, loading while the cluster comes up) and the coordinator
    model = smollm2_gguf_path()
    reference = subprocess.Popen([LLAMA_NODE, "run", "-p", QUESTION, "--json", "-n", str(N), "-t", "0", "--threads",
                                  "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    cap = memory_cap_for(model, 2, CONTEXT, SLOTS, upper=8 * 10**9)
    http_port, join_port, ports = free_port(), free_port(), [free_port(), free_port()]
    state, serve_log = tmp_path / "state", tmp_path / "serve.log"
    url = f"http://127.0.0.1:{http_port}"
    args = [LLAMA_NODE, "serve", "--port", str(http_port), "--state-dir", str(state), "--join-host", "127.0.0.1",
            "--join-port", str(join_port), "--no-mdns", "--min-nodes", "2", "--context", str(CONTEXT), "--slots",
            str(SLOTS), "--threads", "1", *[a for p in ports for a in ("--peer", f"127.0.0.1:{p}")]]  # fmt: skip
    procs = [subprocess.Popen(args, stdout=serve_log.open("wb"), stderr=subprocess.STDOUT)]
    try:
        wait_up(url + "/", procs[0], serve_log)
        body = {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": N}
        # act 1: a request before any node has joined
        early = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
        token = (state / "token").read_text().strip()
        early_log = wait_for_log(serve_log, "waiting for nodes", procs[0])
        # act 2: two nodes join with the printed token, the coordinator plans over both and loads
        for i, port in enumerate(ports):
            procs.append(start_join(["--token", token, "--coordinator", f"127.0.0.1:{join_port}", "--address",
                                     "127.0.0.1", "--host", "127.0.0.1", "--port", str(port), "--no-mdns", "--device",
                                     "cpu", "--memory", str(cap), "--cache-dir", str(tmp_path / f"cache{i}")],
                                    tmp_path / f"join{i}.log"))  # fmt: skip
        wait_for_log(serve_log, "ready:", procs[0], timeout=90)
        oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        chat = oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=N, temperature=0)  # fmt: skip
        status = subprocess.run([LLAMA_NODE, "status", "--json", "--coordinator", f"127.0.0.1:{join_port}",
                                 "--state-dir", str(state)], capture_output=True, text=True, timeout=30)  # fmt: skip
        ref_out, _ = reference.communicate(timeout=120)
    finally:
        reference.kill()
        stop(procs)
    # assert: 503 with a reason and Retry-After before the nodes, the join line printed, the nodes listed
    assert early.status_code == 503 and early.headers["Retry-After"] == "5"
    assert "waiting for nodes" in early.json()["error"]["message"] and token not in early.text
    assert f"llama-node join --token {token}" in early_log
    assert f"llama-node join --token {token} --coordinator 127.0.0.1:{join_port}" in early_log
    assert reference.returncode == 0
    assert chat.choices[0].message.content == json.loads(ref_out)["text"]
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["state"] == "ready"
    nodes = sorted(data["nodes"], key=lambda n: n["layers"][0])
    assert {n["address"] for n in nodes} == {f"127.0.0.1:{p}" for p in ports}
    n_layers = load_model_profile(str(model)).n_layers
    (a0, a1), (b0, b1) = nodes[0]["layers"], nodes[1]["layers"]
    assert a0 == 0 and a1 == b0 and b1 == n_layers and 0 < a1 < n_layers, nodes
