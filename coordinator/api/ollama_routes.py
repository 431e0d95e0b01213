"""Ollama-compatible routes: ``/api/generate``, ``/api/chat`` (NDJSON streams by default), ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/version``.

Ollama's own defaults apply when ``options`` leave them out (temperature 0.8, top_k 40, top_p 0.9). The penalties
(``repeat_penalty``, ``presence_penalty``, ``frequency_penalty``) are llama.cpp's, over the last ``repeat_last_n``
tokens (default 64, 0 turns them off, -1 means the whole context), prompt included; they are off unless given, as
in Ollama's own engine (its old llama.cpp runner defaulted ``repeat_penalty`` to 1.1). ``num_ctx`` and
``keep_alive``, which Ollama clients send routinely, are accepted and ignored with a log line: the context is fixed
when the server starts and the model stays loaded while it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from coordinator.api.backend import Backend, ModelInfo, TextRun, sampling_params, until_disconnected
from coordinator.api.errors import ApiError
from coordinator.api.schemas import ChatRequest, GenerateRequest, OllamaOptions, ShowRequest
from coordinator.api.splice import cut_at_marks

log = logging.getLogger(__name__)

OLLAMA_VERSION = "0.9.0"  # the API level these routes follow; clients check it exists, not its value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


#: strings no model writes and no clock formats, standing for a chunk's own values in a chunk encoded once
_CREATED, _DELTA = "\x00created_at\x00", "\x00delta\x00"


def _delta_lines(piece: Callable[[str, str], dict[str, Any]]) -> Callable[[str], bytes]:
    """``delta -> _ndjson(piece(_now(), delta))``, the same bytes for less work: a stream's chunks differ only in their
    ``created_at`` and delta, so the chunk is encoded once around two marks and each token's line is that encoding
    with the time's and the delta's JSON strings in the marks' places."""

    def slow(delta: str) -> bytes:
        return _ndjson(piece(_now(), delta))

    pieces = cut_at_marks(_ndjson(piece(_CREATED, _DELTA)), [_CREATED, _DELTA])
    if pieces is None:  # a field that mimics a mark, or a chunk that holds the delta before the time
        return slow
    head, middle, tail = pieces

    def fast(delta: str) -> bytes:
        return b"".join((head, json.dumps(_now()).encode(), middle, json.dumps(delta).encode(), tail))

    return fast


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _details(info: ModelInfo) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": info.format,
        "family": info.family,
        "families": [info.family],
        "parameter_size": info.parameter_size,
        "quantization_level": info.quantization,
    }


