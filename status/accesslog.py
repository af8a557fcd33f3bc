"""GATE_ACCESS_LOG: one line per request, written by the app when the call record ends.

A forwarded request is logged when its answer ends (the ``call_finished`` signal,
sent by the relay's close: streamed or not, whether the client stayed or left), a
request the gate refused when its error is rendered (``call_rejected``). A line
says when, who (the API key's name, else the client's address: the real one
behind GATE_TRUSTED_PROXIES), method, path (never the query), model, status, why
(outcome or refusal reason), queue wait, time to first byte, duration and tokens:
never a prompt, a header or a secret. ``text`` writes logfmt (``key=value``),
``json`` one JSON object a line; both go to stdout through the ``gate.access``
logger, as gunicorn's access log did. docs/STATUS.md, "Access log", has the fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from limiter.identity import client_address

logger = logging.getLogger("gate.access")

#: The fields of a line, in order. None is written as ``-`` (text) or null (json).
FIELDS = (
    "time",
    "client",
    "method",
    "path",
    "model",
    "status",
    "outcome",
    "reason",
    "wait",
    "ttfb",
    "duration",
    "tokens_in",
    "tokens_out",
)
#: Client-chosen strings (model, path, key name) are cut to this many characters.
MAX_FIELD = 200

_BARE = re.compile(r"[A-Za-z0-9_.:/@+\-,~%]+")


def install(fmt: str) -> AccessLog:
    """The access log in ``fmt`` ("text" or "json"), its handler on stdout set up once."""
    if not any(getattr(h, "gate_access", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.gate_access = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not again, with a prefix, in the error log
    return AccessLog(fmt)


class AccessLog:
    """Formats and writes the lines; ``record_*`` build them from what the gate knows."""

    def __init__(self, fmt: str) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"access log format must be text or json, not {fmt!r}")
        self.fmt = fmt

    def write(self, record: Mapping[str, Any]) -> None:
        logger.info("%s", self.format(record))

    def format(self, record: Mapping[str, Any]) -> str:
        names = [*FIELDS, *(name for name in record if name not in FIELDS)]
        if self.fmt == "json":
            fields = {name: record.get(name) for name in names}
            return json.dumps(fields, separators=(",", ":"), default=str)
        return " ".join(f"{name}={_text(record.get(name))}" for name in names)

    def call_finished(self, call: Any, wall: float | None = None) -> None:
        """A forwarded request's answer ended."""
        self.write(
            {
                "time": _time(wall),
                "client": who(call.client, getattr(call, "address", None)),
                "method": call.method,
                "path": _cut(call.path),
                "model": _cut(call.model),
                "status": call.status,
                "outcome": call.outcome,
                "reason": None,
                "wait": _seconds(call.waited),
                "ttfb": _seconds(call.ttfb),
                "duration": _seconds(call.duration),
                "tokens_in": call.prompt_tokens,
                "tokens_out": call.completion_tokens,
            }
        )

    def refused(
        self,
        *,
        status: int,
        reason: str,
        method: str,
        path: str,
        client: str,
        call: Any = None,
        duration: float | None = None,
        wall: float | None = None,
    ) -> None:
        """The gate answered a request with an error of its own."""
        self.write(
            {
                "time": _time(wall),
                "client": _cut(client),
                "method": method,
                "path": _cut(path),
                "model": _cut(call.model) if call is not None else None,
                "status": status,
                "outcome": "refused",
                "reason": reason,
                "wait": _seconds(call.waited) if call is not None else None,
                "ttfb": None,
                "duration": _seconds(duration),
                "tokens_in": 0,
                "tokens_out": 0,
            }
        )

    def fast_path(self, cls: str, count: int, wall: float | None = None) -> None:
        """``count`` 429s the limiter's fast path answered before the app saw them.

        Written once a second at most, as one line with a ``count``: a flood would
        otherwise cost a line per refusal, and the fast path exists to make those cheap.
        """
        self.write(
            {
                "time": _time(wall),
                "status": 429,
                "outcome": "refused",
                "reason": "rate_limit_exceeded",
                "count": count,
                "class": cls,
            }
        )


def who(client: str, address: str | None) -> str:
    """The API key's name, else the address (``client`` is the limiter's identity:
    a key name, or the address, IPv6 cut to its /64)."""
    if address and client == client_address(address):
        return _cut(address) or "-"
    return _cut(client) or "-"


def _time(wall: float | None) -> str:
    stamp = datetime.fromtimestamp(time.time() if wall is None else wall, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _cut(value: str | None) -> str | None:
    return None if value is None else value[:MAX_FIELD]


def _text(value: Any) -> str:
    """A logfmt value: bare when safe, else JSON-quoted (no spaces or newlines get in)."""
    if value is None:
        return "-"
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)
