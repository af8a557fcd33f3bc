"""The gate's own error responses: one exception tree, rendered in the contract's shapes.

Native endpoints answer ``{"error": "<message>"}`` (Ollama's shape, so
``ollama.ResponseError`` shows the message); ``/v1/*`` answers OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from signals import call_rejected

# Ollama's own text for a full queue (server/sched.go, ErrMaxQueue), so clients
# that match on it keep working.
BUSY_TEXT = "server busy, please try again.  maximum pending requests exceeded"


class GateError(Exception):
    """An error the gate answers itself instead of forwarding the request."""

    status = 500
    openai_type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = dict(headers or {})


class BadRequest(GateError):
    status = 400
    openai_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GateError):
    status = 401
    openai_type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GateError):
    status = 403
    openai_type = "invalid_request_error"
    code = "forbidden"


class ModelNotAllowed(Forbidden):
    """The request names a model outside its API key's allow-list."""

    code = "model_not_allowed"


class BodyTooLarge(GateError):
    status = 413
    openai_type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GateError):
    status = 429
    openai_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class TokenBudgetSpent(RateLimited):
    """A client's token budget is spent: told apart from too many requests by its code."""

    code = "token_budget_exceeded"


class ClientShareFull(RateLimited):
    code = "client_queue_full"


class QueueFull(GateError):
    status = 503
    openai_type = "server_error"
    code = "queue_full"

    def __init__(self, message: str = BUSY_TEXT, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class QueueTimeout(GateError):
    status = 503
    openai_type = "server_error"
    code = "queue_timeout"


class ShuttingDown(GateError):
    status = 503
    openai_type = "server_error"
    code = "shutting_down"


class UpstreamUnavailable(GateError):
    status = 502
    openai_type = "api_error"
    code = "upstream_unavailable"


class UpstreamTimeout(GateError):
    status = 504
    openai_type = "api_error"
    code = "upstream_timeout"


def is_openai_path(path: str) -> bool:
    """Whether a request path speaks the OpenAI-compatible API."""
    return path == "/v1" or path.startswith("/v1/")


def error_body(
    status: int, message: str, path: str, *, openai_type: str | None = None, code: str | None = None
) -> bytes:
    """The JSON error body for ``path``: Ollama's shape, or OpenAI's under /v1."""
    if is_openai_path(path):
        payload: dict[str, object] = {
            "error": {
                "message": message,
                "type": openai_type or ("invalid_request_error" if status < 500 else "api_error"),
                "param": None,
                "code": code,
            }
        }
    else:
        payload = {"error": message}
    return json.dumps(payload).encode()


def announce(exc: GateError | HTTPException) -> None:
    """Send call_rejected for an error the gate answers itself (the status page counts them)."""
    if call_rejected.receivers:
        call_rejected.send(
            current_app._get_current_object(),  # type: ignore[attr-defined]
            error=exc,
            path=request.path,
            call=g.get("gate_call"),
        )


def render(exc: GateError) -> Response:
    """Render a GateError as the contract's JSON response."""
    announce(exc)
    body = error_body(
        exc.status, exc.message, request.path, openai_type=exc.openai_type, code=exc.code
    )
    response = Response(body, status=exc.status, mimetype="application/json")
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    response.headers.update(exc.headers)
    return response


def render_http_exception(exc: HTTPException) -> Response:
    """Werkzeug's own errors (405, 413 from MAX_CONTENT_LENGTH) in the contract's shape."""
    announce(exc)
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 413:
        message = "request body too large"
    response = Response(
        error_body(status, message, request.path), status=status, mimetype="application/json"
    )
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def init_app(app: Flask) -> None:
    """Register the handlers that render the gate's errors."""
    app.register_error_handler(GateError, render)
    app.register_error_handler(HTTPException, render_http_exception)
