"""The work queue's scheduling core: who runs next, decided without clocks, sockets or sleeps.

Every method takes the current monotonic time ``now`` from its caller, so tests drive the
rules step by step and the gevent layer (``gate.py``) only carries events in and out.

Rules (DESIGN.md, "Scheduling rules"), as implemented here:

* A model runs at most its concurrency; at most ``max_active_models`` models hold a place.
  A model holds a place while it has running jobs.
* When a slot frees, models already running take their own waiting jobs first (affinity).
  A place that frees goes to the non-running model whose oldest job has waited longest.
* Switch: once the oldest waiting non-running model has waited ``switch_after``, running
  models take no new jobs and drain; the first place freed goes to that model. Its wait is
  counted from its oldest job's arrival or from the last time a model took a place,
  whichever is later, so a model switched in runs at least ``switch_after`` before it can
  be made to drain: without that, two busy models would swap after every batch.
* Within a model (and in the admin lane) clients take turns round-robin.
* A client with a running cap (its API key's ``max_running``) at its cap takes no turn:
  its waiting jobs stay where they are while other clients' jobs run, and they neither
  hold a slot nor win a model a place or a switch until one of its jobs ends.
* The admin lane has its own ``admin_concurrency`` slots and takes no model place.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict

from endpoints import normalize_model
from errors import ClientShareFull, QueueFull

if TYPE_CHECKING:
    from pipeline import ClientGone

# Why the queue turned a job away: the first three are the error codes its client got
# (errors.py: 503 queue_full, 429 client_queue_full, 503 queue_timeout); "cancelled" is
# a job dropped without an answer from the queue (its client left, or shutdown).
REASONS = ("queue_full", "client_queue_full", "queue_timeout", "cancelled")
ADMIN_LANE = "admin"

# Retry-After estimate: an exponentially weighted moving average of how long jobs held
# their slot, weighted this much towards the newest; DEFAULT_JOB_SECONDS stands in
# before any job has finished.
EWMA_WEIGHT = 0.2
DEFAULT_JOB_SECONDS = 10.0

# Idle models are kept for their counters and Retry-After estimates, but model names come
# from request bodies: an idle model is forgotten IDLE_MODEL_SECONDS after its last job,
# and at most MAX_IDLE_MODELS idle ones are kept (least recently used go first).
MAX_IDLE_MODELS = 16
IDLE_MODEL_SECONDS = 300.0


# The work queue's interface: WorkQueue (one process) and SharedWorkQueue (through Redis)
# both are a JobQueue, and their snapshots have the same fields.


class LaneSnapshot(TypedDict):
    """One model's slots and queue (or the admin lane's)."""

    running: int
    slots: int
    waiting: int
    #: Seconds the lane's oldest waiting job has waited (0 when none waits).
    oldest_wait: float
    clients_waiting: int
    #: Jobs started in this lane; None where it is not counted (shared through Redis).
    admitted: int | None
    #: Jobs turned away or dropped, by reason (REASONS); None where not counted.
    rejected: dict[str, int] | None
    #: Moving average of how long this lane's jobs held their slot; None: no estimate.
    avg_seconds: float | None
    #: Holds one of the GATE_MAX_ACTIVE_MODELS places (always False for the admin lane).
    active: bool
    #: Takes no new job because a switch to another model is due.
    draining: bool


class ClientSnapshot(TypedDict):
    waiting: int
    running: int


class TotalsSnapshot(TypedDict):
    running: int
    waiting: int
    admitted: int
    #: Jobs turned away or dropped, by reason: every name of REASONS.
    rejected: dict[str, int]
    active_models: list[str]
    max_active_models: int
    queue_max: int
    queue_max_per_client: int
    activations: int
    forced_switches: int
    avg_seconds: float | None
    #: Jobs whose lease lapsed (shared through Redis only; 0 in one process).
    reaped: int
    #: Running jobs counted in Redis again after it had lost them (0 in one process).
    counted_again: int


class SwitchSnapshot(TypedDict):
    pending: bool
    target: str | None
    waited: float
    draining: list[str]


class QueueSnapshot(TypedDict):
    """A work queue's state for the status page and /metrics, the same in every mode."""

    models: dict[str, LaneSnapshot]
    admin: LaneSnapshot
    clients: dict[str, ClientSnapshot]
    totals: TotalsSnapshot
    switch: SwitchSnapshot
    #: Seconds a client turned away now would be told to wait.
    retry_after: float
    #: Shutting down: new and waiting jobs are turned away.
    closed: bool
    #: The state shared by every worker and host through Redis.
    shared: bool
    #: Redis is configured but out of reach: this process admits with its own slots.
    fallback: bool
    #: Several backends only (fleet/runtime.py): per backend, its health, loaded models
    #: and running/slots per model (docs/STATUS.md).
    backends: NotRequired[list[dict[str, Any]]]


