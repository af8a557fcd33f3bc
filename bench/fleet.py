"""Several backends: the gate's placement against the routers peers use, on one flood.

Three fake Ollamas in their Ollama-like mode (``--on-overflow queue``: arrival order,
head of line, one load at a time, evict an idle model when VRAM is full, as Ollama's
server/sched.go) have every model installed and VRAM for 2, 1 and 2 of them
(``--vram-bytes``, models of equal size), ``num_parallel`` 2. Twenty clients each stream
three generations, one after the other: 60 jobs over 5 models, in two mixes: ``even``
(each client three different models, 12 jobs per model) and ``skewed`` (a fixed random
mix: 18, 18, 10, 8 and 6 jobs). Each mix goes, against the same fakes reset in between:

* through the gate (one gevent worker; GATE_BACKENDS_FILE with each backend's
  ``max_models``, ``vram`` and ``model_concurrency``; each client its own address);
  with ``--unload on`` the gate unloads what a new place replaces (GATE_UNLOAD_ON_SWITCH),
  with ``--unload both`` once each way;
* round-robin across the backends;
* "loaded first, no slots": a backend whose ``/api/ps`` lists the model (read just before
  each request), else round-robin; no limit on what runs at once.

The two peers route in the client itself, so they pay no relay hop at all. A request a
backend crashed (500, with ``--on-overflow crash``) is sent again, as a client would, up
to MAX_TRIES times. A last run sends the even mix through a fresh gate and SIGKILLs
backend ``a`` half a job after a third of the jobs have finished: what finished, what
failed, whether anything hung or left a slot held.

During each flood a thread reads every fake's loaded, loading and running models every
SAMPLE_EVERY seconds (``timeline``): per backend, each model's stretch loaded there with
the share of its slots busy meanwhile, and over the fleet the slot-seconds left idle while
some job waited, which shows where a strategy loses time against the bound.

The lower bound of the makespan (``lower_bound``): at any moment a backend b serves at
most P (``num_parallel``) jobs for each of the M_b models it can hold, and it loads one
model at a time, so its i-th place serves from i x L (the load time) at the earliest.
Over a makespan T the fleet has at most P x sum_b sum_{i=1..M_b} (T - i x L)
slot-seconds. Every model loads at least once, so with K models on S = sum_b M_b places
at least max(0, K - S) loads come beyond one per place, and each idles a place for L
(P x L slot-seconds). A model m with J_m jobs that keeps one place ends at
L + ceil(J_m / P) x t at the earliest; each model for which that is later than T needs a
second load (k(T) of them). What is left must cover the work N x t:

    T >= (N x t + L x P x sum_b M_b (M_b + 1) / 2 + P x L x max(0, K + k(T) - S)) / (P x S)

i.e. the work over the slots plus the loads no router avoids; the bound is the least T
that satisfies it (k falls as T grows). Also reported: the same without k (work and
staggered loads alone) and the best makespan while each model keeps a single place.

    .venv/bin/python bench/fleet.py [--quick] [--mix even|skewed|both] [--unload off|on|both]
                                    [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
from harness import Children  # noqa: E402

from fakeollama.process import FakeOllamaProcess  # noqa: E402

GB = 1000**3
SKEW_SEED = 7
# A request the backend crashed (500, ``--on-overflow crash``) is sent again, as a client
# would, at most this many times: until it is answered it is work not done.
MAX_TRIES = 20
STRATEGIES = ("gate", "gate_unload", "round_robin", "loaded_first")
LABELS = {
    "gate": "gate",
    "gate_unload": "gate, unload on switch",
    "round_robin": "round-robin",
    "loaded_first": "loaded-first, no slots",
}
# The gate runs of each --unload choice.
GATES = {"off": ("gate",), "on": ("gate_unload",), "both": ("gate", "gate_unload")}
# Seconds between two readings of the fakes' loaded models and running jobs (the timeline).
SAMPLE_EVERY = 0.1


@dataclass(frozen=True)
class Setup:
    """One run's shape: the fleet, the models and the flood."""

    places: tuple[int, ...]  # models each backend's VRAM holds
    models: int
    clients: int
    jobs_per_client: int
    tokens: int
    token_interval: float
    load_time: float
    num_parallel: int
    model_gb: int
    timeout: float  # seconds a job may go without a byte before it counts as hung
    on_overflow: str
    mix: str = "even"  # even: each model as often; skewed: a fixed random mix

    @property
    def model_names(self) -> list[str]:
        return [f"m{i + 1}:latest" for i in range(self.models)]

    @property
    def jobs(self) -> int:
        return self.clients * self.jobs_per_client

    @property
    def job_seconds(self) -> float:
        return self.tokens * self.token_interval

    def plan(self) -> list[list[str]]:
        """Each client's models, in order.

        ``even``: client c's k-th job is model (c + k) mod models, so every model has
        as many jobs. ``skewed``: each job a model drawn at random (seed 7; with the
        defaults 18, 18, 10, 8 and 6 jobs), so the busiest models outgrow one place.
        """
        names = self.model_names
        if self.mix == "even":
            return [
                [names[(c + k) % len(names)] for k in range(self.jobs_per_client)]
                for c in range(self.clients)
            ]
        rng = random.Random(SKEW_SEED)
        plan: list[list[str]] = [[] for _ in range(self.clients)]
        for i in range(self.jobs):
            plan[i % self.clients].append(rng.choice(names))
        return plan


