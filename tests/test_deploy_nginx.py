"""The gate behind the shipped nginx site file (deploy/nginx.conf), with GATE_TRUSTED_PROXIES=1.

Clients connect to nginx from two loopback source addresses (127.0.0.1 and
127.0.0.2), so nginx sees two real peers and appends each one's address to
X-Forwarded-For, as it does for clients on a network.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from fakeollama import FakeOllama
from tests.nginx_support import Nginx, start_nginx
from tests.support import Gate, client_requests, start_gate, upstream_saw_leave

GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
ONE, TWO = "127.0.0.1", "127.0.0.2"
MIB = 1024 * 1024


def connect(nginx: Nginx, source: str) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(
        "127.0.0.1", nginx.port, timeout=10, source_address=(source, 0)
    )


def post(
    nginx: Nginx, path: str, body: Any, source: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """POST JSON to nginx from ``source`` on a fresh connection; return status and body."""
    conn = connect(nginx, source)
    try:
        conn.request(
            "POST",
            path,
            json.dumps(body),
            {"Content-Type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def limited(
    fake: FakeOllama,
    gate_factory: Callable[..., Gate],
    nginx_factory: Callable[..., Nginx],
) -> Nginx:
    """nginx in front of a gate that admits two generations per client a minute."""
    gate = gate_factory(fake.url, {"GATE_TRUSTED_PROXIES": "1", "GATE_LIMIT_INFERENCE": "2/minute"})
    return nginx_factory(gate)


@pytest.fixture(scope="module")
def _proxied_pair(
    fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gate, Nginx]]:
    folder = tmp_path_factory.mktemp("proxied")
    gate = start_gate(fake.url, folder, {"GATE_TRUSTED_PROXIES": "1"})
    try:
        nginx = start_nginx(f"127.0.0.1:{gate.port}", folder)
    except BaseException:
        gate.stop()
        raise
    yield gate, nginx
    nginx.stop()
    gate.stop()


@pytest.fixture
def proxied(_proxied_pair: tuple[Gate, Nginx]) -> Iterator[Nginx]:
    """nginx in front of a gate without limits, both shared by this module's tests (no
    test changes them); after each test the gate holds no slot and no waiting job."""
    gate, nginx = _proxied_pair
    yield nginx
    gate.assert_idle()


def test_two_client_addresses_get_separate_buckets(limited: Nginx, fake: FakeOllama) -> None:
    assert [post(limited, "/api/generate", GEN, ONE)[0] for _ in range(2)] == [200, 200]
    status, body = post(limited, "/api/generate", GEN, ONE)
    assert status == 429, body
    # The gate's own 429 passes nginx as the gate wrote it (the shield's error_page
    # applies only to nginx's own refusals).
    assert "per 1 minute" in json.loads(body)["error"], body
    # The second address has its own bucket: the first one's spent limit does not touch it.
    assert [post(limited, "/api/generate", GEN, TWO)[0] for _ in range(2)] == [200, 200]
    assert post(limited, "/api/generate", GEN, TWO)[0] == 429
    assert len([r for r in fake.stats()["requests"] if r["path"] == "/api/generate"]) == 4


def test_a_spoofed_forwarded_for_does_not_change_the_bucket(
    limited: Nginx, fake: FakeOllama
) -> None:
    assert [post(limited, "/api/generate", GEN, ONE)[0] for _ in range(2)] == [200, 200]
    # nginx appends the real peer after whatever the client wrote; the gate, trusting
    # one hop, takes the last entry: still 127.0.0.1, still spent.
    for spoofed in (TWO, "198.51.100.7", f"198.51.100.7, {TWO}"):
        status, body = post(limited, "/api/generate", GEN, ONE, {"X-Forwarded-For": spoofed})
        assert status == 429, (spoofed, body)
    # And a client cannot spend another's bucket by naming it.
    status, _ = post(limited, "/api/generate", GEN, TWO, {"X-Forwarded-For": ONE})
    assert status == 200


@pytest.mark.parametrize(
    "path, body",
    [("/api/chat", CHAT), ("/v1/chat/completions", {**CHAT, "stream": True})],
)
def test_streams_arrive_incrementally_through_nginx(
    proxied: Nginx, fake: FakeOllama, path: str, body: dict[str, Any]
) -> None:
    conn = connect(proxied, ONE)
    slow = {"X-Fake-Tokens": "8", "X-Fake-Token-Interval": "0.2"}
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **slow})
    response = conn.getresponse()
    assert response.status == 200
    arrivals: list[tuple[float, bytes]] = []
    while line := response.readline():
        if line.strip():
            arrivals.append((time.monotonic(), line))
    conn.close()
    # Eight tokens 0.2 s apart: relayed unbuffered, the first piece comes well over a
    # second before the last; buffered anywhere, they come together.
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first > 1.0, [round(t - first, 3) for t, _ in arrivals]
    if path == "/api/chat":
        assert json.loads(arrivals[-1][1])["done"] is True
    else:
        assert arrivals[-1][1].strip() == b"data: [DONE]"


def chunks(size: int, seed: bytes) -> Iterator[bytes]:
    block = hashlib.sha256(seed).digest() * (MIB // 32)
    for i in range(size // MIB):
        yield i.to_bytes(8, "big") + block[8:]


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_blob_upload_passes_through_nginx(proxied: Nginx, fake: FakeOllama, framing: str) -> None:
    # 8 MiB: over nginx's default client_max_body_size (1 MiB) and body buffer.
    size = 8 * MIB
    hasher = hashlib.sha256()
    for chunk in chunks(size, framing.encode()):
        hasher.update(chunk)
    digest = "sha256:" + hasher.hexdigest()
    data: Any = chunks(size, framing.encode())
    if framing == "content-length":
        data = b"".join(data)
    r = requests.post(f"{proxied.url}/api/blobs/{digest}", data=data, timeout=30)
    assert r.status_code == 201, r.text
    assert fake.stats()["blobs"][digest] == size
    r = requests.head(f"{proxied.url}/api/blobs/{digest}", timeout=10)
    assert r.status_code == 200


def test_client_disconnect_through_nginx_reaches_upstream(proxied: Nginx, fake: FakeOllama) -> None:
    payload = json.dumps(CHAT).encode()
    sock = socket.create_connection(("127.0.0.1", proxied.port), timeout=10)
    try:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
            b"X-Fake-Tokens: 100\r\nX-Fake-Token-Interval: 0.1\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        got = b""
        while b'"tok1 "' not in got:
            piece = sock.recv(65536)
            assert piece, got
            got += piece
        assert got.startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()
    closed_at = time.monotonic()
    stats = upstream_saw_leave(fake, closed_at, "through nginx")
    assert stats["completed"] == 0


def test_sigterm_behind_nginx(
    fake: FakeOllama,
    gate_factory: Callable[..., Gate],
    nginx_factory: Callable[..., Nginx],
) -> None:
    """A stream through nginx finishes; nginx's idle keep-alive pool does not hold the worker."""
    gate = gate_factory(fake.url, {"GATE_TRUSTED_PROXIES": "1", "GATE_GRACEFUL_TIMEOUT": "60"})
    nginx = nginx_factory(gate)
    for _ in range(3):  # leaves idle connections in nginx's pool to the gate
        assert requests.get(nginx.url + "/api/version", timeout=10).ok
    conn = connect(nginx, ONE)
    slow = {"X-Fake-Tokens": "15", "X-Fake-Token-Interval": "0.1"}
    conn.request(
        "POST", "/api/chat", json.dumps(CHAT), {"Content-Type": "application/json", **slow}
    )
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.readline())["done"] is False
    gate.proc.send_signal(signal.SIGTERM)
    lines = [json.loads(line) for line in iter(response.readline, b"") if line.strip()]
    conn.close()
    assert lines[-1]["done"] is True
    # Well inside the 60 s grace that idle connections would otherwise use up.
    assert gate.proc.wait(20) == 0, gate.logs()
    assert "Worker graceful timeout" not in gate.logs()
    assert requests.get(nginx.url + "/api/version", timeout=10).status_code == 502


