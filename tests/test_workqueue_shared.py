"""The work queue shared through a real Redis: its Lua rules, and gates that share it.

The unit tests drive ``RedisScheduler`` directly, with the time passed in (``now_ms``),
so they need no sleeps. The end-to-end tests run two gunicorn gates (or one with two
workers) on one redis-server in front of the fake Ollama, which records how many jobs
and models it saw at once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gevent
import hypothesis.strategies as st
import pytest
import redis
import requests
from hypothesis import given
from hypothesis import settings as examples

from errors import ClientShareFull, QueueFull
from fakeollama import FakeOllama
from settings import Settings
from tests.limiter_support import quick_gates
from tests.redis_support import RedisServer
from tests.support import Gate, clients, example_count
from tests.test_workqueue_gate import generate, open_stream, queue_of, wait_until
from workqueue.core import (
    REASONS,
    ClientSnapshot,
    LaneSnapshot,
    QueueSnapshot,
    Scheduler,
    SwitchSnapshot,
    TotalsSnapshot,
)
from workqueue.gate import Slot, WorkQueue
from workqueue.scripts import RedisScheduler, lane_of
from workqueue.shared import SharedSlot, SharedWorkQueue

SLOW = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "10"}  # about one second


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url()


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    redis_server.flush()
    with redis_server.client() as client:
        yield client


def sched(client: redis.Redis, **kwargs: object) -> RedisScheduler:
    options: dict[str, object] = dict(switch_after=10.0, lease=60.0, prefix="t:")
    options.update(kwargs)
    return RedisScheduler(client, **options)  # type: ignore[arg-type]


def woken(client: redis.Redis, owner: str) -> list[str]:
    key = f"t:wake:{owner}"
    items = client.lrange(key, 0, -1)
    client.delete(key)
    return [i.decode() for i in items]  # type: ignore[union-attr]


M1, M2, M3 = lane_of("m1", False), lane_of("m2", False), lane_of("m3", False)


# The rules, in Lua


def test_slots_then_waiting_then_bounds(rdb: redis.Redis) -> None:
    s = sched(rdb, concurrency=2, queue_max=3, queue_max_per_client=2)
    outcomes = [s.submit(f"j{i}", M1, "c1", "o", now_ms=1000 + i).outcome for i in range(5)]
    assert outcomes == ["running", "running", "waiting", "waiting", "client_queue_full"]
    assert s.submit("k1", M1, "c2", "o", now_ms=1010).outcome == "waiting"
    full = s.submit("k2", M1, "c3", "o", now_ms=1011)
    assert (full.outcome, full.waiting) == ("queue_full", 3)
    snap = s.snapshot(now_ms=1012)
    assert snap["models"]["m1:latest"]["running"] == 2
    assert snap["totals"]["waiting"] == 3
    assert snap["totals"]["rejected"] == {
        "queue_full": 1,
        "client_queue_full": 1,
        "queue_timeout": 0,
        "cancelled": 0,
    }
    assert snap["clients"] == {
        "c1": {"waiting": 2, "running": 2},
        "c2": {"waiting": 1, "running": 0},
    }


def test_clients_take_turns_within_a_model(rdb: redis.Redis) -> None:
    s = sched(rdb, queue_max_per_client=10)
    assert s.submit("run", M1, "flood", "o", now_ms=0).outcome == "running"
    for i in range(3):
        s.submit(f"f{i}", M1, "flood", "o", now_ms=1 + i)
    s.submit("lone", M1, "lone", "o2", now_ms=10)
    order = []
    job = "run"
    for t in range(5):
        s.finish(job, now_ms=100 + t)
        started = woken(rdb, "o") + woken(rdb, "o2")
        if not started:
            break
        (job,) = started
        order.append(job)
    assert order == ["f0", "lone", "f1", "f2"]


def test_affinity_first_then_switch_after(rdb: redis.Redis) -> None:
    s = sched(rdb, switch_after=10.0, queue_max_per_client=10)
    assert s.submit("a0", M1, "c", "o", now_ms=0).outcome == "running"
    assert s.submit("b0", M2, "c2", "o", now_ms=1000).outcome == "waiting"
    assert s.submit("a1", M1, "c", "o", now_ms=2000).outcome == "waiting"
    # A slot frees before b0 has waited switch_after: m1 keeps it (no swap).
    s.finish("a0", now_ms=3000)
    assert woken(rdb, "o") == ["a1"]
    # Once b0 has waited 10 s, m1 takes no new job and drains; then m2 runs.
    assert s.submit("a2", M1, "c", "o", now_ms=11_500).outcome == "waiting"
    assert s.snapshot(now_ms=11_500)["switch"]["target"] == "m2:latest"
    s.finish("a1", now_ms=12_000)
    assert woken(rdb, "o") == ["b0"]
    snap = s.snapshot(now_ms=12_001)
    assert snap["totals"]["active_models"] == ["m2:latest"]
    assert snap["totals"]["forced_switches"] == 1


def test_active_model_cap(rdb: redis.Redis) -> None:
    s = sched(rdb, max_active_models=2)
    assert s.submit("a", M1, "c", "o", now_ms=0).outcome == "running"
    assert s.submit("b", M2, "c", "o", now_ms=1).outcome == "running"
    assert s.submit("c", M3, "c", "o", now_ms=2).outcome == "waiting"
    s.finish("a", now_ms=3)
    assert woken(rdb, "o") == ["c"]
    assert s.snapshot(now_ms=4)["totals"]["active_models"] == ["m2:latest", "m3:latest"]


def test_admin_lane_is_apart(rdb: redis.Redis) -> None:
    s = sched(rdb, admin_concurrency=1)
    admin = lane_of("admin", True)
    assert s.submit("m", M1, "c", "o", now_ms=0).outcome == "running"
    assert s.submit("p1", admin, "c", "o", now_ms=1).outcome == "running"
    assert s.submit("p2", admin, "c", "o", now_ms=2).outcome == "waiting"
    s.finish("p1", now_ms=3)
    assert woken(rdb, "o") == ["p2"]


def test_lapsed_leases_free_slots_and_queue_places(rdb: redis.Redis) -> None:
    s = sched(rdb, lease=5.0, queue_max=1)
    assert s.submit("dead-run", M1, "c", "dead", now_ms=0).outcome == "running"
    assert s.submit("dead-wait", M1, "c", "dead", now_ms=1).outcome == "waiting"
    assert s.submit("live", M1, "c2", "live", now_ms=2).outcome == "queue_full"
    # The live process renews its own (none yet); the dead one's lapse at 5 s.
    assert s.submit("live", M1, "c2", "live", now_ms=4_000).outcome == "queue_full"
    assert s.submit("live", M1, "c2", "live", now_ms=5_002).outcome == "running"
    assert s.snapshot(now_ms=5_003)["totals"]["reaped"] == 2
    # Renewal keeps a lease alive; a waiting job Redis forgot is reported missing.
    ticked = s.tick("live", running=[("live", M1, "c2", "normal")], waiting=["ghost"], now_ms=9_000)
    assert (ticked.missing, ticked.counted) == (["ghost"], [])
    assert s.submit("x", M1, "c3", "o", now_ms=12_000).outcome == "waiting"
    s.finish("live", now_ms=12_001)
    assert woken(rdb, "o") == ["x"]


def test_a_running_job_redis_forgot_is_counted_again(rdb: redis.Redis) -> None:
    """A job that ran while Redis could not count it holds its slot once Redis answers."""
    s = sched(rdb, lease=5.0, max_active_models=1)
    assert s.submit("shared", M1, "c", "other", now_ms=0).outcome == "running"
    # "own" ran on its process's own slots (m2) while Redis was out of reach: counted
    # now, past the slots and the model cap, since it runs whatever Redis says.
    ticked = s.tick("o", running=[("own", M2, "c2", "batch")], now_ms=100)
    assert ticked.counted == ["own"]
    snap = s.snapshot(now_ms=101)
    assert snap["models"]["m2:latest"]["running"] == 1
    assert snap["totals"]["active_models"] == ["m1:latest", "m2:latest"]
    assert snap["totals"]["admitted"] == 1 and snap["totals"]["counted_again"] == 1
    # So m1's slot, once free, is not handed to a new model: m2 still runs.
    assert s.submit("next", M3, "c3", "o", now_ms=200).outcome == "waiting"
    s.finish("shared", now_ms=300)
    assert woken(rdb, "o") == []
    # Its lease is renewed by the next tick, and finishing it lets the queue move on.
    ticked = s.tick("o", running=[("own", M2, "c2", "batch")], waiting=["next"], now_ms=4_000)
    assert (ticked.counted, ticked.missing) == ([], [])
    s.finish("own", now_ms=6_000)
    assert woken(rdb, "o") == ["next"]


def test_a_requeued_job_passes_the_bounds_and_keeps_its_wait(rdb: redis.Redis) -> None:
    s = sched(rdb, queue_max=1, queue_max_per_client=1)
    assert s.submit("run", M1, "c", "o", now_ms=0).outcome == "running"
    assert s.submit("w", M1, "c", "o", now_ms=1).outcome == "waiting"
    assert s.submit("x", M1, "c", "o", now_ms=2).outcome == "client_queue_full"
    assert s.submit("x", M1, "c2", "o", now_ms=3).outcome == "queue_full"
    # A job that already waited 4 s in its process's own queue is queued all the same.
    requeued = s.submit("x", M1, "c2", "o", requeue=True, waited=4.0, now_ms=5_000)
    assert requeued.outcome == "waiting"
    snap = s.snapshot(now_ms=5_000)
    assert snap["totals"]["waiting"] == 2
    assert snap["models"]["m1:latest"]["oldest_wait"] == pytest.approx(4.999)


def test_finish_is_idempotent_and_cancels_waiters(rdb: redis.Redis) -> None:
    s = sched(rdb)
    s.submit("a", M1, "c", "o", now_ms=0)
    s.submit("b", M1, "c", "o", now_ms=1)
    assert s.finish("b", now_ms=2) == "waiting"
    assert s.finish("b", now_ms=3) == "none"
    assert s.finish("a", now_ms=4) == "running"
    assert woken(rdb, "o") == []
    snap = s.snapshot(now_ms=5)
    assert snap["totals"]["running"] == 0 and snap["totals"]["waiting"] == 0
    assert snap["totals"]["active_models"] == []
    assert snap["clients"] == {}


def test_redis_time_is_used_without_now(rdb: redis.Redis) -> None:
    s = sched(rdb)
    assert s.submit("a", M1, "c", "o").outcome == "running"
    assert s.tick("o", running=[("a", M1, "c", "normal")]).counted == []
    assert s.finish("a") == "running"


# (submit | finish, model or job index, client, ms later, class)
Event = tuple[str, int, int, int, str]


@examples(max_examples=example_count(150), deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["submit", "submit", "finish"]),
            st.sampled_from([0, 0, 0, 1, 1, 2, 3]),  # m1 most, the admin lane least
            st.integers(0, 2),
            st.sampled_from([0, 0, 10, 400, 1100]),  # switch_after is 1000 ms
            st.sampled_from(["interactive", "normal", "normal", "batch"]),
        ),
        min_size=4,
        max_size=40,
    ),
    st.integers(1, 2),
    st.integers(1, 2),
    st.sampled_from([0.5, 1.5, 60.0]),  # GATE_PRIORITY_AGING
)
def test_the_lua_rules_decide_as_core_does(
    redis_server: RedisServer,
    events: list[Event],
    concurrency: int,
    max_active: int,
    aging: float,
) -> None:
    """Random submits and finishes of every class: the same outcomes, the same jobs
    started and the same counts per class as core.py."""
    options = dict(
        concurrency=concurrency,
        max_active_models=max_active,
        queue_max=6,
        queue_max_per_client=3,
        switch_after=1000.0,  # core in ms, like the scripts
        admin_concurrency=1,
        priority_aging=aging * 1000,
    )
    core = Scheduler(**options, queue_timeout=10**9)  # type: ignore[arg-type]
    with redis_server.client() as client:
        prefix = f"h{time.monotonic_ns()}:"
        lua = RedisScheduler(
            client,
            **{**options, "switch_after": 1.0, "priority_aging": aging},  # type: ignore[arg-type]
            lease=10**6,
            prefix=prefix,
        )
        now = 1000
        live: list[str] = []
        for n, (kind, index, who, later, priority) in enumerate(events):
            now += later
            if kind == "submit":
                job, model = f"j{n}", ["m1", "m2", "m3", "admin"][index]
                admin = model == "admin"
                try:
                    expected = core.submit(
                        job, model, f"c{who}", now, admin=admin, priority=priority
                    ).value
                except ClientShareFull:
                    expected = "client_queue_full"
                except QueueFull:
                    expected = "queue_full"
                decision = lua.submit(
                    job, lane_of(model, admin), f"c{who}", "o", now_ms=now, priority=priority
                )
                assert decision.outcome == expected, (n, events)
                if expected in ("running", "waiting"):
                    live.append(job)
            elif live:
                job = live.pop(0 if index < 2 else index % len(live))  # mostly the oldest
                started = set(core.finish(job, now))
                lua.finish(job, now_ms=now)
                raw = client.lrange(f"{prefix}wake:o", 0, -1)
                client.delete(f"{prefix}wake:o")
                assert {i.decode() for i in raw} == started, (n, events)  # type: ignore[union-attr]
            theirs, ours = lua.snapshot(now_ms=now), core.snapshot(now)
            assert theirs["totals"]["active_models"] == sorted(ours["totals"]["active_models"])
            assert theirs["priorities"] == ours["priorities"], (n, events)
            for name, row in ours["models"].items():
                if row["waiting"]:
                    assert theirs["models"][name]["clients_waiting"] == row["clients_waiting"]


# The gevent layer in this process (unpatched sockets block, but briefly)


def test_fallback_shows_in_the_snapshot_and_ends(redis_server: RedisServer, redis_url: str) -> None:
    queue = SharedWorkQueue(Settings(storage_uri=redis_url, queue_lease=5.0))
    snap = queue.snapshot()
    assert (snap["shared"], snap["fallback"]) == (True, False)
    slot = queue.acquire("m1", "c")
    assert isinstance(slot, SharedSlot)
    assert queue.snapshot()["models"]["m1:latest"]["running"] == 1
    slot.release()
    with redis_server.paused():
        started = time.monotonic()
        snap = queue.snapshot()
        assert (snap["shared"], snap["fallback"]) == (False, True)
        local = queue.acquire("m1", "c")
        assert isinstance(local, Slot)  # the in-process WorkQueue's
        assert time.monotonic() - started < 3
        local.release()
    deadline = time.monotonic() + 10
    while queue.fallback and time.monotonic() < deadline:
        gevent.sleep(0.1)  # the pump probes Redis every PROBE_EVERY seconds
    assert not queue.fallback
    assert queue.snapshot()["shared"] is True
    assert isinstance(queue.acquire("m1", "c"), SharedSlot)
    queue.close()


def test_the_snapshot_has_the_same_fields_in_every_mode(
    redis_server: RedisServer, redis_url: str
) -> None:
    def check(snap: QueueSnapshot) -> None:
        # "backends" comes with several backends only (fleet/runtime.py).
        assert set(snap) == set(QueueSnapshot.__annotations__) - {"backends"}
        assert set(snap["totals"]) == TotalsSnapshot.__required_keys__
        assert set(snap["totals"]["rejected"]) == set(REASONS)
        assert set(snap["switch"]) == SwitchSnapshot.__required_keys__
        for lane in (snap["admin"], *snap["models"].values()):
            assert set(lane) == LaneSnapshot.__required_keys__
        for client in snap["clients"].values():
            assert set(client) == ClientSnapshot.__required_keys__
        assert snap["models"]["m1:latest"]["running"] == 1
        assert snap["clients"]["c"] == {"waiting": 0, "running": 1}

    local = WorkQueue(Settings())
    with local.acquire("m1", "c"):
        snap = local.snapshot()
        check(snap)
        assert (snap["shared"], snap["fallback"]) == (False, False)
    shared = SharedWorkQueue(Settings(storage_uri=redis_url))
    with shared.acquire("m1", "c"):
        snap = shared.snapshot()
        check(snap)
        assert (snap["shared"], snap["fallback"]) == (True, False)
    with redis_server.paused(), shared.acquire("m1", "c"):
        snap = shared.snapshot()
        check(snap)
        assert (snap["shared"], snap["fallback"]) == (False, True)
    shared.close()


# Gates sharing one Redis

Factory = Callable[..., Gate]


@pytest.fixture
def gates(gate_factory: Factory) -> Iterator[Factory]:
    """gate_factory, stopping its gates at once as soon as the test ends."""
    yield from quick_gates(gate_factory)


def shared_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {
        "GATE_STORAGE_URI": redis_url,
        "GATE_QUEUE_LEASE": "2",
        "GATE_QUEUE_MAX_PER_CLIENT": "100",
    }
    env.update(extra)
    return env


def flood(gates: list[Gate], jobs: list[tuple[str, str]], headers: dict[str, str]) -> list[int]:
    """Send (model, prompt) jobs round the gates at once; their statuses."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(generate, gates[i % len(gates)], model, prompt=prompt, headers=headers)
            for i, (model, prompt) in enumerate(jobs)
        ]
        return [f.result()[0] for f in futures]