def lower_bound(setup: Setup) -> dict[str, float]:
    """The makespan no router can beat on this fleet (module docstring), and its parts."""
    slots = sum(setup.num_parallel * m for m in setup.places)
    work = setup.jobs * setup.job_seconds
    staggered = setup.load_time * sum(setup.num_parallel * m * (m + 1) / 2 for m in setup.places)
    # A model whose jobs cannot end by T on one place (one load, num_parallel slots) needs
    # a second load; beyond one load per place, each load idles a place for load_time.
    counts = Counter(model for models in setup.plan() for model in models)
    one_place_ends = [
        setup.load_time + math.ceil(n / setup.num_parallel) * setup.job_seconds
        for n in counts.values()
    ]
    places = sum(setup.places)

    def bound(forced: int) -> float:
        extra = max(0, len(counts) + forced - places)
        return (work + staggered + setup.num_parallel * setup.load_time * extra) / slots

    def forced_at(seconds: float) -> int:
        return sum(end > seconds for end in one_place_ends)

    # The least T with T >= bound(forced_at(T)): forced_at falls as T grows, so the set
    # of such T is an up-set; its least point is one of these candidates.
    candidates = sorted({bound(k) for k in range(len(counts) + 1)} | set(one_place_ends))
    seconds = next(t for t in candidates if t >= bound(forced_at(t)) - 1e-9)
    return {
        "seconds": seconds,
        "naive_seconds": (work + staggered) / slots,
        "work_over_slots": work / slots,
        "loads_term": staggered / slots,
        "forced_copies": forced_at(seconds),
        "slots": slots,
        "min_loads": setup.models,
        "one_place_seconds": one_place(setup),
    }


def one_place(setup: Setup) -> float:
    """The best makespan while each model keeps one place (no load beyond the first):
    the busiest model's jobs over its ``num_parallel`` slots, after its load."""
    counts = Counter(model for models in setup.plan() for model in models)
    busiest = max(counts.values())
    return math.ceil(busiest / setup.num_parallel) * setup.job_seconds + setup.load_time


# The flood


@dataclass
class Job:
    client: int
    model: str
    backend: str = ""
    status: int = 0
    outcome: str = "pending"  # ok | http_error | stream_error | cut | refused | hung
    ttft: float | None = None  # from the first try
    seconds: float = 0.0  # from the first try to the end of the last
    sent_at: float = 0.0  # the first try
    tries: int = 0


# (client, model) -> (backend name, URL, extra headers)
Route = Callable[[int, str], tuple[str, str, dict[str, str]]]


def stream_job(job: Job, name: str, url: str, headers: dict[str, str], setup: Setup) -> None:
    """Stream one generation; fill in the job's outcome, TTFT and backend."""
    parts = urlsplit(url)
    body = json.dumps(
        {
            "model": job.model,
            "prompt": f"client {job.client}",
            "stream": True,
            "options": {"num_predict": setup.tokens},
        }
    ).encode()
    started = time.monotonic()
    if not job.tries:
        job.sent_at = started
    job.tries += 1
    job.backend = name
    job.status = 0
    job.outcome = "pending"
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=setup.timeout)
    try:
        conn.request(
            "POST",
            "/api/generate",
            body,
            {"Content-Type": "application/json", **headers},
        )
        resp = conn.getresponse()
        job.status = resp.status
        job.backend = resp.getheader("X-Gate-Backend") or name
        if resp.status != 200:
            resp.read()
            job.outcome = "http_error"
            return
        job.outcome = "cut"  # until the final line says otherwise
        while line := resp.readline():
            record = json.loads(line)
            if "error" in record:
                job.outcome = "stream_error"
                break
            if job.ttft is None and record.get("response"):
                job.ttft = time.monotonic() - job.sent_at
            if record.get("done"):
                job.outcome = "ok"
                break
    except TimeoutError:
        job.outcome = "hung"
    except (ConnectionError, http.client.HTTPException, OSError, ValueError):
        job.outcome = "refused" if job.status == 0 else "cut"
    finally:
        job.seconds = time.monotonic() - job.sent_at
        conn.close()


