"""The gevent side of the work queue: greenlets wait on events while the Scheduler decides.

All scheduler calls happen between greenlet switches (none of them yields), so one
process needs no locks. One timer greenlet applies timeouts and switches at their
deadlines; it starts with the first job, so an app built before gunicorn forks spawns
nothing in the master.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from types import TracebackType
from typing import Any

import gevent
import gevent.event
from gevent.greenlet import Greenlet

from errors import GateError, QueueTimeout, ShuttingDown
from pipeline import ClientGone as GoneFlag

from .core import DEFAULT_PRIORITY, Admission, QueueSnapshot, Scheduler

logger = logging.getLogger(__name__)

RUNNING = Admission.RUNNING

# Wake this much after a deadline: the loop's cached time can lag the clock a little, and
# waking just before a deadline would only loop once more.
TIMER_SLACK = 0.001


class ClientGone(Exception):
    """The client went away while its job waited: the job left the queue and never ran."""


class Requeued(Exception):
    """The waiting job was taken out of this queue to wait in another (Redis answers again)."""


def wait_or_gone(
    event: gevent.event.Event,
    client_gone: GoneFlag | None,
    timeout: float | None = None,
) -> None:
    """Wait for ``event``, which ``client_gone`` being set also wakes (up to ``timeout``)."""
    if client_gone is None:
        event.wait(timeout)
        return

    def wake(_event: Any) -> None:
        event.set()

    client_gone.rawlink(wake)
    try:
        event.wait(timeout)
    finally:
        client_gone.unlink(wake)


class _Waiter:
    """One waiting job's wake-up call: started, or failed with ``error``."""

    __slots__ = ("model", "admin", "event", "started", "error")

    def __init__(self, model: str, admin: bool) -> None:
        self.model = model
        self.admin = admin
        self.event = gevent.event.Event()
        self.started = False
        self.error: GateError | Requeued | None = None


class Slot:
    """A running job's hold on a slot; ``release()`` it on every path (or use ``with``)."""

    __slots__ = ("_queue", "job_id", "model", "client", "admin", "waited", "_released")

    def __init__(
        self,
        queue: Any,
        job_id: Hashable,
        model: str,
        client: str,
        admin: bool,
        waited: float,
    ) -> None:
        self._queue = queue
        self.job_id = job_id
        self.model = model
        self.client = client
        self.admin = admin
        self.waited = waited
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Free the slot and wake whoever it goes to; later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._free()

    def _free(self) -> None:
        self._queue._finish(self.job_id)

    def _free_later(self) -> None:
        # From a finaliser, which may fire in the middle of a scheduler call: in the hub.
        gevent.get_hub().loop.run_callback(self._queue._finish, self.job_id)

    def _release_later(self) -> None:
        """Release from a finaliser: mark it released now, free it from the hub."""
        self._released = True
        self._free_later()

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A safety net, not the way to release: a response generator that is never closed
        # would otherwise hold its slot for good. The release runs as a hub callback, since
        # a finaliser may fire in the middle of a scheduler call.
        if getattr(self, "_released", True):
            return
        try:
            logger.warning("work queue: a slot for %s was never released", self.model)
            self._release_later()
        except Exception:  # the interpreter is shutting down: nothing left to free
            pass

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<{type(self).__name__} {self.job_id} {self.model} {self.client} {state}>"


