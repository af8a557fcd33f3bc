"""Placement over several backends: which job runs next, and where, decided without clocks.

``FleetScheduler`` generalises ``workqueue.core.Scheduler`` from one Ollama to several:
slots are per (backend, model), places (distinct models with running jobs) per backend.
With one backend that knows nothing of its models it decides exactly as ``Scheduler``
does (tests/test_fleet_placement.py runs the two side by side). Every method takes the
caller's monotonic ``now``; what the catalogue knows of each backend comes in through
``observe``.

Rules (docs/DESIGN.md, "Placement"), as implemented here:

* Late binding: jobs wait in one fair queue per model (clients round-robin, as in
  ``Scheduler``) and take a backend only when they start.
* A backend runs at most ``slots(backend, model)`` jobs of a model (its
  ``model_concurrency``, or GATE_MODEL_CONCURRENCY_OVERRIDES) and at most ``max_models``
  distinct models, whose sizes stay within ``vram`` where set. A model holds a place on a
  backend while it has running jobs there.
* A backend takes a model only if it is healthy, allows it (``models`` globs), has it
  installed (when known) and could hold it alone within its ``vram``.
* Affinity: when a slot frees, a model running on a backend takes its own waiting jobs
  there first. A place that frees goes to the waiting model whose oldest job has waited
  longest; among the backends that can give it a place, the best is one where it is
  loaded, then one with room to load it without evicting anything, then one where an idle
  model that is not held must make way; ties go to the least busy backend for its weight.
* Oldest first: a waiting model with no place anywhere reserves the backends that could
  run it, so younger models take no new place there until it has one.
* Hold, per backend: a model loaded on a backend (per ``/api/ps``, or with a job there
  since the last reading) that had a job start or end there within ``switch_after``
  keeps its place while idle, as a running model
  does: its own next job takes the place back ahead of older models, and no other model
  (nor a copy) replaces it until its hold runs out or a switch is due. This is the
  single-host rule: places change by a switch, not whenever a model's queue is empty
  for an instant between one client's jobs.
* Switch, per backend: once that oldest model has waited ``switch_after`` (counted from
  its oldest job's arrival or the backend's last new place, whichever is later; a held
  model taking its place back is no new place), the backends that could run it take no
  new jobs and drain; the first place freed, or a held one, goes to it.
* Copies: a model running somewhere takes a place on another backend too when it is
  loaded there, or when its queue is at least COPY_DEPTH times its running slots and the
  backend has a free place (evicting, if it must, only idle models no job waits for and
  none held). A
  copy keeps its place while jobs of its model wait, and gives it up when they are done
  (hysteresis: it opens at a deep queue and closes at an empty one). A model with no
  place anywhere goes first: no copy opens where it could take the place, and a place
  of a model beyond its home (``_yields``) takes no new jobs while it could, and goes
  to it once free.
* Running caps (an API key's ``max_running``), as in ``Scheduler`` and with its
  ``ClientCounts``: a client's jobs on every backend count together, and in shared mode
  with its jobs in other gates (``elsewhere``); at its cap its waiting jobs take no turn,
  and win their model no place, copy, reservation or switch, and count for no queue
  depth, until one of its jobs ends.
* A job whose backend failed before it answered goes back to its place in the queue
  (``retry``), never to be placed on that backend again. It holds back no job where it
  may not run: later jobs of its model take the slots and places there (``_avoid``);
  and its model's places only on backends that failed it are none for it
  (``_placed_for``): its model takes a new place, reserves and switches for it as a
  model with no place does.
* Failover: a waiting job whose model no healthy backend could run (every backend that
  has it is down, or failed this job) leaves the queue (``drop_unavailable``), counted
  under "model_unavailable", for the caller to answer 503 as the admission path does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from endpoints import normalize_model
from workqueue.core import (
    DEFAULT_AGING,
    DEFAULT_PRIORITY,
    PRIORITIES,
    Admission,
    JobBook,
    Lane,
    LaneSnapshot,
    QueueSnapshot,
    switch_due,
)

from .config import Backend

# A model running somewhere takes a place on another backend (loading it there) once
# this many of its jobs wait for each slot it has.
COPY_DEPTH = 2

# Waiting jobs whose model no healthy backend could run any more (``drop_unavailable``)
# are counted under this reason, besides REASONS; its key appears once one is counted (a
# fleet of one reports exactly as Scheduler does).
UNAVAILABLE = "model_unavailable"

# Placement tiers, best first.
TIER_LOADED = 1  # loaded here: running already, or idle (residency from /api/ps)
TIER_ROOM = 2  # room to load it without evicting anything
TIER_EVICT = 3  # an idle model must make way


@dataclass(frozen=True, slots=True)
class View:
    """What the catalogue knows of one backend (``FleetScheduler.observe``).

    ``installed`` maps model to size in bytes, or is None while unknown (then any model
    may run there, sizes unknown); ``loaded`` maps the models loaded now to their VRAM.
    Shared mode (fleet/shared.py) adds what other gates do there: ``others`` maps model to
    the jobs they run (they take slots and places as this gate's own running jobs do);
    ``drain`` is the model a gate drains the backend for (no new jobs of other models);
    ``placed_at`` when a model last took a new place there (the caller's clock), which
    starts the switch clock as a new place of this gate's own does.
    """

    healthy: bool = True
    installed: Mapping[str, int] | None = None
    loaded: Mapping[str, int] = field(default_factory=dict)
    others: Mapping[str, int] = field(default_factory=dict)
    drain: str | None = None
    placed_at: float | None = None


class _Lane(Lane):
    """One model's queue across the fleet (or the admin lane's): its slots are per backend."""

    __slots__ = ()

    def oldest(self) -> _Job | None:
        job: _Job | None = self.queue.oldest()
        return job


@dataclass(eq=False, slots=True)
class _Job:
    key: Hashable
    model: str
    client: str
    lane: _Lane
    submitted: float
    seq: int
    priority: int = 1  # rank in PRIORITIES
    front: float = 0.0  # when it became its client's next job of its class
    started: float | None = None
    host: _Host | None = None
    avoid: frozenset[str] = frozenset()  # backends that failed this job
    first_start: int | None = None  # the order in which it first started (see retry)


class _Host:
    """One backend: its configuration, the catalogue's view, and its places."""

    __slots__ = (
        "backend",
        "index",
        "view",
        "active",
        "running",
        "slice_start",
        "activations",
        "forced_switches",
        "admitted",
        "last_work",
        "unload",
        "read_at",
    )

    def __init__(self, backend: Backend, index: int) -> None:
        self.backend = backend
        self.index = index
        self.view = View()
        self.active: dict[str, _Lane] = {}  # models holding a place here, by activation
        self.running: dict[str, dict[Hashable, _Job]] = {}  # model -> its jobs running here
        self.slice_start = float("-inf")  # when a model last took a place here
        self.activations = 0
        self.forced_switches = 0
        self.admitted = 0
        self.last_work: dict[str, float] = {}  # model -> its last job start or end here
        # Idle models loaded here that a new place replaced: to unload (``take_unloads``).
        self.unload: dict[str, None] = {}
        self.read_at = float("-inf")  # when the catalogue's view last came (``observe``)

    @property
    def name(self) -> str:
        return self.backend.name

    def jobs(self) -> int:
        """Jobs running here, other gates' included."""
        return sum(len(jobs) for jobs in self.running.values()) + sum(self.view.others.values())

    def running_of(self, model: str) -> int:
        jobs = self.running.get(model)
        return len(jobs) if jobs else 0

    def busy_of(self, model: str) -> int:
        """Slots of ``model`` taken here, by this gate's jobs and other gates'."""
        return self.running_of(model) + self.view.others.get(model, 0)

    def others_active(self) -> set[str]:
        """Models other gates run here (they hold places too)."""
        return {name for name, n in self.view.others.items() if n > 0}

    def size_of(self, model: str) -> int:
        """Bytes ``model`` takes here: its loaded VRAM if known, else its installed size."""
        loaded = self.view.loaded.get(model)
        if loaded is not None:
            return loaded
        installed = self.view.installed
        return installed.get(model, 0) if installed is not None else 0

    def could_hold(self, model: str) -> bool:
        """Whether this backend may ever run ``model`` (health aside)."""
        installed = self.view.installed
        if installed is not None and model not in installed:
            return False
        if not self.backend.allows(model):
            return False
        vram = self.backend.vram
        return vram is None or self.size_of(model) <= vram

    def fits(self, model: str, others: Iterable[str]) -> bool:
        """Whether ``model`` fits in the VRAM budget alongside ``others``."""
        vram = self.backend.vram
        if vram is None:
            return True
        return sum(self.size_of(other) for other in set(others)) + self.size_of(model) <= vram


class FleetScheduler(JobBook):
    """Decides which jobs run on which backend, from events stamped with the caller's ``now``.

    Job ids are any hashable the caller picks, unique among live jobs. Methods that can
    start waiting jobs return their ids; ``backend_of`` says where each one runs.
    """

    # The book's jobs and lanes are this scheduler's own.
    _jobs: dict[Hashable, _Job]
    _waiting: OrderedDict[Hashable, _Job]
    _lanes: OrderedDict[str, _Lane]
    _queued: dict[str, _Lane]
    _admin: _Lane

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        overrides: Mapping[str, int] | None = None,
        queue_max: int = 512,
        queue_max_per_client: int = 32,
        queue_timeout: float = 300.0,
        switch_after: float = 10.0,
        admin_concurrency: int = 1,
        copy_depth: int = COPY_DEPTH,
        priority_aging: float = DEFAULT_AGING,
    ) -> None:
        if not backends:
            raise ValueError("a fleet needs at least one backend")
        if copy_depth < 1:
            raise ValueError(f"copy_depth must be 1 or more, not {copy_depth!r}")
        for backend in backends:
            if backend.max_models < 1 or backend.model_concurrency < 1:
                raise ValueError(f"backend {backend.name!r}: max_models and slots must be 1+")
        if len({backend.name for backend in backends}) != len(backends):
            raise ValueError("backend names must be distinct")
        super().__init__(
            queue_max=queue_max,
            queue_max_per_client=queue_max_per_client,
            queue_timeout=queue_timeout,
            switch_after=switch_after,
            admin_concurrency=admin_concurrency,
            priority_aging=priority_aging,
        )
        self.overrides = {normalize_model(model): n for model, n in (overrides or {}).items()}
        self.copy_depth = copy_depth
        self.concurrency = max(backend.model_concurrency for backend in backends)
        self._hosts = [_Host(backend, index) for index, backend in enumerate(backends)]
        self._by_name = {host.name: host for host in self._hosts}
        self._starts = 0  # jobs started for the first time (their first_start)

    @classmethod
    def from_settings(cls, settings: Any, backends: Sequence[Backend]) -> FleetScheduler:
        """A scheduler for ``backends`` configured from the gate's ``Settings``."""
        return cls(
            backends,
            overrides=settings.model_concurrency_overrides,
            queue_max=settings.queue_max,
            queue_max_per_client=settings.queue_max_per_client,
            queue_timeout=settings.queue_timeout,
            switch_after=settings.switch_after,
            admin_concurrency=settings.admin_concurrency,
            priority_aging=settings.priority_aging,
        )

    @property
    def backends(self) -> list[Backend]:
        return [host.backend for host in self._hosts]

    # Events

    def submit(
        self,
        job_id: Hashable,
        model: str,
        client: str,
        now: float,
        *,
        admin: bool = False,
        max_waiting: int | None = None,
        max_running: int | None = None,
        priority: str = DEFAULT_PRIORITY,
    ) -> Admission:
        """Add a job of class ``priority``: it runs at once or waits, or ClientShareFull /
        QueueFull is raised.

        ``max_waiting`` is the client's own share and ``max_running`` its cap on jobs
        running at once, all backends, models and the admin lane together, as in
        ``Scheduler.submit``.
        """
        job: _Job = self._new_job(_Job, job_id, model, client, now, admin=admin, priority=priority)
        lane, now = job.lane, job.submitted
        # Ahead of nobody: only where no job that may run there waits in its lane already
        # (jobs placed again may not go back where they failed: ``_choose``).
        may_start = self._clients.recap(client, max_running) and (
            self._oldest_ready(lane) is None or bool(self._avoid(lane))
        )
        if admin:
            if may_start and len(lane.running) < self.admin_concurrency:
                self._start(job, now)
                self._clients[client].max_running = max_running
                return Admission.RUNNING
        elif may_start:
            ranks: list[float | None] = [None] * len(PRIORITIES)
            ranks[job.priority] = now
            reserved = self._reserved(lane, (self._due(ranks), job.seq))
            choice = self._choose(lane, now, reserved, new_job=True)
            if choice is not None:
                host, forced = choice
                if lane.name not in host.active:
                    self._activate(lane, host, now, forced=forced)
                self._start(job, now, host)
                self._clients[client].max_running = max_running
                return Admission.RUNNING
        return self._wait(job, max_waiting, max_running)

    def retry(self, job_id: Hashable, now: float, *, avoid: bool = True) -> list[Hashable]:
        """A running job's backend failed before answering: the job waits again in its place.

        It keeps its arrival order and is never placed on that backend again (with
        ``avoid`` False it may be: shared mode's refused grant, fleet/shared.py); it may
        start at once elsewhere (it is then among the ids returned). Unknown or waiting
        ids are ignored.
        """
        now = self._advance(now)
        job = self._jobs.get(job_id)
        if job is None or job.started is None or job.host is None:
            return []
        failed = job.host
        cap = self._clients[job.client].max_running  # kept, though it was its only job
        self._stop(job, now, count=False)
        job.started = None
        if avoid:
            job.avoid = job.avoid | {failed.name}
        elif not failed.running_of(job.lane.name):
            failed.active.pop(job.lane.name, None)  # the place it just took is not had
        job.lane.admitted -= 1
        failed.admitted -= 1
        self._admitted -= 1
        self._enqueue(job, now)
        self._clients[job.client].max_running = cap
        self._restore_order(job, now)
        return self._pump(now)

    def observe(self, name: str, view: View, now: float) -> list[Hashable]:
        """The catalogue's latest view of backend ``name``; return the jobs it lets start.

        Jobs running on a backend that turned unhealthy keep their slots until they end.
        """
        now = self._advance(now)
        host = self._by_name[name]
        normalized = View(
            healthy=view.healthy,
            installed=(
                None
                if view.installed is None
                else {normalize_model(m): size for m, size in view.installed.items()}
            ),
            loaded={normalize_model(m): size for m, size in view.loaded.items()},
            others={normalize_model(m): n for m, n in view.others.items() if n > 0},
            drain=normalize_model(view.drain) if view.drain else None,
            placed_at=view.placed_at,
        )
        host.view = normalized
        host.read_at = now
        for name in [name for name in host.unload if not self._resident(host, name)]:
            del host.unload[name]
        return self._pump(now)

    def drop_unavailable(self, now: float) -> tuple[list[Hashable], list[Hashable]]:
        """Drop waiting jobs that no healthy backend could run; return (those jobs, the
        jobs started).

        A job stays while some healthy backend allows its model, has it installed (or is
        not read yet) and did not fail it; the others are counted under
        "model_unavailable". Running jobs are not touched. The caller calls this when
        the catalogue's view changes (after ``observe``).
        """
        now = self._advance(now)
        dropped: list[Hashable] = []
        runnable: dict[tuple[str, frozenset[str]], bool] = {}
        for job in list(self._waiting.values()):
            if job.lane.admin:
                continue
            key = (job.lane.name, job.avoid)
            ok = runnable.get(key)
            if ok is None:
                ok = runnable[key] = any(
                    self._eligible(host, job.lane, job.avoid) for host in self._hosts
                )
            if not ok:
                self._dequeue(job, now)
                self._reject(job.lane, UNAVAILABLE)
                dropped.append(job.key)
        return dropped, self._pump(now) if dropped else []

    def tick(self, now: float) -> list[Hashable]:
        """Re-apply the rules at ``now``; return the jobs started.

        A timer calls this at deadlines, and the caller after a job had to wait: a queue
        grown deep enough opens a copy of its model on another backend.
        """
        return self._pump(self._advance(now))

    def elsewhere(
        self, counts: Mapping[str, int], now: float, *, every: bool = True
    ) -> list[Hashable]:
        """Clients' jobs running in other gates (shared mode, fleet/shared.py): they count
        towards each client's running cap as its jobs here do. ``counts`` is every such
        client's (those not in it run none there), or with ``every`` False only the named
        clients'. Return the jobs it lets start (a client below its cap again)."""
        now = self._advance(now)
        known = self._clients.elsewhere
        fresh = {client: n for client, n in counts.items() if n > 0}
        if not every:
            fresh = {**{c: n for c, n in known.items() if c not in counts}, **fresh}
        if fresh == known:
            return []
        self._clients.elsewhere = fresh
        return self._pump(now)

    # Queries

    def elsewhere_of(self, client: str) -> int:
        """``client``'s jobs running in other gates, as last told (``elsewhere``)."""
        return self._clients.elsewhere.get(client, 0)

    def backend_of(self, job_id: Hashable) -> Backend | None:
        """The backend a running job was placed on (None: waiting, admin, or unknown)."""
        job = self._jobs.get(job_id)
        if job is None or job.host is None:
            return None
        return job.host.backend

    def take_unloads(self, name: str) -> list[str]:
        """Models that new places on backend ``name`` replaced, to unload there now.

        Each was resident there (``_resident``), idle, and chosen to make way when a model
        that was not loaded took a place (the idle models no job waits for first, then the
        least recently used). A model is returned once, and never while it has a place
        (running jobs) there.
        """
        host = self._by_name[name]
        models = [
            model
            for model in host.unload
            if model not in host.active
            and model not in host.view.others
            and self._resident(host, model)
        ]
        host.unload.clear()
        return models

    def next_deadline(self) -> float | None:
        """The earliest time at which ``expire`` or a pending switch could change anything."""
        deadlines = []
        oldest = next(iter(self._waiting.values()), None)
        if oldest is not None:
            deadlines.append(oldest.submitted + self.queue_timeout)
        for host in self._hosts:
            due = self._switch_due(host)
            if due is not None and due[1] > self._now:
                deadlines.append(due[1])
            if oldest is not None:
                # A place held for an idle model frees for waiting work when its hold ends.
                deadlines.extend(self._held(host, self._now).values())
        return min(deadlines, default=None)

    def draining(self, now: float) -> dict[str, str]:
        """The backends a switch is due on at ``now``, each with the model it drains for."""
        now = max(now, self._now)
        return {host.name: lane.name for host in self._hosts if (lane := self._target(host, now))}

    def pending_switch(self, now: float) -> tuple[str, list[str]] | None:
        """The oldest model a switch is due for and the models draining for it, if any."""
        return self._pending(self._targets(max(now, self._now)))

    def _targets(self, now: float) -> list[tuple[_Host, _Lane | None]]:
        """Each backend with the model it drains for at ``now`` (``_target``)."""
        return [(host, self._target(host, now)) for host in self._hosts]

    def _pending(self, targets: list[tuple[_Host, _Lane | None]]) -> tuple[str, list[str]] | None:
        """``pending_switch`` from the backends' ``_targets``."""
        draining = [(host, lane) for host, lane in targets if lane]
        if not draining:
            return None
        target = min((lane for _, lane in draining), key=self._order)
        models = {name for host, lane in draining if lane is target for name in host.active}
        return target.name, sorted(models)

    def retry_after(self, now: float, model: str | None = None, *, admin: bool = False) -> float:
        """Seconds a turned-away client should wait (as ``Scheduler.retry_after``)."""
        if admin:
            return self._lane_estimate(self._admin)
        if model is not None:
            lane = self._lanes.get(normalize_model(model))
            if lane is not None:
                return self._lane_estimate(lane)
        waiting = len(self._waiting) - len(self._admin.queue)
        slots = (
            sum(self._slots(host, name) for host in self._hosts for name in host.active)
            or self.concurrency
        )
        return self._estimate(self._avg_seconds, waiting, slots)

    def snapshot(self, now: float) -> QueueSnapshot:
        """Plain data for the status page, in ``Scheduler.snapshot``'s shape plus ``backends``."""
        now = max(now, self._now)
        self._evict_idle(now)
        targets = self._targets(now)  # once: each takes a pass over the waiting models
        switch = self._pending(targets)
        target = self._lanes.get(switch[0]) if switch is not None else None
        draining = {name for host, lane in targets if lane for name in host.active}
        active = self._active_models()
        models = {
            name: self._lane_snapshot(lane, now, name in active, name in draining)
            for name, lane in sorted(self._lanes.items())
        }
        return {
            "models": models,
            "admin": self._lane_snapshot(self._admin, now, False, False),
            "clients": self._client_rows(),
            "totals": {
                "running": sum(count.running for count in self._clients.values()),
                "waiting": len(self._waiting),
                "admitted": self._admitted,
                "rejected": dict(self._rejected),
                "active_models": sorted(active),
                "max_active_models": sum(host.backend.max_models for host in self._hosts),
                "queue_max": self.queue_max,
                "queue_max_per_client": self.queue_max_per_client,
                "activations": sum(host.activations for host in self._hosts),
                "forced_switches": sum(host.forced_switches for host in self._hosts),
                "avg_seconds": self._avg_seconds,
                "reaped": 0,
                "counted_again": 0,
            },
            "switch": {
                "pending": target is not None,
                "target": target.name if target is not None else None,
                "waited": self._wait_of(target, now) if target is not None else 0.0,
                "draining": sorted(draining),
            },
            "priorities": self._class_rows(),
            "retry_after": self.retry_after(now),
            "closed": False,
            "shared": False,
            "fallback": False,
            "backends": [self._host_snapshot(host, lane) for host, lane in targets],
        }

    # The rules

    def _slots(self, host: _Host, model: str) -> int:
        return self.overrides.get(model, host.backend.model_concurrency)

    def _eligible(self, host: _Host, lane: _Lane, avoid: frozenset[str] = frozenset()) -> bool:
        return host.view.healthy and host.name not in avoid and host.could_hold(lane.name)

    def _open(self, host: _Host, lane: _Lane, avoid: frozenset[str] = frozenset()) -> bool:
        """Eligible, and not drained by another gate for another model (shared mode)."""
        drain = host.view.drain
        return (drain is None or drain == lane.name) and self._eligible(host, lane, avoid)

    def _placed_on(self, lane: _Lane) -> list[_Host]:
        """The healthy backends where ``lane`` holds a place (a failed one's do not count)."""
        return [host for host in self._hosts if lane.name in host.active and host.view.healthy]

    def _placed_for(self, lane: _Lane) -> list[_Host]:
        """``_placed_on``, or none if its oldest waiting job (whose client may run) failed
        on every one of them: for a job placed again, places its model has only where it
        failed are none, and the model takes a new place (or a switch) for it as a model
        with no place does."""
        placed = self._placed_on(lane)
        return placed if self._not_failed_on(lane, placed) else []

    def _not_failed_on(self, lane: _Lane, hosts: list[_Host]) -> list[_Host]:
        """``hosts`` less the backends ``lane``'s oldest waiting job (whose client may run)
        failed on once."""
        if not hosts:
            return hosts
        job = self._oldest_ready(lane)
        if job is None or not job.avoid:
            return hosts
        return [host for host in hosts if host.name not in job.avoid]

    def _target(self, host: _Host, now: float) -> _Lane | None:
        """The model ``host`` drains for at ``now``, if a switch is due there."""
        due = self._switch_due(host)
        if due is None or due[1] > now:
            return None
        return due[0]

    def _switch_due(self, host: _Host) -> tuple[_Lane, float] | None:
        """The oldest waiting model ``host`` could run that has no place anywhere, and when
        it may force a switch there (None if there is no such model, or it has room here)."""
        lane = self._oldest_unplaced(host)
        if lane is None:
            return None
        if self._room(host, lane, self._now):
            return None  # it takes the room at the next pump, no switch needed
        placed_at = host.view.placed_at
        slice_start = host.slice_start if placed_at is None else max(host.slice_start, placed_at)
        return lane, self._due(lane.queue.arrivals(self._clients.may_run), slice_start)

    def _due(self, arrivals: list[float | None], slice_start: float | None = None) -> float:
        """When a model whose oldest jobs per class arrived at ``arrivals`` may force a
        switch on a backend whose last new place was at ``slice_start`` (by default the
        fleet's earliest): workqueue.core.switch_due."""
        if slice_start is None:
            slice_start = min(host.slice_start for host in self._hosts)
        return switch_due(arrivals, slice_start, self.switch_after, self.priority_aging)

    def _order(self, lane: _Lane) -> tuple[float, int]:
        """Waiting models go in this order: whose switch falls due first, then oldest job.

        Jobs of clients at their running cap count for neither (a lane of only such jobs
        goes last)."""
        oldest = self._oldest_ready(lane)
        seq = oldest.seq if oldest is not None else 1 << 62
        return (self._due(lane.queue.arrivals(self._clients.may_run)), seq)

    def _oldest_ready(self, lane: _Lane) -> _Job | None:
        """``lane``'s oldest waiting job whose client is below its running cap."""
        job: _Job | None = lane.queue.oldest_ready(None, self._clients.may_run)
        return job

    def _avoid(self, lane: _Lane) -> frozenset[str]:
        """The backends that every waiting job of ``lane`` whose client is below its cap
        failed once (``retry``): the lane may take any other, for the jobs that may run
        there. Only a job placed again avoids any: usually the oldest avoids none."""
        job = self._oldest_ready(lane)
        if job is None or not job.avoid:
            return frozenset()
        avoid = job.avoid
        may_run = self._clients.may_run
        for other in lane.queue.jobs.values():
            if other.avoid != avoid and may_run(other.client):
                avoid = avoid & other.avoid
                if not avoid:
                    break
        return avoid

    def _waits_for(self, model: str) -> bool:
        """Whether a job that may run (its client below its cap) waits for ``model``."""
        lane = self._queued.get(model)
        return lane is not None and self._oldest_ready(lane) is not None

    def _oldest_unplaced(self, host: _Host) -> _Lane | None:
        best: _Lane | None = None
        best_order: tuple[float, int] | None = None  # best's _order, once asked for
        for lane in self._queued.values():
            order = None
            if best is not None:
                if best_order is None:
                    best_order = self._order(best)
                order = self._order(lane)
                if order > best_order:
                    continue
            if self._placed_for(lane):
                continue
            job = self._oldest_ready(lane)
            if job is not None and self._open(host, lane, self._avoid(lane)):
                best, best_order = lane, order
        return best

    def _room(self, host: _Host, lane: _Lane, now: float, *, forced: bool = False) -> bool:
        """Whether ``lane`` may take a new place on ``host`` now (count and VRAM).

        Idle models held there (``_held``) keep their places, as if they still ran,
        unless ``lane`` is loaded there already (it replaces none of them) or a switch
        to ``lane`` is due (``forced``).
        """
        others = set(host.active) | host.others_active()
        if not forced and lane.name not in host.view.loaded:
            held = self._held(host, now)
            if not self._placed_for(lane):
                # A model with no place goes ahead of a copy: an idle copy holds nothing.
                held = {
                    name: until for name, until in held.items() if not self._elsewhere(name, host)
                }
            others.update(held)
        others.discard(lane.name)
        return len(others) < host.backend.max_models and host.fits(lane.name, others)

    def _held(self, host: _Host, now: float) -> dict[str, float]:
        """Idle models loaded on ``host`` that had work there within ``switch_after``, each
        with the time its hold runs out.

        Such a model keeps its place for its own next jobs as a running one does: another
        model replaces it only once it has had no work for ``switch_after``, or by a
        switch (a job of the other model waited ``switch_after``). Loaded means listed
        by the last ``/api/ps`` reading, or, on a backend the catalogue has read, having
        had a job there since that reading (a model that loaded and served before the
        next reading is no less loaded). A backend whose models are unknown holds none.
        """
        held: dict[str, float] = {}
        names = list(host.view.loaded)
        if host.view.installed is not None:
            names += [
                name
                for name, when in host.last_work.items()
                if when > host.read_at and name not in host.view.loaded
            ]
        for name in names:
            if name in host.active:
                continue
            until = host.last_work.get(name, float("-inf")) + self.switch_after
            if until > now:
                held[name] = until
        return held

    def _elsewhere(self, model: str, host: _Host) -> bool:
        """Whether ``model`` holds a place on a healthy backend other than ``host``."""
        return any(
            model in other.active and other.view.healthy
            for other in self._hosts
            if other is not host
        )

    def _unplaced_could(self, host: _Host, lane: _Lane, now: float) -> bool:
        """Whether a waiting model with no place anywhere could take a place on ``host``
        without ``lane`` there, and not with it (count and VRAM, held models counted)."""
        occupants = set(host.active) | host.others_active()
        occupants.update(name for name in self._held(host, now) if not self._elsewhere(name, host))
        without = occupants - {lane.name}
        for other in self._queued.values():
            if other is lane or self._placed_for(other):
                continue
            job = self._oldest_ready(other)
            if job is None or not self._open(host, other, self._avoid(other)):
                continue
            rest = without - {other.name}
            if len(rest) < host.backend.max_models and host.fits(other.name, rest):
                rest.add(lane.name)
                if len(rest) >= host.backend.max_models or not host.fits(other.name, rest):
                    return True
        return False

    def _yields(self, host: _Host, lane: _Lane, now: float) -> bool:
        """Whether ``lane``'s place on ``host`` is a copy that gives way: ``lane`` has a
        place on another healthy backend too (one its oldest job did not fail on), this
        is not its home (the backend where most of its jobs run, then the first
        configured), and a waiting model with no place could take this one
        (``_unplaced_could``). Its jobs then start at home, and the place goes to that
        model once its jobs here end."""
        if lane.admin or lane.name not in host.active:
            return False
        placed = self._not_failed_on(lane, self._placed_on(lane))
        if len(placed) < 2 or host not in placed:
            return False
        home = max(placed, key=lambda other: (other.running_of(lane.name), -other.index))
        return host is not home and self._unplaced_could(host, lane, now)

    def _tier(self, host: _Host, lane: _Lane) -> int:
        if lane.name in host.active or lane.name in host.view.loaded:
            return TIER_LOADED
        if lane.name in host.view.others:  # other gates run it there
            return TIER_LOADED
        resident = set(host.active) | set(host.view.loaded) | host.others_active()
        if len(resident) < host.backend.max_models and host.fits(lane.name, resident):
            return TIER_ROOM
        return TIER_EVICT

    def _reserved(self, lane: _Lane, key: tuple[float, int]) -> set[str]:
        """Backends reserved by waiting models ahead of ``lane``'s next job (whose order is
        ``key``), with no place."""
        reserved: set[str] = set()
        for other in self._queued.values():
            if other is lane or self._order(other) > key:
                continue
            if self._placed_for(other):
                continue
            oldest = self._oldest_ready(other)
            if oldest is None:
                continue  # only jobs of clients at their running cap: they reserve nothing
            avoid = self._avoid(other)
            reserved.update(host.name for host in self._hosts if self._open(host, other, avoid))
        return reserved

    def _choose(
        self,
        lane: _Lane,
        now: float,
        reserved: set[str],
        targets: Mapping[str, _Lane | None] | None = None,
        *,
        new_job: bool = False,
    ) -> tuple[_Host, bool] | None:
        """The best backend for ``lane``'s next job and whether taking it forces a switch.

        A new job (``new_job``) goes ahead of nobody: only backends where it may start
        without a place that an older job should get, and where none of its lane's
        waiting jobs may run (a job placed again may not where it failed). ``targets``
        are the models each backend drains for, as found before the places that just
        freed were given up.
        """
        avoid = self._avoid(lane)
        only: frozenset[str] | None = None  # the backends a new job may take
        if new_job:
            if self._oldest_ready(lane) is not None:
                only = avoid
                if not only:
                    return None
            avoid = frozenset()
        placed = self._placed_for(lane)
        depth = lane.queue.count_ready(self._clients.may_run) + (1 if new_job else 0)
        running_slots = sum(self._slots(host, lane.name) for host in placed)
        best: tuple[tuple[float, ...], _Host, bool] | None = None
        for host in self._hosts:
            if not self._open(host, lane, avoid) or (only is not None and host.name not in only):
                continue
            target = targets[host.name] if targets is not None else self._target(host, now)
            if lane.name in host.active or lane.name in host.view.others:
                # Running here (other gates' jobs included): its free slots are its own.
                if target is not None or host.busy_of(lane.name) >= self._slots(host, lane.name):
                    continue
                if self._yields(host, lane, now):
                    continue
                tier = TIER_LOADED
                forced = False
            else:
                if target is not None and target is not lane:
                    continue
                # A model held idle here takes its place back ahead of older models.
                if host.name in reserved and lane.name not in self._held(host, now):
                    continue
                if not self._room(host, lane, now, forced=target is lane):
                    continue
                tier = self._tier(host, lane)
                if placed and self._unplaced_could(host, lane, now):
                    continue  # a model with no place goes ahead of a copy
                if placed and tier != TIER_LOADED:
                    # A copy loads the model only for a deep queue, and evicts only idle
                    # models that no job waits for.
                    if depth < self.copy_depth * running_slots:
                        continue
                    if tier == TIER_EVICT and any(
                        self._waits_for(name)
                        for name in host.view.loaded
                        if name not in host.active
                    ):
                        continue
                forced = target is lane
            key = (tier, (host.jobs() + 1) / host.backend.weight, host.index)
            if best is None or key < best[0]:
                best = (key, host, forced)
        if best is None:
            return None
        return best[1], best[2]

    def _pump(self, now: float) -> list[Hashable]:
        """Start every job the rules allow at ``now``; return their ids in start order."""
        started: list[Hashable] = []
        self._fill_admin(now, started)
        while True:
            targets = {host.name: self._target(host, now) for host in self._hosts}
            for host in self._hosts:
                if targets[host.name] is None:
                    # Affinity: models running here (even one that just drained) go on.
                    for lane in list(host.active.values()):
                        self._fill(host, lane, now, started)
                for name in [name for name in host.active if not host.running_of(name)]:
                    del host.active[name]
            if not self._place_one(now, started, targets):
                break
        return started

    def _place_one(
        self, now: float, started: list[Hashable], targets: Mapping[str, _Lane | None]
    ) -> bool:
        """Give one waiting model a new place, oldest first; False if none can have one."""
        reserved: set[str] = set()
        for lane in sorted(self._queued.values(), key=self._order):
            oldest = self._oldest_ready(lane)
            if oldest is None:
                continue  # only jobs of clients at their running cap: no place, no reserve
            choice = self._choose(lane, now, reserved, targets)
            if choice is not None:
                host, forced = choice
                if lane.name not in host.active:
                    self._activate(lane, host, now, forced=forced)
                before = len(started)
                self._fill(host, lane, now, started)
                return len(started) > before
            if not self._placed_for(lane):
                # Younger models take no new place where this one could run; a backend
                # draining for a switch gives its next place to its target anyway.
                avoid = self._avoid(lane)
                reserved.update(
                    host.name
                    for host in self._hosts
                    if targets[host.name] is None and self._open(host, lane, avoid)
                )
        return False

    def _fill(self, host: _Host, lane: _Lane, now: float, started: list[Hashable]) -> None:
        """Start ``lane``'s waiting jobs on ``host`` up to its slots there, clients in turn.

        A client whose waiting jobs all failed on ``host`` once keeps its turn for another
        backend.
        """
        if not host.view.healthy:
            return
        if host.view.drain is not None and host.view.drain != lane.name:
            return
        if self._yields(host, lane, now):
            return
        slots = self._slots(host, lane.name)
        while lane.queue and host.busy_of(lane.name) < slots:
            job: _Job | None = lane.queue.pick(
                now,
                self.priority_aging,
                self._clients.may_run,
                eligible=lambda job: host.name not in job.avoid,
            )
            if job is None:
                return
            self._dequeue(job, now, take=True)
            self._start(job, now, host)
            started.append(job.key)

    def _fill_admin(self, now: float, started: list[Hashable]) -> None:
        lane = self._admin
        while lane.queue and len(lane.running) < self.admin_concurrency:
            job: _Job | None = lane.queue.pick(now, self.priority_aging, self._clients.may_run)
            if job is None:
                return
            self._dequeue(job, now, take=True)
            self._start(job, now)
            started.append(job.key)

    def _activate(self, lane: _Lane, host: _Host, now: float, *, forced: bool) -> None:
        resumed = not forced and (
            lane.name in self._held(host, now) or lane.name in host.view.others
        )
        self._replace(host, lane)
        host.unload.pop(lane.name, None)
        host.active[lane.name] = lane
        if resumed:
            return  # a held model takes its place back: the same slice goes on
        host.slice_start = now
        host.activations += 1
        if forced:
            host.forced_switches += 1

    def _resident(self, host: _Host, model: str) -> bool:
        """Whether ``model`` is loaded on ``host`` as far as the gate knows: per the last
        ``/api/ps``, or it had a job there within ``switch_after`` (loaded since the last
        reading, maybe; Ollama keeps a model loaded after its jobs)."""
        return model in host.view.loaded or model in host.last_work

    def _replace(self, host: _Host, lane: _Lane) -> None:
        """Note the idle models resident on ``host`` that must make way for ``lane`` to be
        loaded there beside the rest: models no job waits for first, then the least
        recently used. (``lane`` itself may be resident per a stale ``/api/ps`` reading;
        what ran there since counts too.)"""
        resident = set(host.view.loaded) | set(host.last_work)
        busy = set(host.active) | host.others_active()  # other gates' jobs run there too
        kept = resident | busy
        idle = sorted(
            (name for name in resident if name not in busy and name != lane.name),
            key=lambda name: (name in self._queued, host.last_work.get(name, float("-inf"))),
        )
        for name in idle:
            if len(kept) < host.backend.max_models and host.fits(lane.name, kept):
                break
            kept.discard(name)
            host.unload[name] = None

    # Bookkeeping

    def _active_models(self) -> set[str]:
        return {name for host in self._hosts for name in host.active}

    def _new_lane(self, model: str, *, admin: bool = False) -> _Lane:
        return _Lane(model, admin=admin)

    def _restore_order(self, job: _Job, now: float) -> None:
        """Put a job that waits again back in its place: at its arrival place, and ahead of
        its lane's jobs that never started (``LaneQueue.put_back``)."""
        items = sorted(self._waiting.values(), key=lambda other: other.seq)
        self._waiting.clear()
        self._waiting.update((other.key, other) for other in items)
        assert job.first_start is not None
        job.lane.queue.put_back(job, now, job.first_start)

    def _start(self, job: _Job, now: float, host: _Host | None = None) -> None:
        """Start ``job`` on ``host`` (None: the admin lane's, on no backend)."""
        if job.first_start is None:
            self._starts += 1
            job.first_start = self._starts
        job.host = host
        if host is not None:
            host.running.setdefault(job.lane.name, {})[job.key] = job
            host.admitted += 1
            self._worked(host, job.lane.name, now)
        super()._start(job, now)

    def _stop(self, job: _Job, now: float, *, count: bool = True) -> None:
        host = job.host
        if host is not None:
            jobs = host.running[job.lane.name]
            del jobs[job.key]
            if not jobs:
                del host.running[job.lane.name]
            if count:
                self._worked(host, job.lane.name, now)
        job.host = None
        super()._stop(job, now, count=count)

    def _worked(self, host: _Host, model: str, now: float) -> None:
        """Note that ``model`` had work on ``host`` at ``now``; forget holds run out."""
        stale = now - self.switch_after
        for name in [name for name, when in host.last_work.items() if when <= stale]:
            del host.last_work[name]
        host.last_work[model] = now

    # Estimates and reports

    def _lane_slots(self, lane: _Lane) -> int:
        if lane.admin:
            return self.admin_concurrency
        placed = self._placed_on(lane)
        if placed:
            return sum(self._slots(host, lane.name) for host in placed)
        return max(self._slots(host, lane.name) for host in self._hosts)

    def _lane_estimate(self, lane: _Lane) -> float:
        return self._estimate(
            lane.avg_seconds or self._avg_seconds, len(lane.queue), self._lane_slots(lane)
        )

    def _lane_snapshot(self, lane: _Lane, now: float, active: bool, draining: bool) -> LaneSnapshot:
        return {
            "running": len(lane.running),
            "slots": self._lane_slots(lane),
            "waiting": len(lane.queue),
            "oldest_wait": self._wait_of(lane, now),
            "clients_waiting": lane.queue.clients(),
            "admitted": lane.admitted,
            "rejected": dict(lane.rejected),
            "avg_seconds": lane.avg_seconds,
            "active": active and not lane.admin,
            "draining": draining and not lane.admin,
        }

    def _host_snapshot(self, host: _Host, target: _Lane | None) -> dict[str, Any]:
        backend = host.backend
        return {
            "name": backend.name,
            "healthy": host.view.healthy,
            "max_models": backend.max_models,
            "vram": backend.vram,
            "vram_used": sum(host.view.loaded.values()),
            "loaded": sorted(host.view.loaded),
            "models": {
                name: {"running": host.busy_of(name), "slots": self._slots(host, name)}
                for name in sorted(set(host.active) | set(host.running) | host.others_active())
            },
            "running": host.jobs(),
            "draining_for": target.name if target is not None else None,
            "activations": host.activations,
            "forced_switches": host.forced_switches,
            "admitted": host.admitted,
        }