class Flood:
    """Clients that each run their jobs one after another, all clients at once."""

    def __init__(self, setup: Setup, route: Route) -> None:
        self.setup = setup
        self.route = route
        self.jobs = [Job(c, model) for c, models in enumerate(setup.plan()) for model in models]
        self.done = 0
        self._changed = threading.Condition()
        self.started = 0.0
        self.ended = 0.0

    def _client(self, jobs: list[Job]) -> None:
        for job in jobs:
            while True:
                name, url, headers = self.route(job.client, job.model)
                stream_job(job, name, url, headers, self.setup)
                if job.status != 500 or job.tries >= MAX_TRIES:
                    break
            with self._changed:
                self.done += 1
                self._changed.notify_all()

    def wait_done(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.done >= count, timeout)

    def run(self, during: Callable[[Flood], None] | None = None) -> None:
        by_client: dict[int, list[Job]] = {}
        for job in self.jobs:
            by_client.setdefault(job.client, []).append(job)
        threads = [
            threading.Thread(target=self._client, args=(jobs,), daemon=True)
            for jobs in by_client.values()
        ]
        self.started = time.monotonic()
        for thread in threads:
            thread.start()
        if during is not None:
            during(self)
        # Bounded: every read times out after setup.timeout, and a client has few jobs.
        deadline = self.started + self.setup.jobs_per_client * (self.setup.timeout + 60)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.ended = max((job.sent_at + job.seconds for job in self.jobs), default=self.started)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


# The fleet and the routers


