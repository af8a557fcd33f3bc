"""Notice that a client left while the gate is blocked on something else.

A disconnect otherwise surfaces only when a write fails, and a job waiting in
the queue or an upstream still loading its model writes nothing. So while the
gate blocks on the client's behalf it watches the client's socket: a peek that
returns end-of-file means the client is gone, and the blocked greenlet gets
``ClientDisconnected`` thrown into it, the way ``gevent.Timeout`` interrupts a wait.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any

import gevent
import gevent.event

from pipeline import ClientDisconnected

logger = logging.getLogger(__name__)


class ClientWatch:
    """Watch one request's client socket (gunicorn's ``environ["gunicorn.socket"]``)."""

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self.sock: socket.socket | None = environ.get("gunicorn.socket")
        self.gone = gevent.event.Event()
        self._target = gevent.getcurrent()
        self._armed = False
        # A bare readiness watcher on the loop, not a greenlet: a waiting client costs
        # no stack (10,000 waiting clients, docs/BENCHMARKS.md).
        self._watcher: Any = None

    def start(self) -> ClientWatch:
        """Begin watching; call once the request body has been read in full."""
        if self.sock is not None and self._watcher is None:
            self._watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)  # 1: readable
            self._watcher.start(self._readable)
        return self

    def stop(self) -> None:
        """Stop watching (gunicorn reads the next request from this socket)."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None

    def armed(self) -> ClientWatch:
        """``with watch.armed():`` within this block a disconnect interrupts the current
        greenlet. The watch is its own context manager: the relay arms it around every
        read of a streamed answer, and a generator-based one costs a generator and a
        wrapper object each time."""
        return self

    def __enter__(self) -> None:
        if self.gone.is_set():
            raise ClientDisconnected("client closed the connection")
        self._target = gevent.getcurrent()
        self._armed = True

    def __exit__(self, *exc: object) -> None:
        self._armed = False

    def _readable(self) -> None:
        # Runs in the hub when the socket turns readable: peek without blocking.
        if self.sock is None or self._watcher is None or not self._watcher.active:
            return
        # gevent's socket would wait (in the hub) if nothing were there: peek on the
        # plain socket it wraps, which answers at once.
        raw = getattr(self.sock, "_sock", self.sock)
        try:
            data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # woken for nothing; keep watching
        except OSError:
            data = b""
        # One answer is all it takes either way. Only stop here: closing a watcher from
        # inside its own callback is left to stop(), which the request always calls.
        self._watcher.stop()
        if data:
            # The client sent more bytes (a pipelined request): it is still there, and
            # from here on only a failed write can tell otherwise.
            return
        logger.debug("client closed its connection")
        self.gone.set()
        gevent.get_hub().loop.run_callback(self._interrupt)

    def _interrupt(self) -> None:
        # Runs in the hub, so the target is parked: it is blocked inside armed() or not at all.
        if self._armed:
            self._target.throw(ClientDisconnected("client closed the connection"))
