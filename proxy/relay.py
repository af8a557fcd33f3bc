"""Relay an upstream response to the client chunk by chunk, never buffered whole."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Generator, Iterator

from errors import is_openai_path

from .disconnect import ClientDisconnected, ClientWatch
from .upstream import TRANSPORT_ERRORS, UpstreamResponse, describe

logger = logging.getLogger(__name__)


class UpstreamBroken(Exception):
    """The upstream failed mid-body where no error record can be written: drop the connection."""


def stream_kind(content_type: str | None) -> str | None:
    """'ndjson' or 'sse' for the streaming types whose failures get an error record, else None."""
    mime = (content_type or "").partition(";")[0].strip().lower()
    if mime == "application/x-ndjson":
        return "ndjson"
    if mime == "text/event-stream":
        return "sse"
    return None


def error_record(kind: str, path: str, message: str) -> bytes:
    """The last record of a stream that broke: ollama.ResponseError / openai.APIError see it."""
    if kind == "ndjson":
        return json.dumps({"error": message}).encode() + b"\n"
    if path.startswith("/v1/messages"):  # Anthropic's stream error event
        event = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    if is_openai_path(path):
        data: object = {
            "error": {"message": message, "type": "api_error", "param": None, "code": None}
        }
    else:
        data = {"error": message}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class Relay:
    """The body of one upstream response as a WSGI iterable that always releases the upstream.

    NDJSON and SSE bodies are passed on in whole records (lines, events) as they
    arrive, so that a stream cut short can still end with a well-formed
    ``{"error": ...}`` record. ``on_record`` sees every batch of complete records
    (token accounting reads the last one); ``on_close`` runs once, however the
    response ends: finished, client gone, upstream failed, or never iterated.
    """

    def __init__(
        self,
        resp: UpstreamResponse,
        watch: ClientWatch,
        path: str,
        *,
        on_record: Callable[[bytes], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.resp = resp
        self.watch = watch
        self.path = path
        self.kind = stream_kind(resp.header("content-type"))
        self.on_record = on_record
        self.on_close = on_close
        self.finished = False
        self.closed = False
        self._gen: Generator[bytes, None, None] = self._run()

    def __iter__(self) -> Iterator[bytes]:
        return self._gen

    def _run(self) -> Generator[bytes, None, None]:
        kind, path = self.kind, self.path
        sep = None if kind is None else b"\n" if kind == "ndjson" else b"\n\n"
        chunks = self.resp.records(sep)
        try:
            while True:
                try:
                    with self.watch.armed():
                        chunk = next(chunks)
                except StopIteration:
                    break
                except ClientDisconnected:
                    logger.info("client left during %s; upstream connection closed", path)
                    return
                except TRANSPORT_ERRORS as exc:
                    if kind is None:
                        raise UpstreamBroken(f"upstream failed mid-body on {path}: {exc}") from exc
                    logger.warning("upstream failed mid-stream on %s: %s", path, exc)
                    yield error_record(kind, path, f"upstream connection lost: {describe(exc)}")
                    return
                if self.on_record is not None and kind is not None:
                    self.on_record(chunk)
                yield chunk
            self.finished = True
        finally:
            self.close()

    def close(self) -> None:
        """Release the upstream connection; close it at once unless the body was read in full."""
        if self.closed:
            return
        self.closed = True
        try:
            self._gen.close()
        except ValueError:  # "generator already executing": close() called from within _run
            pass
        # Closes the upstream connection unless its body was read in full (client gone,
        # upstream broken, body never iterated).
        self.resp.release()
        self.watch.stop()
        if self.on_close is not None:
            self.on_close()
