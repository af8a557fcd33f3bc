"""The status extension: the Board fed by signals, the upstream probe and the once-a-second sampler.

Nothing starts at import or in ``init_app``: gunicorn's master builds no app
(preload_app is off). A worker starts the sampler greenlet on its first request
(it only reads the work queue), and the /api/ps poller on the first request for
one of the status endpoints, so an upstream sees no probe from a gate nobody
watches; the poller stops again after POLL_IDLE seconds without such a request.
Outside a gevent worker (the Flask test client, ``flask run``) nothing runs in
the background: the history stays empty and /gate/healthz probes on demand.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any

import gevent
import gevent.monkey
from flask import Flask, current_app, g, has_request_context, request, request_started

from endpoints import ROUTES
from pipeline import LimiterView, QueueView, pipeline_of
from proxy import LightLane
from settings import Settings
from signals import call_finished, call_rejected
from workqueue.core import QueueSnapshot

from . import accesslog
from .board import Board, names_a_model, reason_of
from .metrics import Metrics
from .probe import PooledUpstream, UpstreamProbe

logger = logging.getLogger(__name__)

RATE_LIMITED = "rate_limit_exceeded"
GUARDED = "too_many_failed_keys"
#: The /api/ps poller stops after this many seconds without a status request.
POLL_IDLE = 900.0

#: The endpoint class of each proxy rule, for rejections that come before a Call exists.
_RULE_CLASSES = {rule: cls for rule, _methods, cls, _model in ROUTES}
_RULE_CLASSES["/<path:path>"] = "light"
#: Jobs that run per model (admin jobs take their own lane, keyed by no model).
MODEL_CLASSES = frozenset({"inference", "embed"})


class Status:
    """The status page's state for one app (the ``status`` of its Pipeline)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.board = Board(time.time(), time.monotonic(), mask_clients=settings.status_mask_clients)
        self.metrics = Metrics()
        self.access = (
            None if settings.access_log == "off" else accesslog.install(settings.access_log)
        )
        self.probe = UpstreamProbe(settings.backends()[0].url)
        self.started_wall = time.time()
        self.pid = os.getpid()
        self._sampler: gevent.Greenlet | None = None
        self._poller: gevent.Greenlet | None = None
        # The limiter's 429s per class: through call_rejected, and in the limiter's own
        # counts at the last reconcile() (see there).
        self._limited: dict[str, int] = {}
        self._limited_seen: dict[str, int] = {}
        self._limiter_seen: dict[str, int] = {}
        self._guard_seen = 0

    # Background work

    def ensure_started(self) -> None:
        """Start the sampler once, in a gevent worker only (before_request of every request)."""
        if self._sampler is not None or not gevent.monkey.is_module_patched("socket"):
            return
        self.pid = os.getpid()
        # A weak reference: the extension never keeps the app (Flask's extension guide).
        app = weakref.ref(current_app._get_current_object())  # type: ignore[attr-defined]
        self._sampler = gevent.spawn(self._sample_forever, app)
        logger.debug("status: sampler started in worker %s", self.pid)

    def watched(self) -> None:
        """A status endpoint was asked for: keep the /api/ps poller running (start it if needed)."""
        self.probe.touch()
        if self._poller is not None and not self._poller.dead:
            return
        if not gevent.monkey.is_module_patched("socket"):
            return
        self._poller = gevent.spawn(self.probe.run, POLL_IDLE)
        logger.debug("status: upstream poller started in worker %s", self.pid)

    def _sample_forever(self, app_ref: weakref.ref[Flask]) -> None:
        """Sample the work queue once a second into the Board's history."""
        next_at = time.monotonic()
        while True:
            app = app_ref()
            if app is None:
                return
            try:
                gate = pipeline_of(app)
                self.reconcile(gate.limiter)
                self.board.sample(time.time(), _snapshot(gate.queue))
            except Exception:  # a bug here must not stop the history
                logger.exception("status: sampling failed")
            del app
            next_at += 1.0
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a blocked loop): skip the missed samples
                next_at = time.monotonic() + 1.0
                delay = 1.0
            gevent.sleep(delay)

    # The limiter's fast path

    def rejected(self, status: int, reason: str, cls: str | None) -> None:
        """Count a refusal that came through call_rejected."""
        self.board.rejected(time.monotonic(), status, reason)
        self.metrics.call_rejected(status, reason, cls)
        if status == 429 and reason == RATE_LIMITED and cls:
            self._limited[cls] = self._limited.get(cls, 0) + 1

    def reconcile(self, limiter: LimiterView | None) -> None:
        """Count the 429s the limiter answered before Flask saw the request.

        Once a client is over a limit, the limiter's WSGI fast path (limiter.fastpath)
        repeats the 429 without Flask, so no call_rejected is sent for it; the
        limiter counts every 429 per class in ``stats()["rejected"]``. What it
        counted beyond the 429s that came through the signal came through the fast
        path. Runs once a second (sampler) and before each status.json and scrape.
        """
        if limiter is None:
            return
        try:
            stats = limiter.stats()
            counts = stats["rejected"]
        except Exception:
            logger.exception("status: the limiter's stats failed")
            return
        now = time.monotonic()
        for cls, total in counts.items():
            signalled = self._limited.get(cls, 0)
            fast = (total - self._limiter_seen.get(cls, 0)) - (
                signalled - self._limited_seen.get(cls, 0)
            )
            if fast > 0:
                self.board.rejected(now, 429, RATE_LIMITED, fast)
                self.metrics.call_rejected(429, RATE_LIMITED, cls, fast)
                if self.access is not None:
                    self.access.fast_path(cls, fast)
            self._limiter_seen[cls] = total
            self._limited_seen[cls] = signalled
        # The failed-key guard's 429s are all answered before Flask (limiter.guard).
        guard = stats.get("auth_guard") or {}
        refused = int(guard.get("refused", 0))
        if refused > self._guard_seen:
            self.board.rejected(now, 429, GUARDED, refused - self._guard_seen)
            self.metrics.call_rejected(429, GUARDED, None, refused - self._guard_seen)
            self._guard_seen = refused

    # Documents

    def snapshot(self) -> QueueSnapshot | None:
        return _snapshot(pipeline_of(current_app).queue)

    def limiter(self) -> dict[str, Any] | None:
        """The limiter's own view (storage, fallback), after counting its fast-path 429s."""
        limiter = pipeline_of(current_app).limiter
        self.reconcile(limiter)
        if limiter is None:
            return None
        try:
            stats = limiter.stats()
        except Exception:
            return None
        return {
            "storage": stats.get("storage"),
            "storage_fallback": stats.get("storage_fallback"),
            "auth_guard": stats.get("auth_guard"),
        }

    def worker(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "workers": self.settings.workers,
            "started": round(self.started_wall, 3),
            "uptime": round(time.time() - self.started_wall, 1),
            "access": self.settings.status_access,
            "clients_masked": self.settings.status_mask_clients,
            "sampling": self._sampler is not None,
            "polling": self._poller is not None and not self._poller.dead,
            "lane_served": self.lane_served(),
        }

    def lane_served(self) -> int:
        """Requests this worker's light lane forwarded without Flask (proxy/lane.py)."""
        middleware = pipeline_of(current_app).middleware
        return sum(m.served for m in middleware if isinstance(m, LightLane))

    def document(self, *, history: bool = True) -> dict[str, Any]:
        limiter = self.limiter()
        snapshot = self.snapshot()
        upstream = self.probe.state()
        doc = self.board.document(
            time.monotonic(),
            time.time(),
            snapshot=snapshot,
            upstream=upstream,
            worker=self.worker(),
            history=history,
        )
        backends = snapshot.get("backends") if snapshot is not None else None
        doc["backends"] = backends or [self.only_backend(upstream, snapshot)]
        doc["limiter"] = limiter
        doc["caps"] = self.caps()
        return doc

    def only_backend(
        self, upstream: dict[str, Any], snapshot: QueueSnapshot | None
    ) -> dict[str, Any]:
        """status.json's ``backends`` for a fleet of one, from the upstream probe."""
        healthy = upstream.get("healthy")
        return {
            "name": self.settings.backends()[0].name,
            "url": upstream.get("url"),
            "health": "unknown" if healthy is None else "up" if healthy else "down",
            "probe_age": upstream.get("age"),
            "last_error": upstream.get("error"),
            "version": upstream.get("version"),
            "loaded": {
                str(item.get("name")): {
                    "size_vram": item.get("size_vram"),
                    "expires_at": item.get("expires_at"),
                }
                for item in upstream.get("loaded") or ()
            },
            "max_models": self.settings.max_active_models,
            "models": {
                name: {"running": row["running"], "slots": row["slots"]}
                for name, row in (snapshot["models"] if snapshot is not None else {}).items()
                if row["running"]
            },
        }

    def caps(self) -> dict[str, Any]:
        """The configured bounds, shown beside the live figures."""
        s = self.settings
        return {
            "model_concurrency": s.model_concurrency,
            "model_concurrency_overrides": dict(s.model_concurrency_overrides),
            "max_active_models": s.max_active_models,
            "queue_max": s.queue_max,
            "queue_max_per_client": s.queue_max_per_client,
            "queue_timeout": s.queue_timeout,
            "switch_after": s.switch_after,
            "admin_concurrency": s.admin_concurrency,
        }


