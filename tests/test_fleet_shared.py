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
from fleet.shared_scripts import KEY_PREFIX, FleetGrants
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


# The scripts, unit by unit


def test_a_grant_takes_one_of_the_models_slots_and_max_models(rdb: redis.Redis) -> None:
    g, big = grants(rdb), backend(max_models=2)
    assert g.grant("a1", big, "m1", "A", slots=2, now_ms=0) == (True, {})
    assert g.grant("b1", big, "m1", "B", slots=2, now_ms=0) == (True, {"m1": 1})
    # The model's two slots are taken, by both gates together.
    assert g.grant("a2", big, "m1", "A", slots=2, now_ms=0) == (False, {"m1": 1})
    assert g.grant("a3", big, "m2", "A", slots=2, now_ms=0) == (True, {"m1": 1})
    # Two models hold the backend's two places: a third waits, whoever asks.
    assert g.grant("b2", big, "m3", "B", slots=2, now_ms=0) == (False, {"m2": 1, "m1": 1})
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
    synced = g.sync("A", [("a1", "big", "m1", 0)], ["big"], now_ms=1500)
    assert synced.counted == [] and synced.others == {"big": {}}
    assert g.grant("b1", big, "m1", "B", slots=1, now_ms=3000)[0] is False
    # A stops renewing (killed): its grant lapses a lease after its last renewal.
    assert g.grant("b1", big, "m1", "B", slots=1, now_ms=3600)[0] is True
    assert g.stats()["reaped"] == 1
    # A comes back with its job still running: counted again, past the slots (it runs).
    synced = g.sync("A", [("a1", "big", "m1", 0)], ["big"], now_ms=3700)
    assert synced.counted == ["a1"] and synced.others == {"big": {"m1": 1}}
    assert g.usage(["big"], now_ms=3700) == {"big": {"m1": 2}}
    assert g.stats()["counted_again"] == 1
    assert g.release("a1", now_ms=3700) and g.release("b1", now_ms=3700)
    assert g.usage(["big"], now_ms=3700) == {"big": {}}
    assert not [key for key in rdb.scan_iter("t:fl:*") if not key.endswith((b"stats", b"waiters"))]


def test_redis_time_is_used_without_now(rdb: redis.Redis) -> None:
    g, big = grants(rdb), backend()
    assert g.grant("a1", big, "m1", "A", slots=1)[0]
    expiry = rdb.zscore("t:fl:leases", "a1")
    seconds, micros = rdb.time()
    assert expiry is not None and abs(expiry - (seconds * 1000 + micros // 1000 + 2000)) < 1000


class Model:
    """The grant rules in plain Python: what the scripts must decide."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[str, str, str, int, int]] = {}  # id -> b, m, owner, size, expiry

    def reap(self, now: int) -> None:
        for job_id in [j for j, job in self.jobs.items() if job[4] <= now]:
            del self.jobs[job_id]

    def on(self, name: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for b, m, _, _, _ in self.jobs.values():
            if b == name:
                counts[m] = counts.get(m, 0) + 1
        return counts

    def others(self, name: str, owner: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for b, m, o, _, _ in self.jobs.values():
            if b == name and o != owner:
                counts[m] = counts.get(m, 0) + 1
        return counts

    def grant(
        self, job_id: str, be: Backend, m: str, owner: str, slots: int, size: int, now: int
    ) -> tuple[bool, dict[str, int]]:
        self.reap(now)
        counts = self.on(be.name)
        ok = job_id in self.jobs
        if not ok:
            sizes: dict[str, int] = {}
            for b, model, _, s, _ in self.jobs.values():
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
                self.jobs[job_id] = (be.name, m, owner, size, now + int(LEASE * 1000))
        return ok, self.others(be.name, owner)


def test_the_scripts_decide_as_the_plain_rules_on_random_runs(rdb: redis.Redis) -> None:
    backends = [backend("big", max_models=2, vram=8 * GB), backend("small", max_models=1)]
    for seed in range(example_count(50)):
        rdb.flushdb()
        g, model, rng = grants(rdb), Model(), random.Random(seed)
        now, ids = 0, 0
        live: dict[str, list[str]] = {"A": [], "B": []}  # jobs each owner believes run
        info: dict[str, tuple[str, str, int]] = {}
        for _ in range(60):
            now += rng.choice((0, 100, 700, 2500))
            owner = rng.choice("AB")
            op = rng.random()
            if op < 0.55:
                ids += 1
                job_id, be = f"{owner}{ids}", rng.choice(backends)
                m, size = rng.choice(("m1", "m2", "m3")), rng.choice((GB, 3 * GB, 5 * GB))
                slots = rng.choice((1, 2))
                got = g.grant(job_id, be, m, owner, slots=slots, size=size, now_ms=now)
                assert got == model.grant(job_id, be, m, owner, slots, size, now), (seed, job_id)
                if got[0]:
                    live[owner].append(job_id)
                    info[job_id] = (be.name, m, size)
            elif op < 0.8 and live[owner]:
                job_id = live[owner].pop(rng.randrange(len(live[owner])))
                model.reap(now)
                assert g.release(job_id, owner, now_ms=now) is (job_id in model.jobs), seed
                model.jobs.pop(job_id, None)
            else:
                # The owner renews every job it runs: those whose lease lapsed count again.
                running = [(j, *info[j]) for j in live[owner]]
                synced = g.sync(owner, running, ["big", "small"], now_ms=now)
                model.reap(now)
                assert synced.counted == [j for j in live[owner] if j not in model.jobs], seed
                for job_id, b, m, size in running:
                    model.jobs[job_id] = (b, m, owner, size, now + int(LEASE * 1000))
                assert synced.others == {
                    name: model.others(name, owner) for name in ("big", "small")
                }, seed
            model.reap(now)
            assert g.usage(["big", "small"], now_ms=now) == {
                name: model.on(name) for name in ("big", "small")
            }, seed


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
    assert shared_usage(redis_url, list(fakes)) == {name: {} for name in fakes}


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
            "one runs on both",
            lambda: (
                sorted(m for usage in shared_usage(redis_url, ["a", "b"]).values() for m in usage)
                == ["m1:latest", "m2:latest"]
            ),
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
    with redis.Redis.from_url(redis_url) as client:
        assert int(client.hget(KEY_PREFIX + "stats", "reaped") or 0) == 2
    wait_until("nothing held", lambda: status(two)["queue"]["running"] == 0)
    assert shared_usage(redis_url, ["a", "b"]) == {"a": {}, "b": {}}


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
