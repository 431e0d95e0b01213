"""A streamed chunk encoded once, with each token's values put in: the OpenAI SSE events and the Ollama NDJSON lines
of one stream differ only in a few string fields (the delta, Ollama's ``created_at``), so each route encodes its
chunk once with *marks* (strings no model writes) in those fields, cuts the bytes at the marks' JSON, and joins the
pieces with each token's own JSON strings in between: the same bytes as encoding anew, for a fraction of the work."""

from __future__ import annotations

import json
from collections.abc import Sequence


def cut_at_marks(encoded: bytes, marks: Sequence[str]) -> list[bytes] | None:
    """``encoded`` cut at the JSON strings of ``marks``: the ``len(marks) + 1`` pieces around them, in order. None
    when a mark is not there exactly once (a field that mimics it, a chunk that does not carry the value as a
    string) or the marks come in another order: the caller then encodes each chunk anew."""
    pieces: list[bytes] = []
    rest = encoded
    for mark in marks:
        quoted = json.dumps(mark).encode()
        if encoded.count(quoted) != 1:
            return None
        head, found, rest = rest.partition(quoted)
        if not found:  # the mark came before the previous one
            return None
        pieces.append(head)
    pieces.append(rest)
    return pieces
