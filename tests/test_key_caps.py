"""A key's own queue share (``max_waiting``): the pure core, the Lua scripts, and end to end."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from hypothesis import example, given, settings
from hypothesis import strategies as st

from endpoints import normalize_model
from errors import ClientShareFull, QueueFull
from fakeollama import FakeOllama
from limiter.keys import parse_keys
from limiter.mint import new_secret, stanza
from tests.limiter_support import GatesFactory, quick_gates
from tests.machines import PICK, initialize, invariant, machine_test, picked, rule
from tests.redis_support import RedisServer
from tests.support import example_count
from workqueue.core import Admission, Scheduler
from workqueue.scripts import RedisScheduler, lane_of

SHARES = {"batch": 2, "tiny": 1, "default": None}


def test_a_keys_share_replaces_the_default_for_that_client_only() -> None:
    s = Scheduler(queue_max_per_client=3)
    assert s.submit("run", "m", "other", 0.0) is Admission.RUNNING
    for n in range(2):
        assert s.submit(f"b{n}", "m", "batch", 0.0, max_waiting=2) is Admission.WAITING
    with pytest.raises(ClientShareFull, match=r"limit 2\)"):
        s.submit("b2", "m", "batch", 0.0, max_waiting=2)
    for n in range(3):  # the default share of 3 for everyone else
        assert s.submit(f"o{n}", "m", "other", 0.0) is Admission.WAITING
    with pytest.raises(ClientShareFull, match=r"limit 3\)"):
        s.submit("o3", "m", "other", 0.0)
    # A share larger than the default is a larger share.
    for n in range(5):
        s.submit(f"w{n}", "m", "wide", 0.0, max_waiting=5)
    assert s.snapshot(0.0)["clients"]["wide"]["waiting"] == 5


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(SHARES)), st.sampled_from(["submit", "finish"])),
        max_size=60,
    )
)
def test_no_client_ever_waits_past_its_share(steps: list[tuple[str, str]]) -> None:
    s = Scheduler(queue_max_per_client=3, queue_max=100)
    waiting: Counter[str] = Counter()
    running: list[str] = []
    owner: dict[str, str] = {}
    for n, (client, what) in enumerate(steps):
        share = SHARES[client]
        limit = 3 if share is None else share
        if what == "finish" and running:
            for started in s.finish(running.pop(0), float(n)):
                running.append(str(started))
                waiting[owner[str(started)]] -= 1
            continue
        job = str(n)
        owner[job] = client
        try:
            admission = s.submit(job, "m", client, float(n), max_waiting=share)
        except ClientShareFull:
            assert waiting[client] >= limit
            continue
        if admission is Admission.RUNNING:
            running.append(job)
        else:
            waiting[client] += 1
        assert waiting[client] <= limit
        snapshot = s.snapshot(float(n))["clients"]
        assert {c: v["waiting"] for c, v in snapshot.items() if v["waiting"]} == {
            c: v for c, v in waiting.items() if v
        }


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    redis_server.flush()
    with redis_server.client() as client:
        yield client


def test_the_shared_queue_honours_a_keys_share(rdb: redis.Redis) -> None:
    lua = RedisScheduler(rdb, queue_max_per_client=3, lease=60.0, prefix="t:")  # type: ignore[arg-type]
    lane = lane_of("m", False)
    assert lua.submit("run", lane, "other", "o").outcome == "running"
    outcomes = [lua.submit(f"b{n}", lane, "batch", "o", max_waiting=2).outcome for n in range(3)]
    assert outcomes == ["waiting", "waiting", "client_queue_full"]
    outcomes = [lua.submit(f"o{n}", lane, "other", "o").outcome for n in range(4)]
    assert outcomes == ["waiting"] * 3 + ["client_queue_full"]


SECRETS = {name: new_secret() for name in ("batch", "alice")}
SLOW = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "10"}  # about one second each


@pytest.fixture
def gates(gate_factory: GatesFactory) -> Iterator[GatesFactory]:
    yield from quick_gates(gate_factory)


def test_a_keys_share_under_gunicorn(fake: FakeOllama, gates: GatesFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        stanza("batch", SECRETS["batch"]) + "max_waiting = 2\n" + stanza("alice", SECRETS["alice"])
    )
    assert parse_keys(keys.read_text()).by_name["batch"].max_waiting == 2
    gate = gates(fake.url, {"GATE_API_KEYS_FILE": str(keys)})
    gen = {"model": "llama3.2", "prompt": "hi", "stream": False}
    statuses: dict[str, list[int]] = {"batch": [], "alice": []}

    def send(name: str) -> None:
        headers = {**SLOW, "Authorization": f"Bearer {SECRETS[name]}"}
        r = requests.post(gate.url + "/api/generate", json=gen, headers=headers, timeout=60)
        statuses[name].append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"].startswith(
                "too many waiting requests from this client (limit 2)"
            )

    first = threading.Thread(target=send, args=("batch",))
    first.start()
    fake.wait_for(lambda s: s["in_flight"].get("llama3.2:latest") == 1)  # batch's first runs
    threads = [threading.Thread(target=send, args=(n,)) for n in ["batch"] * 4 + ["alice"] * 3]
    for thread in threads:
        thread.start()
    for thread in [first, *threads]:
        thread.join()
    assert sorted(statuses["batch"]) == [200, 200, 200, 429, 429]  # 1 running + its 2 waiting
    assert statuses["alice"] == [200, 200, 200]  # the default share (32) for alice


# -- max_running: a key's jobs running at once, all models ---------------------------------


def test_a_capped_clients_extra_jobs_wait_without_holding_a_slot() -> None:
    s = Scheduler(concurrency=3)
    assert s.submit("b1", "m", "batch", 0.0, max_running=1) is Admission.RUNNING
    # batch's second job waits although slots are free ...
    assert s.submit("b2", "m", "batch", 0.0, max_running=1) is Admission.WAITING
    # ... and takes none from others: they run at once, past it.
    assert s.submit("a1", "m", "alice", 0.0) is Admission.RUNNING
    assert s.submit("a2", "m", "alice", 0.0) is Admission.RUNNING
    assert s.snapshot(0.0)["clients"]["batch"] == {"waiting": 1, "running": 1}
    assert s.finish("a1", 1.0) == []  # a free slot, but batch is at its cap
    assert s.finish("b1", 2.0) == ["b2"]  # batch's job ended: its next one runs
    # The cap counts every model: a job for another model waits too.
    assert s.submit("b3", "other", "batch", 3.0, max_running=1) is Admission.WAITING


def test_a_capped_client_neither_wins_a_model_place_nor_forces_a_switch() -> None:
    s = Scheduler(concurrency=1, max_active_models=1, switch_after=1.0)
    assert s.submit("b1", "m", "batch", 0.0, max_running=1) is Admission.RUNNING
    assert s.submit("b2", "other", "batch", 0.0, max_running=1) is Admission.WAITING
    # Long past switch_after, yet nothing is due: batch's waiting job may not run anyway.
    assert s.pending_switch(100.0) is None
    assert s.submit("a1", "m", "alice", 100.0) is Admission.WAITING  # m's one slot is taken
    # batch's job ends: its other job may run now, has waited longest, and gets the place.
    assert s.finish("b1", 101.0) == ["b2"]
    assert s.snapshot(101.0)["clients"]["alice"] == {"waiting": 1, "running": 0}


def test_a_model_whose_jobs_waited_for_a_cap_takes_a_free_place_without_a_switch() -> None:
    s = Scheduler(max_active_models=2, switch_after=0.0)
    assert s.submit("b1", "m", "batch", 0.0, max_running=1) is Admission.RUNNING
    assert s.submit("b2", "n", "batch", 0.0, max_running=1) is Admission.WAITING
    assert s.submit("a1", "m", "alice", 0.0) is Admission.WAITING  # m's one slot is taken
    assert s.pending_switch(5.0) is None  # n would find a place free: nothing drains
    # batch's job ends: m's own next job first (affinity), and n takes the free place.
    assert s.finish("b1", 5.0) == ["a1", "b2"]
    assert s.snapshot(5.0)["totals"]["forced_switches"] == 0


def test_a_job_that_brings_its_client_to_its_cap_calls_off_the_switch_its_others_made_due() -> None:
    s = Scheduler(concurrency=2, switch_after=0.0)
    assert s.submit("b1", "m", "batch", 0.0, max_running=2) is Admission.RUNNING
    assert s.submit("b2", "n", "batch", 0.0, max_running=2) is Admission.WAITING
    assert s.pending_switch(0.0) == ("n:latest", ["m:latest"])  # m drains for batch's n
    assert s.submit("a1", "m", "alice", 0.0) is Admission.WAITING
    # batch's admin job runs at once: batch is at its cap, its n job waits for it, and m
    # need not drain any more: the next tick gives alice m's free slot.
    assert s.submit("b3", "admin", "batch", 0.0, admin=True, max_running=2) is Admission.RUNNING
    assert s.pending_switch(0.0) is None
    assert s.tick(0.0) == ["a1"]


@pytest.mark.parametrize("cap", [1, 2])
def test_turns_pass_over_a_capped_client_and_keep_its_place(cap: int) -> None:
    s = Scheduler(concurrency=1)
    assert s.submit("hold", "m", "x", 0.0) is Admission.RUNNING
    for n in range(3):
        s.submit(f"b{n}", "m", "batch", 0.0, max_running=cap)
        s.submit(f"a{n}", "m", "alice", 0.0)
    order = []
    running = "hold"
    for t in range(1, 7):
        (running,) = s.finish(running, float(t))
        order.append(running)
    # Taking turns, batch included (one slot: it never runs more than one at once).
    assert order == ["b0", "a0", "b1", "a1", "b2", "a2"]


class CapsMachine:
    """Random jobs of capped and uncapped clients: caps hold, and no slot idles for them."""

    make: Any = Scheduler  # what decides (tests/test_fleet_placement.py: a fleet of one)

    @initialize(
        caps=st.tuples(st.integers(1, 2), st.integers(1, 3)),
        concurrency=st.integers(1, 3),
        max_active=st.integers(1, 2),
        switch_after=st.sampled_from([0.0, 1.0, 5.0]),
        aging=st.sampled_from([1.0, 60.0]),
    )
    def setup(
        self,
        caps: tuple[int, int],
        concurrency: int,
        max_active: int,
        switch_after: float,
        aging: float,
    ) -> None:
        self.caps: dict[str, int | None] = {"c1": caps[0], "c2": caps[1], "c3": None}
        self.slots = concurrency
        self.max_active = max_active
        self.s = self.make(
            concurrency=concurrency,
            max_active_models=max_active,
            queue_max=40,
            queue_max_per_client=12,
            queue_timeout=30.0,
            switch_after=switch_after,
            admin_concurrency=1,
            priority_aging=aging,
        )
        self.now = 0.0
        self.ids = itertools.count()
        self.jobs: dict[int, tuple[str, str]] = {}  # id -> (lane, client)
        self.running: set[int] = set()

    def started(self, ids: list[Any]) -> None:
        for job in ids:
            assert job in self.jobs and job not in self.running
            self.running.add(job)

    @rule(
        model=["a", "b", "a:latest", "b:latest", "admin"],  # short or in full, as the proxy
        client=["c1", "c2", "c3"],
        count=range(1, 4),
        priority=["interactive", "normal", "batch"],
    )
    def submit(self, model: str, client: str, count: int, priority: str) -> None:
        for _ in range(count):
            job = next(self.ids)
            admin = model == "admin"
            try:
                admission = self.s.submit(
                    job,
                    model,
                    client,
                    self.now,
                    admin=admin,
                    max_running=self.caps[client],
                    priority=priority,
                )
            except (ClientShareFull, QueueFull):
                continue
            self.jobs[job] = ("admin" if admin else normalize_model(model), client)
            if admission is Admission.RUNNING:
                self.running.add(job)
                if self.caps[client] is not None:  # as the work queue does (gate.py)
                    self.started(self.s.tick(self.now))

    @rule(pick=PICK)
    def finish(self, pick: int) -> None:
        if not self.jobs:
            return
        job = picked(self.jobs, pick)
        del self.jobs[job]
        self.running.discard(job)
        self.started(self.s.finish(job, self.now))

    @rule(step=[0.5, 2.0, 10.0])
    def advance(self, step: float) -> None:
        self.now += step
        expired, started = self.s.expire(self.now)
        for job in expired:
            assert job not in self.running
            del self.jobs[job]
        self.started(started)
        self.started(self.s.tick(self.now))

    @invariant()
    def caps_hold_and_no_slot_idles_for_a_capped_client(self) -> None:
        if not hasattr(self, "s"):
            return
        running: Counter[str] = Counter(self.jobs[j][1] for j in self.running)
        for client, cap in self.caps.items():
            assert cap is None or running[client] <= cap, (client, running)
        lanes: Counter[str] = Counter(self.jobs[j][0] for j in self.running)
        active = {lane for lane in lanes if lane != "admin"}
        assert len(active) <= self.max_active
        pending = self.s.pending_switch(self.now) is not None
        for job, (lane, client) in self.jobs.items():
            if job in self.running:
                continue
            cap = self.caps[client]
            if cap is not None and running[client] >= cap:
                continue  # it waits for its own key, as it must
            # A job that may run waits only for a slot or a place: none idles for it.
            if lane == "admin":
                assert lanes["admin"] == 1, ("admin slot idle", job)
            elif lane in active:
                assert lanes[lane] == self.slots or pending, ("slot idle", lane, job)
            else:
                assert len(active) == self.max_active or pending, ("place idle", lane, job)
        snap = self.s.snapshot(self.now)["clients"]
        for client in self.caps:
            assert snap.get(client, {"running": 0})["running"] == running[client]

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        for job in sorted(self.jobs):
            self.s.finish(job, self.now)
        assert self.s.idle()


test_caps_hold_in_random_runs = machine_test(CapsMachine, max_examples=300, step_count=40)


CAPS: dict[str, int | None] = {"c0": 1, "c1": 2, "c2": None}
# (kind, model: m1 m2 m3 admin, client: c0 c1 c2, ms later, class); a finish ends the
# oldest live job. c0's m2 job ends while c0 waits for m1 and for m2, both holding a place.
TWO_RUNNING_MODELS = [
    ("submit", 1, 0, 0, "interactive"),
    ("submit", 0, 0, 0, "interactive"),
    ("submit", 0, 1, 0, "interactive"),
    ("submit", 1, 0, 0, "interactive"),
    ("finish", 0, 0, 0, "interactive"),
]


@settings(max_examples=example_count(150), deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["submit", "submit", "finish"]),
            st.sampled_from([0, 0, 0, 1, 1, 2, 3]),  # m1 most, the admin lane least
            st.integers(0, 2),
            st.sampled_from([0, 0, 10, 400, 1100]),  # switch_after is 1000 ms
            st.sampled_from(["interactive", "normal", "batch"]),
        ),
        min_size=4,
        max_size=40,
    ),
    st.integers(1, 3),
    st.integers(1, 2),
    st.sampled_from([0.5, 60.0]),  # GATE_PRIORITY_AGING
)
@example(events=TWO_RUNNING_MODELS, concurrency=2, max_active=2, aging=0.5)
def test_the_lua_scripts_cap_running_jobs_as_core_does(
    redis_server: RedisServer,
    events: list[tuple[str, int, int, int, str]],
    concurrency: int,
    max_active: int,
    aging: float,
) -> None:
    """Random submits and finishes of capped clients of every priority class: the same
    outcomes and jobs started."""
    lua_and_core_alike(redis_server, events, concurrency, max_active, aging)


def test_models_holding_a_place_take_their_jobs_in_the_order_they_took_it(
    redis_server: RedisServer,
) -> None:
    """c0 (capped at 1) waits for m1 and for m2, which both hold a place; its m2 job ends:
    its next job to start is the one of the model that took its place first (m2), as in
    the core, whatever order Redis keeps a set's members in (a hash order: each pair of
    names below falls one way or the other)."""
    for n in range(16):
        models = (f"one{n}", f"two{n}", "m3", "admin")
        lua_and_core_alike(redis_server, TWO_RUNNING_MODELS, 2, 2, 0.5, models)


def lua_and_core_alike(
    redis_server: RedisServer,
    events: list[tuple[str, int, int, int, str]],
    concurrency: int,
    max_active: int,
    aging: float,
    models: tuple[str, ...] = ("m1", "m2", "m3", "admin"),
) -> None:
    """Apply ``events`` to the core and to the Lua scripts: the same outcomes, the same
    jobs started, the same counts."""
    options = dict(
        concurrency=concurrency,
        max_active_models=max_active,
        queue_max=8,
        queue_max_per_client=4,
        switch_after=1000.0,  # core in ms, like the scripts
        admin_concurrency=1,
    )
    core = Scheduler(**options, queue_timeout=10**9, priority_aging=aging * 1000)  # type: ignore[arg-type]
    with redis_server.client() as client:
        prefix = f"k{time.monotonic_ns()}:"
        lua = RedisScheduler(
            client,
            **{**options, "switch_after": 1.0},  # type: ignore[arg-type]
            lease=10**6,
            prefix=prefix,
            priority_aging=aging,
        )
        now = 1000
        live: list[str] = []
        for n, (kind, index, who, later, priority) in enumerate(events):
            now += later
            if kind == "submit":
                job, model, name = f"j{n}", models[index], f"c{who}"
                admin = model == "admin"
                cap = CAPS[name]
                try:
                    expected = core.submit(
                        job, model, name, now, admin=admin, max_running=cap, priority=priority
                    )
                    outcome = expected.value
                except ClientShareFull:
                    outcome = "client_queue_full"
                except QueueFull:
                    outcome = "queue_full"
                decision = lua.submit(
                    job,
                    lane_of(model, admin),
                    name,
                    "o",
                    max_running=cap,
                    now_ms=now,
                    priority=priority,
                )
                assert decision.outcome == outcome, (n, events)
                if outcome in ("running", "waiting"):
                    live.append(job)
            elif live:
                job = live.pop(0 if index < 2 else index % len(live))  # mostly the oldest
                started = set(core.finish(job, now))
                lua.finish(job, now_ms=now)
                raw = client.lrange(f"{prefix}wake:o", 0, -1)
                client.delete(f"{prefix}wake:o")
                assert {i.decode() for i in raw} == started, (n, events)  # type: ignore[union-attr]
            snap, expected_snap = lua.snapshot(now_ms=now), core.snapshot(now)
            assert snap["totals"]["active_models"] == sorted(
                expected_snap["totals"]["active_models"]
            )
            assert snap["clients"] == expected_snap["clients"], (n, events)
            for field in ("activations", "forced_switches"):
                assert snap["totals"][field] == expected_snap["totals"][field], (n, events)


def test_a_keys_running_cap_under_gunicorn(
    fake: FakeOllama, gates: GatesFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        stanza("batch", SECRETS["batch"]) + "max_running = 1\n" + stanza("alice", SECRETS["alice"])
    )
    gate = gates(fake.url, {"GATE_API_KEYS_FILE": str(keys), "GATE_MODEL_CONCURRENCY": "2"})
    gen = {"model": "llama3.2", "prompt": "hi", "stream": False}
    done: dict[str, list[int]] = {"batch": [], "alice": []}

    def send(name: str, headers: dict[str, str]) -> None:
        headers = {**headers, "Authorization": f"Bearer {SECRETS[name]}"}
        r = requests.post(gate.url + "/api/generate", json=gen, headers=headers, timeout=60)
        done[name].append(r.status_code)

    quick = {"X-Fake-Token-Interval": "0.05", "X-Fake-Tokens": "3"}
    first = [threading.Thread(target=send, args=("batch", quick)) for _ in range(3)]
    for thread in first:
        thread.start()
    for thread in first:
        thread.join()
    assert done["batch"] == [200] * 3
    assert fake.stats()["max_in_flight"]["llama3.2:latest"] == 1  # two slots, one for batch

    fake.reset()
    batch = [threading.Thread(target=send, args=("batch", SLOW)) for _ in range(3)]
    for thread in batch:
        thread.start()
    fake.wait_for(lambda s: s["in_flight"].get("llama3.2:latest") == 1)
    # batch's other jobs wait without holding the free slot: alice takes it at once,
    # and is answered before any batch job ends.
    send("alice", {"X-Fake-Tokens": "1"})
    assert done["alice"] == [200]
    assert fake.stats()["completed"] == 1
    for thread in batch:
        thread.join()
    assert done["batch"] == [200] * 6


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("max_waiting = 0", "max_waiting must be a whole number of 1 or more"),
        ("max_running = true", "max_running must be a whole number of 1 or more"),
        ("max_running = '2'", "max_running must be a whole number of 1 or more"),
    ],
)
def test_bad_caps_name_file_line_and_field(line: str, says: str) -> None:
    from limiter.keys import KeysFileError

    with pytest.raises(KeysFileError) as info:
        parse_keys(stanza("a", "secret") + "\n" + line + "\n", "keys.toml")
    assert (info.value.path, info.value.line) == ("keys.toml", 5)
    assert f"[keys.a]: {says}" in str(info.value)


def test_minted_caps_are_the_keys_caps_with_one_or_several_backends(tmp_path: Path) -> None:
    from limiter.extension import GateLimiter
    from settings import Settings

    text = stanza("b", "secret", max_waiting=100, max_running=2)
    key = parse_keys(text).by_name["b"]
    assert (key.max_waiting, key.max_running) == (100, 2)
    keys = tmp_path / "keys.toml"
    keys.write_text(text)
    one = Settings(api_keys_file=str(keys))
    assert GateLimiter(one).caps_of("b") == (100, 2)
    assert GateLimiter(one).caps_of("nobody") == (None, None)
    several = one.replace(upstream="http://127.0.0.1:1,http://127.0.0.1:2")
    assert GateLimiter(several).caps_of("b") == (100, 2)  # the fleet's placement caps it too
    # With Redis too: the grant scripts count the key's jobs in every gate.
    shared = several.replace(storage_uri="redis://127.0.0.1:6379/0")
    assert GateLimiter(shared).caps_of("b") == (100, 2)
    assert GateLimiter(one.replace(storage_uri="redis://127.0.0.1:6379/0")).caps_of("b") == (
        100,
        2,
    )
