"""Cold start (issue #8): a plain one-process ``llama-node run`` imports none of the server/cluster stacks, and
reads the GGUF header with ``gguf_meta`` rather than gguf-py's ``GGUFReader`` (seconds on a 49K-token vocabulary).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

#: Packages only ``serve``/``node``/``join``/tests need; each costs 0.1-2 s to import.
SERVER_STACKS = ("fastapi", "uvicorn", "starlette", "grpc", "zeroconf", "transformers", "aiomqtt", "prometheus_client")

_PROBE = """
import atexit, json, sys
import gguf
def never(*args, **kwargs):
    raise AssertionError("GGUFReader used on the run path")
gguf.GGUFReader.__init__ = never
def report():
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
atexit.register(report)
from coordinator.cli import main
sys.argv = ["llama-node", "run", "--prompt", "hi", "--max-tokens", "1", "--threads", "1"]
main()
"""


def test_plain_run_imports_no_server_stack_and_no_gguf_reader() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    assert {"torch", "tokenizers", "llama_shard"} <= loaded  # the probe did run the model
    assert not loaded & set(SERVER_STACKS), sorted(loaded & set(SERVER_STACKS))
