"""The work queue in the request path: the proxy's admission hook and shutdown."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

from pipeline import Call, ClientDisconnected, Release
from pipeline import ClientGone as ClientLeft
from settings import Settings

from .core import JobQueue, JobSlot
from .gate import ClientGone, WorkQueue

# Admin jobs that take the admin lane: the long-running model transfers.
# copy, delete and blob transfers are quick or bounded by the client's own upload,
# so they go straight through.
ADMIN_QUEUED = frozenset({"/api/pull", "/api/push", "/api/create"})
# Jobs of an admin lane are keyed by this name in place of a model.
ADMIN_MODEL = "admin"

#: A client's caps (its API key's max_waiting and max_running), None where it has none.
CapsOf = Callable[[str], tuple[int | None, int | None]]


class Admitter:
    """Puts every inference, embed and admin job through one work queue (pipeline.Admit)."""

    def __init__(self, queue: JobQueue, caps_of: CapsOf | None = None) -> None:
        self.queue = queue
        self.caps_of = caps_of

    def __call__(self, call: Call, client_gone: ClientLeft) -> Release | None:
        """Block until ``call`` may run; return what frees its slot (None: not queued)."""
        cls = call.cls
        if cls == "inference" or cls == "embed":
            model = call.model
            if not model:
                return None
            admin = False
        elif cls == "admin":
            if call.path not in ADMIN_QUEUED:
                return None
            model, admin = ADMIN_MODEL, True
        else:
            return None
        return self.acquire(call, model, admin, client_gone).release

    def acquire(self, call: Call, model: str, admin: bool, client_gone: ClientLeft) -> JobSlot:
        """Block until ``call``'s job may run, within its client's caps (``caps_of``: its
        API key's max_waiting and max_running); note its wait in ``call.waited``."""
        max_waiting, max_running = (
            self.caps_of(call.client) if self.caps_of is not None else (None, None)
        )
        try:
            slot = self.queue.acquire(
                model,
                call.client,
                admin=admin,
                client_gone=client_gone,
                max_waiting=max_waiting,
                max_running=max_running,
                priority=call.priority,
            )
        except ClientGone:
            raise ClientDisconnected("client left while its job waited") from None
        call.waited = slot.waited
        return slot

    def close(self) -> None:
        """On SIGTERM (graceful.py): waiting and new jobs get 503, running ones finish."""
        self.queue.close()


def init_app(app: Flask, settings: Settings, caps_of: CapsOf | None = None) -> Admitter:
    """The work queue of ``app``: in this process, or shared through Redis.

    ``caps_of(client)`` gives a client's own caps (the limiter's API keys).
    """
    queue: JobQueue
    if is_shared(settings):
        # Imported here: redis-py costs each gate process about 0.1 s of CPU to import,
        # and a gate with memory:// storage never uses it.
        from .shared import SharedWorkQueue

        queue = SharedWorkQueue.from_settings(settings)
    else:
        queue = WorkQueue.from_settings(settings)
    return Admitter(queue, caps_of)


def is_shared(settings: Settings) -> bool:
    """Whether the gate's storage is a Redis, so the work queue is shared through it."""
    return not str(settings.storage_uri).startswith("memory://")
