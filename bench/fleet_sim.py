"""bench/fleet.py's flood in virtual time: the real FleetScheduler over simulated backends.

The same setting as ``bench/fleet.py`` (its ``Setup``, mixes and lower bound): three
backends holding 2, 1 and 2 models at ``num_parallel`` 2, 1 s loads, 50-token jobs of
1 s, twenty closed-loop clients of three jobs each, the gate's settings at their
defaults (GATE_SWITCH_AFTER 10 s). Nothing runs for real and no clock is read: a
heap of events drives

* the gate: ``fleet.placement.FleetScheduler`` itself, called as the work queue
  calls it (``submit``; ``tick`` when a job had to wait; ``finish``; the timer's
  ``expire`` and ``tick`` at ``next_deadline``, woken early only by a job that waits;
  ``observe`` after each ``/api/ps`` read, which follows every job's end and comes at
  least every 5 s);
* each backend as the fake Ollama's Ollama-like mode does it (fakeollama/scheduler.py,
  ``on_overflow="queue"``): requests in arrival order, head of line, a model loads
  (one at a time) when the head needs it, evicting the least recently used idle model
  when VRAM is full;
* the clients: each sends its next job as soon as the last one's stream ends.

Latencies (the relay's hop each way, a poll, the client's next request) are small
constants (``Timing``), calibrated so that the current placement gives about what
the real bench measures. A run takes a fraction of a second, so placement rules can
be compared over many variations (``--jitter`` runs each mix with randomly perturbed
latencies and client start order, to show how sensitive a figure is).

    .venv/bin/python bench/fleet_sim.py [--mix even|skewed|both] [--runs N] [--trace]
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import itertools
import math
import random
import statistics
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet.config import Backend  # noqa: E402
from fleet.placement import FleetScheduler, View  # noqa: E402
from settings import Settings  # noqa: E402


def _bench_fleet() -> Any:
    """bench/fleet.py, whose name the ``fleet`` package takes."""
    spec = importlib.util.spec_from_file_location(
        "bench_fleet", Path(__file__).with_name("fleet.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fleet"] = module
    spec.loader.exec_module(module)
    return module


_bench = _bench_fleet()
Setup = _bench.Setup
lower_bound = _bench.lower_bound

GB = 1000**3
# fleet/runtime.py's PS_INTERVAL and workqueue/gate.py's TIMER_SLACK.
PS_INTERVAL = 5.0
TIMER_SLACK = 0.001
# A flood not over by then counts as never ending (a plan that leaves a model no place).
HORIZON = 120.0


@dataclass(frozen=True)
class Timing:
    """The small delays around the placement core (seconds)."""

    relay: float = 0.01  # the gate's request reaching the backend, and the end coming back
    client: float = 0.01  # a client's next request reaching the gate's queue
    poll: float = 0.005  # an /api/ps read, from the wake-up to ``observe``
    wake: float = 0.001  # a started job's greenlet running after its slot came
    job_extra: float = 0.15  # a 50-token stream's time beyond tokens x interval
    stagger: float = 0.002  # between two clients' first requests
    ps_phase: float = 2.5  # where the pollers' 5 s period falls when the flood starts


# The real bench on the shared 2-core machine (load average 8-11): its 50 x 20 ms streams
# take about 1.15 s. Default Timing() matches those runs (9.1 s even, 12.5 s skewed).
LOADED = Timing()
# A quiet machine: streams of about 1.04 s (the 16:23 UTC run: 8.39 s even, 11.58 s skewed).
QUIET = Timing(relay=0.004, client=0.004, poll=0.004, job_extra=0.04)


def bench_setup(mix: str) -> Setup:
    """bench/fleet.py's default run."""
    return Setup(
        places=(2, 1, 2),
        models=5,
        clients=20,
        jobs_per_client=3,
        tokens=50,
        token_interval=0.02,
        load_time=1.0,
        num_parallel=2,
        model_gb=4,
        timeout=60,
        on_overflow="queue",
        mix=mix,
    )


