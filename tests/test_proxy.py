"""The pass-through gate: fidelity, streaming, the contract's error rows, client disconnects.

Everything runs over real sockets: the gate under gunicorn's gevent worker,
the fake Ollama, curl, requests, raw sockets and the SDKs. Where the fake
cannot say something (custom or hop-by-hop response headers) a small
``http.server`` upstream on its own socket records and answers instead.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
import requests

from endpoints import ROUTES
from fakeollama import FakeOllama
from tests.support import (
    Gate,
    client_requests,
    clients,
    free_port,
    start_gate,
    upstream_saw_leave,
)

CHAT: dict[str, Any] = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello"}]}


def fake_host(fake: FakeOllama) -> str:
    return f"{fake.host}:{fake.port}"


def ndjson(lines: Iterator[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line]


# --------------------------------------------------------------------------- raw sockets


def send_raw(
    gate: Gate, method: str, path: str, body: dict[str, Any], headers: dict[str, str]
) -> socket.socket:
    """Open a connection to the gate and send one request on it; the caller reads and closes."""
    payload = json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{gate.port}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=10)
    sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10) -> bytes:
    """Read from ``sock`` until ``marker`` has arrived; return everything read."""
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}; got {data!r}"
        data += chunk
    return data


# --------------------------------------------------------------------------- curl


def curl(*args: str) -> str:
    done = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "10", *args],
        capture_output=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()  # bytes: keep the CRLFs that text mode would fold


def test_curl_head_and_get_root(gate: Gate, fake: FakeOllama) -> None:
    head = curl("-I", gate.url + "/")
    status, _, rest = head.partition("\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert "content-type: text/plain; charset=utf-8" in rest.lower()
    assert "content-length: 17" in rest.lower()
    assert head.endswith("\r\n\r\n")  # a HEAD answer carries no body

    got = curl(gate.url + "/")
    assert got.startswith("HTTP/1.1 200 OK\r\n")
    assert got.endswith("\r\n\r\nOllama is running")

    records = client_requests(fake)
    assert [(r["method"], r["path"]) for r in records] == [("HEAD", "/"), ("GET", "/")]
    assert all(r["headers"]["host"] == fake_host(fake) for r in records)
    assert records[0]["headers"]["user-agent"].startswith("curl/")


def test_curl_blob_upload_with_expect_continue(
    gate: Gate, fake: FakeOllama, tmp_path: Path
) -> None:
    """Ollama's documented upload, `curl -T file -X POST`, sends Expect: 100-continue."""
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"w" * (2 * 1024 * 1024 + 7))
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    got = curl("-T", str(blob), "-X", "POST", f"{gate.url}/api/blobs/{digest}")
    assert got.startswith("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 ")
    assert fake.stats()["blobs"][digest] == 2 * 1024 * 1024 + 7
    assert "expect" not in only_request(fake)["headers"]  # this hop's business only


# --------------------------------------------------------------------------- fidelity


