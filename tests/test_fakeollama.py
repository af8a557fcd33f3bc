"""The fake Ollama server, over real HTTP, with requests and the official SDKs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import ollama
import openai
import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/, not the repository, on sys.path
    sys.path.insert(0, str(ROOT))

from fakeollama import FakeOllama  # noqa: E402
from fakeollama.server import CRASH_ERROR, DEFAULT_MODELS  # noqa: E402

TEXT8 = "tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 "


@pytest.fixture
def fake():
    with FakeOllama() as server:
        yield server


@pytest.fixture
def client(fake):
    with ollama.Client(host=fake.url) as c:
        yield c


@pytest.fixture
def oai(fake):
    with openai.OpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def post(fake, path, body=None, **kw):
    return requests.post(fake.url + path, json=body, timeout=10, **kw)


def ndjson(resp):
    return [json.loads(line) for line in resp.iter_lines() if line]


def sse_events(text):
    """[(event or None, data)] of an SSE body."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        out.append((event, "\n".join(data)))
    return out


def raw_request(fake, method, path, body, headers=None):
    """A raw socket with one HTTP request sent on it (the caller closes it)."""
    payload = json.dumps(body).encode()
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{fake.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock = socket.create_connection(("127.0.0.1", fake.port), timeout=5)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return sock


# --------------------------------------------------------------------------- light endpoints


def test_root_version_tags(fake, client):
    r = requests.get(fake.url + "/", timeout=5)
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert r.headers["Content-Type"].startswith("text/plain")
    assert requests.head(fake.url + "/", timeout=5).status_code == 200
    assert requests.get(fake.url + "/api/version", timeout=5).json() == {"version": "0.12.6"}

    tags = requests.get(fake.url + "/api/tags", timeout=5).json()
    assert [m["name"] for m in tags["models"]] == list(DEFAULT_MODELS)
    first = tags["models"][0]
    assert set(first) >= {"name", "model", "modified_at", "size", "digest", "details"}
    assert set(first["details"]) == {
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    }
    listed = client.list()
    assert [m.model for m in listed.models] == list(DEFAULT_MODELS)
    assert requests.get(fake.url + "/api/nope", timeout=5).status_code == 404


def test_models_option_replaces_catalog():
    with FakeOllama(models=["a", "b:7b"], version="0.99.0") as f:
        names = [m["name"] for m in requests.get(f.url + "/api/tags", timeout=5).json()["models"]]
        assert names == ["a:latest", "b:7b"]
        assert requests.get(f.url + "/api/version", timeout=5).json()["version"] == "0.99.0"
        f.configure(models="c,d")
        names = [m["name"] for m in requests.get(f.url + "/api/tags", timeout=5).json()["models"]]
        assert names == ["c:latest", "d:latest"]


def test_show_and_ps(fake, client):
    shown = client.show("llama3.2")
    assert shown.capabilities == ["completion"]
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.details.family == "llama" and shown.template
    assert client.show("nomic-embed-text").capabilities == ["embedding"]
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404 and err.value.error == "model 'nope' not found"

    assert client.ps().models == []
    client.generate(model="m1", prompt="hi")
    ps = client.ps()
    assert [m.model for m in ps.models] == ["m1:latest"]
    assert ps.models[0].size_vram and ps.models[0].expires_at and ps.models[0].context_length


# --------------------------------------------------------------------------- inference


def test_generate_streamed_and_not(fake, client):
    parts = list(client.generate(model="llama3.2", prompt="one two three", stream=True))
    assert len(parts) == 9
    assert [p.done for p in parts] == [False] * 8 + [True]
    assert "".join(p.response for p in parts) == TEXT8
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == 8 and last.prompt_eval_count == 3
    assert last.total_duration > 0 and last.load_duration == 0 and last.context

    whole = client.generate(model="llama3.2", prompt="a b", options={"num_predict": 3})
    assert whole.response == "tok1 tok2 tok3 " and whole.eval_count == 3
    assert whole.prompt_eval_count == 2

    r = post(fake, "/api/generate", {"model": "m2", "prompt": "x"})
    assert r.headers["Content-Type"] == "application/x-ndjson"
    assert r.headers.get("Transfer-Encoding") == "chunked"
    assert ndjson(r)[-1]["eval_count"] == 8
    r = post(fake, "/api/generate", {"model": "m2", "prompt": "x", "stream": False})
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["response"] == TEXT8

    st = fake.stats()
    assert st["completed"] == 4 and st["loads"] == {"llama3.2:latest": 1, "m2:latest": 1}
    rec = st["requests"][0]
    assert rec["method"] == "POST" and rec["path"] == "/api/generate"
    assert rec["model"] == "llama3.2:latest" and rec["json"]["prompt"] == "one two three"
    assert rec["body_bytes"] > 0 and rec["headers"]["content-type"] == "application/json"
    assert rec["headers"]["user-agent"].startswith("ollama-python")


def test_chat_streamed(fake, client):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there you"},
    ]
    parts = list(client.chat(model="qwen2.5:0.5b", messages=messages, stream=True))
    assert "".join(p.message.content for p in parts) == TEXT8
    assert all(p.message.role == "assistant" for p in parts)
    assert parts[-1].done and parts[-1].prompt_eval_count == 5 and parts[-1].eval_count == 8
    whole = client.chat(model="qwen2.5:0.5b", messages=messages, options={"num_predict": 2})
    assert whole.message.content == "tok1 tok2 " and whole.eval_count == 2


