"""The shared request preamble: one :class:`Exchange` per request, built by :func:`middleware`.

The middleware reads and parses the body once, records the request, checks
the Host header, applies the injected failures (stall, fail_status,
die_after) and turns a :class:`Reply` raised anywhere in a handler into its
response, so the API modules (:mod:`.native`, :mod:`.openai_compat`,
:mod:`.anthropic_compat`) only say what each endpoint answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from .catalog import Model, model_field, normalize_model
from .scheduler import Ticket
from .state import SimState
from .wire import dumps, duration, host_allowed

# Ollama's text when the runner process dies under a request (for example the
# OOM killer taking it because two models did not fit).
CRASH_ERROR = "llama runner process has terminated: exit status 2"
# Ollama's text when more than OLLAMA_MAX_QUEUE requests wait (503).
BUSY_ERROR = "server busy, please try again.  maximum pending requests exceeded"
FAKE_FAILURE = "fake failure"

POLL = 0.02  # seconds between checks for a closed client connection
GONE = 499  # internal status of a response that was never sent (client gone, or died)

# Endpoints that load a model and go through the scheduler.
SCHEDULED_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/embeddings",
    }
)
# Endpoints that the global failure settings (stall, die_after, fail_status)
# apply to: the model endpoints. Light endpoints (/, version, tags, ps, show,
# /v1/models) only fail when a request asks for it with an X-Fake-* header, so
# a health check keeps working while every model request is made to fail.
MODEL_PATHS = SCHEDULED_PATHS | {
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
}

# Ollama's openai.NewError and anthropic.NewError: the error type for a status.
_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

Items = Iterable[tuple[float, bytes | Callable[[], bytes]]]
Handler = Callable[["Exchange"], Awaitable[web.StreamResponse]]


class BadHeader(ValueError):
    """An X-Fake-* header that is not a non-negative number."""


class Reply(Exception):
    """Carries a ready (error) response out of a handler; the middleware sends it."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


def is_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def gone_response() -> web.Response:
    """What a handler returns when the connection is gone: aiohttp cannot send it."""
    return web.Response(status=GONE)


