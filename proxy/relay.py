"""Relay an upstream response to the client as it arrives, never buffered whole."""

from __future__ import annotations

import functools
import json
import logging
import socket
import time
from collections.abc import Callable, Generator, Iterator

from flask import Flask

from errors import is_openai_path
from pipeline import Call, ClientDisconnected
from signals import call_finished

from .disconnect import ClientWatch
from .upstream import TRANSPORT_ERRORS, UpstreamResponse, describe

logger = logging.getLogger(__name__)

# Linux's; None elsewhere, where answers leave uncorked.
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)

# A non-streamed JSON answer is kept up to this size to read its token usage.
USAGE_BODY_MAX = 4 * 1024 * 1024


class UpstreamBroken(Exception):
    """The upstream failed mid-body where no error record can be written: drop the connection."""


@functools.lru_cache(maxsize=64)
def stream_kind(content_type: str | None) -> str | None:
    """'ndjson' or 'sse' for the streaming types whose failures get an error record, else None.

    Cached: the relay and the client's headers ask it of every answer, and an upstream
    answers with few content types (bounded all the same: the upstream sends them).
    """
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
    ``{"error": ...}`` record. However the response ends (finished, client gone,
    upstream failed, never iterated), ``close`` runs once: it releases the
    upstream connection, runs ``on_close`` (the work queue frees the slot) and
    sends ``call_finished``.
    """

    def __init__(
        self,
        app: Flask,
        resp: UpstreamResponse,
        watch: ClientWatch,
        call: Call,
        *,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.resp = resp
        self.watch = watch
        self.call = call
        content_type = resp.content_type
        self.kind = stream_kind(content_type)
        self.on_close = on_close
        # An answer without a body (to HEAD; 1xx, 204, 304) is whole once its headers are
        # out: werkzeug never iterates it.
        self.finished = (
            call.method == "HEAD" or 100 <= resp.status < 200 or resp.status in (204, 304)
        )
        self.closed = False
        # Token usage of a non-streamed answer is in its JSON body.
        self.keep_body = (
            self.kind is None
            and call.cls in ("inference", "embed")
            and "json" in (content_type or "")
        )
        self._gen: Generator[bytes, None, None] = self._run()
        self.corked = False
        # Without a Content-Length gunicorn sends the answer chunked, and writes its last
        # (empty) chunk after the body, before it calls close(): see _run.
        self.chunked = resp.header("content-length") is None

    def _cork(self, on: bool) -> None:
        """Hold back (``on``) or let out the client socket's partial segments (TCP_CORK).

        The head and the first piece of the answer then reach the client in one segment,
        which wakes it once, not twice; so do the last records of a chunked answer and
        its last chunk. A socket that is not TCP (a unix socket) is left as it is.
        """
        sock = self.watch.sock
        if sock is None or _TCP_CORK is None:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, int(on))
        except OSError:  # not TCP, or already closed
            return
        self.corked = on

    def __iter__(self) -> Iterator[bytes]:
        return self._gen

    def _run(self) -> Generator[bytes, None, None]:
        kind, call = self.kind, self.call
        sep = None if kind is None else b"\n" if kind == "ndjson" else b"\n\n"
        chunks = self.resp.records(sep)
        kept: list[bytes] = []
        kept_size = 0
        # gunicorn writes the response head and the first piece of the body in two sends:
        # corked, they leave together as one segment (see _cork); the cork stays on until
        # gunicorn asks for the next piece, or until close() for the end of a chunked answer.
        self._cork(True)
        try:
            while True:
                try:
                    with self.watch.armed():
                        chunk = next(chunks)
                except StopIteration:
                    break
                except ClientDisconnected:
                    call.outcome = "client_gone"
                    logger.info("client left during %s; upstream connection closed", call.path)
                    return
                except TRANSPORT_ERRORS as exc:
                    call.outcome = "upstream_error"
                    if kind is None:
                        raise UpstreamBroken(f"upstream failed mid-body on {call.path}") from exc
                    logger.warning("upstream failed mid-stream on %s: %s", call.path, exc)
                    yield error_record(
                        kind, call.path, f"upstream connection lost: {describe(exc)}"
                    )
                    return
                if kind is not None:
                    call.count_usage(chunk)
                elif self.keep_body and kept_size + len(chunk) <= USAGE_BODY_MAX:
                    kept.append(chunk)
                    kept_size += len(chunk)
                # Once the upstream's answer is all in, what is left of a chunked one leaves
                # without a wait: held back with gunicorn's last chunk until close().
                hold = self.chunked and self.resp.complete
                if hold and not self.corked:
                    self._cork(True)
                yield chunk
                if self.corked and not hold:
                    self._cork(False)  # the head and the first piece are written: out they go
            self.finished = True
            if kept:
                call.count_usage(b"".join(kept))
        except GeneratorExit:
            # gunicorn stops iterating when a write to the client fails: the client left.
            call.outcome = "client_gone"
            raise
        finally:
            if not (self.finished and self.corked):
                self._finish(ending=True)
            # else: an answer all in, held back (corked) for gunicorn's last chunk, which
            # gunicorn writes next and then calls close(): close() lets it all out first
            # and only then ends the call, so that what ending it costs (the slot, the
            # status page, the metrics) no longer delays the answer's end.

    def close(self) -> None:
        """Release everything this response holds; idempotent.

        The server calls it once the answer is written, its last chunk included: what
        the cork held back leaves now.
        """
        if self.corked:
            self._cork(False)
        self._finish()

    def _finish(self, *, ending: bool = False) -> None:
        """End the call: free the upstream connection and the slot, count it; once.

        ``ending``: called from within ``_run`` as it ends, which cannot close itself.
        """
        if self.closed:
            return
        self.closed = True
        if not ending:
            self._gen.close()
        if not self.finished and self.call.outcome == "ok":
            self.call.outcome = "client_gone"  # never iterated to the end by the server
        # Closes the upstream connection unless its body was read in full, so Ollama
        # sees a client that left and stops generating.
        self.resp.release()
        self.watch.stop()
        self.call.ended = time.monotonic()
        try:
            if self.on_close is not None:
                self.on_close()
        finally:
            # call_finished.send(self.app, call=self.call), less its check of each receiver
            # for a coroutine function (a few µs a call): the gate's receivers are plain.
            for receiver in call_finished.receivers_for(self.app):
                receiver(self.app, call=self.call)