def backends_of(setup: Setup) -> list[Backend]:
    """The gate's GATE_BACKENDS_FILE in bench/fleet.py (``Fleet.backends_file``)."""
    return [
        Backend(
            name=chr(ord("a") + index),
            url=f"http://127.0.0.1:{11434 + index}",
            max_models=places,
            model_concurrency=setup.num_parallel,
            vram=places * setup.model_gb * GB,
        )
        for index, places in enumerate(setup.places)
    ]


def gate_scheduler(setup: Setup, **overrides: Any) -> FleetScheduler:
    """The gate's scheduler as bench/fleet.py runs it (every setting at its default)."""
    settings = Settings.from_env({})
    if overrides:
        settings = replace(settings, **overrides)
    return FleetScheduler.from_settings(settings, backends_of(setup))


class Loop:
    """Virtual time: a heap of (time, order, callback)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._seq), fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    def run(self, until: float, done: Callable[[], bool]) -> None:
        while self._heap and self._heap[0][0] <= until and not done():
            self.now, _, fn = heapq.heappop(self._heap)
            fn()


@dataclass
class SimJob:
    id: int
    client: int
    model: str
    sent: float = 0.0  # the client's request leaves
    started: float | None = None  # the gate placed it
    admitted: float | None = None  # the backend began generating
    ttft: float | None = None
    ended: float | None = None  # the client has the last line
    backend: str = ""


class SimBackend:
    """One fake Ollama in its Ollama-like mode (fakeollama/scheduler.py, runner.py)."""

    def __init__(self, sim: Sim, name: str, places: int) -> None:
        self.sim = sim
        self.name = name
        self.places = places
        self.queue: list[SimJob] = []
        self.loaded: OrderedDict[str, None] = OrderedDict()  # LRU order
        self.loading: str | None = None
        self.running: Counter[str] = Counter()
        self.loads = 0
        self.evictions = 0
        self.ps_pending = False
        self.next_ps = 0.0
        # Stretches each model was loaded here: model -> [from, busy slot-seconds].
        self.stretches: list[dict[str, Any]] = []
        self._open: dict[str, dict[str, Any]] = {}

    def arrive(self, job: SimJob) -> None:
        self.queue.append(job)
        self.schedule()

    def schedule(self) -> None:
        sim, setup = self.sim, self.sim.setup
        while self.queue:
            job = self.queue[0]
            model = job.model
            if model in self.loaded:
                if self.running[model] < setup.num_parallel:
                    self.queue.pop(0)
                    self._admit(job)
                    continue
            elif self.loading != model and self.loading is None and self._make_room():
                self.loading = model
                self.loads += 1
                sim.loop.after(setup.load_time, lambda m=model: self._loaded(m))  # type: ignore[misc]
            break  # head of line

    def _make_room(self) -> bool:
        while len(self.loaded) + (self.loading is not None) >= self.places:
            idle = next((m for m in self.loaded if not self.running[m]), None)
            if idle is None:
                return False
            del self.loaded[idle]
            self.evictions += 1
            self._close(idle)
        return True

    def _loaded(self, model: str) -> None:
        self.loading = None
        self.loaded[model] = None
        self._open[model] = {"model": model, "from": self.sim.loop.now, "busy": 0.0}
        self.schedule()

    def _close(self, model: str) -> None:
        stretch = self._open.pop(model, None)
        if stretch is not None:
            stretch["to"] = self.sim.loop.now
            self.stretches.append(stretch)

    def _admit(self, job: SimJob) -> None:
        sim, setup = self.sim, self.sim.setup
        self.running[job.model] += 1
        self.loaded.move_to_end(job.model)
        job.admitted = sim.loop.now
        seconds = setup.job_seconds + sim.timing.job_extra
        self._open[job.model]["busy"] += seconds
        sim.loop.after(setup.token_interval + sim.timing.relay, lambda: sim.first_token(job))
        sim.loop.after(seconds, lambda: self._end(job))

    def _end(self, job: SimJob) -> None:
        self.running[job.model] -= 1
        if job.model in self.loaded:
            self.loaded.move_to_end(job.model)
        self.schedule()
        self.sim.loop.after(self.sim.timing.relay, lambda: self.sim.gate_end(job))

    def view(self) -> View:
        size = self.sim.setup.model_gb * GB
        return View(
            installed={name: size for name in self.sim.setup.model_names},
            loaded={name: size for name in self.loaded},
        )

    def finish_stretches(self) -> None:
        for model in list(self._open):
            self._close(model)


class Sim:
    """One flood of ``setup``'s plan through a scheduler, in virtual time."""

    def __init__(
        self,
        setup: Setup,
        scheduler: FleetScheduler,
        timing: Timing = Timing(),
        *,
        order: Sequence[int] | None = None,
        trace: bool = False,
    ) -> None:
        self.setup = setup
        self.timing = timing
        self.scheduler = scheduler
        self.loop = Loop()
        self.backends = {
            chr(ord("a") + index): SimBackend(self, chr(ord("a") + index), places)
            for index, places in enumerate(setup.places)
        }
        ids = itertools.count(1)
        self.plans = [
            [SimJob(next(ids), client, model) for model in models]
            for client, models in enumerate(setup.plan())
        ]
        self.jobs = {job.id: job for plan in self.plans for job in plan}
        self._left = len(self.jobs)
        self.order = list(order) if order is not None else list(range(setup.clients))
        self.trace = trace
        self.lines: list[str] = []
        self._timer_deadline: float | None = None
        self._timer_gen = 0

    def log(self, msg: str) -> None:
        if self.trace:
            self.lines.append(f"{self.loop.now:7.3f}  {msg}")

    # The clients

    def send(self, job: SimJob) -> None:
        job.sent = self.loop.now
        self.loop.after(self.timing.client, lambda: self.gate_submit(job))

    def first_token(self, job: SimJob) -> None:
        job.ttft = self.loop.now - job.sent

    def client_done(self, job: SimJob) -> None:
        job.ended = self.loop.now
        self._left -= 1
        plan = self.plans[job.client]
        index = plan.index(job)
        if index + 1 < len(plan):
            self.send(plan[index + 1])

    # The gate

    def gate_submit(self, job: SimJob) -> None:
        now = self.loop.now
        sched = self.scheduler
        admission = sched.submit(job.id, job.model, f"10.0.0.{job.client + 1}", now)
        if admission.value == "running":
            self.dispatch([job.id])
        else:
            self.log(f"job {job.id} {job.model} of client {job.client} waits")
            self.dispatch(sched.tick(now))  # FleetWorkQueue._poke_timer
            self.poke()

    def gate_end(self, job: SimJob) -> None:
        now = self.loop.now
        self.dispatch(self.scheduler.finish(job.id, now))
        self.refresh_ps(job.backend)
        self.loop.after(self.timing.relay, lambda: self.client_done(job))

    def dispatch(self, started: Sequence[Any]) -> None:
        for job_id in started:
            job = self.jobs[job_id]
            backend = self.scheduler.backend_of(job_id)
            assert backend is not None
            job.started = self.loop.now
            job.backend = backend.name
            self.log(f"job {job.id} {job.model} of client {job.client} -> {backend.name}")
            target = self.backends[backend.name]
            self.loop.after(
                self.timing.wake + self.timing.relay, lambda j=job, t=target: t.arrive(j)
            )  # type: ignore[misc]

    # The work queue's timer (workqueue/gate.py ``_run_timer``, ``_poke_timer``)

    def poke(self) -> None:
        deadline = self.scheduler.next_deadline()
        if deadline is not None and (
            self._timer_deadline is None or deadline < self._timer_deadline
        ):
            self._arm(self.loop.now)

    def _arm(self, when: float) -> None:
        self._timer_gen += 1
        gen = self._timer_gen
        self.loop.at(when, lambda: self._timer(gen))

    def _timer(self, gen: int) -> None:
        if gen != self._timer_gen:
            return
        now = self.loop.now
        expired, started = self.scheduler.expire(now)
        assert not expired
        started += self.scheduler.tick(now)
        self.dispatch(started)
        deadline = self._timer_deadline = self.scheduler.next_deadline()
        if deadline is not None:
            self._arm(max(deadline, now) + TIMER_SLACK)

    def start_timer(self) -> None:
        self._timer_deadline = None

    # The pollers (fleet/runtime.py ``_poll_loop``)

    def refresh_ps(self, name: str) -> None:
        backend = self.backends[name]
        if not backend.ps_pending:
            backend.ps_pending = True
            self.loop.after(self.timing.poll, lambda: self._read_ps(backend))

    def _periodic(self, backend: SimBackend) -> None:
        """The poller's own clock: a read PS_INTERVAL after the last one."""
        if self.loop.now >= backend.next_ps - 1e-9:
            self.refresh_ps(backend.name)
            self.loop.after(self.timing.poll + PS_INTERVAL, lambda: self._periodic(backend))
        else:
            self.loop.at(backend.next_ps, lambda: self._periodic(backend))

    def _read_ps(self, backend: SimBackend) -> None:
        backend.ps_pending = False
        backend.next_ps = self.loop.now + PS_INTERVAL
        self.dispatch(self.scheduler.observe(backend.name, backend.view(), self.loop.now))

    # The run

    def run(self) -> dict[str, Any]:
        for backend in self.backends.values():
            self.scheduler.observe(backend.name, backend.view(), 0.0)
            backend.next_ps = self.timing.ps_phase
            self.loop.at(backend.next_ps, lambda b=backend: self._periodic(b))  # type: ignore[misc]
        for rank, client in enumerate(self.order):
            first = self.plans[client][0]
            self.loop.at(rank * self.timing.stagger, lambda j=first: self.send(j))  # type: ignore[misc]
        self.loop.run(HORIZON, done=lambda: self._left == 0)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        jobs = list(self.jobs.values())
        ended = [job.ended for job in jobs if job.ended is not None]
        makespan = max(ended) if len(ended) == len(jobs) else float("inf")
        ttfts = sorted(job.ttft for job in jobs if job.ttft is not None)
        placement: dict[str, Counter[str]] = {}
        for job in jobs:
            placement.setdefault(job.model.removesuffix(":latest"), Counter())[job.backend] += 1
        for backend in self.backends.values():
            backend.finish_stretches()
        P = self.setup.num_parallel
        return {
            "makespan": makespan,
            "loads": sum(b.loads for b in self.backends.values()),
            "evictions": sum(b.evictions for b in self.backends.values()),
            "ttft_p50": statistics.median(ttfts) if ttfts else None,
            "ttft_p99": ttfts[min(len(ttfts) - 1, math.ceil(0.99 * len(ttfts)) - 1)]
            if ttfts
            else None,
            "placement": {m: dict(sorted(c.items())) for m, c in sorted(placement.items())},
            "stretches": {
                name: [
                    (
                        s["model"].removesuffix(":latest"),
                        round(s["from"], 2),
                        round(min(s["to"], makespan), 2),
                        s["busy"] / (P * max(1e-9, min(s["to"], makespan) - s["from"])),
                    )
                    for s in sorted(b.stretches, key=lambda s: s["from"])
                ]
                for name, b in self.backends.items()
            },
        }


