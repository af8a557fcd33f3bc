"""The work queue under real gunicorn: caps, bounds, fairness and release on every path.

The fake Ollama records what reached it (in-flight jobs per model, distinct models
at once) and, with ``on_overflow="crash"``, fails like a killed runner when more
models are in flight than its VRAM holds.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from errors import BUSY_TEXT
from fakeollama import FakeOllama
from tests.support import Gate

SLOW = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "10"}  # about one second


def generate(
    gate: Gate,
    model: str,
    *,
    prompt: str = "hi",
    headers: dict[str, str] | None = None,
    source: str = "127.0.0.1",
    timeout: float = 60,
) -> tuple[int, dict[str, str], bytes]:
    """One streamed /api/generate from a given source address; the whole answer."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", gate.port, timeout=timeout, source_address=(source, 0)
    )
    try:
        body = json.dumps({"model": model, "prompt": prompt})
        conn.request(
            "POST", "/api/generate", body, {"Content-Type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def open_stream(gate: Gate, model: str, prompt: str, headers: dict[str, str]) -> socket.socket:
    """Send a streamed generate on a raw socket and return it unread."""
    payload = json.dumps({"model": model, "prompt": prompt}).encode()
    head = [
        "POST /api/generate HTTP/1.1",
        f"Host: 127.0.0.1:{gate.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=10)
    sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    return sock


def wait_until(what: str, check: Callable[[], bool], timeout: float = 10) -> None:
    """Poll ``check`` until it holds (the state a test waits for); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def queue_of(gate: Gate) -> dict[str, Any]:
    """The gate's work queue as its /gate/status.json shows it."""
    with requests.get(gate.url + "/gate/status.json?history=0", timeout=5) as resp:
        queue: dict[str, Any] = resp.json()["queue"]
    return queue


def wait_for_queue(gate: Gate, *, waiting: int, running: int | None = None) -> dict[str, Any]:
    """Wait until the gate's queue holds ``waiting`` jobs (and ``running``); return it."""
    seen: dict[str, Any] = {}

    def reached() -> bool:
        seen.update(queue_of(gate))
        return seen["waiting"] == waiting and running in (None, seen["running"])

    wait_until(f"{waiting} waiting, {running} running", reached)
    return seen


def prompts_seen(fake: FakeOllama, model: str) -> list[str]:
    return [
        r["json"]["prompt"]
        for r in fake.stats()["requests"]
        if r["path"] == "/api/generate" and r["model"] == model
    ]


def wait_idle(gate: Gate, fake: FakeOllama, model: str, timeout: float = 10) -> None:
    """No slot is leaked: a fresh request for ``model`` runs at once."""
    fake.wait_for(lambda s: not any(s["in_flight"].values()), timeout=timeout)
    status, headers, _ = generate(gate, model, headers={"X-Fake-Tokens": "1"})
    assert status == 200
    assert float(headers["x-gate-queue-wait"]) < 0.5


def test_flood_over_four_models_with_vram_for_two_never_crashes(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    fake.configure(vram=2, on_overflow="crash", load_time=0.1, token_interval=0.01, tokens=4)
    gate = gate_factory(
        fake.url,
        {
            "GATE_MAX_ACTIVE_MODELS": "2",
            "GATE_MODEL_CONCURRENCY": "2",
            "GATE_QUEUE_MAX_PER_CLIENT": "100",
            "GATE_SWITCH_AFTER": "1",
        },
    )
    models = ["m1", "m2", "m3", "m4"]
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda i: generate(gate, models[i % 4], prompt=f"p{i}"), range(40)))
    statuses = [status for status, _, _ in results]
    assert statuses == [200] * 40, [body[:200] for _, _, body in results]
    assert all(b'"done": true' in body or b'"done":true' in body for _, _, body in results)
    stats = fake.stats()
    assert stats["crashes"] == 0
    assert stats["completed"] >= 40
    assert stats["max_models_in_flight"] <= 2
    assert max(stats["max_in_flight"].values()) <= 2
    # Direct, the same flood crashes the fake: the test can fail.
    fake.reset()
    with ThreadPoolExecutor(40) as pool:
        direct = list(
            pool.map(
                lambda i: requests.post(
                    fake.url + "/api/generate",
                    json={"model": models[i % 4], "prompt": "x"},
                    timeout=30,
                ),
                range(40),
            )
        )
    assert any(r.status_code == 500 for r in direct)
    assert fake.stats()["crashes"] > 0


def test_queue_full_answers_ollamas_busy_text(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_QUEUE_MAX": "2", "GATE_QUEUE_MAX_PER_CLIENT": "10"})
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(generate, gate, "m1", prompt=f"p{i}", headers=SLOW) for i in range(3)]
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        wait_for_queue(gate, waiting=2)  # the two others
        resp = requests.post(gate.url + "/api/generate", json={"model": "m1", "prompt": "x"})
        assert resp.status_code == 503
        assert resp.json() == {"error": BUSY_TEXT}
        assert int(resp.headers["Retry-After"]) >= 1
        v1 = requests.post(
            gate.url + "/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "x"}]},
        )
        assert v1.status_code == 503
        assert v1.json()["error"]["message"] == BUSY_TEXT
        assert [f.result()[0] for f in busy] == [200, 200, 200]
    wait_idle(gate, fake, "m1")


def test_client_share_full_is_429(fake: FakeOllama, gate_factory: Callable[..., Gate]) -> None:
    gate = gate_factory(fake.url, {"GATE_QUEUE_MAX_PER_CLIENT": "1"})
    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(generate, gate, "m1", prompt=f"p{i}", headers=SLOW) for i in range(2)]
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        wait_for_queue(gate, waiting=1)
        resp = requests.post(gate.url + "/api/generate", json={"model": "m1", "prompt": "x"})
        assert resp.status_code == 429
        assert "error" in resp.json()
        assert int(resp.headers["Retry-After"]) >= 1
        # Another client is not held to this client's share.
        status, _, _ = generate(gate, "m1", source="127.0.0.2", headers={"X-Fake-Tokens": "1"})
        assert status == 200
        assert [f.result()[0] for f in busy] == [200, 200]
    wait_idle(gate, fake, "m1")


def test_waiting_too_long_is_503(fake: FakeOllama, gate_factory: Callable[..., Gate]) -> None:
    gate = gate_factory(fake.url, {"GATE_QUEUE_TIMEOUT": "0.5"})
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, gate, "m1", prompt="first", headers=SLOW)
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        started = time.monotonic()
        resp = requests.post(gate.url + "/api/generate", json={"model": "m1", "prompt": "late"})
        waited = time.monotonic() - started
        assert resp.status_code == 503
        assert "error" in resp.json() and resp.json()["error"] != BUSY_TEXT
        assert int(resp.headers["Retry-After"]) >= 1
        assert 0.4 < waited < 5
        assert running.result()[0] == 200
    assert "late" not in prompts_seen(fake, "m1:latest")
    wait_idle(gate, fake, "m1")


