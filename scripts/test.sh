#!/usr/bin/env bash
# Installs everything (scripts/setup.sh --test), checks lint and types, and runs the test suite.
# Extra arguments go to pytest: `bash scripts/test.sh -m slow` runs the slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy llama_shard node coordinator
.venv/bin/python -m pytest "$@"
