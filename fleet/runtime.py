"""The fleet at run time: pollers, one connection pool per backend, placement in the queue.

The gevent side of ``fleet/``: greenlets poll each backend (``/api/version`` as the
health probe, ``/api/tags``, ``/api/ps``; never a generation, which would load a model)
into the ``Catalogue``, and every change reaches the ``FleetScheduler`` through the work
queue, which wakes the jobs it lets start. The proxy reaches a job's backend through
``FleetUpstream``; the admission hook (``FleetAdmitter``) answers for models that no
backend has before anything is queued.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.lock
from flask import Flask, g, has_request_context
from gevent.greenlet import Greenlet

from endpoints import normalize_model
from errors import GateError, UpstreamTimeout, UpstreamUnavailable
from pipeline import Call, ClientDisconnected, Release
from pipeline import ClientGone as ClientLeft
from proxy.upstream import Upstream, UpstreamResponse, describe
from settings import Settings
from workqueue.admission import Admitter, CapsOf, is_shared
from workqueue.core import JobSlot, QueueSnapshot
from workqueue.gate import ClientGone, Slot, WorkQueue, _Waiter, wait_or_gone

from .catalogue import Catalogue, Health, Where
from .config import Backend
from .placement import FleetScheduler

logger = logging.getLogger(__name__)

#: Seconds between health probes (/api/version) of each backend.
PROBE_INTERVAL = 5.0
#: Seconds between /api/ps polls (and soon after a job on the backend ends).
PS_INTERVAL = 5.0
#: Seconds between /api/tags polls (and at once after the backend answers 404 for a model).
TAGS_INTERVAL = 60.0
#: Connect and read timeout of one poll.
POLL_TIMEOUT = 5.0
#: How long a request for a model the catalogue cannot place yet waits for the first polls.
FIRST_POLL_WAIT = 5.0
#: The header that names the backend that answered.
BACKEND_HEADER = "X-Gate-Backend"

POLL_HEADERS = {"Accept": "application/json", "User-Agent": "ollama-gate-probe"}
# Admin jobs that take the admin lane (as workqueue.admission).
ADMIN_QUEUED = frozenset({"/api/pull", "/api/push", "/api/create"})


class ModelNotFound(GateError):
    """No backend has the model: Ollama's own 404, without queueing."""

    status = 404
    openai_type = "not_found_error"  # Ollama's /v1 type for a 404 (openai/openai.go)
    code = "model_not_found"


class ModelUnavailable(GateError):
    """The model is installed only on backends that are down."""

    status = 503
    openai_type = "server_error"
    code = "model_unavailable"