def test_lone_client_is_served_behind_anothers_flood(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_QUEUE_MAX_PER_CLIENT": "50"})
    job = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "4"}  # 0.4 s a job
    first = {"X-Fake-Token-Interval": "0.1", "X-Fake-Tokens": "30"}  # 3 s: the rest queue
    with ThreadPoolExecutor(9) as pool:
        # The flood's first job runs, the rest wait behind it (while it runs: on a busy
        # machine seven 0.4 s jobs could take longer to arrive than one takes to run).
        flood = [pool.submit(generate, gate, "m1", prompt="flood0", headers=first)]
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1, timeout=10)
        flood += [
            pool.submit(generate, gate, "m1", prompt=f"flood{i}", headers=job) for i in range(1, 8)
        ]
        wait_for_queue(gate, waiting=7, running=1)
        lone = pool.submit(generate, gate, "m1", prompt="lone", headers=job, source="127.0.0.2")
        assert lone.result()[0] == 200
        assert all(f.result()[0] == 200 for f in flood)
    order = prompts_seen(fake, "m1:latest")
    # One slot: the flood's running job, at most one more of its turn, then the lone client.
    assert order.index("lone") <= 2, order


def test_disconnect_while_waiting_never_reaches_upstream(fake: FakeOllama, gate: Gate) -> None:
    cancelled = queue_of(gate)["rejected"]["cancelled"]  # the session's gate: earlier tests'
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, gate, "m1", prompt="first", headers=SLOW)
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        sock = open_stream(gate, "m1", "gone", {})
        wait_for_queue(gate, waiting=1)  # it waits for the slot
        sock.close()
        # The gate saw it leave while the first job still ran: it left the queue.
        queue = wait_for_queue(gate, waiting=0, running=1)
        assert queue["rejected"]["cancelled"] == cancelled + 1
        assert running.result()[0] == 200
    wait_for_queue(gate, waiting=0, running=0)
    assert "gone" not in prompts_seen(fake, "m1:latest")
    wait_idle(gate, fake, "m1")


