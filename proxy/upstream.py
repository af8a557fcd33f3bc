"""The connection pool to Ollama and the one place transport errors become gate errors.

The transport is geventhttpclient: a keep-alive pool on gevent sockets with a C
response parser. It was chosen over urllib3 by measurement (docs/BENCHMARKS.md):
it costs about half the CPU per proxied request.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Iterator, Mapping
from urllib.parse import urlsplit

import gevent
from geventhttpclient import HTTPClient
from geventhttpclient.header import Headers
from geventhttpclient.response import HTTPParseError, HTTPSocketPoolResponse

from errors import UpstreamTimeout, UpstreamUnavailable

from .transport import WatchedPool, first_header, header_lines, read_ahead, send, watch_pool

logger = logging.getLogger(__name__)

# Connect fails fast even when GATE_UPSTREAM_TIMEOUT is long: that one covers slow model loads.
CONNECT_TIMEOUT = 10.0
BLOCK = 64 * 1024

# What a broken upstream raises while the gate reads from it.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OSError, HTTPParseError, gevent.Timeout)


# What Upstream.open turns into the contract's errors (transport_error).
TRANSPORT_FAILURES: tuple[type[BaseException], ...] = (OSError, HTTPParseError)


def transport_error(exc: BaseException, url: str, what: str) -> Exception:
    """The contract's 502 or 504 for a transport failure (one of TRANSPORT_FAILURES).

    The message names the upstream ``url`` and the request (``what``), so an
    operator sees which server could not be reached.
    """
    if isinstance(exc, TimeoutError):  # socket.timeout: no bytes within GATE_UPSTREAM_TIMEOUT
        return UpstreamTimeout(f"upstream {url} sent no response in time ({what})")
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamUnavailable(f"upstream {url} unreachable ({what}): connection refused")
    return UpstreamUnavailable(f"upstream {url} connection failed ({what}): {describe(exc)}")


def display_url(url: str) -> str:
    """``url`` without the user and password it may carry: fit for logs and error messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc, query="", fragment="").geturl().rstrip("/")


def describe(exc: BaseException) -> str:
    """A short, readable reason for a transport failure."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno)).lower() + f" ({exc.strerror})"
    return (str(exc) or type(exc).__name__)[:200]


class UpstreamResponse:
    """An upstream response whose body has not been read yet."""

    def __init__(self, raw: HTTPSocketPoolResponse) -> None:
        self.raw = raw
        self.status: int = raw.status_code
        self.headers: list[tuple[str, str]] = header_lines(raw)
        # Read by the relay and by the client's headers alike.
        self.content_type: str | None = first_header(raw, "content-type")

    def header(self, name: str) -> str | None:
        """The first value of the header ``name`` (any case), None when it is absent."""
        return first_header(self.raw, name.lower())

    def records(self, sep: bytes | None) -> Iterator[bytes]:
        """The body as it arrives: whole ``sep``-terminated records, or blocks when sep is None.

        A record left without its separator when the body ends is yielded last; a
        body cut short raises from the transport (see TRANSPORT_ERRORS).
        """
        raw = self.raw
        if sep is None:
            while data := raw.read(BLOCK):
                yield data
            return
        # Records that arrived together leave in one write: readline() returns one, and
        # the complete ones already parsed behind it are taken from the parser's buffer.
        # A third of the CPU per relayed line when tokens come fast (docs/BENCHMARKS.md).
        buffered = read_ahead(raw)
        while line := raw.readline(sep):
            if buffered:
                cut = buffered.rfind(sep) + len(sep)
                if cut >= len(sep):
                    line += bytes(buffered[:cut])
                    del buffered[:cut]
            yield line
        # readline() stops short of a last record that lacks its separator.
        if rest := raw.read():
            yield rest

    @property
    def complete(self) -> bool:
        return bool(self.raw.message_complete)

    def release(self) -> None:
        """Return the connection to the pool, or close it when the body was not read to the end.

        A response released before its end closes its connection (the parser then
        says it cannot be reused; WatchedPool shuts it down at once), so Ollama sees
        the client go and stops generating.
        """
        self.raw.release()


class Upstream:
    """One Ollama server: a keep-alive connection pool sending the upstream's own Host header."""

    def __init__(
        self, url: str, *, timeout: float, concurrency: int = 10000, name: str | None = None
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        # The backend's name, sent to clients as X-Gate-Backend (None: not sent).
        self.name = name
        self.shown = display_url(url)
        self.prefix = parts.path.rstrip("/")
        # Ollama answers 403 to a foreign Host header: the client's Host is never
        # forwarded, so the client sends the upstream's own.
        self.client = HTTPClient.from_url(
            url,
            concurrency=concurrency,
            connection_timeout=min(CONNECT_TIMEOUT, timeout),
            network_timeout=timeout,
            block_size=BLOCK,
        )
        self.client.default_headers = Headers()  # add no User-Agent of our own
        self.pool: WatchedPool = watch_pool(self.client)

    def open(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | Iterable[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request and return the response with its body still unread."""
        try:
            with self.pool.lending():
                if body is None or isinstance(body, bytes):
                    raw = send(self.client, method, self.prefix + target, headers, body)
                else:  # a blob upload, sent on as it arrives
                    raw = self.client.request(
                        method, self.prefix + target, body=body, headers=headers
                    )
        except TRANSPORT_FAILURES as exc:
            # The one place transport errors become the contract's (a try, not a
            # generator-based context manager: this runs on every request).
            raise transport_error(exc, self.shown, f"{method} {target.partition('?')[0]}") from exc
        resp = UpstreamResponse(raw)
        if self.name is not None:
            resp.headers.append(("X-Gate-Backend", self.name))
        return resp

    def close(self) -> None:
        self.client.close()
