"""The gate's errors as Flask responses: the handlers create_app registers.

``errors`` holds the exception tree and the JSON shapes (standard library only);
this module renders them in a request, and tells the status page (``call_rejected``).
"""

from __future__ import annotations

import math

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from errors import GateError, error_body
from signals import call_rejected


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
