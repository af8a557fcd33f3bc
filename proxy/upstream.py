"""The connection pool to Ollama and the one place transport errors become gate errors."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.response import BaseHTTPResponse

from errors import UpstreamTimeout, UpstreamUnavailable

logger = logging.getLogger(__name__)

# Connect fails fast even when GATE_UPSTREAM_TIMEOUT is long: that one covers slow model loads.
CONNECT_TIMEOUT = 10.0


@contextlib.contextmanager
def map_transport_errors(what: str) -> Iterator[None]:
    """Turn urllib3's exceptions into the contract's 502 and 504 (as httpx maps httpcore's)."""
    try:
        yield
    except ReadTimeoutError as exc:
        raise UpstreamTimeout(f"upstream sent no response in time ({what})") from exc
    except (NewConnectionError, ConnectTimeoutError) as exc:
        raise UpstreamUnavailable(f"upstream unreachable ({what}): {_reason(exc)}") from exc
    except (ProtocolError, HTTPError, OSError) as exc:
        raise UpstreamUnavailable(f"upstream connection failed ({what}): {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    inner = exc.__context__ if isinstance(exc, ProtocolError) and exc.__context__ else exc
    text = str(inner)
    # urllib3 prefixes the connection object's repr; keep the part a person can read.
    return text.split(": ", 1)[-1] if text.startswith("<") else text


class Upstream:
    """One Ollama server: a keep-alive connection pool sending the upstream's own Host header."""

    def __init__(self, url: str, *, timeout: float, maxsize: int = 1024) -> None:
        parts = urlsplit(url)
        self.url = url
        self.prefix = parts.path.rstrip("/")
        # Ollama answers 403 to a foreign Host header: urllib3 sends the pool's own host
        # because the client's Host is never forwarded.
        self.pool = urllib3.connection_from_url(
            url,
            maxsize=maxsize,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=min(CONNECT_TIMEOUT, timeout), read=timeout),
        )

    def open(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | Iterable[bytes] | None,
        *,
        chunked: bool = False,
    ) -> BaseHTTPResponse:
        """Send one request and return the response with its body still unread."""
        with map_transport_errors(f"{method} {target.partition('?')[0]}"):
            return self.pool.urlopen(
                method,
                self.prefix + target,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=False,
                release_conn=False,
                chunked=chunked,
            )

    def close(self) -> None:
        self.pool.close()
