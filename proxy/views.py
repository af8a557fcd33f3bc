"""The routes that forward Ollama's API: one view per endpoint class."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import quote

from flask import Blueprint, Flask, Request, Response, current_app, g, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import ClientDisconnected as BodyCut
from werkzeug.exceptions import RequestEntityTooLarge

from endpoints import (
    LIGHT,
    OTHER_VIEW,
    PROXY_BLUEPRINT,
    ROUTES,
    AmbiguousModel,
    EndpointClass,
    model_of,
    view_name,
)
from errors import BadRequest, BodyTooLarge
from pipeline import Admit, Call, ClientDisconnected, Release, Upstream, parse_json, pipeline_of
from workqueue.core import DEFAULT_PRIORITY, PRIORITY_HEADER

from .disconnect import ClientWatch
from .relay import Relay, stream_kind
from .upstream import UpstreamResponse

logger = logging.getLogger(__name__)

bp = Blueprint(PROXY_BLUEPRINT, __name__)

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

# Request headers that describe this hop only (RFC 9110 section 7.6.1), plus Host (the
# upstream gets its own) and the framing headers urllib3 sets for the body it sends.
REQUEST_SKIP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)

# Request headers meant for the gate itself, whoever sends them: never forwarded.
GATE_HEADERS = frozenset({PRIORITY_HEADER.lower()})

# Response headers that describe the upstream hop, or that gunicorn writes itself.
RESPONSE_SKIP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "date",
        "server",
    }
)

BLOB_CHUNK = 64 * 1024

# The environ key under which the light lane hands Flask a call that failed before its
# answer (a Handover): a work-queue refusal, a client gone while queued, an upstream failure.
LANE_FAILURE = "gate.lane_failure"


class RelayResponse(Response):
    """A response whose headers and body come from the upstream as they are."""

    default_mimetype = None  # never invent a Content-Type the upstream did not send
    automatically_set_content_length = False


_NONE: frozenset[str] = frozenset()


def _named_in_connection(value: str | None) -> set[str]:
    """Header names a Connection header lists: they too describe this hop only."""
    value = value or ""
    return {token.strip().lower() for token in value.split(",") if token.strip()}


# What every request's headers lose on the way upstream (REQUEST_SKIP and GATE_HEADERS).
_ALWAYS_SKIP = REQUEST_SKIP | GATE_HEADERS


@functools.lru_cache(maxsize=1024)
def _header_of(key: str) -> tuple[str, str, bool] | None:
    """The request header a WSGI environ key carries, as werkzeug's EnvironHeaders names it
    (``HTTP_X_API_KEY``: ``X-Api-Key``), with its lower case and whether an empty value
    counts; None for a key that is no header. Bounded: header names come from clients."""
    if key.startswith("HTTP_"):
        if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            return None  # werkzeug reads these two from CONTENT_TYPE / CONTENT_LENGTH
        name = key[5:].replace("_", "-").title()
        return name, name.lower(), True
    if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        name = key.replace("_", "-").title()
        return name, name.lower(), False  # EnvironHeaders skips them when empty
    return None


def upstream_headers(environ: Mapping[str, Any], consumed: frozenset[str]) -> dict[str, str]:
    """The client's request headers (from its WSGI ``environ``, in the order and with the
    names werkzeug's ``EnvironHeaders`` gives them) minus hop-by-hop ones and the
    ``consumed`` ones.

    ``consumed`` names (lowercase) headers meant for the gate itself, such as the API
    key the limiter checked: they never reach the upstream, nor do GATE_HEADERS.
    """
    connection = environ.get("HTTP_CONNECTION")
    skip = _ALWAYS_SKIP
    if connection or consumed:
        skip = skip | _named_in_connection(connection) | consumed
    out: dict[str, str] = {}
    for key, name, lower, empty_counts in _header_keys(tuple(environ)):
        value = environ[key]
        if lower not in skip and (value or empty_counts):
            out[name] = value
    return out


@functools.lru_cache(maxsize=256)
def _header_keys(keys: tuple[str, ...]) -> tuple[tuple[str, str, str, bool], ...]:
    """The environ keys among ``keys`` that carry request headers, in their order, each with
    what ``_header_of`` says of it. A client sends the same headers request after request:
    found once for them, not by going through the whole environ each time. Bounded:
    header names come from clients."""
    found = []
    for key in keys:
        if key[:1] in "HC":  # HTTP_* or CONTENT_*, not most of the environ
            header = _header_of(key)
            if header is not None:
                found.append((key, *header))
    return tuple(found)


def forward_headers(req: Request | None = None) -> dict[str, str]:
    """The current request's headers as the upstream gets them (see ``upstream_headers``)."""
    req = req or request._get_current_object()  # type: ignore[attr-defined]
    return upstream_headers(req.environ, g.get("gate_consumed_headers", _NONE))


def client_headers(resp: UpstreamResponse) -> list[tuple[str, str]]:
    """The upstream's response headers as the client gets them: this hop's own dropped."""
    connection = resp.header("connection")
    skip = RESPONSE_SKIP | _named_in_connection(connection) if connection else RESPONSE_SKIP
    out = [(k, v) for k, v in resp.headers if k.lower() not in skip]
    if stream_kind(resp.content_type) or resp.header("transfer-encoding"):
        out.append(("X-Accel-Buffering", "no"))
    return out


