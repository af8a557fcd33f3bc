"""Answer a client already known to be over a limit before Flask sees its request.

Once a client has spent a limit, a moving window frees nothing before its reset
time, whatever the other gates sharing the storage do (they can only add
entries), and a spent token budget frees no earlier than computed (spends only
add). Until then every request of that client for that endpoint class gets the
same 429. Flask-Limiter decides the first rejection; this WSGI middleware
repeats it, at a fraction of a Flask request's cost, which is what lets one
worker shrug off a flood (bench/limiter_flood.py) and keeps the flood's
rejections from counting against the client's other windows.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
from gevent.hub import Waiter

from endpoints import EndpointClass
from errors import RateLimited, TooManyFailedKeys, error_body, is_openai_path

from .guard import AuthGuard
from .headers import Quota, limit_headers, seconds_until
from .identity import client_address
from .keys import Keyring

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# Blocks kept at most; past this, expired ones are dropped when a new one comes in.
MAX_BLOCKS = 10_000
# Rejections answered per turn of the gevent loop (see Turnstile).
PER_TURN = 4
TURN_WAIT = 1e-6  # seconds: any delay, the timer only has to fire in the next turn


@dataclass
class Block:
    """A client's class is over a limit until ``until`` (epoch seconds)."""

    until: float
    message: str  # the 429's message without its "; retry in Ns" tail
    quotas: tuple[Quota, ...]
    error: type[RateLimited] = RateLimited  # its type and code: request rate or token budget
    # Rendered answers by (OpenAI shape?, the whole seconds each quota has left): they
    # change about once a second, so a flood is answered from here.
    rendered: dict[tuple[bool, tuple[int, ...]], tuple[list[tuple[str, str]], bytes]] = field(
        default_factory=dict
    )


def limit_key(keyring: Keyring | None, environ: Mapping[str, Any]) -> str | None:
    """The limiter's key for a request ("key:NAME" or "ip:ADDR"); None for a key it lacks."""
    if keyring is None:
        return "ip:" + client_address(environ.get("REMOTE_ADDR"))
    _, key = keyring.presented(environ)
    return None if key is None else "key:" + key.name


class Turnstile:
    """Lets at most ``per_turn`` greenlets through per turn of the gevent loop, in arrival order.

    A flood's connections always have their next request ready, so a connection
    never blocks and, unchecked, one of them keeps the worker until its client
    pauses; with a plain yield, every flooding connection is answered in each turn
    of the loop and a stream being relayed waits behind all of them. Letting a few
    through per turn keeps that wait short whatever the number of connections
    (bench/limiter_flood.py measures it); the others wait in line, asleep.
    """

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self.turn = -1
        self.used = 0
        self.waiting: deque[Waiter[None]] = deque()
        self.timer: Any = None

    def enter(self) -> None:
        loop = gevent.get_hub().loop
        turn = getattr(loop, "iteration", None)
        if turn is None:  # a loop that does not count its turns (libuv): just yield
            gevent.sleep(0)
            return
        if turn != self.turn:
            self.turn, self.used = turn, 0
        if not self.waiting and self.used < self.per_turn:
            self.used += 1
            return
        waiter: Waiter[None] = Waiter()
        self.waiting.append(waiter)
        self._arm(loop)
        waiter.get()

    def _arm(self, loop: Any) -> None:
        if self.timer is None:
            # A timer, unlike a callback, fires in a later turn, after the loop polled I/O.
            self.timer = loop.timer(TURN_WAIT, ref=False)
        if not self.timer.active:
            self.timer.start(self._next_turn)

    def _next_turn(self) -> None:
        # In the hub: each switch runs a waiting greenlet until it blocks again.
        loop = gevent.get_hub().loop
        self.turn, self.used = loop.iteration, 0
        while self.waiting and self.used < self.per_turn:
            self.used += 1
            self.waiting.popleft().switch(None)
        if self.waiting:
            self._arm(loop)


