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
* A client with a running cap (its API key's ``max_running``) at its cap takes no turn:
  its waiting jobs stay where they are while other clients' jobs run, and they neither
  hold a slot, age ahead of others, nor win a model a place or a switch until one of its
  jobs ends. A model of theirs that then finds a place free takes it, no switch needed.
* Within a model (and in the admin lane) a higher priority class goes first
  (PRIORITIES: interactive, normal, batch), and within a class clients take turns
  round-robin. A job that has been its client's next job of its class for ``aging``
  seconds is served first from then on (front jobs aged longest first), so no class
  starves.
* Classes and switches: a waiting model's switch falls due after ``switch_after`` times
  its most urgent class's factor (SWITCH_FACTORS: ½ interactive, 1 normal, 2 batch),
  counted from that class's oldest job's arrival or the last new place, whichever is
  later; a model whose oldest job has waited ``aging`` counts as interactive from then
  on. The model whose switch falls due first gets the next free place (ties: its oldest
  job). With every job ``normal`` these are the rules above, unchanged.
* The admin lane has its own ``admin_concurrency`` slots and takes no model place.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
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

# Priority classes, highest first; a key's ``priority`` is its ceiling and a request may
# ask for a lower one (X-Gate-Priority). DEFAULT_PRIORITY: anonymous clients, keys that
# name none, and every caller that says nothing.
PRIORITIES = ("interactive", "normal", "batch")
DEFAULT_PRIORITY = "normal"
# The request header that asks for a lower class; the gate consumes it (never forwarded).
PRIORITY_HEADER = "X-Gate-Priority"
# A waiting model may force a switch after switch_after times its most urgent class's
# factor: an interactive job's switch clock runs twice as fast, a batch job's half as fast.
SWITCH_FACTORS = (0.5, 1.0, 2.0)
DEFAULT_AGING = 60.0

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


class ClassSnapshot(TypedDict):
    """Jobs of one priority class, all lanes."""

    waiting: int
    running: int


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
    #: Waiting and running jobs per priority class (every name of PRIORITIES).
    priorities: dict[str, ClassSnapshot]
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
        priority: str = DEFAULT_PRIORITY,
    ) -> JobSlot:
        """Block until the job may run (served as ``priority``) and return its slot.

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


# Each class's rank (its place in PRIORITIES), looked up once per job.
_RANKS = {name: rank for rank, name in enumerate(PRIORITIES)}


def priority_rank(name: str) -> int:
    """0 for the highest class; ValueError naming the classes for an unknown one."""
    try:
        return _RANKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {name!r}") from None


def served_priority(ceiling: str, asked: str | None) -> str:
    """The class a request is served at: ``asked`` if it is not above ``ceiling``.

    A request may lower its class, never raise it: a class above the ceiling is ignored
    (served at the ceiling). ``asked`` is matched without case or surrounding blanks; an
    unknown name raises ValueError.
    """
    if asked is None:
        return ceiling
    wanted = asked.strip().lower()
    return wanted if priority_rank(wanted) > priority_rank(ceiling) else ceiling


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


def switch_due(
    oldest: list[float | None], slice_start: float, switch_after: float, aging: float
) -> float:
    """When a waiting model may force a switch (the scheduling rules, "Classes and switches").

    ``oldest`` holds the arrival of the model's oldest waiting job of each class (None for
    a class with none), highest class first. Each class may force it ``switch_after`` ×
    its SWITCH_FACTORS after that arrival or ``slice_start`` (the last new place),
    whichever is later; and once the model's oldest job has waited ``aging`` it counts as
    the top class.
    """
    due = float("inf")
    for arrival, factor in zip(oldest, SWITCH_FACTORS, strict=True):
        if arrival is not None:
            due = min(due, max(arrival, slice_start) + switch_after * factor)
    first = min((arrival for arrival in oldest if arrival is not None), default=None)
    if first is not None:
        top = max(first, slice_start) + switch_after * SWITCH_FACTORS[0]
        due = min(due, max(first + aging, top))
    return due


class Admission(enum.Enum):
    """What ``Scheduler.submit`` decided for a new job."""

    RUNNING = "running"
    WAITING = "waiting"


class QueuedJob(Protocol):
    """What a LaneQueue needs of a waiting job (both schedulers' jobs are one)."""

    key: Hashable
    client: str
    priority: int  # rank in PRIORITIES
    submitted: float
    seq: int
    #: When it became its client's next job of its class in its lane.
    front: float


class LaneQueue:
    """One lane's waiting jobs: by arrival, per class, per client in turn, and the jobs at
    the front of their client's line (of their class) in the order they got there.

    ``pick`` says who goes next: a job put back (``put_back``: its backend failed before
    answering), the one that first started earliest first; else the front job that has been
    at the front ``aging`` seconds longest ago, else the highest class's next client in
    turn. Its clock is the caller's ``now``; ``FleetScheduler`` keeps its lanes' queues
    with it too.
    """

    __slots__ = ("jobs", "classes", "turns", "fronts", "again")

    def __init__(self) -> None:
        # Waiting jobs in arrival order (the first is the oldest) ...
        self.jobs: OrderedDict[Hashable, Any] = OrderedDict()
        # ... per class, in arrival order ...
        self.classes: tuple[OrderedDict[Hashable, Any], ...] = tuple(
            OrderedDict() for _ in PRIORITIES
        )
        # ... per class, by client, clients in turn order (round-robin) ...
        self.turns: tuple[OrderedDict[str, OrderedDict[Hashable, Any]], ...] = tuple(
            OrderedDict() for _ in PRIORITIES
        )
        # ... and each client's next job of a class, in the order they became it.
        self.fronts: OrderedDict[Hashable, Any] = OrderedDict()
        # Jobs put back after their backend failed, by when they first started: (rank, job).
        self.again: dict[Hashable, tuple[int, Any]] = {}

    def __len__(self) -> int:
        return len(self.jobs)

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def oldest(self) -> Any:
        """The job that arrived first (None when none waits)."""
        return next(iter(self.jobs.values()), None)

    def oldest_of(self, rank: int) -> Any:
        return next(iter(self.classes[rank].values()), None)

    def oldest_ready(self, rank: int | None, ready: Callable[[str], bool] | None) -> Any:
        """The oldest waiting job (of class ``rank``, or of any) whose client is ``ready``
        (None: none is)."""
        first = self.oldest() if rank is None else self.oldest_of(rank)
        if first is None or ready is None or ready(first.client):
            return first  # no caps in the way: the common case, at once
        best = None
        for lines in self.turns if rank is None else (self.turns[rank],):
            for client, line in lines.items():
                if ready(client):
                    job = next(iter(line.values()))
                    if best is None or job.seq < best.seq:
                        best = job
        return best

    def arrivals(self, ready: Callable[[str], bool] | None = None) -> list[float | None]:
        """When the oldest waiting job of each class (highest first) whose client is
        ``ready`` arrived, None for a class with none: ``switch_due``'s ``oldest``."""
        firsts = [self.oldest_ready(rank, ready) for rank in range(len(PRIORITIES))]
        return [job.submitted if job is not None else None for job in firsts]

    def count_ready(self, ready: Callable[[str], bool] | None = None) -> int:
        """Waiting jobs whose client is ``ready`` (all of them without ``ready``)."""
        if ready is None:
            return len(self.jobs)
        return sum(
            len(line) for lines in self.turns for client, line in lines.items() if ready(client)
        )

    def clients(self) -> int:
        """Clients with a job waiting here."""
        return len({client for turns in self.turns for client in turns})

    def add(self, job: QueuedJob, now: float) -> None:
        """Queue ``job`` behind its client's jobs of its class (in arrival order)."""
        self.jobs[job.key] = job
        self.classes[job.priority][job.key] = job
        line = self.turns[job.priority].get(job.client)
        if line is None:
            self.turns[job.priority][job.client] = OrderedDict({job.key: job})
            job.front = now
            self.fronts[job.key] = job
        else:
            line[job.key] = job

    def put_back(self, job: QueuedJob, now: float, rank: int) -> None:
        """Put ``job`` (a started job just added again: its backend failed before answering)
        back in its place: at its arrival place in the lists, and ahead of every job that
        never started (``pick``); among such jobs, lowest ``rank`` (first started) first.

        Its client's turn is not touched: the job had its turn when it first started."""
        lines = self.turns[job.priority]
        line = lines[job.client]
        for queue in (self.jobs, self.classes[job.priority], line):
            items = sorted(queue.values(), key=lambda other: other.seq)
            queue.clear()
            queue.update((other.key, other) for other in items)
        again = sorted([*self.again.values(), (rank, job)], key=lambda item: item[0])
        self.again = {other.key: (order, other) for order, other in again}
        first = next(iter(line.values()))
        if first.key not in self.fronts:
            for other in line.values():
                self.fronts.pop(other.key, None)
            first.front = now
            self.fronts[first.key] = first

    def remove(self, job: QueuedJob, now: float) -> None:
        """Take ``job`` out; the next job of its client's line becomes a front job now."""
        del self.jobs[job.key]
        if self.again:
            self.again.pop(job.key, None)
        del self.classes[job.priority][job.key]
        lines = self.turns[job.priority]
        line = lines[job.client]
        del line[job.key]
        if job.key in self.fronts:
            del self.fronts[job.key]
            if line:
                nxt = next(iter(line.values()))
                nxt.front = now
                self.fronts[nxt.key] = nxt
        if not line:
            del lines[job.client]

    def take(self, job: QueuedJob, now: float) -> None:
        """Take ``job`` out to start it: its client's turn in its class goes to the end
        (not for a job put back, which had its turn)."""
        again = job.key in self.again
        self.remove(job, now)
        if again:
            return
        lines = self.turns[job.priority]
        if job.client in lines:
            lines.move_to_end(job.client)

    def aged(self, job: QueuedJob, now: float, aging: float) -> bool:
        """Whether ``job`` is a front job that has been one ``aging`` seconds."""
        return job.key in self.fronts and job.front + aging <= now

    def pick(
        self,
        now: float,
        aging: float,
        ready: Callable[[str], bool] | None = None,
        eligible: Callable[[Any], bool] | None = None,
    ) -> Any:
        """The job to start next (None when none may): a job put back, first started
        first; else an aged front job, oldest first, else the highest class's next client
        in turn. Clients not ``ready`` (at their running cap) are passed over and keep
        their place; so are jobs not ``eligible`` (another job of the client's line may
        be)."""
        for _, job in self.again.values():
            if (ready is None or ready(job.client)) and (eligible is None or eligible(job)):
                return job
        for job in self.fronts.values():
            if job.front + aging > now:
                break  # fronts are in the order they got there: the rest are younger
            if (ready is None or ready(job.client)) and (eligible is None or eligible(job)):
                return job
        for lines in self.turns:
            for client, line in lines.items():
                if ready is not None and not ready(client):
                    continue
                for job in line.values():
                    if eligible is None or eligible(job):
                        return job
        return None


class Lane:
    """One model's queue and counters (or the admin lane's): what both schedulers keep of
    a lane (``Scheduler`` adds its slots; the fleet's are per backend)."""

    __slots__ = (
        "name",
        "admin",
        "running",
        "queue",
        "admitted",
        "rejected",
        "avg_seconds",
        "touched",
    )

    def __init__(self, name: str, *, admin: bool = False) -> None:
        self.name = name
        self.admin = admin
        self.running: dict[Hashable, Any] = {}  # its jobs running, by id
        self.queue = LaneQueue()
        self.admitted = 0
        self.rejected = dict.fromkeys(REASONS, 0)
        self.avg_seconds: float | None = None
        self.touched = float("-inf")  # when a job of this lane last came or went

    def oldest(self) -> Any:
        """Its job waiting longest (None when none waits)."""
        return self.queue.oldest()

    def busy(self) -> bool:
        return bool(self.running or self.queue)


class _Lane(Lane):
    """One model's slots and queue (or the admin lane's)."""

    __slots__ = ("slots",)

    def __init__(self, name: str, slots: int, *, admin: bool = False) -> None:
        super().__init__(name, admin=admin)
        self.slots = slots

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
    priority: int = 1
    front: float = 0.0
    started: float | None = None


@dataclass(slots=True)
class ClientCount:
    """A client's (or a priority class's) jobs waiting and running, and its running cap."""

    waiting: int = 0
    running: int = 0
    max_running: int | None = None  # the latest cap its jobs came with (None: no cap)

    def may_run(self, elsewhere: int = 0) -> bool:
        """Whether one more of its jobs may start (``elsewhere``: its jobs that run in
        other gates, which count towards its cap too)."""
        return self.max_running is None or self.running + elsewhere < self.max_running


class ClientCounts(dict[str, ClientCount]):
    """Each client with jobs waiting or running, and its running cap: the one rule of a
    key's ``max_running``, kept alike by ``Scheduler`` and the fleet's ``FleetScheduler``.

    ``elsewhere`` maps a client to its jobs running in other gates (the fleet's shared
    mode reads them from Redis); they count towards its cap as its jobs here do.
    """

    def __init__(self) -> None:
        super().__init__()
        self.elsewhere: dict[str, int] = {}

    def of(self, client: str) -> ClientCount:
        count = self.get(client)
        if count is None:
            count = self[client] = ClientCount()
        return count

    def may_run(self, client: str) -> bool:
        """Whether one more job of ``client`` may start (a ``ready`` for LaneQueue)."""
        count = self.get(client)
        return count is None or count.may_run(self.elsewhere.get(client, 0))

    def recap(self, client: str, max_running: int | None) -> bool:
        """A new job of ``client`` came with ``max_running``: it is the client's cap from
        now on (so a key's changed cap applies from its next job); return whether one
        more of its jobs may start. The caller sets the cap on a client it adds after."""
        count = self.get(client)
        running = self.elsewhere.get(client, 0) + (0 if count is None else count.running)
        if count is not None:
            count.max_running = max_running
        return max_running is None or running < max_running

    def drop_if_idle(self, client: str) -> None:
        count = self[client]
        if not count.waiting and not count.running:
            del self[client]


class _IdleLane(Protocol):
    touched: float

    def busy(self) -> bool: ...


def forget_idle(lanes: OrderedDict[str, Any], now: float, *, keep: _IdleLane | None = None) -> None:
    """Forget idle model lanes past IDLE_MODEL_SECONDS, and all but MAX_IDLE_MODELS of the
    rest (least recently used first): model names come from clients. ``keep`` stays."""
    idle = [name for name, lane in lanes.items() if not lane.busy() and lane is not keep]
    extra = len(idle) - MAX_IDLE_MODELS
    for number, name in enumerate(idle):
        if number < extra or lanes[name].touched + IDLE_MODEL_SECONDS <= now:
            del lanes[name]


class JobBook:
    """What ``Scheduler`` and the fleet's ``FleetScheduler`` keep alike: jobs by id, the
    waiting ones in arrival order, model lanes, counts per client (with their running
    caps) and per class, rejections and the hold-time average; and the events that touch
    only those (a job ends, leaves or times out). A subclass places jobs: ``_pump``
    starts what its rules allow, ``_new_lane`` makes a model's lane, ``_lane_estimate``
    and ``retry_after`` tell a turned-away client how long to wait."""

    def __init__(
        self,
        *,
        queue_max: int,
        queue_max_per_client: int,
        queue_timeout: float,
        switch_after: float,
        admin_concurrency: int,
        priority_aging: float,
    ) -> None:
        for name, value in (
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
        if not priority_aging > 0:
            raise ValueError(f"priority_aging must be above 0, not {priority_aging!r}")
        self.queue_max = queue_max
        self.queue_max_per_client = queue_max_per_client
        self.queue_timeout = float(queue_timeout)
        self.switch_after = float(switch_after)
        self.admin_concurrency = admin_concurrency
        self.priority_aging = float(priority_aging)

        self._jobs: dict[Hashable, Any] = {}
        self._waiting: OrderedDict[Hashable, Any] = OrderedDict()  # all lanes, oldest first
        self._lanes: OrderedDict[str, Any] = OrderedDict()  # model lanes, least recent first
        self._queued: dict[str, Any] = {}  # model lanes with waiting jobs
        self._admin = self._new_lane(ADMIN_LANE, admin=True)
        self._clients = ClientCounts()
        self._now = float("-inf")
        self._seq = 0
        self._admitted = 0
        self._rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._avg_seconds: float | None = None
        self._classes = [ClientCount() for _ in PRIORITIES]  # waiting, running per class

    # What a subclass decides

    def _pump(self, now: float) -> list[Hashable]:
        """Start every job the rules allow at ``now``; return their ids in start order."""
        raise NotImplementedError

    def _new_lane(self, model: str, *, admin: bool = False) -> Any:
        """A lane for ``model`` (or the admin lane)."""
        raise NotImplementedError

    def _lane_estimate(self, lane: Any) -> float:
        raise NotImplementedError

    def retry_after(self, now: float, model: str | None = None, *, admin: bool = False) -> float:
        raise NotImplementedError

    # Events

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
            self._dequeue(job, now)
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
            self._dequeue(job, now)
            self._reject(job.lane, "queue_timeout")
            expired.append(job.key)
        return expired, self._pump(now)

    def cancel_waiting(self, now: float, *, reason: str | None = "cancelled") -> list[Hashable]:
        """Drop every waiting job and start none; return the jobs dropped, oldest first.

        Each counts as a rejection for ``reason`` (shutting down: "cancelled"); with None
        it is not counted (the jobs wait on elsewhere).
        """
        now = self._advance(now)
        dropped = list(self._waiting)
        for job in list(self._waiting.values()):
            self._dequeue(job, now)
            if reason is not None:
                self._reject(job.lane, reason)
        return dropped

    # Queries

    def idle(self) -> bool:
        """Whether nothing runs and nothing waits."""
        return not self._jobs

    def job_state(self, job_id: Hashable) -> Admission | None:
        """Whether a job is running or waiting, or None if the scheduler does not know it."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        return Admission.WAITING if job.started is None else Admission.RUNNING

    # Admission

    def _new_job(
        self,
        make: Callable[..., Any],
        job_id: Hashable,
        model: str,
        client: str,
        now: float,
        *,
        admin: bool,
        priority: str,
    ) -> Any:
        """A new job of class ``priority`` (``make``: the subclass's job type), in its lane;
        its ``submitted`` is ``now`` kept monotonic."""
        rank = priority_rank(priority)
        now = self._advance(now)
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} is already queued or running")
        model = normalize_model(model)
        if not model and not admin:
            raise ValueError("a model job needs a model name")
        lane = self._admin if admin else self._lane(model, now)
        self._seq += 1
        return make(job_id, model, client, lane, now, self._seq, rank)

    def _wait(self, job: Any, max_waiting: int | None, max_running: int | None) -> Admission:
        """Queue ``job``, which may not start at once, or raise ClientShareFull / QueueFull.

        The client's share (``max_waiting`` when given, else ``queue_max_per_client``)
        is checked before the total, so a client flooding the queue is told so (429)
        rather than shown a busy server (503).
        """
        lane, client = job.lane, job.client
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
            estimate = self._lane_estimate(lane) if lane.admin else self.retry_after(job.submitted)
            raise QueueFull(retry_after=estimate)
        self._enqueue(job, job.submitted)
        self._clients[client].max_running = max_running
        return Admission.WAITING

    # Bookkeeping

    def _advance(self, now: float) -> float:
        """Keep time monotonic even if a caller's clock steps back a little."""
        if now > self._now:
            self._now = float(now)
        return self._now

    def _lane(self, model: str, now: float) -> Any:
        lane = self._lanes.get(model)
        if lane is None:
            lane = self._lanes[model] = self._new_lane(model)
            self._evict_idle(now, keep=lane)
        self._lanes.move_to_end(model)
        lane.touched = now
        return lane

    def _evict_idle(self, now: float, *, keep: _IdleLane | None = None) -> None:
        forget_idle(self._lanes, now, keep=keep)

    def _enqueue(self, job: Any, now: float) -> None:
        lane = job.lane
        self._jobs[job.key] = job
        self._waiting[job.key] = job
        lane.queue.add(job, now)
        if not lane.admin:
            self._queued[lane.name] = lane
        self._clients.of(job.client).waiting += 1
        self._classes[job.priority].waiting += 1

    def _dequeue(self, job: Any, now: float, *, take: bool = False) -> None:
        """Take a waiting job out (``take``: to start it, its client's turn passes)."""
        lane = job.lane
        del self._jobs[job.key]
        del self._waiting[job.key]
        if take:
            lane.queue.take(job, now)
        else:
            lane.queue.remove(job, now)
        if not lane.queue:
            self._queued.pop(lane.name, None)
        self._clients[job.client].waiting -= 1
        self._classes[job.priority].waiting -= 1
        self._clients.drop_if_idle(job.client)

    def _start(self, job: Any, now: float) -> None:
        job.started = now
        self._jobs[job.key] = job
        job.lane.running[job.key] = job
        job.lane.admitted += 1
        self._admitted += 1
        self._clients.of(job.client).running += 1
        self._classes[job.priority].running += 1

    def _stop(self, job: Any, now: float, *, count: bool = True) -> None:
        """A running job ends (``count``: its hold time counts for the estimates)."""
        assert job.started is not None
        lane = job.lane
        del self._jobs[job.key]
        del lane.running[job.key]
        self._clients[job.client].running -= 1
        self._classes[job.priority].running -= 1
        self._clients.drop_if_idle(job.client)
        if count:
            held = now - job.started
            lane.touched = now
            lane.avg_seconds = ewma(lane.avg_seconds, held)
            self._avg_seconds = ewma(self._avg_seconds, held)

    def _reject(self, lane: Any, reason: str) -> None:
        lane.rejected[reason] = lane.rejected.get(reason, 0) + 1
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    # Estimates and reports

    def _estimate(self, avg: float | None, waiting: int, slots: int) -> float:
        return estimate_wait(avg, waiting, slots, self.queue_timeout)

    def _wait_of(self, lane: Any, now: float) -> float:
        oldest = lane.oldest()
        return float(now - oldest.submitted) if oldest is not None else 0.0

    def _client_rows(self) -> dict[str, ClientSnapshot]:
        return {
            name: {"waiting": count.waiting, "running": count.running}
            for name, count in sorted(self._clients.items())
        }

    def _class_rows(self) -> dict[str, ClassSnapshot]:
        return {
            name: {"waiting": count.waiting, "running": count.running}
            for name, count in zip(PRIORITIES, self._classes, strict=True)
        }


class Scheduler(JobBook):
    """Decides which jobs run, from events stamped with the caller's monotonic ``now``.

    Job ids are any hashable the caller picks, unique among live jobs. Methods that can
    start waiting jobs return their ids; the caller wakes those jobs.
    """

    # The book's jobs and lanes are this scheduler's own.
    _jobs: dict[Hashable, _Job]
    _waiting: OrderedDict[Hashable, _Job]
    _lanes: OrderedDict[str, _Lane]
    _queued: dict[str, _Lane]
    _admin: _Lane

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
        priority_aging: float = DEFAULT_AGING,
    ) -> None:
        for name, value in (
            ("concurrency", concurrency),
            ("max_active_models", max_active_models),
        ):
            if value < 1:
                raise ValueError(f"{name} must be 1 or more, not {value!r}")
        self.concurrency = concurrency
        self.overrides = {normalize_model(model): n for model, n in (overrides or {}).items()}
        self.max_active_models = max_active_models
        super().__init__(
            queue_max=queue_max,
            queue_max_per_client=queue_max_per_client,
            queue_timeout=queue_timeout,
            switch_after=switch_after,
            admin_concurrency=admin_concurrency,
            priority_aging=priority_aging,
        )
        self._active: dict[str, _Lane] = {}  # model lanes holding a place
        self._slice_start = float("-inf")  # when a model last took a place
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
            priority_aging=settings.priority_aging,
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
        priority: str = DEFAULT_PRIORITY,
    ) -> Admission:
        """Add a job of class ``priority``: it runs at once or waits, or ClientShareFull /
        QueueFull is raised.

        The client's share (``max_waiting`` when given, else ``queue_max_per_client``)
        is checked before the total, so a client flooding the queue is told so (429)
        rather than shown a busy server (503). ``max_running`` caps the client's jobs
        running at once, all lanes together; each job brings its client's current cap.
        A capped client's job that starts at once may bring it to its cap, so that its
        other jobs no longer make a switch due: the caller then calls ``tick`` to start
        the jobs that switch held back.
        """
        lane = None if admin or self._queued else self._lanes.get(model)
        if lane is not None:
            # The common case, at once: no model job waits, so no switch is due and none of
            # the lane's jobs is ahead, and ``_can_start`` comes down to the lane's slots (or
            # a free place); ``model``, a lane's name, is normalised already
            # (``normalize_model`` leaves a normalised name as it is). The state changes are
            # those of the general path below (_new_job, _activate, _start), in their order;
            # a job that may not run at once takes that path, as does every doubt.
            try:
                rank = _RANKS[priority]
            except (KeyError, TypeError):
                rank = -1  # refused below, with the general path's error
            active = self._active
            placed = model in active
            if (
                rank >= 0
                and job_id not in self._jobs
                and (
                    len(lane.running) < lane.slots
                    if placed
                    else len(active) < self.max_active_models
                )
                # recap's change is the one the general path makes too; without a cap it
                # only sets the client's cap to None, as done below.
                and (max_running is None or self._clients.recap(client, max_running))
            ):
                if now > self._now:
                    self._now = float(now)
                now = self._now
                self._lanes.move_to_end(model)
                lane.touched = now
                self._seq += 1
                started = _Job(job_id, model, client, lane, now, self._seq, rank, 0.0, now)
                if not placed:
                    active[model] = lane
                    self._slice_start = now
                    self._activations += 1
                self._jobs[job_id] = started
                lane.running[job_id] = started
                lane.admitted += 1
                self._admitted += 1
                clients = self._clients
                count = clients.get(client)
                if count is None:
                    count = clients[client] = ClientCount()
                count.running += 1
                count.max_running = max_running
                self._classes[rank].running += 1
                return Admission.RUNNING
        job: _Job = self._new_job(_Job, job_id, model, client, now, admin=admin, priority=priority)
        lane, now = job.lane, job.submitted
        if self._clients.recap(client, max_running) and self._can_start(lane, now):
            if not admin and lane.name not in self._active:
                self._activate(lane, now, forced=False)
            self._start(job, now)
            self._clients[client].max_running = max_running
            return Admission.RUNNING
        return self._wait(job, max_waiting, max_running)

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
        if not self._queued:
            return None  # no model job waits: no switch is due (_next_due finds none)
        target = self._switch_target(max(now, self._now))
        if target is None:
            return None
        return target.name, sorted(self._active)

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
        waiting = len(self._waiting) - len(self._admin.queue)
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
        clients = self._client_rows()
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
            "priorities": self._class_rows(),
            "retry_after": self.retry_after(now),
            "closed": False,
            "shared": False,
            "fallback": False,
        }

    # The rules

    def _can_start(self, lane: _Lane, now: float) -> bool:
        """Whether a new job for ``lane`` may run at once, ahead of nobody."""
        if lane.queue.oldest_ready(None, self._clients.may_run) is not None:
            return False  # others of this lane wait already: take a turn behind them
        if lane.admin:
            return len(lane.running) < lane.slots
        if self._switch_target(now) is not None:
            return False  # a switch is due: running models drain, new models wait
        if lane.name in self._active:
            return len(lane.running) < lane.slots
        return len(self._active) < self.max_active_models

    def _drop_idle_places(self) -> None:
        """Models with no job running lose their place among the active ones."""
        for name in [name for name, lane in self._active.items() if not lane.running]:
            del self._active[name]

    def _pump(self, now: float) -> list[Hashable]:
        """Start every job the rules allow at ``now``; return their ids in start order."""
        if not self._waiting:
            # Nothing waits (every lane's queue is empty): nothing starts and no switch is
            # due; the one thing left of the loop below is that idle models lose their place.
            self._drop_idle_places()
            return []
        started: list[Hashable] = []
        self._fill(self._admin, now, started)
        while True:
            target = self._switch_target(now)
            if target is None:
                # Affinity: running models (even one that just drained) take their own jobs.
                for running in list(self._active.values()):
                    self._fill(running, now, started)
            self._drop_idle_places()
            if len(self._active) >= self.max_active_models:
                break
            chosen = target or self._next_model()
            if chosen is None:
                break
            self._activate(chosen, now, forced=target is not None)
            self._fill(chosen, now, started)
        return started

    def _fill(self, lane: _Lane, now: float, started: list[Hashable]) -> None:
        """Start ``lane``'s waiting jobs up to its slots: aged front jobs first, then by
        class, clients in turn within a class. A client at its running cap is passed over
        and keeps its place in the round."""
        while lane.queue and len(lane.running) < lane.slots:
            job: _Job | None = lane.queue.pick(now, self.priority_aging, self._clients.may_run)
            if job is None:
                return
            self._dequeue(job, now, take=True)
            self._start(job, now)
            started.append(job.key)

    def _next_model(self) -> _Lane | None:
        """The model without a place whose switch falls due first (ties: oldest job);
        jobs of clients at their running cap count for none of it."""
        found = self._next_due()
        return None if found is None else found[0]

    def _next_due(self) -> tuple[_Lane, float] | None:
        """``_next_model`` and when its switch falls due (``_due``)."""
        best: _Lane | None = None
        best_key = (0.0, 0)
        for name, lane in self._queued.items():
            if name in self._active:
                continue
            oldest = lane.queue.oldest_ready(None, self._clients.may_run)
            if oldest is None:
                continue
            key = (self._due(lane), oldest.seq)
            if best is None or key < best_key:
                best, best_key = lane, key
        return None if best is None else (best, best_key[0])

    def _due(self, lane: _Lane) -> float:
        """When ``lane`` may force a switch: see switch_due."""
        return switch_due(
            lane.queue.arrivals(self._clients.may_run),
            self._slice_start,
            self.switch_after,
            self.priority_aging,
        )

    def _switch_candidate(self) -> tuple[_Lane, float] | None:
        """The waiting model a switch would be for, and when it falls due: the next model
        without a place, while no place is free. A model that finds a place free takes it
        at the next pump, no switch needed (only one whose jobs waited for their clients'
        running caps can)."""
        if len(self._active) < self.max_active_models:
            return None
        return self._next_due()

    def _switch_due(self) -> float | None:
        """When the next waiting model without a place may force a switch."""
        found = self._switch_candidate()
        return None if found is None else found[1]

    def _switch_target(self, now: float) -> _Lane | None:
        """The model a switch is due for at ``now``, if any."""
        found = self._switch_candidate()
        if found is None or found[1] > now:
            return None
        return found[0]

    def _activate(self, lane: _Lane, now: float, *, forced: bool) -> None:
        self._active[lane.name] = lane
        self._slice_start = now
        self._activations += 1
        if forced:
            self._forced_switches += 1

    # Bookkeeping

    def _new_lane(self, model: str, *, admin: bool = False) -> _Lane:
        if admin:
            return _Lane(model, self.admin_concurrency, admin=True)
        return _Lane(model, self.overrides.get(model, self.concurrency))

    # Estimates and reports

    def _lane_estimate(self, lane: _Lane) -> float:
        return self._estimate(lane.avg_seconds or self._avg_seconds, len(lane.queue), lane.slots)

    def _lane_snapshot(self, lane: _Lane, now: float, draining: bool) -> LaneSnapshot:
        active = not lane.admin and lane.name in self._active
        return {
            "running": len(lane.running),
            "slots": lane.slots,
            "waiting": len(lane.queue),
            "oldest_wait": self._wait_of(lane, now),
            "clients_waiting": lane.queue.clients(),
            "admitted": lane.admitted,
            "rejected": dict(lane.rejected),
            "avg_seconds": lane.avg_seconds,
            "active": active,
            "draining": active and draining,
        }
