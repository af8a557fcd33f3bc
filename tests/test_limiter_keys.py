"""API keys end to end: 401, 403, per-key limits, token budgets, minting, secrets kept."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
import requests

from fakeollama import FakeOllama
from limiter.mint import new_secret, stanza
from tests.limiter_support import GatesFactory, quick_gates, rate_limit_items
from tests.support import ROOT, Gate, client_requests

GEN = {"model": "llama3.2", "prompt": "hello there", "stream": False}
MESSAGES = [{"role": "user", "content": "hello there"}]
SECRETS = {name: new_secret() for name in ("alice", "root", "tight", "frugal")}


@pytest.fixture
def gates(gate_factory: GatesFactory) -> Iterator[GatesFactory]:
    yield from quick_gates(gate_factory)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        stanza("alice", SECRETS["alice"])
        + stanza("root", SECRETS["root"], "admin")
        + stanza("tight", SECRETS["tight"]).replace("\n", '\nlimit_inference = "1/minute"\n', 1)
        + stanza("frugal", SECRETS["frugal"], tokens_per_minute=15)
    )
    return path


@pytest.fixture
def gate(fake: FakeOllama, gates: GatesFactory, keys_file: Path) -> Gate:
    return gates(
        fake.url, {"GATE_API_KEYS_FILE": str(keys_file), "GATE_LIMIT_INFERENCE": "5/minute"}
    )


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def test_missing_or_unknown_key_is_401(fake: FakeOllama, gate: Gate) -> None:
    r = requests.post(gate.url + "/api/generate", json=GEN)
    assert r.status_code == 401
    assert r.json() == {"error": "missing API key: send Authorization: Bearer <key>"}
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="ollama-gate"'
    r = requests.get(gate.url + "/api/tags", headers={"Authorization": "Bearer og-guessed"})
    assert (r.status_code, r.json()) == (401, {"error": "invalid API key"})
    with (
        openai.OpenAI(base_url=gate.url + "/v1", api_key="og-guessed", max_retries=0) as oai,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        oai.models.list()
    assert info.value.status_code == 401 and "invalid API key" in info.value.message
    # The start-up probe is the only request that got through (it is answered 401 too).
    assert client_requests(fake) == []


def test_admin_endpoints_need_an_admin_key(fake: FakeOllama, gate: Gate) -> None:
    pull = {"model": "llama3.2", "stream": False}
    r = requests.post(gate.url + "/api/pull", json=pull, headers=bearer("alice"))
    assert r.status_code == 403
    assert r.json() == {"error": "API key 'alice' has role user; /api/pull needs role admin"}
    r = requests.post(gate.url + "/api/pull", json=pull, headers=bearer("root"))
    assert r.status_code == 200
    assert [q["path"] for q in client_requests(fake)] == ["/api/pull"]


def test_the_gates_secret_is_not_forwarded(fake: FakeOllama, gate: Gate) -> None:
    with ollama.Client(host=gate.url, headers=bearer("alice")) as client:
        client.generate(model="llama3.2", prompt="hi")
    r = requests.post(gate.url + "/v1/messages", headers={"x-api-key": SECRETS["alice"]}, json={
        "model": "llama3.2", "max_tokens": 8, "messages": MESSAGES})  # fmt: skip
    assert r.status_code == 200
    for seen in client_requests(fake):
        assert "authorization" not in seen["headers"]
        assert "x-api-key" not in seen["headers"]


def test_without_keys_authorization_reaches_ollama(fake: FakeOllama, gates: GatesFactory) -> None:
    gate = gates(fake.url)
    headers = {"Authorization": "Bearer for-ollama"}
    assert requests.post(gate.url + "/api/generate", json=GEN, headers=headers).ok
    (seen,) = [r for r in client_requests(fake) if r["path"] == "/api/generate"]
    assert seen["headers"]["authorization"] == "Bearer for-ollama"


def test_a_key_can_override_a_class_limit(gate: Gate) -> None:
    url = gate.url + "/api/generate"
    r = requests.post(url, json=GEN, headers=bearer("tight"))
    assert (r.status_code, r.headers["X-RateLimit-Limit"]) == (200, "1")
    assert requests.post(url, json=GEN, headers=bearer("tight")).status_code == 429
    for left in (4, 3):  # alice has the default of 5, in a bucket of her own
        r = requests.post(url, json=GEN, headers=bearer("alice"))
        assert (r.status_code, r.headers["X-RateLimit-Remaining"]) == (200, str(left))


def _assert_budget_429(
    status: int, headers: requests.structures.CaseInsensitiveDict, message: str
) -> None:
    assert status == 429
    assert "token budget spent: 15 tokens per minute" in message
    assert 1 <= int(headers["retry-after"]) <= 120
    assert '"tokens-60s";q=15;w=60;qu="tokens"' in headers["ratelimit-policy"]
    assert rate_limit_items(headers["ratelimit"])["tokens-60s"]["r"] == "0"


def test_token_budget_spent_by_streamed_answers(gate: Gate) -> None:
    # Each answer costs 2 prompt + 8 completion tokens, counted from the stream's last chunk.
    with ollama.Client(host=gate.url, headers=bearer("frugal")) as client:
        for _ in range(2):
            chunks = list(client.chat(model="llama3.2", messages=MESSAGES, stream=True))
            assert chunks[-1].eval_count == 8
        with pytest.raises(ollama.ResponseError) as info:
            list(client.chat(model="llama3.2", messages=MESSAGES, stream=True))
        # The budget holds inference and embed; the light class is not affected.
        assert client.list().models
    r = requests.post(gate.url + "/api/generate", json=GEN, headers=bearer("frugal"))
    _assert_budget_429(info.value.status_code, r.headers, info.value.error)
    # the same refusal both times, but for the seconds left, which the clock may have turned
    retry = re.compile(r"retry in (\d+)s")
    later, first = r.json()["error"], info.value.error
    assert retry.sub("", later) == retry.sub("", first)
    assert 0 <= _retry_seconds(first, retry) - _retry_seconds(later, retry) <= 2


def _retry_seconds(message: str, retry: re.Pattern[str]) -> int:
    found = retry.search(message)
    assert found, message
    return int(found.group(1))


def test_token_budget_spent_by_plain_answers(gate: Gate) -> None:
    with openai.OpenAI(base_url=gate.url + "/v1", api_key=SECRETS["frugal"], max_retries=0) as oai:
        for _ in range(2):
            done = oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
            assert done.usage is not None and done.usage.total_tokens == 10
        with pytest.raises(openai.RateLimitError) as info:
            oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
    error = info.value
    _assert_budget_429(error.status_code, error.response.headers, error.message)
    # "Out of tokens", told apart from "too many requests"; the 429 cache's answer too.
    assert error.code == "token_budget_exceeded" and error.type == "rate_limit_error"
    again = requests.post(
        gate.url + "/v1/chat/completions",
        json={"model": "llama3.2", "messages": MESSAGES},
        headers=bearer("frugal"),
    )
    assert again.status_code == 429 and again.json()["error"]["code"] == "token_budget_exceeded"
    assert "token budget" in again.json()["error"]["message"]
    # Other keys have budgets of their own (alice has none at all).
    assert requests.post(gate.url + "/api/generate", json=GEN, headers=bearer("alice")).ok


def mint(keys: Path, *args: str) -> str:
    """Run the minting tool as an operator would, ``>> keys.toml``; return the secret."""
    command = f"{shlex.quote(sys.executable)} -m limiter.mint {shlex.join(args)} >> {keys}"
    done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the stanza went to the file, and only there
    secret = re.search(r"^\s+(og-\S+)$", done.stderr, re.MULTILINE)
    assert secret is not None, done.stderr
    return secret.group(1)


def test_minted_keys_append_to_the_keys_file(
    fake: FakeOllama, gates: GatesFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "minted.toml"
    keys.write_text("# the gate's keys")  # no newline at the end: the stanza starts its own
    carol = mint(keys, "carol", "--role", "admin")
    dave = mint(keys, "dave", "--tokens-per-minute", "100", "--models", "llama3.2:*", "nomic-*")
    mint(keys, "nightly", "--priority", "batch")
    text = keys.read_text()
    assert 'priority = "batch"' in text
    assert carol not in text and dave not in text  # only the digests are stored
    assert 'models = ["llama3.2:*", "nomic-*"]' in text and "tokens_per_minute = 100" in text
    gate = gates(fake.url, {"GATE_API_KEYS_FILE": str(keys)})
    assert requests.post(
        gate.url + "/api/pull", json={"model": "m1"}, headers={"Authorization": f"Bearer {carol}"}
    ).ok
    with ollama.Client(host=gate.url, headers={"Authorization": f"Bearer {dave}"}) as client:
        assert client.generate(model="llama3.2", prompt="hi").done
        with pytest.raises(ollama.ResponseError) as info:
            client.generate(model="m1", prompt="hi")
    assert info.value.status_code == 403


def test_mint_refuses_what_the_keys_file_cannot_hold() -> None:
    for args in (
        ["two words"],
        ["x", "--models", "llama[3]"],
        ["x", "--tokens-per-minute", "0"],
        ["x", "--priority", "urgent"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "limiter.mint", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 2 and done.stdout == "", args