class FleetWorkQueue(WorkQueue):
    """The in-process work queue over a ``FleetScheduler``: jobs learn their backend."""

    def __init__(self, settings: Settings, scheduler: FleetScheduler, **kwargs: Any) -> None:
        super().__init__(settings, scheduler=scheduler, **kwargs)  # type: ignore[arg-type]
        self.fleet_scheduler = scheduler

    catalogue: Catalogue | None = None

    def snapshot(self) -> QueueSnapshot:
        """The work queue's snapshot; ``backends`` joins the catalogue's rows and placement's."""
        snap = super().snapshot()
        if self.catalogue is not None:
            placed = {row["name"]: row for row in snap.get("backends") or []}
            now = self._clock()
            rows = []
            for row in self.catalogue.snapshot():
                probed = row["last_probe"]
                row["probe_age"] = None if probed is None else round(max(0.0, now - probed), 3)
                place = placed.get(row["name"], {})
                row["models"] = place.get("models", {})
                row["running"] = place.get("running", 0)
                row["draining_for"] = place.get("draining_for")
                row["activations"] = place.get("activations", 0)
                rows.append(row)
            snap["backends"] = rows
        return snap

    def backend_of(self, slot: JobSlot) -> Backend | None:
        return self.fleet_scheduler.backend_of(slot.job_id)

    def observe(self, name: str, view: Any) -> None:
        """The catalogue's new view of a backend; wake the jobs it lets start, and fail
        the waiting jobs whose model no healthy backend has any more (503, as admission)."""
        now = self._clock()
        scheduler = self.fleet_scheduler
        self._dispatch(now, scheduler.observe(name, view, now), ())
        dropped, started = scheduler.drop_unavailable(now)
        for job_id in dropped:
            waiter = self._waiters.pop(job_id, None)
            if waiter is None:
                continue
            waiter.error = ModelUnavailable(
                f"model '{waiter.model}' is installed only on backends that are down",
                retry_after=fleet_retry_after(),
            )
            waiter.event.set()
            logger.info("fleet: a job waiting for %s failed: no backend up has it", waiter.model)
        if dropped:
            self._dispatch(now, started, ())

    def _poke_timer(self) -> None:
        # A job just started waiting: a queue grown deep may open a copy elsewhere.
        now = self._clock()
        self._dispatch(now, self.fleet_scheduler.tick(now), ())
        super()._poke_timer()

    def retry(self, slot: Slot, client_gone: ClientLeft | None, *, avoid: bool = True) -> Backend:
        """Place a job whose backend failed before answering again; block until it runs.

        Raises like ``acquire`` (the slot is then released); the slot stays the job's.
        ``avoid``: never on the backend it had (see ``FleetScheduler.retry``).
        """
        job_id = slot.job_id
        waiter = self._waiters[job_id] = _Waiter(slot.model, False)
        now = self._clock()
        self._dispatch(now, self.fleet_scheduler.retry(job_id, now, avoid=avoid), ())
        if not waiter.started:
            self._poke_timer()
            try:
                wait_or_gone(waiter.event, client_gone)
            except BaseException:
                self._waiters.pop(job_id, None)
                slot.release()
                raise
        self._waiters.pop(job_id, None)
        if waiter.error is not None:
            slot.release()
            raise waiter.error
        if not waiter.started or (client_gone is not None and client_gone.is_set()):
            slot.release()
            raise ClientGone()
        backend = self.backend_of(slot)
        assert backend is not None
        return backend


