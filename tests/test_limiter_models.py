"""Per-key model allow-lists end to end: real gunicorn, fake Ollama, ollama-python, OpenAI SDK.

``chat`` may use llama3.2 (any tag) and nomic-embed-text; ``ops`` is an admin key
limited to llama3.2; ``open`` has no list. Every way a client could name another
model must answer 403 and reach nothing; listings show only the key's models.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import ollama
import openai
import pytest
import requests

from fakeollama import FakeOllama
from limiter.mint import new_secret, stanza
from tests.support import Gate, client_requests, start_gate

SECRETS = {name: new_secret() for name in ("chat", "ops", "open")}
OTHER = "qwen2.5:0.5b"  # installed at the fake, outside chat's and ops' lists
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gate(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    """One gate for the module: these tests change nothing in it (the fake is reset)."""
    folder = tmp_path_factory.mktemp("models")
    keys = folder / "keys.toml"
    keys.write_text(
        stanza("chat", SECRETS["chat"]) + 'models = ["llama3.2:*", "nomic-embed-text"]\n'
        + stanza("ops", SECRETS["ops"], "admin") + 'models = ["llama3.2:*"]\n'
        + stanza("open", SECRETS["open"])
    )  # fmt: skip
    started = start_gate(fake.url, folder, {"GATE_API_KEYS_FILE": str(keys)})
    yield started
    started.stop(signal.SIGQUIT)


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


# (method, path, raw JSON body): every field and spelling that names a model.
REFUSED_TO_CHAT: list[tuple[str, str, str]] = [
    ("POST", "/api/generate", '{"model": "qwen2.5:0.5b", "prompt": "hi"}'),
    ("POST", "/api/chat", '{"model": "QWEN2.5:0.5B", "messages": []}'),
    ("POST", "/api/generate", '{"name": "qwen2.5:0.5b", "prompt": "hi"}'),  # legacy field
    ("POST", "/api/generate", '{"model": "", "name": "qwen2.5:0.5b"}'),
    ("POST", "/api/generate", '{"model": "llama3.2", "Model": "qwen2.5:0.5b"}'),
    ("POST", "/api/generate", '{"model": "llama3.2", "model": "qwen2.5:0.5b"}'),
    ("POST", "/api/generate?model=llama3.2", '{"model": "qwen2.5:0.5b"}'),
    ("POST", "/api/generate", '{"model": "llama3.2-vision"}'),  # a glob is name:tag
    ("POST", "/api/generate", '{"model": "registry.ollama.ai/alice/llama3.2"}'),
    ("POST", "/api/generate", '{"model": "llama3.2@sha256:' + "0" * 64 + '"}'),
    ("POST", "/api/generate/", '{"model": "qwen2.5:0.5b"}'),  # not a route: forwarded as light
    ("POST", "/api/embed", '{"model": "nomic-embed-text:v1.5", "input": "x"}'),
    ("POST", "/api/embeddings", '{"model": "m1", "prompt": "x"}'),
    ("POST", "/api/show", '{"model": "qwen2.5:0.5b"}'),
    ("POST", "/api/show", '{"name": "Qwen2.5:0.5b"}'),
    ("GET", "/api/show", '{"model": "qwen2.5:0.5b"}'),
    ("POST", "/v1/chat/completions", '{"model": "qwen2.5:0.5b", "messages": []}'),
    ("POST", "/v1/completions", '{"model": "library/qwen2.5:0.5b", "prompt": "x"}'),
    ("POST", "/v1/embeddings", '{"model": "m1", "input": "x"}'),
    ("POST", "/v1/messages", '{"model": "m2", "max_tokens": 8, "messages": []}'),
    ("POST", "/v1/responses", '{"model": "m3", "input": "x"}'),
    ("GET", "/v1/models/qwen2.5:0.5b", ""),
    ("GET", "/v1/models/QWEN2.5:0.5b?model=llama3.2", ""),
    ("GET", "/v1/models/%71wen2.5:0.5b", ""),  # percent-encoded
    ("HEAD", "/v1/models/registry.ollama.ai/library/qwen2.5:0.5b", ""),
]
REFUSED_TO_OPS: list[tuple[str, str, str]] = [
    ("POST", "/api/pull", '{"model": "qwen2.5:0.5b"}'),
    ("POST", "/api/pull", '{"name": "qwen2.5"}'),
    ("POST", "/api/push", '{"model": "qwen2.5:0.5b"}'),
    ("POST", "/api/copy", '{"source": "qwen2.5:0.5b", "destination": "llama3.2:mine"}'),
    ("POST", "/api/copy", '{"source": "llama3.2", "destination": "qwen2.5:0.5b"}'),
    ("POST", "/api/copy", '{"source": "llama3.2", "Destination": "m1"}'),
    ("DELETE", "/api/delete", '{"model": "qwen2.5:0.5b"}'),
    ("DELETE", "/api/delete", '{"name": "m1"}'),
    ("POST", "/api/create", '{"model": "llama3.2:mine", "from": "qwen2.5:0.5b"}'),
    ("POST", "/api/create", '{"model": "m7", "from": "llama3.2"}'),
]


@pytest.mark.parametrize(
    ("key", "attempt"),
    [("chat", a) for a in REFUSED_TO_CHAT] + [("ops", a) for a in REFUSED_TO_OPS],
    ids=lambda value: value if isinstance(value, str) else f"{value[0]} {value[1]} {value[2]}",
)
def test_another_model_is_refused_and_reaches_nothing(
    fake: FakeOllama, gate: Gate, key: str, attempt: tuple[str, str, str]
) -> None:
    method, path, body = attempt
    headers = {**bearer(key), "Content-Type": "application/json"}
    r = requests.request(method, gate.url + path, data=body.encode(), headers=headers)
    assert r.status_code == 403
    if method != "HEAD":
        error = r.json()["error"]
        if path.startswith("/v1/"):
            assert error["code"] == "model_not_allowed"
            assert error["type"] == "invalid_request_error"
            error = error["message"]
        assert f"is not allowed for API key '{key}'" in error
    assert client_requests(fake) == []


def test_a_body_the_gate_cannot_read_is_refused(fake: FakeOllama, gate: Gate) -> None:
    headers = {**bearer("ops"), "Content-Type": "application/json"}
    body = b'{"source": "llama3.2", "destination": "qwen2.5:0.5b", "x": "\xff"}'
    r = requests.post(gate.url + "/api/copy", data=body, headers=headers)
    assert r.status_code == 400
    assert client_requests(fake) == []


def test_allowed_models_are_served_however_spelt(fake: FakeOllama, gate: Gate) -> None:
    with ollama.Client(host=gate.url, headers=bearer("chat")) as client:
        assert client.chat(model="llama3.2", messages=MESSAGES).done
        assert client.generate(model="llama3.2:latest", prompt="hi").done
        assert client.embed(model="nomic-embed-text", input="x").embeddings
        assert client.show("llama3.2").modelfile is not None
        # Other spellings of llama3.2 are not refused by the gate (the fake knows only one).
        for name in ("LLAMA3.2", "library/llama3.2:latest", "llama3.2:1b"):
            with pytest.raises(ollama.ResponseError) as info:
                client.generate(model=name, prompt="hi")
            assert info.value.status_code == 404  # the fake's answer: it got there
    with openai.OpenAI(base_url=gate.url + "/v1", api_key=SECRETS["chat"], max_retries=0) as oai:
        done = oai.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
        assert done.choices[0].message.content
        assert oai.models.retrieve("llama3.2").id.startswith("llama3.2")
        with pytest.raises(openai.PermissionDeniedError) as denied:
            oai.models.retrieve(OTHER)
        assert denied.value.code == "model_not_allowed"
        with pytest.raises(openai.PermissionDeniedError):
            oai.embeddings.create(model="m1", input="x")
    paths = [r["path"] for r in client_requests(fake)]
    assert paths.count("/api/generate") == 4 and "/v1/embeddings" not in paths


def test_admin_operations_on_allowed_models_pass(fake: FakeOllama, gate: Gate) -> None:
    with ollama.Client(host=gate.url, headers=bearer("ops")) as client:
        assert client.pull("llama3.2").status == "success"
        client.copy("llama3.2", "llama3.2:mine")
        client.delete("llama3.2:mine")
        with pytest.raises(ollama.ResponseError) as info:
            client.copy("llama3.2", "m9")
        assert info.value.status_code == 403
    done = [(r["method"], r["path"]) for r in client_requests(fake)]
    assert done == [("POST", "/api/pull"), ("POST", "/api/copy"), ("DELETE", "/api/delete")]


def names(listing: Any) -> set[str]:
    return {m.model for m in listing.models}


def test_listings_show_only_the_keys_models(fake: FakeOllama, gate: Gate) -> None:
    with (
        ollama.Client(host=gate.url, headers=bearer("chat")) as chat,
        ollama.Client(host=gate.url, headers=bearer("open")) as other,
    ):
        everything = names(other.list())
        assert {"llama3.2:latest", OTHER, "m1:latest"} <= everything
        other.generate(model=OTHER, prompt="hi")  # loaded at the fake, not chat's
        chat.generate(model="llama3.2", prompt="hi")
        for _ in range(3):  # the light lane, warm after the first request, must not serve chat
            assert names(chat.list()) == {"llama3.2:latest", "nomic-embed-text:latest"}
            assert names(chat.ps()) <= {"llama3.2:latest"}
        assert OTHER in names(other.ps())
    with openai.OpenAI(base_url=gate.url + "/v1", api_key=SECRETS["chat"], max_retries=0) as oai:
        assert {m.id for m in oai.models.list()} == {"llama3.2:latest", "nomic-embed-text:latest"}
    for path in ("/api/tags?all=1", "/api/tags/.", "//api/tags"):
        r = requests.get(gate.url + path, headers=bearer("chat"))
        assert "qwen" not in r.text and "m1:latest" not in r.text, path
