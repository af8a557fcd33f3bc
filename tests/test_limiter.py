"""Rate limits per endpoint class and client address: real gunicorn, fake Ollama, the SDKs.

Every gate here starts with its own limits, so counts begin at zero; the start-up
probe (GET /api/version) is one light request from 127.0.0.1.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import ollama
import openai
import pytest
import requests

from endpoints import CLASSES
from fakeollama import FakeOllama
from settings import Settings
from tests.limiter_support import GatesFactory, quick_gates, rate_limit_items, session_from
from tests.support import client_requests

GEN = {"model": "llama3.2", "prompt": "hello there", "stream": False}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
BLOB = "/api/blobs/sha256:" + "0" * 64


@pytest.fixture
def gates(gate_factory: GatesFactory) -> Iterator[GatesFactory]:
    yield from quick_gates(gate_factory)


def paths_seen(fake: FakeOllama) -> list[str]:
    return [r["path"] for r in client_requests(fake)]


def test_each_class_has_its_own_limit(fake: FakeOllama, gates: GatesFactory) -> None:
    gate = gates(
        fake.url,
        {
            "GATE_LIMIT_INFERENCE": "2/minute",
            "GATE_LIMIT_EMBED": "1/minute",
            "GATE_LIMIT_ADMIN": "1/minute",
            "GATE_LIMIT_LIGHT": "3/minute",
        },
    )
    post = requests.post
    # Inference: native and OpenAI-compatible endpoints draw on one bucket.
    assert post(gate.url + "/api/generate", json=GEN).status_code == 200
    assert post(gate.url + "/v1/chat/completions", json=CHAT).status_code == 200
    assert post(gate.url + "/api/chat", json={**CHAT, "stream": False}).status_code == 429
    # The other classes are untouched by that.
    embed = {"model": "nomic-embed-text", "input": "x"}
    assert post(gate.url + "/api/embed", json=embed).status_code == 200
    assert post(gate.url + "/v1/embeddings", json=embed).status_code == 429
    assert requests.head(gate.url + BLOB).status_code != 429
    assert post(gate.url + "/api/pull", json={"model": "llama3.2"}).status_code == 429
    # Light: the start-up probe took one of three.
    tags = requests.get(gate.url + "/api/tags")
    assert tags.status_code == 200 and tags.headers["X-RateLimit-Remaining"] == "1"
    assert requests.post(gate.url + "/api/show", json={"model": "llama3.2"}).status_code == 200
    assert requests.get(gate.url + "/api/tags").status_code == 429
    assert requests.get(gate.url + "/api/not-in-the-table").status_code == 429  # also light
    # Rejected requests never reached Ollama.
    seen = paths_seen(fake)
    assert "/api/chat" not in seen and "/v1/embeddings" not in seen and "/api/pull" not in seen
    assert seen.count("/api/tags") == 1 and "/api/not-in-the-table" not in seen


def test_sdks_see_the_429_and_its_message(fake: FakeOllama, gates: GatesFactory) -> None:
    gate = gates(fake.url, {"GATE_LIMIT_INFERENCE": "1/minute"})
    with ollama.Client(host=gate.url) as client:
        assert client.generate(model="llama3.2", prompt="hi").done
        with pytest.raises(ollama.ResponseError) as native:
            client.generate(model="llama3.2", prompt="hi")
        with pytest.raises(ollama.ResponseError) as streamed:
            list(client.chat(model="llama3.2", messages=CHAT["messages"], stream=True))
    assert native.value.status_code == 429
    assert "rate limit exceeded: 1 per 1 minute for inference requests" in native.value.error
    assert streamed.value.status_code == 429

    with (
        openai.OpenAI(base_url=gate.url + "/v1", api_key="unused", max_retries=0) as oai,
        pytest.raises(openai.RateLimitError) as compat,
    ):
        oai.chat.completions.create(model="llama3.2", messages=CHAT["messages"])
    assert compat.value.status_code == 429
    assert "rate limit exceeded" in compat.value.message
    assert compat.value.code == "rate_limit_exceeded"
    assert 1 <= int(compat.value.response.headers["retry-after"]) <= 60


def test_limit_headers_on_answers_and_rejections(fake: FakeOllama, gates: GatesFactory) -> None:
    gate = gates(fake.url, {"GATE_LIMIT_INFERENCE": "3/minute;10/second"})
    policy = '"inference-60s";q=3;w=60, "inference-1s";q=10;w=1'
    for left in (2, 1, 0):
        r = requests.post(gate.url + "/api/generate", json=GEN)
        assert r.status_code == 200
        assert r.headers["X-RateLimit-Limit"] == "3"
        assert r.headers["X-RateLimit-Remaining"] == str(left)
        assert time.time() < int(r.headers["X-RateLimit-Reset"]) <= time.time() + 61
        assert r.headers["RateLimit-Policy"] == policy
        state = rate_limit_items(r.headers["RateLimit"])
        assert state["inference-60s"]["r"] == str(left)
        assert 0 <= int(state["inference-60s"]["t"]) <= 60
        assert "Retry-After" not in r.headers
    # The first rejection comes from Flask-Limiter, the next ones from the 429 cache: same headers.
    for _ in range(2):
        r = requests.post(gate.url + "/v1/completions", json={"model": "llama3.2", "prompt": "x"})
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        retry = int(r.headers["Retry-After"])
        assert 1 <= retry <= 60
        assert re.search(rf"retry in {retry}s$", r.json()["error"]["message"])
        assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("3", "0")
        assert int(r.headers["X-RateLimit-Reset"]) == pytest.approx(time.time() + retry, abs=2)
        assert r.headers["RateLimit-Policy"] == policy
        assert rate_limit_items(r.headers["RateLimit"])["inference-60s"] == {
            "r": "0",
            "t": str(retry),
        }
    # Light is off: no limit headers at all.
    assert "X-RateLimit-Limit" not in requests.get(gate.url + "/api/tags").headers


def test_two_client_addresses_count_apart(fake: FakeOllama, gates: GatesFactory) -> None:
    gate = gates(fake.url, {"GATE_LIMIT_INFERENCE": "1/minute"})
    with session_from("127.0.0.1") as first, session_from("127.0.0.2") as second:
        assert first.post(gate.url + "/api/generate", json=GEN).status_code == 200
        assert first.post(gate.url + "/api/generate", json=GEN).status_code == 429
        assert second.post(gate.url + "/api/generate", json=GEN).status_code == 200
        assert second.post(gate.url + "/api/generate", json=GEN).status_code == 429
    assert paths_seen(fake).count("/api/generate") == 2


def test_a_spoofed_forwarded_for_changes_nothing_without_trusted_proxies(
    fake: FakeOllama, gates: GatesFactory
) -> None:
    gate = gates(fake.url, {"GATE_LIMIT_INFERENCE": "1/minute"})
    url = gate.url + "/api/generate"
    assert requests.post(url, json=GEN, headers={"X-Forwarded-For": "203.0.113.7"}).ok
    r = requests.post(url, json=GEN, headers={"X-Forwarded-For": "203.0.113.8"})
    assert r.status_code == 429  # both came from 127.0.0.1, whatever they claim
    with session_from("127.0.0.2") as other:
        assert other.post(url, json=GEN).ok


def test_forwarded_for_is_honoured_with_one_trusted_proxy(
    fake: FakeOllama, gates: GatesFactory
) -> None:
    gate = gates(fake.url, {"GATE_LIMIT_INFERENCE": "1/minute", "GATE_TRUSTED_PROXIES": "1"})
    url = gate.url + "/api/generate"

    def status(forwarded_for: str | None) -> int:
        headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        return requests.post(url, json=GEN, headers=headers).status_code

    assert status("203.0.113.7") == 200
    assert status("203.0.113.7") == 429
    assert status("203.0.113.8") == 200
    # Only the hop our proxy appended counts: a client's own entries before it do not.
    assert status("198.51.100.1, 203.0.113.8") == 429
    assert status(None) == 200  # the proxy's own address is one more client


def test_anonymous_token_budget(fake: FakeOllama, gates: GatesFactory) -> None:
    gate = gates(fake.url, {"GATE_ANON_TOKENS_PER_MINUTE": "15"})
    # "hello there" is 2 prompt tokens, the fake answers 8: 10 of 15, then 20 of 15.
    with ollama.Client(host=gate.url) as client:
        for _ in range(2):
            client.generate(model="llama3.2", prompt="hello there")
        with pytest.raises(ollama.ResponseError) as info:
            client.generate(model="llama3.2", prompt="hello there")
    assert info.value.status_code == 429
    assert "token budget spent: 15 tokens per minute" in info.value.error
    # Other classes are not held by a spent budget, and another client has its own.
    assert requests.get(gate.url + "/api/tags").ok
    with session_from("127.0.0.2") as other:
        assert other.post(gate.url + "/api/generate", json=GEN).ok


def default_limits() -> dict[str, str]:
    """The GATE_LIMIT_* variables at the gate's own defaults (the test gates turn them off)."""
    defaults = Settings()
    return {f"GATE_LIMIT_{cls.upper()}": getattr(defaults, f"limit_{cls}") for cls in CLASSES}


