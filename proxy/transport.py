"""geventhttpclient, wrapped: the one module that touches the library's private parts.

The gate needs two things geventhttpclient (pinned in requirements.txt) has no
public way to give:

- its connection pool (``HTTPClient._connection_pool``), watched. The client
  hands a connection back to the pool only when sending a request fails with a
  socket error; any other exception raised while the request is still being
  sent (a client's broken chunked body read by the body iterator, a
  ``gevent.Timeout`` or a disconnect thrown into the greenlet) would leave the
  connection out of the pool for good. ``WatchedPool`` counts the connections
  lent out and, through ``lending()``, takes back the ones a failed request
  left behind. It also shuts a discarded connection down before closing it, so
  the upstream sees at once a request the gate gave up on.
- its check of an idle pooled connection before reuse (``_is_socket_alive``): the
  library asks gevent's ``select``, which yields to the hub on every call; the
  pool asks the operating system's ``select`` instead, same answer, no switch.
- the body bytes the response parser has read ahead (``_body_buffer``), so
  that NDJSON/SSE records that arrived together leave in one write.
- the response's headers as the parser stores them (``_headers_index``, a dict
  by lower-case name), so that reading one header costs one dict look-up, not
  the library's case folding and copying of every value (``first_header``), and
  listing them no generator (``header_lines``).
- ``send``: ``HTTPClient.request`` for a request whose body is at hand whole
  (or absent), the common case. The library's request merges the headers
  twice into its case-insensitive ``Headers`` and builds the head through a
  generic path (proxies, chunked bodies, ``Expect``) the gate never takes:
  about a tenth of a short proxied chat's CPU. ``send`` writes the same bytes
  (its own check against ``_build_request``), with the same checks, the same
  socket handling and the same retries, and leaves every other request to the
  library.

tests/test_transport.py checks each assumption made here against the
installed library and fails loudly when an upgrade breaks one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import socket
from collections.abc import Mapping
from typing import Any

import gevent
from gevent.monkey import get_original
from geventhttpclient import HTTPClient
from geventhttpclient.client import (
    _BODY_CARRYING_METHODS,
    _FIELD_VALUE_RE,
    _REQUEST_TARGET_RE,
    _TOKEN_RE,
    _may_retry_after_send_error,
)
from geventhttpclient.connectionpool import ConnectionPool
from geventhttpclient.response import HTTPConnectionClosed, HTTPParseError, HTTPSocketPoolResponse

# select.select as the operating system has it, even in a monkey-patched process.
_select = get_original("select", "select")

# The methods HTTPClient and its responses call on a pool: WatchedPool has each.
POOL_METHODS = frozenset({"get_socket", "return_socket", "release_socket", "close"})


class WatchedPool:
    """A geventhttpclient pool that knows which connections are lent out.

    ``in_use`` is how many connections requests and responses hold now; ``size``
    is the most the pool lends at once (a request beyond it waits for one).
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        pool._is_socket_alive = _is_socket_alive  # type: ignore[method-assign]
        self.size: int = pool.size
        self._out: set[gevent.socket.socket] = set()  # the sockets lent out
        # Sockets lent to each greenlet inside lending(): the ones a failed request holds.
        self._lent: dict[Any, list[gevent.socket.socket]] = {}

    @property
    def in_use(self) -> int:
        return len(self._out)

    @property
    def free(self) -> int:
        return self.size - len(self._out)

    def get_socket(self) -> gevent.socket.socket:
        sock = self._pool.get_socket()
        self._out.add(sock)
        lent = self._lent.get(gevent.getcurrent())
        if lent is not None:
            lent.append(sock)
        return sock

    def return_socket(self, sock: gevent.socket.socket) -> None:
        self._out.discard(sock)
        self._pool.return_socket(sock)

    def release_socket(self, sock: gevent.socket.socket) -> None:
        """Close a connection that cannot be reused, and free its place in the pool."""
        if sock not in self._out:
            return  # already given back: the pool's count must not be freed twice
        self._out.discard(sock)
        with contextlib.suppress(OSError):
            # At once, even while another reference to the socket lives on.
            sock.shutdown(socket.SHUT_RDWR)
        self._pool.release_socket(sock)

    def close(self) -> None:
        self._pool.close()

    def lending(self) -> _Lending:
        """``with pool.lending():`` around one ``HTTPClient.request``: when it raises, close
        what it still held.

        A request that returns has handed its connection to the response, which
        gives it back when released; one that raises owns nothing any more. (A class,
        not a generator-based context manager: it is entered on every request.)
        """
        return _Lending(self)