class RejectCache:
    """WSGI middleware that answers blocked clients; the limiter extension adds the blocks.

    ``routes`` maps (path, method) of the forwarded endpoints whose rule has no
    variable part to their class; other requests always go to Flask.
    """

    def __init__(
        self,
        app: WSGIApplication,
        keyring: Keyring | None,
        rejections: Counter[str],
        guard: AuthGuard | None = None,
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.guard = guard  # addresses shut out for presenting wrong keys (limiter.guard)
        self.routes: dict[tuple[str, str], EndpointClass] = {}
        self.blocks: dict[tuple[str, EndpointClass], Block] = {}
        self.rejections = rejections  # per class, shared with the extension's own 429s
        self.turnstile = Turnstile(PER_TURN)

    def block(
        self,
        key: str,
        cls: EndpointClass,
        until: float,
        message: str,
        quotas: Iterable[Quota],
        error: type[RateLimited] = RateLimited,
    ) -> None:
        if len(self.blocks) >= MAX_BLOCKS:
            now = time.time()
            self.blocks = {k: b for k, b in self.blocks.items() if b.until > now}
        self.blocks[(key, cls)] = Block(until, message, tuple(quotas), error)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.guard is not None:
            # First, before anything compares a key: an address shut out by the guard.
            keyed = bool(environ.get("HTTP_AUTHORIZATION") or environ.get("HTTP_X_API_KEY"))
            if keyed or not _own_page(environ.get("PATH_INFO", "")):
                address = client_address(environ.get("REMOTE_ADDR"))
                until = self.guard.blocked_until(address, ask_storage=keyed)
                if until is not None:
                    self.guard.refused += 1
                    return self._shut_out(environ, start_response, until)
        if self.blocks:
            cls = self.routes.get((environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")))
            key = limit_key(self.keyring, environ) if cls is not None else None
            if key is not None and cls is not None and (key, cls) in self.blocks:
                block = self.blocks[(key, cls)]
                now = time.time()
                if now < block.until:
                    self.rejections[cls] += 1
                    return self._reject(environ, start_response, block, now)
                del self.blocks[(key, cls)]
        return self.app(environ, start_response)

    def _shut_out(
        self, environ: WSGIEnvironment, start_response: StartResponse, until: float
    ) -> Iterable[bytes]:
        """The guard's 429: no key was looked at."""
        self.turnstile.enter()
        wait = max(1, seconds_until(until, time.time()))
        body = error_body(
            TooManyFailedKeys.status,
            f"too many failed API keys from this address; retry in {wait}s",
            environ.get("PATH_INFO", ""),
            openai_type=TooManyFailedKeys.openai_type,
            code=TooManyFailedKeys.code,
        )
        start_response(
            "429 TOO MANY REQUESTS",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Retry-After", str(wait)),
            ],
        )
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def _reject(
        self, environ: WSGIEnvironment, start_response: StartResponse, block: Block, now: float
    ) -> Iterable[bytes]:
        self.turnstile.enter()
        path = environ.get("PATH_INFO", "")
        stamp = (is_openai_path(path), tuple(seconds_until(q.reset, now) for q in block.quotas))
        rendered = block.rendered.get(stamp)
        if rendered is None:
            if len(block.rendered) > 8:
                block.rendered.clear()
            headers = limit_headers(block.quotas, now, rejected=True)
            body = error_body(
                block.error.status,
                f"{block.message}; retry in {headers['Retry-After']}s",
                path,
                openai_type=block.error.openai_type,
                code=block.error.code,
            )
            out = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            out.extend(headers.items())
            rendered = block.rendered[stamp] = (out, body)
        out, body = rendered
        start_response("429 TOO MANY REQUESTS", list(out))
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def _own_page(path: str) -> bool:
    """The gate's own pages (/gate/*, /metrics): a shut-out address may see them without a key."""
    return path.startswith("/gate/") or path == "/metrics"


def static_routes(
    rules: Iterable[Any], classes: Mapping[str, EndpointClass]
) -> dict[tuple[str, str], EndpointClass]:
    """(path, method) → class, for the ``rules`` of ``classes``' endpoints without variables."""
    routes = {}
    for rule in rules:
        cls = classes.get(rule.endpoint)
        if cls is None or rule.arguments:
            continue
        for method in rule.methods or ():
            if method != "OPTIONS":
                routes[(rule.rule, method)] = cls
    return routes
