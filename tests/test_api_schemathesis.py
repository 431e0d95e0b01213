"""Schemathesis over the app's own OpenAPI schema: whatever the generated bodies, no 5xx and no hang.

The app runs in process with the real tokenizer and a fast fake step executor, so hundreds of generated requests
(absurd ``max_tokens``, unicode prompts, huge seeds), fitting the schema or breaking it, exercise the API layer in
seconds. ``tests/test_api_served.py`` runs the same over a real ``serve --nodes 2``. Skipped when schemathesis
is not installed (it belongs to the test extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from coordinator.api.app import create_app
from coordinator.api.backend import Backend, ModelInfo
from coordinator.scheduler import RowWork, Scheduler

schemathesis = pytest.importorskip("schemathesis")
from tests.schemathesis_run import fuzz_operations  # noqa: E402


class FastExecutor:
    n_slots, max_len, depth = 4, 96, 1

    async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
        return [(r.tokens[-1] * 31 + 7) % 49152 if r.sample else None for r in rows]

    async def close(self) -> None:
        pass


def _app() -> Any:
    from llama_shard.embedded import smollm2_gguf_path
    from llama_shard.loading import load_tokenizer, open_source

    tokenizer = load_tokenizer(open_source(smollm2_gguf_path()))
    info = ModelInfo("tiny", frozenset(), "/x/tiny.gguf", "gguf", "llama", 1, 1, "Q4_1", 96, 0.0)
    return create_app(Backend(info, tokenizer, 96, Scheduler(FastExecutor(), max_queue=64)))


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_error_for_any_generated_request(mode: str) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
    failures, answered = fuzz_operations(schema, mode, "tiny", 25, timeout=10)
    assert not failures, "\n".join(failures)
    if mode == "positive":  # the generation routes did generate, not only refuse
        generated = {path for (path, status) in answered if status == 200}
        assert {"/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat"} <= generated, answered
