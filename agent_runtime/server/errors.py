"""HTTP API errors in OpenAI's shape (`{"error": {message, type, param, code}}`) with their status codes."""

from __future__ import annotations

import re
import uuid
from typing import Any

import structlog
from starlette.responses import JSONResponse

# An X-Request-Id a client sends is kept when it is this plain (it goes into logs and headers as is).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_from(header: bytes | None) -> str:
    """The id of a request: the client's `X-Request-Id` when it sent a plain one, else a new one."""
    if header is not None:
        value = header.decode("latin-1")
        if _CLIENT_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the request being served (bound to structlog's context by the outermost middleware, so every
    log line of the request carries it too), or None outside a request."""
    value = structlog.contextvars.get_contextvars().get("request_id")
    return value if isinstance(value, str) else None


# OpenAI's `type` for each status we answer with; clients (the `openai` package) map statuses to exceptions.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    421: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to an HTTP client; `message` is one line and safe to show (no internals)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape, plus the request's id (what to look for in the server log)."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        rid = current_request_id()
        if rid is not None:
            error["request_id"] = rid
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_request") -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist; available: {', '.join(known) or 'none'}",
        param="model",
        code="model_not_found",
    )


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds the {limit}-byte limit", code="request_too_large")


def over_capacity(limit: int, retry_after: float = 1.0) -> APIError:
    return APIError(
        429,
        f"The server is at capacity ({limit} concurrent requests); retry shortly",
        code="over_capacity",
        headers={"Retry-After": str(max(1, round(retry_after)))},
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "Missing or invalid API key: send `Authorization: Bearer <key>`",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def internal(request_id: str | None = None) -> APIError:
    rid = request_id or current_request_id() or uuid.uuid4().hex
    return APIError(500, f"Internal server error (request {rid}); see the server log", code="internal_error")


def not_ready(why: str) -> APIError:
    return APIError(503, why, code="not_ready", headers={"Retry-After": "1"})