class _Lending:
    """WatchedPool.lending's context manager: the connections lent to this greenlet inside."""

    __slots__ = ("pool", "me", "lent", "outer")

    def __init__(self, pool: WatchedPool) -> None:
        self.pool = pool

    def __enter__(self) -> None:
        self.me = me = gevent.getcurrent()
        self.lent: list[gevent.socket.socket] = []
        lent_by = self.pool._lent
        self.outer = lent_by.get(me)
        lent_by[me] = self.lent

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        pool = self.pool
        try:
            if exc_type is not None:
                for sock in self.lent:
                    pool.release_socket(sock)
        finally:
            if self.outer is None:
                del pool._lent[self.me]
            else:
                pool._lent[self.me] = self.outer


def _is_socket_alive(sock: gevent.socket.socket | None) -> bool:
    """Whether an idle pooled connection may be reused: open, and nothing to read on it.

    What ``ConnectionPool._is_socket_alive`` answers, with a non-blocking select(2) and
    no switch to the hub (gevent's select sleeps once even with a zero timeout). An idle
    keep-alive connection that is readable has a FIN or stray bytes: not reusable.
    """
    if sock is None:
        return False
    try:
        if sock.fileno() < 0:
            return False
        readable, _, _ = _select([sock], [], [], 0.0)
        return not readable
    except (OSError, ValueError):
        return False


def watch_pool(client: HTTPClient) -> WatchedPool:
    """Put a WatchedPool in place of ``client``'s own pool and return it."""
    pool = WatchedPool(client._connection_pool)
    client._connection_pool = pool  # type: ignore[assignment]
    return pool


def read_ahead(raw: HTTPSocketPoolResponse) -> bytearray:
    """The body bytes ``raw``'s parser has received but nobody has read yet.

    The caller may take bytes off its front (``del buf[:n]``): the response reads
    on from what is left.
    """
    return raw._body_buffer


_dict_get = dict.get
_dict_values = dict.values


def first_header(raw: HTTPSocketPoolResponse, name: str) -> str | None:
    """The first value of the response header ``name`` (in lower case) as ``raw`` got it:
    what ``raw.get(name)`` gives, or the first of the list it gives for a repeated header.

    The parser's ``Headers`` is a dict of lower-case names, each holding one
    ``(name, value)`` tuple or a list of them (a repeated header).
    """
    found = _dict_get(raw._headers_index, name)
    if found is None:
        return None
    if isinstance(found, tuple):
        return found[1]
    return found[0][1] if found else None


def header_lines(raw: HTTPSocketPoolResponse) -> list[tuple[str, str]]:
    """The response's header lines as ``list(raw.items())`` gives them (a repeated header's
    lines together, where its name first came), without the library's generator."""
    lines: list[tuple[str, str]] = []
    for found in _dict_values(raw._headers_index):
        if isinstance(found, tuple):
            lines.append(found)
        else:
            lines.extend(found)
    return lines


# Header names whose presence sends a request down the library's own path: HTTPClient adds,
# replaces or acts on them (the gate's header filters drop each of them anyway).
_LIBRARY_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "expect", "proxy-authorization"}
)


