"""The work queue in the request path: the proxy's admission hook and shutdown."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask

from pipeline import Call, ClientDisconnected
from proxy.disconnect import ClientWatch
from settings import Settings

from .gate import ClientGone, WorkQueue
from .shared import SharedWorkQueue, is_shared

logger = logging.getLogger(__name__)

# Admin jobs that take the admin lane: the long-running model transfers.
# copy, delete and blob transfers are quick or bounded by the client's own upload,
# so they go straight through.
ADMIN_QUEUED = frozenset({"/api/pull", "/api/push", "/api/create"})
# Jobs of an admin lane are keyed by this name in place of a model.
ADMIN_MODEL = "admin"


def init_app(app: Flask, settings: Settings) -> None:
    """Put every inference, embed and admin job through one WorkQueue."""
    queue = (SharedWorkQueue if is_shared(settings) else WorkQueue).from_settings(settings)
    app.extensions["gate.workqueue"] = queue
    app.extensions["gate.admit"] = _admitter(queue)
    # Run on SIGTERM (graceful.py): waiting and new jobs get 503, running ones finish.
    app.extensions.setdefault("gate.shutdown", []).append(queue.close)


def _admitter(
    queue: WorkQueue | SharedWorkQueue,
) -> Callable[[Call, ClientWatch], Callable[[], None] | None]:
    def admit(call: Call, watch: ClientWatch) -> Callable[[], None] | None:
        """Block until ``call`` may run; return what frees its slot (None: not queued)."""
        if call.cls == "admin":
            if call.path not in ADMIN_QUEUED:
                return None
            model, admin = ADMIN_MODEL, True
        elif call.cls in ("inference", "embed") and call.model:
            model, admin = call.model, False
        else:
            return None
        try:
            slot = queue.acquire(model, call.client, admin=admin, client_gone=watch.gone)
        except ClientGone:
            raise ClientDisconnected("client left while its job waited") from None
        call.waited = slot.waited
        return slot.release

    return admit