@dataclass(frozen=True)
class Plan:
    """A fixed placement that knows the draw: which models each backend holds, and when
    one of them gives its place to another (an oracle, for ``--search``).

    ``initial`` lists each backend's models in the order they are first sent there;
    each switch ``(at, backend, old, new)`` stops ``old`` taking new jobs there at ``at``
    (seconds into the flood); ``new`` takes the place once ``old``'s jobs there ended.
    """

    initial: tuple[tuple[str, ...], ...]
    switches: tuple[tuple[float, int, str, str], ...] = ()

    def describe(self) -> str:
        names = "abc"
        text = ", ".join(
            f"{names[i]} {{{' '.join(m.removesuffix(':latest') for m in ms)}}}"
            for i, ms in enumerate(self.initial)
        )
        for at, b, old, new in self.switches:
            text += f"; at {at:g} s {names[b]}: {old.removesuffix(':latest')} -> "
            text += new.removesuffix(":latest")
        return text


class _PlanBackend:
    __slots__ = ("backend", "models", "running")

    def __init__(self, backend: Backend, models: Sequence[str]) -> None:
        self.backend = backend
        self.models = list(models)
        self.running: Counter[str] = Counter()


class PlanScheduler:
    """FleetScheduler's interface (as far as ``Sim`` calls it) over a fixed ``Plan``.

    Jobs wait per model in arrival order; a backend runs at most ``model_concurrency``
    jobs of each model of its plan, and a model takes a place only once the backend has
    room (the model it replaces has no job running there any more).
    """

    def __init__(self, setup: Setup, plan: Plan) -> None:
        self.hosts = [
            _PlanBackend(backend, models)
            for backend, models in zip(backends_of(setup), plan.initial, strict=True)
        ]
        self.switches = sorted(plan.switches)
        self.waiting: dict[str, list[Any]] = {}
        self.where: dict[Any, _PlanBackend] = {}
        self.model_of: dict[Any, str] = {}
        self.now = 0.0

    def _advance(self, now: float) -> None:
        self.now = max(self.now, now)
        while self.switches and self.switches[0][0] <= self.now:
            _, index, old, new = self.switches.pop(0)
            models = self.hosts[index].models
            if old in models:
                models[models.index(old)] = new
            elif new not in models:
                models.append(new)

    def _pump(self) -> list[Any]:
        started = []
        for host in self.hosts:
            for model in host.models:
                queue = self.waiting.get(model)
                while queue and host.running[model] < host.backend.model_concurrency:
                    others = {m for m, n in host.running.items() if n and m != model}
                    if len(others) + 1 > host.backend.max_models:
                        break
                    job = queue.pop(0)
                    host.running[model] += 1
                    self.where[job] = host
                    started.append(job)
        return started

    def submit(self, job_id: Any, model: str, client: str, now: float) -> Any:
        self._advance(now)
        self.model_of[job_id] = model
        self.waiting.setdefault(model, []).append(job_id)
        started = self._pump()
        self._early = [job for job in started if job != job_id]
        return _Running if job_id in started else _Waiting

    def tick(self, now: float) -> list[Any]:
        self._advance(now)
        early, self._early = getattr(self, "_early", []), []
        return early + self._pump()

    def finish(self, job_id: Any, now: float) -> list[Any]:
        self._advance(now)
        host = self.where.pop(job_id)
        host.running[self.model_of.pop(job_id)] -= 1
        return self._pump()

    def expire(self, now: float) -> tuple[list[Any], list[Any]]:
        return [], self.tick(now)

    def observe(self, name: str, view: View, now: float) -> list[Any]:
        return self.tick(now)

    def next_deadline(self) -> float | None:
        return self.switches[0][0] if self.switches else None

    def backend_of(self, job_id: Any) -> Backend | None:
        host = self.where.get(job_id)
        return host.backend if host is not None else None


