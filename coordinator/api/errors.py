"""Errors answered in the caller's dialect: OpenAI's ``{"error": {message, type, param, code}}`` under ``/v1``,
Ollama's ``{"error": "..."}`` under ``/api``. Every status carries its reason; 429 and 503 carry ``Retry-After``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        # messages quote the request; anything UTF-8 cannot carry is escaped so that the answer can be sent
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.retry_after_s = retry_after_s

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}

    def body_for(self, path: str) -> dict[str, Any]:
        return self.ollama_body() if path.startswith("/api/") else self.openai_body()

    def response(self, path: str) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        if self.status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return JSONResponse(self.body_for(path), status_code=self.status, headers=headers)


def _describe(errors: list[Any]) -> tuple[str, str | None]:
    parts, param = [], None
    for e in errors[:3]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":  # loc is the byte offset
            loc, msg = [], f"not JSON ({(e.get('ctx') or {}).get('error', 'invalid')} at byte {loc[0] if loc else 0})"
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg if e.get("type") == "value_error" else f"body: {msg}")
    return "; ".join(parts) or "invalid request body", param


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response(request.url.path)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _describe(list(exc.errors()))
    return ApiError(400, message, param=param).response(request.url.path)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return ApiError(exc.status_code, str(exc.detail)).response(request.url.path)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}").response(request.url.path)
