"""The limit headers of a response, computed from plain numbers (no Flask, no storage).

Two families are written, as the contract asks:

- ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (Reset in epoch seconds, as
  GitHub and Flask-Limiter write it) for the one quota that binds the client now;
- the IETF draft's ``RateLimit-Policy`` (every quota: ``"inference-60s";q=60;w=60``)
  and ``RateLimit`` (what is left of each: ``"inference-60s";r=59;t=60``), as in
  draft-ietf-httpapi-ratelimit-headers-08 and later.

``Retry-After`` (delta seconds) goes on rejections only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

REQUESTS = "requests"
TOKENS = "tokens"


@dataclass(frozen=True)
class Quota:
    """One limit as it stands for one client: ``limit`` units per ``window`` seconds."""

    policy: str  # name shared by the two IETF headers, e.g. "inference-60s"
    limit: int
    window: int
    remaining: int
    reset: float  # epoch seconds: when an exhausted quota admits again, else when it refills
    unit: str = REQUESTS

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0


def policy_name(cls: str, window: int, taken: Sequence[str] = ()) -> str:
    """``inference-60s``; a suffix keeps two limits with the same window apart."""
    name = f"{cls}-{window}s"
    n = 2
    while name in taken:
        name = f"{cls}-{window}s-{n}"
        n += 1
    return name


def seconds_until(when: float, now: float) -> int:
    """Whole seconds from ``now`` until ``when``, rounded up, never negative."""
    return max(0, math.ceil(when - now))


def binding(quotas: Sequence[Quota]) -> Quota:
    """The quota the X-RateLimit-* headers describe.

    An exhausted quota first (the one that frees last: that is when the client may
    come back); otherwise the request quota with the fewest requests left (the
    shorter window on a tie); token budgets only when no request quota applies.
    """
    exhausted = [q for q in quotas if q.exhausted]
    if exhausted:
        return max(exhausted, key=lambda q: q.reset)
    requests = [q for q in quotas if q.unit == REQUESTS] or list(quotas)
    return min(requests, key=lambda q: (q.remaining, q.window))


def retry_after(quotas: Sequence[Quota], now: float) -> int:
    """Seconds until every exhausted quota admits again; at least 1."""
    exhausted = [q for q in quotas if q.exhausted] or [binding(quotas)]
    return max(1, max(seconds_until(q.reset, now) for q in exhausted))


def _item(name: str) -> str:
    # An sf-string: the names here are plain ASCII, but stay safe if that ever changes.
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def limit_headers(quotas: Sequence[Quota], now: float, *, rejected: bool) -> dict[str, str]:
    """All limit headers for a response; Retry-After only when the request was ``rejected``."""
    if not quotas:
        return {}
    top = binding(quotas)
    policies = []
    states = []
    for q in quotas:
        unit = "" if q.unit == REQUESTS else f';qu="{q.unit}"'
        policies.append(f"{_item(q.policy)};q={q.limit};w={q.window}{unit}")
        states.append(f"{_item(q.policy)};r={max(0, q.remaining)};t={seconds_until(q.reset, now)}")
    headers = {
        "X-RateLimit-Limit": str(top.limit),
        "X-RateLimit-Remaining": str(max(0, top.remaining)),
        "X-RateLimit-Reset": str(math.ceil(max(top.reset, now))),
        "RateLimit-Policy": ", ".join(policies),
        "RateLimit": ", ".join(states),
    }
    if rejected:
        headers["Retry-After"] = str(retry_after(quotas, now))
    return headers
