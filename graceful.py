"""Graceful shutdown of the gate's gunicorn gevent worker (installed by gunicorn.conf.py).

On SIGTERM gunicorn's gevent worker stops accepting and waits, up to
graceful_timeout, until no connection is left. Alone that has two faults for the
gate: the app keeps admitting jobs, and an idle keep-alive connection (a client's,
or nginx's upstream pool) counts as a connection, so the worker waits out
gunicorn's keepalive (75 s) or the whole graceful timeout even when nothing runs.
``install(worker)`` adds what the gate needs:

- at SIGTERM the app's shutdown hooks run (the ``shutdown`` list of its Pipeline):
  the work queue turns away new and waiting jobs with 503;
- running requests, streams included, finish (gunicorn's graceful_timeout bounds them);
- an idle keep-alive connection stays open while requests still run, so a request
  sent on it gets an answer (503 for a job, with ``Connection: close``), and is
  closed as soon as none runs (one that turns idle later gets IDLE_LINGER); the worker
  then exits within about a second.
"""

from __future__ import annotations

import inspect
import logging
import signal
from types import FrameType
from typing import Any

import gevent
from gevent import Timeout
from gunicorn.workers.base import Worker
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

from pipeline import pipeline_of

logger = logging.getLogger(__name__)

# Seconds a connection that turns idle while nothing runs any more (a fresh one accepted
# just before the worker stopped accepting) still gets for its request to arrive.
IDLE_LINGER = 0.5


def install(worker: Any) -> Drain:
    """Make SIGTERM graceful for ``worker`` (a gunicorn GeventWorker, after it loaded the app).

    Running requests are counted through gunicorn's public pre_request/post_request
    hooks (gunicorn.conf.py calls ``Drain.request_started``/``request_finished``). The
    idle keep-alive wait and SIGTERM have no public hook: ``attach`` uses gunicorn's
    internals for them, after ``gunicorn_seams_missing`` checked that they are still
    where the gate expects them; if not, the gate logs why and keeps gunicorn's own
    shutdown (the work queue still closes, idle connections wait out keepalive).
    """
    drain = Drain(worker)
    missing = gunicorn_seams_missing()
    if missing:
        logger.error(
            "graceful shutdown: gunicorn changed (%s); falling back to its own shutdown",
            "; ".join(missing),
        )
        signal.signal(signal.SIGTERM, drain.on_sigterm_plain)
        signal.siginterrupt(signal.SIGTERM, False)
        return drain
    attach(worker, drain)
    return drain


# -- gunicorn's internals, used here and only here --------------------------------------