def target(req: Request | None = None) -> str:
    """Path and query exactly as the client sent them."""
    req = req or request._get_current_object()  # type: ignore[attr-defined]
    raw = req.environ.get("RAW_URI")
    if isinstance(raw, str) and raw.startswith("/"):
        return raw
    path = quote(req.path)
    qs = req.query_string.decode("latin-1")
    return f"{path}?{qs}" if qs else path


def read_json_model(body: bytes) -> tuple[str, dict[str, Any]]:
    """The model a model endpoint's body names; 400 when the body is not JSON or names none."""
    try:
        payload = parse_json(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
        raise BadRequest("request body must be a JSON object") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        model = model_of(payload)
    except AmbiguousModel as exc:
        raise BadRequest(str(exc)) from None
    if model is None:
        raise BadRequest("model is required")
    return model, payload


# What reading a client's request body raises when its framing is broken (an invalid
# chunk size, a chunk longer than its size, bare-LF lines: gunicorn's ParseException
# subclasses) or the client stopped sending before its end (gunicorn's NoMoreData, an
# OSError, which werkzeug's request.get_data turns into its ClientDisconnected).
BODY_ERRORS: tuple[type[BaseException], ...] = (ParseException, OSError, BodyCut)


def body_error(exc: BaseException) -> BadRequest:
    """The 400 for a request body that could not be read (see BODY_ERRORS)."""
    if isinstance(exc, NoMoreData) or not isinstance(exc, ParseException):
        return BadRequest("request body incomplete: the connection ended before the body did")
    return BadRequest(f"malformed request body: {str(exc)[:200]}")


def read_body(req: Request | None = None) -> bytes:
    """The whole request body; 413 past GATE_MAX_BODY, with or without Content-Length,
    400 when its framing is broken (gunicorn then closes the connection)."""
    req = req or request._get_current_object()  # type: ignore[attr-defined]
    environ = req.environ
    if "CONTENT_LENGTH" not in environ and "HTTP_TRANSFER_ENCODING" not in environ:
        return b""  # no body announced: nothing to read (most GETs)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # werkzeug stops a body without Content-Length (chunked) at max_content_length and
    # returns it cut short, no error: read one byte past the limit to tell the two apart.
    if limit is not None:
        req.max_content_length = limit + 1
    try:
        body = req.get_data(cache=True)
    except RequestEntityTooLarge:  # Content-Length over the limit: one 413 for both cases
        raise BodyTooLarge("request body too large") from None
    except BODY_ERRORS as exc:
        logger.info("unreadable request body on %s: %s", req.path, exc)
        raise body_error(exc) from None
    if limit is None:
        return body
    if len(body) > limit:
        raise BodyTooLarge("request body too large")
    return body


def _blob_body(length: int | None) -> Iterator[bytes]:
    """The client's body as it arrives, for a blob upload sent on while it is received.

    When the body breaks off (malformed framing, a client that left) this raises
    the 400 while the upstream request is still being sent: Upstream.open then
    closes that connection, so the upstream sees a cut upload, never a
    whole-looking truncated blob.
    """
    # input_stream, not stream: request.stream enforces MAX_CONTENT_LENGTH, and setting
    # request.max_content_length = None falls back to the config in Flask 3.1. gunicorn
    # ends the input at Content-Length or the last chunk (wsgi.input_terminated).
    stream = request.input_stream
    received = 0
    while True:
        try:
            chunk = stream.read(BLOB_CHUNK)
        except BODY_ERRORS as exc:
            logger.info("blob upload to %s broke after %d bytes: %s", request.path, received, exc)
            raise body_error(exc) from None
        if not chunk:
            break
        received += len(chunk)
        yield chunk
    if length is not None and received < length:
        # gunicorn ends a Content-Length body early, with no error, when the client leaves.
        logger.info("client left after %d of %d bytes of %s", received, length, request.path)
        raise BadRequest(f"request body incomplete: {received} of {length} bytes arrived")


def client_id(req: Request | None = None) -> str:
    """Who the client is: the limiter's identity (API key name) when set, else its address."""
    req = req or request._get_current_object()  # type: ignore[attr-defined]
    return g.get("gate_client") or req.remote_addr or "unknown"


def forward(cls: EndpointClass, needs_model: bool, *, stream_body: bool = False) -> Response:
    """Forward the current request to the upstream and relay its answer."""
    # The request and the app, looked up once: each use of Flask's proxies costs a lookup.
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    environ = req.environ
    handed: Handover | None = environ.pop(LANE_FAILURE, None)
    if handed is not None:
        # The light lane began this call and failed before answering: answer here, as for
        # any request (proxy/lane.py), with the call as the lane recorded it.
        g.gate_call = handed.call
        return _failed(handed.error, handed.call)
    method = req.method
    gate = pipeline_of(app)
    headers = forward_headers(req)
    body: bytes | Iterator[bytes] | None
    if stream_body:
        # Blob uploads may be gigabytes: stream them through in constant memory.
        length = req.content_length
        if length:
            headers["Content-Length"] = str(length)
            body = _blob_body(length)
        elif environ.get("wsgi.input_terminated") and method == "POST":
            body = _blob_body(None)  # no length: sent on with chunked transfer-encoding
        else:
            body = None
    else:
        body = read_body(req) or None
    call = Call(
        cls,
        method,
        req.path,
        client_id(req),
        address=req.remote_addr,
        priority=g.get("gate_priority", DEFAULT_PRIORITY),
    )
    if needs_model and (body is None or isinstance(body, bytes)):
        call.model, call.payload = read_json_model(body or b"")
    g.gate_call = call

    watch = ClientWatch(environ)
    if cls != LIGHT and (body is None or isinstance(body, bytes)):
        # The body is read: from here on, EOF on the socket means the client left. Light
        # requests answer at once and skip the watch (a loop watcher per request costs).
        watch.start()
    try:
        resp, release = open_call(
            gate.admit, gate.upstream, call, watch, target(req), headers, body
        )
    except ClientDisconnected as exc:
        return _failed(exc, call)
    out_headers, relay = relay_of(app, resp, watch, call, release)
    return RelayResponse(relay, status=resp.status, headers=out_headers, direct_passthrough=True)


class Handover(NamedTuple):
    """What the light lane hands Flask at ``environ[LANE_FAILURE]`` when a call it began
    failed before an answer existed: Flask answers ``error`` for ``call``."""

    error: Exception
    call: Call


def open_call(
    admit: Admit | None,
    upstream: Upstream,
    call: Call,
    watch: ClientWatch,
    target: str,
    headers: Mapping[str, str],
    body: bytes | Iterator[bytes] | None,
) -> tuple[UpstreamResponse, Release | None]:
    """Admit ``call`` to the work queue, then send it upstream; the lane and Flask's view
    both begin every forwarded call here.

    Returns the upstream's response (its headers read: ``call.ttfb`` and ``call.status``
    set) and what frees the call's slot (None when it is not queued). Whatever this
    raises (a work-queue refusal, ClientDisconnected while waiting, an upstream failure),
    the slot is freed and the watch stopped first.
    """
    release: Release | None = None
    try:
        with watch.armed():
            if admit is not None:
                release = admit(call, watch.gone)
            opened = time.monotonic()
            resp: UpstreamResponse = upstream.open(call.method, target, headers, body)
            call.ttfb = time.monotonic() - opened
            call.status = resp.status
    except BaseException:
        _abandon(watch, release)
        raise
    return resp, release


def relay_of(
    app: Flask, resp: UpstreamResponse, watch: ClientWatch, call: Call, release: Release | None
) -> tuple[list[tuple[str, str]], Relay]:
    """The headers and body of an opened call's answer, for the lane and Flask's view alike:
    the upstream's headers for the client, X-Gate-Queue-Wait when the call was queued, and
    the Relay that ends the call (frees its slot, counts its tokens, sends call_finished)."""
    out_headers = client_headers(resp)
    if release is not None:
        out_headers.append(("X-Gate-Queue-Wait", f"{call.waited:.3f}"))
    return out_headers, Relay(app, resp, watch, call, on_close=release)


def _failed(error: Exception, call: Call) -> Response:
    """The answer to a call that failed before its upstream answered: 499 when its client
    left, else ``error`` raised for the app's error handlers to render."""
    if isinstance(error, ClientDisconnected):
        logger.info("client left before %s answered", call.path)
        return Response(status=499)
    raise error


def _abandon(watch: ClientWatch, release: Release | None) -> None:
    """Free what a request held when it ends before a response exists."""
    watch.stop()
    if release is not None:
        release()


def _view(cls: EndpointClass, needs_model: bool, stream_body: bool = False) -> Any:
    def view(**_: Any) -> Response:
        return forward(cls, needs_model, stream_body=stream_body)

    return view


# One view function per endpoint class and body kind (endpoints.view_name), so that the
# endpoint names say the class (endpoints.ENDPOINT_CLASSES).
_views: dict[str, Any] = {}
for _rule, _methods, _cls, _needs_model in ROUTES:
    _name = view_name(_rule, _cls, _needs_model)
    if _name not in _views:
        _views[_name] = _view(_cls, _needs_model, _rule.startswith("/api/blobs/"))
        _views[_name].__name__ = _name
    # No OPTIONS of Flask's own: a CORS preflight is Ollama's to answer (OLLAMA_ORIGINS),
    # so it falls through to the catch-all below and is forwarded as light.
    bp.add_url_rule(
        _rule, view_func=_views[_name], methods=list(_methods), provide_automatic_options=False
    )

# Anything else Ollama serves is forwarded as light (DESIGN.md, endpoint classes).
_other = _view(LIGHT, False)
_other.__name__ = OTHER_VIEW
bp.add_url_rule("/<path:path>", view_func=_other, methods=ALL_METHODS)
bp.add_url_rule("/", view_func=_other, methods=["OPTIONS"])  # the catch-all needs a path
