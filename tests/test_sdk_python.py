"""ollama-python, sync and async, through the gate under gunicorn's gevent worker.

Every call is checked twice: the SDK gets real content back, and the fake
upstream saw the request with the body the SDK sent and its own Host header
(Ollama answers 403 to a foreign one).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import ollama
import pytest

from fakeollama import FakeOllama
from tests.support import Gate, client_requests

TEXT8 = "tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 "


@pytest.fixture
def client(gate: Gate) -> Any:
    with ollama.Client(host=gate.url) as c:
        yield c


def fake_host(fake: FakeOllama) -> str:
    return f"{fake.host}:{fake.port}"


def seen(fake: FakeOllama, method: str, path: str) -> list[dict[str, Any]]:
    """What the fake recorded for ``method path``, each checked to carry the fake's own Host."""
    records = [r for r in client_requests(fake) if (r["method"], r["path"]) == (method, path)]
    for rec in records:
        assert rec["headers"]["host"] == fake_host(fake), rec["headers"]
    return records


def only(fake: FakeOllama, method: str, path: str) -> dict[str, Any]:
    records = seen(fake, method, path)
    assert len(records) == 1, [(r["method"], r["path"]) for r in fake.stats()["requests"]]
    return records[0]


def unique(prefix: str) -> str:
    """A model name no other test uses: the fake's catalog outlives reset()."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}:latest"


def test_list_show_ps_version(fake: FakeOllama, client: ollama.Client) -> None:
    names = [m.model for m in client.list().models]
    assert "llama3.2:latest" in names and "nomic-embed-text:latest" in names
    only(fake, "GET", "/api/tags")

    shown = client.show("llama3.2")
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.capabilities == ["completion"]
    assert only(fake, "POST", "/api/show")["json"] == {"model": "llama3.2"}

    client.generate(model="llama3.2", prompt="warm up", stream=False)
    running = [m.model for m in client.ps().models]
    assert running == ["llama3.2:latest"]
    only(fake, "GET", "/api/ps")

    # ollama-python 0.6.3 has no version(): the raw request it would make.
    version = client._request_raw("GET", "/api/version").json()
    assert version == {"version": fake.settings["version"]}
    only(fake, "GET", "/api/version")


def test_generate_streamed_and_not(fake: FakeOllama, client: ollama.Client) -> None:
    whole = client.generate(model="llama3.2", prompt="say something", stream=False)
    assert whole.response == TEXT8
    assert whole.done and whole.eval_count == 8
    rec = only(fake, "POST", "/api/generate")
    assert rec["json"]["prompt"] == "say something" and rec["json"]["stream"] is False
    assert rec["status"] == 200

    fake.reset()
    parts = list(client.generate(model="llama3.2", prompt="stream it", stream=True))
    assert "".join(p.response for p in parts) == TEXT8
    assert [p.done for p in parts] == [False] * 8 + [True]
    rec = only(fake, "POST", "/api/generate")
    assert rec["json"]["stream"] is True and rec["json"]["model"] == "llama3.2"


def test_chat_streamed_and_not(fake: FakeOllama, client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat(model="qwen2.5:0.5b", messages=messages, stream=False)
    assert whole.message.role == "assistant" and whole.message.content == TEXT8
    rec = only(fake, "POST", "/api/chat")
    assert rec["json"]["messages"] == messages and rec["model"] == "qwen2.5:0.5b"

    fake.reset()
    parts = list(client.chat(model="qwen2.5:0.5b", messages=messages, stream=True))
    assert "".join(p.message.content or "" for p in parts) == TEXT8
    assert parts[-1].done and parts[-1].done_reason == "stop"
    assert only(fake, "POST", "/api/chat")["json"]["stream"] is True


def test_embed_and_embeddings(fake: FakeOllama, client: ollama.Client) -> None:
    out = client.embed(model="nomic-embed-text", input=["one", "two"])
    assert len(out.embeddings) == 2 and all(len(v) == 8 for v in out.embeddings)
    assert out.embeddings[0] != out.embeddings[1]
    assert only(fake, "POST", "/api/embed")["json"]["input"] == ["one", "two"]

    legacy = client.embeddings(model="nomic-embed-text", prompt="one")
    assert list(legacy.embedding) == out.embeddings[0]
    assert only(fake, "POST", "/api/embeddings")["json"]["prompt"] == "one"


def test_pull_streamed(fake: FakeOllama, client: ollama.Client) -> None:
    name = unique("pulled")
    progress = list(client.pull(name, stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    totals = [p.completed for p in progress if p.total]
    assert totals[-1] == progress[1].total
    assert only(fake, "POST", "/api/pull")["json"]["model"] == name
    assert name in [m.model for m in client.list().models]
    client.delete(name)


def test_create_from_blob_copy_delete(
    fake: FakeOllama, client: ollama.Client, tmp_path: Path
) -> None:
    data = b"GGUF" + uuid.uuid4().bytes * 4096
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    digest = client.create_blob(path)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert fake.stats()["blobs"][digest] == len(data)
    upload = only(fake, "POST", f"/api/blobs/{digest}")
    assert upload["status"] == 201 and upload["body_bytes"] == len(data)

    name, copy = unique("created"), unique("copied")
    done = client.create(model=name, files={"model.gguf": digest})
    assert done.status == "success"
    assert only(fake, "POST", "/api/create")["json"]["files"] == {"model.gguf": digest}

    assert client.copy(name, copy).status == "success"
    assert only(fake, "POST", "/api/copy")["json"] == {"source": name, "destination": copy}
    models = [m.model for m in client.list().models]
    assert name in models and copy in models

    assert client.delete(copy).status == "success"
    assert client.delete(name).status == "success"
    deletes = seen(fake, "DELETE", "/api/delete")
    assert [r["json"] for r in deletes] == [{"model": copy}, {"model": name}]
    models = [m.model for m in client.list().models]
    assert name not in models and copy not in models

    with pytest.raises(ollama.ResponseError) as info:
        client.delete(name)
    assert info.value.status_code == 404 and name in info.value.error


def test_upstream_error_reaches_the_sdk(fake: FakeOllama, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert info.value.error == "model 'no-such-model' not found"


def test_async_client(fake: FakeOllama, gate: Gate, tmp_path: Path) -> None:
    blob = tmp_path / "adapter.bin"
    blob.write_bytes(uuid.uuid4().bytes * 1000)
    name, made = unique("async"), unique("async-made")

    async def session() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with ollama.AsyncClient(host=gate.url) as client:
            out["list"] = [m.model for m in (await client.list()).models]
            out["show"] = (await client.show("llama3.2")).capabilities
            out["version"] = (await client._request_raw("GET", "/api/version")).json()
            gen = await client.generate(model="llama3.2", prompt="hi", stream=False)
            out["generate"] = gen.response
            out["ps"] = [m.model for m in (await client.ps()).models]
            stream = await client.generate(model="llama3.2", prompt="hi", stream=True)
            out["generate_stream"] = "".join([p.response async for p in stream])
            chat = await client.chat(
                model="llama3.2", messages=[{"role": "user", "content": "yo"}], stream=False
            )
            out["chat"] = chat.message.content
            chat_stream = await client.chat(
                model="llama3.2", messages=[{"role": "user", "content": "yo"}], stream=True
            )
            out["chat_stream"] = "".join([p.message.content or "" async for p in chat_stream])
            out["embed"] = (await client.embed(model="nomic-embed-text", input="x")).embeddings
            legacy = await client.embeddings(model="nomic-embed-text", prompt="x")
            out["embeddings"] = list(legacy.embedding)
            pull = await client.pull(name, stream=True)
            out["pull"] = [p.status async for p in pull]
            digest = await client.create_blob(blob)
            out["digest"] = digest
            out["create"] = (await client.create(model=made, files={"a.gguf": digest})).status
            out["copy"] = (await client.copy(name, name + "-2")).status
            out["after"] = [m.model for m in (await client.list()).models]
            for model in (name, made, name + "-2"):
                out.setdefault("delete", []).append((await client.delete(model)).status)
        return out

    out = asyncio.run(session())
    assert "llama3.2:latest" in out["list"]
    assert out["show"] == ["completion"]
    assert out["version"] == {"version": fake.settings["version"]}
    assert out["generate"] == out["generate_stream"] == TEXT8
    assert out["ps"] == ["llama3.2:latest"]
    assert out["chat"] == out["chat_stream"] == TEXT8
    assert out["embed"] == [out["embeddings"]] and len(out["embeddings"]) == 8
    assert out["pull"][0] == "pulling manifest" and out["pull"][-1] == "success"
    assert out["digest"] == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    assert fake.stats()["blobs"][out["digest"]] == blob.stat().st_size
    assert out["create"] == out["copy"] == "success"
    assert {name, made, name + "-2"} <= set(out["after"])
    assert out["delete"] == ["success"] * 3

    # Every request reached the fake with its own Host, and the bodies the SDK built.
    paths = [(r["method"], r["path"]) for r in client_requests(fake)]
    assert len(paths) == 18, paths
    assert only(fake, "POST", "/api/pull")["json"]["model"] == name
    assert only(fake, "POST", "/api/create")["json"]["files"] == {"a.gguf": out["digest"]}
    assert only(fake, "POST", "/api/embeddings")["json"] == {
        "model": "nomic-embed-text",
        "prompt": "x",
    }
    streamed = [r["json"]["stream"] for r in seen(fake, "POST", "/api/chat")]
    assert streamed == [False, True]
    assert len(seen(fake, "DELETE", "/api/delete")) == 3
