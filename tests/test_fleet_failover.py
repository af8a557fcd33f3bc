"""Failover's re-placement under real gunicorn with several fake Ollamas: a job whose
backend failed before answering is placed again, once, on another backend that holds its
model; it keeps its place in the queue, costs no token budget, and leaks no slot."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from fakeollama import FakeOllama
from fleet.shared_scripts import KEY_PREFIX, FleetGrants
from limiter.budget import WINDOW
from tests.redis_support import RedisServer
from tests.support import Gate, client_requests
from tests.test_fleet_gate import _status, backends_file, wait_for

Fakes = dict[str, FakeOllama]

MODEL = "phi3:latest"
#: A job that streams until its client leaves (10,000 tokens 10 ms apart).
HELD = {"X-Fake-Tokens": "10000"}


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    """Three fake Ollamas with phi3 installed, in this order in the backends file.

    Tests name this fixture before gate_factory, so that their gates stop (and their
    pollers let go of the fakes' connections) before the fakes do.
    """
    servers = {name: FakeOllama(token_interval=0.01, models="phi3=2GB") for name in "abc"}
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


def pick(fakes: Fakes, *names: str) -> Fakes:
    return {name: fakes[name] for name in names}


def start(
    gate_factory: Callable[..., Gate],
    tmp_path: Path,
    fakes: Fakes,
    env: dict[str, str] | None = None,
    *,
    loaded: bool = False,
) -> Gate:
    """A gate in front of ``fakes`` (one phi3 slot each); returns once it has read every
    backend's models (and, with ``loaded``, found phi3 loaded on each: loaded directly
    first, so that placement ranks the backends by configuration order alone)."""
    if loaded:
        for server in fakes.values():
            body = {"model": "phi3", "prompt": "warm-up", "stream": False}
            requests.post(server.url + "/api/generate", json=body, timeout=30).raise_for_status()
    path = backends_file(tmp_path, fakes)
    gate = gate_factory("http://127.0.0.1:9", {"GATE_BACKENDS_FILE": path, **(env or {})})

    def read() -> bool:
        rows: list[dict[str, Any]] = _status(gate)["backends"]  # type: ignore[assignment]
        return all(row["installed"] == 1 and (not loaded or MODEL in row["loaded"]) for row in rows)

    wait_for(read)
    return gate


def jobs(server: FakeOllama) -> list[str]:
    """The prompts of the tests' jobs that reached ``server`` (warm-ups left out), in order."""
    return [
        str(r["json"]["prompt"])
        for r in client_requests(server)
        if r["path"] == "/api/generate" and str(r["json"].get("prompt", "")).startswith("job")
    ]


def send(gate: Gate, prompt: str, **kwargs: Any) -> requests.Response:
    body = {"model": "phi3", "prompt": prompt, **kwargs.pop("body", {})}
    return requests.post(gate.url + "/api/generate", json=body, timeout=60, **kwargs)


def queue(gate: Gate) -> dict[str, Any]:
    return _status(gate)["queue"]  # type: ignore[return-value]


def rows(gate: Gate) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in _status(gate)["backends"]}  # type: ignore[union-attr]


def streamed(resp: requests.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in resp.text.splitlines()]


def nothing_held(gate: Gate, fakes: Fakes) -> bool:
    """No job running or waiting at the gate, no slot taken on any backend (per model
    too), and no request of the gate's still open at any fake."""
    q = queue(gate)
    if q["running"] or q["waiting"]:
        return False
    for row in rows(gate).values():
        if row["running"] or any(model["running"] for model in row["models"].values()):
            return False
    return all(
        not any(server.stats()["in_flight"].values()) for server in fakes.values() if server.running
    )


def grants(redis_url: str) -> dict[str, dict[str, int]]:
    """The (backend, model) grants Redis holds for every gate (shared mode)."""
    with redis.Redis.from_url(redis_url) as client:
        return FleetGrants(client, lease=30.0, prefix=KEY_PREFIX).usage(["a", "b"])


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_a_job_placed_again_goes_before_the_jobs_that_queued_after_it(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path, storage: str, request: Any
) -> None:
    env = {}
    if storage == "redis":  # the backends' slots shared through Redis: each job takes a grant
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flush()
        env["GATE_STORAGE_URI"] = server.url()
    two = pick(fakes, "a", "b")
    gate = start(gate_factory, tmp_path, two, env, loaded=True)
    two["a"].configure(stall=60)  # a takes job 1 and sends nothing back until it dies
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(send, gate, "job 1")
        wait_for(lambda: jobs(two["a"]) == ["job 1"])
        held = send(gate, "job 2", headers=HELD, stream=True)  # b's one slot, until closed
        assert held.status_code == 200 and held.headers["X-Gate-Backend"] == "b"
        records = held.iter_lines()  # kept: a generator dropped unfinished closes the stream
        next(records)
        later: list[Future[requests.Response]] = []
        for number in (3, 4):
            later.append(pool.submit(send, gate, f"job {number}"))
            wait_for(lambda n=number: queue(gate)["waiting"] == n - 2)  # type: ignore[misc]
        # a dies with job 1 unanswered: job 1 waits again, in its place ahead of jobs 3
        # and 4 (job 3 may have tried a too, before the gate saw a down).
        two["a"].kill()
        wait_for(lambda: (queue(gate)["waiting"], queue(gate)["running"]) == (3, 1))
        assert jobs(two["b"]) == ["job 2"]
        held.close()  # b's slot frees: job 1 takes it, then 3, then 4
        answers = [first.result(), *(future.result() for future in later)]
    for resp in answers:
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Gate-Backend"] == "b"
        lines = streamed(resp)
        assert lines[-1]["done"] is True and not [line for line in lines if "error" in line]
    assert jobs(two["b"]) == ["job 2", "job 1", "job 3", "job 4"]
    assert queue(gate)["admitted"] == 4  # jobs 1-4, each once
    wait_for(lambda: nothing_held(gate, two))
    if storage == "redis":  # the grants taken on a were given back, b's too
        assert grants(env["GATE_STORAGE_URI"]) == {"a": {}, "b": {}}


