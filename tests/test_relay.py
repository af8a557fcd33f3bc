"""The relay's hold on the client socket: the answer's head and first piece leave together.

gunicorn writes a response's head and each piece of its body in separate sends. The
relay corks the client's TCP socket (TCP_CORK) while the head and the first piece are
written, and uncorks it as soon as gunicorn asks for the next piece, or when the
answer ends in any way: a socket left corked would hold back what follows on it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from flask import Flask

from app import create_app
from fakeollama import FakeOllama
from pipeline import Call, pipeline_of
from proxy.disconnect import ClientWatch
from proxy.relay import Relay
from settings import Settings
from signals import call_finished

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="Linux's TCP_CORK")


@pytest.fixture
def app(fake: FakeOllama) -> Iterator[Flask]:
    made = create_app(Settings(upstream=fake.url))
    yield made
    pipeline_of(made).upstream.close()


@pytest.fixture
def client_socket() -> Iterator[socket.socket]:
    """The gate's side of a real TCP connection from a client."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        sock, _ = server.accept()
    yield sock
    sock.close()
    peer.close()


def corked(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))


def relay(app: Flask, sock: socket.socket, method: str, path: str, body: bytes | None) -> Relay:
    resp = pipeline_of(app).upstream.open(method, path, {}, body)
    call = Call("light", method, path, "127.0.0.1")
    return Relay(app, resp, ClientWatch({"gunicorn.socket": sock}), call)


def test_the_head_and_first_piece_are_corked_then_let_out(
    app: Flask, client_socket: socket.socket
) -> None:
    answer = relay(app, client_socket, "GET", "/api/tags", None)
    pieces = iter(answer)
    assert not corked(client_socket)
    next(pieces)  # gunicorn writes the head and this piece now
    assert corked(client_socket)
    assert list(pieces) == []  # gunicorn asks for more: the first piece is out
    assert not corked(client_socket)
    answer.close()
    assert not corked(client_socket)


def test_a_stream_is_uncorked_after_its_first_record(
    app: Flask, client_socket: socket.socket
) -> None:
    body = b'{"model": "m1", "prompt": "hi"}'
    answer = relay(app, client_socket, "POST", "/api/generate", body)
    records = iter(answer)
    next(records)
    assert corked(client_socket)
    next(records)
    assert not corked(client_socket)
    answer.close()
    assert not corked(client_socket)


def test_an_answer_that_ends_early_is_uncorked(app: Flask, client_socket: socket.socket) -> None:
    answer = relay(app, client_socket, "GET", "/api/tags", None)
    next(iter(answer))
    assert corked(client_socket)
    answer.close()  # gunicorn closes it: the client left, or a write failed
    assert not corked(client_socket)


def test_the_end_of_a_chunked_answer_waits_for_its_last_chunk(
    app: Flask, client_socket: socket.socket, fake: FakeOllama
) -> None:
    # gunicorn writes a chunked answer's last (empty) chunk after the body and then calls
    # close(): an answer whose rest is all in leaves with that chunk, in one segment.
    answer = relay(app, client_socket, "POST", "/api/generate", b'{"model": "m1", "prompt": "x"}')
    fake.wait_for(lambda s: s["completed"] == 1)  # the whole answer is on its way
    records = list(answer)
    assert records[-1].startswith(b'{"model"') and b'"done":true' in records[-1]
    assert corked(client_socket)  # gunicorn's last chunk is still to come
    answer.close()
    assert not corked(client_socket)


def test_a_held_answer_leaves_before_its_call_is_counted(
    app: Flask, client_socket: socket.socket, fake: FakeOllama
) -> None:
    """The end of a chunked answer held for gunicorn's last chunk leaves at close(), and only
    then does the call end: what ending it costs (its slot, the status page, the metrics)
    never delays the answer's last bytes."""
    seen: list[bool] = []

    def on_finished(sender: Flask, call: Call, **_: object) -> None:
        seen.append(corked(client_socket))

    call_finished.connect(on_finished, sender=app)
    try:
        body = b'{"model": "m1", "prompt": "x"}'
        answer = relay(app, client_socket, "POST", "/api/generate", body)
        fake.wait_for(lambda s: s["completed"] == 1)
        assert list(answer)[-1].endswith(b"\n")
        assert corked(client_socket) and seen == []  # held, and the call still open
        answer.close()
        assert seen == [False]  # counted once, after the cork let the end out
    finally:
        call_finished.disconnect(on_finished, sender=app)


def test_an_answer_left_unfinished_ends_its_call_at_once(
    app: Flask, client_socket: socket.socket
) -> None:
    """Only a whole answer waits for close(): one whose client left is counted when it stops."""
    seen: list[str] = []

    def on_finished(sender: Flask, call: Call, **_: object) -> None:
        seen.append(call.outcome)

    call_finished.connect(on_finished, sender=app)
    try:
        answer = relay(app, client_socket, "GET", "/api/tags", None)
        pieces = iter(answer)
        next(pieces)
        pieces.close()  # gunicorn stops iterating: a write to the client failed
        assert seen == ["client_gone"]
        answer.close()
        assert seen == ["client_gone"]
    finally:
        call_finished.disconnect(on_finished, sender=app)