class Fleet:
    """The three fake Ollamas, by name."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        models = ",".join(f"{name}={setup.model_gb}GB" for name in setup.model_names)
        self.fakes: dict[str, FakeOllamaProcess] = {}
        for index, places in enumerate(setup.places):
            self.fakes[chr(ord("a") + index)] = FakeOllamaProcess(
                models=models,
                vram_bytes=places * setup.model_gb * GB,
                num_parallel=setup.num_parallel,
                load_time=setup.load_time,
                token_interval=setup.token_interval,
                on_overflow=setup.on_overflow,
                keep_alive=-1,  # no expiry during a run: only evictions unload
                record_requests=False,
            )
        self._files: list[Path] = []

    def start(self) -> None:
        """Start the fakes side by side (each takes a moment to import its server)."""
        threads = [threading.Thread(target=fake.start) for fake in self.fakes.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        missing = [name for name, fake in self.fakes.items() if not fake.running]
        if missing:
            raise RuntimeError(f"fake Ollama {', '.join(missing)} did not start")

    def stop(self) -> None:
        for fake in self.fakes.values():
            fake.kill()
        for path in self._files:
            path.unlink(missing_ok=True)

    def reset(self) -> None:
        for fake in self.fakes.values():
            fake.reset()

    def counters(self) -> dict[str, Any]:
        per: dict[str, Any] = {}
        for name, fake in self.fakes.items():
            if not fake.running:
                per[name] = None
                continue
            stats = fake.stats(requests=False)
            per[name] = {
                "loads": stats["total_loads"],
                "evictions": sum(stats["evictions"].values()),
                "unloads": sum(stats["unloads"].values()),
                "crashes": stats["crashes"],
                "loaded": stats["loaded"],
            }
        live = [row for row in per.values() if row is not None]
        return {
            "loads": sum(row["loads"] for row in live),
            "evictions": sum(row["evictions"] for row in live),
            "unloads": sum(row["unloads"] for row in live),
            "crashes": sum(row["crashes"] for row in live),
            "backends": per,
        }

    def backends_file(self) -> Path:
        text = ""
        for (name, fake), places in zip(self.fakes.items(), self.setup.places, strict=True):
            text += (
                f'[backends.{name}]\nurl = "{fake.url}"\nmax_models = {places}\n'
                f'vram = "{places * self.setup.model_gb}GB"\n'
                f"model_concurrency = {self.setup.num_parallel}\n\n"
            )
        path = Path(tempfile.gettempdir()) / f"bench-fleet-{time.monotonic_ns()}.toml"
        path.write_text(text)
        self._files.append(path)
        return path


def round_robin(fleet: Fleet) -> Route:
    """Each job to the next backend in turn."""
    names = list(fleet.fakes)
    turn = itertools.count()
    lock = threading.Lock()

    def route(client: int, model: str) -> tuple[str, str, dict[str, str]]:
        with lock:
            name = names[next(turn) % len(names)]
        return name, fleet.fakes[name].url, {}

    return route


def loaded_first(fleet: Fleet) -> Route:
    """A backend whose /api/ps lists the model (in turn among them), else the next in turn."""
    names = list(fleet.fakes)
    turn = itertools.count()
    lock = threading.Lock()

    def loaded(name: str, model: str) -> bool:
        try:
            with urllib.request.urlopen(fleet.fakes[name].url + "/api/ps", timeout=5) as resp:
                rows = json.loads(resp.read()).get("models", [])
        except OSError:
            return False
        return any(row.get("model") == model for row in rows)

    def route(client: int, model: str) -> tuple[str, str, dict[str, str]]:
        holders = [name for name in names if loaded(name, model)]
        with lock:
            step = next(turn)
        name = holders[step % len(holders)] if holders else names[step % len(names)]
        return name, fleet.fakes[name].url, {}

    return route


def client_address(client: int) -> str:
    return f"10.0.{client // 250}.{client % 250 + 1}"


class GateRun:
    """A fresh gate in front of the fleet, ready once its catalogue has read every backend."""

    def __init__(self, children: Children, fleet: Fleet, *, unload: bool = False) -> None:
        first = next(iter(fleet.fakes.values())).url
        env = {
            "GATE_BACKENDS_FILE": str(fleet.backends_file()),
            "GATE_TRUSTED_PROXIES": "1",  # X-Forwarded-For names each bench client
            "GATE_UNLOAD_ON_SWITCH": "1" if unload else "0",
        }
        self.gate = harness.start_gate(children, first, env)
        self.children = children
        self.url = self.gate.url
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = self.status().get("backends") or []
            if rows and all(
                row.get("health") == "up" and row.get("installed") is not None for row in rows
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the gate's catalogue did not read the backends: see {self.gate.log}")

    def status(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.url + "/gate/status.json", timeout=5) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except OSError:
            return {}

    def route(self, client: int, model: str) -> tuple[str, str, dict[str, str]]:
        """Every job to the gate, from its client's own address."""
        return "gate", self.url, {"X-Forwarded-For": client_address(client)}

    def held(self, timeout: float = 10) -> dict[str, int]:
        """Slots held and jobs waiting once the flood is over (both 0 unless one leaked)."""
        deadline = time.monotonic() + timeout
        while True:
            queue = self.status().get("queue") or {}
            held = {"running": queue.get("running", -1), "waiting": queue.get("waiting", -1)}
            if held == {"running": 0, "waiting": 0} or time.monotonic() >= deadline:
                return held
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGKILL: the flood is over, and a graceful drain would only add seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.gate.master.pid, signal.SIGKILL)
        self.children.stop(self.gate.master)


# One flood through one router, summarised


def summarise(flood: Flood, counters: dict[str, Any], setup: Setup) -> dict[str, Any]:
    jobs = flood.jobs
    outcomes = Counter(job.outcome for job in jobs)
    ttfts = [job.ttft for job in jobs if job.ttft is not None]
    placement: dict[str, dict[str, int]] = {}
    for job in jobs:
        if job.outcome == "ok":
            row = placement.setdefault(job.model.removesuffix(":latest"), {})
            row[job.backend] = row.get(job.backend, 0) + 1
    return {
        "jobs": len(jobs),
        "ok": outcomes.get("ok", 0),
        "failed": len(jobs) - outcomes.get("ok", 0),
        "outcomes": dict(sorted(outcomes.items())),
        "hung": outcomes.get("hung", 0),
        "resent": sum(job.tries - 1 for job in jobs),
        "loads": counters["loads"],
        "evictions": counters["evictions"],
        "unloads": counters.get("unloads", 0),
        "crashes": counters["crashes"],
        "makespan": flood.ended - flood.started,
        "ttft_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_p99": percentile(ttfts, 0.99),
        "placement": dict(sorted(placement.items())),
        "backends": counters["backends"],
    }


