"""Several backends with Redis storage: the (backend, model) slots shared by every gate.

The grant scripts (fleet/shared_scripts.py) against a real redis-server, unit by unit and
beside a plain Python model of the same rules on random runs; then two gates under real
gunicorn on one redis-server in front of two fake Ollamas.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from fakeollama import FakeOllama
from fleet.config import Backend
from fleet.placement import FleetScheduler, View
from fleet.shared_scripts import KEY_PREFIX, FleetGrants, Seen, Synced
from limiter.mint import new_secret, stanza
from tests.limiter_support import quick_gates
from tests.redis_support import RedisServer
from tests.support import Gate, client_requests, example_count
from workqueue.core import Admission

GB = 1 << 30
LEASE = 2.0


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    redis_server.flush()
    with redis_server.client() as client:
        yield client


def backend(name: str = "big", **fields: Any) -> Backend:
    values: dict[str, Any] = {"url": f"http://{name}:1", "max_models": 1, "model_concurrency": 2}
    values.update(fields)
    return Backend(name=name, **values)


def grants(client: redis.Redis) -> FleetGrants:
    return FleetGrants(client, lease=LEASE, prefix="t:fl:")


def pair(granted: tuple[bool, Seen, int]) -> tuple[bool, dict[str, int]]:
    """A grant's answer with other gates' jobs only."""
    return granted[0], granted[1].others


def others(synced: Synced) -> dict[str, dict[str, int]]:
    return {name: seen.others for name, seen in synced.seen.items()}


# The placement with other gates' jobs in its view (pure)


def test_other_gates_jobs_take_slots_and_places_in_the_placement() -> None:
    a, b = backend("a", max_models=1), backend("b", max_models=1)
    s = FleetScheduler([a, b], switch_after=10.0)
    installed = {"m1": GB, "m2": GB}
    s.observe("a", View(installed=installed, others={"m1": 2}), 0.0)  # m1's two slots
    s.observe("b", View(installed=installed, others={"m2": 1}), 0.0)  # b's one place
    assert s.submit(1, "m1", "c", 0.0) is Admission.WAITING  # no slot, no place anywhere
    # m2 already holds b's place: a job of it takes its free slot there.
    assert s.submit(2, "m2", "c", 0.0) is Admission.RUNNING
    assert s.backend_of(2) == b
    assert s.snapshot(0.0)["backends"][1]["models"] == {"m2:latest": {"running": 2, "slots": 2}}
    assert s.snapshot(0.0)["totals"]["activations"] == 0  # no new place: the other gate's
    # One of the other gate's m1 jobs ends on a: the waiting one takes its slot.
    assert s.observe("a", View(installed=installed, others={"m1": 1}), 1.0) == [1]
    assert s.backend_of(1) == a
    # Its grant refused after all (another gate was faster): with the view that came with
    # the refusal, back in its place, and placed on the same backend again once the view
    # there has room.
    assert s.observe("a", View(installed=installed, others={"m1": 2}), 1.0) == []
    assert s.retry(1, 1.0, avoid=False) == []
    assert s.job_state(1) is Admission.WAITING
    assert s.observe("a", View(installed=installed, others={}), 2.0) == [1]
    assert s.backend_of(1) == a
    assert s.snapshot(2.0)["totals"]["admitted"] == 2


def test_other_gates_models_count_towards_max_models_and_vram() -> None:
    gpu = backend("gpu", max_models=2, vram=4 * GB)
    s = FleetScheduler([gpu], switch_after=10.0)
    installed = {"m1": 2 * GB, "m2": 3 * GB, "m3": GB}
    s.observe("gpu", View(installed=installed, others={"m1": 1}), 0.0)
    assert s.submit(1, "m2", "c", 0.0) is Admission.WAITING  # 2 + 3 GB > 4 GB
    s.finish(1, 0.0)
    assert s.submit(2, "m3", "c", 0.0) is Admission.RUNNING  # 2 + 1 GB fits
    # Two models hold the backend's two places, one of them another gate's.
    s.observe("gpu", View(installed={**installed, "m4": 0}, others={"m1": 1}), 0.0)
    assert s.submit(3, "m4", "d", 0.0) is Admission.WAITING
    assert s.observe("gpu", View(installed={**installed, "m4": 0}), 1.0) == [3]


def test_another_gates_drain_and_new_place_in_the_placement() -> None:
    a = backend("a", max_models=1)
    s = FleetScheduler([a], switch_after=10.0)
    installed = {"m1": GB, "m2": GB}
    # Another gate drains a for m2: this gate's m1 waits, its m2 runs.
    s.observe("a", View(installed=installed, drain="m2"), 0.0)
    assert s.submit(1, "m1", "c", 0.0) is Admission.WAITING
    assert s.submit(2, "m2", "c", 0.0) is Admission.RUNNING
    assert s.finish(2, 1.0) == []
    assert s.observe("a", View(installed=installed), 1.0) == [1]
    s.finish(1, 1.0)
    # The other gate's m2 runs there; this gate's m1 waits for a switch, which the other
    # gate's new place at 5.0 puts off to 15.0, as this gate's own would.
    s.observe("a", View(installed=installed, others={"m2": 1}), 2.0)
    assert s.submit(3, "m1", "c", 2.0) is Admission.WAITING
    assert s.draining(12.5) == {"a": "m1:latest"}
    s.observe("a", View(installed=installed, others={"m2": 1}, placed_at=5.0), 5.0)
    assert s.draining(12.5) == {}
    assert s.draining(15.5) == {"a": "m1:latest"}


def test_a_clients_jobs_in_other_gates_count_towards_its_cap_in_the_placement() -> None:
    a, b = backend("a", max_models=2), backend("b", max_models=2)
    s = FleetScheduler([a, b], switch_after=10.0)
    for name in "ab":
        s.observe(name, View(installed={"m1": GB, "m2": GB}), 0.0)
    # Key k (max_running 2) runs one job in another gate: one more here, then it waits,
    # without holding a slot from anyone or taking a place for its model.
    assert s.elsewhere({"k": 1}, 0.0) == []
    assert s.submit(1, "m1", "k", 0.0, max_running=2) is Admission.RUNNING
    assert s.submit(2, "m2", "k", 0.0, max_running=2) is Admission.WAITING
    assert s.submit(3, "m1", "o", 0.0) is Admission.RUNNING
    assert s.snapshot(0.0)["totals"]["active_models"] == ["m1:latest"]
    assert s.elsewhere_of("k") == 1
    # A refused grant told of one more there (only k's count changes): still at its cap.
    assert s.elsewhere({"k": 2}, 1.0, every=False) == []
    assert s.elsewhere({"k": 1}, 1.0) == []  # a sync: the same as before
    # Its job in the other gate ended (the next sync has none of k there): k's job starts.
    assert s.elsewhere({}, 2.0) == [2]
    assert s.backend_of(2) is not None and s.elsewhere_of("k") == 0


def test_a_refused_grant_keeps_its_clients_cap_though_it_was_its_only_job() -> None:
    s = FleetScheduler([backend("a")], switch_after=10.0)
    s.observe("a", View(installed={"m1": GB}), 0.0)
    assert s.submit(1, "m1", "k", 0.0, max_running=1) is Admission.RUNNING
    # Its grant is refused: another gate runs k's one job (the grant's answer says so).
    assert s.elsewhere({"k": 1}, 0.0, every=False) == []
    assert s.retry(1, 0.0, avoid=False) == []
    assert s.job_state(1) is Admission.WAITING
    assert s.elsewhere({}, 1.0) == [1]


# The scripts, unit by unit


def test_a_grant_takes_one_of_the_models_slots_and_max_models(rdb: redis.Redis) -> None:
    g, big = grants(rdb), backend(max_models=2)
    assert pair(g.grant("a1", big, "m1", "A", slots=2, now_ms=0)) == (True, {})
    assert pair(g.grant("b1", big, "m1", "B", slots=2, now_ms=0)) == (True, {"m1": 1})
    # The model's two slots are taken, by both gates together.
    assert pair(g.grant("a2", big, "m1", "A", slots=2, now_ms=0)) == (False, {"m1": 1})
    assert pair(g.grant("a3", big, "m2", "A", slots=2, now_ms=0)) == (True, {"m1": 1})
    # Two models hold the backend's two places: a third waits, whoever asks.
    assert pair(g.grant("b2", big, "m3", "B", slots=2, now_ms=0)) == (False, {"m2": 1, "m1": 1})
    # Another backend is apart.
    assert g.grant("b3", backend("small"), "m3", "B", slots=2, now_ms=0)[0] is True
    assert g.usage(["big", "small"], now_ms=0) == {"big": {"m1": 2, "m2": 1}, "small": {"m3": 1}}
    # A repeated grant changes nothing.
    assert g.grant("a1", big, "m1", "A", slots=2, now_ms=0)[0] is True
    assert g.usage(["big"], now_ms=0)["big"]["m1"] == 2
    assert g.stats() == {"granted": 4, "refused": 2}


def test_a_release_frees_the_slot_once_and_wakes_the_other_waiting_gates(
    rdb: redis.Redis,
) -> None:
    g, big = grants(rdb), backend(max_models=1)
    g.grant("a1", big, "m1", "A", slots=1, now_ms=0)
    assert g.grant("b1", big, "m2", "B", slots=1, now_ms=0)[0] is False
    g.sync("B", [], ["big"], waiting=True, now_ms=0)  # B has jobs waiting
    g.sync("C", [], ["big"], waiting=False, now_ms=0)  # C has none
    assert g.release("a1", "A", now_ms=10) is True
    assert g.release("a1", "A", now_ms=10) is False
    assert rdb.lrange(g.wake_key("B"), 0, -1) == [b"1"]  # woken once, for the one release
    assert not rdb.exists(g.wake_key("A")) and not rdb.exists(g.wake_key("C"))
    assert g.grant("b1", big, "m2", "B", slots=1, now_ms=10)[0] is True


def test_vram_counts_each_running_model_once(rdb: redis.Redis) -> None:
    g, gpu = grants(rdb), backend(max_models=3, vram=6 * GB)
    assert g.grant("1", gpu, "a", "A", slots=2, size=3 * GB, now_ms=0)[0]
    assert g.grant("2", gpu, "a", "B", slots=2, size=3 * GB, now_ms=0)[0]  # a again: no more VRAM
    assert not g.grant("3", gpu, "b", "B", slots=2, size=4 * GB, now_ms=0)[0]  # 3 + 4 > 6
    assert g.grant("4", gpu, "c", "B", slots=2, size=3 * GB, now_ms=0)[0]  # 3 + 3 fits


def test_lapsed_grants_free_their_slots_and_sync_renews_and_counts_again(
    rdb: redis.Redis,
) -> None:
    g, big = grants(rdb), backend(max_models=1)
    assert g.grant("a1", big, "m1", "A", slots=1, now_ms=0)[0]
    assert g.grant("b1", big, "m1", "B", slots=1, now_ms=0)[0] is False
    # A renews its grant within the lease: it holds.
    synced = g.sync("A", [("a1", "big", "m1", 0, "")], ["big"], now_ms=1500)
    assert synced.counted == [] and others(synced) == {"big": {}}
    assert g.grant("b1", big, "m1", "B", slots=1, now_ms=3000)[0] is False
    # A stops renewing (killed): its grant lapses a lease after its last renewal.
    assert g.grant("b1", big, "m1", "B", slots=1, now_ms=3600)[0] is True
    assert g.stats()["reaped"] == 1
    # A comes back with its job still running: counted again, past the slots (it runs).
    synced = g.sync("A", [("a1", "big", "m1", 0, "")], ["big"], now_ms=3700)
    assert synced.counted == ["a1"] and others(synced) == {"big": {"m1": 1}}
    assert g.usage(["big"], now_ms=3700) == {"big": {"m1": 2}}
    assert g.stats()["counted_again"] == 1
    assert g.release("a1", now_ms=3700) and g.release("b1", now_ms=3700)
    assert g.usage(["big"], now_ms=3700) == {"big": {}}
    # Nothing of either grant is left: no job, no lease, no member of the backend's set.
    left = {key.decode().split(":")[2] for key in rdb.scan_iter("t:fl:*")}
    assert left <= {"stats", "waiters", "work", "slice"}, left


def test_a_clients_running_cap_holds_across_gates_backends_and_models(rdb: redis.Redis) -> None:
    g, big, small = grants(rdb), backend("big", max_models=2), backend("small", max_models=2)

    def take(
        job: str, be: Backend, owner: str, cap: int | None, now: int = 0, client: str = "k"
    ) -> tuple[bool, int]:
        ok, _, elsewhere = g.grant(
            job, be, "m1" if be is big else "m2", owner,
            slots=4, client=client, max_running=cap, now_ms=now,
        )  # fmt: skip
        return ok, elsewhere

    assert take("a1", big, "A", 2) == (True, 0)
    assert take("b1", small, "B", 2) == (True, 1)  # another gate, backend and model
    # Its two grants, every gate's together, are its cap: a third is refused anywhere,
    # though slots are free; the answer says how many of its grants other gates hold.
    assert take("a2", small, "A", 2) == (False, 1)
    assert take("b2", big, "B", 2) == (False, 1)
    # Another client takes the free slots meanwhile; a grant without a cap is not held.
    assert take("o1", big, "B", 1, client="o") == (True, 0)
    assert take("a3", big, "A", None) == (True, 1)
    assert g.client_counts() == {"k": 3, "o": 1}
    assert g.stats()["capped"] == 2
    # A release anywhere frees one of the client's grants.
    assert g.release("b1", "B", now_ms=0)
    assert take("a4", small, "A", 3) == (True, 0)
    assert g.release("a3", "A", now_ms=0) and g.release("a4", "A", now_ms=0)
    assert g.client_counts() == {"k": 1, "o": 1}
    # A's and B's grants lapse (neither renews): their client's count drops with them.
    assert take("b3", big, "B", 1, now=2001) == (True, 0)
    assert g.client_counts() == {"k": 1}
    # A comes back with a1 still running: counted again, past the cap (it runs).
    synced = g.sync("A", [("a1", "big", "m1", 0, "k")], ["big"], now_ms=2100)
    assert synced.counted == ["a1"] and synced.clients == {"k": 1}
    assert g.sync("B", [("b3", "big", "m1", 0, "k")], ["big"], now_ms=2100).clients == {"k": 1}
    assert g.client_counts() == {"k": 2}
    assert take("b4", small, "B", 2, now=2100) == (False, 1)
    assert g.release("a1", "A", now_ms=2100) and g.release("b3", "B", now_ms=2100)
    assert g.client_counts() == {}
    assert g.sync("A", [], ["big"], now_ms=2100).clients == {}
    assert not rdb.exists("t:fl:cr") and not rdb.exists("t:fl:cro")


def test_a_drain_holds_a_backend_for_one_model_until_its_gate_ends_it(rdb: redis.Redis) -> None:
    g, big = grants(rdb), backend(max_models=2)
    assert g.grant("b1", big, "m1", "B", slots=2, now_ms=0)[0]
    # A's placement drains big for m2: no other model's job starts there, m2's may.
    assert g.sync("A", [], ["big"], drains={"big": "m2"}, now_ms=10).seen["big"].drain is None
    ok, seen, _ = g.grant("b2", big, "m1", "B", slots=2, now_ms=20)
    assert ok is False and seen.drain == "m2"
    # B would drain it for m3: the first gate's drain holds while it renews it.
    g.sync("B", [("b1", "big", "m1", 0, "")], ["big"], drains={"big": "m3"}, now_ms=30)
    assert g.sync("C", [], ["big"], now_ms=30).seen["big"].drain == "m2"
    assert g.grant("c1", big, "m2", "C", slots=2, now_ms=40)[0] is True
    # A's switch happened: its next sync ends the drain, and B's may begin.
    g.sync("A", [], ["big"], now_ms=50)
    assert g.sync("C", [], ["big"], now_ms=50).seen["big"].drain is None
    g.sync("B", [("b1", "big", "m1", 0, "")], ["big"], drains={"big": "m3"}, now_ms=60)
    assert g.sync("C", [], ["big"], now_ms=60).seen["big"].drain == "m3"
    # A drain whose gate stops renewing it lapses after a lease.
    assert g.sync("C", [], ["big"], now_ms=60 + 2001).seen["big"].drain is None


def test_a_new_place_starts_the_switch_clock_a_held_model_taking_it_back_does_not(
    rdb: redis.Redis,
) -> None:
    g, big = grants(rdb), backend(max_models=1)
    assert g.sync("A", [], ["big"], now_ms=0).seen["big"].placed_ago is None
    assert g.grant("a1", big, "m1", "A", slots=1, switch_after=1.0, now_ms=100)[0]
    assert g.sync("B", [], ["big"], now_ms=600).seen["big"].placed_ago == 0.5
    g.release("a1", now_ms=700)
    # Its next job within switch_after of the last one's end takes the place back.
    assert g.grant("a2", big, "m1", "A", slots=1, switch_after=1.0, now_ms=1500)[0]
    assert g.sync("B", [], ["big"], now_ms=1600).seen["big"].placed_ago == 1.5
    g.release("a2", now_ms=1600)
    # Another model is a new place.
    assert g.grant("b1", big, "m2", "B", slots=1, switch_after=1.0, now_ms=1700)[0]
    assert g.sync("A", [], ["big"], now_ms=1800).seen["big"].placed_ago == 0.1


def test_redis_time_is_used_without_now(rdb: redis.Redis) -> None:
    g, big = grants(rdb), backend()
    assert g.grant("a1", big, "m1", "A", slots=1)[0]
    expiry = rdb.zscore("t:fl:leases", "a1")
    seconds, micros = rdb.time()
    assert expiry is not None and abs(expiry - (seconds * 1000 + micros // 1000 + 2000)) < 1000


class Model:
    """The grant rules in plain Python: what the scripts must decide."""

    def __init__(self, switch_after: int) -> None:
        # id -> backend, model, owner, size, expiry, client
        self.jobs: dict[str, tuple[str, str, str, int, int, str]] = {}
        self.drains: dict[str, tuple[str, str, int]] = {}  # backend -> model, owner, expiry
        self.work: dict[tuple[str, str], int] = {}  # (backend, model) -> last start or end
        self.slice: dict[str, int] = {}  # backend -> when a model last took a new place
        self.switch_after = switch_after

    def drop(self, job_id: str, now: int) -> bool:
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self.work[job[0], job[1]] = now
        return job is not None

    def reap(self, now: int) -> None:
        for job_id in [j for j, job in self.jobs.items() if job[4] <= now]:
            self.drop(job_id, now)

    def clients(self, owner: str) -> dict[str, int]:
        """Each client's grants held by owners other than ``owner``."""
        counts: dict[str, int] = {}
        for _, _, o, _, _, c in self.jobs.values():
            if c and o != owner:
                counts[c] = counts.get(c, 0) + 1
        return counts

    def drain_of(self, name: str, now: int) -> tuple[str, str] | None:
        drain = self.drains.get(name)
        if drain is None or drain[2] <= now:
            self.drains.pop(name, None)
            return None
        return drain[0], drain[1]

    def on(self, name: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for b, m, *_ in self.jobs.values():
            if b == name:
                counts[m] = counts.get(m, 0) + 1
        return counts

    def seen(self, name: str, owner: str, now: int) -> Seen:
        counts: dict[str, int] = {}
        for b, m, o, *_ in self.jobs.values():
            if b == name and o != owner:
                counts[m] = counts.get(m, 0) + 1
        drain = self.drain_of(name, now)
        placed = self.slice.get(name)
        return Seen(
            counts,
            drain[0] if drain is not None and drain[1] != owner else None,
            None if placed is None else max(0, now - placed) / 1000,
        )

    def grant(
        self,
        job_id: str,
        be: Backend,
        m: str,
        owner: str,
        slots: int,
        size: int,
        now: int,
        client: str = "",
        cap: int | None = None,
    ) -> tuple[bool, Seen, int]:
        self.reap(now)
        counts = self.on(be.name)
        drain = self.drain_of(be.name, now)
        ok = job_id in self.jobs
        capped = (
            cap is not None
            and client != ""
            and sum(job[5] == client for job in self.jobs.values()) >= cap
        )
        if not ok and not capped and (drain is None or drain[0] == m):
            sizes: dict[str, int] = {}
            for b, model, _, s, *_ in self.jobs.values():
                if b == be.name:
                    sizes[model] = max(sizes.get(model, 0), s)
            ok = counts.get(m, 0) < slots and (
                m in counts
                or (
                    len(counts) < be.max_models
                    and (be.vram is None or sum(sizes.values()) + size <= be.vram)
                )
            )
            if ok:
                worked = self.work.get((be.name, m))
                if m not in counts and (worked is None or now - worked > self.switch_after):
                    self.slice[be.name] = now
                self.work[be.name, m] = now
                expiry = now + int(LEASE * 1000)
                self.jobs[job_id] = (be.name, m, owner, size, expiry, client)
        return ok, self.seen(be.name, owner, now), self.clients(owner).get(client, 0)

    def release(self, job_id: str, now: int) -> bool:
        self.reap(now)
        return self.drop(job_id, now)

    def sync(
        self,
        owner: str,
        running: list[tuple[str, str, str, int, str]],
        drains: dict[str, str],
        names: list[str],
        now: int,
    ) -> Synced:
        self.reap(now)
        counted = []
        for job_id, b, m, size, client in running:
            if job_id not in self.jobs:
                counted.append(job_id)
            else:
                b, m, owner, size, _, client = self.jobs[job_id]  # renewed as it is
            self.jobs[job_id] = (b, m, owner, size, now + int(LEASE * 1000), client)
        seen = {}
        for name in names:
            drain = self.drain_of(name, now)
            if name in drains:
                if drain is None or drain[1] == owner:
                    self.drains[name] = (drains[name], owner, now + int(LEASE * 1000))
            elif drain is not None and drain[1] == owner:
                del self.drains[name]
            seen[name] = self.seen(name, owner, now)
        return Synced(counted, seen, self.clients(owner))


def test_the_scripts_decide_as_the_plain_rules_on_random_runs(rdb: redis.Redis) -> None:
    backends = [backend("big", max_models=2, vram=8 * GB), backend("small", max_models=1)]
    names = [be.name for be in backends]
    for seed in range(example_count(50)):
        rdb.flushdb()
        rng = random.Random(seed)
        switch_after = rng.choice((0, 1000))
        g, model = grants(rdb), Model(switch_after)
        now, ids = 0, 0
        live: dict[str, list[str]] = {"A": [], "B": []}  # jobs each owner believes run
        info: dict[str, tuple[str, str, int, str]] = {}
        for _ in range(60):
            now += rng.choice((0, 100, 700, 2500))
            owner = rng.choice("AB")
            op = rng.random()
            if op < 0.5:
                ids += 1
                job_id, be = f"{owner}{ids}", rng.choice(backends)
                m, size = rng.choice(("m1", "m2", "m3")), rng.choice((GB, 3 * GB, 5 * GB))
                slots = rng.choice((1, 2))
                # Clients "x" (capped at 1 or 2), "y" (no cap) and none (the admin lane's
                # shape is the same).
                client = rng.choice(("x", "x", "y", ""))
                cap = rng.choice((1, 2)) if client == "x" else None
                got = g.grant(
                    job_id, be, m, owner, slots=slots, size=size,
                    switch_after=switch_after / 1000, client=client, max_running=cap, now_ms=now,
                )  # fmt: skip
                want = model.grant(job_id, be, m, owner, slots, size, now, client, cap)
                assert got == want, (seed, job_id)
                if got[0]:
                    live[owner].append(job_id)
                    info[job_id] = (be.name, m, size, client)
            elif op < 0.75 and live[owner]:
                job_id = live[owner].pop(rng.randrange(len(live[owner])))
                assert g.release(job_id, owner, now_ms=now) is model.release(job_id, now), seed
            else:
                # The owner renews every job it runs (those whose lease lapsed count
                # again), and drains the backends its placement has a switch due on.
                running = [(j, *info[j]) for j in live[owner]]
                drains = {
                    name: rng.choice(("m1", "m2", "m3")) for name in names if rng.random() < 0.3
                }
                synced = g.sync(owner, running, names, drains=drains, now_ms=now)
                assert synced == model.sync(owner, running, drains, names, now), seed
            model.reap(now)
            assert g.usage(names, now_ms=now) == {name: model.on(name) for name in names}, seed
            assert g.client_counts() == model.clients(""), seed


# Two gates on one redis-server in front of two fake Ollamas

Fakes = dict[str, FakeOllama]
Factory = Callable[..., Gate]
FAST = {"X-Fake-Token-Interval": "0.02", "X-Fake-Tokens": "5"}


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    """Two fake Ollamas with the same two models installed (named before ``gates``)."""
    servers = {name: FakeOllama(token_interval=0.01, models="m1=1GB,m2=1GB") for name in "ab"}
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def gates(gate_factory: Factory) -> Iterator[Factory]:
    yield from quick_gates(gate_factory)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url()


def fleet_env(
    tmp_path: Path, fakes: Fakes, redis_url: str, fields: str, **extra: str
) -> dict[str, str]:
    path = tmp_path / "backends.toml"
    path.write_text(
        "".join(
            f'[backends.{name}]\nurl = "{fake.url}"\n{fields}\n' for name, fake in fakes.items()
        )
    )
    env = {
        "GATE_BACKENDS_FILE": str(path),
        "GATE_STORAGE_URI": redis_url,
        "GATE_QUEUE_LEASE": str(LEASE),
        "GATE_QUEUE_MAX_PER_CLIENT": "100",
    }
    env.update(extra)
    return env


def generate(
    gate: Gate, model: str, headers: dict[str, str], timeout: float = 60
) -> requests.Response:
    body = {"model": model, "prompt": "hi", "stream": False}
    return requests.post(gate.url + "/api/generate", json=body, headers=headers, timeout=timeout)


def status(gate: Gate) -> dict[str, Any]:
    with requests.get(gate.url + "/gate/status.json", timeout=10) as resp:
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data


def shared_usage(redis_url: str, names: list[str]) -> dict[str, dict[str, int]]:
    with redis.Redis.from_url(redis_url) as client:
        return FleetGrants(client, lease=LEASE, prefix=KEY_PREFIX).usage(names)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def both_busy(fakes: Fakes, redis_url: str, models: set[str]) -> bool:
    """Each backend runs one of ``models`` (at the fake, so with its grant), and Redis holds
    those two grants only (the jobs before them gave theirs back)."""
    running = [model for f in fakes.values() for model, n in f.stats()["in_flight"].items() if n]
    usage = shared_usage(redis_url, list(fakes))
    held = [model for on in usage.values() for model, n in on.items() for _ in range(n)]
    return sorted(running) == sorted(models) == sorted(held)


def test_two_gates_never_exceed_a_backends_slots_nor_its_models(
    fakes: Fakes, gates: Factory, redis_url: str, tmp_path: Path
) -> None:
    env = fleet_env(tmp_path, fakes, redis_url, "max_models = 1\nmodel_concurrency = 2\n")
    # Three processes: one gate with one worker, one with two.
    one = gates("http://127.0.0.1:9", env)
    two = gates("http://127.0.0.1:9", {**env, "GATE_WORKERS": "2"})
    before = {name: len(client_requests(fake)) for name, fake in fakes.items()}
    jobs = [(one if i % 2 else two, ["m1", "m2"][(i // 3) % 2]) for i in range(48)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        codes = list(pool.map(lambda job: generate(job[0], job[1], FAST).status_code, jobs))
    assert codes == [200] * len(jobs)
    served = 0
    for name, fake in fakes.items():
        stats = fake.stats()
        assert stats["max_models_in_flight"] <= 1, (name, stats["max_in_flight"])
        assert all(n <= 2 for n in stats["max_in_flight"].values()), (name, stats["max_in_flight"])
        served += len(client_requests(fake)) - before[name]
    assert served == len(jobs)  # each job reached one backend, once
    # The slots were used across gates: one gate alone would not have sent 2 at once...
    assert max(max(f.stats()["max_in_flight"].values(), default=0) for f in fakes.values()) == 2
    # ...and nothing is left behind, in either gate or in Redis.
    for gate in (one, two):
        queue = status(gate)["queue"]
        assert (queue["running"], queue["waiting"], queue["shared"]) == (0, 0, True)
        assert "Traceback" not in gate.logs()
    wait_until(
        "nothing held", lambda: shared_usage(redis_url, list(fakes)) == {name: {} for name in fakes}
    )


def test_a_killed_gates_slots_lapse_after_the_lease_and_the_other_proceeds(
    fakes: Fakes, gates: Factory, redis_url: str, tmp_path: Path
) -> None:
    env = fleet_env(
        tmp_path, fakes, redis_url, "max_models = 1\nmodel_concurrency = 1\n",
        GATE_QUEUE_TIMEOUT="30",
    )  # fmt: skip
    one, two = gates("http://127.0.0.1:9", env), gates("http://127.0.0.1:9", env)
    assert generate(two, "m1", FAST).status_code == 200  # two has read the catalogue
    long = {"X-Fake-Token-Interval": "0.5", "X-Fake-Tokens": "60"}  # 30 s if left alone
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(generate, one, model, long) for model in ("m1", "m2")]
        # One gate holds both backends' only place: m1 on one, m2 on the other.
        wait_until(
            "one runs on both", lambda: both_busy(fakes, redis_url, {"m1:latest", "m2:latest"})
        )
        for pid in one.worker_pids():
            os.kill(pid, signal.SIGKILL)
        one.proc.send_signal(signal.SIGKILL)
        resp = generate(two, "m1", FAST)
        assert resp.status_code == 200
        # It waited for the dead gate's grants to lapse (a lease after their last renewal).
        assert float(resp.headers["X-Gate-Queue-Wait"]) > 0.3
        for future in held:
            with pytest.raises(requests.RequestException):  # its clients saw the socket die
                future.result()
    one.proc.wait(5)

    def reaped() -> int:
        with redis.Redis.from_url(redis_url) as client:
            return int(client.hget(KEY_PREFIX + "stats", "reaped") or 0)

    # The grant of the job placed second lapses a little later than the first one's (on a
    # busy machine, after two's job ran): the next sync of two's pump reaps it.
    wait_until("both grants reaped", lambda: reaped() >= 2)
    assert reaped() == 2
    wait_until("nothing held", lambda: status(two)["queue"]["running"] == 0)
    wait_until("nothing held", lambda: shared_usage(redis_url, ["a", "b"]) == {"a": {}, "b": {}})


def test_a_paused_redis_falls_back_to_own_slots_and_counts_them_again_on_return(
    fakes: Fakes, gates: Factory, redis_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = fleet_env(tmp_path, fakes, redis_url, "max_models = 1\nmodel_concurrency = 1\n")
    gate = gates("http://127.0.0.1:9", env)
    assert generate(gate, "m1", FAST).status_code == 200
    slow = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "40"}  # 4 s
    with ThreadPoolExecutor(1) as pool:
        with redis_server.paused():
            held = pool.submit(generate, gate, "m2", slow)
            wait_until("served on its own slots", lambda: status(gate)["queue"]["fallback"])
            wait_until("m2 runs", lambda: sum(f.stats()["in_flight"].get("m2:latest", 0)
                                              for f in fakes.values()) == 1)  # fmt: skip
        # Redis answers again: the job that runs is counted there, past nothing.
        wait_until("shared again", lambda: status(gate)["queue"]["shared"])
        wait_until(
            "the running job counted again",
            lambda: sum(len(u) for u in shared_usage(redis_url, ["a", "b"]).values()) == 1,
        )
        assert held.result().status_code == 200
    wait_until("nothing held", lambda: shared_usage(redis_url, ["a", "b"]) == {"a": {}, "b": {}})
    logs = gate.logs()
    assert "fleet: Redis unreachable" in logs and "fleet: Redis answers again" in logs
    assert "Traceback" not in logs


def test_a_switch_due_on_one_gate_drains_the_backends_another_gate_keeps_busy(
    fakes: Fakes, gates: Factory, redis_url: str, tmp_path: Path
) -> None:
    env = fleet_env(
        tmp_path, fakes, redis_url, "max_models = 1\nmodel_concurrency = 2\n",
        GATE_SWITCH_AFTER="1",
    )  # fmt: skip
    one, two = gates("http://127.0.0.1:9", env), gates("http://127.0.0.1:9", env)
    assert generate(one, "m2", FAST).status_code == 200  # one has read the catalogue
    # 0.15 to 0.35 s: the jobs on one backend do not end together, so m2 never finds
    # one free by itself.
    jobs = [{"X-Fake-Token-Interval": "0.05", "X-Fake-Tokens": str(3 + i % 5)} for i in range(60)]
    full = {"a": {"m1:latest": 2}, "b": {"m1:latest": 2}}
    with ThreadPoolExecutor(12) as pool, ThreadPoolExecutor(1) as lone:
        # Gate two keeps both slots of both backends busy with m1, twelve clients for
        # four slots: m1 always runs on each.
        flood = [pool.submit(generate, two, "m1", job) for job in jobs]
        wait_until("m1 fills both backends", lambda: shared_usage(redis_url, ["a", "b"]) == full)
        # Gate one's m2 waits a switch interval; then both backends drain for it.
        m2 = lone.submit(generate, one, "m2", FAST)
        assert m2.result().status_code == 200
        assert [f.result().status_code for f in flood] == [200] * 60
    seen = sorted(
        (record["time"], record["model"])
        for fake in fakes.values()
        for record in client_requests(fake)
        if record["model"] in ("m1:latest", "m2:latest")
    )
    models = [model for _, model in seen]
    last_m2 = len(models) - 1 - models[::-1].index("m2:latest")
    # m2 did not wait for gate two's flood to end: m1 jobs went on after it.
    assert models[last_m2 + 1 :].count("m1:latest") >= 5, models
    for gate in (one, two):
        assert "Traceback" not in gate.logs()
    wait_until("nothing held", lambda: shared_usage(redis_url, ["a", "b"]) == {"a": {}, "b": {}})


def test_a_backend_killed_under_two_gates_leaks_no_grant(
    fakes: Fakes, gates: Factory, redis_url: str, tmp_path: Path
) -> None:
    env = fleet_env(tmp_path, fakes, redis_url, "max_models = 2\nmodel_concurrency = 2\n")
    one, two = gates("http://127.0.0.1:9", env), gates("http://127.0.0.1:9", env)
    for gate in (one, two):
        assert generate(gate, "m1", FAST).status_code == 200  # each has read the catalogue
    for fake in fakes.values():
        fake.configure(token_interval=0.05, tokens=20)  # 1 s streams
    body = {"model": "m1", "prompt": "hi"}
    with ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(requests.post, gate.url + "/api/generate", json=body, timeout=60)
            for gate in (one, two) * 8
        ]
        wait_until("streams run on b", lambda: len(client_requests(fakes["b"])) >= 2)
        fakes["b"].kill()
        answers = [future.result() for future in futures]
    for resp in answers:
        assert resp.status_code in (200, 502)
        if resp.headers.get("X-Gate-Backend") == "b":
            assert '"error"' in resp.text.strip().splitlines()[-1]  # it broke mid-stream
    assert sum(resp.headers.get("X-Gate-Backend") == "a" for resp in answers) >= 8
    assert fakes["a"].stats()["max_in_flight"]["m1:latest"] <= 2
    for gate in (one, two):
        wait_until("nothing held", lambda gate=gate: status(gate)["queue"]["running"] == 0)
        assert status(gate)["queue"]["waiting"] == 0
    wait_until("nothing held", lambda: shared_usage(redis_url, ["a", "b"]) == {"a": {}, "b": {}})
    fakes["b"].start()


def test_a_flushed_redis_counts_the_running_jobs_again(
    fakes: Fakes, gates: Factory, redis_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = fleet_env(tmp_path, fakes, redis_url, "max_models = 1\nmodel_concurrency = 1\n")
    gate = gates("http://127.0.0.1:9", env)
    assert generate(gate, "m1", FAST).status_code == 200
    slow = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "40"}  # 4 s
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(generate, gate, "m1", slow)
        # It reached a backend (so it holds its grant), and the first job's grant is gone.
        wait_until(
            "it runs",
            lambda: (
                any(f.stats()["in_flight"].get("m1:latest") for f in fakes.values())
                and sum(map(len, shared_usage(redis_url, ["a", "b"]).values())) == 1
            ),
        )
        redis_server.flush()
        # The next renewal (a third of the 2 s lease) counts it there again.
        wait_until(
            "counted again",
            lambda: sum(map(len, shared_usage(redis_url, ["a", "b"]).values())) == 1,
        )
        assert held.result().status_code == 200
    wait_until("nothing held", lambda: shared_usage(redis_url, ["a", "b"]) == {"a": {}, "b": {}})
    with redis.Redis.from_url(redis_url) as client:
        assert int(client.hget(KEY_PREFIX + "stats", "counted_again") or 0) == 1
    assert "had lost its grant's lease" in gate.logs()


def test_a_gate_shutting_down_keeps_its_running_jobs_grants(
    fakes: Fakes, gates: Factory, redis_url: str, tmp_path: Path
) -> None:
    env = fleet_env(tmp_path, fakes, redis_url, "max_models = 1\nmodel_concurrency = 1\n")
    one, two = gates("http://127.0.0.1:9", env), gates("http://127.0.0.1:9", env)
    assert generate(two, "m1", FAST).status_code == 200  # two has read the catalogue
    long = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "30"}  # 3 s: longer than a lease
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(generate, one, model, long) for model in ("m1", "m2")]
        wait_until(
            "one runs on both", lambda: both_busy(fakes, redis_url, {"m1:latest", "m2:latest"})
        )
        one.proc.send_signal(signal.SIGTERM)  # graceful: its running jobs finish
        assert generate(two, "m1", FAST).status_code == 200
        assert [f.result().status_code for f in held] == [200, 200]
    one.proc.wait(10)
    # Two's job waited for one of them to end: their grants outlived their lease.
    for fake in fakes.values():
        stats = fake.stats()
        assert stats["max_models_in_flight"] == 1, stats["max_in_flight"]
        assert all(n == 1 for n in stats["max_in_flight"].values()), stats["max_in_flight"]
    with redis.Redis.from_url(redis_url) as client:
        assert int(client.hget(KEY_PREFIX + "stats", "reaped") or 0) == 0


def test_the_admin_lane_is_shared_by_the_gates(
    fakes: Fakes, gates: Factory, redis_url: str, tmp_path: Path
) -> None:
    env = fleet_env(tmp_path, fakes, redis_url, "", GATE_ADMIN_CONCURRENCY="1")
    one, two = gates("http://127.0.0.1:9", env), gates("http://127.0.0.1:9", env)
    for gate in (one, two):
        assert generate(gate, "m1", FAST).status_code == 200  # each has read the catalogue

    def pulls() -> int:
        return sum(
            record["path"] == "/api/pull" for f in fakes.values() for record in client_requests(f)
        )

    slow = {"X-Fake-Token-Interval": "0.5"}  # six progress lines: 3 s
    with requests.post(
        one.url + "/api/pull", json={"model": "m3"}, headers=slow, stream=True, timeout=60
    ) as first:
        lines = first.iter_lines()
        assert b"pulling manifest" in next(lines)  # one's pull runs
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(
                requests.post, two.url + "/api/pull", json={"model": "m4"}, timeout=60
            )
            wait_until("two's pull waits", lambda: status(two)["queue"]["admin"]["running"] == 1)
            assert pulls() == 1  # the one admin slot is one's
            assert b"success" in b"".join(lines)
            assert second.result().status_code == 200
    assert pulls() == 2
    wait_until("nothing held", lambda: shared_usage(redis_url, ["\0admin"]) == {"\0admin": {}})


@pytest.fixture
def three_models() -> Iterator[Fakes]:
    """Two fake Ollamas with three models installed (named before ``gates``)."""
    servers = {
        name: FakeOllama(token_interval=0.01, models="m1=1GB,m2=1GB,m3=1GB") for name in "ab"
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


def test_a_keys_max_running_holds_across_two_gates_and_two_backends(
    three_models: Fakes, gates: Factory, redis_url: str, tmp_path: Path
) -> None:
    fakes = three_models
    secrets = {name: new_secret() for name in ("k", "o")}
    keys = tmp_path / "keys.toml"
    keys.write_text(stanza("k", secrets["k"], max_running=1) + stanza("o", secrets["o"]))
    env = fleet_env(
        tmp_path, fakes, redis_url, "max_models = 3\nmodel_concurrency = 2\n",
        GATE_API_KEYS_FILE=str(keys), GATE_QUEUE_TIMEOUT="120",
    )  # fmt: skip
    one, two = gates("http://127.0.0.1:9", env), gates("http://127.0.0.1:9", env)

    def ask(gate: Gate, name: str, model: str, tokens: int = 10) -> int:
        headers = {
            "Authorization": f"Bearer {secrets[name]}",
            "X-Fake-Token-Interval": "0.02",
            "X-Fake-Tokens": str(tokens),
        }
        return generate(gate, model, headers, timeout=120).status_code

    for gate in (one, two):
        assert ask(gate, "o", "m3", 1) == 200  # each gate has read the catalogue
    # Key k's jobs are its models m1 and m2 alone; key o's are m3's.
    seen: dict[str, int] = {"k": 0, "o": 0, "k_in_redis": 0}
    done = False

    def watch() -> None:
        while not done:
            flight = [f.stats()["in_flight"] for f in fakes.values()]
            k = sum(on.get("m1:latest", 0) + on.get("m2:latest", 0) for on in flight)
            o = sum(on.get("m3:latest", 0) for on in flight)
            with redis.Redis.from_url(redis_url) as client:
                in_redis = FleetGrants(client, lease=LEASE).client_counts().get("k", 0)
            seen["k"], seen["o"] = max(seen["k"], k), max(seen["o"], o)
            seen["k_in_redis"] = max(seen["k_in_redis"], in_redis)

    with ThreadPoolExecutor(1) as watcher, ThreadPoolExecutor(32) as pool:
        watching = watcher.submit(watch)
        try:
            flood = [
                pool.submit(ask, gate, "k", model)
                for _ in range(6)
                for gate in (one, two)
                for model in ("m1", "m2")
            ]
            wait_until("k's first job runs", lambda: seen["k"] >= 1)
            # Key o is served meanwhile, from both gates, while k's jobs wait their turn.
            others = [pool.submit(ask, gate, "o", "m3") for gate in (one, two) * 4]
            assert [f.result() for f in others] == [200] * 8
            assert not all(f.done() for f in flood)
            assert [f.result() for f in flood] == [200] * 24
        finally:
            done = True
        watching.result()
    # Never more than one of k's jobs ran at once, anywhere; o's ran side by side.
    assert seen["k"] == 1 and seen["k_in_redis"] == 1, seen
    assert seen["o"] >= 1, seen
    for gate in (one, two):
        wait_until("nothing held", lambda gate=gate: status(gate)["queue"]["running"] == 0)
        assert status(gate)["queue"]["waiting"] == 0
        assert "Traceback" not in gate.logs()
    wait_until("nothing held", lambda: shared_usage(redis_url, ["a", "b"]) == {"a": {}, "b": {}})
    with redis.Redis.from_url(redis_url) as client:
        assert FleetGrants(client, lease=LEASE).client_counts() == {}
        assert not client.exists(KEY_PREFIX + "cro")
