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

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import gevent
from gevent import Timeout

from pipeline import pipeline_of

logger = logging.getLogger(__name__)

# Seconds a connection that turns idle while nothing runs any more (a fresh one accepted
# just before the worker stopped accepting) still gets for its request to arrive.
IDLE_LINGER = 0.5


def install(worker: Any) -> Drain:
    """Make SIGTERM graceful for ``worker`` (a gunicorn GeventWorker, after it loaded the app)."""
    drain = Drain(worker)
    worker.handle_request = drain.wrap_request(worker.handle_request)
    # AsyncWorker waits for each next request on a keep-alive connection in
    # ``with self.timeout_ctx(): req = next(parser)``: the one idle moment of a connection.
    worker.timeout_ctx = drain.idle_wait
    # gunicorn bound SIGTERM to worker.handle_exit before this hook ran: bind it again.
    signal.signal(signal.SIGTERM, drain.on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)
    return drain


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

    def wrap_request(self, handle_request: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            self.running += 1
            try:
                return handle_request(*args)
            finally:
                self.running -= 1
                if self.draining and not self.running:
                    self._close_idle()

        return counted

    @contextlib.contextmanager
    def idle_wait(self) -> Iterator[None]:
        """gunicorn's keepalive timeout, which a drain with nothing running cuts short."""
        # Draining with nothing running: wait only a moment for a request already on its way.
        seconds = IDLE_LINGER if self.draining and not self.running else self.worker.cfg.keepalive
        me = gevent.getcurrent()
        with Timeout(seconds, False) as timeout:
            self._idle[me] = timeout
            try:
                yield
            finally:
                self._idle.pop(me, None)

    def on_sigterm(self, sig: int, frame: FrameType | None) -> None:
        self.worker.handle_exit(sig, frame)  # alive = False: gunicorn stops accepting
        if not self.draining:
            self.draining = True
            # Out of the signal handler, as gunicorn does for SIGQUIT (its #1126).
            gevent.spawn(self._begin)

    def _begin(self) -> None:
        logger.info(
            "graceful shutdown: turning away new jobs; %s requests running, "
            "%s idle connections, up to %s s",
            self.running,
            self.idle,
            self.worker.cfg.graceful_timeout,
        )
        for hook in pipeline_of(self.worker.wsgi).shutdown:
            try:
                hook()
            except Exception:
                logger.exception("graceful shutdown: hook %r failed", hook)
        if not self.running:
            self._close_idle()

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
