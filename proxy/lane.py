"""The light lane: requests nothing but the proxy and the work queue has a say in,
forwarded without Flask.

Listing models, asking for the version or the loaded models, and the inference
and embed calls themselves are most of the requests a busy gate sees, and Flask's
own machinery costs about as much CPU again as the forwarding (docs/BENCHMARKS.md).
When no limit applies to such a request (no limit of its class and no token budget
for its client; with API keys on, a valid key without a model allow-list) this WSGI
middleware, just in front of Flask, forwards it with the proxy's own parts: the
same header filters, the same work-queue admission and upstream pool
(``views.open_call``), the same headers and Relay (``views.relay_of``), which
frees the slot and sends ``call_finished`` so the token accounting, the status
page, the metrics and the access log count it. The lane takes GET and HEAD of the
light endpoints, and POSTs of a JSON body naming a model (``/api/show``, the
inference and embed endpoints).

Everything else goes to Flask: requests the lane cannot answer exactly as Flask
would (a key to check, a limit to count, a body it cannot read as a JSON object
naming a model, a path Flask would redirect, several backends), and every call
that fails before its answer (a work-queue refusal, a client gone while queued,
an upstream that fails), which Flask's view then answers for the call the lane
began (``views.Handover``), in the contract's shape and through the same error
handlers and signals. The first request of a worker goes to Flask too, so that
the one-time start-up work of its before_request hooks has run.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn

from flask import Flask
from werkzeug.wrappers import Response

from endpoints import EMBED, INFERENCE, LIGHT, ROUTES, AmbiguousModel, EndpointClass, model_of
from pipeline import Admit, Call, Identify, Upstream, parse_json

from .disconnect import ClientWatch
from .upstream import Upstream as PooledUpstream
from .views import (
    BODY_ERRORS,
    LANE_FAILURE,
    Handover,
    RelayResponse,
    open_call,
    relay_of,
    upstream_headers,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# The light routes a GET or HEAD may take: exact paths, and prefixes of a trailing
# <path:...> variable ("/v1/models/" for /v1/models/<path:model>).
PATHS = frozenset(
    rule
    for rule, methods, cls, _ in ROUTES
    if cls == LIGHT and "GET" in methods and "<" not in rule
)
PREFIXES = tuple(
    rule.partition("<path:")[0]
    for rule, methods, cls, _ in ROUTES
    if cls == LIGHT and "GET" in methods and "<path:" in rule and rule.endswith(">")
)
READS = ("GET", "HEAD")
# The POSTs with a JSON body naming a model the lane may take, by path: the light POST
# /api/show, and the inference and embed endpoints, which it admits to the work queue
# as Flask's view does. It takes them when they come with a Content-Length within
# GATE_MAX_BODY.
POSTS: dict[str, EndpointClass] = {
    rule: cls
    for rule, methods, cls, needs_model in ROUTES
    if cls in (LIGHT, INFERENCE, EMBED) and "POST" in methods and needs_model and "<" not in rule
}


def lane_path(path: str) -> bool:
    """Whether Flask would route ``path`` to a light view as it is: no redirect, no decoding."""
    if path in PATHS:
        return True
    if not path.isascii():
        return False  # Flask decodes it as UTF-8; the lane would not
    for prefix in PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix) and "//" not in path:
            return True
    return False


@functools.lru_cache(maxsize=64)
def status_line(code: int) -> str:
    """The status line werkzeug writes for ``code`` ("200 OK", "404 NOT FOUND")."""
    return Response(status=code).status


class LightLane:
    """WSGI middleware around Flask's own ``wsgi_app``: see the module's docstring.

    ``identify`` is the limiter's word on each request (pipeline.Identify); without
    it every request goes to Flask. ``admit`` is the work queue's admission
    (pipeline.Admit), through which the lane's inference and embed calls wait for
    their slot exactly as Flask's view's do.
    """

    def __init__(
        self,
        app: Flask,
        wsgi_app: WSGIApplication,
        *,
        upstream: Upstream,
        identify: Identify | None,
        admit: Admit | None = None,
    ) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.upstream = upstream
        self.identify = identify
        self.admit = admit
        # A fleet places a POST by its model inside Flask's request (fleet/runtime.py):
        # the lane takes POSTs only to the one backend of the proxy's own pool.
        self.posts: dict[str, EndpointClass] = (
            dict(POSTS) if isinstance(upstream, PooledUpstream) else {}
        )
        self.max_body: int | None = app.config.get("MAX_CONTENT_LENGTH")
        self.warm = False  # a request has been through Flask
        self.served = 0  # requests the lane forwarded itself

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not (
            self.warm
            and "HTTP_TRANSFER_ENCODING" not in environ
            and environ.get("RAW_URI", "").startswith("/")
        ):
            return self._flask(environ, start_response)
        method: str = environ.get("REQUEST_METHOD", "")
        path: str = environ.get("PATH_INFO", "")
        length: int | None = None
        cls: EndpointClass
        if method == "POST":
            posted = self.posts.get(path)
            length = self._post_length(environ) if posted is not None else None
            if posted is None or length is None:
                return self._flask(environ, start_response)
            cls = posted
        elif (
            method in READS and lane_path(path) and environ.get("CONTENT_LENGTH") in (None, "", "0")
        ):
            cls = LIGHT
        else:
            return self._flask(environ, start_response)
        who = self.identify(environ, cls) if self.identify is not None else None
        if who is None:
            return self._flask(environ, start_response)
        call = Call(
            cls,
            method,
            path,
            who.client,
            address=environ.get("REMOTE_ADDR"),
            priority=who.priority,
        )
        body = None
        if length is not None:
            body = self._read_json(environ, length, call)
            if body is None:
                return self._flask(environ, start_response)  # Flask answers what the lane cannot
        headers = upstream_headers(environ, who.consumed)
        watch = ClientWatch(environ)
        if cls != LIGHT:
            watch.start()  # the body is read: a waiting job notices its client leave
        try:
            resp, release = open_call(
                self.admit, self.upstream, call, watch, environ["RAW_URI"], headers, body
            )
        except Exception as exc:
            # Nothing was answered yet (a refusal, a client gone while queued, an upstream
            # that failed): Flask answers it for this call, as for any request.
            environ[LANE_FAILURE] = Handover(exc, call)
            return self._flask(environ, start_response)
        self.served += 1
        out_headers, relay = relay_of(self.app, resp, watch, call, release)
        if not _plain(method, resp.status, out_headers):
            # werkzeug adjusts these (no body for HEAD, no Content-Length on a 204, IRIs in
            # Location): let its Response, itself a WSGI app, answer as Flask's would.
            response = RelayResponse(
                relay, status=resp.status, headers=out_headers, direct_passthrough=True
            )
            return response(environ, start_response)
        start_response(status_line(resp.status), out_headers)
        return relay

    def _post_length(self, environ: WSGIEnvironment) -> int | None:
        """The body length of a POST the lane may take; None when Flask must have it."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return None
        if length <= 0 or (self.max_body is not None and length > self.max_body):
            return None  # Flask answers 400 / 413 in the contract's shape
        return length

    def _read_json(self, environ: WSGIEnvironment, length: int, call: Call) -> bytes | None:
        """Read a POST's body and note its model on ``call``; None: Flask must answer.

        Flask reads the body again (the same bytes, or the same read error) whenever the
        lane hands the request over, so its answer is the one it would give anyway.
        """
        try:
            body: bytes = environ["wsgi.input"].read(length)
        except BODY_ERRORS as exc:
            environ["wsgi.input"] = _Failed(exc)
            return None
        environ["wsgi.input"] = io.BytesIO(body)
        if len(body) < length:
            return None
        try:
            payload = parse_json(body)
        except (ValueError, RecursionError):
            return None
        try:
            model = model_of(payload)
        except AmbiguousModel:
            return None  # Flask answers the 400
        if model is None:
            return None
        call.model, call.payload = model, payload
        return body

    def _flask(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self.wsgi_app(environ, start_response)
        finally:
            self.warm = True


# Headers werkzeug's Response rewrites (IRIs to URIs), lower case.
_REWRITTEN = frozenset({"location", "content-location"})


def _plain(method: str, status: int, headers: list[tuple[str, str]]) -> bool:
    """A response werkzeug would pass on untouched (Response.get_wsgi_headers, get_app_iter)."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return False
    for name, _ in headers:
        if name.lower() in _REWRITTEN:
            return False
    return True


class _Failed(io.RawIOBase):
    """A request body whose reading failed in the lane: Flask's read fails the same way."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def readable(self) -> bool:
        return True

    def read(self, *_: Any) -> NoReturn:
        raise self.error

    def readinto(self, *_: Any) -> NoReturn:
        raise self.error
