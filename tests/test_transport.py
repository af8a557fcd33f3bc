"""The upstream transport on real sockets: every failure path gives its connection back.

Two kinds of test. The first pin what proxy/transport.py assumes of
geventhttpclient's private parts, so that an upgrade that moves them fails here,
loudly, instead of leaking connections in production. The others drive the
proxy's ``Upstream`` (a real geventhttpclient pool) against the fake Ollama and
raw sockets, and check the pool's count and what the far end saw.
"""

from __future__ import annotations

import inspect
import re
import socket
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import gevent.select
import gevent.socket
import geventhttpclient.client
import geventhttpclient.connectionpool
import geventhttpclient.header
import geventhttpclient.response
import pytest
from geventhttpclient import HTTPClient
from geventhttpclient.connectionpool import ConnectionPool
from geventhttpclient.response import HTTPResponse, HTTPSocketPoolResponse

from errors import UpstreamUnavailable
from fakeollama import FakeOllama
from proxy.transport import POOL_METHODS, WatchedPool, read_ahead, request_head, send
from proxy.upstream import Upstream
from status.probe import UpstreamProbe

CHAT = b'{"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}'
JSON = {"Content-Type": "application/json"}

# --------------------------------------------------------------------------- the library


def test_the_client_keeps_its_pool_where_watch_pool_replaces_it() -> None:
    client = HTTPClient.from_url("http://127.0.0.1:9", concurrency=3)
    assert isinstance(client._connection_pool, ConnectionPool)
    assert client._connection_pool.size == 3
    source = inspect.getsource(geventhttpclient.client)
    # Every use of the pool inside HTTPClient goes through the attribute WatchedPool replaces.
    assert "self._connection_pool = " in source
    assert "pool.get_socket()" in source


def test_the_pool_is_called_only_through_the_methods_watched_pool_has() -> None:
    called: set[str] = set()
    for module in (geventhttpclient.client, geventhttpclient.response):
        source = inspect.getsource(module)
        called |= set(re.findall(r"_connection_pool\.(\w+)", source))
        called |= set(re.findall(r"\b_?pool\.(\w+)\(", source))
    assert called - {"size"} <= POOL_METHODS, called
    for name in POOL_METHODS:
        assert callable(getattr(WatchedPool, name))
        assert callable(getattr(ConnectionPool, name))


def test_the_parser_keeps_read_ahead_body_bytes_in_a_bytearray() -> None:
    parser = HTTPResponse()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nline1\nline2\n")
    assert isinstance(parser._body_buffer, bytearray)
    assert bytes(parser._body_buffer) == b"line1\nline2\n"


def test_a_response_cut_mid_body_is_not_reused() -> None:
    """UpstreamResponse.release relies on this to close, not pool, a half-read answer."""
    parser = HTTPResponse()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert not parser.message_complete and parser.should_close()
    whole = HTTPResponse()
    whole.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert whole.message_complete and not whole.should_close()


def test_read_ahead_is_the_responses_own_buffer(fake: FakeOllama) -> None:
    fake.configure(token_interval=0.0, tokens=5)
    upstream = Upstream(fake.url, timeout=5)
    try:
        resp = upstream.open("POST", "/api/chat", JSON, CHAT)
        raw = resp.raw
        assert isinstance(raw, HTTPSocketPoolResponse)
        first = raw.readline(b"\n")
        buffered = read_ahead(raw)
        assert buffered is raw._body_buffer
        rest = bytes(buffered)
        del buffered[:]
        rest += raw.read()  # the response reads on after what was taken
        lines = (first + rest).splitlines()
        assert len(lines) == 6 and b'"done":true' in lines[-1].replace(b" ", b"")
        resp.release()
        assert upstream.pool.in_use == 0
    finally:
        upstream.close()


# --------------------------------------------------------------------------- failure paths


def broken_body(error: BaseException) -> Iterator[bytes]:
    yield b"x" * 65536
    raise error


def test_a_body_that_raises_while_sent_returns_its_connection(fake: FakeOllama) -> None:
    """The leak: geventhttpclient gives the connection back only on socket errors."""
    upstream = Upstream(fake.url, timeout=5, concurrency=2)
    digest = "sha256:" + "0" * 64
    try:
        for n in range(1, 7):  # three times the pool
            with pytest.raises(RuntimeError, match="framing"):
                upstream.open(
                    "POST", f"/api/blobs/{digest}", {}, broken_body(RuntimeError("framing"))
                )
            assert upstream.pool.in_use == 0
            fake.wait_for(lambda s, n=n: s["disconnects"] == n)
        resp = upstream.open("GET", "/api/tags", {}, None)
        assert resp.status == 200
        assert b"models" in b"".join(resp.records(None))
        resp.release()
        stats = fake.stats()
        assert digest not in stats["blobs"] and not any(stats["in_flight"].values())
    finally:
        upstream.close()