class WorkQueue:
    """Per-model slots and a fair, bounded queue for greenlets (DESIGN.md, workqueue/)."""

    def __init__(
        self,
        settings: Any = None,
        *,
        scheduler: Scheduler | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if scheduler is None:
            scheduler = Scheduler.from_settings(settings) if settings is not None else Scheduler()
        self._scheduler = scheduler
        self._clock = clock
        self._ids = itertools.count(1)
        self._waiters: dict[Hashable, _Waiter] = {}
        self._closed = False
        self._timer: Greenlet | None = None
        self._wake = gevent.event.Event()
        self._timer_deadline: float | None = None
        self._switch: tuple[str, list[str]] | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> WorkQueue:
        """A work queue configured from the gate's ``Settings``."""
        return cls(settings)

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

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
        return its Slot.

        Raises QueueFull, ClientShareFull, QueueTimeout or ShuttingDown (GateErrors with
        ``retry_after``), or ClientGone once ``client_gone`` is set while waiting. If this
        greenlet is killed while waiting, the job leaves the queue.
        """
        if self._closed:
            raise ShuttingDown("the gate is shutting down", retry_after=1.0)
        if client_gone is not None and client_gone.is_set():
            raise ClientGone()
        timer = self._timer
        if timer is None or timer.dead:
            self._start_timer()
        job_id = next(self._ids)
        submitted = self._clock()
        try:
            admission = self._scheduler.submit(
                job_id,
                model,
                client,
                submitted,
                admin=admin,
                max_waiting=max_waiting,
                max_running=max_running,
                priority=priority,
            )
        except GateError as exc:
            logger.info(
                "work queue: turned away a job for %s from %s: %s (retry after %.0f s)",
                model,
                client,
                exc.code,
                exc.retry_after or 0,
            )
            raise
        if admission is RUNNING:
            if logger.isEnabledFor(logging.DEBUG):  # one call less than debug() itself
                logger.debug(
                    "work queue: job %s for %s from %s runs at once", job_id, model, client
                )
            if max_running is not None:
                # Its client may be at its cap now, and a switch its other jobs made due
                # be off: the slots that held back are others' (core.Scheduler.submit).
                self._dispatch(submitted, self._scheduler.tick(submitted), ())
            return Slot(self, job_id, model, client, admin, 0.0)

        waiter = self._waiters[job_id] = _Waiter(model, admin)
        self._poke_timer()
        try:
            wait_or_gone(waiter.event, client_gone)
        except BaseException:
            # Killed or timed out from outside while waiting: leave no trace behind.
            self._waiters.pop(job_id, None)
            self._finish(job_id)
            raise

        if waiter.error is not None:
            raise waiter.error
        if not waiter.started or (client_gone is not None and client_gone.is_set()):
            # Woken by client_gone (even if someone cleared it since), or gone just as the
            # slot came: drop the job from the queue, or free the slot it just got.
            self._waiters.pop(job_id, None)
            self._finish(job_id)
            logger.debug(
                "work queue: job %s for %s from %s: client gone while waiting",
                job_id,
                model,
                client,
            )
            raise ClientGone()
        waited = self._clock() - submitted
        logger.debug(
            "work queue: job %s for %s from %s runs after %.3f s", job_id, model, client, waited
        )
        return Slot(self, job_id, model, client, admin, waited)

    def snapshot(self) -> QueueSnapshot:
        """The scheduler's snapshot (see Scheduler.snapshot) plus whether the queue is closed."""
        snap = self._scheduler.snapshot(self._clock())
        snap["closed"] = self._closed
        return snap

    def retry_after(self, model: str | None = None, *, admin: bool = False) -> float:
        """Seconds a turned-away client should wait (see Scheduler.retry_after)."""
        return self._scheduler.retry_after(self._clock(), model, admin=admin)

    def idle(self) -> bool:
        """Whether no job runs or waits."""
        return self._scheduler.idle() and not self._waiters

    def requeue_waiting(self) -> int:
        """Take every waiting job out of this queue, oldest first; its ``acquire`` raises
        Requeued, for the caller to queue it elsewhere. Running jobs keep their slots.
        Returns how many jobs were taken out."""
        dropped = self._scheduler.cancel_waiting(self._clock(), reason=None)
        for job_id in dropped:
            waiter = self._waiters.pop(job_id, None)
            if waiter is not None:
                waiter.error = Requeued()
                waiter.event.set()
        self._poke_timer()
        return len(dropped)

    def close(self) -> None:
        """Stop the timer and fail every waiting job with ShuttingDown; held slots stay valid."""
        if self._closed:
            return
        self._closed = True
        self._scheduler.cancel_waiting(self._clock())
        waiting = list(self._waiters.values())
        self._waiters.clear()
        for waiter in waiting:
            waiter.error = ShuttingDown("the gate is shutting down", retry_after=1.0)
            waiter.event.set()
        self._wake.set()
        if self._timer is not None and self._timer is not gevent.getcurrent():
            self._timer.kill(block=False)
        self._timer = None
        if waiting:
            logger.info("work queue: closed, %s waiting jobs turned away", len(waiting))

    # Internals

    def _finish(self, job_id: Hashable) -> None:
        """End a job on any path (release, client gone, killed) and wake the jobs it lets in."""
        now = self._clock()
        started = self._scheduler.finish(job_id, now)
        if started:
            self._dispatch(now, started, ())
        else:
            self._note_switch(now)  # all that _dispatch does with nothing to wake

    def _dispatch(
        self, now: float, started: Iterable[Hashable], expired: Iterable[Hashable]
    ) -> None:
        """Wake the greenlets of jobs that started or timed out."""
        for job_id in expired:
            waiter = self._waiters.pop(job_id, None)
            if waiter is None:
                continue
            waiter.error = QueueTimeout(
                f"no slot became free within {self._scheduler.queue_timeout:g} s; try again later",
                retry_after=self._scheduler.retry_after(now, waiter.model, admin=waiter.admin),
            )
            waiter.event.set()
            logger.info("work queue: a job for %s timed out waiting", waiter.model)
        for job_id in started:
            waiter = self._waiters.pop(job_id, None)
            if waiter is None:
                # Nobody to hand the slot to (cannot happen while acquire registers its
                # waiter before yielding); free it rather than leak it.
                logger.error("work queue: job %s started with no waiter; freeing it", job_id)
                self._dispatch(now, self._scheduler.finish(job_id, now), ())
                continue
            waiter.started = True
            waiter.event.set()
        self._note_switch(now)

    def _note_switch(self, now: float) -> None:
        switch = self._scheduler.pending_switch(now)
        if switch != self._switch:
            if switch is not None:
                logger.info(
                    "work queue: switch to %s due; draining %s",
                    switch[0],
                    ", ".join(switch[1]) or "nothing",
                )
            self._switch = switch

    def _start_timer(self) -> None:
        if self._timer is None or self._timer.dead:
            self._timer = gevent.spawn(self._run_timer)

    def _poke_timer(self) -> None:
        """Wake the timer early if a new deadline comes before the one it sleeps towards."""
        deadline = self._scheduler.next_deadline()
        if deadline is not None and (
            self._timer_deadline is None or deadline < self._timer_deadline
        ):
            self._wake.set()

    def _run_timer(self) -> None:
        while not self._closed:
            try:
                deadline = self._timer_deadline = self._scheduler.next_deadline()
                delay = None
                if deadline is not None:
                    delay = max(0.0, deadline - self._clock()) + TIMER_SLACK
                self._wake.wait(delay)
                self._wake.clear()
                if self._closed:
                    break
                now = self._clock()
                expired, started = self._scheduler.expire(now)
                started += self._scheduler.tick(now)
                self._dispatch(now, started, expired)
            except Exception:
                # A bug here would stop every timeout; log it and keep the timer alive.
                logger.exception("work queue: timer failed")
                gevent.sleep(0.1)