class _Admission:
    def __init__(self, value: str) -> None:
        self.value = value


_Running = _Admission("running")
_Waiting = _Admission("waiting")


def simulate(
    mix: str,
    make: Callable[[Setup], FleetScheduler] = gate_scheduler,
    timing: Timing = Timing(),
    *,
    order: Sequence[int] | None = None,
    trace: bool = False,
) -> tuple[dict[str, Any], Sim]:
    setup = bench_setup(mix)
    sim = Sim(setup, make(setup), timing, order=order, trace=trace)
    return sim.run(), sim


def jittered(rng: random.Random, base: Timing) -> Timing:
    """``base`` with each latency drawn from 0.5-2x, the poll phase anywhere in 5 s."""
    return Timing(
        relay=base.relay * rng.uniform(0.5, 2),
        client=base.client * rng.uniform(0.5, 2),
        poll=base.poll * rng.uniform(0.5, 2),
        wake=base.wake * rng.uniform(0.5, 2),
        job_extra=base.job_extra * rng.uniform(0.5, 2),
        stagger=base.stagger * rng.uniform(0.5, 2),
        ps_phase=rng.uniform(0, PS_INTERVAL),
    )


def report_line(mix: str, result: dict[str, Any]) -> str:
    bound = lower_bound(bench_setup(mix))["seconds"]
    return (
        f"{mix:6s} loads {result['loads']:2d} (evictions {result['evictions']}), makespan "
        f"{result['makespan']:6.2f} s = {result['makespan'] / bound:.2f}x the {bound:.1f} s "
        f"bound, TTFT p50/p99 {result['ttft_p50']:.2f}/{result['ttft_p99']:.2f} s"
    )