def test_an_exception_thrown_in_while_the_body_is_sent_returns_its_connection() -> None:
    """An exception thrown into the greenlet mid-send (a client that left, a gevent.Timeout)."""
    server = gevent.socket.socket()  # accept() waits in the hub, so the sender runs meanwhile
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}", timeout=5, concurrency=1)
    body = b"{" + b" " * (64 << 20) + b"}"  # more than socket buffers hold: sendall blocks
    sending = gevent.spawn(upstream.open, "POST", "/api/create", JSON, body)
    try:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(1, socket.MSG_PEEK)  # the request is on its way, and nobody reads
            assert upstream.pool.in_use == 1
            sending.kill(ClientLeft("client closed the connection"), block=True, timeout=5)
            assert isinstance(sending.exception, ClientLeft)
            assert upstream.pool.in_use == 0
            # The far end sees the connection end (EOF, or a reset of the unread data).
            with pytest.raises(ConnectionResetError):
                while conn.recv(1 << 20):
                    pass
                raise ConnectionResetError("EOF")
    finally:
        sending.kill()
        upstream.close()
        server.close()


class ClientLeft(Exception):
    pass


def test_a_response_released_mid_body_closes_its_connection(fake: FakeOllama) -> None:
    fake.configure(token_interval=0.2, tokens=50)
    upstream = Upstream(fake.url, timeout=5, concurrency=1)
    try:
        resp = upstream.open("POST", "/api/chat", JSON, CHAT)
        assert next(resp.records(b"\n")).startswith(b"{")
        assert upstream.pool.in_use == 1
        resp.release()
        assert upstream.pool.in_use == 0
        fake.wait_for(lambda s: s["disconnects"] == 1)
    finally:
        upstream.close()


def test_an_unreachable_upstream_is_named_and_costs_no_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as spare:
        port = spare.getsockname()[1]
    upstream = Upstream(f"http://user:secret@127.0.0.1:{port}/ollama", timeout=5, concurrency=1)
    try:
        for _ in range(3):
            with pytest.raises(UpstreamUnavailable) as info:
                upstream.open("GET", "/api/tags?x=1", {}, None)
            assert info.value.message == (
                f"upstream http://127.0.0.1:{port}/ollama unreachable (GET /api/tags): "
                "connection refused"
            )
            assert upstream.pool.in_use == 0
    finally:
        upstream.close()


# --------------------------------------------------------------------------- health


def test_health_fails_while_no_pooled_connection_is_free(fake: FakeOllama) -> None:
    fake.configure(token_interval=0.2, tokens=50)
    now = [0.0]
    upstream = Upstream(fake.url, timeout=5, concurrency=1)
    probe = UpstreamProbe(fake.url, upstream=upstream, clock=lambda: now[0])
    try:
        assert probe.check() is True
        assert probe.connections() == {"in_use": 0, "size": 1}
        stream = upstream.open("POST", "/api/chat", JSON, CHAT)  # holds the only connection
        assert probe.check() is False  # at once, although the cached answer is fresh
        assert probe.error == "no free connection to the upstream (1 of 1 in use)"
        assert probe.connections() == {"in_use": 1, "size": 1}
        stream.release()
        assert probe.check() is True  # asks again, without waiting for the cache to age
        assert probe.healthy is True and probe.error is None
    finally:
        upstream.close()


# --------------------------------------------------------------------------- pooled connections


def test_the_pool_checks_an_idle_connection_through_is_socket_alive() -> None:
    """WatchedPool replaces this check (proxy/transport.py): the pool must still call it."""
    source = inspect.getsource(ConnectionPool.get_socket)
    assert "self._is_socket_alive(sock)" in source


