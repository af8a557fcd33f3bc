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

tests/test_transport.py checks each assumption made here against the
installed library and fails loudly when an upgrade breaks one.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import gevent
from gevent.monkey import get_original
from geventhttpclient import HTTPClient
from geventhttpclient.connectionpool import ConnectionPool
from geventhttpclient.response import HTTPSocketPoolResponse

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

    @contextlib.contextmanager
    def lending(self) -> Iterator[None]:
        """Around one ``HTTPClient.request``: when it raises, close what it still held.

        A request that returns has handed its connection to the response, which
        gives it back when released; one that raises owns nothing any more.
        """
        me = gevent.getcurrent()
        lent: list[gevent.socket.socket] = []
        outer = self._lent.get(me)
        self._lent[me] = lent
        try:
            yield
        except BaseException:
            for sock in lent:
                self.release_socket(sock)
            raise
        finally:
            if outer is None:
                del self._lent[me]
            else:
                self._lent[me] = outer


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