def test_jobs_placed_again_go_first_in_the_order_they_had_started_whoever_sent_them(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    # Two clients, told apart by the address a trusted proxy forwards. Clients take turns,
    # but a job placed again has had its turn: it goes back ahead of every job waiting,
    # whoever sent them, and of jobs placed again after it.
    two = pick(fakes, "a", "b")
    gate = start(gate_factory, tmp_path, two, {"GATE_TRUSTED_PROXIES": "1"}, loaded=True)
    x, y = ({"X-Forwarded-For": address} for address in ("192.0.2.1", "192.0.2.2"))
    two["a"].configure(stall=60)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(send, gate, "job 1", headers=x)
        wait_for(lambda: jobs(two["a"]) == ["job 1"])
        held = send(gate, "job 2", headers={**y, **HELD}, stream=True)
        assert held.status_code == 200 and held.headers["X-Gate-Backend"] == "b"
        records = held.iter_lines()  # kept: a generator dropped unfinished closes the stream
        next(records)
        later: list[Future[requests.Response]] = []
        for number in (3, 4):
            later.append(pool.submit(send, gate, f"job {number}", headers=y))
            wait_for(lambda n=number: queue(gate)["waiting"] == n - 2)  # type: ignore[misc]
        # a dies: job 1 waits again; job 3 takes a's freed slot (a is not known to be down
        # yet), finds a refusing connections, and waits again too, after job 1.
        two["a"].kill()
        wait_for(lambda: (queue(gate)["waiting"], queue(gate)["running"]) == (3, 1))
        held.close()
        answers = [first.result(), *(future.result() for future in later)]
    for resp in answers:
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-Gate-Backend"] == "b"
    assert jobs(two["b"]) == ["job 2", "job 1", "job 3", "job 4"]
    wait_for(lambda: nothing_held(gate, two))


def test_a_client_that_leaves_while_its_job_waits_to_be_placed_again_frees_its_place(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    two = pick(fakes, "a", "b")
    gate = start(gate_factory, tmp_path, two, loaded=True)
    two["a"].configure(stall=60)
    body = json.dumps({"model": "phi3", "prompt": "job 1"}).encode()
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{gate.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gate.port), timeout=30) as first:
        first.sendall(head.encode() + body)
        wait_for(lambda: jobs(two["a"]) == ["job 1"])
        held = send(gate, "job 2", headers=HELD, stream=True)
        assert held.headers["X-Gate-Backend"] == "b"
        records = held.iter_lines()  # kept: a generator dropped unfinished closes the stream
        next(records)
        with ThreadPoolExecutor(1) as pool:
            third = pool.submit(send, gate, "job 3")
            wait_for(lambda: queue(gate)["waiting"] == 1)
            two["a"].kill()  # job 1 waits again for b, ahead of job 3
            wait_for(lambda: (queue(gate)["waiting"], queue(gate)["running"]) == (2, 1))
            first.close()  # its client leaves: job 1 leaves the queue, its place with it
            wait_for(lambda: queue(gate)["waiting"] == 1)
            held.close()
            resp = third.result()
    assert resp.status_code == 200 and resp.headers["X-Gate-Backend"] == "b"
    assert jobs(two["b"]) == ["job 2", "job 3"]
    assert queue(gate)["rejected"]["cancelled"] == 1
    wait_for(lambda: nothing_held(gate, two))
    assert "Traceback" not in gate.logs()


def test_a_job_is_placed_again_once_only_and_leaves_no_slot_behind(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    gate = start(gate_factory, tmp_path, fakes, loaded=True)
    for name in ("a", "b"):  # each drops a model request's connection before answering
        fakes[name].configure(die_after=0)
    resp = send(gate, "job 1", body={"stream": False})
    # Tried on a, placed again on b (c would do as well: b comes first), then no more:
    # the client gets the contract's 502, naming the upstream that failed last.
    assert resp.status_code == 502, resp.text
    assert fakes["b"].url in resp.json()["error"]
    assert "X-Gate-Backend" not in resp.headers
    assert (jobs(fakes["a"]), jobs(fakes["b"]), jobs(fakes["c"])) == (["job 1"], ["job 1"], [])
    q = queue(gate)
    assert q["admitted"] == 1 and q["rejected"] == dict.fromkeys(q["rejected"], 0)
    # Neither the job's slot nor those it took on a and b are held any more.
    wait_for(lambda: nothing_held(gate, fakes))
    assert {name: row["health"] for name, row in rows(gate).items()} == dict.fromkeys("abc", "up")
    # a and b answer again: each has its one slot back (two jobs held at once run there,
    # with c's slot taken first; a slot still taken would leave one of them waiting).
    for name in ("a", "b"):
        fakes[name].configure(die_after=None)
    held = [send(gate, f"job {n}", headers=HELD, stream=True) for n in (2, 3, 4)]
    try:
        assert sorted(resp.headers["X-Gate-Backend"] for resp in held) == ["a", "b", "c"]
    finally:
        for resp in held:
            resp.close()
    wait_for(lambda: nothing_held(gate, fakes))


def test_a_stream_that_broke_after_its_first_byte_is_not_placed_again(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    two = pick(fakes, "a", "b")
    gate = start(gate_factory, tmp_path, two, loaded=True)
    two["a"].configure(die_after=1)  # one record, then the connection drops
    resp = send(gate, "job 1")
    assert resp.status_code == 200 and resp.headers["X-Gate-Backend"] == "a"
    lines = streamed(resp)
    assert len(lines) == 2 and lines[0]["done"] is False
    assert set(lines[1]) == {"error"}  # the contract's error line ends it
    assert (jobs(two["a"]), jobs(two["b"])) == (["job 1"], [])
    assert queue(gate)["admitted"] == 1
    wait_for(lambda: nothing_held(gate, two))


def test_an_error_answer_is_the_backends_answer_not_placed_again(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    two = pick(fakes, "a", "b")
    gate = start(gate_factory, tmp_path, two, loaded=True)
    two["a"].configure(fail_status=500)  # a answers, with an error
    resp = send(gate, "job 1", body={"stream": False})
    assert resp.status_code == 500 and resp.headers["X-Gate-Backend"] == "a"
    assert resp.json() == {"error": "fake failure"}  # passed through unchanged
    assert (jobs(two["a"]), jobs(two["b"])) == (["job 1"], [])
    wait_for(lambda: nothing_held(gate, two))


def remaining(gate: Gate) -> int:
    """The client's token budget left, as the gate tells it (a request for a model no
    backend has: refused before it is queued, it spends nothing)."""
    resp = requests.post(gate.url + "/api/generate", json={"model": "nowhere"}, timeout=30)
    assert resp.status_code == 404
    return int(resp.headers["X-RateLimit-Remaining"])


def within_one_budget_window(needed: float = 30.0) -> None:
    """Begin when at least ``needed`` seconds of the budget's minute are left.

    A budget counts in a sliding window over minutes that begin on the minute of the
    clock (limits' sliding window counter): once the minute turns, what was spent
    before counts for less and less, and what is left grows by itself. A test that
    reads exact amounts left must stay within one minute.
    """
    left = WINDOW - time.time() % WINDOW
    if left < needed:
        time.sleep(left + 0.1)  # the clock's next minute, not an event of the gate's


def tokens(resp: requests.Response) -> int:
    """What an answer costs against a token budget: its prompt and completion tokens."""
    last = streamed(resp)[-1]
    return int(last["prompt_eval_count"]) + int(last["eval_count"])


def test_a_try_that_failed_costs_no_token_budget(
    fakes: Fakes, gate_factory: Callable[..., Gate], tmp_path: Path
) -> None:
    two = pick(fakes, "a", "b")
    gate = start(
        gate_factory, tmp_path, two, {"GATE_ANON_TOKENS_PER_MINUTE": "100000"}, loaded=True
    )
    within_one_budget_window()
    assert remaining(gate) == 100000
    two["a"].configure(die_after=0)  # a generates, then drops the connection unanswered
    first = send(gate, "job 1", body={"stream": False})
    assert first.status_code == 200 and first.headers["X-Gate-Backend"] == "b"
    assert jobs(two["a"]) == ["job 1"]  # a did the work once: no answer, no cost
    spent = tokens(first)
    assert spent > 0
    wait_for(lambda: remaining(gate) == 100000 - spent)
    # Both fail: the client gets the 502, at no cost either.
    two["b"].configure(die_after=0)
    assert send(gate, "job 2", body={"stream": False}).status_code == 502
    two["b"].configure(die_after=None)
    # Whatever either job's tries could have charged was charged before this job ends.
    third = send(gate, "job 3", body={"stream": False})
    assert third.status_code == 200 and third.headers["X-Gate-Backend"] == "b"
    wait_for(lambda: remaining(gate) == 100000 - spent - tokens(third))
    wait_for(lambda: nothing_held(gate, two))