def attach(worker: Any, drain: Drain) -> None:
    """Route the worker's idle keep-alive waits and its SIGTERM through ``drain``."""
    # AsyncWorker waits for each next request on a keep-alive connection in
    # ``with self.timeout_ctx(): req = next(parser)``: the one idle moment of a connection.
    worker.timeout_ctx = drain.idle_wait
    # gunicorn bound SIGTERM to worker.handle_exit before post_worker_init ran: bind it again.
    signal.signal(signal.SIGTERM, drain.on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


def gunicorn_seams_missing(
    worker: type[Worker] = Worker,
    async_worker: type[AsyncWorker] = AsyncWorker,
    gevent_worker: type[GeventWorker] = GeventWorker,
) -> list[str]:
    """What ``attach`` relies on in gunicorn's workers and no longer finds (empty: all there).

    tests/test_graceful.py runs this against the pinned gunicorn, so an upgrade that
    moves any of it fails there first.
    """
    checks = [
        (
            async_worker.handle,
            "with self.timeout_ctx():\n",
            "AsyncWorker.handle waits for a keep-alive connection's next request "
            "in self.timeout_ctx()",
        ),
        (
            async_worker.handle,
            "req = next(parser)",
            "AsyncWorker.handle reads requests with next(parser)",
        ),
        (
            gevent_worker.timeout_ctx,
            "self.cfg.keepalive",
            "GeventWorker.timeout_ctx times the keep-alive wait",
        ),
        (
            worker.init_signals,
            "signal.signal(signal.SIGTERM, self.handle_exit)",
            "Worker.init_signals binds SIGTERM to handle_exit",
        ),
        (worker.handle_exit, "self.alive = False", "Worker.handle_exit stops the worker's loop"),
        (worker.load_wsgi, "self.wsgi = self.app.wsgi()", "the app is at worker.wsgi"),
        (gevent_worker.run, "while self.alive:", "GeventWorker.run serves while self.alive"),
    ]
    missing = []
    for function, text, what in checks:
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            missing.append(f"cannot read the source of {function.__qualname__}")
            continue
        if text not in source:
            missing.append(f"no longer true: {what}")
    try:
        init = inspect.getsource(worker.init_process)
    except (OSError, TypeError):
        init = ""
    # post_worker_init (and so install) must run after init_signals, or gunicorn's own
    # SIGTERM handler replaces the drain's.
    if not 0 <= init.find("self.init_signals()") < init.find("self.cfg.post_worker_init(self)"):
        missing.append(
            "no longer true: Worker.init_process sets its signals before post_worker_init"
        )
    return missing


class Drain:
    """Counts running requests and idle keep-alive waits of one worker, and drains them."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.running = 0
        self.draining = False
        self._idle: dict[Any, Timeout] = {}

    @property
    def idle(self) -> int:
        """Keep-alive connections waiting for their next request."""
        return len(self._idle)

    def request_started(self) -> None:
        """gunicorn's pre_request hook: a request begins."""
        self.running += 1

    def request_finished(self) -> None:
        """gunicorn's post_request hook: a request ended, its answer written or not."""
        self.running -= 1
        if self.draining and not self.running:
            self._close_idle()

    def idle_wait(self) -> _IdleWait:
        """gunicorn's keepalive timeout, which a drain with nothing running cuts short."""
        return _IdleWait(self)

    def on_sigterm(self, sig: int, frame: FrameType | None) -> None:
        self.worker.handle_exit(sig, frame)  # alive = False: gunicorn stops accepting
        if not self.draining:
            self.draining = True
            # Out of the signal handler, as gunicorn does for SIGQUIT (its #1126).
            gevent.spawn(self._begin)

    def on_sigterm_plain(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM when gunicorn's internals moved: run the shutdown hooks, nothing more."""
        self.worker.handle_exit(sig, frame)
        if not self.draining:
            self.draining = True
            gevent.spawn(self._run_hooks)

    def _begin(self) -> None:
        logger.info(
            "graceful shutdown: turning away new jobs; %s requests running, "
            "%s idle connections, up to %s s",
            self.running,
            self.idle,
            self.worker.cfg.graceful_timeout,
        )
        self._run_hooks()
        if not self.running:
            self._close_idle()

    def _run_hooks(self) -> None:
        for hook in pipeline_of(self.worker.wsgi).shutdown:
            try:
                hook()
            except Exception:
                logger.exception("graceful shutdown: hook %r failed", hook)

    def _close_idle(self) -> None:
        """Time out every idle keep-alive wait now; gunicorn then closes those connections."""
        loop = gevent.get_hub().loop
        for greenlet, timeout in list(self._idle.items()):
            timeout.cancel()
            loop.run_callback(self._expire, greenlet, timeout)

    def _expire(self, greenlet: Any, timeout: Timeout) -> None:
        # Runs in the hub: the greenlet is still waiting only if it is still registered
        # with this timeout (it may have read a request in the meantime).
        if self._idle.get(greenlet) is timeout:
            greenlet.throw(timeout)


class _IdleWait:
    """Drain.idle_wait's context manager: a class, not a generator-based one, as gunicorn
    enters it before every request on a keep-alive connection."""

    __slots__ = ("drain", "me", "timeout")

    def __init__(self, drain: Drain) -> None:
        self.drain = drain

    def __enter__(self) -> Timeout:
        drain = self.drain
        # Draining with nothing running: wait only a moment for a request already on its way.
        seconds = (
            IDLE_LINGER if drain.draining and not drain.running else drain.worker.cfg.keepalive
        )
        self.me = gevent.getcurrent()
        self.timeout = timeout = Timeout(seconds, False)
        timeout.__enter__()
        drain._idle[self.me] = timeout
        return timeout

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        self.drain._idle.pop(self.me, None)
        return bool(self.timeout.__exit__(exc_type, exc, tb))  # swallows its own expiry