def test_checking_an_idle_pooled_connection_does_not_yield(
    fake: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gevent's select sleeps once even with a zero timeout: a switch per request."""
    # As in the gunicorn worker, where monkey-patching makes the library's select gevent's.
    monkeypatch.setattr(geventhttpclient.connectionpool, "select", gevent.select)
    upstream = Upstream(fake.url, timeout=5)
    try:
        resp = upstream.open("GET", "/api/version", {}, None)
        b"".join(resp.records(None))
        resp.release()  # read in full: its connection waits in the pool
        others_ran: list[bool] = []
        other = gevent.spawn(others_ran.append, True)
        sock = upstream.pool.get_socket()  # the idle one, checked: no switch to the hub
        assert not others_ran
        upstream.pool.return_socket(sock)
        other.join()
        assert others_ran
    finally:
        upstream.close()


def test_a_pooled_connection_the_upstream_closed_is_not_reused() -> None:
    """An idle connection with a FIN waiting is closed and replaced, not sent a request."""
    server = gevent.socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted: list[gevent.socket.socket] = []
    answered = gevent.event.Event()

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            accepted.append(conn)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            if len(accepted) == 1:
                conn.close()  # the first connection ends while idle in the gate's pool
            answered.set()

    server_greenlet = gevent.spawn(serve)
    upstream = Upstream(f"http://127.0.0.1:{port}", timeout=5)
    try:
        resp = upstream.open("GET", "/api/version", {}, None)
        assert b"".join(resp.records(None)) == b"ok"
        resp.release()
        answered.wait(5)
        answered.clear()
        resp = upstream.open("GET", "/api/version", {}, None)
        assert resp.status == 200 and b"".join(resp.records(None)) == b"ok"
        resp.release()
        assert len(accepted) == 2  # a new connection, the closed one left out
        assert upstream.pool.in_use == 0
    finally:
        upstream.close()
        server_greenlet.kill()
        for conn in accepted:
            conn.close()
        server.close()


# --------------------------------------------------------------------------- send


HEADER_SETS: list[dict[str, str]] = [
    {},
    {"Content-Type": "application/json"},
    {"User-Agent": "ollama-python/0.4", "Accept": "*/*", "X-Weird_Name": "a\tb \x80\xff"},
    {"Authorization": "Bearer x", "Accept-Encoding": "gzip, deflate", "X-Empty": ""},
]


@pytest.mark.parametrize("url", ["http://127.0.0.1:11434", "http://[::1]:8080", "https://h:443"])
@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "PUT", "DELETE"])
@pytest.mark.parametrize("body", [b"", b'{"model": "m"}'])
def test_send_writes_the_head_the_library_writes(url: str, method: str, body: bytes) -> None:
    client = HTTPClient.from_url(url)
    client.default_headers = geventhttpclient.header.Headers()  # as proxy.upstream has it
    for headers in HEADER_SETS:
        for target in ("/api/chat", "/v1/models/a%2Fb?x=1&y"):
            ours = request_head(client, method, target, headers, body)
            theirs = client._build_request(
                method, target, body=body, headers=headers, chunked=False
            )
            assert ours == theirs


def test_send_leaves_what_the_library_acts_on_to_it() -> None:
    client = HTTPClient.from_url("http://127.0.0.1:11434")
    client.default_headers = geventhttpclient.header.Headers()
    for headers in (
        {"Host": "x"},
        {"content-length": "3"},
        {"Expect": "100-continue"},
        {"Transfer-Encoding": "chunked"},
        {"X-A": "1", "x-a": "2"},
    ):
        assert request_head(client, "POST", "/api/chat", headers, b"abc") is None
    assert request_head(client, "GET", "api/tags", {}, b"") is None  # no leading slash
    assert request_head(client, "GET", "//x/api/tags", {}, b"") is None
    client.default_headers = geventhttpclient.header.Headers({"User-Agent": "x"})
    assert request_head(client, "GET", "/api/tags", {}, b"") is None


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GE T", "/", {}),
        ("GET", "/a b", {}),
        ("GET", "/", {"Bad Name": "x"}),
        ("GET", "/", {"X-A": "line\r\nInjected: 1"}),
    ],
)
def test_send_refuses_what_the_library_refuses(
    method: str, target: str, headers: dict[str, str]
) -> None:
    client = HTTPClient.from_url("http://127.0.0.1:11434")
    client.default_headers = geventhttpclient.header.Headers()
    with pytest.raises(ValueError) as ours:
        request_head(client, method, target, headers, b"")
    with pytest.raises(ValueError) as theirs:
        client._build_request(method, target, body=b"", headers=headers, chunked=False)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_send_retries_a_connection_closed_unanswered_as_the_library_does(method: str) -> None:
    """A server that closes the first connection without an answer: the library retries an
    idempotent request on a new connection and gives up on a POST; so does send."""

    def outcome(request: Any) -> tuple[str, int]:
        server = gevent.socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        accepted: list[gevent.socket.socket] = []

        def serve() -> None:
            while True:
                conn, _ = server.accept()
                accepted.append(conn)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                if len(accepted) == 1:
                    conn.close()  # no answer at all
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        server_greenlet = gevent.spawn(serve)
        client = HTTPClient.from_url(f"http://127.0.0.1:{port}", concurrency=2)
        client.default_headers = geventhttpclient.header.Headers()
        try:
            resp = request(client, method, "/api/version", {}, None)
            result = f"{resp.status_code} {resp.read()!r}"
            resp.release()
        except Exception as exc:
            result = type(exc).__name__
        finally:
            client.close()
            server_greenlet.kill()
            for conn in accepted:
                conn.close()
            server.close()
        return result, len(accepted)

    def library(client: HTTPClient, method: str, target: str, headers: Any, body: Any) -> Any:
        return client.request(method, target, body=body, headers=headers)

    assert outcome(send) == outcome(library)
    assert outcome(send) == (("200 b'ok'", 2) if method == "GET" else ("HTTPConnectionClosed", 1))