def status_of(app: Flask) -> Status | None:
    """The Status of ``app``'s Pipeline, if the status page is installed."""
    found = pipeline_of(app).status
    return found if isinstance(found, Status) else None


def _snapshot(workqueue: QueueView | None) -> QueueSnapshot | None:
    if workqueue is None:
        return None
    try:
        return workqueue.snapshot()
    except Exception:
        logger.exception("status: the work queue's snapshot failed")
        return None


def _on_finished(sender: Flask, call: Any = None, **_: Any) -> None:
    ext = status_of(sender)
    if ext is None or call is None:
        return
    now = time.monotonic()
    ext.board.finished(
        now,
        model=call.model,
        client=call.client,
        queued=call.cls in MODEL_CLASSES,
        waited=call.waited,
        prompt_tokens=call.prompt_tokens,
        completion_tokens=call.completion_tokens,
        ok=names_a_model(call.status),
    )
    ext.metrics.call_finished(call, now)
    if ext.access is not None:
        ext.access.call_finished(call)


def _on_rejected(
    sender: Flask,
    error: Any = None,
    call: Any = None,
    cls: str | None = None,
    **_: Any,
) -> None:
    ext = status_of(sender)
    if ext is None or error is None:
        return
    status, reason = reason_of(error)
    if ext.access is not None and has_request_context():
        started = g.get("gate_access_started")
        if call is not None and (started is None or call.started < started):
            started = call.started  # a call the light lane began before Flask saw it
        ext.access.refused(
            status=status,
            reason=reason,
            method=request.method,
            path=request.path,
            client=_refused_client(call),
            call=call,
            duration=time.monotonic() - started if started is not None else None,
        )
    if has_request_context() and request.blueprint == "status":
        return  # the gate's own endpoints (a 401 for a scraper without a key): not API traffic
    ext.rejected(status, reason, cls or _class_of(call))


