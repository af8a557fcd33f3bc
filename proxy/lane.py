"""The light lane: GET and HEAD of the light endpoints, forwarded without Flask.

Listing models and asking for the version or the loaded models are most of the
requests a busy gate sees, and each costs Flask about as much CPU again as the
forwarding itself (docs/BENCHMARKS.md). When nothing but the proxy has a say in
such a request (no light limit applies to its client and, with API keys on, it
presents a valid key) this WSGI middleware, just in front of Flask, forwards it
with the proxy's own parts: the same header filters, the same upstream pool, the
same Relay, which sends ``call_finished`` so the status page and metrics count it.

Everything else goes to Flask: requests the lane cannot answer exactly as Flask
would (a key to check, a limit to count, a body, a path Flask would redirect) and
an upstream that fails to answer, which the light view then reports in the
contract's shape. The first request of a worker goes to Flask too, so that the
one-time start-up work of its before_request hooks has run.
"""

from __future__ import annotations

import functools
import io
import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn

from flask import Flask
from werkzeug.datastructures import EnvironHeaders
from werkzeug.wrappers import Response

from endpoints import LIGHT, ROUTES, AmbiguousModel, model_of
from errors import GateError
from pipeline import Call, Identify, Upstream

from .disconnect import ClientWatch
from .relay import Relay
from .upstream import Upstream as PooledUpstream
from .upstream import UpstreamResponse
from .views import BODY_ERRORS, LANE_FAILURE, RelayResponse, client_headers, upstream_headers

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
# The light POSTs with a JSON body naming a model (POST /api/show): the lane takes them
# when they come with a Content-Length within GATE_MAX_BODY.
POSTS = frozenset(
    rule
    for rule, methods, cls, needs_model in ROUTES
    if cls == LIGHT and "POST" in methods and needs_model and "<" not in rule
)


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

    ``identify`` is the limiter's word on each light read (pipeline.Identify); without
    it every request goes to Flask.
    """

    def __init__(
        self,
        app: Flask,
        wsgi_app: WSGIApplication,
        *,
        upstream: Upstream,
        identify: Identify | None,
    ) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.upstream = upstream
        self.identify = identify
        # A fleet places POST /api/show by its model inside Flask's request (fleet/runtime.py):
        # the lane takes light POSTs only to the one backend of the proxy's own pool.
        self.posts = isinstance(upstream, PooledUpstream)
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
        length = self._post_length(environ) if method == "POST" else None
        if length is None and not (
            method in READS
            and lane_path(environ.get("PATH_INFO", ""))
            and environ.get("CONTENT_LENGTH") in (None, "", "0")
        ):
            return self._flask(environ, start_response)
        who = self.identify(environ) if self.identify is not None else None
        if who is None:
            return self._flask(environ, start_response)
        client, consumed = who
        call = Call(LIGHT, method, environ["PATH_INFO"], client, address=environ.get("REMOTE_ADDR"))
        body = None
        if length is not None:
            body = self._read_json(environ, length, call)
            if body is None:
                return self._flask(environ, start_response)  # Flask answers what the lane cannot
        headers = upstream_headers(EnvironHeaders(environ), consumed)
        opened = time.monotonic()
        try:
            resp: UpstreamResponse = self.upstream.open(method, environ["RAW_URI"], headers, body)
        except GateError as exc:
            # Nothing was answered yet: the light view reports it, as for any request.
            environ[LANE_FAILURE] = exc
            return self._flask(environ, start_response)
        call.ttfb = time.monotonic() - opened
        call.status = resp.status
        self.served += 1
        relay = Relay(self.app, resp, ClientWatch(environ), call)
        out_headers = client_headers(resp)
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
        """The body length of a light POST the lane may take; None when Flask must have it."""
        if not self.posts or environ.get("PATH_INFO") not in POSTS:
            return None
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return None
        if length <= 0 or (self.max_body is not None and length > self.max_body):
            return None  # Flask answers 400 / 413 in the contract's shape
        return length

    def _read_json(self, environ: WSGIEnvironment, length: int, call: Call) -> bytes | None:
        """Read a light POST's body and note its model on ``call``; None: Flask must answer.

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
            payload = json.loads(body)
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


def _plain(method: str, status: int, headers: list[tuple[str, str]]) -> bool:
    """A response werkzeug would pass on untouched."""
    if method != "GET" or not 200 <= status < 300 or status == 204:
        return False
    return not any(k.lower() in ("location", "content-location") for k, _ in headers)


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