class JobSlot(Protocol):
    """A running job's hold on a slot; ``release()`` it on every path."""

    job_id: Hashable
    model: str
    client: str
    admin: bool
    #: Seconds the job waited for its slot.
    waited: float

    @property
    def released(self) -> bool: ...

    def release(self) -> None: ...


class JobQueue(Protocol):
    """Per-model slots and a fair, bounded queue that greenlets wait in."""

    def acquire(
        self,
        model: str,
        client: str,
        *,
        admin: bool = False,
        client_gone: ClientGone | None = None,
        max_waiting: int | None = None,
        max_running: int | None = None,
    ) -> JobSlot:
        """Block until the job may run and return its slot.

        ``max_waiting`` is the client's own queue share (its API key's ``max_waiting``),
        in place of GATE_QUEUE_MAX_PER_CLIENT; ``max_running`` caps its jobs running at
        once (its key's ``max_running``).

        Raises QueueFull, ClientShareFull, QueueTimeout or ShuttingDown (GateErrors with
        ``retry_after``), or ClientGone once ``client_gone`` is set while waiting.
        """
        ...

    def snapshot(self) -> QueueSnapshot: ...

    def retry_after(self, model: str | None = None, *, admin: bool = False) -> float:
        """Seconds a turned-away client should wait (``estimate_wait``)."""
        ...

    def idle(self) -> bool:
        """Whether this process holds no slot and has no job waiting."""
        ...

    def close(self) -> None:
        """Turn away every waiting and new job with ShuttingDown; held slots stay valid."""
        ...


def estimate_wait(avg_seconds: float | None, waiting: int, slots: int, limit: float) -> float:
    """Retry-After: seconds until a job behind ``waiting`` others gets one of ``slots``.

    avg_seconds (a moving average of slot hold times, DEFAULT_JOB_SECONDS when None) ×
    (waiting + 1) ÷ slots, clamped to 1 .. ``limit`` (the queue timeout).
    """
    seconds = (avg_seconds or DEFAULT_JOB_SECONDS) * (waiting + 1) / max(1, slots)
    return min(max(seconds, 1.0), max(1.0, limit))


def ewma(avg: float | None, value: float) -> float:
    """The moving average ``avg`` with ``value`` added (EWMA_WEIGHT towards the newest)."""
    return value if avg is None else avg + EWMA_WEIGHT * (value - avg)


class Admission(enum.Enum):
    """What ``Scheduler.submit`` decided for a new job."""

    RUNNING = "running"
    WAITING = "waiting"


class _Lane:
    """One model's slots and queue (or the admin lane's)."""

    __slots__ = (
        "name",
        "slots",
        "admin",
        "running",
        "waiting",
        "turns",
        "admitted",
        "rejected",
        "avg_seconds",
        "touched",
    )

    def __init__(self, name: str, slots: int, *, admin: bool = False) -> None:
        self.name = name
        self.slots = slots
        self.admin = admin
        self.running: dict[Hashable, _Job] = {}
        # Waiting jobs in arrival order (the first is the oldest) ...
        self.waiting: OrderedDict[Hashable, _Job] = OrderedDict()
        # ... and the same jobs by client, clients in turn order (round-robin).
        self.turns: OrderedDict[str, OrderedDict[Hashable, _Job]] = OrderedDict()
        self.admitted = 0
        self.rejected = dict.fromkeys(REASONS, 0)
        self.avg_seconds: float | None = None
        self.touched = float("-inf")  # when a job of this lane last came or went

    def oldest(self) -> _Job | None:
        return next(iter(self.waiting.values()), None)

    def busy(self) -> bool:
        return bool(self.running or self.waiting)


@dataclass(eq=False, slots=True)
class _Job:
    key: Hashable
    model: str
    client: str
    lane: _Lane
    submitted: float
    seq: int
    started: float | None = None


@dataclass(slots=True)
class _ClientCount:
    waiting: int = 0
    running: int = 0
    max_running: int | None = None  # the latest cap its jobs came with (None: no cap)

    def may_run(self) -> bool:
        """Whether one more of its jobs may start."""
        return self.max_running is None or self.running < self.max_running


