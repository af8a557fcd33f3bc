"""Malformed input under real gunicorn: a 400 in the contract's shape, never a 500 or a leak.

Broken chunked framing is sent on raw sockets (no client library would send it);
deeply nested JSON comes from clients and from an upstream that answers with
it. Afterwards the gate's pool has every connection back (read from
/gate/healthz, which shows the pool) and proxied requests still work.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from fakeollama import FakeOllama
from pipeline.call import MAX_TOKENS, usage_of
from tests.support import Gate, client_requests, free_port

DIGEST = "sha256:" + "0" * 64

# Broken framings of a chunked body: the size, the chunk and the line ends are wrong.
BROKEN = {
    "invalid chunk size": b"zz\r\n{}\r\n0\r\n\r\n",
    "chunk longer than its size": b'2\r\n{"model": "m"}\r\n0\r\n\r\n',
    "bare LF after a chunk": b"2\r\n{}\n0\r\n\r\n",
    "bare LF chunk-size lines": b"2\n{}\n0\n\n" + b"f" * 9000,
    "broken after a full chunk": b"10000\r\n" + b"x" * 65536 + b"\r\nzz\r\n",
}


def exchange(gate: Gate, data: bytes, *, timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection and read until the gate closes it."""
    with socket.create_connection(("127.0.0.1", gate.port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got


def chunked_post(gate: Gate, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{gate.port}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answer = exchange(gate, head.encode() + body)  # ends: gunicorn closes after a broken body
    status_line, _, rest = answer.partition(b"\r\n")
    assert rest.count(b"HTTP/1.1 ") == 0, answer  # one answer: nothing after it was parsed
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def healthz(gate: Gate) -> dict[str, Any]:
    with requests.get(gate.url + "/gate/healthz", timeout=10) as resp:
        doc: dict[str, Any] = resp.json()
        doc["code"] = resp.status_code
        return doc


def wait_until(check: Callable[[], Any], timeout: float = 5) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return result


def pool_idle(gate: Gate) -> dict[str, Any]:
    """Wait until no pooled upstream connection is in use; return healthz's document."""
    return wait_until(
        lambda: (doc := healthz(gate))["upstream"]["connections"]["in_use"] == 0 and doc
    )


def established_to(port: int) -> int:
    """TCP connections to ``port`` (the fake's side) now ESTABLISHED."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "01":
            count += 1
    return count


# --------------------------------------------------------------------------- chunked framing


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/show", "/api/x"])
def test_broken_chunked_body_answers_400(
    gate: Gate, fake: FakeOllama, path: str, case: str
) -> None:
    status, doc = chunked_post(gate, path, BROKEN[case])
    assert status == 400
    if path.startswith("/v1/"):
        error = doc["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
        message = error["message"]
    else:
        assert set(doc) == {"error"}
        message = doc["error"]
    assert message.startswith("malformed request body: ")
    assert client_requests(fake) == []  # nothing was forwarded
    assert "Traceback" not in gate.logs()


def test_half_closed_chunked_body_answers_400(gate: Gate, fake: FakeOllama) -> None:
    head = (
        f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{gate.port}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\n{}"
    )
    with socket.create_connection(("127.0.0.1", gate.port), timeout=10) as sock:
        sock.sendall(head.encode())
        sock.shutdown(socket.SHUT_WR)  # no more body will come
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
        "error": "request body incomplete: the connection ended before the body did"
    }
    assert client_requests(fake) == []


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_blob_upload_answers_400_and_aborts_the_upstream_upload(
    gate: Gate, fake: FakeOllama, case: str
) -> None:
    status, doc = chunked_post(gate, f"/api/blobs/{DIGEST}", BROKEN[case])
    assert status == 400 and doc["error"].startswith("malformed request body: ")
    stats = fake.stats()
    assert DIGEST not in stats["blobs"]
    # Whatever part of it was sent on, the upstream saw the upload cut, not ended.
    assert all(r["status"] is None for r in client_requests(fake))


def test_broken_uploads_beyond_the_pool_size_leak_no_connection(
    fake: FakeOllama, gate_factory: Callable[..., Gate]
) -> None:
    """Each broken upload once kept one pooled connection for good; a full pool hangs the gate."""
    gate = gate_factory(fake.url, {"GATE_WORKER_CONNECTIONS": "4"})
    assert pool_idle(gate)["upstream"]["connections"]["size"] == 4
    fake.reset()
    uploads = 12  # three times the pool
    for n in range(1, uploads + 1):
        status, doc = chunked_post(
            gate, f"/api/blobs/{DIGEST}", BROKEN["broken after a full chunk"]
        )
        assert status == 400, (n, doc)
    stats = fake.wait_for(lambda s: s["disconnects"] == uploads)
    assert len(client_requests(fake)) == uploads  # each reached the fake, and was cut there
    assert DIGEST not in stats["blobs"]

    doc = pool_idle(gate)
    assert doc["code"] == 200 and doc["status"] == "ok"
    assert established_to(fake.port) <= 4  # the pool keeps at most its size open, idle
    for _ in range(6):  # more than the pool: each request's connection came back
        resp = requests.post(
            gate.url + "/api/chat", json={"model": "llama3.2", "stream": False}, timeout=10
        )
        assert resp.status_code == 200 and resp.json()["done"] is True
    small = b"after"
    digest = "sha256:" + hashlib.sha256(small).hexdigest()
    assert (
        requests.post(f"{gate.url}/api/blobs/{digest}", data=small, timeout=10).status_code == 201
    )
    assert pool_idle(gate)["upstream"]["connections"]["in_use"] == 0


# --------------------------------------------------------------------------- nested JSON

DEEP = 200_000


@pytest.mark.parametrize(
    "path", ["/api/chat", "/api/generate", "/v1/chat/completions", "/api/embed"]
)
def test_deeply_nested_json_answers_400(gate: Gate, fake: FakeOllama, path: str) -> None:
    for body in (
        b"[" * DEEP + b"]" * DEEP,
        b'{"model": "m", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    ):
        resp = requests.post(
            gate.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=10
        )
        assert resp.status_code == 400, resp.text
        message = "request body must be a JSON object"
        if path.startswith("/v1/"):
            assert resp.json()["error"]["message"] == message
        else:
            assert resp.json() == {"error": message}
    assert client_requests(fake) == []
    assert "RecursionError" not in gate.logs()


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions"])
def test_a_model_spelt_twice_with_different_values_answers_400(
    gate: Gate, fake: FakeOllama, path: str
) -> None:
    """Ollama's Go decoder reads "Model" as "model": the queue must not see another model."""
    for body in (
        b'{"model": "m1", "Model": "m2", "prompt": "x", "messages": []}',
        b'{"MODEL": "m1", "model": "m2", "prompt": "x", "messages": []}',
        b'{"model": "m1", "Model": "m2", "model": "m1", "prompt": "x", "messages": []}',
    ):
        resp = requests.post(
            gate.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=10
        )
        assert resp.status_code == 400, resp.text
        assert "twice" in resp.text
    assert client_requests(fake) == []  # nothing was forwarded
    # One spelling, in any case, or the same value twice, is the model as Ollama reads it.
    for body in (
        b'{"Model": "m1", "prompt": "x", "stream": false}',
        b'{"model": "m1", "MODEL": "m1", "prompt": "x", "stream": false}',
    ):
        resp = requests.post(gate.url + "/api/generate", data=body, timeout=10)
        assert resp.status_code == 200, resp.text


class Canned(ThreadingHTTPServer):
    """An upstream that answers every request with ``self.answer`` (status, type, body)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), CannedHandler)
        self.answer: tuple[int, str, bytes] = (200, "application/json", b"{}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class CannedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Canned

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, ctype, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def canned() -> Iterator[Canned]:
    server = Canned()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


NESTED = b"[" * DEEP + b"]" * DEEP
ANSWERS = {
    # Token accounting reads these: none may break the relay, none may count nonsense.
    "nested json body": ("application/json", b'{"eval_count": 1, "x": ' + NESTED + b"}"),
    "nested ndjson record": (
        "application/x-ndjson",
        b'{"done": false}\n{"done": true, "eval_count": 3, "x": ' + NESTED + b"}\n",
    ),
    "nested sse usage": ("text/event-stream", b'data: {"usage": ' + NESTED + b"}\n\n"),
}


@pytest.mark.parametrize("case", sorted(ANSWERS))
def test_upstream_answers_that_defeat_parsing_are_relayed_whole(
    canned: Canned, gate_factory: Callable[..., Gate], tmp_path: Path, case: str
) -> None:
    keys = tmp_path / "keys.toml"
    digest = hashlib.sha256(b"alice-secret").hexdigest()
    keys.write_text(
        f'[keys.alice]\nkey_sha256 = "{digest}"\nrole = "user"\ntokens_per_minute = 5\n'
    )
    gate = gate_factory(canned.url, {"GATE_API_KEYS_FILE": str(keys)})
    ctype, body = ANSWERS[case]
    canned.answer = (200, ctype, body)
    auth = {"Authorization": "Bearer alice-secret"}
    for _ in range(2):
        resp = requests.post(gate.url + "/api/chat", json={"model": "m"}, headers=auth, timeout=20)
        assert resp.status_code == 200 and resp.content == body
    # Nothing was counted from what could not be parsed: the 5-token budget is not spent.
    resp = requests.post(gate.url + "/api/chat", json={"model": "m"}, headers=auth, timeout=20)
    assert resp.status_code == 200
    assert "Traceback" not in gate.logs()


@pytest.mark.parametrize(
    "record, usage",
    [
        (b'{"eval_count": 1, "x": ' + NESTED + b"}", None),
        (b'data: {"usage": ' + NESTED + b"}\n\n", None),
        (b'{"done": true}\n{"eval_count": 2, "x": ' + NESTED + b"}\n", None),
        (b'{"prompt_eval_count": 1' + b"0" * 5000 + b', "eval_count": 2}', None),  # int too long
        (b'{"prompt_eval_count": 1' + b"0" * 30 + b', "eval_count": -5}', (MAX_TOKENS, 0)),
        (b'{"prompt_eval_count": true, "eval_count": 2.5}', (0, 0)),
        (b'{"prompt_eval_count": 7, "eval_count": 3}', (7, 3)),
    ],
)
def test_usage_of_never_raises_and_counts_within_bounds(
    record: bytes, usage: tuple[int, int] | None
) -> None:
    assert usage_of(record) == usage


# --------------------------------------------------------------------------- forwarding headers


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-Proto": "http", "X-Forwarded-Ssl": "on"},
        {"X-Forwarded-Protocol": "ssl", "X-Forwarded-Proto": "http"},
    ],
    ids=["proto-vs-ssl", "protocol-vs-proto"],
)
def test_scheme_headers_a_client_sends_change_nothing(
    gate: Gate, fake: FakeOllama, headers: dict[str, str]
) -> None:
    """gunicorn believes no peer's scheme headers, loopback included (nginx passes on what
    a client sends): contradictory ones are no reason for an HTML 400 of gunicorn's own."""
    for path in ("/api/tags", "/api/chat"):
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
        kwargs: dict[str, Any] = {"json": {**body, "stream": False}} if path == "/api/chat" else {}
        method = "POST" if path == "/api/chat" else "GET"
        with requests.request(
            method, gate.url + path, headers=headers, timeout=10, **kwargs
        ) as resp:
            assert resp.status_code == 200, resp.text
            assert resp.headers["Content-Type"].startswith("application/json")
            doc = resp.json()
        assert ("models" in doc) if path == "/api/tags" else doc["done"] is True


# --------------------------------------------------------------------------- 502 and health


def test_502_and_healthz_name_the_upstream(gate_factory: Callable[..., Gate]) -> None:
    port = free_port()
    closed = gate_factory(f"http://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    resp = requests.post(closed.url + "/api/chat", json={"model": "m"}, timeout=10)
    assert resp.status_code == 502
    assert resp.json() == {
        "error": f"upstream {url} unreachable (POST /api/chat): connection refused"
    }
    resp = requests.get(closed.url + "/v1/models", timeout=10)
    assert resp.status_code == 502
    assert resp.json()["error"] == {
        "message": f"upstream {url} unreachable (GET /v1/models): connection refused",
        "type": "api_error",
        "param": None,
        "code": "upstream_unavailable",
    }
    doc = healthz(closed)
    assert doc["code"] == 503 and doc["status"] == "unavailable"
    # The probe went the proxy's way: the proxy's own message, and its pool untouched.
    assert doc["error"] == (
        f"cannot forward: upstream {url} unreachable (GET /api/version): connection refused"
    )
    assert doc["upstream"]["connections"] == {"in_use": 0, "size": 10000}