# The flood shield: nginx's own per-address caps (limit_req, limit_conn in deploy/nginx.conf).
SHIELD_NATIVE = {"error": "too many requests from this address"}
SHIELD_OPENAI = {
    "error": {
        "message": "too many requests from this address",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


def assert_shield_answer(path: str, status: int, headers: Any, body: bytes) -> None:
    """A 429 written by nginx's flood shield, in the gate's error shape for ``path``."""
    assert status == 429, body
    assert headers["Content-Type"] == "application/json", headers
    assert headers["Retry-After"] == "1", headers
    expected = SHIELD_OPENAI if path.startswith("/v1/") else SHIELD_NATIVE
    assert json.loads(body) == expected


def flood(nginx: Nginx, source: str, want_refused: int, cap: int = 20000) -> Counter[int]:
    """GET light paths from ``source`` on 8 keep-alive connections at once, as fast as
    they go, until nginx has refused ``want_refused`` of them (or ``cap`` were sent).
    Every 429 is checked to be the shield's; returns the count of each status."""
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    done = threading.Event()
    failures: list[BaseException] = []

    def one_connection() -> None:
        conn = connect(nginx, source)
        try:
            n = 0
            while not done.is_set():
                path = "/v1/models" if n % 2 else "/api/version"
                n += 1
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                if response.status == 429:
                    assert_shield_answer(path, response.status, response.headers, body)
                with lock:
                    statuses[response.status] += 1
                    if statuses[429] >= want_refused or statuses.total() >= cap:
                        done.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            failures.append(exc)
            done.set()
        finally:
            conn.close()

    threads = [threading.Thread(target=one_connection) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if failures:
        raise failures[0]
    return statuses


def test_a_one_address_flood_is_cut_by_nginx_before_the_gate(
    fake: FakeOllama,
    _proxied_pair: tuple[Gate, Nginx],
    nginx_factory: Callable[..., Nginx],
) -> None:
    """limit_req of the shipped file, its rate lowered to 20 a second (bursts of 20) so
    that a flood from this test's client outpaces it on any machine; at the shipped 300 a
    second, a client on a busy test machine gets no further than the gate serves. The
    module's gate, behind an nginx of this test's own."""
    gate, _ = _proxied_pair
    nginx = nginx_factory(
        gate,
        edits=(
            (r"rate=300r/s;", "rate=20r/s;"),
            (
                r"limit_req zone=ollama_gate_rate burst=600 nodelay;",
                "limit_req zone=ollama_gate_rate burst=20 nodelay;",
            ),
        ),
    )
    before = len(client_requests(fake))  # the gate's start-up check
    # The gate has no limit of its own here: every 429 comes from nginx's shield.
    statuses = flood(nginx, ONE, want_refused=300)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 300, statuses
    # What nginx refused never reached the gate: the upstream saw exactly the 200s.
    assert len(client_requests(fake)) - before == statuses[200], statuses
    # Another address has its own allowance, flood or not.
    conn = connect(nginx, TWO)
    try:
        for path in ("/api/version", "/v1/models"):
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            response.read()
    finally:
        conn.close()
    gate.assert_idle()


def test_ordinary_traffic_passes_the_shield(proxied: Nginx, fake: FakeOllama) -> None:
    """A burst as large as the gate's own per-client limits allow passes nginx whole:
    20 chats at once and 200 light reads as fast as 4 connections send them."""
    results: list[int] = []

    def chat() -> None:
        results.append(post(proxied, "/api/chat", {**CHAT, "stream": False}, ONE)[0])

    def reads() -> None:
        conn = connect(proxied, ONE)
        try:
            for _ in range(50):
                conn.request("GET", "/api/tags")
                response = conn.getresponse()
                response.read()
                results.append(response.status)
        finally:
            conn.close()

    before = len(client_requests(fake))  # the gate's start-up check
    threads = [threading.Thread(target=chat) for _ in range(20)]
    threads += [threading.Thread(target=reads) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert Counter(results) == {200: 220}
    assert len(client_requests(fake)) - before == 220


def test_requests_in_progress_per_address_are_capped_by_nginx(
    fake: FakeOllama,
    gate_factory: Callable[..., Gate],
    nginx_factory: Callable[..., Nginx],
) -> None:
    """limit_conn of the shipped file, its number lowered to 2 so that a test can reach it."""
    gate = gate_factory(fake.url, {"GATE_TRUSTED_PROXIES": "1", "GATE_MODEL_CONCURRENCY": "2"})
    nginx = nginx_factory(
        gate, edits=((r"limit_conn ollama_gate_conn 512;", "limit_conn ollama_gate_conn 2;"),)
    )
    before = len(client_requests(fake))  # the gate's start-up check
    slow = {"Content-Type": "application/json", "X-Fake-Tokens": "100"}
    slow["X-Fake-Token-Interval"] = "0.1"
    streams = []
    try:
        for _ in range(2):
            conn = connect(nginx, ONE)
            conn.request("POST", "/api/chat", json.dumps(CHAT), slow)
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.readline())["done"] is False
            streams.append(conn)
        # Two requests of 127.0.0.1 in progress: a third is refused by nginx, in the
        # shape of its endpoint, and the gate never sees it.
        for path in ("/api/chat", "/v1/chat/completions"):
            conn = connect(nginx, ONE)
            conn.request("POST", path, json.dumps(CHAT), {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert_shield_answer(path, response.status, response.headers, response.read())
            conn.close()
        assert len(client_requests(fake)) - before == 2
        # Another address is not affected (a light read: both of the model's slots are taken).
        assert post(nginx, "/api/show", {"model": "llama3.2"}, TWO)[0] == 200
    finally:
        for conn in streams:
            conn.close()