class Scheduler:
    """Decides which jobs run, from events stamped with the caller's monotonic ``now``.

    Job ids are any hashable the caller picks, unique among live jobs. Methods that can
    start waiting jobs return their ids; the caller wakes those jobs.
    """

    def __init__(
        self,
        *,
        concurrency: int = 1,
        overrides: Mapping[str, int] | None = None,
        max_active_models: int = 1,
        queue_max: int = 512,
        queue_max_per_client: int = 32,
        queue_timeout: float = 300.0,
        switch_after: float = 10.0,
        admin_concurrency: int = 1,
    ) -> None:
        for name, value in (
            ("concurrency", concurrency),
            ("max_active_models", max_active_models),
            ("queue_max", queue_max),
            ("queue_max_per_client", queue_max_per_client),
            ("admin_concurrency", admin_concurrency),
        ):
            if value < 1:
                raise ValueError(f"{name} must be 1 or more, not {value!r}")
        if not queue_timeout > 0:
            raise ValueError(f"queue_timeout must be above 0, not {queue_timeout!r}")
        if not switch_after >= 0:
            raise ValueError(f"switch_after must be 0 or more, not {switch_after!r}")
        self.concurrency = concurrency
        self.overrides = {normalize_model(model): n for model, n in (overrides or {}).items()}
        self.max_active_models = max_active_models
        self.queue_max = queue_max
        self.queue_max_per_client = queue_max_per_client
        self.queue_timeout = float(queue_timeout)
        self.switch_after = float(switch_after)
        self.admin_concurrency = admin_concurrency

        self._jobs: dict[Hashable, _Job] = {}
        self._waiting: OrderedDict[Hashable, _Job] = OrderedDict()  # all lanes, oldest first
        self._lanes: OrderedDict[str, _Lane] = OrderedDict()  # model lanes, least recent first
        self._admin = _Lane(ADMIN_LANE, admin_concurrency, admin=True)
        self._active: dict[str, _Lane] = {}  # model lanes holding a place
        self._queued: dict[str, _Lane] = {}  # model lanes with waiting jobs
        self._clients: dict[str, _ClientCount] = {}
        self._now = float("-inf")
        self._slice_start = float("-inf")  # when a model last took a place
        self._seq = 0
        self._admitted = 0
        self._rejected = dict.fromkeys(REASONS, 0)
        self._avg_seconds: float | None = None
        self._activations = 0
        self._forced_switches = 0

    @classmethod
    def from_settings(cls, settings: Any) -> Scheduler:
        """A scheduler configured from the gate's ``Settings``."""
        return cls(
            concurrency=settings.model_concurrency,
            overrides=settings.model_concurrency_overrides,
            max_active_models=settings.max_active_models,
            queue_max=settings.queue_max,
            queue_max_per_client=settings.queue_max_per_client,
            queue_timeout=settings.queue_timeout,
            switch_after=settings.switch_after,
            admin_concurrency=settings.admin_concurrency,
        )

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
    ) -> Admission:
        """Add a job: it runs at once or waits, or ClientShareFull / QueueFull is raised.

        The client's share (``max_waiting`` when given, else ``queue_max_per_client``)
        is checked before the total, so a client flooding the queue is told so (429)
        rather than shown a busy server (503). ``max_running`` caps the client's jobs
        running at once, all lanes together; each job brings its client's current cap.
        """
        now = self._advance(now)
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} is already queued or running")
        model = normalize_model(model)
        if not model and not admin:
            raise ValueError("a model job needs a model name")
        lane = self._admin if admin else self._lane(model, now)
        self._seq += 1
        job = _Job(job_id, model, client, lane, now, self._seq)
        count = self._clients.get(client)
        if count is not None:
            count.max_running = max_running
        running = count.running if count is not None else 0
        if (max_running is None or running < max_running) and self._can_start(lane, now):
            if not admin and lane.name not in self._active:
                self._activate(lane, now, forced=False)
            self._start(job, now)
            self._clients[client].max_running = max_running
            return Admission.RUNNING
        share = self.queue_max_per_client if max_waiting is None else max_waiting
        count = self._clients.get(client)
        if count is not None and count.waiting >= share:
            self._reject(lane, "client_queue_full")
            raise ClientShareFull(
                f"too many waiting requests from this client (limit {share})",
                retry_after=self._lane_estimate(lane),
            )
        if len(self._waiting) >= self.queue_max:
            self._reject(lane, "queue_full")
            estimate = self._lane_estimate(lane) if admin else self.retry_after(now)
            raise QueueFull(retry_after=estimate)
        self._enqueue(job)
        self._clients[client].max_running = max_running
        return Admission.WAITING

    def finish(self, job_id: Hashable, now: float) -> list[Hashable]:
        """A running job ended (any way at all); free its slot and return the jobs started.

        Unknown ids are ignored, so a release may be repeated; a job still waiting is
        cancelled instead.
        """
        now = self._advance(now)
        job = self._jobs.get(job_id)
        if job is None:
            return []
        if job.started is None:
            self._dequeue(job)
            self._reject(job.lane, "cancelled")
        else:
            self._stop(job, now)
        return self._pump(now)

    def cancel(self, job_id: Hashable, now: float) -> list[Hashable]:
        """A job's client left: drop it from the queue (or free its slot); return jobs started."""
        return self.finish(job_id, now)

    def expire(self, now: float) -> tuple[list[Hashable], list[Hashable]]:
        """Drop jobs that waited ``queue_timeout``; return (those jobs, the jobs started)."""
        now = self._advance(now)
        expired: list[Hashable] = []
        while self._waiting:
            job = next(iter(self._waiting.values()))
            if job.submitted + self.queue_timeout > now:
                break
            self._dequeue(job)
            self._reject(job.lane, "queue_timeout")
            expired.append(job.key)
        return expired, self._pump(now)

    def cancel_waiting(self, now: float, *, reason: str | None = "cancelled") -> list[Hashable]:
        """Drop every waiting job and start none; return the jobs dropped, oldest first.

        Each counts as a rejection for ``reason`` (shutting down: "cancelled"); with None
        it is not counted (the jobs wait on elsewhere).
        """
        self._advance(now)
        dropped = list(self._waiting)
        for job in list(self._waiting.values()):
            self._dequeue(job)
            if reason is not None:
                self._reject(job.lane, reason)
        return dropped

    def tick(self, now: float) -> list[Hashable]:
        """Re-apply the rules at ``now``; return the jobs started.

        Time alone only ever holds jobs back (a switch falling due), so this starts
        nothing in practice; it is here so a timer can apply the rules at a deadline.
        """
        return self._pump(self._advance(now))

    # Queries

    def next_deadline(self) -> float | None:
        """The earliest time at which ``expire`` or a pending switch could change anything."""
        deadlines = []
        oldest = next(iter(self._waiting.values()), None)
        if oldest is not None:
            deadlines.append(oldest.submitted + self.queue_timeout)
        due = self._switch_due()
        if due is not None and due > self._now:
            deadlines.append(due)
        return min(deadlines, default=None)

    def pending_switch(self, now: float) -> tuple[str, list[str]] | None:
        """The model waiting for a switch and the running models draining for it, if any."""
        target = self._switch_target(max(now, self._now))
        if target is None:
            return None
        return target.name, sorted(self._active)

    def idle(self) -> bool:
        """Whether nothing runs and nothing waits."""
        return not self._jobs

    def job_state(self, job_id: Hashable) -> Admission | None:
        """Whether a job is running or waiting, or None if the scheduler does not know it."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        return Admission.WAITING if job.started is None else Admission.RUNNING

    def retry_after(self, now: float, model: str | None = None, *, admin: bool = False) -> float:
        """Seconds a turned-away client should wait before trying again.

        The estimate is avg × (jobs waiting + 1) ÷ slots, clamped to 1..queue_timeout: avg
        is the moving average of slot hold times (the lane's, else all jobs', else
        DEFAULT_JOB_SECONDS). With a model (or ``admin``) it counts that lane's queue and
        slots; without, all model jobs waiting and the slots of the running models.
        """
        if admin:
            return self._lane_estimate(self._admin)
        if model is not None:
            lane = self._lanes.get(normalize_model(model))
            if lane is not None:
                return self._lane_estimate(lane)
        waiting = len(self._waiting) - len(self._admin.waiting)
        slots = sum(lane.slots for lane in self._active.values()) or self.concurrency
        return self._estimate(self._avg_seconds, waiting, slots)

    def snapshot(self, now: float) -> QueueSnapshot:
        """Plain data for the status page: per model, per client, the admin lane and totals."""
        now = max(now, self._now)
        self._evict_idle(now)
        target = self._switch_target(now)
        draining = sorted(self._active) if target is not None else []
        models = {
            name: self._lane_snapshot(lane, now, target is not None)
            for name, lane in sorted(self._lanes.items())
        }
        clients: dict[str, ClientSnapshot] = {
            name: {"waiting": count.waiting, "running": count.running}
            for name, count in sorted(self._clients.items())
        }
        running = sum(count.running for count in self._clients.values())
        return {
            "models": models,
            "admin": self._lane_snapshot(self._admin, now, False),
            "clients": clients,
            "totals": {
                "running": running,
                "waiting": len(self._waiting),
                "admitted": self._admitted,
                "rejected": dict(self._rejected),
                "active_models": sorted(self._active),
                "max_active_models": self.max_active_models,
                "queue_max": self.queue_max,
                "queue_max_per_client": self.queue_max_per_client,
                "activations": self._activations,
                "forced_switches": self._forced_switches,
                "avg_seconds": self._avg_seconds,
                "reaped": 0,
                "counted_again": 0,
            },
            "switch": {
                "pending": target is not None,
                "target": target.name if target is not None else None,
                "waited": self._wait_of(target, now) if target is not None else 0.0,
                "draining": draining,
            },
            "retry_after": self.retry_after(now),
            "closed": False,
            "shared": False,
            "fallback": False,
        }

    # The rules

    def _can_start(self, lane: _Lane, now: float) -> bool:
        """Whether a new job for ``lane`` may run at once, ahead of nobody."""
        if self._oldest_ready(lane) is not None:
            return False  # others of this lane wait already: take a turn behind them
        if lane.admin:
            return len(lane.running) < lane.slots
        if self._switch_target(now) is not None:
            return False  # a switch is due: running models drain, new models wait
        if lane.name in self._active:
            return len(lane.running) < lane.slots
        return len(self._active) < self.max_active_models

    def _pump(self, now: float) -> list[Hashable]:
        """Start every job the rules allow at ``now``; return their ids in start order."""
        started: list[Hashable] = []
        self._fill(self._admin, now, started)
        while True:
            target = self._switch_target(now)
            if target is None:
                # Affinity: running models (even one that just drained) take their own jobs.
                for running in list(self._active.values()):
                    self._fill(running, now, started)
            for name in [name for name, lane in self._active.items() if not lane.running]:
                del self._active[name]
            if len(self._active) >= self.max_active_models:
                break
            chosen = target or self._oldest_queued()
            if chosen is None:
                break
            self._activate(chosen, now, forced=target is not None)
            self._fill(chosen, now, started)
        return started

    def _fill(self, lane: _Lane, now: float, started: list[Hashable]) -> None:
        """Start ``lane``'s waiting jobs up to its slots, clients in turn.

        A client at its running cap is passed over and keeps its place in the round.
        """
        while len(lane.running) < lane.slots:
            job = self._next_in_turn(lane)
            if job is None:
                return
            self._dequeue(job)
            if job.client in lane.turns:
                lane.turns.move_to_end(job.client)  # _dequeue dropped it if it had no more
            self._start(job, now)
            started.append(job.key)

    def _may_run(self, client: str) -> bool:
        count = self._clients.get(client)
        return count is None or count.may_run()

    def _next_in_turn(self, lane: _Lane) -> _Job | None:
        """The first job of the first client in ``lane``'s round that may run one more."""
        for client, jobs in lane.turns.items():
            if self._may_run(client):
                return next(iter(jobs.values()))
        return None

    def _oldest_ready(self, lane: _Lane) -> _Job | None:
        """``lane``'s oldest waiting job whose client may run one more (None: none may)."""
        oldest = lane.oldest()
        if oldest is None or self._may_run(oldest.client):
            return oldest  # no caps in the way: the common case, at once
        best: _Job | None = None
        for client, jobs in lane.turns.items():
            if self._may_run(client):
                job = next(iter(jobs.values()))
                if best is None or job.seq < best.seq:
                    best = job
        return best

    def _oldest_queued(self) -> _Lane | None:
        """The model without a place whose oldest job has waited longest."""
        best: _Lane | None = None
        best_seq = 0
        for name, lane in self._queued.items():
            if name in self._active:
                continue
            job = self._oldest_ready(lane)
            if job is not None and (best is None or job.seq < best_seq):
                best, best_seq = lane, job.seq
        return best

    def _switch_due(self) -> float | None:
        """When the oldest waiting model without a place may force a switch."""
        lane = self._oldest_queued()
        if lane is None:
            return None
        oldest = self._oldest_ready(lane)
        assert oldest is not None
        return max(oldest.submitted, self._slice_start) + self.switch_after

    def _switch_target(self, now: float) -> _Lane | None:
        """The model a switch is due for at ``now``, if any."""
        due = self._switch_due()
        if due is None or due > now:
            return None
        return self._oldest_queued()

    def _activate(self, lane: _Lane, now: float, *, forced: bool) -> None:
        self._active[lane.name] = lane
        self._slice_start = now
        self._activations += 1
        if forced:
            self._forced_switches += 1

    # Bookkeeping

    def _advance(self, now: float) -> float:
        """Keep time monotonic even if a caller's clock steps back a little."""
        if now > self._now:
            self._now = float(now)
        return self._now

    def _lane(self, model: str, now: float) -> _Lane:
        lane = self._lanes.get(model)
        if lane is None:
            lane = self._lanes[model] = _Lane(model, self.overrides.get(model, self.concurrency))
            self._evict_idle(now, keep=lane)
        self._lanes.move_to_end(model)
        lane.touched = now
        return lane

    def _evict_idle(self, now: float, *, keep: _Lane | None = None) -> None:
        """Forget idle models past IDLE_MODEL_SECONDS, and all but MAX_IDLE_MODELS of the rest."""
        idle = [name for name, lane in self._lanes.items() if not lane.busy() and lane is not keep]
        extra = len(idle) - MAX_IDLE_MODELS
        for number, name in enumerate(idle):
            if number < extra or self._lanes[name].touched + IDLE_MODEL_SECONDS <= now:
                del self._lanes[name]

    def _client(self, client: str) -> _ClientCount:
        count = self._clients.get(client)
        if count is None:
            count = self._clients[client] = _ClientCount()
        return count

    def _drop_client_if_idle(self, client: str) -> None:
        count = self._clients[client]
        if not count.waiting and not count.running:
            del self._clients[client]

    def _enqueue(self, job: _Job) -> None:
        lane = job.lane
        self._jobs[job.key] = job
        self._waiting[job.key] = job
        lane.waiting[job.key] = job
        lane.turns.setdefault(job.client, OrderedDict())[job.key] = job
        if not lane.admin:
            self._queued[lane.name] = lane
        self._client(job.client).waiting += 1

    def _dequeue(self, job: _Job) -> None:
        lane = job.lane
        del self._jobs[job.key]
        del self._waiting[job.key]
        del lane.waiting[job.key]
        jobs = lane.turns[job.client]
        del jobs[job.key]
        if not jobs:
            del lane.turns[job.client]
        if not lane.waiting:
            self._queued.pop(lane.name, None)
        self._clients[job.client].waiting -= 1
        self._drop_client_if_idle(job.client)

    def _start(self, job: _Job, now: float) -> None:
        job.started = now
        self._jobs[job.key] = job
        job.lane.running[job.key] = job
        job.lane.admitted += 1
        self._admitted += 1
        self._client(job.client).running += 1

    def _stop(self, job: _Job, now: float) -> None:
        assert job.started is not None
        lane = job.lane
        del self._jobs[job.key]
        del lane.running[job.key]
        self._clients[job.client].running -= 1
        self._drop_client_if_idle(job.client)
        held = now - job.started
        lane.touched = now
        lane.avg_seconds = ewma(lane.avg_seconds, held)
        self._avg_seconds = ewma(self._avg_seconds, held)

    def _reject(self, lane: _Lane, reason: str) -> None:
        lane.rejected[reason] += 1
        self._rejected[reason] += 1

    # Estimates and reports

    def _lane_estimate(self, lane: _Lane) -> float:
        return self._estimate(lane.avg_seconds or self._avg_seconds, len(lane.waiting), lane.slots)

    def _estimate(self, avg: float | None, waiting: int, slots: int) -> float:
        return estimate_wait(avg, waiting, slots, self.queue_timeout)

    def _wait_of(self, lane: _Lane, now: float) -> float:
        oldest = lane.oldest()
        return float(now - oldest.submitted) if oldest is not None else 0.0

    def _lane_snapshot(self, lane: _Lane, now: float, draining: bool) -> LaneSnapshot:
        active = not lane.admin and lane.name in self._active
        return {
            "running": len(lane.running),
            "slots": lane.slots,
            "waiting": len(lane.waiting),
            "oldest_wait": self._wait_of(lane, now),
            "clients_waiting": len(lane.turns),
            "admitted": lane.admitted,
            "rejected": dict(lane.rejected),
            "avg_seconds": lane.avg_seconds,
            "active": active,
            "draining": active and draining,
        }
