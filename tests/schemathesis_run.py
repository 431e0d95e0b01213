"""One schemathesis pass over every operation of an OpenAPI schema, for the in-process and the real-server tests."""

from __future__ import annotations

from collections import Counter
from typing import Any


def fuzz_operations(
    schema: Any, mode: str, model: str, examples: int, paths: set[str] | None = None, **call: Any
) -> tuple[list[str], Counter[tuple[str, int]]]:
    """Call every operation of ``schema`` (or those of ``paths``) with ``examples`` generated cases (``mode``:
    "positive" bodies fit the schema, "negative" ones break it), bodies naming a model renamed to ``model`` (or nearly
    every request would stop at the 404). ``call``: keyword arguments of ``case.call`` (headers, timeout).

    Returns the 5xx answers (one line each) and the count of answers by (path, status).
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    def served_model(case: Any) -> Any:
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = model
        return case

    failures: list[str] = []
    answered: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if paths is not None and operation.path not in paths:
            continue

        @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)).map(served_model))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(**call)
            answered[(case.path, response.status_code)] += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.300}: {response.status_code} "
                                f"{response.text[:300]}")  # fmt: skip

        try:
            check()
        except Unsatisfiable:  # nothing to break in an operation without parameters or body
            assert mode == "negative", operation.label
    return failures, answered
