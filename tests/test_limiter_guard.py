"""The failed-key guard end to end: real gunicorn, fake Ollama, the SDKs, the status page."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
import requests

from fakeollama import FakeOllama
from limiter.mint import new_secret, stanza
from tests.limiter_support import GatesFactory, quick_gates, session_from
from tests.support import client_requests

SECRETS = {name: new_secret() for name in ("alice", "root")}
GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}


@pytest.fixture
def gates(gate_factory: GatesFactory) -> Iterator[GatesFactory]:
    yield from quick_gates(gate_factory)


def test_twenty_failed_keys_shut_an_address_out_even_with_a_valid_key(
    fake: FakeOllama, gates: GatesFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(stanza("alice", SECRETS["alice"]) + stanza("root", SECRETS["root"], "admin"))
    # The default GATE_AUTH_FAIL_LIMIT (20/minute); the status page wants an admin key.
    gate = gates(fake.url, {"GATE_API_KEYS_FILE": str(keys), "GATE_STATUS_ACCESS": "admin"})
    alice = {"Authorization": f"Bearer {SECRETS['alice']}"}
    assert requests.post(gate.url + "/api/generate", json=GEN, headers=alice).ok

    # Twenty wrong keys, however presented: each is a 401, and each counts.
    wrong = [{"Authorization": f"Bearer og-guess-{n}"} for n in range(10)]
    wrong += [{"x-api-key": f"og-guess-{n}"} for n in range(5)]
    basic = [base64.b64encode(f"admin:og-guess-{n}".encode()).decode() for n in range(5)]
    for headers in wrong:
        r = requests.post(gate.url + "/api/generate", json=GEN, headers=headers)
        assert r.status_code == 401
    for token in basic:
        status = gate.url + "/gate/status.json"
        assert requests.get(status, headers={"Authorization": f"Basic {token}"}).status_code == 401

    # The 21st request gets 429, a valid key included, natively and on /v1.
    r = requests.post(gate.url + "/api/generate", json=GEN, headers=alice)
    assert r.status_code == 429
    assert r.json()["error"].startswith("too many failed API keys from this address; retry in")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    with ollama.Client(host=gate.url, headers=alice) as client:
        with pytest.raises(ollama.ResponseError) as native:
            client.list()
    assert native.value.status_code == 429
    with (
        openai.OpenAI(base_url=gate.url + "/v1", api_key=SECRETS["alice"], max_retries=0) as oai,
        pytest.raises(openai.RateLimitError) as compat,
    ):
        oai.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert compat.value.code == "too_many_failed_keys"
    assert requests.get(gate.url + "/gate/status.json", headers={
        "Authorization": f"Bearer {SECRETS['root']}"}).status_code == 429  # fmt: skip
    assert [q["path"] for q in client_requests(fake)] == ["/api/generate"]  # alice's first only

    # Another address is not held; the operator sees the guard on the status page and metrics.
    root = {"Authorization": f"Bearer {SECRETS['root']}"}
    with session_from("127.0.0.2") as other:
        assert other.post(gate.url + "/api/generate", json=GEN, headers=alice).ok
        doc = other.get(gate.url + "/gate/status.json", headers=root).json()
        metrics = other.get(gate.url + "/metrics", headers=root).text
    guard = doc["limiter"]["auth_guard"]
    assert (guard["limit"], guard["blocked"], guard["failures"]) == ("20/minute", 1, 20)
    assert guard["refused"] == 4
    assert doc["rejections"]["recent"]["429"]["too_many_failed_keys"] == 4
    assert 'reason="too_many_failed_keys"' in metrics
