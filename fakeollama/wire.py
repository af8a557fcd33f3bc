"""What goes on the wire: JSON, NDJSON and SSE encodings, fake tokens and vectors, Host checks."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import re
from datetime import UTC, datetime
from typing import Any

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
EMBED_DIM = 8

_DURATION_RE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    None: 1.0,
}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def line(obj: Any) -> bytes:
    """One NDJSON line."""
    return dumps(obj) + b"\n"


def sse(obj: Any, event: str | None = None) -> bytes:
    """One server-sent event."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + dumps(obj) + b"\n\n"


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_iso() -> str:
    return iso(datetime.now(UTC))


def words(value: Any) -> int:
    """Whitespace-separated words in a prompt, a message content or a list of parts."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(words(item) for item in value)
    if isinstance(value, dict):
        # content parts ({"type": "text", "text": ...}), messages ({"content": ...})
        return words(value.get("text")) + words(value.get("content"))
    return 0


def token(i: int) -> str:
    """The i-th generated token (1-based)."""
    return f"tok{i} "


def text(n: int) -> str:
    """A whole answer of n tokens."""
    return "".join(token(i) for i in range(1, n + 1))


def vector(text: str, dim: int = EMBED_DIM) -> list[float]:
    """A deterministic, unit-length embedding of ``text``."""
    raw = b""
    seed = text.encode()
    while len(raw) < dim:
        seed = hashlib.sha256(seed).digest()
        raw += seed
    vals = [(b - 127.5) / 127.5 for b in raw[:dim]]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    return [round(v / norm, 6) for v in vals]


def duration(value: Any) -> float | None:
    """An Ollama ``keep_alive`` in seconds (a number of seconds or "5m", "0s", "-1"); None if absent
    or unreadable. Negative means "keep loaded forever"."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m is None:
            return None
        return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    return None


def is_zero_duration(value: Any) -> bool:
    """Whether an Ollama ``keep_alive`` means "unload now" (0, "0", "0s", "0m")."""
    return duration(value) == 0


@functools.lru_cache(maxsize=512)
def host_allowed(host: str) -> bool:
    """Ollama's ``allowedHostsMiddleware``: only local names and addresses may be the Host."""
    if host.startswith("["):
        end = host.find("]")
        name = host[1:end] if end > 0 else host
    elif host.count(":") == 1:
        name = host.rsplit(":", 1)[0]
    else:
        name = host
    name = name.lower()
    if name in ("", "localhost"):
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return name.endswith((".localhost", ".local", ".internal"))
    return addr.is_loopback or addr.is_private or addr.is_unspecified
