"""The upstream's health and loaded models, asked for by one greenlet and cached.

Page views and scrapes only read the cache. ``/gate/healthz`` refreshes it when
it is older than ``max_age`` (one probe at a time; callers that arrive during a
probe wait for its answer), so a load balancer calling every second costs the
upstream at most one ``GET /api/version`` a second.

In the gate the probes travel the way forwarded requests do: through the
proxy's own connection pool (``upstream``). So healthz fails whenever the gate
cannot forward, not only when the upstream is down: when every pooled
connection is in use it answers 503 at once, without asking the upstream.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import gevent
import gevent.event

from errors import GateError

logger = logging.getLogger(__name__)

#: Connect and read timeout of one probe: health checks must answer quickly.
TIMEOUT = 2.0
#: Seconds between two /api/ps polls while the upstream answers, and while it does not.
PS_INTERVAL = 5.0
PS_INTERVAL_DOWN = 2.0
#: /gate/healthz probes again once the cached answer is older than this.
MAX_AGE = 1.0


# The gate's own probes name themselves, so Ollama's logs (and the test fake) can
# tell them from client traffic.
PROBE_HEADERS = {"Accept": "application/json", "User-Agent": "ollama-gate-probe"}


class PoolView(Protocol):
    """How many pooled connections to the upstream are lent out (proxy.transport.WatchedPool)."""

    @property
    def size(self) -> int: ...

    @property
    def in_use(self) -> int: ...

    @property
    def free(self) -> int: ...


@runtime_checkable
class PooledUpstream(Protocol):
    """The proxy's pool to one Ollama server (proxy.upstream.Upstream), as the probe uses it."""

    url: str

    @property
    def pool(self) -> PoolView: ...

    def open(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | Iterable[bytes] | None,
    ) -> Any: ...


class ProbeFailed(Exception):
    """The upstream did not answer a probe with 200."""