# The search for a better schedule (--search): fixed plans that know the draw


def plan_run(plan: Plan, timing: Timing, mix: str = "skewed") -> tuple[float, int]:
    """A plan's makespan and loads."""
    result, _ = simulate(mix, lambda setup: PlanScheduler(setup, plan), timing)  # type: ignore[arg-type,return-value]
    return result["makespan"], result["loads"]


def arrival_layout(timing: Timing, mix: str = "skewed") -> Plan:
    """The layout the gate's placement takes as the first jobs arrive: each backend's
    models in the order they were first loaded there."""
    result, _ = simulate(mix, timing=timing)
    return Plan(
        tuple(
            tuple(dict.fromkeys(f"{m}:latest" for m, *_ in result["stretches"][name]))
            for name in "abc"
        )
    )


def search(timing: Timing, steps: int, seed: int, log: Callable[[str], None]) -> None:
    """The best plans found with at most models + 2 loads, in three families:

    1. the arrival layout (the five models on the five places as their first jobs
       come, as any rule that fills a free place at once must) with every single switch
       and every copy-and-return pair (a light model gives its place to a copy of a heavy
       one at s1 and takes it back at s2), on a 0.5 s grid;
    2. the two heavy models on two places each from the start (a and c hold both, b one
       light model; the two other light models wait) with every pair of switches that
       brings the two waiting models in, on a 0.5 s grid;
    3. hill climbing from the best of both and from every one-place-per-model layout:
       ``steps`` random changes of a layout, a switch's time, place or models.
    """
    setup = bench_setup("skewed")
    names = setup.model_names
    limit = setup.models + 2
    counts = Counter(m for c in setup.plan() for m in c)
    heavy = [m for m, _ in counts.most_common(2)]
    light = [m for m in names if m not in heavy]
    grid = [x / 2 for x in range(0, 19)]
    best: dict[str, tuple[float, int, Plan]] = {}
    runs = 0

    def consider(family: str, plan: Plan) -> tuple[float, int]:
        nonlocal runs
        runs += 1
        makespan, loads = plan_run(plan, timing)
        if loads <= limit and (family not in best or makespan < best[family][0] - 1e-9):
            best[family] = (makespan, loads, plan)
        return makespan, loads

    base = arrival_layout(timing)
    consider("arrival", base)
    for index, models in enumerate(base.initial):
        for old in models:
            for new in names:
                if new in models:
                    continue
                for s1 in grid[1:]:  # from 0.5 s: the first places are taken by then
                    consider("arrival", Plan(base.initial, ((s1, index, old, new),)))
                    for s2 in grid:
                        if s2 > s1:
                            back = ((s1, index, old, new), (s2, index, new, old))
                            consider("arrival", Plan(base.initial, back))
    log(f"arrival layout: {runs} plans")
    h1, h2 = heavy
    for b_model in light:
        waiting = [m for m in light if m != b_model]
        for a in ((h1, h2), (h2, h1)):
            for c in ((h1, h2), (h2, h1)):
                layout = (a, (b_model,), c)
                places = [(0, h1), (0, h2), (2, h1), (2, h2), (1, b_model)]
                for (p1, o1), (p2, o2) in itertools.permutations(places, 2):
                    for s1 in grid[2:16]:
                        for s2 in grid[2:16]:
                            if s2 < s1:
                                continue
                            switches = ((s1, p1, o1, waiting[0]), (s2, p2, o2, waiting[1]))
                            consider("heavy doubled", Plan(layout, switches))
    log(f"heavy models doubled: {runs} plans in all")
    rng = random.Random(seed)
    pool = [entry[2] for entry in best.values()]
    for perm in itertools.permutations(names):
        pool.append(Plan(((perm[0], perm[1]), (perm[2],), (perm[3], perm[4]))))
    scored = sorted((consider("climbed", p)[0], i, p) for i, p in enumerate(pool))[:10]
    for step in range(steps):
        _, _, plan = scored[rng.randrange(len(scored))]
        changed = _mutate(plan, names, rng)
        if changed is None:
            continue
        makespan, loads = consider("climbed", changed)
        if loads <= limit and makespan < scored[-1][0]:
            scored[-1] = (makespan, step + len(pool), changed)
            scored.sort()
    log(f"hill climbing: {runs} plans in all")
    bound = lower_bound(setup)["seconds"]
    for family, (makespan, loads, plan) in best.items():
        log(
            f"best, {family}: {makespan:.2f} s = {makespan / bound:.2f}x the bound, "
            f"{loads} loads: {plan.describe()}"
        )


