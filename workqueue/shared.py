"""The work queue shared by every worker and host through Redis, with a local fallback.

``SharedWorkQueue`` has ``WorkQueue``'s API. Each event (submit, finish, tick) is one Lua
script (``scripts.RedisScheduler``) on the shared state; a job that must wait parks its
greenlet on an event. One greenlet per process, the pump, blocks on the process's wake
list (BLMPOP, at most WAKE_BLOCK seconds) where the scripts push the ids of its jobs as
they start, and every TICK seconds, while anything waits, runs the tick script, which
renews this process's leases, drops lapsed ones and applies switches that fell due.

When Redis fails or answers slower than STORAGE_TIMEOUT, admission falls back to an
in-process ``WorkQueue`` (this process's own slots, as with one worker) and the pump
probes Redis every PROBE_EVERY seconds (a third of the lease at most) until it answers
again. Then the jobs running on the process's own slots are counted in Redis, and the
jobs waiting in its own queue are queued in Redis again, before new jobs go there.
docs/SHARED_QUEUE.md has the algorithm and its failure modes.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import redis
from gevent.greenlet import Greenlet
from redis.backoff import NoBackoff
from redis.retry import Retry

from errors import ClientShareFull, GateError, QueueFull, QueueTimeout, ShuttingDown
from pipeline import ClientGone as GoneFlag

from .core import DEFAULT_PRIORITY, QueueSnapshot, estimate_wait, ewma
from .gate import ClientGone, Requeued, Slot, WorkQueue, wait_or_gone
from .scripts import DEFAULT_LEASE, KEY_PREFIX, RedisScheduler, lane_of

logger = logging.getLogger(__name__)

# Seconds Redis may take to answer one call before it counts as down (as the limiter's).
STORAGE_TIMEOUT = 0.5
# While Redis is down, try it again this often (or every third of the lease, if sooner).
PROBE_EVERY = 2.0
# The pump's BLMPOP blocks this long at most, and ticks this often while jobs wait.
WAKE_BLOCK = 0.2
TICK = 0.2


class RedisDown(Exception):
    """Redis failed or was too slow: admit this job with the process's own slots."""


class SharedSlot(Slot):
    """A running job's hold on a slot shared through Redis; ``release()`` it on every path.

    Releasing never raises: a slot whose release cannot reach Redis is freed when its
    lease lapses.
    """

    __slots__ = ("_t0",)

    def __init__(
        self,
        queue: SharedWorkQueue,
        job_id: str,
        model: str,
        client: str,
        admin: bool,
        waited: float,
    ) -> None:
        super().__init__(queue, job_id, model, client, admin, waited)
        self._t0 = time.monotonic()

    def _free(self) -> None:
        self._queue._note_hold(time.monotonic() - self._t0)
        self._queue._finish(self.job_id)

    def _free_later(self) -> None:
        # Redis I/O cannot run in the hub: a greenlet does it.
        gevent.get_hub().loop.run_callback(self._queue._spawn_finish, self.job_id)


class FallbackSlot(SharedSlot):
    """A job admitted on this process's own slots while Redis was out of reach.

    It holds a slot of the process's ``WorkQueue``; once Redis answers again it is counted
    there too, so releasing frees both.
    """

    __slots__ = ("_local",)

    def __init__(
        self,
        queue: SharedWorkQueue,
        local: Slot,
        job_id: str,
        model: str,
        client: str,
        admin: bool,
        waited: float,
    ) -> None:
        super().__init__(queue, job_id, model, client, admin, waited)
        self._local = local

    def _free(self) -> None:
        self._local.release()
        super()._free()

    def _free_later(self) -> None:
        self._local._release_later()
        super()._free_later()


class _Held:
    """A job of this process that runs: its lane, client and class, and whether Redis
    counts it."""

    __slots__ = ("lane", "client", "priority", "counted")

    def __init__(self, lane: str, client: str, priority: str, counted: bool) -> None:
        self.lane = lane
        self.client = client
        self.priority = priority
        self.counted = counted