def test_inference_errors(fake, client):
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope", prompt="x")
    assert err.value.status_code == 404 and err.value.error == "model 'nope' not found"
    r = post(fake, "/api/chat", {"messages": []})
    assert r.status_code == 400 and r.json() == {"error": "model is required"}
    r = requests.post(fake.url + "/api/generate", data=b"{not json", timeout=5)
    assert r.status_code == 400 and "error" in r.json()
    r = post(fake, "/api/generate", {"model": "nomic-embed-text", "prompt": "x"})
    assert r.status_code == 400
    assert fake.stats()["in_flight"] == {}


def test_load_and_unload_requests(fake, client):
    loaded = client.generate(model="m3")
    assert loaded.done and loaded.done_reason == "load"
    assert fake.stats()["loaded"] == ["m3:latest"]
    chat_load = client.chat(model="m4", messages=[])
    assert chat_load.done_reason == "load"
    unloaded = client.generate(model="m3", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert fake.stats()["loaded"] == ["m4:latest"]
    client.generate(model="m4", prompt="bye", keep_alive="0s")
    assert fake.stats()["loaded"] == []
    assert fake.stats()["loads"] == {"m3:latest": 1, "m4:latest": 1}


def test_embed_and_embeddings(fake, client):
    out = client.embed(model="nomic-embed-text", input=["a b", "c"])
    assert len(out.embeddings) == 2 and all(len(v) == 8 for v in out.embeddings)
    assert out.prompt_eval_count == 3
    again = client.embed(model="nomic-embed-text", input="a b")
    assert again.embeddings[0] == out.embeddings[0]
    assert abs(sum(x * x for x in out.embeddings[0]) - 1) < 1e-3
    single = client.embeddings(model="nomic-embed-text", prompt="a b")
    assert list(single.embedding) == list(out.embeddings[0])
    assert fake.stats()["completed"] == 3


# --------------------------------------------------------------------------- model management


def test_pull_and_push(fake, client):
    parts = list(client.pull("newmodel:1b", stream=True))
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
    layers = [p for p in parts if p.digest]
    assert len(layers) >= 2 and layers[-1].completed == layers[-1].total > 0
    assert layers[0].status.startswith("pulling ")
    assert "newmodel:1b" in [m.model for m in client.list().models]
    assert client.pull("other").status == "success"
    assert "other:latest" in [m.model for m in client.list().models]

    pushed = [p.status for p in client.push("other", stream=True)]
    assert pushed[-1] == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.push("missing")
    assert err.value.status_code == 404


def test_blobs_create_copy_delete(fake, client, tmp_path):
    path = tmp_path / "model.gguf"
    data = os.urandom(300_000)
    path.write_bytes(data)
    digest = client.create_blob(path)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert fake.stats()["blobs"] == {digest: len(data)}
    assert requests.head(f"{fake.url}/api/blobs/{digest}", timeout=5).status_code == 200

    statuses = [
        p.status for p in client.create(model="mine", files={"model.gguf": digest}, stream=True)
    ]
    assert statuses[-1] == "success"
    assert any(digest in s for s in statuses)
    assert "mine:latest" in [m.model for m in client.list().models]
    assert client.create(model="mine2", from_="llama3.2", stream=False).status == "success"
    assert client.show("mine2").details.family == "llama"

    missing = "sha256:" + "0" * 64
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="bad", files={"x.gguf": missing})
    assert err.value.status_code == 400
    r = post(fake, "/api/create", {"model": "bad", "files": {"x.gguf": missing}})
    assert r.status_code == 400 and "error" in r.json()

    assert client.copy("mine", "mine-copy").status == "success"
    assert "mine-copy:latest" in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("nope", "x")
    assert err.value.status_code == 404

    assert client.delete("mine-copy").status == "success"
    assert "mine-copy:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("mine-copy")
    assert err.value.status_code == 404
    r = requests.delete(fake.url + "/api/delete", json={"name": "mine"}, timeout=5)
    assert r.status_code == 200 and r.content == b""


def test_blob_upload_chunked_and_mismatch(fake):
    block = b"0123456789abcdef" * 4096  # 64 KiB
    count = 48  # 3 MiB, sent with chunked transfer-encoding
    digest = "sha256:" + hashlib.sha256(block * count).hexdigest()

    def body():
        for _ in range(count):
            yield block

    r = requests.post(f"{fake.url}/api/blobs/{digest}", data=body(), timeout=10)
    assert r.status_code == 201
    st = fake.stats()
    assert st["blobs"][digest] == len(block) * count
    rec = st["requests"][-1]
    assert rec["body_bytes"] == len(block) * count and rec["json"] is None
    assert rec["headers"]["transfer-encoding"] == "chunked"

    wrong = "sha256:" + "1" * 64
    r = requests.post(f"{fake.url}/api/blobs/{wrong}", data=b"hello", timeout=5)
    assert r.status_code == 400
    assert r.json()["error"].startswith(f"digest mismatch, expected {wrong}, got sha256:")
    assert requests.head(f"{fake.url}/api/blobs/{wrong}", timeout=5).status_code == 404
    assert requests.post(f"{fake.url}/api/blobs/md5:xyz", data=b"", timeout=5).status_code == 400


# --------------------------------------------------------------------------- OpenAI-compatible


def test_openai_chat(fake, oai):
    messages = [{"role": "user", "content": "say something nice"}]
    done = oai.chat.completions.create(model="llama3.2", messages=messages)
    assert done.object == "chat.completion"
    assert done.choices[0].message.content == TEXT8
    assert done.choices[0].finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 8)
    assert done.usage.total_tokens == 11

    stream = oai.chat.completions.create(
        model="llama3.2", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

    plain = oai.chat.completions.create(model="llama3.2", messages=messages, stream=True)
    assert all(c.usage is None for c in plain)

    capped = oai.chat.completions.create(model="llama3.2", messages=messages, max_tokens=2)
    assert capped.choices[0].message.content == "tok1 tok2 "
    assert capped.choices[0].finish_reason == "length"

    r = post(fake, "/v1/chat/completions", {"model": "m1", "messages": messages, "stream": True})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == (None, "[DONE]")

    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="nope", messages=messages)
    assert err.value.body["message"] == "model 'nope' not found"


