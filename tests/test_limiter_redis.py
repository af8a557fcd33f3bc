"""Limits in a real Redis: shared by two gate processes, and a Redis that stops answering."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from fakeollama import FakeOllama
from tests.limiter_support import GatesFactory, quick_gates
from tests.redis_support import RedisServer

GEN = {"model": "llama3.2", "prompt": "hello there", "stream": False}
# "Answers within a few seconds": the gate gives Redis 0.5 s per call.
PROMPT = 3.0


@pytest.fixture
def gates(gate_factory: GatesFactory) -> Iterator[GatesFactory]:
    yield from quick_gates(gate_factory)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url()


def test_two_gates_share_their_limits(
    fake: FakeOllama, gates: GatesFactory, redis_url: str, redis_server: RedisServer
) -> None:
    env = {"GATE_STORAGE_URI": redis_url, "GATE_LIMIT_INFERENCE": "3/minute"}
    one, two = gates(fake.url, env), gates(fake.url, env)
    answers = []
    for gate in (one, two, one, two, one):
        r = requests.post(gate.url + "/api/generate", json=GEN)
        answers.append((r.status_code, r.headers["X-RateLimit-Remaining"]))
    assert answers == [(200, "2"), (200, "1"), (200, "0"), (429, "0"), (429, "0")]
    assert [r["path"] for r in fake.stats()["requests"]].count("/api/generate") == 3
    with redis_server.client() as client:
        assert any(b"gate/ip:127.0.0.1/inference" in key for key in client.keys())


def test_a_paused_redis_costs_no_errors_and_no_hang(
    fake: FakeOllama, gates: GatesFactory, redis_url: str, redis_server: RedisServer
) -> None:
    gate = gates(
        fake.url,
        {
            "GATE_STORAGE_URI": redis_url,
            "GATE_LIMIT_INFERENCE": "100/minute",
            "GATE_LIMIT_LIGHT": "3/minute",
            "GATE_ANON_TOKENS_PER_MINUTE": "100000",
        },
    )
    with requests.Session() as client:

        def timed(method: str, path: str, **kwargs: object) -> int:
            started = time.monotonic()
            r = client.request(method, gate.url + path, timeout=10, **kwargs)  # type: ignore[arg-type]
            assert time.monotonic() - started < PROMPT, f"{path} took too long"
            return r.status_code

        assert timed("POST", "/api/generate", json=GEN) == 200
        with redis_server.paused():
            # Inference (request limit and token budget) still answers...
            assert [timed("POST", "/api/generate", json=GEN) for _ in range(3)] == [200] * 3
            # ...and limits still hold, counted in memory: the start-up probe was in Redis.
            assert [timed("GET", "/api/tags") for _ in range(4)] == [200, 200, 200, 429]
        assert timed("POST", "/api/generate", json=GEN) == 200
    logs = gate.logs()
    assert "falling back to in-memory storage" in logs
    assert "token budget storage unreachable" in logs
    assert "Traceback" not in logs
