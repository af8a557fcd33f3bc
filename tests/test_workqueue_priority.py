"""Priority classes under real gunicorn, with ollama-python and the OpenAI SDK.

One model, one slot. A "hog" stream holds the slot (a raw socket the test closes to free
it) while the test queues jobs and waits, on /gate/status.json, until the queue holds
them; then the order in which the fake Ollama saw them is the order the gate chose.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
import requests

from fakeollama import FakeOllama
from limiter.mint import new_secret, stanza
from tests.support import Gate, client_requests
from tests.test_workqueue_gate import open_stream

SECRETS = {name: new_secret() for name in ("nightly", "alice", "bob")}
QUICK = {"X-Fake-Tokens": "2", "X-Fake-Token-Interval": "0.001"}
# A stream that runs until the test closes its socket.
HOG = {"X-Fake-Tokens": "100000", "X-Fake-Token-Interval": "0.05"}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        stanza("nightly", SECRETS["nightly"])
        + 'priority = "batch"\n'
        + stanza("alice", SECRETS["alice"])
        + 'priority = "interactive"\n'
        + stanza("bob", SECRETS["bob"])  # normal, the default
    )
    return path


@pytest.fixture
def start(
    fake: FakeOllama, gate_factory: Callable[..., Gate], keys_file: Path
) -> Callable[..., Gate]:
    def start(**env: str) -> Gate:
        return gate_factory(
            fake.url,
            {
                "GATE_API_KEYS_FILE": str(keys_file),
                "GATE_LIMIT_INFERENCE": "off",
                "GATE_QUEUE_MAX_PER_CLIENT": "150",
                **env,
            },
        )

    return start


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(120) as executor:
        yield executor


@pytest.fixture
def hog(pool: ThreadPoolExecutor, fake: FakeOllama) -> Iterator[Callable[[Gate], socket.socket]]:
    """Open a stream that holds the model's one slot until the test closes its socket (or
    the test ends, before the pool's threads are waited for)."""
    socks: list[socket.socket] = []

    def open_hog(gate: Gate, headers: dict[str, str] | None = None) -> socket.socket:
        who = bearer("nightly") if headers is None else headers
        sock = open_stream(gate, "llama3.2", "hog", {**HOG, **who})
        socks.append(sock)
        fake.wait_for(lambda s: any(s["in_flight"].values()))
        return sock

    yield open_hog
    for sock in socks:
        sock.close()


def classes(gate: Gate) -> dict[str, dict[str, int]]:
    doc = requests.get(gate.url + "/gate/status.json", timeout=5).json()
    return doc["queue"]["priorities"]  # type: ignore[no-any-return]


def wait_for(gate: Gate, test: Callable[[dict[str, dict[str, int]]], bool]) -> None:
    """Poll the status page until the queue's classes pass ``test``."""
    deadline = time.monotonic() + 30
    while not test(found := classes(gate)):
        assert time.monotonic() < deadline, found
        time.sleep(0.02)


def generate(gate: Gate, who: str, prompt: str, **headers: str) -> int:
    r = requests.post(
        gate.url + "/api/generate",
        json={"model": "llama3.2", "prompt": prompt, "stream": False},
        headers={**bearer(who), **QUICK, **headers},
        timeout=60,
    )
    return r.status_code


def seen(fake: FakeOllama) -> list[str]:
    """What reached the fake, in order: each generate's prompt, each chat's message."""
    order = []
    for record in fake.stats()["requests"]:
        body = record.get("json") or {}
        if "prompt" in body:
            order.append(body["prompt"])
        elif body.get("messages"):
            order.append(body["messages"][-1]["content"])
    return order


def ollama_chat(gate: Gate, who: str, text: str, **headers: str) -> str:
    with ollama.Client(host=gate.url, headers={**bearer(who), **QUICK, **headers}) as client:
        answer = client.chat(model="llama3.2", messages=[{"role": "user", "content": text}])
    return answer.message.content or ""


def openai_chat(gate: Gate, who: str, text: str, **headers: str) -> str:
    with openai.OpenAI(
        base_url=gate.url + "/v1", api_key=SECRETS[who], max_retries=0, timeout=60
    ) as client:
        answer = client.chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": text}],
            extra_headers={**QUICK, **headers},
        )
    return answer.choices[0].message.content or ""


@pytest.mark.parametrize("chat", [ollama_chat, openai_chat], ids=["ollama", "openai"])
def test_an_interactive_chat_is_served_next_behind_a_hundred_batch_jobs(
    fake: FakeOllama,
    start: Callable[..., Gate],
    pool: ThreadPoolExecutor,
    hog: Callable[..., socket.socket],
    chat: Callable[..., str],
) -> None:
    gate = start()
    sock = hog(gate)
    batch = [pool.submit(generate, gate, "nightly", f"batch-{i}") for i in range(100)]
    wait_for(gate, lambda c: c["batch"]["waiting"] == 100)
    answer = pool.submit(chat, gate, "alice", "chat")
    wait_for(gate, lambda c: c["interactive"]["waiting"] == 1)
    assert classes(gate) == {
        "interactive": {"waiting": 1, "running": 0},
        "normal": {"waiting": 0, "running": 0},
        "batch": {"waiting": 100, "running": 1},
    }
    metrics = requests.get(gate.url + "/metrics", timeout=5).text
    assert 'gate_priority_jobs_waiting{priority="batch"} 100.0' in metrics
    assert 'gate_priority_jobs_waiting{priority="interactive"} 1.0' in metrics
    assert 'gate_priority_jobs_running{priority="batch"} 1.0' in metrics
    sock.close()  # the slot frees: the chat goes first
    assert answer.result(timeout=60)
    assert [f.result(timeout=120) for f in batch] == [200] * 100
    metrics = requests.get(gate.url + "/metrics", timeout=5).text
    assert 'gate_queue_wait_by_priority_seconds_count{priority="interactive"} 1.0' in metrics
    # the hundred batch jobs and the hog
    assert 'gate_queue_wait_by_priority_seconds_count{priority="batch"} 101.0' in metrics
    order = seen(fake)
    assert order[:2] == ["hog", "chat"], order[:5]
    assert sorted(order[2:]) == sorted(f"batch-{i}" for i in range(100))
    gate.assert_idle()