class Fleet:
    """The backends, their catalogue, connection pools and pollers, and the work queue."""

    def __init__(
        self,
        settings: Settings,
        backends: Sequence[Backend],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backends = list(backends)
        self.by_name = {backend.name: backend for backend in backends}
        self.catalogue = Catalogue(backends)
        self.scheduler = FleetScheduler.from_settings(settings, backends)
        if is_shared(settings):
            # Redis storage: the backends' slots are shared by every gate (fleet/shared.py).
            from .shared import SharedFleetWorkQueue

            self.queue: FleetWorkQueue = SharedFleetWorkQueue(settings, self.scheduler, clock=clock)
        else:
            self.queue = FleetWorkQueue(settings, self.scheduler, clock=clock)
        self.queue.catalogue = self.catalogue
        for backend in backends:  # nothing is placed on a backend before it is polled
            self.queue.observe(backend.name, self.catalogue.view(backend.name))
        self.pools = {
            backend.name: Upstream(
                backend.url,
                timeout=settings.upstream_timeout,
                concurrency=settings.worker_connections,
            )
            for backend in backends
        }
        self.unload_on_switch = settings.unload_on_switch
        self._clock = clock
        self._pollers: dict[str, Greenlet] = {}
        self._unloading = {backend.name: gevent.lock.Semaphore() for backend in backends}
        # Unloads go through a pool of their own with the polls' short timeout.
        self._control = {
            backend.name: Upstream(backend.url, timeout=POLL_TIMEOUT, concurrency=2)
            for backend in backends
        }
        self._wake = {backend.name: gevent.event.Event() for backend in backends}
        self._want_tags: set[str] = set()
        self._want_ps: set[str] = set()
        self._polled = gevent.event.Event()  # set after each round of polls
        self._closed = False

    # Pollers

    def start(self) -> None:
        """Start the pollers (once; in the worker, at the first request)."""
        if self._closed:
            return
        for backend in self.backends:
            poller = self._pollers.get(backend.name)
            if poller is None or poller.dead:
                self._pollers[backend.name] = gevent.spawn(self._poll_loop, backend)

    def close(self) -> None:
        self._closed = True
        for poller in self._pollers.values():
            poller.kill(block=False)
        self._pollers.clear()
        for pool in [*self.pools.values(), *self._control.values()]:
            pool.close()

    def unload_replaced(self, name: str) -> None:
        """With GATE_UNLOAD_ON_SWITCH: unload (``keep_alive: 0``) the idle models that a new
        place on backend ``name`` replaced, before that place's job is sent there.

        Every job sent to the backend meanwhile waits for the unloads to be answered, so
        none reaches it before them (else Ollama would pick what to evict itself). An
        unload that fails is logged and left to Ollama's own eviction: the job goes on.
        """
        if not self.unload_on_switch:
            return
        with self._unloading[name]:
            self._unload(name)

    def _unload(self, name: str) -> None:
        for model in self.scheduler.take_unloads(name):
            body = json.dumps({"model": model, "keep_alive": 0}).encode()
            headers = {**POLL_HEADERS, "Content-Type": "application/json"}
            try:
                resp = self._control[name].open("POST", "/api/generate", headers, body)
                try:
                    for _ in resp.records(None):
                        pass
                finally:
                    resp.release()
            except (GateError, OSError) as exc:
                logger.info("fleet: unloading %s on %s failed: %s", model, name, exc)
                continue
            logger.info("fleet: unloaded %s on %s to make way (%s)", model, name, resp.status)
            self.refresh_ps(name)

    def refresh_ps(self, name: str) -> None:
        """Read the backend's /api/ps soon (a job there ended: a model may have loaded)."""
        self._want_ps.add(name)
        self._wake[name].set()

    def refresh_tags(self, name: str) -> None:
        """Read the backend's /api/tags now (it answered 404 for a model we thought it had)."""
        self._want_tags.add(name)
        self._wake[name].set()

    def _poll_loop(self, backend: Backend) -> None:
        name = backend.name
        client = Upstream(backend.url, timeout=POLL_TIMEOUT, concurrency=2)
        next_probe = next_ps = next_tags = 0.0
        try:
            while not self._closed:
                try:
                    now = self._clock()
                    if now >= next_probe:
                        self._probe(client, name)
                        next_probe = now + PROBE_INTERVAL
                    state = self.catalogue.state(name)
                    if state.up:
                        if now >= next_tags or name in self._want_tags or state.installed is None:
                            self._want_tags.discard(name)
                            self._read(client, name, "/api/tags")
                            next_tags = now + TAGS_INTERVAL
                        if now >= next_ps or name in self._want_ps or state.loaded is None:
                            self._want_ps.discard(name)
                            self._read(client, name, "/api/ps")
                            next_ps = now + PS_INTERVAL
                    self.queue.observe(name, self.catalogue.view(name))
                except Exception:
                    logger.exception("fleet: polling %s failed", name)
                self._polled.set()
                self._polled = gevent.event.Event()
                # A backend down is only probed: its reads, skipped meanwhile, are no reason
                # to wake (they stay due, and a wait of 0 s would spin until it is back).
                due = [next_probe]
                if self.catalogue.state(name).up:
                    due += [next_ps, next_tags]
                delay = max(0.0, min(due) - self._clock())
                self._wake[name].wait(delay)
                self._wake[name].clear()
        finally:
            client.close()

    def _get(self, client: Upstream, path: str) -> Any:
        resp = client.open("GET", path, POLL_HEADERS, None)
        try:
            data = b"".join(resp.records(None))
        finally:
            resp.release()
        if resp.status != 200:
            raise UpstreamUnavailable(f"{path} answered {resp.status}")
        return json.loads(data)

    def _probe(self, client: Upstream, name: str) -> None:
        now = self._clock()
        try:
            body = self._get(client, "/api/version")
        except (GateError, ValueError, OSError) as exc:
            if self.catalogue.probe_failed(name, now, str(exc)):
                logger.warning("fleet: backend %s is down: %s", name, exc)
            self.observe(name)
            return
        version = body.get("version") if isinstance(body, dict) else None
        if self.catalogue.probe_ok(name, now, version if isinstance(version, str) else None):
            logger.info("fleet: backend %s is up (Ollama %s)", name, version)
        self.observe(name)

    def observe(self, name: str) -> None:
        """Hand the catalogue's view of ``name`` to the work queue, before anything yields.

        The placement core then never lags behind what admission reads from the catalogue
        (else a job admitted for a model just read could be dropped as unavailable).
        """
        self.queue.observe(name, self.catalogue.view(name))

    def _read(self, client: Upstream, name: str, path: str) -> None:
        try:
            body = self._get(client, path)
        except (GateError, ValueError, OSError) as exc:
            logger.info("fleet: %s of %s failed: %s", path, name, exc)
            return
        if path == "/api/tags":
            self.catalogue.read_tags(name, body, self._clock())
        else:
            self.catalogue.read_ps(name, body, self._clock())
        self.observe(name)

    # Questions and signals

    def where(self, model: str) -> Where:
        """Where ``model`` is; waits (a little) for the first polls while nothing is known."""
        self.start()
        deadline = self._clock() + FIRST_POLL_WAIT
        while True:
            where = self.catalogue.where(model)
            pending = any(
                state.health is Health.UNKNOWN or (state.up and state.installed is None)
                for state in self.catalogue.states
            )
            left = deadline - self._clock()
            if where is not Where.UNKNOWN or not pending or left <= 0:
                return where
            self._polled.wait(left)

    def failed(self, name: str, exc: BaseException) -> None:
        """A request to backend ``name`` failed before an answer (passive health signal)."""
        refused = isinstance(exc.__cause__, ConnectionRefusedError) or isinstance(
            exc, ConnectionRefusedError
        )
        if self.catalogue.passive_failure(name, describe(exc), refused=refused):
            logger.warning("fleet: backend %s is down: %s", name, describe(exc))
            self.queue.observe(name, self.catalogue.view(name))
            self._wake[name].set()

    def answered(self, name: str, status: int, model: str | None) -> None:
        """A backend answered (passive signal): 5xx other than "busy" count as failures."""
        if status >= 500 and status != 503:
            if self.catalogue.passive_failure(name, f"answered {status}"):
                self.queue.observe(name, self.catalogue.view(name))
            return
        self.catalogue.passive_success(name)
        if status == 404 and model:
            self.catalogue.forget_model(name, model)
            self.queue.observe(name, self.catalogue.view(name))
            self.refresh_tags(name)

    def light_backend(self) -> str:
        """A healthy backend for requests that are not placed (the first one up)."""
        healthy = self.catalogue.healthy()
        return healthy[0] if healthy else self.backends[0].name

    def snapshot(self) -> list[dict[str, Any]]:
        """Per backend: health, models loaded, running and slots per model (status.json)."""
        rows: list[dict[str, Any]] = self.queue.snapshot()["backends"]
        return rows


class FleetAdmitter(Admitter):
    """The admission hook over a fleet (pipeline.Admit): catalogue first, then the queue."""

    def __init__(self, fleet: Fleet, caps_of: CapsOf | None = None) -> None:
        super().__init__(fleet.queue, caps_of)
        self.fleet = fleet

    def __call__(self, call: Call, client_gone: ClientLeft) -> Release | None:
        fleet = self.fleet
        if call.cls == "admin":
            if call.path not in ADMIN_QUEUED:
                return None
            model, admin = "admin", True
        elif call.cls in ("inference", "embed") and call.model:
            model, admin = call.model, False
            where = fleet.where(call.model)
            if where is Where.MISSING:
                raise ModelNotFound(f"model '{_as_sent(call)}' not found")
            if where is Where.DOWN:
                raise ModelUnavailable(
                    f"model '{call.model}' is installed only on backends that are down",
                    retry_after=fleet_retry_after(),
                )
            if where is Where.UNKNOWN:
                raise UpstreamUnavailable("upstream unreachable: no backend has answered yet")
        else:
            return None
        # The key's caps hold across the fleet: max_running counts its jobs on every backend.
        slot = self.acquire(call, model, admin, client_gone)
        backend = fleet.queue.backend_of(slot)
        if has_request_context():
            g.gate_fleet_slot = (slot, client_gone)
            g.gate_backend = backend.name if backend is not None else None

        def release() -> None:
            placed = fleet.queue.backend_of(slot)
            slot.release()
            if placed is not None:
                fleet.refresh_ps(placed.name)
            elif admin:
                # A pull or create ended: what is installed where may have changed.
                for backend in fleet.backends:
                    fleet.refresh_tags(backend.name)

        return release


def _copy_source(body: bytes) -> str | None:
    try:
        source = json.loads(body).get("source")
    except (ValueError, AttributeError):
        return None
    return normalize_model(source) if isinstance(source, str) and source.strip() else None


def _as_sent(call: Call) -> str:
    """The model name as the client wrote it (Ollama's 404 repeats it so)."""
    payload = call.payload or {}
    raw = payload.get("model") or payload.get("name")
    return raw.strip() if isinstance(raw, str) and raw.strip() else call.model or ""


def fleet_retry_after() -> float:
    return PROBE_INTERVAL * 2


class FleetUpstream:
    """The proxy's upstream over a fleet (pipeline.Upstream): each call to its backend.

    A placed call goes to the backend its job runs on (``g.gate_backend``, set by
    ``FleetAdmitter``); other requests to the first healthy backend. A placed call whose
    backend fails before answering is placed again, once, on another backend.
    """

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.url = fleet.backends[0].url

    def open(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | Iterable[bytes] | None,
    ) -> UpstreamResponse:
        fleet = self.fleet
        fleet.start()
        path = target.partition("?")[0]
        if method in ("GET", "HEAD") and path in UNIONS:
            return self._union(method, path, headers)
        placed = has_request_context() and g.get("gate_backend") is not None
        call = g.get("gate_call") if has_request_context() else None
        model = call.model if call is not None else None
        if model is None and path == "/api/copy" and isinstance(body, bytes):
            model = _copy_source(body)  # a copy goes where its source is
        if placed:
            name = g.gate_backend
            fleet.unload_replaced(name)
        else:
            holders = fleet.catalogue.holders(model) if model else []
            name = holders[0] if holders else fleet.light_backend()
        try:
            resp = fleet.pools[name].open(method, target, headers, body)
        except (UpstreamTimeout, UpstreamUnavailable) as exc:
            # Refused, broken, or no response headers in time: nothing reached the client
            # yet (the pool closed the connection, so the backend stops the work).
            fleet.failed(name, exc)
            if not placed or not isinstance(body, bytes | None):
                raise
            if model is None or not [n for n in fleet.catalogue.holders(model) if n != name]:
                raise  # no other backend holds the model: placing it again would only wait
            slot, client_gone = g.gate_fleet_slot
            logger.info(
                "fleet: %s failed before answering (%s); placing the job again", name, describe(exc)
            )
            try:
                backend = fleet.queue.retry(slot, client_gone)
            except ClientGone:
                raise ClientDisconnected("client left while its job waited") from None
            name = g.gate_backend = backend.name
            fleet.unload_replaced(name)
            try:
                resp = fleet.pools[name].open(method, target, headers, body)
            except (UpstreamTimeout, UpstreamUnavailable) as again:
                fleet.failed(name, again)
                raise
        fleet.answered(name, resp.status, model)
        if path in CHANGES_MODELS:
            # A pull, create, copy or delete changes what the backend has installed: read
            # its /api/tags again once this answer ends (copy and delete end at once).
            if path in ("/api/copy", "/api/delete"):
                fleet.refresh_tags(name)
            elif has_request_context():
                g.gate_changed_backend = name
        resp.headers.append((BACKEND_HEADER, name))
        return resp

    def _union(self, method: str, path: str, headers: Mapping[str, str]) -> UpstreamResponse:
        """/api/tags, /api/ps or /v1/models over the healthy backends, each model once."""
        fleet = self.fleet
        names = fleet.catalogue.healthy() or [backend.name for backend in fleet.backends]
        answers: list[tuple[str, Any]] = []
        failure: BaseException | None = None
        for name in names:
            try:
                resp = fleet.pools[name].open("GET", path, headers, None)
                try:
                    data = b"".join(resp.records(None))
                finally:
                    resp.release()
                answers.append((name, json.loads(data) if resp.status == 200 else None))
            except (GateError, ValueError, OSError) as exc:
                failure = exc
                fleet.failed(name, exc)
        found = [(name, answer) for name, answer in answers if isinstance(answer, dict)]
        if not found:
            if failure is not None:
                raise UpstreamUnavailable(f"no backend answered {path}: {failure}")
            raise UpstreamUnavailable(f"no backend answered {path}")
        now = time.monotonic()
        if path == "/v1/models":
            merged: dict[str, Any] = {"object": "list", "data": _merge(found, "data", "id")}
        else:
            for name, answer in found:
                read = fleet.catalogue.read_tags if path == "/api/tags" else fleet.catalogue.read_ps
                read(name, answer, now)
                fleet.observe(name)
            merged = {"models": _merge(found, "models", "model")}
        return MergedResponse(
            json.dumps(merged).encode(), ",".join(name for name, _ in found), head=method == "HEAD"
        )

    def close(self) -> None:
        self.fleet.close()


#: Calls after which the backend's installed models are read again.
CHANGES_MODELS = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})

