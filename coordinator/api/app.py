"""The coordinator's HTTP app: OpenAI routes under ``/v1``, Ollama routes under ``/api``, ``GET/HEAD /``.

Two details of the Ollama dialect are handled before routing, in ``_Compat``: ``curl -d '{...}'`` sends JSON as
``application/x-www-form-urlencoded`` and Ollama reads it as JSON anyway, so ``/api/*`` bodies are JSON whatever their
content type; and with ``--api-key`` every call needs ``Authorization: Bearer <key>`` but ``GET/HEAD /`` (the Ollama
CLI's liveness check) and the API's own description (``/openapi.json``, ``/docs``, ``/redoc``).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.api import ollama_routes, openai_routes
from coordinator.api.backend import Backend
from coordinator.api.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class _Compat:
    """ASGI middleware: JSON bodies under ``/api`` whatever the content type, and the bearer key check (every path
    but ``PUBLIC_PATHS``)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self.api_key is not None and path not in PUBLIC_PATHS and not self._authorised(scope):
            await self._reject(path, send)
            return
        if path.startswith("/api/") and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for k, v in scope["headers"]:
            if k.lower() == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    async def _reject(self, path: str, send: Send) -> None:
        error = ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        body = json.dumps(error.body_for(path)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(backend: Backend, *, api_key: str | None = None) -> FastAPI:
    """The app serving ``backend``. The scheduler (when there is one) starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if backend.scheduler is not None:
            backend.scheduler.start()
        yield
        if backend.scheduler is not None:
            await backend.scheduler.stop()

    app = FastAPI(
        title="llama-node",
        version="0.1.0",
        summary="One Llama across the machines of a household: OpenAI- and Ollama-compatible API.",
        lifespan=lifespan,
    )
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.include_router(openai_routes.router(backend))
    app.include_router(ollama_routes.router(backend))

    @app.get("/stats", tags=["llama-node"])
    async def stats() -> dict[str, int]:
        """The scheduler's counters: active and waiting requests, free KV slots, steps run."""
        return backend.scheduler.stats() if backend.scheduler is not None else {}

    @app.get("/", response_class=PlainTextResponse)
    @app.head("/", response_class=PlainTextResponse, include_in_schema=False)
    async def root() -> str:
        return "Ollama is running"  # the Ollama CLI checks HEAD / and this exact text

    if api_key is not None:
        _declare_bearer(app)
    app.add_middleware(_Compat, api_key=api_key)
    return app


def _declare_bearer(app: FastAPI) -> None:
    """The OpenAPI schema says that every operation but ``/`` needs the bearer key (``/docs`` gets an Authorize)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    operation["security"] = [] if path in PUBLIC_PATHS else [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
