"""The gate's own errors: one exception tree, and the contract's JSON shapes for them.

Native endpoints answer ``{"error": "<message>"}`` (Ollama's shape, so
``ollama.ResponseError`` shows the message); ``/v1/*`` answers OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Standard library only, so the
pure layers (the work queue's scheduler, the fleet's placement) raise these without
importing Flask; ``error_handlers`` renders them as Flask responses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

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


class TooManyFailedKeys(RateLimited):
    """The client's address presented too many wrong API keys (GATE_AUTH_FAIL_LIMIT)."""

    code = "too_many_failed_keys"


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