def test_two_gates_share_slots_and_the_model_cap(
    fake: FakeOllama, gates: Factory, redis_url: str
) -> None:
    env = shared_env(redis_url, GATE_MODEL_CONCURRENCY="2", GATE_SWITCH_AFTER="0.5")
    one, two = gates(fake.url, env), gates(fake.url, env)
    fast = {"X-Fake-Token-Interval": "0.02", "X-Fake-Tokens": "5"}
    # Jobs alternate gates, and models every two jobs: each gate sends both models.
    jobs = [(["m1", "m2"][(i // 2) % 2], f"p{i}") for i in range(24)]
    assert flood([one, two], jobs, fast) == [200] * 24
    stats = fake.stats()
    assert stats["max_in_flight"]["m1:latest"] <= 2
    assert stats["max_in_flight"]["m2:latest"] <= 2
    assert stats["max_models_in_flight"] == 1
    # The slots were used: a cap of 1 per gate would not have shown 2.
    assert max(stats["max_in_flight"].values()) == 2
    for gate in (one, two):
        assert "Traceback" not in gate.logs()


def test_four_models_over_two_gates_never_overflow_vram_for_two(
    fake: FakeOllama, gates: Factory, redis_url: str
) -> None:
    fake.configure(vram=2, on_overflow="crash", load_time=0.05, token_interval=0.01, tokens=4)
    env = shared_env(
        redis_url, GATE_MAX_ACTIVE_MODELS="2", GATE_MODEL_CONCURRENCY="2", GATE_SWITCH_AFTER="0.5"
    )
    one, two = gates(fake.url, env), gates(fake.url, env)
    jobs = [(f"m{1 + (i // 2) % 4}", f"p{i}") for i in range(32)]
    assert flood([one, two], jobs, {}) == [200] * 32
    stats = fake.stats()
    assert stats["crashes"] == 0
    assert stats["max_models_in_flight"] <= 2
    assert max(stats["max_in_flight"].values()) <= 2


def test_one_gate_with_two_workers_shares_slots(
    fake: FakeOllama, gates: Factory, redis_url: str
) -> None:
    gate = gates(fake.url, shared_env(redis_url, GATE_WORKERS="2"))
    fast = {"X-Fake-Token-Interval": "0.02", "X-Fake-Tokens": "5"}
    assert flood([gate], [("m1", f"p{i}") for i in range(16)], fast) == [200] * 16
    assert fake.stats()["max_in_flight"]["m1:latest"] == 1
    assert len(gate.worker_pids()) == 2


def test_the_queue_bound_is_global(fake: FakeOllama, gates: Factory, redis_url: str) -> None:
    env = shared_env(redis_url, GATE_QUEUE_MAX="2")
    one, two = gates(fake.url, env), gates(fake.url, env)
    with ThreadPoolExecutor(3) as pool:
        busy = [
            pool.submit(generate, gate, "m1", prompt=f"p{i}", headers=SLOW)
            for i, gate in enumerate((one, two, one))
        ]
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        wait_until("two jobs wait", lambda: status_json(two)["totals"]["waiting"] == 2)
        resp = requests.post(two.url + "/api/generate", json={"model": "m1", "prompt": "x"})
        assert resp.status_code == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert [f.result()[0] for f in busy] == [200, 200, 200]


def test_clients_take_turns_across_gates(fake: FakeOllama, gates: Factory, redis_url: str) -> None:
    env = shared_env(redis_url, GATE_QUEUE_MAX_PER_CLIENT="50")
    one, two = gates(fake.url, env), gates(fake.url, env)
    job = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "3"}  # 0.3 s a job
    with ThreadPoolExecutor(9) as pool:
        flood = [
            pool.submit(generate, one, "m1", prompt=f"flood{i}", headers=job) for i in range(8)
        ]
        # The flood's first job runs, the rest wait in Redis.
        wait_until("7 wait", lambda: status_json(one)["totals"]["waiting"] == 7)
        lone = pool.submit(generate, two, "m1", prompt="lone", headers=job, source="127.0.0.2")
        assert lone.result()[0] == 200
        assert all(f.result()[0] == 200 for f in flood)
    order = [r["json"]["prompt"] for r in fake.stats()["requests"] if r["model"] == "m1:latest"]
    # One slot for both gates: the flood's running job, at most one more of its turn,
    # then the lone client, never beside them.
    assert order.index("lone") <= 2, order
    assert fake.stats()["max_in_flight"]["m1:latest"] == 1


def status_json(gate: Gate) -> dict[str, Any]:
    """The shared queue's state, read from Redis as every gate sees it."""
    url = gate.env["GATE_STORAGE_URI"]
    with redis.Redis.from_url(url) as client:
        snap = RedisScheduler(client).snapshot()
    return snap


def test_a_killed_gates_slot_comes_back_within_the_lease(
    fake: FakeOllama, gates: Factory, redis_url: str
) -> None:
    env = shared_env(redis_url, GATE_QUEUE_LEASE="2", GATE_QUEUE_TIMEOUT="30")
    one, two = gates(fake.url, env), gates(fake.url, env)
    long = {"X-Fake-Token-Interval": "0.5", "X-Fake-Tokens": "60"}  # 30 s if left alone
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(generate, one, "m1", prompt="held", headers=long, timeout=60)
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        for pid in one.worker_pids():
            os.kill(pid, signal.SIGKILL)
        one.proc.send_signal(signal.SIGKILL)
        started = time.monotonic()
        status, headers, _ = generate(two, "m1", prompt="next", headers={"X-Fake-Tokens": "1"})
        waited = time.monotonic() - started
        assert status == 200
        # It waited for the dead gate's lease (2 s, renewed every 2/3 s) to lapse, and
        # not much longer: the bound is the lease plus a tick.
        assert 0.3 < float(headers["x-gate-queue-wait"]) < 10
        assert waited < 10
        with pytest.raises(Exception):  # noqa: B017 - the killed gate's client sees its socket die
            held.result()
    one.proc.wait(5)


def test_a_gate_shutting_down_keeps_its_running_jobs_slots(
    fake: FakeOllama, gates: Factory, redis_url: str
) -> None:
    env = shared_env(redis_url, GATE_QUEUE_LEASE="2", GATE_QUEUE_TIMEOUT="30")
    one, two = gates(fake.url, env), gates(fake.url, env)
    long = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "30"}  # 3 s: longer than a lease
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(generate, one, "m1", prompt="held", headers=long)
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        one.proc.send_signal(signal.SIGTERM)  # graceful: its running job finishes
        status, _, _ = generate(two, "m1", prompt="next", headers={"X-Fake-Tokens": "1"})
        assert status == 200
        assert held.result()[0] == 200
    one.proc.wait(10)
    # The next job waited for the held one to end: its slot outlived its lease.
    assert fake.stats()["max_in_flight"]["m1:latest"] == 1
    assert status_json(two)["totals"]["reaped"] == 0


def test_a_paused_redis_falls_back_and_recovers(
    fake: FakeOllama, gates: Factory, redis_url: str, redis_server: RedisServer
) -> None:
    gate = gates(fake.url, shared_env(redis_url))
    quick = {"X-Fake-Token-Interval": "0.01", "X-Fake-Tokens": "3"}
    job = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "3"}  # 0.3 s

    def timed(model: str, headers: dict[str, str] = quick) -> int:
        started = time.monotonic()
        status, _, body = generate(gate, model, headers=headers, timeout=30)
        assert status != 500, body
        assert time.monotonic() - started < 10, "took too long"
        return status

    assert timed("m1") == 200
    with ThreadPoolExecutor(6) as pool:
        # One job runs and five wait in Redis when it stops answering mid-traffic.
        busy = [pool.submit(timed, "m1", job) for _ in range(6)]
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        wait_until("5 wait in Redis", lambda: status_json(gate)["totals"]["waiting"] == 5)
        with redis_server.paused():
            started = time.monotonic()
            during = list(pool.map(timed, ["m1"] * 6))
            assert [f.result() for f in busy] == [200] * 6
            assert time.monotonic() - started < 15
        assert during == [200] * 6
    wait_until("shared again", lambda: "slots are shared again" in gate.logs())
    logs = gate.logs()
    assert "Redis unreachable" in logs
    assert "slots are shared again" in logs
    assert "Traceback" not in logs
    # Shared again: jobs are admitted through Redis.
    with redis.Redis.from_url(redis_url) as client:
        before = int(client.hget("gate:wq:stats", "admitted") or 0)
        assert timed("m1") == 200
        assert int(client.hget("gate:wq:stats", "admitted") or 0) == before + 1


def local_queue(gate: Gate) -> tuple[int, int]:
    """(running, waiting) of the gate's own work queue, from its /gate/status.json."""
    queue = queue_of(gate)
    assert queue["fallback"] is True
    return queue["running"], queue["waiting"]


def test_after_redis_returns_the_shared_cap_holds_again(
    fake: FakeOllama, gates: Factory, redis_url: str, redis_server: RedisServer
) -> None:
    """Jobs that queued on each gate's own slots during an outage are counted in Redis again."""
    env = shared_env(redis_url, GATE_QUEUE_TIMEOUT="60")  # lease 2 s, one job per model
    one, two = gates(fake.url, env), gates(fake.url, env)
    job = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "8"}  # about 0.8 s
    named = (("one", one), ("two", two))
    with ThreadPoolExecutor(10) as pool:
        with redis_server.paused():
            backlog = [
                pool.submit(generate, gate, "m1", prompt=f"{name}{i}", headers=job)
                for i in range(4)
                for name, gate in named
            ]
            # Each gate falls back to its own slot: one job runs there, three wait there.
            for name, gate in named:
                wait_until(f"{name} runs 1 and queues 3", lambda g=gate: local_queue(g) == (1, 3))
            assert fake.stats()["in_flight"]["m1:latest"] == 2  # the price of serving at all
        for name, gate in named:
            wait_until(f"{name} shares again", lambda g=gate: "shared again" in g.logs())
        # New jobs now go through Redis, which must count what runs and waits on each gate.
        late = [
            pool.submit(generate, gate, "m1", prompt=f"late-{name}", headers=job)
            for name, gate in named
        ]
        # The jobs running when Redis came back finish; from then on one at a time.
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest", 0) <= 1, timeout=10)
        before = fake.stats()["max_in_flight"]["m1:latest"]
        fake.reset()  # max_in_flight counts from here
        assert [f.result()[0] for f in backlog + late] == [200] * 10
    after = fake.stats()
    # Never more than the outage's own slots (one per gate), and one at a time again.
    assert before <= 2
    assert after["max_in_flight"]["m1:latest"] == 1
    assert len(clients(after)) >= 3  # the check above saw jobs run, not an empty queue
    for gate in (one, two):
        logs = gate.logs()
        assert "Redis unreachable" in logs and "Traceback" not in logs