class Exchange:
    """One request to the simulator, and the helpers every endpoint answers with."""

    __slots__ = ("sim", "request", "gen", "t0", "json", "json_error", "rec", "gone")

    def __init__(self, sim: SimState, request: web.Request) -> None:
        self.sim = sim
        self.request = request
        self.gen = sim.sched.gen
        self.t0 = time.monotonic_ns()
        self.json: Any = None
        self.json_error: str | None = None
        self.rec: dict[str, Any] | None = None
        self.gone = False

    @property
    def cfg(self) -> dict[str, Any]:
        return self.sim.cfg

    @property
    def path(self) -> str:
        return self.request.path

    # -- the body

    def body(self) -> dict[str, Any]:
        """The JSON object body; a 400 (raised as :class:`Reply`) when there is none."""
        body = self.json
        if isinstance(body, dict):
            return body
        if self.json_error is not None:
            message = f"invalid JSON: {self.json_error}"
        elif body is None:
            message = "missing request body"
        else:
            message = "request body must be a JSON object"
        raise Reply(self.error(400, message))

    def model_name(self, body: dict[str, Any]) -> str:
        """The model the body names, as given; a 400 when there is none."""
        raw = model_field(body)
        if raw is None:
            raise Reply(self.error(400, "model is required"))
        return raw

    def installed(
        self, body: dict[str, Any], not_found: str = "model '{}' not found"
    ) -> tuple[str, Model]:
        """The model the body names (as given) and its catalog entry; 400 or 404 raised, the
        404 with Ollama's text ``not_found`` for the endpoint."""
        raw = self.model_name(body)
        model = self.sim.catalog.get(normalize_model(raw))
        if model is None:
            raise Reply(self.error(404, not_found.format(raw)))
        return raw, model

    # -- per-request knobs (X-Fake-* headers over the settings)

    def header_num(self, name: str, integer: bool) -> Any:
        raw = self.request.headers.get(name)
        if raw is None:
            return None
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            raise BadHeader(f"invalid {name} header: {raw!r}") from None
        if value < 0:
            raise BadHeader(f"invalid {name} header: {raw!r}")
        return value

    def interval(self) -> float:
        value = self.header_num("X-Fake-Token-Interval", False)
        return float(self.cfg["token_interval"] if value is None else value)

    def load_time(self) -> float:
        value = self.header_num("X-Fake-Load-Time", False)
        return float(self.cfg["load_time"] if value is None else value)

    def die_after(self) -> int | None:
        value = self.header_num("X-Fake-Die-After", True)
        if value is None and self.path in MODEL_PATHS:
            value = self.cfg["die_after"]
        return None if value is None else int(value)

    def token_count(self, exact: Any = None, cap: Any = None) -> int:
        """Tokens to generate: X-Fake-Tokens, else ``exact`` (num_predict), else
        ``tokens`` capped by ``cap`` (max_tokens)."""
        value = self.header_num("X-Fake-Tokens", True)
        if value is not None:
            return int(value)
        if isinstance(exact, int) and not isinstance(exact, bool) and exact >= 0:
            return exact
        n = int(self.cfg["tokens"])
        if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
            n = min(n, cap)
        return n

    # -- the client

    def note_disconnect(self) -> None:
        """Count a client that went away before the response was complete (once per request)."""
        if self.sim.stopping or self.gen != self.sim.sched.gen or self.gone:
            return
        self.gone = True
        self.sim.note_disconnect()

    async def sleep_watch(self, seconds: float) -> bool:
        """Sleep, checking the client every POLL; False if it went away."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            if is_gone(self.request):
                return False
            left = end - loop.time()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, POLL))

    async def stays(self, seconds: float) -> bool:
        """``sleep_watch``, noting a client that went away as a disconnect."""
        if await self.sleep_watch(seconds):
            return True
        self.note_disconnect()
        return False

    # -- answers

    def error(self, status: int, message: str) -> web.Response:
        """An error in the dialect's shape, as Ollama's compatibility layers write it:
        Anthropic's under /v1/messages, OpenAI's elsewhere under /v1/, Ollama's otherwise."""
        body: dict[str, Any]
        if self.path == "/v1/messages":
            kind = _ANTHROPIC_TYPES.get(status, "api_error")
            body = {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": f"req_{self.sim.next_id():024x}",
            }
        elif self.path.startswith("/v1/"):
            kind = _OPENAI_TYPES.get(status, "api_error")
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        else:
            body = {"error": message}
        return web.Response(status=status, body=dumps(body), content_type="application/json")

    def abort(self) -> web.Response:
        """Die: drop the TCP connection without finishing the response."""
        self.sim.aborted += 1
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        return gone_response()

    def reply(self, obj: Any, status: int = 200, *, completed: bool = False) -> web.Response:
        """A whole JSON answer; with a die-after in force the connection dies instead."""
        if self.die_after() is not None:
            return self.abort()
        if completed:
            self.sim.completed += 1
        return web.Response(status=status, body=dumps(obj), content_type="application/json")

    async def _flush(self) -> None:
        """Wait (up to 1 s) until what was written has left the process."""
        for _ in range(50):
            transport = self.request.transport
            if transport is None or transport.is_closing():
                return
            if transport.get_write_buffer_size() == 0:
                return
            await asyncio.sleep(POLL)

    async def stream(
        self, items: Items, content_type: str, *, completed: bool = False
    ) -> web.StreamResponse:
        """Stream ``items`` ((delay before it, line or a function making it)) as a chunked body.

        Headers go out with the first line, like Ollama. With a die-after of n,
        n lines are sent and then the connection is dropped mid-body.
        """
        request = self.request
        die = self.die_after()
        resp = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        resp.enable_chunked_encoding()
        sent = 0
        try:
            for delay, payload in items:
                if die is not None and sent >= die:
                    break
                if delay > 0:
                    if not await self.stays(delay):
                        return resp
                elif is_gone(request):
                    self.note_disconnect()
                    return resp
                data = payload() if callable(payload) else payload
                if not resp.prepared:
                    await resp.prepare(request)
                await resp.write(data)
                sent += 1
            if die is not None:
                if not resp.prepared:
                    await resp.prepare(request)
                await self._flush()
                self.abort()
                return resp
            await resp.write_eof()
        except ConnectionResetError:
            self.note_disconnect()
            return resp
        if completed:
            self.sim.completed += 1
        return resp

    # -- the scheduler

    async def scheduled(
        self,
        model: str,
        work: Callable[[Ticket], Awaitable[web.StreamResponse]],
        *,
        keep_alive: Any = None,
    ) -> web.StreamResponse:
        """Run ``work(ticket)`` once the scheduler admits this request for ``model``; the
        request's ``keep_alive`` (Ollama's: seconds or "5m"; 0 unloads after) then applies."""
        sch = self.sim.sched
        gen = sch.gen
        load_time = self.load_time()
        seconds = duration(keep_alive)
        sch.arrive(model)
        ticket: Ticket | None = None
        try:
            ticket = await self._admission(model, load_time)
            if ticket is None:
                return gone_response()
            if ticket.state == "crashed":
                return self.error(500, CRASH_ERROR)
            if ticket.state == "refused":
                return self.error(503, BUSY_ERROR)
            return await work(ticket)
        finally:
            if ticket is not None and ticket.state == "admitted":
                sch.release(ticket, keep_alive=seconds)
            sch.depart(model, gen)

    async def _admission(self, model: str, load_time: float) -> Ticket | None:
        sch = self.sim.sched
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = Ticket(model, load_time, fut, sch.gen)
        if not sch.enqueue(ticket):
            ticket.state = "refused"
            return ticket
        try:
            while not fut.done():
                if is_gone(self.request):
                    self.note_disconnect()
                    return None
                await asyncio.wait((fut,), timeout=POLL)
        except BaseException:
            if ticket.state == "admitted":
                sch.release(ticket)
            raise
        finally:
            if ticket.state == "queued":
                sch.cancel(ticket)
        if fut.cancelled():
            return None
        return ticket