class _Waiter:
    __slots__ = ("lane", "client", "priority", "event", "queued", "started", "error")

    def __init__(self, lane: str, client: str, priority: str) -> None:
        self.lane = lane
        self.client = client
        self.priority = priority
        self.event = gevent.event.Event()
        self.queued = False  # the submit script has answered "waiting"
        self.started = False
        self.error: BaseException | None = None


def redis_client(uri: str, timeout: float = STORAGE_TIMEOUT) -> redis.Redis:
    """A client with short timeouts and no retries: a dead Redis costs one timeout."""
    return redis.Redis.from_url(
        uri,
        socket_timeout=timeout,
        socket_connect_timeout=STORAGE_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


class SharedWorkQueue:
    """Slots, the active-model cap, queue bounds and client turns shared through Redis."""

    def __init__(
        self,
        settings: Any,
        *,
        client: redis.Redis | None = None,
        lease: float | None = None,
        prefix: str = KEY_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        uri = settings.storage_uri
        self._redis = client if client is not None else redis_client(uri)
        # The pump's BLMPOP holds its own connection for up to WAKE_BLOCK.
        self._blocking = redis_client(uri, WAKE_BLOCK + STORAGE_TIMEOUT)
        if lease is None:
            lease = getattr(settings, "queue_lease", DEFAULT_LEASE)
        self._sched = RedisScheduler(
            self._redis,
            concurrency=settings.model_concurrency,
            overrides=settings.model_concurrency_overrides,
            max_active_models=settings.max_active_models,
            queue_max=settings.queue_max,
            queue_max_per_client=settings.queue_max_per_client,
            switch_after=settings.switch_after,
            admin_concurrency=settings.admin_concurrency,
            queue_timeout=settings.queue_timeout,
            lease=lease,
            prefix=prefix,
            priority_aging=settings.priority_aging,
        )
        self.lease = float(lease)
        self.probe_every = min(PROBE_EVERY, self.lease / 3)
        self.queue_timeout = float(settings.queue_timeout)
        self._local = WorkQueue.from_settings(settings)
        self._clock = clock
        self._owner: str | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[str, _Waiter] = {}
        # Every job of this process that runs, shared or on its own slots.
        self._running: dict[str, _Held] = {}
        self._down_since: float | None = None
        self._closed = False
        self._pump: Greenlet | None = None
        self._poke = gevent.event.Event()
        # Clear while Redis, just back, counts this process's running jobs: new shared
        # submits wait for that, so none is started beside a job Redis does not count yet.
        self._counted = gevent.event.Event()
        self._counted.set()
        self._next_renew = 0.0
        self._last_tick = 0.0
        # Jobs left in Redis while it was out of reach: finished once it answers again.
        self._orphans: set[str] = set()
        self._avg_seconds: float | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> SharedWorkQueue:
        """A shared work queue on ``settings.storage_uri`` (a redis:// URL)."""
        return cls(settings)

    @property
    def fallback(self) -> bool:
        """Whether admission uses this process's own slots because Redis failed."""
        return self._down_since is not None

    @property
    def scheduler(self) -> RedisScheduler:
        return self._sched

    @property
    def owner(self) -> str:
        # Made on first use, in the worker: a process forked later gets its own.
        if self._owner is None:
            host = socket.gethostname()
            self._owner = f"{host}:{os.getpid()}:{secrets.token_hex(4)}"
        return self._owner

    def acquire(
        self,
        model: str,
        client: str,
        *,
        admin: bool = False,
        client_gone: GoneFlag | None = None,
        max_waiting: int | None = None,
        max_running: int | None = None,
        priority: str = DEFAULT_PRIORITY,
    ) -> Slot:
        """Block this greenlet until the job may run (served as class ``priority``) and
        return its slot (see WorkQueue).

        While Redis is out of reach the job waits in this process's own queue; when Redis
        answers again, it leaves that queue and waits in Redis (requeued).
        """
        if client_gone is not None and client_gone.is_set():
            raise ClientGone()
        self._start_pump()
        submitted = self._clock()
        requeue = False
        while True:
            if self._closed:
                raise ShuttingDown("the gate is shutting down", retry_after=1.0)
            if not self.fallback:
                try:
                    return self._acquire_shared(
                        model,
                        client,
                        admin,
                        client_gone,
                        submitted,
                        requeue,
                        max_waiting,
                        max_running,
                        priority,
                    )
                except RedisDown:
                    pass  # admitted below, with this process's own slots
                except Requeued:
                    requeue = True  # Redis forgot it: queue it there again
                    continue
            try:
                local = self._local.acquire(
                    model,
                    client,
                    admin=admin,
                    client_gone=client_gone,
                    max_waiting=max_waiting,
                    max_running=max_running,
                    priority=priority,
                )
            except Requeued:
                requeue = True  # Redis answers again: wait there
                continue
            job_id = f"{self.owner}:{next(self._ids)}"
            self._running[job_id] = _Held(lane_of(model, admin), client, priority, counted=False)
            if not self.fallback:
                # It started on this process's own slots just as Redis came back, after the
                # running jobs were counted there: count it before it runs.
                try:
                    self._tick(renew=True)
                except redis.RedisError as exc:
                    self._went_down(exc)
            waited = self._clock() - submitted
            return FallbackSlot(self, local, job_id, model, client, admin, waited)

    def snapshot(self) -> QueueSnapshot:
        """The shared state, or this process's own while falling back."""
        if not self.fallback:
            try:
                snap = self._sched.snapshot(avg_seconds=self._avg_seconds)
            except redis.RedisError as exc:
                self._went_down(exc)
            else:
                snap["closed"] = self._closed
                return snap
        snap = self._local.snapshot()
        snap["fallback"] = True
        return snap

    def retry_after(self, model: str | None = None, *, admin: bool = False) -> float:
        """Seconds a turned-away client should wait (from this process's jobs waiting)."""
        if self.fallback:
            return self._local.retry_after(model, admin=admin)
        slots = self._sched.slots(lane_of(model or "", admin)) if model or admin else 1
        return self._estimate(len(self._waiters), slots)

    def idle(self) -> bool:
        """Whether this process holds no shared slot and has no job waiting, here or locally."""
        return not self._waiters and not self._running and self._local.idle()

    def close(self) -> None:
        """Fail every waiting job with ShuttingDown; held slots stay valid until released."""
        if self._closed:
            return
        self._closed = True
        waiting = list(self._waiters.items())
        self._waiters.clear()
        for job_id, waiter in waiting:
            waiter.error = ShuttingDown("the gate is shutting down", retry_after=1.0)
            waiter.event.set()
            self._spawn_finish(job_id, "cancelled")
        self._local.close()
        self._poke.set()
        if waiting:
            logger.info("work queue: closed, %s waiting jobs turned away", len(waiting))

    # Shared admission

    def _acquire_shared(
        self,
        model: str,
        client: str,
        admin: bool,
        client_gone: GoneFlag | None,
        submitted: float,
        requeue: bool,
        max_waiting: int | None = None,
        max_running: int | None = None,
        priority: str = DEFAULT_PRIORITY,
    ) -> SharedSlot:
        job_id = f"{self.owner}:{next(self._ids)}"
        lane = lane_of(model, admin)
        self._counted.wait()
        if self.fallback:
            raise RedisDown()  # it went down again while this process's jobs were counted
        # Registered before the script runs: the pump may see the wake-up first.
        waiter = self._waiters[job_id] = _Waiter(lane, client, priority)
        try:
            decision = self._sched.submit(
                job_id,
                lane,
                client,
                self.owner,
                requeue=requeue,
                waited=self._clock() - submitted if requeue else 0.0,
                max_waiting=max_waiting,
                max_running=max_running,
                priority=priority,
            )
        except redis.RedisError as exc:
            self._waiters.pop(job_id, None)
            self._went_down(exc)
            raise RedisDown() from exc
        except BaseException:
            self._waiters.pop(job_id, None)
            raise
        if decision.outcome == "running":
            self._waiters.pop(job_id, None)
            self._running[job_id] = _Held(lane, client, priority, counted=True)
            return SharedSlot(self, job_id, model, client, admin, self._clock() - submitted)
        if decision.outcome != "waiting":
            self._waiters.pop(job_id, None)
            slots = self._sched.slots(lane)
            if decision.outcome == "client_queue_full":
                limit = self._sched.queue_max_per_client if max_waiting is None else max_waiting
                error: GateError = ClientShareFull(
                    f"too many waiting requests from this client (limit {limit})",
                    retry_after=self._estimate(decision.waiting, slots),
                )
            else:
                error = QueueFull(retry_after=self._estimate(decision.waiting, slots))
            logger.info(
                "work queue: turned away a job for %s from %s: %s", model, client, error.code
            )
            raise error

        waiter.queued = True
        self._poke.set()
        try:
            left = max(0.0, submitted + self.queue_timeout - self._clock())
            wait_or_gone(waiter.event, client_gone, left)
        except BaseException:
            # Killed or timed out from outside while waiting: leave no trace behind.
            self._waiters.pop(job_id, None)
            self._spawn_finish(job_id, "cancelled")
            raise

        if waiter.error is not None:
            raise waiter.error
        if not waiter.started:
            # Timed out or the client left: take the job out (or give back the slot it got
            # in the meantime, before its wake-up arrived).
            self._waiters.pop(job_id, None)
            if client_gone is not None and client_gone.is_set():
                self._finish(job_id, "cancelled")
                raise ClientGone()
            self._finish(job_id, "queue_timeout")
            logger.info("work queue: a job for %s timed out waiting", model)
            raise QueueTimeout(
                f"no slot became free within {self.queue_timeout:g} s; try again later",
                retry_after=self._estimate(len(self._waiters), self._sched.slots(lane)),
            )
        if client_gone is not None and client_gone.is_set():
            self._finish(job_id)
            raise ClientGone()
        return SharedSlot(self, job_id, model, client, admin, self._clock() - submitted)

    def _finish(self, job_id: str, reason: str = "") -> None:
        """End a job in Redis; a failure only means its lease frees it later.

        ``reason`` ("queue_timeout", "cancelled") is counted if the job was still waiting.
        """
        held = self._running.pop(job_id, None)
        if held is not None and not held.counted:
            return  # it ran on this process's own slots, and Redis never counted it
        if self.fallback:
            self._orphans.add(job_id)  # finished when Redis answers, else its lease lapses
            return
        try:
            self._sched.finish(job_id, reason=reason)
        except redis.RedisError as exc:
            self._orphans.add(job_id)
            self._went_down(exc)

    def _spawn_finish(self, job_id: str, reason: str = "") -> None:
        gevent.spawn(self._finish, job_id, reason)

    # The pump: wake-ups, ticks, lease renewal, probing

    def _start_pump(self) -> None:
        if self._pump is None or self._pump.dead:
            self._pump = gevent.spawn(self._run_pump)

    def _run_pump(self) -> None:
        # After close, the jobs still running keep their leases renewed until they end.
        while not self._closed or self._running:
            try:
                if self.fallback:
                    self._probe()
                elif self._waiters:
                    self._wait_for_wakeups()
                    self._tick()
                elif self._running:
                    self._poke.wait(min(self.lease / 3, max(0.0, self._next_renew - self._clock())))
                    self._poke.clear()
                    self._tick()
                else:
                    self._poke.wait(self.lease / 3)
                    self._poke.clear()
            except redis.RedisError as exc:
                self._went_down(exc)
            except Exception:
                # A bug here would strand every waiter; log it and keep the pump alive.
                logger.exception("work queue: pump failed")
                gevent.sleep(0.1)

    def _wait_for_wakeups(self) -> None:
        key = self._sched.wake_key(self.owner)
        # BLMPOP (Redis 7): every id waiting in the list in one round trip.
        reply: Any = self._blocking.blmpop(WAKE_BLOCK, 1, key, direction="LEFT", count=1000)
        if not reply:
            return
        for raw in reply[1]:
            job_id = raw.decode()
            waiter = self._waiters.pop(job_id, None)
            if waiter is None:
                # Its greenlet gave up (client gone, timeout) after the job started.
                self._spawn_finish(job_id)
                continue
            waiter.started = True
            self._running[job_id] = _Held(waiter.lane, waiter.client, waiter.priority, counted=True)
            waiter.event.set()

    def _tick(self, *, renew: bool = False) -> None:
        now = self._clock()
        running: list[tuple[str, str, str, str]] = []
        waiting: list[str] = []
        if renew or now >= self._next_renew:
            running = [(i, h.lane, h.client, h.priority) for i, h in self._running.items()]
            # Not the jobs whose submit has not answered yet: Redis may not know them.
            waiting = [i for i, w in self._waiters.items() if w.queued]
            self._next_renew = now + self.lease / 3
        elif not self._waiters or now < self._last_tick + TICK:
            return
        self._last_tick = now
        ticked = self._sched.tick(self.owner, running=running, waiting=waiting)
        for job_id in ticked.counted:
            held = self._running.get(job_id)
            if held is None:
                # Released while the script ran, after Redis had counted it: end it there.
                self._spawn_finish(job_id)
                continue
            if held.counted:
                # Its lease lapsed (Redis was out of reach for a lease, or restarted empty):
                # it runs still, so it holds a slot again.
                logger.warning("work queue: running job %s had lost its lease", job_id)
            held.counted = True
        for job_id in ticked.missing:
            # Redis forgot a waiting job (its lease lapsed): it queues there again.
            waiter = self._waiters.pop(job_id, None)
            if waiter is not None:
                waiter.error = Requeued()
                waiter.event.set()

    def _probe(self) -> None:
        gevent.sleep(self.probe_every)
        try:
            self._redis.ping()
        except redis.RedisError:
            return
        self._recover()

    def _recover(self) -> None:
        """Redis answers again: count this process's running jobs there, then share again.

        From now on no job starts on this process's own slots: the jobs waiting there leave
        that queue to queue in Redis, and new jobs go to Redis too, but their submits wait
        until Redis has finished the slots released while it was away and counts every job
        of this process that runs (on the shared slots or its own).
        """
        self._counted.clear()
        try:
            self._down_since = None
            requeued = self._local.requeue_waiting()
            self._finish_orphans()
            while True:
                self._tick(renew=True)
                # Again if a job started on the process's own slots just before (its
                # greenlet had not run yet) was added meanwhile.
                if all(held.counted for held in self._running.values()):
                    break
        finally:
            self._counted.set()
        logger.warning(
            "work queue: Redis answers again; slots are shared again "
            "(jobs of this process counted there: %s running; queued there again: %s waiting)",
            len(self._running),
            requeued,
        )

    def _finish_orphans(self) -> None:
        for job_id in list(self._orphans):
            self._sched.finish(job_id)
            self._orphans.discard(job_id)

    def _went_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = self._clock()
            logger.warning(
                "work queue: Redis unreachable (%s); admitting with this process's own "
                "slots and trying Redis again every %ss",
                exc,
                f"{self.probe_every:.2g}",
            )
        self._start_pump()  # it probes Redis until it answers
        # Jobs waiting in Redis wait again, locally.
        waiting = list(self._waiters.items())
        self._waiters.clear()
        for job_id, waiter in waiting:
            self._orphans.add(job_id)
            waiter.error = RedisDown()
            waiter.event.set()
        self._poke.set()

    # Estimates

    def _note_hold(self, seconds: float) -> None:
        self._avg_seconds = ewma(self._avg_seconds, seconds)

    def _estimate(self, waiting: int, slots: int) -> float:
        return estimate_wait(self._avg_seconds, waiting, slots, self.queue_timeout)