def test_a_batch_job_is_served_within_the_aging_bound_under_a_steady_interactive_stream(
    fake: FakeOllama,
    start: Callable[..., Gate],
    pool: ThreadPoolExecutor,
    hog: Callable[..., socket.socket],
) -> None:
    gate = start(GATE_PRIORITY_AGING="0.5")
    sock = hog(gate)
    waiting = pool.submit(generate, gate, "nightly", "batch")
    wait_for(gate, lambda c: c["batch"]["waiting"] == 1)
    # Thirty interactive chats of a tenth of a second each: three seconds of work, all
    # queued ahead of the batch job's class.
    slow = {"X-Fake-Tokens": "5", "X-Fake-Token-Interval": "0.02"}
    chats = [pool.submit(ollama_chat, gate, "alice", f"chat-{i}", **slow) for i in range(30)]
    wait_for(gate, lambda c: c["interactive"]["waiting"] == 30)
    sock.close()
    assert waiting.result(timeout=60) == 200
    assert all(f.result(timeout=60) for f in chats)
    order = seen(fake)
    # Without aging it would run last; aged after half a second, it takes the next slot
    # that frees while most of the interactive stream still waits.
    after = order[order.index("batch") + 1 :]
    assert len(after) >= 20, order
    gate.assert_idle()


def test_the_header_lowers_a_class_but_never_raises_it(
    fake: FakeOllama,
    start: Callable[..., Gate],
    pool: ThreadPoolExecutor,
    hog: Callable[..., socket.socket],
) -> None:
    gate = start()
    sock = hog(gate)
    jobs: list[Future[Any]] = []

    def queue(call: Callable[..., Any], *args: Any, cls: str, count: int, **headers: str) -> None:
        jobs.append(pool.submit(call, gate, *args, **headers))
        wait_for(gate, lambda c: c[cls]["waiting"] == count)

    ask = "X-Gate-Priority"
    queue(generate, "nightly", "nightly-batch", cls="batch", count=1)
    queue(openai_chat, "alice", "alice-lowered", cls="batch", count=2, **{ask: "batch"})
    queue(openai_chat, "bob", "bob-raised", cls="normal", count=1, **{ask: "interactive"})
    queue(ollama_chat, "alice", "alice-plain", cls="interactive", count=1)
    queue(ollama_chat, "alice", "alice-normal", cls="normal", count=2, **{ask.lower(): "NORMAL"})
    sock.close()
    assert all(f.result(timeout=60) for f in jobs)
    assert seen(fake)[1:] == [
        "alice-plain",  # interactive: alice's ceiling
        "bob-raised",  # normal: bob asked above his ceiling, served at it
        "alice-normal",  # lowered to normal; clients take turns within a class
        "nightly-batch",
        "alice-lowered",
    ]
    # The header is the gate's: Ollama never sees it.
    for record in fake.stats()["requests"]:
        assert "x-gate-priority" not in record["headers"]
    gate.assert_idle()


def test_an_unknown_class_is_refused_in_the_endpoints_shape(
    fake: FakeOllama, start: Callable[..., Gate]
) -> None:
    gate = start()
    r = requests.post(
        gate.url + "/api/generate",
        json={"model": "llama3.2", "prompt": "x"},
        headers={**bearer("bob"), "X-Gate-Priority": "urgent"},
        timeout=10,
    )
    assert r.status_code == 400
    assert r.json() == {
        "error": "X-Gate-Priority: priority must be one of interactive, normal, batch, not 'urgent'"
    }
    with (
        openai.OpenAI(base_url=gate.url + "/v1", api_key=SECRETS["bob"], max_retries=0) as client,
        pytest.raises(openai.BadRequestError) as info,
    ):
        client.chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Gate-Priority": "urgent"},
        )
    assert info.value.code == "invalid_request"
    assert client_requests(fake) == []  # nothing forwarded (the status probe aside)


def test_anonymous_clients_take_the_configured_class(
    fake: FakeOllama,
    gate_factory: Callable[..., Gate],
    pool: ThreadPoolExecutor,
    hog: Callable[..., socket.socket],
) -> None:
    gate = gate_factory(fake.url, {"GATE_ANON_PRIORITY": "batch", "GATE_LIMIT_INFERENCE": "off"})
    sock = hog(gate, {})
    lowered = pool.submit(
        requests.post,
        gate.url + "/api/generate",
        json={"model": "llama3.2", "prompt": "x", "stream": False},
        headers={**QUICK, "X-Gate-Priority": "interactive"},  # above the ceiling: ignored
        timeout=60,
    )
    wait_for(gate, lambda c: c["batch"] == {"waiting": 1, "running": 1})
    sock.close()
    assert lowered.result(timeout=60).status_code == 200
    gate.assert_idle()
