"""Who runs next: the request queue in front of the :class:`~.runner.Runner`, as in Ollama.

It imitates Ollama's ``server/sched.go``: a request waits until its model is
loaded and has a free slot (``num_parallel``). With ``on_overflow="queue"``
requests are admitted strictly in arrival order (the head of the queue blocks
everyone behind it, as Ollama does, which is what makes it thrash between
models); with ``on_overflow="crash"`` a request that needs a model while VRAM
is full of busy models fails the way a killed runner does. Runs on the
server's event loop only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from .runner import Runner


class Ticket:
    """One inference or embed request's claim on a model."""

    __slots__ = ("model", "load_time", "fut", "load_duration", "state", "gen")

    def __init__(self, model: str, load_time: float, fut: asyncio.Future[None], gen: int) -> None:
        self.model = model
        self.load_time = load_time
        self.fut = fut
        self.load_duration = 0.0
        self.state = "queued"  # queued -> admitted -> released | crashed | dropped | refused
        self.gen = gen


class Scheduler:
    """Admits queued requests onto the runner's models; counts what is in flight and crashes."""

    def __init__(self, cfg: dict[str, Any], runner: Runner) -> None:
        self.cfg = cfg
        self.runner = runner
        runner.on_freed = self.schedule
        self.gen = 0  # bumped by drop_all(): tickets of an older generation are ignored
        self.queue: deque[Ticket] = deque()
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.max_models_in_flight = 0
        self.model_requests: dict[str, int] = {}
        self.crashes = 0
        self.busy_refusals = 0

    # -- in-flight accounting (arrival to end of response, queued time included)

    def arrive(self, model: str) -> None:
        self.model_requests[model] = self.model_requests.get(model, 0) + 1
        n = self.in_flight.get(model, 0) + 1
        self.in_flight[model] = n
        if n > self.max_in_flight.get(model, 0):
            self.max_in_flight[model] = n
        if len(self.in_flight) > self.max_models_in_flight:
            self.max_models_in_flight = len(self.in_flight)

    def depart(self, model: str, gen: int) -> None:
        if gen != self.gen:
            return
        n = self.in_flight.get(model, 0) - 1
        if n > 0:
            self.in_flight[model] = n
        else:
            self.in_flight.pop(model, None)

    # -- admission

    def enqueue(self, ticket: Ticket) -> bool:
        """Queue ``ticket``; False (Ollama's "server busy") when ``max_queue`` are waiting."""
        limit = self.cfg["max_queue"]
        if limit is not None and len(self.queue) >= limit:
            self.busy_refusals += 1
            return False
        self.queue.append(ticket)
        self.schedule()
        return True

    def cancel(self, ticket: Ticket) -> None:
        """A queued request went away (client disconnect)."""
        if ticket.state == "queued":
            ticket.state = "dropped"
            try:
                self.queue.remove(ticket)
            except ValueError:
                pass
            self.schedule()

    def release(self, ticket: Ticket, *, keep_alive: float | None = None) -> None:
        """An admitted request ended; its ``keep_alive`` (seconds, 0: unload once idle; None:
        unchanged) becomes its model's."""
        if ticket.state != "admitted" or ticket.gen != self.gen:
            return
        ticket.state = "released"
        self.runner.vacate(ticket.model, keep_alive=keep_alive)
        self.schedule()

    def unload(self, model: str) -> None:
        """``keep_alive: 0``: unload now, or as soon as the model's requests finish."""
        if self.runner.unload(model):
            self.schedule()

    def schedule(self) -> None:
        """Admit, load or crash queued requests as far as the rules allow."""
        runner = self.runner
        runner.expire()
        strict = self.cfg["on_overflow"] == "queue"
        num_parallel = self.cfg["num_parallel"]
        q = self.queue
        i = 0
        while i < len(q):
            t = q[i]
            m = t.model
            if m in runner.loaded:
                if num_parallel is None or runner.running.get(m, 0) < num_parallel:
                    del q[i]
                    self._admit(t)
                    continue
            elif m in runner.loading:
                pass  # wait for the load to finish
            elif runner.make_room(m):
                t.load_duration = t.load_time
                runner.start_load(m, t.load_time, self.schedule)
                if m in runner.loaded:  # loaded at once (load_time 0): look at it again
                    continue
            elif not strict:
                del q[i]
                self._crash(t)
                continue
            if strict:
                break  # head-of-line: nobody passes the head
            i += 1

    def _admit(self, t: Ticket) -> None:
        self.runner.occupy(t.model)
        t.state = "admitted"
        if not t.fut.done():
            t.fut.set_result(None)

    def _crash(self, t: Ticket) -> None:
        self.crashes += 1
        t.state = "crashed"
        if not t.fut.done():
            t.fut.set_result(None)

    # -- lifecycle

    def drop_all(self) -> None:
        """Server stopping: forget queued requests and cancel loads."""
        self.gen += 1
        self.runner.cancel_loads()
        for t in self.queue:
            t.state = "dropped"
            if not t.fut.done():
                t.fut.cancel()
        self.queue.clear()

    def clear_live(self) -> None:
        self.runner.clear_live()
        self.in_flight.clear()
        self.queue.clear()

    def reset(self) -> None:
        for m in list(self.runner.loaded):
            self.unload(m)
        self.runner.reset_counters()
        self.runner.keep_alive.clear()
        self.crashes = 0
        self.busy_refusals = 0
        self.model_requests.clear()
        self.max_in_flight = dict(self.in_flight)
        self.max_models_in_flight = len(self.in_flight)