def _refused_client(call: Any) -> str:
    """Who a refused request came from: its Call's client, the key's name, or the address."""
    if call is not None:
        return accesslog.who(call.client, call.address)
    key = g.get("gate_key")
    if key is not None:
        return str(key.name)
    return request.remote_addr or "-"


def _note_start(sender: Flask, **_: Any) -> None:
    """request_started: before every before_request hook, so refusals by those have a duration."""
    g.gate_access_started = time.monotonic()


def _class_of(call: Any) -> str | None:
    """The endpoint class of a refused request: its Call's, the limiter's, or its route's."""
    if call is not None:
        return str(call.cls)
    if not has_request_context():
        return None
    cls = g.get("gate_class")
    if cls:
        return str(cls)
    rule = request.url_rule
    return _RULE_CLASSES.get(rule.rule) if rule is not None else None


def init_app(app: Flask, settings: Settings) -> Status:
    """Subscribe a new Status to the call signals of ``app``; create_app keeps it in the
    app's Pipeline."""
    ext = Status(settings)
    upstream = pipeline_of(app).upstream
    if isinstance(upstream, PooledUpstream):
        # One backend: probes go through the proxy's pool, as forwarded requests do
        # (probe.py). A fleet's backends are probed by their pollers (fleet/runtime.py).
        ext.probe.upstream = upstream
    call_finished.connect(_on_finished, sender=app)
    call_rejected.connect(_on_rejected, sender=app)
    app.before_request(ext.ensure_started)
    if ext.access is not None:
        request_started.connect(_note_start, sender=app)
    return ext