def test_a_flushed_redis_counts_the_running_job_again_and_requeues_the_waiting_one(
    fake: FakeOllama, gates: Factory, redis_url: str, redis_server: RedisServer
) -> None:
    gate = gates(fake.url, shared_env(redis_url, GATE_QUEUE_TIMEOUT="60"))  # lease 2 s
    long = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "30"}  # 3 s: renewed meanwhile
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(generate, gate, "m1", prompt="first", headers=long)
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        second = pool.submit(generate, gate, "m1", prompt="second", headers={"X-Fake-Tokens": "1"})
        wait_until("second waits", lambda: status_json(gate)["totals"]["waiting"] == 1)
        with redis_server.client() as client:
            client.flushall()  # as a Redis restarted without persistence

        def recovered() -> bool:
            totals = status_json(gate)["totals"]
            return (totals["running"], totals["waiting"], totals["counted_again"]) == (1, 1, 1)

        # The next renewal counts the running job again and queues the waiting one again,
        # behind it: the waiting job does not take a slot of its own.
        wait_until("counted and queued again", recovered)
        assert first.result()[0] == 200 and second.result()[0] == 200
    assert fake.stats()["max_in_flight"]["m1:latest"] == 1
    assert "had lost its lease" in gate.logs()


def test_leaving_or_timing_out_while_waiting_frees_everything(
    fake: FakeOllama, gates: Factory, redis_url: str
) -> None:
    env = shared_env(redis_url, GATE_QUEUE_TIMEOUT="2", GATE_QUEUE_LEASE="30")
    one, two = gates(fake.url, env), gates(fake.url, env)
    longer = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "40"}  # past the queue timeout
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, one, "m1", prompt="first", headers=longer)
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        sock = open_stream(two, "m1", "gone", {})
        wait_until("it waits in Redis", lambda: status_json(two)["totals"]["waiting"] == 1)
        sock.close()
        wait_until("it left", lambda: status_json(two)["totals"]["waiting"] == 0)
        late = requests.post(two.url + "/api/generate", json={"model": "m1", "prompt": "late"})
        assert late.status_code == 503 and int(late.headers["Retry-After"]) >= 1
        assert running.result()[0] == 200
    seen = [r["json"]["prompt"] for r in fake.stats()["requests"] if r["path"] == "/api/generate"]
    assert "gone" not in seen and "late" not in seen
    # Nothing leaked in Redis: a job on either gate runs at once.
    wait_until("all done", lambda: status_json(one)["totals"]["running"] == 0)
    totals = status_json(one)["totals"]
    assert (totals["running"], totals["waiting"]) == (0, 0)
    # The one that left is counted as cancelled, the one that waited too long as a timeout.
    assert totals["rejected"]["cancelled"] == 1 and totals["rejected"]["queue_timeout"] == 1
    for gate in (one, two):
        status, headers, _ = generate(gate, "m1", headers={"X-Fake-Tokens": "1"})
        assert status == 200 and float(headers["x-gate-queue-wait"]) < 0.5