def _start(
    backend: Backend, options: OllamaOptions | None, prompt_ids: list[int], keep_alive: object = None
) -> TextRun | None:
    """Submit the run, or None when ``num_predict`` is 0 (nothing to generate)."""
    o = options or OllamaOptions()
    if o.num_ctx is not None and o.num_ctx != backend.max_len:
        log.info("options.num_ctx=%d ignored: the context is %d tokens (serve --context)", o.num_ctx, backend.max_len)
    if keep_alive is not None:
        log.info("keep_alive=%r ignored: the model stays loaded while the server runs", keep_alive)
    room = backend.room(len(prompt_ids))
    if o.num_predict == 0:
        return None
    max_tokens = room if o.num_predict is None or o.num_predict < 0 else min(o.num_predict, room)
    params = sampling_params(
        temperature=0.8 if o.temperature is None else o.temperature,
        top_p=0.9 if o.top_p is None else o.top_p,
        top_k=40 if o.top_k is None else o.top_k,
        min_p=o.min_p,
        repetition_penalty=o.repeat_penalty,
        seed=o.seed,
        frequency_penalty=o.frequency_penalty,
        presence_penalty=o.presence_penalty,
        penalty_last_n=64 if o.repeat_last_n is None else max(0, o.repeat_last_n),  # -1: all, as 0 is here
    )
    if o.repeat_last_n == 0:  # Ollama's "disabled"
        params = replace(params, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    return TextRun(backend, prompt_ids, params, max_tokens, o.stop or [])


def _refuse_unsupported(format_: object, images: object) -> None:
    if format_:
        raise ApiError(400, "structured output (format) is not supported")
    if images:
        raise ApiError(400, "images are not supported: the served model reads text only")


async def _respond(
    request: Request,
    run: TextRun | None,
    stream: bool,
    piece: Callable[[str, str], dict[str, Any]],
    done: Callable[[TextRun | None], dict[str, Any]],
) -> StreamingResponse | JSONResponse:
    """``piece(created_at, delta)`` is a streamed token's chunk; ``done(run)`` the last chunk, or the whole answer."""
    if stream and run is not None:
        active = run

        async def lines() -> AsyncIterator[bytes]:
            try:
                line = _delta_lines(piece)
                async for delta in active.deltas():
                    yield line(delta)
                yield _ndjson(done(active))
            except ApiError as e:  # headers are gone: report in band, as Ollama does
                yield _ndjson(e.ollama_body())
            finally:
                active.cancel()

        return StreamingResponse(lines(), media_type="application/x-ndjson")
    if run is not None:
        watcher = asyncio.ensure_future(until_disconnected(request.is_disconnected, run))
        try:
            await run.complete()
        finally:
            watcher.cancel()
    return JSONResponse(done(run))


def router(backend: Backend) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["ollama"])
    info = backend.info

    def final_fields(run: TextRun | None) -> dict[str, Any]:
        if run is None:
            return {
                "done": True,
                "done_reason": "length",
                "total_duration": 0,
                "load_duration": 0,
                "prompt_eval_count": 0,
                "prompt_eval_duration": 0,
                "eval_count": 0,
                "eval_duration": 0,
            }
        return {"done": True, "done_reason": run.finish_reason, **run.timings_ns()}

    @r.post("/generate", response_model=None)
    async def generate(request: Request, body: GenerateRequest) -> StreamingResponse | JSONResponse:
        backend.check_model(body.model, ollama=True)
        _refuse_unsupported(body.format, body.images)
        if body.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported")
        if not body.prompt and not body.context:
            # Ollama answers an empty prompt by loading the model; ours is always loaded
            return JSONResponse(
                {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
            )
        if body.template:
            raise ApiError(400, "custom templates are not supported: use raw with a prompt already templated")
        if body.raw:
            ids = backend.tokenizer.encode(body.prompt, add_bos=None if not body.context else False)
        else:
            messages = [{"role": "system", "content": body.system}] if body.system else []
            ids = backend.chat_ids([*messages, {"role": "user", "content": body.prompt}])
        backend.check_ids(body.context or [], param="context")
        ids = list(body.context or []) + ids
        run = _start(backend, body.options, ids, body.keep_alive)

        def piece(created_at: str, delta: str) -> dict[str, Any]:
            return {"model": body.model, "created_at": created_at, "response": delta, "done": False}

        def done(run: TextRun | None) -> dict[str, Any]:
            text = "" if body.stream or run is None else run.text
            context = ids + (run.completion_ids if run else [])
            return {
                "model": body.model,
                "created_at": _now(),
                "response": text,
                **final_fields(run),
                "context": context,
            }

        return await _respond(request, run, body.stream, piece, done)

    @r.post("/chat", response_model=None)
    async def chat(request: Request, body: ChatRequest) -> StreamingResponse | JSONResponse:
        backend.check_model(body.model, ollama=True)
        _refuse_unsupported(body.format, any(m.images for m in body.messages))
        if not body.messages:
            return JSONResponse(
                {
                    "model": body.model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "load",
                }
            )
        ids = backend.chat_ids([{"role": m.role, "content": m.content} for m in body.messages])
        run = _start(backend, body.options, ids, body.keep_alive)

        def piece(created_at: str, delta: str) -> dict[str, Any]:
            return {
                "model": body.model,
                "created_at": created_at,
                "message": {"role": "assistant", "content": delta},
                "done": False,
            }

        def done(run: TextRun | None) -> dict[str, Any]:
            text = "" if body.stream or run is None else run.text
            return {
                "model": body.model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": text},
                **final_fields(run),
            }

        return await _respond(request, run, body.stream, piece, done)

    @r.get("/tags")
    async def tags() -> dict[str, Any]:
        from coordinator.models_store import list_local_models

        models = [_tag(info.name, info.modified_at, info.size_bytes, info.digest, _details(info))]
        for m in await asyncio.to_thread(list_local_models):
            if not info.matches(m.name):
                details = {
                    "parent_model": "",
                    "format": "gguf" if m.path.suffix == ".gguf" else "safetensors",
                    "family": "",
                    "families": None,
                    "parameter_size": "",
                    "quantization_level": "",
                }
                models.append(_tag(m.name, m.modified_at, m.size_bytes, m.digest, details))
        return {"models": models}

    @r.post("/show")
    async def show(body: ShowRequest) -> dict[str, Any]:
        if not body.model_name():
            raise ApiError(400, "model is required", param="model")
        backend.check_model(body.model_name(), ollama=True)
        return {
            "license": "",
            "modelfile": f"# served by llama-node\nFROM {info.path}\n",
            "parameters": "",
            "template": backend.tokenizer.chat_template or "",
            "details": _details(info),
            "model_info": {
                "general.architecture": info.family,
                "general.parameter_count": info.parameter_count,
                f"{info.family}.context_length": info.context_length,
            },
            "capabilities": ["completion"],
            "modified_at": _iso(info.modified_at),
        }

    @r.get("/ps")
    async def ps() -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": info.name,
                    "model": info.name,
                    "size": info.size_bytes,
                    "digest": info.digest,
                    "details": _details(info),
                    "expires_at": _iso(time.time() + 10 * 365 * 86400),  # resident until the server stops
                    "size_vram": 0,
                    "context_length": backend.max_len,
                }
            ]
            if backend.scheduler is not None
            else []
        }

    @r.get("/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_VERSION}

    return r


def _tag(name: str, modified: float, size: int, digest: str, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": _iso(modified),
        "size": size,
        "digest": digest,
        "details": details,
    }