def test_openai_completions_embeddings_models(fake, oai):
    comp = oai.completions.create(model="m1", prompt="once upon a time")
    assert comp.object == "text_completion" and comp.choices[0].text == TEXT8
    assert comp.usage.prompt_tokens == 4
    chunks = list(
        oai.completions.create(
            model="m1", prompt="x", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT8
    assert chunks[-1].usage.total_tokens == 9

    emb = oai.embeddings.create(model="nomic-embed-text", input=["a", "b c"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    assert emb.usage.prompt_tokens == 3
    r = post(fake, "/v1/embeddings", {"model": "nomic-embed-text", "input": "a"})
    assert r.json()["data"][0]["embedding"] == pytest.approx(emb.data[0].embedding, abs=1e-6)
    b64 = post(
        fake,
        "/v1/embeddings",
        {"model": "nomic-embed-text", "input": "a", "encoding_format": "base64"},
    ).json()["data"][0]["embedding"]
    assert len(base64.b64decode(b64)) == 8 * 4

    ids = [m.id for m in oai.models.list()]
    assert ids == list(DEFAULT_MODELS)
    # "created" is the model's modification time, as Ollama gives it: it never moves.
    tags = {
        m["name"]: m["modified_at"] for m in requests.get(fake.url + "/api/tags").json()["models"]
    }
    for m in oai.models.list():
        modified = datetime.fromisoformat(tags[m.id])
        assert m.created == int(modified.timestamp())
        assert oai.models.retrieve(m.id).created == m.created
    assert oai.models.retrieve("m1:latest").id == "m1:latest"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")
    r = requests.get(fake.url + "/v1/models/nope", timeout=5)
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "model 'nope' not found",
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
    }


def test_openai_responses_and_messages(fake, oai):
    resp = oai.responses.create(model="llama3.2", input="write a poem")
    assert resp.output_text == TEXT8 and resp.usage.output_tokens == 8

    r = post(fake, "/v1/responses", {"model": "llama3.2", "input": "hi", "stream": True})
    events = sse_events(r.text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [json.loads(d)["delta"] for e, d in events if e == "response.output_text.delta"]
    assert "".join(deltas) == TEXT8

    body = {"model": "m1", "max_tokens": 1024, "messages": [{"role": "user", "content": "a b"}]}
    msg = post(fake, "/v1/messages", body).json()
    assert msg["type"] == "message" and msg["content"][0]["text"] == TEXT8
    assert msg["usage"] == {"input_tokens": 2, "output_tokens": 8}
    assert msg["stop_reason"] == "end_turn"
    events = sse_events(post(fake, "/v1/messages", {**body, "stream": True}).text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    deltas = [json.loads(d)["delta"]["text"] for e, d in events if e == "content_block_delta"]
    assert "".join(deltas) == TEXT8


# --------------------------------------------------------------------------- host check


def test_host_check(fake):
    r = requests.get(fake.url + "/api/tags", headers={"Host": "gate.example.com"}, timeout=5)
    assert r.status_code == 403 and r.content == b""
    r = post(fake, "/api/generate", {"model": "m1", "prompt": "x"}, headers={"Host": "evil.com"})
    assert r.status_code == 403
    for host in ("localhost:11434", "10.1.2.3", "[::1]:80", "ollama.internal", "box.local", ""):
        r = requests.get(fake.url + "/api/version", headers={"Host": host}, timeout=5)
        assert r.status_code == 200, host
    assert fake.stats()["loads"] == {}


# --------------------------------------------------------------------------- failure injection


def test_fake_status_header(fake, client):
    r = post(
        fake, "/api/generate", {"model": "m1", "prompt": "x"}, headers={"X-Fake-Status": "503"}
    )
    assert r.status_code == 503 and r.json() == {"error": "fake failure"}
    r = post(
        fake,
        "/v1/chat/completions",
        {"model": "m1", "messages": [{"role": "user", "content": "x"}]},
        headers={"X-Fake-Status": "429"},
    )
    assert r.status_code == 429
    assert r.json()["error"]["message"] == "fake failure"
    assert r.json()["error"]["type"] == "api_error"  # Ollama's type for statuses but 400, 404
    r = requests.get(fake.url + "/api/tags", headers={"X-Fake-Status": "500"}, timeout=5)
    assert r.status_code == 500
    with ollama.Client(host=fake.url, headers={"X-Fake-Status": "502"}) as failing:
        with pytest.raises(ollama.ResponseError) as err:
            failing.generate(model="m1", prompt="x")
    assert err.value.status_code == 502 and err.value.error == "fake failure"
    assert fake.stats()["loads"] == {}


def test_tokens_interval_and_load_time_headers(fake):
    r = post(fake, "/api/generate", {"model": "m1", "prompt": "x"}, headers={"X-Fake-Tokens": "3"})
    assert ndjson(r)[-1]["eval_count"] == 3
    start = time.monotonic()
    r = post(
        fake,
        "/api/generate",
        {"model": "m1", "prompt": "x", "stream": False},
        headers={"X-Fake-Tokens": "4", "X-Fake-Token-Interval": "0.05"},
    )
    assert time.monotonic() - start >= 0.2 and r.json()["eval_count"] == 4
    start = time.monotonic()
    r = post(
        fake,
        "/api/generate",
        {"model": "m2", "prompt": "x", "stream": False},
        headers={"X-Fake-Load-Time": "0.2"},
    )
    assert time.monotonic() - start >= 0.2
    assert r.json()["load_duration"] >= 200_000_000
    again = post(
        fake,
        "/api/generate",
        {"model": "m2", "prompt": "x", "stream": False},
        headers={"X-Fake-Load-Time": "0.2"},
    )
    assert again.json()["load_duration"] == 0  # already loaded
    bad = post(fake, "/api/generate", {"model": "m1"}, headers={"X-Fake-Tokens": "many"})
    assert bad.status_code == 400


def test_stall_header(fake):
    start = time.monotonic()
    r = requests.get(fake.url + "/api/version", headers={"X-Fake-Stall": "0.3"}, timeout=5)
    assert r.status_code == 200 and time.monotonic() - start >= 0.3
    with pytest.raises(requests.ReadTimeout):
        requests.get(fake.url + "/api/version", headers={"X-Fake-Stall": "2"}, timeout=0.2)
    st = fake.wait_for(lambda s: s["disconnects"] == 1, timeout=2)
    assert len(st["disconnect_times"]) == 1


def test_die_after_header(fake):
    body = {"model": "m1", "prompt": "x"}
    lines = []
    with requests.post(
        fake.url + "/api/generate", json=body, headers={"X-Fake-Die-After": "3"}, stream=True
    ) as r:
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for line in r.iter_lines():
                lines.append(json.loads(line))
    assert [p["response"] for p in lines] == ["tok1 ", "tok2 ", "tok3 "]
    st = fake.stats()
    assert st["aborted"] == 1 and st["completed"] == 0 and st["disconnects"] == 0
    assert st["in_flight"] == {}

    with ollama.Client(host=fake.url, headers={"X-Fake-Die-After": "2"}) as dying:
        with pytest.raises(Exception):  # noqa: B017 - httpx's protocol error, whatever its class
            list(dying.generate(model="m1", prompt="x", stream=True))
    with pytest.raises(requests.ConnectionError):
        post(fake, "/api/generate", {**body, "stream": False}, headers={"X-Fake-Die-After": "0"})
    with pytest.raises(requests.ConnectionError):  # nothing to stream: dies before answering
        requests.get(fake.url + "/api/tags", headers={"X-Fake-Die-After": "0"}, timeout=5)
    st = fake.stats()
    assert st["aborted"] == 4
    assert [r["status"] for r in st["requests"]] == [200, 200, None, None]


def test_global_failure_settings(fake, client):
    fake.configure(fail_status=500)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="m1", prompt="x")
    assert err.value.status_code == 500
    assert requests.get(fake.url + "/api/tags", timeout=5).status_code == 200  # light: unaffected
    fake.configure(fail_status=None, die_after=1)
    with pytest.raises(Exception):  # noqa: B017
        list(client.generate(model="m1", prompt="x", stream=True))
    fake.configure(die_after=None, stall=0.3)
    start = time.monotonic()
    client.generate(model="m1", prompt="x")
    assert time.monotonic() - start >= 0.3
    fake.configure(stall=0, tokens=2, token_interval=0.001, load_time=0.0)
    assert client.generate(model="m1", prompt="x").eval_count == 2
    assert fake.settings["tokens"] == 2
    with pytest.raises(ValueError):
        fake.configure(on_overflow="explode")
    with pytest.raises(TypeError):
        fake.configure(nonsense=1)


# --------------------------------------------------------------------------- lifecycle


def test_stop_then_start_same_port(fake):
    port = fake.port
    with requests.post(
        fake.url + "/api/generate",
        json={"model": "m1", "prompt": "x"},
        headers={"X-Fake-Tokens": "100", "X-Fake-Token-Interval": "0.05"},
        stream=True,
        timeout=5,
    ) as streaming:
        lines = streaming.iter_lines()
        assert json.loads(next(lines))["response"] == "tok1 "
        fake.stop()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in lines:
                pass
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.url + "/", timeout=2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert fake.stats()["in_flight"] == {}

    fake.start()
    assert fake.port == port
    assert requests.get(fake.url + "/", timeout=5).text == "Ollama is running"
    assert fake.stats()["disconnects"] == 0  # stopping is not a client disconnect
    fake.stop()
    fake.stop()  # idempotent
    fake.start()
    assert requests.get(fake.url + "/api/version", timeout=5).status_code == 200


def test_disconnect_while_streaming_is_prompt(fake):
    sock = raw_request(
        fake,
        "POST",
        "/api/generate",
        {"model": "m1", "prompt": "x"},
        {"X-Fake-Tokens": "1000", "X-Fake-Token-Interval": "0.05"},
    )
    with sock:
        received = b""
        while b"tok1" not in received:
            received += sock.recv(4096)
    closed = time.monotonic()
    st = fake.wait_for(lambda s: s["disconnects"] == 1, timeout=2)
    assert st["disconnect_times"][0] - closed < 0.5
    st = fake.wait_for(lambda s: s["in_flight"] == {}, timeout=2)
    assert st["completed"] == 0
    time.sleep(0.1)
    assert fake.stats()["disconnects"] == 1  # counted once


def test_disconnect_while_queued_and_loading(fake):
    fake.configure(vram=1, load_time=0.3)
    holder = raw_request(
        fake, "POST", "/api/generate", {"model": "m1", "prompt": "x"}, {"X-Fake-Tokens": "1000"}
    )
    with holder:
        fake.wait_for(lambda s: s["in_flight"].get("m1:latest") == 1 and s["queued"] == 0)
        waiting = raw_request(fake, "POST", "/api/generate", {"model": "m2", "prompt": "x"})
        fake.wait_for(lambda s: s["queued"] == 1)
        waiting.close()
        st = fake.wait_for(lambda s: s["disconnects"] == 1 and s["queued"] == 0, timeout=2)
        assert st["in_flight"] == {"m1:latest": 1}
    fake.wait_for(lambda s: s["disconnects"] == 2 and s["in_flight"] == {}, timeout=2)
    # while loading
    loading = raw_request(fake, "POST", "/api/generate", {"model": "m3", "prompt": "x"})
    fake.wait_for(lambda s: s["loading"] == ["m3:latest"])
    loading.close()
    fake.wait_for(lambda s: s["disconnects"] == 3, timeout=2)


def test_stop_with_queued_and_loading_requests(fake):
    fake.configure(vram=1, load_time=5)
    socks = [
        raw_request(fake, "POST", "/api/generate", {"model": m, "prompt": "x"})
        for m in ("m1", "m2")
    ]
    try:
        fake.wait_for(lambda s: s["loading"] == ["m1:latest"] and s["queued"] == 2)
        start = time.monotonic()
        fake.stop()
        assert time.monotonic() - start < 2
        for sock in socks:
            assert sock.recv(4096) == b""  # dropped without an answer
    finally:
        for sock in socks:
            sock.close()
    st = fake.stats()
    assert (st["in_flight"], st["queued"], st["loading"], st["loaded"]) == ({}, 0, [], [])
    assert st["disconnects"] == 0
    fake.start()
    fake.configure(load_time=0)
    assert post(fake, "/api/generate", {"model": "m2", "prompt": "x", "stream": False}).ok
    assert fake.stats()["loaded"] == ["m2:latest"]


def test_truncated_request_body_is_a_disconnect(fake):
    sock = socket.create_connection(("127.0.0.1", fake.port), timeout=5)
    with sock:
        head = "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head.encode() + b'{"model"')
        time.sleep(0.1)  # the fake is now waiting for the rest of the body
        assert fake.stats()["disconnects"] == 0
    st = fake.wait_for(lambda s: s["disconnects"] == 1)
    assert st["requests"][0]["path"] == "/api/generate" and st["requests"][0]["status"] is None


# --------------------------------------------------------------------------- scheduling


def _flood(fake, models, rounds, headers=None):
    body = {"prompt": "x", "stream": False}

    def one(model):
        return post(fake, "/api/generate", {**body, "model": model}, headers=headers).status_code

    order = [m for _ in range(rounds) for m in models]
    with ThreadPoolExecutor(max_workers=len(order)) as pool:
        futures = []
        for m in order:
            futures.append(pool.submit(one, m))
            time.sleep(0.003)  # keep the arrival order interleaved
        return [f.result() for f in futures]


def test_queue_mode_thrashes(fake):
    fake.configure(vram=2, load_time=0.02, tokens=2)
    models = ["m1", "m2", "m3", "m4"]
    codes = _flood(fake, models, rounds=5)
    assert codes == [200] * 20
    st = fake.stats()
    assert st["total_loads"] >= 12, st["loads"]  # every switch reloads: thrashing
    assert set(st["loads"]) == {f"{m}:latest" for m in models}
    assert len(st["loaded"]) <= 2 and st["crashes"] == 0
    assert st["max_models_in_flight"] >= 3 and st["completed"] == 20

    fake.reset()
    for m in models:  # the same work grouped by model: one load each
        for _ in range(3):
            assert post(fake, "/api/generate", {"model": m, "prompt": "x", "stream": False}).ok
    assert fake.stats()["total_loads"] == 4


def test_queue_mode_is_fifo_and_respects_num_parallel(fake):
    fake.configure(num_parallel=1, tokens=5, token_interval=0.02)
    start = time.monotonic()
    codes = _flood(fake, ["m1"], rounds=3)
    assert codes == [200] * 3
    assert time.monotonic() - start >= 3 * 5 * 0.02  # one at a time
    assert fake.stats()["max_in_flight"] == {"m1:latest": 3}


def test_crash_mode(fake):
    fake.configure(vram=2, on_overflow="crash")
    slow = {"X-Fake-Tokens": "20", "X-Fake-Token-Interval": "0.02"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        busy = [
            pool.submit(post, fake, "/api/generate", {"model": m, "prompt": "x"}, headers=slow)
            for m in ("m1", "m2")
        ]
        fake.wait_for(
            lambda s: len(s["in_flight"]) == 2 and sorted(s["loaded"]) == ["m1:latest", "m2:latest"]
        )
        r = post(fake, "/api/generate", {"model": "m3", "prompt": "x"})
        assert r.status_code == 500 and r.json() == {"error": CRASH_ERROR}
        r = post(fake, "/v1/completions", {"model": "m4", "prompt": "x"})
        assert r.status_code == 500 and r.json()["error"]["message"] == CRASH_ERROR
        assert [f.result().status_code for f in busy] == [200, 200]
    st = fake.stats()
    assert st["crashes"] == 2 and st["max_models_in_flight"] == 3
    # once a model is idle it can be evicted: no crash
    assert post(fake, "/api/generate", {"model": "m3", "prompt": "x"}).status_code == 200
    assert fake.stats()["crashes"] == 2

    fake.reset()
    codes = _flood(fake, ["m1", "m2", "m3"], rounds=1, headers=slow)
    assert sorted(codes) == [200, 200, 500] and fake.stats()["crashes"] == 1


# --------------------------------------------------------------------------- control


def test_reset_wait_for_and_control_endpoints(fake, client):
    client.generate(model="m1", prompt="x")
    assert fake.stats()["requests"]
    fake.reset()
    st = fake.stats()
    assert st["requests"] == [] and st["loaded"] == [] and st["total_loads"] == 0
    assert "m1:latest" in [m.model for m in client.list().models]  # catalog kept
    with pytest.raises(AssertionError, match="condition not met"):
        fake.wait_for(lambda s: s["completed"] == 99, timeout=0.1)

    r = post(fake, "/_fake/configure", {"tokens": 3, "vram": 1})
    assert r.status_code == 200 and r.json()["tokens"] == 3
    assert client.generate(model="m1", prompt="x").eval_count == 3
    assert post(fake, "/_fake/configure", {"tokens": -1}).status_code == 400
    assert post(fake, "/_fake/configure", {"bogus": 1}).status_code == 400
    stats = requests.get(fake.url + "/_fake/stats", timeout=5).json()
    assert stats["completed"] == 1 and stats["loaded"] == ["m1:latest"]
    assert all(not r["path"].startswith("/_fake") for r in stats["requests"])
    assert requests.get(fake.url + "/_fake/stats?requests=0", timeout=5).json()["requests"] == []
    assert post(fake, "/_fake/reset").status_code == 200
    assert fake.stats()["completed"] == 0


def test_record_requests_off():
    with FakeOllama(record_requests=False) as f:
        assert requests.get(f.url + "/api/tags", timeout=5).ok
        assert f.stats()["requests"] == []
        f.configure(record_requests=True)
        assert requests.get(f.url + "/api/tags?x=1", timeout=5).ok
        rec = f.stats()["requests"][0]
        assert rec["query"] == "x=1" and rec["model"] is None and rec["body_bytes"] == 0


def test_threads_hammer_stats_and_configure(fake):
    errors = []

    def poke():
        try:
            for i in range(50):
                fake.configure(tokens=1 + i % 3)
                fake.stats()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=poke) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        assert requests.get(fake.url + "/api/tags", timeout=5).ok
    for t in threads:
        t.join()
    assert errors == []


def test_cli_subprocess():
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakeollama", "--port", "0", "--tokens", "3", "--no-record"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"fakeollama listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        url = match.group(1)
        assert requests.get(url + "/api/tags", timeout=5).json()["models"]
        r = requests.post(
            url + "/api/generate", json={"model": "m1", "stream": False, "prompt": "x"}, timeout=5
        )
        assert r.json()["eval_count"] == 3
        stats = requests.get(url + "/_fake/stats", timeout=5).json()
        assert stats["requests"] == [] and stats["completed"] == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_help_describes_every_setting():
    from fakeollama.config import SETTINGS

    out = subprocess.run(
        [sys.executable, "-m", "fakeollama", "--help"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "1000"},  # no wrapping, no hyphenation
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    flat = " ".join(out.split())
    for s in SETTINGS:
        assert s.option in flat, s.name
        assert " ".join(s.doc.split()) in flat, s.name
        if s.metavar is not None:
            default = s.unset if s.default is None else s.default
            assert f"(default: {default})" in flat, s.name
    assert "(default: 11434)" in flat and "(default: 127.0.0.1)" in flat


def _requirement_names(path):
    names = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[\[=<>!~; ]", line, maxsplit=1)[0])
    return names


def _closure(names):
    """Distributions ``names`` need, themselves included (extras and markers ignored)."""
    from importlib import metadata

    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    seen, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            todo.append(norm(re.split(r"[\[=<>!~;( ]", req, maxsplit=1)[0]))
    return seen


def test_simulator_needs_only_the_runtime_requirements():
    """`make run` installs requirements.txt only; `python -m fakeollama` must run with that."""
    script = (
        "import sys, json, importlib.metadata as md; before = set(sys.modules);"
        "import fakeollama.__main__;"
        "dists = md.packages_distributions();"
        "mods = {m.split('.')[0] for m in set(sys.modules) - before};"
        "print(json.dumps(sorted({d for m in mods for d in dists.get(m, [])})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    imported = {re.sub(r"[-_.]+", "-", d).lower() for d in json.loads(out.stdout)}
    assert "aiohttp" in imported  # the check sees third-party imports at all
    runtime = _closure(_requirement_names(ROOT / "requirements.txt"))
    assert imported - runtime == set()


# --------------------------------------------------------------------------- a fleet of fakes

GB = 10**9
CHAT = [{"role": "user", "content": "hi"}]


def _slow_stream(f, model, tokens=200):
    """A streamed generate that runs until read or cut; returns the open response."""
    r = requests.post(
        f.url + "/api/generate",
        json={"model": model, "prompt": "x"},
        headers={"X-Fake-Tokens": str(tokens), "X-Fake-Token-Interval": "0.02"},
        stream=True,
        timeout=10,
    )
    assert r.status_code == 200
    return r


def test_instances_have_their_own_models_sizes_vram_and_parallel():
    a = FakeOllama(models={"big:8b": "5GB", "small": GB}, vram_bytes="6GB", num_parallel=1)
    b = FakeOllama(models="small=1GB,other:2b=2GiB", vram=1, num_parallel=4)
    with a, b:
        tags_a = requests.get(a.url + "/api/tags", timeout=5).json()["models"]
        tags_b = requests.get(b.url + "/api/tags", timeout=5).json()["models"]
        assert [(m["name"], m["size"]) for m in tags_a] == [
            ("big:8b", 5 * GB),
            ("small:latest", GB),
        ]
        assert [(m["name"], m["size"]) for m in tags_b] == [
            ("small:latest", GB),
            ("other:2b", 2 * 2**30),
        ]
        assert a.settings["vram_bytes"] == 6 * GB and b.settings["vram_bytes"] is None
        assert (a.settings["num_parallel"], b.settings["num_parallel"]) == (1, 4)
        assert post(a, "/api/generate", {"model": "big:8b", "prompt": "x", "stream": False}).ok
        r = post(b, "/api/generate", {"model": "big:8b", "prompt": "x", "stream": False})
        assert r.status_code == 404
        assert a.stats()["loaded"] == ["big:8b"] and b.stats()["loaded"] == []
        assert a.stats()["vram_used"] == 5 * GB
    with pytest.raises(ValueError, match="not a size"):
        FakeOllama(models="a=lots")


@pytest.mark.parametrize(
    "path,body,expected",
    [
        ("/api/generate", {"model": "nope", "prompt": "x"}, {"error": "model 'nope' not found"}),
        ("/api/chat", {"model": "nope", "messages": CHAT}, {"error": "model 'nope' not found"}),
        ("/api/show", {"model": "nope"}, {"error": "model 'nope' not found"}),
        ("/api/embed", {"model": "nope", "input": "x"}, {"error": "model 'nope' not found"}),
        (
            "/api/embeddings",
            {"model": "nope", "prompt": "x"},
            {"error": 'model "nope" not found, try pulling it first'},
        ),
        (
            "/api/copy",
            {"source": "nope", "destination": "x"},
            {"error": 'model "nope" not found'},
        ),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": CHAT},
            {
                "error": {
                    "message": "model 'nope' not found",
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
    ],
)
def test_not_installed_answers_ollamas_exact_404(fake, path, body, expected):
    r = post(fake, path, body)
    assert r.status_code == 404
    assert r.content == json.dumps(expected, separators=(",", ":")).encode()
    r = requests.delete(fake.url + "/api/delete", json={"model": "Nope:1b"}, timeout=5)
    assert r.status_code == 404 and r.content == b'{"error":"model \'Nope:1b\' not found"}'
    assert fake.stats()["model_requests"] == {} and fake.stats()["loads"] == {}


def test_anthropic_errors_take_anthropics_shape(fake):
    r = post(fake, "/v1/messages", {"model": "nope", "max_tokens": 5, "messages": CHAT})
    assert r.status_code == 404
    body = r.json()
    assert body["type"] == "error" and body["request_id"].startswith("req_")
    assert body["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}


def test_ps_lists_size_vram_and_expiry_longest_first():
    models = {"a": 4 * GB, "b": 2 * GB, "huge": 20 * GB}
    with FakeOllama(models=models, vram_bytes="8GB", keep_alive="5m") as f:
        assert post(f, "/api/generate", {"model": "a", "prompt": "x", "stream": False}).ok
        forever = {"model": "b", "prompt": "x", "stream": False, "keep_alive": -1}
        assert post(f, "/api/generate", forever).ok
        before = time.time()
        ps = requests.get(f.url + "/api/ps", timeout=5).json()["models"]
        assert [(m["name"], m["size"], m["size_vram"]) for m in ps] == [
            ("b:latest", 2 * GB, 2 * GB),  # kept forever: listed first
            ("a:latest", 4 * GB, 4 * GB),
        ]
        expires = [datetime.fromisoformat(m["expires_at"]).timestamp() for m in ps]
        assert expires[0] > before + 10 * 365 * 86400
        assert before + 290 < expires[1] < before + 310
        # A model bigger than VRAM loads alone, partly "on the CPU": it holds the whole budget.
        assert post(f, "/api/generate", {"model": "huge", "prompt": "x", "stream": False}).ok
        ps = requests.get(f.url + "/api/ps", timeout=5).json()["models"]
        assert [(m["name"], m["size_vram"]) for m in ps] == [("huge:latest", 8 * GB)]
        assert f.stats()["evictions"] == {"a:latest": 1, "b:latest": 1}


def test_keep_alive_expires_idle_models_and_zero_unloads(fake, client):
    fake.configure(keep_alive=0.3)
    client.generate(model="m1", prompt="x")
    fake.wait_for(lambda s: s["loaded"] == [], timeout=3)
    assert fake.stats()["unloads"] == {"m1:latest": 1}

    fake.configure(keep_alive="5m")
    client.generate(model="m2", prompt="x", keep_alive=0)  # served, then unloaded
    st = fake.stats()
    assert st["loaded"] == [] and st["unloads"]["m2:latest"] == 1 and st["completed"] == 2

    client.generate(model="m3", prompt="x")
    assert fake.stats()["loaded"] == ["m3:latest"]
    # No prompt and keep_alive 0: just unload (nothing is loaded, nothing counted as a request).
    r = post(fake, "/api/generate", {"model": "m3", "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"
    r = post(fake, "/api/chat", {"model": "m4", "messages": [], "keep_alive": "0s"})
    assert r.json()["done_reason"] == "unload"
    st = fake.stats()
    assert st["loaded"] == [] and st["loads"] == {f"m{i}:latest": 1 for i in (1, 2, 3)}
    assert st["model_requests"] == {f"m{i}:latest": 1 for i in (1, 2, 3)}


@pytest.mark.parametrize("on_overflow", ["queue", "crash"])
def test_ollama_like_mode_evicts_idle_then_queues_or_crashes(on_overflow):
    models = {"a": 4 * GB, "b": 4 * GB, "c": 2 * GB, "d": 4 * GB}
    with FakeOllama(models=models, vram_bytes="6GB", on_overflow=on_overflow) as f:
        assert post(f, "/api/generate", {"model": "a", "prompt": "x", "stream": False}).ok
        slow_b = _slow_stream(f, "b")  # a is idle: evicted to make room for b
        f.wait_for(lambda s: s["loaded"] == ["b:latest"])
        slow_c = _slow_stream(f, "c")  # 4 + 2 GB fit: no eviction
        st = f.wait_for(lambda s: sorted(s["loaded"]) == ["b:latest", "c:latest"])
        assert st["evictions"] == {"a:latest": 1} and st["vram_used"] == 6 * GB
        with ThreadPoolExecutor(1) as pool:
            d = pool.submit(post, f, "/api/generate", {"model": "d", "prompt": "x"})
            if on_overflow == "queue":
                f.wait_for(lambda s: s["queued"] == 1)  # nothing idle to evict: d waits
                slow_b.close()
                slow_c.close()
                assert d.result().status_code == 200
                st = f.stats()
                assert st["crashes"] == 0 and "d:latest" in st["loaded"]
            else:
                r = d.result()
                assert r.status_code == 500 and r.json() == {"error": CRASH_ERROR}
                slow_b.close()
                slow_c.close()
                st = f.stats()
                assert st["crashes"] == 1 and "d:latest" not in st["loads"]
        assert st["loads"]["a:latest"] == 1 and st["model_requests"]["d:latest"] == 1


def test_max_queue_answers_ollamas_busy_503(fake):
    fake.configure(num_parallel=1, max_queue=1)
    running = _slow_stream(fake, "m1")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, fake, "/api/generate", {"model": "m1", "prompt": "x"})
        fake.wait_for(lambda s: s["queued"] == 1)
        r = post(fake, "/api/generate", {"model": "m1", "prompt": "x"})
        assert r.status_code == 503
        assert r.json() == {
            "error": "server busy, please try again.  maximum pending requests exceeded"
        }
        running.close()
        assert waiting.result().status_code == 200
    assert fake.stats()["busy_refusals"] == 1


def test_pull_create_copy_delete_change_the_installed_set(fake, client):
    names = lambda: {m.model for m in client.list().models}  # noqa: E731
    client.pull("fresh:1b")
    client.copy("fresh:1b", "twin")
    client.create(model="derived", from_="m1")
    assert {"fresh:1b", "twin:latest", "derived:latest"} <= names()
    client.generate(model="twin", prompt="x")
    assert fake.stats()["loaded"] == ["twin:latest"]
    client.delete("twin")
    assert "twin:latest" not in names() and fake.stats()["loaded"] == []
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="twin", messages=CHAT)
    assert err.value.status_code == 404 and err.value.error == "model 'twin' not found"


def test_kill_resets_open_streams_and_restarts_on_the_same_port(fake):
    port = fake.port
    r = _slow_stream(fake, "m1")
    lines = r.iter_lines()
    assert json.loads(next(lines))["done"] is False
    fake.kill()
    with pytest.raises(requests.exceptions.RequestException):
        for _ in lines:  # the connection is reset before the stream ends
            pass
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(fake.url + "/", timeout=2)
    assert fake.stats()["loaded"] == [] and fake.stats()["in_flight"] == {}
    fake.start()
    assert fake.port == port
    assert requests.get(fake.url + "/api/ps", timeout=5).json() == {"models": []}
    assert post(fake, "/api/generate", {"model": "m1", "prompt": "x", "stream": False}).ok
    st = fake.stats()
    assert st["loads"] == {"m1:latest": 2} and st["disconnects"] == 0


def test_kill_under_a_connection_flood_leaves_no_socket_unclosed():
    """Connections accepted in the instant of a kill are aborted with the rest, not left
    to the garbage collector (whose ResourceWarning failed whichever test ran next)."""
    import gc

    server = FakeOllama().start()
    unclosed: list[str] = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: unclosed.append(str(u.exc_value))
    stop = threading.Event()
    connected = [0]

    def flood() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=1) as s:
                    s.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
                    connected[0] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for _ in range(4):
            seen = connected[0]
            deadline = time.monotonic() + 30
            while connected[0] < seen + 1000 and time.monotonic() < deadline:
                time.sleep(0.01)
            server.kill()
            gc.collect()
            server.start()
        stop.set()
        for t in threads:
            t.join(timeout=10)
        server.stop()
        gc.collect()
    finally:
        stop.set()
        sys.unraisablehook = hook
        server.stop()
    assert unclosed == []


def test_a_fleet_of_subprocesses_killed_and_restarted():
    from fakeollama import FakeOllamaProcess

    big = FakeOllamaProcess(models={"a": 4 * GB, "b": 4 * GB}, vram_bytes="8GB", num_parallel=2)
    small = FakeOllamaProcess(models="b=4GB", vram=1, record_requests=False, keep_alive="1m")
    with big, small:
        assert big.port != small.port
        tags = requests.get(small.url + "/api/tags", timeout=5).json()["models"]
        assert [(m["name"], m["size"]) for m in tags] == [("b:latest", 4 * GB)]
        assert post(small, "/api/generate", {"model": "a", "prompt": "x"}).status_code == 404
        settings = small.configure(tokens=3)
        assert settings["vram"] == 1 and settings["keep_alive"] == 60 and settings["tokens"] == 3
        assert settings["record_requests"] is False
        assert post(small, "/api/generate", {"model": "b", "prompt": "x", "stream": False}).ok

        r = _slow_stream(big, "a")
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
        st = big.wait_for(lambda s: s["loaded"] == ["a:latest"])
        assert st["model_requests"] == {"a:latest": 1} and st["vram_used"] == 4 * GB
        port = big.port
        big.kill()
        with pytest.raises(requests.exceptions.RequestException):
            for _ in lines:  # cut mid-stream by the process's death
                pass
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(big.url + "/", timeout=2)
        big.start()
        assert big.port == port
        st = big.stats(requests=False)
        assert st["loaded"] == [] and st["total_loads"] == 0 and st["requests"] == []
        assert post(big, "/api/generate", {"model": "b", "prompt": "x", "stream": False}).ok
        st = small.stats()  # the other one is untouched
        assert st["loaded"] == ["b:latest"] and st["completed"] == 1 and st["requests"] == []
    assert not big.running and not small.running
