"""Several backends with ``GATE_STORAGE_URI=redis://…``: the (backend, model) slots shared.

Every gate process keeps its own queue and late-bound placement (``FleetWorkQueue`` over a
``FleetScheduler``); what the backends can take is shared. A job the placement starts on
a backend takes a grant for that (backend, model) in Redis (``shared_scripts.FleetGrants``)
before it is forwarded: the grant script checks the backend's slots for the model, its
``max_models`` and ``vram`` across every gate, and the running cap of the job's client
(its API key's ``max_running``) against its grants in every gate. A refused job goes back
to its place in this gate's queue and is placed again when a slot frees anywhere. Other
gates' jobs reach the placement as each backend's ``View.others`` and each client's count
of them (``FleetScheduler.elsewhere``: a client at its cap counting them takes no turn),
read by one greenlet per process (the pump) every TICK seconds while jobs wait and every
third of a lease otherwise, or at once when another gate gives a grant back (it pushes
onto this process's wake list). The same
call renews this process's leases, so a dead process's grants lapse, and drains the
backends where this process's placement has a switch due (no grants for other models
there until it happened). The admin lane takes grants too, of a backend no configuration
can name.

When Redis fails or answers slower than STORAGE_TIMEOUT, the process places on its own
view alone (others' jobs forgotten: this process's own slots, as the single-backend
shared queue falls back), and probes Redis every PROBE_EVERY seconds; when it answers,
the grants given back meanwhile are released and every job of the process that runs is
counted there again before new jobs take grants. docs/SHARED_QUEUE.md, "Several backends".
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any

import gevent
import gevent.event
import gevent.lock
import redis
from gevent.greenlet import Greenlet

from endpoints import normalize_model
from errors import QueueTimeout
from pipeline import ClientGone as ClientLeft
from settings import Settings
from workqueue.core import DEFAULT_PRIORITY, QueueSnapshot
from workqueue.gate import ClientGone, Slot, wait_or_gone
from workqueue.scripts import DEFAULT_LEASE
from workqueue.shared import PROBE_EVERY, STORAGE_TIMEOUT, TICK, WAKE_BLOCK, redis_client

from .config import Backend
from .placement import FleetScheduler, View
from .runtime import FleetWorkQueue
from .shared_scripts import KEY_PREFIX, FleetGrants, Seen

logger = logging.getLogger(__name__)

#: A backend as Redis shows it before anything ran there: no jobs, no drain, no place yet.
NOTHING: tuple[dict[str, int], str | None, float | None] = ({}, None, None)
#: A new place on a backend read again within this many seconds of the last reading is
#: the same one (the round trip moves it a little at every sync).
PLACED_SLACK = 0.05
#: The admin lane's grants are kept as those of this backend, under this model.
ADMIN_LANE = "\0admin"
ADMIN_MODEL = "admin"
#: A job that begins to wait has the view read again unless it is this fresh (seconds).
MIN_SYNC = 0.05


class _Grant:
    """A running job of this process on a backend: its grant id, and whether Redis counts it."""

    __slots__ = ("rid", "backend", "model", "size", "client", "counted")

    def __init__(
        self, rid: str, backend: str, model: str, size: int, client: str, counted: bool
    ) -> None:
        self.rid = rid
        self.backend = backend
        self.model = model
        self.size = size
        self.client = client
        self.counted = counted


class SharedFleetWorkQueue(FleetWorkQueue):
    """The fleet's work queue whose (backend, model) slots are shared through Redis."""

    def __init__(
        self,
        settings: Settings,
        scheduler: FleetScheduler,
        *,
        client: redis.Redis | None = None,
        lease: float | None = None,
        prefix: str = KEY_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._views: dict[str, View] = {}
        # What other gates do on each backend: their jobs per model, the model one of
        # them drains it for, when a model last took a new place there (this clock).
        self._others: dict[str, tuple[dict[str, int], str | None, float | None]] = {}
        super().__init__(settings, scheduler, clock=clock)
        uri = settings.storage_uri
        self._redis = client if client is not None else redis_client(uri)
        # The pump's BLMPOP holds its own connection for up to WAKE_BLOCK.
        self._blocking = redis_client(uri, WAKE_BLOCK + STORAGE_TIMEOUT)
        if lease is None:
            lease = getattr(settings, "queue_lease", DEFAULT_LEASE)
        self.lease = float(lease)
        self.grants = FleetGrants(self._redis, lease=self.lease, prefix=prefix)
        self.prefix = prefix
        self.probe_every = min(PROBE_EVERY, self.lease / 3)
        self._names = [backend.name for backend in scheduler.backends]
        # The admin lane's grants, as those of a backend no configuration can name.
        self._admin_lane = Backend(
            ADMIN_LANE, "", max_models=1, model_concurrency=scheduler.admin_concurrency
        )
        self._by_name = {backend.name: backend for backend in scheduler.backends}
        self._held: dict[Hashable, _Grant] = {}  # local job id -> its grant
        self._caps: dict[Hashable, int] = {}  # local job id -> its client's running cap
        self._orphans: set[str] = set()  # grants given back while Redis was out of reach
        self._down_since: float | None = None
        self._owner: str | None = None
        self._pump: Greenlet | None = None
        self._poke = gevent.event.Event()
        self._next_renew = 0.0
        self._last_sync = float("-inf")
        self._drains: dict[str, str] = {}  # backend -> the model this process drains it for
        # A release waits for a sync under way: else a grant given back while the sync's
        # call travels would be counted again there (its running jobs were read before).
        self._syncing = gevent.lock.Semaphore()

    @property
    def owner(self) -> str:
        # Made on first use, in the worker: a process forked later gets its own.
        if self._owner is None:
            self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        return self._owner

    @property
    def fallback(self) -> bool:
        """Whether this process places on its own slots because Redis failed."""
        return self._down_since is not None

    # The placement's view: the catalogue's, plus other gates' jobs

    def observe(self, name: str, view: Any) -> None:
        self._views[name] = view
        others, drain, placed_at = self._others.get(name, NOTHING)
        super().observe(name, replace(view, others=others, drain=drain, placed_at=placed_at))

    def _set_others(self, name: str, seen: Seen) -> None:
        """What other gates do on backend ``name``, as Redis just said: the placement's
        view changes if it differs (a new place there if it moved by PLACED_SLACK)."""
        placed_at = None if seen.placed_ago is None else self._clock() - seen.placed_ago
        others, drain, before = self._others.get(name, NOTHING)
        if (others, drain) == (seen.others, seen.drain) and (
            placed_at == before
            or (
                placed_at is not None
                and before is not None
                and abs(placed_at - before) < PLACED_SLACK
            )
        ):
            return
        self._others[name] = (seen.others, seen.drain, placed_at)
        view = self._views.get(name)
        if view is not None:
            self.observe(name, view)

    def _set_elsewhere(self, counts: dict[str, int], *, every: bool) -> None:
        """Clients' jobs in other gates, as Redis just said (every client's, or with
        ``every`` False the named ones'): they count towards each client's running cap."""
        now = self._clock()
        self._dispatch(now, self.fleet_scheduler.elsewhere(counts, now, every=every), ())

    # Admission

    def acquire(
        self,
        model: str,
        client: str,
        *,
        admin: bool = False,
        client_gone: ClientLeft | None = None,
        max_waiting: int | None = None,
        max_running: int | None = None,
        priority: str = DEFAULT_PRIORITY,
    ) -> Slot:
        """Wait for a place in this gate's queue, then for the backend's grant in Redis."""
        self._start_pump()
        submitted = self._clock()
        slot = super().acquire(
            model,
            client,
            admin=admin,
            client_gone=client_gone,
            max_waiting=max_waiting,
            max_running=max_running,
            priority=priority,
        )
        if max_running is not None:
            self._caps[slot.job_id] = max_running
        try:
            if admin:
                self._take_admin_grant(slot, client_gone, submitted)
            else:
                self._take_grant(slot, client_gone)
        except BaseException:
            slot.release()
            raise
        slot.waited = self._clock() - submitted
        return slot

    def retry(self, slot: Slot, client_gone: ClientLeft | None, *, avoid: bool = True) -> Backend:
        """Place a job again after its backend failed (FleetWorkQueue.retry), with a grant."""
        self._give_back(slot.job_id)
        super().retry(slot, client_gone, avoid=avoid)
        try:
            self._take_grant(slot, client_gone)
        except BaseException:
            slot.release()
            raise
        backend = self.backend_of(slot)
        assert backend is not None
        return backend

    def _take_grant(self, slot: Slot, client_gone: ClientLeft | None) -> None:
        """The job runs on a backend of this gate's choosing: take its grant there, or wait
        again in its place until the placement finds another slot (blocks)."""
        model = normalize_model(slot.model)
        while True:
            backend = self.backend_of(slot)
            assert backend is not None
            view = self._views.get(backend.name)
            size = 0
            if view is not None:
                size = view.loaded.get(model) or (view.installed or {}).get(model, 0)
            rid = f"{self.owner}:{slot.job_id}"
            client = slot.client
            if self.fallback:
                self._held[slot.job_id] = _Grant(rid, backend.name, model, size, client, False)
                return
            slots = self.fleet_scheduler.overrides.get(model, backend.model_concurrency)
            try:
                ok, seen, elsewhere = self.grants.grant(
                    rid,
                    backend,
                    model,
                    self.owner,
                    slots=slots,
                    size=size,
                    switch_after=self.fleet_scheduler.switch_after,
                    client=client,
                    max_running=self._caps.get(slot.job_id),
                )
            except redis.RedisError as exc:
                self._went_down(exc)
                self._held[slot.job_id] = _Grant(rid, backend.name, model, size, client, False)
                return
            if ok:
                self._held[slot.job_id] = _Grant(rid, backend.name, model, size, client, True)
                self._set_others(backend.name, seen)
                self._set_elsewhere({client: elsewhere}, every=False)
                return
            logger.debug(
                "fleet: %s on %s for %s refused across gates; the job waits",
                model,
                backend.name,
                client,
            )
            # Other gates fill it, drain it for another model, or run the client's jobs
            # up to its cap: with that in the view, the placement does not place the job
            # again until it changes. If the view shows nothing new (a grant of this
            # process given back a moment ago still counts), the job waits a tick before
            # it is placed again, rather than spin.
            others, drain, _ = self._others.get(backend.name, NOTHING)
            known = self.fleet_scheduler.elsewhere_of(client)
            if (others, drain, known) == (seen.others, seen.drain, elsewhere):
                gevent.sleep(TICK)
            self._set_others(backend.name, seen)
            self._set_elsewhere({client: elsewhere}, every=False)
            super().retry(slot, client_gone, avoid=False)

    def _take_admin_grant(
        self, slot: Slot, client_gone: ClientLeft | None, submitted: float
    ) -> None:
        """A pull, push or create that this process's admin lane lets start takes one of
        GATE_ADMIN_CONCURRENCY grants shared by every gate; while none is free it keeps
        its place here and asks again every TICK (blocks), until GATE_QUEUE_TIMEOUT."""
        rid = f"{self.owner}:{slot.job_id}"
        lane = self._admin_lane
        client = slot.client
        while True:
            if self.fallback:
                self._held[slot.job_id] = _Grant(rid, lane.name, ADMIN_MODEL, 0, client, False)
                return
            try:
                ok, _, _ = self.grants.grant(
                    rid,
                    lane,
                    ADMIN_MODEL,
                    self.owner,
                    slots=lane.model_concurrency,
                    client=client,
                    max_running=self._caps.get(slot.job_id),
                )
            except redis.RedisError as exc:
                self._went_down(exc)
                continue
            if ok:
                self._held[slot.job_id] = _Grant(rid, lane.name, ADMIN_MODEL, 0, client, True)
                return
            left = submitted + self.fleet_scheduler.queue_timeout - self._clock()
            if left <= 0:
                raise QueueTimeout(
                    f"no slot became free within {self.fleet_scheduler.queue_timeout:g} s; "
                    "try again later",
                    retry_after=self.retry_after(admin=True),
                )
            wait_or_gone(gevent.event.Event(), client_gone, min(TICK, left))
            if client_gone is not None and client_gone.is_set():
                raise ClientGone()

    def _finish(self, job_id: Hashable) -> None:
        # Give the grant back before the local slot frees: the job this lets start here
        # then finds it free in Redis too.
        self._give_back(job_id)
        self._caps.pop(job_id, None)
        super()._finish(job_id)

    def _give_back(self, job_id: Hashable) -> None:
        grant = self._held.pop(job_id, None)
        if grant is None or not grant.counted:
            return
        if self.fallback:
            self._orphans.add(grant.rid)  # released when Redis answers, else its lease lapses
            return
        if gevent.getcurrent() is gevent.get_hub():
            gevent.spawn(self._release, grant.rid)  # from a finaliser: no I/O in the hub
        else:
            self._release(grant.rid)

    def _release(self, rid: str) -> None:
        try:
            with self._syncing:
                self.grants.release(rid, self.owner)
        except redis.RedisError as exc:
            self._orphans.add(rid)
            self._went_down(exc)

    # Status

    def snapshot(self) -> QueueSnapshot:
        snap = super().snapshot()
        snap["shared"] = not self.fallback
        snap["fallback"] = self.fallback
        for row in snap.get("backends") or []:
            others, drain, _ = self._others.get(row["name"], NOTHING)
            row["others"] = dict(sorted(others.items()))
            row["drained_by_others_for"] = drain
        return snap

    def idle(self) -> bool:
        return super().idle() and not self._held

    def close(self) -> None:
        super().close()
        self._poke.set()

    # The pump: other gates' jobs, lease renewal, wake-ups, probing

    def _dispatch(self, now: float, started: Any, expired: Any) -> None:
        super()._dispatch(now, started, expired)
        if self._drains and self.fleet_scheduler.draining(now) != self._drains:
            self._poke.set()  # a switch happened (or is off): end the drains at once

    def _poke_timer(self) -> None:
        super()._poke_timer()
        self._poke.set()  # a job waits: read the others now

    def _start_pump(self) -> None:
        if self._pump is None or self._pump.dead:
            self._pump = gevent.spawn(self._run_pump)

    def _run_pump(self) -> None:
        # After close, the jobs still running keep their grants renewed until they end.
        while not self._closed or self._held:
            try:
                if self.fallback:
                    self._probe()
                elif self._waiters:
                    self._sync()
                    self._wait_for_wakeup()
                else:
                    self._poke.wait(max(0.0, self._next_renew - self._clock()))
                    self._poke.clear()
                    if (
                        self._waiters
                        or self._held
                        or self._drains
                        or self._clock() >= self._next_renew
                    ):
                        self._sync()
            except redis.RedisError as exc:
                self._went_down(exc)
            except Exception:
                logger.exception("fleet: shared slots' pump failed")
                gevent.sleep(0.1)

    def _wait_for_wakeup(self) -> None:
        """Wait for a release by another gate (its push onto this process's wake list),
        TICK at most; a job that just began to wait cuts it short, unless the view is
        fresher than MIN_SYNC (under load jobs begin to wait all the time)."""
        if self._poke.is_set():
            self._poke.clear()
            if self._clock() - self._last_sync >= MIN_SYNC:
                return
        key = self.grants.wake_key(self.owner)
        self._blocking.blmpop(WAKE_BLOCK, 1, key, direction="LEFT", count=1000)

    def _sync(self) -> None:
        """Renew this process's grants, count again those Redis lost, read the others."""
        with self._syncing:
            passed = list(self._held.values())
            running = [(g.rid, g.backend, g.model, g.size, g.client) for g in passed]
            drains = self.fleet_scheduler.draining(self._clock())
            if drains != self._drains:
                if drains:
                    logger.info(
                        "fleet: a switch is due; draining %s across gates",
                        ", ".join(f"{name} for {model}" for name, model in sorted(drains.items())),
                    )
                self._drains = drains
            synced = self.grants.sync(
                self.owner, running, self._names, waiting=bool(self._waiters), drains=drains
            )
        self._last_sync = self._clock()
        self._next_renew = self._last_sync + self.lease / 3
        held = {g.rid for g in self._held.values()}
        for rid in synced.counted:
            if rid not in held:
                gevent.spawn(self._release, rid)  # it ended while the script ran
        counted = set(synced.counted)
        for grant in passed:
            if grant.counted and grant.rid in counted:
                logger.warning("fleet: running job %s had lost its grant's lease", grant.rid)
            grant.counted = True  # Redis holds every grant it was sent
        for name, seen in synced.seen.items():
            self._set_others(name, seen)
        self._set_elsewhere(synced.clients, every=True)

    def _probe(self) -> None:
        gevent.sleep(self.probe_every)
        try:
            self._redis.ping()
        except redis.RedisError:
            return
        self._recover()

    def _recover(self) -> None:
        """Redis answers again: release what ended meanwhile, count every running job."""
        for rid in list(self._orphans):
            self.grants.release(rid, self.owner)
            self._orphans.discard(rid)
        # Every job that runs is counted before any job takes a grant again.
        self._sync()
        self._down_since = None
        logger.warning(
            "fleet: Redis answers again; backends' slots are shared again "
            "(jobs of this process counted there: %s running)",
            len(self._held),
        )

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return
        self._down_since = self._clock()
        logger.warning(
            "fleet: Redis unreachable (%s); placing on this process's own slots and "
            "trying Redis again every %ss",
            exc,
            f"{self.probe_every:.2g}",
        )
        for name in list(self._others):
            self._set_others(name, Seen({}))
        self._set_elsewhere({}, every=True)
        self._start_pump()
        self._poke.set()
