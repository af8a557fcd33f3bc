"""A key's own queue share (``max_waiting``): the pure core, the Lua scripts, and end to end."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from errors import ClientShareFull
from fakeollama import FakeOllama
from limiter.keys import parse_keys
from limiter.mint import new_secret, stanza
from tests.limiter_support import GatesFactory, quick_gates
from tests.redis_support import RedisServer
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