def test_a_burst_the_queue_can_hold_is_queued_not_refused(
    fake: FakeOllama, gates: GatesFactory
) -> None:
    # One client, 20 chats at once, default limits and queue share (32): the queue runs
    # them one by one (model concurrency 1); none may be refused. No retries: a 429 fails.
    gate = gates(fake.url, default_limits())
    burst = 20
    with (
        openai.OpenAI(base_url=gate.url + "/v1", api_key="unused", max_retries=0) as oai,
        ThreadPoolExecutor(burst) as pool,
    ):

        def chat(_: int) -> str | None:
            done = oai.chat.completions.create(model="llama3.2", messages=CHAT["messages"])  # type: ignore[arg-type]
            return done.choices[0].message.content

        answers = list(pool.map(chat, range(burst)))
    assert len(answers) == burst and all(answers)
    assert paths_seen(fake).count("/v1/chat/completions") == burst
    assert fake.stats()["max_in_flight"]["llama3.2:latest"] == 1  # queued: run one at a time


def test_quick_sequential_calls_pass_the_default_limits(
    fake: FakeOllama, gates: GatesFactory
) -> None:
    gate = gates(fake.url, default_limits())
    fake.configure(tokens=1, token_interval=0)
    with ollama.Client(host=gate.url) as client:
        for _ in range(6):
            assert client.generate(model="llama3.2", prompt="hi").done
        assert client.embed(model="nomic-embed-text", input="x").embeddings