def run_flood(setup: Setup, route: Route, fleet: Fleet, during: Any = None) -> dict[str, Any]:
    flood = Flood(setup, route)
    sampler = Sampler(fleet)
    sampler.start()
    try:
        flood.run(during)
    finally:
        sampler.stop()
    result = summarise(flood, fleet.counters(), setup)
    result["timeline"] = timeline(sampler.samples, flood, setup)
    return result


class Sampler:
    """Reads every fake's loaded, loading and running models every SAMPLE_EVERY seconds."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.samples: list[tuple[float, dict[str, dict[str, Any]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            at = time.monotonic()
            row: dict[str, dict[str, Any]] = {}
            for name, fake in self.fleet.fakes.items():
                try:
                    stats = fake.stats(requests=False)
                except Exception:  # a killed fake: nothing loaded, nothing runs
                    stats = {"loaded": [], "loading": [], "running": {}}
                row[name] = {
                    "loaded": stats["loaded"],
                    "loading": stats["loading"],
                    "running": stats.get("running", {}),
                }
            self.samples.append((at, row))
            self._stop.wait(max(0.0, SAMPLE_EVERY - (time.monotonic() - at)))


def timeline(
    samples: Sequence[tuple[float, dict[str, dict[str, Any]]]], flood: Flood, setup: Setup
) -> dict[str, Any]:
    """Where the slots' time went, from the fakes' readings during one flood.

    Per backend: each model's stretches loaded there (from, to, in seconds after the
    flood started) with the share of its slots busy meanwhile, seconds spent loading,
    busy slot-seconds. Over the fleet: slot-seconds left idle while some job waited (sent,
    no first token yet), split into idle slots of loaded models and places empty or
    loading.
    """
    start, end = flood.started, flood.ended
    first = {
        id(job): job.sent_at + job.ttft if job.ttft is not None else None for job in flood.jobs
    }
    waits = [(job.sent_at, first[id(job)] or job.sent_at + job.seconds) for job in flood.jobs]
    P = setup.num_parallel
    places = {chr(ord("a") + i): n for i, n in enumerate(setup.places)}  # as Fleet names them
    per: dict[str, dict[str, Any]] = {
        name: {"places": [], "loading_s": 0.0, "busy_slot_s": 0.0, "offered_slot_s": 0.0}
        for name in places
    }
    open_: dict[tuple[str, str], dict[str, Any]] = {}
    idle_loaded = idle_empty = 0.0
    for i, (at, row) in enumerate(samples):
        if at < start or at > end:
            continue
        dt = (samples[i + 1][0] if i + 1 < len(samples) else at + SAMPLE_EVERY) - at
        dt = min(dt, end - at)
        waiting = sum(sent <= at < got for sent, got in waits)
        for name, reading in row.items():
            if name not in per:
                continue
            running = sum(reading["running"].values())
            loaded = reading["loaded"]
            per[name]["busy_slot_s"] += running * dt
            per[name]["offered_slot_s"] += places[name] * P * dt
            if reading["loading"]:
                per[name]["loading_s"] += dt
            if waiting:
                idle_loaded += sum(P - reading["running"].get(m, 0) for m in loaded) * dt
                idle_empty += max(0, places[name] - len(loaded)) * P * dt
            for model in loaded:
                stretch = open_.get((name, model))
                if stretch is None or stretch["to"] < at - start - 2 * SAMPLE_EVERY:
                    stretch = {"model": model.removesuffix(":latest"), "from": at - start}
                    stretch.update(to=at - start, busy=0.0, span=0.0)
                    open_[name, model] = stretch
                    per[name]["places"].append(stretch)
                stretch["to"] = at - start + dt
                stretch["busy"] += reading["running"].get(model, 0) * dt
                stretch["span"] += P * dt
    for row in per.values():
        for stretch in row["places"]:
            span = stretch.pop("span")
            stretch["busy_share"] = stretch.pop("busy") / span if span else 0.0
            stretch["from"], stretch["to"] = round(stretch["from"], 2), round(stretch["to"], 2)
        row["busy_share"] = (
            row["busy_slot_s"] / row["offered_slot_s"] if row["offered_slot_s"] else 0
        )
    return {
        "backends": per,
        "idle_slot_s_while_waiting": {
            "loaded_models": idle_loaded,
            "places_empty_or_loading": idle_empty,
        },
    }


def kill_run(setup: Setup, fleet: Fleet, gate: GateRun, victim: str) -> dict[str, Any]:
    """The flood through the gate, backend ``victim`` SIGKILLed once a third of it is done."""
    before: dict[str, Any] = {}

    def during(flood: Flood) -> None:
        bound = setup.jobs_per_client * (setup.timeout + 60)
        if not flood.wait_done(max(1, setup.jobs // 3), bound):
            return
        # Jobs end in waves (they start together after a load); half a job later the
        # next wave is streaming, so the kill cuts streams rather than idle slots.
        time.sleep(setup.job_seconds / 2)
        fake = fleet.fakes[victim]
        stats = fake.stats(requests=False)
        before.update(
            loads=stats["total_loads"],
            evictions=sum(stats["evictions"].values()),
            crashes=stats["crashes"],
            loaded=stats["loaded"],
        )
        before["at"] = time.monotonic() - flood.started
        before["jobs_done"] = flood.done
        fake.kill()

    flood = Flood(setup, gate.route)
    flood.run(during)
    counters = fleet.counters()
    if before:
        counters["backends"][victim] = {k: before[k] for k in ("loads", "evictions", "crashes")}
        for key in ("loads", "evictions", "crashes"):
            counters[key] += before[key]
    result = summarise(flood, counters, setup)
    kill_at = flood.started + before.get("at", float("inf"))
    cut = [j for j in flood.jobs if j.sent_at < kill_at and j.sent_at + j.seconds >= kill_at]
    after = [j for j in flood.jobs if j.sent_at >= kill_at]
    result["killed"] = {
        "backend": victim,
        "at": before.get("at"),
        "jobs_done_before": before.get("jobs_done"),
        "loaded_on_it": before.get("loaded"),
    }
    result["in_flight_at_kill"] = {
        "jobs": len(cut),
        "outcomes": dict(sorted(Counter(j.outcome for j in cut).items())),
        "on_killed_backend": dict(
            sorted(Counter(j.outcome for j in cut if j.backend == victim).items())
        ),
    }
    result["sent_after_kill"] = {
        "jobs": len(after),
        "outcomes": dict(sorted(Counter(j.outcome for j in after).items())),
        "backends": dict(sorted(Counter(j.backend for j in after if j.outcome == "ok").items())),
    }
    result["held_after"] = gate.held()
    result["setup_mix"] = setup.mix
    return result


def targets(
    setup: Setup, bound: dict[str, float], runs: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The issue's targets for the gate's run, each with its value, limit and whether met."""
    gate = runs["gate"] if "gate" in runs else runs["gate_unload"]
    peers = [runs[name]["makespan"] for name in ("round_robin", "loaded_first") if name in runs]
    best_peer = min(peers) if peers else float("nan")
    checks = {
        "crashes": (gate["crashes"], 0),
        "loads": (gate["loads"], setup.models + 2),
        "makespan_vs_bound": (gate["makespan"] / bound["seconds"], 1.25),
        "makespan_vs_best_peer": (gate["makespan"] / best_peer, 0.5),
        "failed": (gate["failed"], 0),
    }
    if not peers:
        del checks["makespan_vs_best_peer"]
    return {
        name: {"value": value, "limit": limit, "met": value <= limit}
        for name, (value, limit) in checks.items()
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def report(
    base: Setup,
    results: dict[str, dict[str, Any]],
    kills: Sequence[dict[str, Any]],
    info: dict[str, str],
    elapsed: float,
) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "",
        f"Fleet: {base.jobs} streaming jobs from {base.clients} clients over "
        f"{base.models} models; backends holding {', '.join(map(str, base.places))} models, "
        f"num_parallel {base.num_parallel}; {base.tokens} tokens at "
        f"{base.token_interval:g} s ({base.job_seconds:g} s a job), loads "
        f"{base.load_time:g} s, --on-overflow {base.on_overflow}; {when}, "
        f"{info.get('nproc')} cores, load {info.get('loadavg')}; {elapsed:.0f} s in all",
    ]
    for mix, result in results.items():
        lines += mix_report(mix, result)
    for killed in kills:
        kill = killed["killed"]
        lines += [
            "",
            f"Through the {LABELS[killed['gate']]}, {killed['setup_mix']} mix, backend "
            f"{kill['backend']} killed at "
            f"{_fmt(kill['at'], ' s')} ({kill['jobs_done_before']} jobs done; it had "
            f"{kill['loaded_on_it']} loaded): {killed['ok']} ok, {killed['failed']} failed "
            f"{killed['outcomes']}, {killed['hung']} hung, makespan {killed['makespan']:.2f} s, "
            f"loads {killed['loads']} (evictions {killed['evictions']}, unloads "
            f"{killed['unloads']}), crashes {killed['crashes']}.",
            f"In flight at the kill: {killed['in_flight_at_kill']}.",
            f"Sent after the kill: {killed['sent_after_kill']}.",
            f"Held after the flood: {killed['held_after']}.",
        ]
    return "\n".join(lines)