@functools.lru_cache(maxsize=64)
def _host_header(host: str, port: int) -> str:
    host_port = host
    if ":" in host and host[0] != "[" and host[-1] != "]":
        host_port = "[" + host_port + "]"  # an IPv6 address
    if port not in (80, 443):
        host_port += ":" + str(port)
    return f"Host: {host_port}\r\n"


@functools.lru_cache(maxsize=1024)
def _header_line(field: str, value: str) -> tuple[str, str]:
    """One header line as ``_build_request`` writes it, with the name in lower case;
    raises its ValueErrors for a name that is no token, a value with control characters.
    Bounded: names and values come from clients."""
    if not isinstance(field, str) or not _TOKEN_RE.fullmatch(field):
        raise ValueError(f"invalid header field name {field!r}")
    if isinstance(value, str) and not _FIELD_VALUE_RE.fullmatch(value):
        raise ValueError(f"invalid value for header field {field!r}: {value!r}")
    return f"{field}: {value}\r\n", field.lower()


def request_head(
    client: HTTPClient, method: str, target: str, headers: Mapping[str, str], body: bytes
) -> str | None:
    """The request line and headers ``client._build_request`` writes for ``body`` sent
    whole; None when the library must build them (see ``send``).

    The same checks in the same order, raising the same ValueErrors: a method and header
    names that are tokens, a target and header values without control characters."""
    if client.use_proxy or client.default_headers or client.version != client.HTTP_11:
        return None
    if not _TOKEN_RE.fullmatch(method):
        raise ValueError(f"invalid HTTP method {method!r}")
    if not _REQUEST_TARGET_RE.fullmatch(target):
        raise ValueError(f"invalid request URI {target!r}")
    if not target.startswith("/") or target.startswith("//"):
        return None  # the library rewrites or refuses these
    lines = [method, " ", target, " HTTP/1.1\r\n"]
    seen: set[str] = set()
    for field, value in headers.items():
        line, lower = _header_line(field, value)
        if lower in _LIBRARY_HEADERS or lower in seen:
            return None  # a name the library acts on, or one its Headers would merge
        seen.add(lower)
        lines.append(line)
    lines.append(_host_header(client.host, client.port))
    if body:
        lines += ("Content-Length: ", str(len(body)), "\r\n")
    elif method in _BODY_CARRYING_METHODS:
        lines.append("Content-Length: 0\r\n")
    lines.append("\r\n")
    return "".join(lines)


def send(
    client: HTTPClient,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes | None,
) -> HTTPSocketPoolResponse:
    """``client.request(method, target, body=body, headers=headers)`` for a body at hand
    whole (or None): the same bytes, in one write as the library sends them, the same
    socket handling and retries (HTTPClient.request, for a body that is neither chunked
    nor behind ``Expect: 100-continue``); anything else goes to the library."""
    method = method.upper()
    data = body or b""
    head = request_head(client, method, target, headers, data)
    if head is None:
        return client.request(method, target, body=body, headers=headers)
    request = head.encode("latin-1") + data
    pool = client._connection_pool
    attempts_left = pool.size + 1
    while True:
        sock = pool.get_socket()
        retry_on: tuple[type[Exception], ...]
        try:
            sock.sendall(request)
            # Sent in full: a connection closed before the answer (the response releases
            # the socket) is retried only when idempotent.
            retry_on = (HTTPConnectionClosed,)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                pool.release_socket(sock)
                raise
            # The connection broke while the request was sent: the server may have
            # answered early (a refusal) before closing; the response releases the socket.
            retry_on = (OSError, HTTPParseError)
        try:
            response = HTTPSocketPoolResponse(
                sock,
                pool,
                block_size=client.block_size,
                method=method,
                headers_type=client.headers_type,
            )
        except retry_on:
            if attempts_left > 0 and _may_retry_after_send_error(method):
                attempts_left -= 1
                continue
            raise
        response._sent_request = head
        return response