def _mutate(plan: Plan, names: Sequence[str], rng: random.Random) -> Plan | None:
    initial = [list(models) for models in plan.initial]
    switches = list(plan.switches)
    roll = rng.random()
    if switches and roll < 0.4:
        i = rng.randrange(len(switches))
        at, b, old, new = switches[i]
        switches[i] = (max(0.0, at + rng.choice((-1, -0.5, -0.25, 0.25, 0.5, 1))), b, old, new)
    elif switches and roll < 0.55:
        i = rng.randrange(len(switches))
        at, b, old, new = switches[i]
        switches[i] = (at, b, old, rng.choice([m for m in names if m not in initial[b]]))
    elif len(switches) < 2 and roll < 0.7:
        b = rng.randrange(len(initial))
        old = rng.choice(initial[b])
        new = rng.choice([m for m in names if m not in initial[b]])
        switches.append((rng.choice([x / 2 for x in range(19)]), b, old, new))
    else:
        b = rng.randrange(len(initial))
        if len(initial[b]) > 1 and rng.random() < 0.5:
            initial[b].reverse()
        else:
            initial[b][rng.randrange(len(initial[b]))] = rng.choice(names)
        if len(set(initial[b])) < len(initial[b]):
            return None
    return Plan(tuple(tuple(models) for models in initial), tuple(sorted(switches)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mix", choices=("even", "skewed", "both"), default="both")
    parser.add_argument("--quiet", action="store_true",
                        help="latencies of a quiet machine (default: the loaded one)")  # fmt: skip
    parser.add_argument("--switch-after", type=float, help="GATE_SWITCH_AFTER (default 10)")
    parser.add_argument("--copy-depth", type=int, help="FleetScheduler's copy_depth (default 2)")
    parser.add_argument("--runs", type=int, default=0, help="runs with jittered latencies")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trace", action="store_true", help="print every placement")
    parser.add_argument("--search", type=int, metavar="STEPS",
                        help="search plans for the skewed mix (hill-climbing steps)")  # fmt: skip
    args = parser.parse_args(argv)
    timing = QUIET if args.quiet else LOADED
    if args.search is not None:
        search(timing, args.search, args.seed, print)
        return 0
    settings: dict[str, Any] = {}
    if args.switch_after is not None:
        settings["switch_after"] = args.switch_after

    def make(setup: Setup) -> FleetScheduler:
        scheduler = gate_scheduler(setup, **settings)
        if args.copy_depth is not None:
            scheduler.copy_depth = args.copy_depth
        return scheduler

    mixes = ["even", "skewed"] if args.mix == "both" else [args.mix]
    for mix in mixes:
        result, sim = simulate(mix, make, timing, trace=args.trace)
        print(report_line(mix, result))
        print("  placement: " + "; ".join(
            f"{m} " + ", ".join(f"{b} {n}" for b, n in where.items())
            for m, where in result["placement"].items()
        ))  # fmt: skip
        for name, stretches in result["stretches"].items():
            print(
                f"  {name}: "
                + ", ".join(f"{m} {a:.1f}-{b:.1f} s {busy:.0%}" for m, a, b, busy in stretches)
            )
        if args.trace:
            print("\n".join(sim.lines))
        if args.runs:
            rng = random.Random(args.seed)
            spans, loads = [], []
            for _ in range(args.runs):
                order = list(range(setup_clients(mix)))
                rng.shuffle(order)
                res, _ = simulate(mix, make, jittered(rng, timing), order=order)
                spans.append(res["makespan"])
                loads.append(res["loads"])
            print(
                f"  {args.runs} jittered runs: makespan {min(spans):.2f}-{max(spans):.2f} s "
                f"(median {statistics.median(spans):.2f}), loads {min(loads)}-{max(loads)}"
            )
    return 0


def setup_clients(mix: str) -> int:
    return int(bench_setup(mix).clients)


if __name__ == "__main__":
    sys.exit(main())