def mix_report(mix: str, result: dict[str, Any]) -> list[str]:
    bound = result["lower_bound"]
    setup = result["setup"]
    runs = result["runs"]
    names = [name for name in STRATEGIES if name in runs]
    slot_loads = bound["loads_term"] * bound["slots"] / max(setup["load_time"], 1e-9)
    extra = round((bound["seconds"] - bound["naive_seconds"]) * bound["slots"])
    lines = [
        "",
        f"{mix} mix, jobs per model {result['jobs_per_model']}. Lower bound: "
        f"({setup['jobs']} x {setup['job_seconds']:g} s + {setup['load_time']:g} s x "
        f"{slot_loads:g} staggered slot-loads"
        + (f" + {extra:g} slot-seconds of the loads beyond one per place" if extra else "")
        + f") / {bound['slots']:g} slots = {bound['seconds']:.2f} s "
        f"(work and staggered loads alone: {bound['naive_seconds']:.2f} s; models that "
        f"need a second place to end by then: {bound['forced_copies']}); at least "
        f"{bound['min_loads']} loads; with one place per model at best "
        f"{bound['one_place_seconds']:.2f} s",
        "",
        "| | " + " | ".join(LABELS[name] for name in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = [
        ("ok", "ok", ""),
        ("failed", "failed", ""),
        ("hung", "hung", ""),
        ("resent after a crash", "resent", ""),
        ("model loads", "loads", ""),
        ("evictions (Ollama's own)", "evictions", ""),
        ("unloads (keep_alive: 0)", "unloads", ""),
        ("crashes", "crashes", ""),
        ("makespan", "makespan", " s"),
        ("TTFT p50", "ttft_p50", " s"),
        ("TTFT p99", "ttft_p99", " s"),
    ]
    for label, key, unit in rows:
        cells = [_fmt(runs[name][key], unit) for name in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{runs[name]['makespan'] / bound['seconds']:.2f}x" for name in names]
    lines.append("| makespan / lower bound | " + " | ".join(cells) + " |")
    lines += ["", "Targets (gate): " + "; ".join(
        f"{name} {_fmt(check['value'])} <= {check['limit']}: {'met' if check['met'] else 'MISSED'}"
        for name, check in result["targets"].items()
    )]  # fmt: skip
    for name in names:
        run = runs[name]
        if name.startswith("gate"):
            lines.append(
                f"{LABELS[name].capitalize()}: placement (jobs per backend): "
                + "; ".join(
                    f"{model} " + ", ".join(f"{b} {n}" for b, n in sorted(where.items()))
                    for model, where in run["placement"].items()
                )
                + f"; held after the flood: {run['held_after']}"
            )
        lines += timeline_lines(LABELS[name], run.get("timeline"))
    return lines


def timeline_lines(label: str, line: dict[str, Any] | None) -> list[str]:
    """One line per backend: each model's stretch loaded there and how busy its slots were."""
    if not line:
        return []
    idle = line["idle_slot_s_while_waiting"]
    out = [
        f"  {label}, while a job waited: {idle['loaded_models']:.1f} slot-s idle on loaded "
        f"models, {idle['places_empty_or_loading']:.1f} slot-s in places empty or loading"
    ]
    for name, row in line["backends"].items():
        stretches = ", ".join(
            f"{p['model']} {p['from']:.1f}-{p['to']:.1f} s {p['busy_share']:.0%}"
            for p in row["places"]
        )
        out.append(
            f"  {name}: slots busy {row['busy_share']:.0%}, loading {row['loading_s']:.1f} s; "
            f"loaded (slots busy): {stretches}"
        )
    return out


# Command line


def setup_from(args: argparse.Namespace) -> Setup:
    if args.quick:
        return Setup(
            places=(2, 1, 2),
            models=5,
            clients=5,
            jobs_per_client=3,
            tokens=10,
            token_interval=0.01,
            load_time=0.2,
            num_parallel=2,
            model_gb=4,
            timeout=20,
            on_overflow=args.on_overflow,
        )
    return Setup(
        places=tuple(args.places),
        models=args.models,
        clients=args.clients,
        jobs_per_client=args.jobs_per_client,
        tokens=args.tokens,
        token_interval=args.token_interval,
        load_time=args.load_time,
        num_parallel=args.num_parallel,
        model_gb=4,
        timeout=args.timeout,
        on_overflow=args.on_overflow,
    )


def compare(
    setup: Setup,
    fleet: Fleet,
    children: Children,
    log: Callable[[str], None],
    peers: Sequence[str] = STRATEGIES[2:],
    gates: Sequence[str] = ("gate",),
) -> dict[str, Any]:
    """One mix through the gate and the peers, each against freshly reset backends."""
    runs: dict[str, dict[str, Any]] = {}
    for name in gates:
        fleet.reset()
        gate = GateRun(children, fleet, unload=name == "gate_unload")
        log(f"{setup.mix} mix: through the gate {gate.url} ({LABELS[name]})")
        runs[name] = run_flood(setup, gate.route, fleet)
        runs[name]["held_after"] = gate.held()
        gate.stop()
    routers = {"round_robin": round_robin, "loaded_first": loaded_first}
    for name in peers:
        make = routers[name]
        fleet.reset()
        log(f"{setup.mix} mix: {name}")
        runs[name] = run_flood(setup, make(fleet), fleet)
    bound = lower_bound(setup)
    return {
        "setup": asdict(setup) | {"jobs": setup.jobs, "job_seconds": setup.job_seconds},
        "jobs_per_model": dict(
            sorted(Counter(m.removesuffix(":latest") for c in setup.plan() for m in c).items())
        ),
        "lower_bound": bound,
        "runs": runs,
        "targets": targets(setup, bound, runs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--mix", choices=("even", "skewed", "both"), default=None,
                        help="models per job (default: both; --quick: even)")  # fmt: skip
    parser.add_argument("--places", type=int, nargs="+", default=[2, 1, 2])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs-per-client", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--token-interval", type=float, default=0.02)
    parser.add_argument("--load-time", type=float, default=1.0)
    parser.add_argument("--num-parallel", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--on-overflow", choices=("queue", "crash"), default="queue")
    parser.add_argument("--skip-kill", action="store_true", help="leave out the killed backend")
    parser.add_argument("--gate-only", action="store_true", help="leave out the peer routers")
    parser.add_argument("--unload", choices=("off", "on", "both"), default="off",
                        help="GATE_UNLOAD_ON_SWITCH of the gate (both: one run each)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    base = setup_from(args)
    mix = args.mix or ("even" if args.quick else "both")
    mixes = ["even", "skewed"] if mix == "both" else [mix]

    def log(msg: str) -> None:
        print(f"{time.monotonic() - started:6.1f} s  {msg}", file=sys.stderr, flush=True)

    started = time.monotonic()
    children = Children()
    fleet = Fleet(base)
    results: dict[str, dict[str, Any]] = {}
    kills: dict[str, dict[str, Any]] = {}
    try:
        with harness.interruptible():
            fleet.start()
            log("fakes: " + ", ".join(f"{n} {f.url}" for n, f in fleet.fakes.items()))
            for name in mixes:
                peers = () if args.gate_only else STRATEGIES[2:]
                results[name] = compare(
                    replace(base, mix=name), fleet, children, log, peers, GATES[args.unload]
                )
            if not args.skip_kill:
                setup = replace(base, mix=mixes[0])
                for name in GATES[args.unload]:
                    if not fleet.fakes["a"].running:
                        fleet.fakes["a"].start()  # killed by the run before
                    fleet.reset()
                    gate = GateRun(children, fleet, unload=name == "gate_unload")
                    log(f"{setup.mix} mix: through the gate {gate.url}, backend a killed")
                    kills[name] = kill_run(setup, fleet, gate, "a") | {"gate": name}
                    gate.stop()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        children.stop_all()
        fleet.stop()
    info = harness.machine()
    killed = next(iter(kills.values()), None)  # the first gate's: GATE_UNLOAD_ON_SWITCH as asked
    print(report(base, results, list(kills.values()), info, time.monotonic() - started))
    if args.json:
        extra = {"killed_unload": kills["gate_unload"]} if len(kills) > 1 else {}
        harness.write_json(args.json, machine=info, mixes=results, killed=killed, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
