"""SIGHUP re-reads the keys file in every worker, without a restart (gunicorn.conf.py installs it).

gunicorn's own answer to SIGHUP is to start new workers and stop the old ones
gracefully. For the gate that is the wrong trade: a stopping worker turns its
waiting jobs away with 503 and closes idle keep-alive connections (graceful.py),
and its replacement starts with empty in-memory limits and a queue of its own
that runs beside the old one's until the last stream ends (twice the model
concurrency on the GPU). So the master does not restart anything on SIGHUP: it
passes the signal to each worker (``forward_to_workers``), and each worker
re-reads the keys file in place (``install``): connections, waiting jobs,
running streams, limit counts and the queue stay as they are. A file that does
not parse or check is refused with a logged error naming the line, and the keys
in force stay.

Changing any other setting still takes a restart (or gunicorn's USR2 upgrade).
This module imports nothing at load time but the standard library: the master
imports it before gevent patches the workers.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter

logger = logging.getLogger(__name__)


class Reloadable(Protocol):
    def reload_keys(self) -> bool: ...


def install(worker: Any) -> None:
    """In a worker (post_worker_init): SIGHUP re-reads the keys file, out of the handler."""
    import gevent

    gate = getattr(worker.wsgi, "extensions", {}).get("gate")
    limiter: Reloadable | None = getattr(gate, "limiter", None)
    if limiter is None:
        return

    def on_hup(sig: int, frame: object) -> None:
        # File I/O and logging do not belong in a signal handler (gunicorn's #1126).
        gevent.spawn(limiter.reload_keys)

    # gunicorn's Worker.init_signals left SIGHUP at its default action: ending the worker.
    signal.signal(signal.SIGHUP, on_hup)
    signal.siginterrupt(signal.SIGHUP, False)


def forward_to_workers(server: Arbiter) -> None:
    """In the master (on_starting): SIGHUP goes to the workers instead of replacing them."""

    def handle_hup() -> None:
        workers = list(server.WORKERS)
        server.log.info(
            "ollama-gate: SIGHUP: %d workers re-read the keys file (no restart)", len(workers)
        )
        for pid in workers:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:  # it exited meanwhile; its replacement reads the file
                pass

    # The arbiter's loop looks its handlers up by name on the instance (getattr).
    server.handle_hup = handle_hup


def gunicorn_seams_missing() -> list[str]:
    """What ``forward_to_workers`` and ``install`` rely on in gunicorn and no longer find.

    tests/test_limiter_reload.py runs this against the pinned gunicorn, so an
    upgrade that moves any of it fails there first.
    """
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

    missing = []
    checks = [
        (Arbiter.run, 'handler = getattr(self, "handle_%s" % signame', "the arbiter's loop"),
        (Worker.init_signals, "signal.signal(s, signal.SIG_DFL)", "workers reset their signals"),
    ]
    for function, text, what in checks:
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            source = ""
        if text not in source:
            missing.append(f"no longer true: {what} ({text!r} in {function.__qualname__})")
    if not isinstance(getattr(Arbiter, "WORKERS", None), dict):
        missing.append("no longer true: Arbiter.WORKERS maps worker pids")
    init = inspect.getsource(Worker.init_process)
    if not 0 <= init.find("self.init_signals()") < init.find("self.cfg.post_worker_init(self)"):
        missing.append("no longer true: workers set their signals before post_worker_init")
    return missing