_EXCHANGE = web.RequestKey("exchange", Exchange)


def handler(fn: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler running ``fn`` on the request's :class:`Exchange`."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await fn(request[_EXCHANGE])

    handle.__name__ = fn.__name__
    return handle


def middleware(sim: SimState) -> Any:
    """The preamble every API request goes through (the /_fake/ control endpoints skip it)."""

    @web.middleware
    async def preamble(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_fake/"):
            return await handler(request)
        ex = Exchange(sim, request)
        request[_EXCHANGE] = ex
        raw = b""
        parsed: Any = None
        truncated = False
        if request.can_read_body and not path.startswith("/api/blobs/"):
            try:
                raw = await request.read()
            except ConnectionError:  # the client went away in the middle of its body
                truncated = True
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError as exc:
                    ex.json_error = str(exc)
        ex.json = parsed

        rec: dict[str, Any] | None = None
        if sim.cfg["record_requests"]:
            model = model_field(parsed)
            if model is None and path.startswith("/v1/models/"):
                model = request.match_info.get("model")
            rec = {
                "method": request.method,
                "path": path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "model": normalize_model(model) if model else None,
                "body_bytes": len(raw),
                "json": parsed,
                "time": time.monotonic(),
                "status": None,
            }
            sim.requests.append(rec)
            ex.rec = rec

        if truncated:
            ex.note_disconnect()
            resp: web.StreamResponse = gone_response()
        elif not host_allowed(request.headers.get("Host", "")):
            resp = web.Response(status=403)
        elif request.method == "OPTIONS":
            resp = web.Response(status=204)
        else:
            try:
                resp = await _inject(ex, handler)
            except Reply as exc:
                resp = exc.response
            except BadHeader as exc:
                resp = ex.error(400, str(exc))
            except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
                resp = web.Response(status=404, text="404 page not found")
        if rec is not None:
            rec["status"] = None if resp.status == GONE else resp.status
        return resp

    return preamble


async def _inject(
    ex: Exchange, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The injected failures: stall, then fail_status, then (light endpoints) die-after."""
    path = ex.path
    model_path = path in MODEL_PATHS or path.startswith("/api/blobs/")
    stall = ex.header_num("X-Fake-Stall", False)
    if stall is None and model_path:
        stall = ex.cfg["stall"]
    if stall:
        if not await ex.stays(stall):
            return gone_response()
    status = ex.header_num("X-Fake-Status", True)
    if status is None and model_path:
        status = ex.cfg["fail_status"]
    if status:
        if status < 200 or status in (204, 304):
            return web.Response(status=status)
        return ex.error(status, FAKE_FAILURE)
    if not model_path and ex.header_num("X-Fake-Die-After", True) is not None:
        return ex.abort()  # nothing to stream here: die before answering
    return await handler(ex.request)