def test_disconnect_mid_stream_frees_the_slot_at_once(fake: FakeOllama, gate: Gate) -> None:
    slow = {"X-Fake-Token-Interval": "0.5", "X-Fake-Tokens": "40"}  # 20 s if left alone
    sock = open_stream(gate, "m1", "leaver", slow)
    sock.settimeout(10)
    received = b""
    while b'"response"' not in received:  # headers, then the first token
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(generate, gate, "m1", prompt="next", headers={"X-Fake-Tokens": "1"})
        wait_for_queue(gate, waiting=1)
        sock.close()
        status, headers, _ = waiting.result(timeout=10)
    assert status == 200
    assert float(headers["x-gate-queue-wait"]) < 2.0
    # The gate closed the upstream connection (the fake notices within its poll interval).
    fake.wait_for(lambda s: s["disconnects"] >= 1, timeout=1)
    wait_idle(gate, fake, "m1")


def test_a_waiting_model_gets_its_turn_after_switch_after(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_SWITCH_AFTER": "0.5", "GATE_QUEUE_MAX_PER_CLIENT": "50"})
    fast = {"X-Fake-Token-Interval": "0.05", "X-Fake-Tokens": "4"}  # about 0.2 s a job
    stop = threading.Event()
    answers: list[int] = []

    def keep_m1_busy(i: int) -> None:
        while not stop.is_set():
            answers.append(generate(gate, "m1", prompt=f"busy{i}", headers=fast)[0])

    with ThreadPoolExecutor(4) as pool:
        for i in range(3):
            pool.submit(keep_m1_busy, i)
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1)
        wait_for_queue(gate, waiting=2)  # m1's own jobs wait: no slot is free for m2
        started = time.monotonic()
        status, headers, _ = generate(gate, "m2", prompt="other", headers=fast, source="127.0.0.2")
        waited = time.monotonic() - started
        stop.set()
    assert status == 200
    # switch_after (0.5 s) plus the running job's drain (0.2 s), with room for a busy machine
    assert waited < 3.0, waited
    assert set(answers) == {200}
    assert fake.stats()["max_models_in_flight"] == 1


@pytest.mark.parametrize("path", ["/api/pull", "/api/create"])
def test_admin_jobs_take_the_admin_lane(
    path: str, fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    gate = gate_factory(fake.url, {"GATE_ADMIN_CONCURRENCY": "1"})
    body: dict[str, Any] = {"model": "newmodel", "stream": False}
    if path == "/api/create":
        body["from"] = "llama3.2"
    slow = {"X-Fake-Stall": "0.6"}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(requests.post, gate.url + path, json=body, headers=slow)
        wait_until("the first holds the admin slot", lambda: queue_of(gate)["admin"]["running"])
        second = pool.submit(requests.post, gate.url + path, json=body, headers=slow)
        wait_until("the second waits for it", lambda: queue_of(gate)["admin"]["waiting"] == 1)
        r1, r2 = first.result(), second.result()
    assert (r1.status_code, r2.status_code) == (200, 200)
    assert float(r2.headers["X-Gate-Queue-Wait"]) > 0
    # An inference job does not wait behind the admin lane.
    status, headers, _ = generate(gate, "m1", headers={"X-Fake-Tokens": "1"})
    assert status == 200 and float(headers["x-gate-queue-wait"]) < 0.5