#: Light reads answered with the union over the healthy backends.
UNIONS = frozenset({"/api/tags", "/api/ps", "/v1/models"})


def _merge(answers: list[tuple[str, Any]], key: str, field: str) -> list[Any]:
    """The entries of every answer's ``key`` list, each ``field`` (a model name) once."""
    seen: dict[str, Any] = {}
    for _, answer in answers:
        entries = answer.get(key)
        for entry in entries if isinstance(entries, list) else ():
            if not isinstance(entry, dict):
                continue
            name = entry.get(field) or entry.get("name")
            if isinstance(name, str):
                seen.setdefault(normalize_model(name) if field != "id" else name, entry)
    return list(seen.values())


class MergedResponse(UpstreamResponse):
    """An answer the gate put together from several backends' (a whole JSON body)."""

    def __init__(self, body: bytes, backends: str, *, head: bool = False) -> None:
        self.raw = None  # type: ignore[assignment]
        self.status = 200
        self.body = b"" if head else body
        self.content_type = "application/json; charset=utf-8"
        self.headers = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(body))),
            (BACKEND_HEADER, backends),
        ]

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def records(self, sep: bytes | None) -> Iterator[bytes]:
        if self.body:
            yield self.body

    @property
    def complete(self) -> bool:
        return True

    def release(self) -> None:
        pass


@dataclass
class FleetParts:
    """What ``create_app`` puts in the pipeline for a fleet."""

    fleet: Fleet
    upstream: FleetUpstream
    admitter: FleetAdmitter


def init_app(app: Flask, settings: Settings, caps_of: CapsOf | None = None) -> FleetParts | None:
    """The fleet of ``app`` when several backends are configured (None: one backend)."""
    backends = settings.backends()
    if len(backends) < 2:
        return None
    fleet = Fleet(settings, backends)
    logger.info(
        "fleet: %s backends: %s",
        len(backends),
        "; ".join(
            f"{b.name} {b.url} max_models={b.max_models} model_concurrency={b.model_concurrency}"
            + (f" vram={b.vram}" if b.vram is not None else "")
            + (f" models={','.join(b.models)}" if b.models else "")
            + (f" weight={b.weight:g}" if b.weight != 1.0 else "")
            for b in backends
        ),
    )
    app.extensions["gate.fleet"] = fleet
    return FleetParts(fleet, FleetUpstream(fleet), FleetAdmitter(fleet, caps_of))