class Recorder(ThreadingHTTPServer):
    """An upstream that records each request whole and answers with ``self.answer``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RecorderHandler)
        self.seen: list[dict[str, Any]] = []
        self.answer: tuple[int, list[tuple[str, str]], bytes] = (200, [], b"")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RecorderHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def handle_one(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(
            {
                "method": self.command,
                "target": self.path,
                "headers": list(self.headers.items()),
                "body": body,
            }
        )
        status, headers, out = self.server.answer
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = handle_one

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def recorder_gate(recorder: Recorder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    g = start_gate(recorder.url, tmp_path_factory.mktemp("recorder-gate"))
    yield g
    g.stop()


@pytest.mark.parametrize(
    "method, target",
    [
        ("POST", "/api/generate?x=1&y=%2F%20z"),
        ("PUT", "/api/some/new%20thing?debug=true"),
        ("PATCH", "/v1/files/abc?purpose=fine-tune&a=b&a=c"),
        ("DELETE", "/api/delete"),
        ("GET", "/api/tags?q=caf%C3%A9"),
    ],
)
def test_request_and_response_pass_through(
    recorder: Recorder, recorder_gate: Gate, method: str, target: str
) -> None:
    body = b'{"model":"llama3.2",  "prompt":"caf\xc3\xa9 \\u00e9\\n", "n": 1.50}'
    if method == "GET":
        body = b""
    recorder.seen.clear()
    recorder.answer = (
        201,
        [
            ("Content-Type", "application/vnd.fake+json; charset=utf-8"),
            ("X-Upstream-Custom", "kept"),
            ("Set-Cookie", "a=1; Path=/"),
            ("Set-Cookie", "b=2; Path=/"),
            ("Connection", "keep-alive, X-Upstream-Hop"),
            ("X-Upstream-Hop", "dropped"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic realm=upstream"),
        ],
        b'{"answer": "exact bytes",\n "n": 1.50}',
    )
    resp = requests.request(
        method,
        recorder_gate.url + target,
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-Client-Custom": "forwarded",
            "Authorization": "Bearer secret",
            "Connection": "keep-alive, X-Client-Hop",
            "X-Client-Hop": "dropped",
            "Keep-Alive": "300",
            "TE": "trailers",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
        },
        timeout=10,
    )

    # What the upstream saw: the same request, minus this hop's headers, with its own Host.
    (seen,) = recorder.seen
    assert seen["method"] == method and seen["target"] == target
    assert seen["body"] == body
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == recorder.url.removeprefix("http://")
    assert headers["x-client-custom"] == "forwarded"
    assert headers["authorization"] == "Bearer secret"
    assert headers["content-type"] == "application/json"
    for hop in ("x-client-hop", "keep-alive", "te", "proxy-authorization"):
        assert hop not in headers, seen["headers"]
    assert headers.get("connection", "keep-alive").lower() == "keep-alive"

    # What the client got: the upstream's answer, minus the upstream hop's headers.
    assert resp.status_code == 201
    assert resp.content == b'{"answer": "exact bytes",\n "n": 1.50}'
    assert resp.headers["Content-Type"] == "application/vnd.fake+json; charset=utf-8"
    assert resp.headers["X-Upstream-Custom"] == "kept"
    assert resp.raw.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    for hop in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert hop not in resp.headers, dict(resp.headers)
    assert "X-Accel-Buffering" not in resp.headers  # not a stream


def test_no_content_type_is_invented(recorder: Recorder, recorder_gate: Gate) -> None:
    recorder.answer = (200, [("X-Only", "this")], b"plain bytes")
    resp = requests.get(recorder_gate.url + "/api/raw", timeout=10)
    assert resp.status_code == 200 and resp.content == b"plain bytes"
    assert "Content-Type" not in resp.headers and resp.headers["X-Only"] == "this"

    recorder.answer = (204, [], b"")
    resp = requests.delete(recorder_gate.url + "/api/raw", timeout=10)
    assert resp.status_code == 204 and resp.content == b""


def test_upstream_not_found_passes_through_unchanged(gate: Gate, fake: FakeOllama) -> None:
    direct = requests.post(fake.url + "/api/show", json={"model": "x"}, timeout=10)
    fake.reset()
    through = requests.post(gate.url + "/api/show", json={"model": "x"}, timeout=10)
    assert direct.status_code == through.status_code == 404
    assert through.content == direct.content == b'{"error":"model \'x\' not found"}'
    assert through.headers["Content-Type"] == direct.headers["Content-Type"]
    assert only_request(fake)["json"] == {"model": "x"}


def only_request(fake: FakeOllama) -> dict[str, Any]:
    (rec,) = client_requests(fake)
    assert rec["headers"]["host"] == fake_host(fake)
    return rec


def test_foreign_host_header(gate: Gate, fake: FakeOllama) -> None:
    foreign = {"Host": "gate.example.com"}
    # Ollama (and the fake) refuse a foreign Host: this is what the gate must avoid.
    assert requests.get(fake.url + "/api/tags", headers=foreign, timeout=10).status_code == 403
    fake.reset()

    resp = requests.get(gate.url + "/api/tags", headers=foreign, timeout=10)
    assert resp.status_code == 200
    assert "llama3.2:latest" in [m["model"] for m in resp.json()["models"]]
    assert only_request(fake)["headers"]["host"] == fake_host(fake)

    fake.reset()
    resp = requests.post(gate.url + "/api/chat", json=CHAT, headers=foreign, timeout=10)
    assert resp.status_code == 200 and ndjson(resp.iter_lines())[-1]["done"] is True
    assert only_request(fake)["headers"]["host"] == fake_host(fake)


# --------------------------------------------------------------------------- streaming


def test_first_line_arrives_while_upstream_still_generating(gate: Gate, fake: FakeOllama) -> None:
    slow = {"X-Fake-Tokens": "10", "X-Fake-Token-Interval": "0.2"}
    with requests.post(
        gate.url + "/api/generate",
        json={"model": "llama3.2", "prompt": "slowly"},
        headers=slow,
        stream=True,
        timeout=10,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        assert resp.headers["X-Accel-Buffering"] == "no"
        arrivals: list[tuple[float, dict[str, Any], dict[str, Any]]] = []
        for line in resp.iter_lines(chunk_size=None):
            if line:
                arrivals.append((time.monotonic(), json.loads(line), fake.stats()))
    lines = [a[1] for a in arrivals]
    assert [x["response"] for x in lines[:-1]] == [f"tok{i} " for i in range(1, 11)]
    assert lines[-1]["done"] is True
    first_at, _, first_stats = arrivals[0]
    # When the first line was in the client's hands the fake had not finished generating.
    assert first_stats["completed"] == 0 and first_stats["in_flight"] == {"llama3.2:latest": 1}
    last_at = arrivals[-1][0]
    assert last_at - first_at > 1.0  # ten tokens 0.2 s apart: the first came ~1.8 s early
    assert fake.stats()["completed"] == 1


def test_sse_stream_is_relayed_as_it_arrives(gate: Gate, fake: FakeOllama) -> None:
    slow = {"X-Fake-Tokens": "10", "X-Fake-Token-Interval": "0.2"}
    with requests.post(
        gate.url + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=slow,
        stream=True,
        timeout=10,
    ) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-Accel-Buffering"] == "no"
        events: list[tuple[str, int]] = []
        for line in resp.iter_lines(chunk_size=None):
            if line.startswith(b"data: "):
                events.append((line[6:].decode(), fake.stats()["completed"]))
    assert events[-1][0] == "[DONE]"
    assert json.loads(events[0][0])["choices"][0]["delta"]["content"] == "tok1 "
    assert events[0][1] == 0  # the first event arrived before the fake finished
    assert len(events) == 12


# --------------------------------------------------------------------------- error rows


def test_502_upstream_unreachable(gate_factory: Callable[..., Gate]) -> None:
    closed = gate_factory(f"http://127.0.0.1:{free_port()}")
    resp = requests.get(closed.url + "/api/tags", timeout=10)
    assert resp.status_code == 502
    assert resp.headers["Content-Type"] == "application/json"
    assert "connection refused" in resp.json()["error"]

    resp = requests.post(closed.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "upstream_unavailable" and "connection refused" in error["message"]

    with ollama.Client(host=closed.url) as client, pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3.2", messages=CHAT["messages"])
    assert info.value.status_code == 502 and "unreachable" in info.value.error


@pytest.fixture
def strict_gate(fake: FakeOllama, gate_factory: Callable[..., Gate]) -> Gate:
    """A gate with a 1 s upstream timeout and a 4 KiB body limit."""
    started = gate_factory(fake.url, {"GATE_UPSTREAM_TIMEOUT": "1", "GATE_MAX_BODY": "4096"})
    fake.reset()  # forget the start-up probe
    return started


def test_504_no_headers_in_time(strict_gate: Gate, fake: FakeOllama) -> None:
    started = time.monotonic()
    resp = requests.post(
        strict_gate.url + "/api/chat", json=CHAT, headers={"X-Fake-Stall": "3"}, timeout=10
    )
    answered = time.monotonic()
    assert resp.status_code == 504
    assert resp.json() == {
        "error": f"upstream {fake.url} sent no response in time (POST /api/chat)"
    }
    assert answered - started < 2.5  # the stall is 3 s: the gate gave up first

    # The gate hung up on the upstream, so Ollama would stop working on it.
    stats = fake.wait_for(lambda s: s["disconnects"] == 1, timeout=2)
    assert stats["completed"] == 0

    fake.reset()
    resp = requests.post(
        strict_gate.url + "/v1/chat/completions",
        json=CHAT,
        headers={"X-Fake-Stall": "3"},
        timeout=10,
    )
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "upstream_timeout"
    fake.wait_for(lambda s: s["disconnects"] == 1, timeout=2)


MODEL_ROUTES = [(rule, methods[0]) for rule, methods, _cls, needs_model in ROUTES if needs_model]


@pytest.mark.parametrize("path, method", MODEL_ROUTES)
def test_400_bad_body_on_model_endpoints(
    gate: Gate, fake: FakeOllama, path: str, method: str
) -> None:
    openai_shape = path.startswith("/v1/")
    cases = [
        (b"this is not json", "request body must be a JSON object"),
        (b'["a", "list"]', "request body must be a JSON object"),
        (b"", "request body must be a JSON object"),
        (b"{}", "model is required"),
        (b'{"model": ""}', "model is required"),
        (b'{"model": 3, "prompt": "hi"}', "model is required"),
    ]
    for body, message in cases:
        resp = requests.request(
            method,
            gate.url + path,
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert resp.status_code == 400, (body, resp.text)
        if openai_shape:
            assert resp.json() == {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_request",
                }
            }
        else:
            assert resp.json() == {"error": message}
    assert client_requests(fake) == []  # nothing was forwarded


def test_413_body_over_max_body(strict_gate: Gate, fake: FakeOllama) -> None:
    big = {"model": "llama3.2", "prompt": "x" * 5000}
    resp = requests.post(strict_gate.url + "/api/generate", json=big, timeout=10)
    assert resp.status_code == 413
    assert resp.json() == {"error": "request body too large"}

    # /v1: OpenAI's shape, the same whether the body came with Content-Length or chunked.
    for data in (json.dumps(big).encode(), iter([json.dumps(big).encode()])):
        resp = requests.post(strict_gate.url + "/v1/chat/completions", data=data, timeout=10)
        assert resp.status_code == 413
        assert resp.json() == {
            "error": {
                "message": "request body too large",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }

    # Without Content-Length (chunked) the limit holds as well, on every endpoint class.
    padded = json.dumps({"model": "llama3.2", "prompt": "hi"}).encode() + b" " * 5000
    for path in ("/api/generate", "/api/show", "/api/anything"):
        resp = requests.post(strict_gate.url + path, data=iter([padded]), timeout=10)
        assert resp.status_code == 413, (path, resp.text)
        assert resp.json() == {"error": "request body too large"}
    assert client_requests(fake) == []

    # At the limit, with or without Content-Length, the body goes through.
    exact = json.dumps({"model": "llama3.2", "prompt": "hi"}).encode()
    exact += b" " * (4096 - len(exact))
    for data in (exact, iter([exact])):
        resp = requests.post(strict_gate.url + "/api/generate", data=data, timeout=10)
        assert resp.status_code == 200, resp.text
    assert [r["body_bytes"] for r in client_requests(fake)] == [4096, 4096]

    # Blob uploads are exempt: streamed through whatever their size, chunked or not.
    for blob in (b"a" * 10000, b"b" * 10001):
        fake.reset()
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        url = f"{strict_gate.url}/api/blobs/{digest}"
        resp = requests.post(url, data=blob if blob[0] == ord("a") else iter([blob]), timeout=10)
        assert resp.status_code == 201, resp.text
        assert fake.stats()["blobs"][digest] == len(blob)


# --------------------------------------------------------------------------- mid-stream death


def test_mid_stream_death_ndjson(gate: Gate, fake: FakeOllama) -> None:
    die = {"X-Fake-Die-After": "2"}
    with requests.post(
        gate.url + "/api/chat", json=CHAT, headers=die, stream=True, timeout=10
    ) as resp:
        assert resp.status_code == 200
        lines = ndjson(resp.iter_lines())
    assert [x["message"]["content"] for x in lines[:2]] == ["tok1 ", "tok2 "]
    assert len(lines) == 3
    assert set(lines[-1]) == {"error"} and "upstream connection lost" in lines[-1]["error"]
    assert fake.stats()["aborted"] == 1

    fake.reset()
    with ollama.Client(host=gate.url, headers=die) as client:
        got: list[str] = []
        with pytest.raises(ollama.ResponseError) as info:
            for part in client.chat(model="llama3.2", messages=CHAT["messages"], stream=True):
                got.append(part.message.content or "")
    assert got == ["tok1 ", "tok2 "]
    assert "upstream connection lost" in info.value.error

    # A body that is not a stream dies before its headers: the gate answers 502 itself.
    fake.reset()
    resp = requests.post(
        gate.url + "/api/chat", json={**CHAT, "stream": False}, headers=die, timeout=10
    )
    assert resp.status_code == 502 and "upstream" in resp.json()["error"]


def test_mid_stream_death_sse(gate: Gate, fake: FakeOllama) -> None:
    die = {"X-Fake-Die-After": "2"}
    with requests.post(
        gate.url + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=die,
        stream=True,
        timeout=10,
    ) as resp:
        assert resp.status_code == 200
        body = resp.content.decode()
    events = [block for block in body.split("\n\n") if block]
    assert len(events) == 3
    last = json.loads(events[-1].removeprefix("data: "))
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert "upstream connection lost" in last["error"]["message"]

    fake.reset()
    with openai.OpenAI(base_url=gate.url + "/v1", api_key="x", max_retries=0) as oai:
        stream = oai.chat.completions.create(
            model="llama3.2", messages=CHAT["messages"], stream=True, extra_headers=die
        )
        got: list[str] = []
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
    assert got == ["tok1 ", "tok2 "]
    assert "upstream connection lost" in info.value.message


# --------------------------------------------------------------------------- disconnects


@pytest.mark.parametrize(
    "path, body, marker",
    [
        ("/api/chat", CHAT, b'"tok1 "'),
        ("/v1/chat/completions", {**CHAT, "stream": True}, b'"tok1 "'),
    ],
)
def test_client_disconnect_mid_stream_reaches_upstream(
    gate: Gate, fake: FakeOllama, path: str, body: dict[str, Any], marker: bytes
) -> None:
    slow = {"X-Fake-Tokens": "100", "X-Fake-Token-Interval": "0.1"}
    sock = send_raw(gate, "POST", path, body, slow)
    try:
        got = read_until(sock, marker)
        assert got.startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()
    closed_at = time.monotonic()
    stats = upstream_saw_leave(fake, closed_at, f"mid-stream ({path})")
    assert stats["completed"] == 0


def test_client_disconnect_before_upstream_headers(gate: Gate, fake: FakeOllama) -> None:
    sock = send_raw(gate, "POST", "/api/chat", CHAT, {"X-Fake-Stall": "5"})
    try:
        fake.wait_for(lambda s: len(clients(s)) == 1, timeout=5)
        time.sleep(0.2)  # well into the stall
    finally:
        sock.close()
    closed_at = time.monotonic()
    stats = upstream_saw_leave(fake, closed_at, "during the stall")
    assert clients(stats)[0]["status"] is None  # nothing was ever answered


def test_gate_keeps_serving_after_failures(gate: Gate, fake: FakeOllama, tmp_path: Path) -> None:
    """Broken streams and early hang-ups leave the worker's pool usable."""
    for _ in range(3):
        sock = send_raw(gate, "POST", "/api/chat", CHAT, {"X-Fake-Token-Interval": "0.1"})
        read_until(sock, b'"tok1 "')
        sock.close()
        requests.post(gate.url + "/api/chat", json=CHAT, headers={"X-Fake-Die-After": "1"})
    fake.wait_for(lambda s: s["disconnects"] == 3, timeout=5)
    fake.reset()
    with ollama.Client(host=gate.url) as client:
        assert client.chat(model="llama3.2", messages=CHAT["messages"]).message.content
        assert len(client.list().models) >= 1
    assert len(gate.worker_pids()) == 1


@pytest.mark.parametrize("path", ["/api/chat", "/api/tags", "/v1/chat/completions", "/"])
def test_options_is_forwarded_for_ollama_to_answer(gate: Gate, fake: FakeOllama, path: str) -> None:
    """A browser's CORS preflight is Ollama's to answer (its OLLAMA_ORIGINS), not Flask's."""
    headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    direct = requests.options(fake.url + path, headers=headers, timeout=10)
    fake.reset()
    resp = requests.options(gate.url + path, headers=headers, timeout=10)
    assert resp.status_code == direct.status_code
    assert resp.content == direct.content
    assert "Allow" not in resp.headers or resp.headers.get("Allow") == direct.headers.get("Allow")
    seen = client_requests(fake)
    assert [(r["method"], r["path"]) for r in seen] == [("OPTIONS", path)]
