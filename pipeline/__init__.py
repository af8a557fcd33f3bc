"""What the layers of a request share, importing nothing of theirs.

The proxy, the limiter, the work queue and the status page all speak of the
same forwarded request (``Call``) and the same event (the client left:
``ClientDisconnected``), and each offers the others a hook or two. All of that
lives here, below every layer, so that imports run one way: app → status →
limiter, workqueue → proxy → this core (tests/test_layers.py). ``create_app``
puts one ``Pipeline`` at ``app.extensions["gate"]``; its fields are typed by the
Protocols below, so a reader follows names, not strings, from one layer to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from endpoints import EndpointClass
from workqueue.core import DEFAULT_PRIORITY

from .call import Call, parse_json, usage_of

if TYPE_CHECKING:
    from flask import Flask

    from settings import Settings
    from workqueue.core import QueueSnapshot

#: Where create_app puts the Pipeline of an app.
EXTENSION = "gate"


class ClientDisconnected(Exception):
    """The client closed its connection before the gate finished answering."""


class ClientGone(Protocol):
    """A flag the proxy sets when a request's client leaves (a gevent Event).

    The work queue links a callback to it while a job waits, to wake that job.
    """

    def is_set(self) -> bool: ...

    def rawlink(self, callback: Callable[[Any], object]) -> None: ...

    def unlink(self, callback: Callable[[Any], object]) -> None: ...


#: Frees what an admitted call holds (its work-queue slot); called exactly once.
Release = Callable[[], None]


class Admit(Protocol):
    """The work queue's hook, called by the proxy before it opens the upstream.

    Blocks until ``call`` may run (or raises a GateError, or ClientDisconnected
    once ``client_gone`` is set), and returns what frees its slot; None when the
    call is not queued.
    """

    def __call__(self, call: Call, client_gone: ClientGone) -> Release | None: ...


class Identity(NamedTuple):
    """Who sends a request the light lane may forward, as the limiter's hooks would find it."""

    client: str
    #: Names (lowercase) of the headers that carried its API key: never forwarded.
    consumed: frozenset[str]
    #: The class a queued call is served at (its key's ceiling, or the lower one asked for).
    priority: str = DEFAULT_PRIORITY


class Identify(Protocol):
    """The limiter's word on a request of class ``cls``, for the proxy's light lane.

    Its Identity when no limit, token budget or model allow-list applies and the
    lane may forward it without Flask; None when the limiter must see it (a key to
    reject, a limit to count, a priority to refuse).
    """

    def __call__(self, environ: Mapping[str, Any], cls: EndpointClass) -> Identity | None: ...


class Keys(Protocol):
    """The API keys (limiter.keys.Keyring), which the status page's admin access checks."""

    def lookup(self, secret: str) -> Any: ...


class Upstream(Protocol):
    """The proxy's connection pool to Ollama (proxy.upstream.Upstream)."""

    url: str

    def open(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | Iterable[bytes] | None,
    ) -> Any: ...

    def close(self) -> None: ...


class QueueView(Protocol):
    """What the status page reads of the work queue (workqueue.core.JobQueue)."""

    def snapshot(self) -> QueueSnapshot: ...


class LimiterView(Protocol):
    """What the status page reads of the limiter: 429s per class, storage health."""

    def stats(self) -> dict[str, Any]: ...


@dataclass
class Pipeline:
    """The parts of one app and the hooks between its layers (``app.extensions["gate"]``)."""

    settings: Settings
    upstream: Upstream
    #: The work queue's admission (None: nothing is queued).
    admit: Admit | None = None
    #: The limiter's verdict for the light lane (None: every request goes through Flask).
    identify: Identify | None = None
    #: The API keys (None: open access).
    keys: Keys | None = None
    #: Run once on SIGTERM (graceful.py): the work queue turns away new and waiting jobs.
    shutdown: list[Callable[[], None]] = field(default_factory=list)
    queue: QueueView | None = None
    limiter: LimiterView | None = None
    #: The status page's own state (status.Status); only status/ reads it.
    status: object = None
    #: The WSGI middleware around Flask, in the order a request meets them.
    middleware: tuple[object, ...] = ()


def pipeline_of(app: Flask) -> Pipeline:
    """The Pipeline create_app put on ``app``."""
    found = app.extensions[EXTENSION]
    assert isinstance(found, Pipeline), found
    return found


__all__ = [
    "EXTENSION",
    "Admit",
    "Call",
    "ClientDisconnected",
    "ClientGone",
    "Identify",
    "Identity",
    "Keys",
    "LimiterView",
    "Pipeline",
    "QueueView",
    "Release",
    "Upstream",
    "parse_json",
    "pipeline_of",
    "usage_of",
]