class UpstreamProbe:
    """Cached answers of one Ollama server to GET /api/version and GET /api/ps."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = TIMEOUT,
        ps_interval: float = PS_INTERVAL,
        ps_interval_down: float = PS_INTERVAL_DOWN,
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
        upstream: PooledUpstream | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        # The proxy's pool to ``url``; None: each probe opens a connection of its own.
        self.upstream = upstream
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.ps_interval = ps_interval
        self.ps_interval_down = ps_interval_down
        self.max_age = max_age
        self._clock = clock
        self.healthy: bool | None = None  # None: not asked yet
        self.checked: float | None = None  # monotonic time of the last answer (or failure)
        self.checked_wall: float | None = None
        self.latency: float | None = None
        self.error: str | None = None
        self.version: str | None = None
        self.loaded: list[dict[str, Any]] = []
        self.loaded_checked_wall: float | None = None
        self.probes = 0
        self.used = clock()  # when a status endpoint was last asked for
        self._inflight: gevent.event.AsyncResult | None = None
        self._exhausted = False  # the last check found no free pooled connection

    # Asking

    def get(self, path: str) -> Any:
        """GET ``path`` from the upstream; its JSON, or ProbeFailed.

        Through the proxy's pool when there is one (a pooled keep-alive socket the
        upstream closed long ago is noticed by the pool and replaced, never read as
        "down"), else on a fresh connection.
        """
        if self.upstream is not None:
            return self._parse(path, *self._get_pooled(path))
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            # gevent.Timeout bounds the whole exchange, not just each socket operation.
            with gevent.Timeout(self.timeout * 2, ProbeFailed("no answer in time")):
                conn.request("GET", self._prefix + path, headers=PROBE_HEADERS)
                resp = conn.getresponse()
                body = resp.read(1 << 20)
        except ProbeFailed:
            raise
        except TimeoutError:
            raise ProbeFailed("no answer in time") from None
        except ConnectionRefusedError:
            raise ProbeFailed("connection refused") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ProbeFailed(f"{type(exc).__name__}: {exc}"[:200]) from None
        finally:
            conn.close()
        return self._parse(path, resp.status, body)

    def _get_pooled(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` through the proxy's pool, as a forwarded request would go."""
        upstream = self.upstream
        assert upstream is not None
        pool = upstream.pool
        if pool.free <= 0:
            raise ProbeFailed(
                f"no free connection to the upstream ({pool.in_use} of {pool.size} in use)"
            )
        # gevent.Timeout bounds the whole exchange; the pool takes back a connection
        # the timeout interrupts.
        with gevent.Timeout(self.timeout * 2, ProbeFailed("no answer in time")):
            try:
                resp = upstream.open("GET", path, PROBE_HEADERS, None)
            except GateError as exc:  # the proxy's own 502/504 message, naming the URL
                raise ProbeFailed(exc.message) from None
            try:
                body = b""
                for block in resp.records(None):
                    body += block
                    if len(body) > 1 << 20:
                        break
            except OSError as exc:
                raise ProbeFailed(f"{type(exc).__name__}: {exc}"[:200]) from None
            finally:
                resp.release()
        return resp.status, body

    def _parse(self, path: str, status: int, body: bytes) -> Any:
        if status != 200:
            raise ProbeFailed(f"GET {path} answered {status}")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise ProbeFailed(f"GET {path} answered with no JSON") from None

    def probe(self, path: str = "/api/version") -> bool:
        """Ask the upstream now and record the answer; True when it answered."""
        self.probes += 1
        started = self._clock()
        try:
            data = self.get(path)
        except ProbeFailed as exc:
            if self.healthy is not False:
                logger.warning("upstream %s does not answer: %s", self.url, exc)
            self._record(False, started, str(exc))
            return False
        if self.healthy is False:
            logger.info("upstream %s answers again", self.url)
        self._record(True, started, None)
        if isinstance(data, dict):
            if path.endswith("/version") and isinstance(data.get("version"), str):
                self.version = data["version"]
            if path.endswith("/ps"):
                self.loaded = [_loaded(m) for m in data.get("models") or () if isinstance(m, dict)]
                self.loaded_checked_wall = time.time()
        return True

    def _record(self, healthy: bool, started: float, error: str | None) -> None:
        now = self._clock()
        self.healthy = healthy
        self.checked = now
        self.checked_wall = time.time()
        self.latency = now - started if healthy else None
        self.error = error

    def fresh(self) -> bool:
        """Whether the cached answer is younger than ``max_age``."""
        return self.checked is not None and self._clock() - self.checked <= self.max_age

    def connections(self) -> dict[str, int] | None:
        """The proxy pool's connections in use and its size (None without a pool)."""
        if self.upstream is None:
            return None
        return {"in_use": self.upstream.pool.in_use, "size": self.upstream.pool.size}

    def check(self) -> bool:
        """Health for /gate/healthz: the cached answer if fresh, else one new probe at a time.

        A pool with no free connection fails at once, whatever the cache says.
        """
        pool = self.upstream.pool if self.upstream is not None else None
        if pool is not None and pool.free <= 0:
            error = f"no free connection to the upstream ({pool.in_use} of {pool.size} in use)"
            if not self._exhausted:
                logger.warning("upstream %s cannot be forwarded to: %s", self.url, error)
            self._exhausted = True
            self._record(False, self._clock(), error)
            return False
        if self.fresh() and not self._exhausted:
            return bool(self.healthy)
        inflight = self._inflight
        if inflight is not None:
            with contextlib.suppress(gevent.Timeout):
                return bool(inflight.get(timeout=self.timeout * 2 + 1))
            return False
        result = self._inflight = gevent.event.AsyncResult()
        self._exhausted = False
        try:
            healthy = self.probe("/api/version")
        finally:
            self._inflight = None
            result.set(bool(self.healthy))
        return healthy

    def touch(self) -> None:
        """Someone looked at the status: the poller keeps going."""
        self.used = self._clock()

    def run(self, idle: float = float("inf")) -> None:
        """Poll /api/ps until nobody has looked for ``idle`` seconds (the one poller greenlet)."""
        while self._clock() - self.used < idle:
            try:
                if self.version is None:
                    self.probe("/api/version")
                self.probe("/api/ps")
            except Exception:  # a bug here must not stop the polling
                logger.exception("upstream probe failed")
            gevent.sleep(self.ps_interval if self.healthy else self.ps_interval_down)
        logger.debug("upstream poller stops: no status request for %.0f s", idle)

    def state(self) -> dict[str, Any]:
        """The cached answers, as status.json's ``upstream`` object."""
        age = None if self.checked is None else self._clock() - self.checked
        return {
            "url": self.url,
            "healthy": self.healthy,
            "checked": None if self.checked_wall is None else round(self.checked_wall, 3),
            "age": None if age is None else round(age, 3),
            "latency": None if self.latency is None else round(self.latency, 4),
            "error": self.error,
            "version": self.version,
            "loaded": list(self.loaded),
            "loaded_checked": (
                None if self.loaded_checked_wall is None else round(self.loaded_checked_wall, 3)
            ),
        }


def _loaded(model: dict[str, Any]) -> dict[str, Any]:
    """The fields of one /api/ps entry the page shows."""
    name = model.get("model") or model.get("name") or ""
    return {
        "name": str(name),
        "size": model.get("size"),
        "size_vram": model.get("size_vram"),
        "expires_at": model.get("expires_at"),
        "context_length": model.get("context_length"),
    }
