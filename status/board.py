"""What the status page knows: rolling counts of finished and refused calls, a 15-minute history.

Pure logic, no Flask, no gevent, no clock of its own: every method takes ``now``
(``time.monotonic()`` seconds) so tests drive it with made-up times. The work
queue's snapshot and the upstream probe's state come in as plain data;
``Board.document`` combines them into the status.json document (docs/STATUS.md).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import re
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Seconds of history the charts show, one sample a second.
HISTORY_SECONDS = 900
#: Window of the per-minute rates.
RATE_SECONDS = 60
#: Window of the "recent" rejection counts.
RECENT_SECONDS = 900
#: The history's "wait" is the mean queue wait of the jobs that ended in this many seconds.
WAIT_SECONDS = 10
#: At most this many clients are listed (the busiest first), so a crowd keeps the page small.
MAX_CLIENTS = 200

SCHEMA_VERSION = 1


Key = tuple[Any, ...]


class Rolling:
    """Sums per key over the last ``span`` seconds, kept in one-second buckets.

    Adding is O(1) and memory is bounded by ``span`` buckets whatever the traffic,
    which a list of events would not be under a flood of 429s.
    """

    def __init__(self, span: int) -> None:
        self.span = span
        self._buckets: deque[tuple[int, dict[Key, float]]] = deque()

    def add(self, now: float, key: Key, amount: float = 1) -> None:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] < second:
            self._buckets.append((second, {}))
            self._trim(second)
        counts = self._buckets[-1][1]
        counts[key] = counts.get(key, 0) + amount

    def totals(self, now: float, span: int | None = None) -> defaultdict[Key, float]:
        """Sums per key over the last ``span`` seconds (all of the window by default)."""
        first = int(now) - (span or self.span)
        out: defaultdict[Key, float] = defaultdict(float)
        for second, counts in self._buckets:
            if second > first:
                for key, amount in counts.items():
                    out[key] += amount
        return out

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self.span:
            self._buckets.popleft()


@dataclass(frozen=True)
class Sample:
    """One second of history: queue depth and wait."""

    wall: float  # epoch seconds
    waiting: int | None  # None: no work queue
    running: int | None
    oldest_wait: float | None  # the longest current wait of any job, seconds
    wait: float | None  # mean queue wait of the jobs that ended in the last WAIT_SECONDS


@functools.lru_cache(maxsize=4096)
def mask_client(client: str) -> str:
    """A client as the page shows it: API key names as they are, addresses partly masked.

    IPv4 keeps its first three bytes (``203.0.113.x``); IPv6 keeps its /48
    (``2001:db8:1::/48``), IPv6 loopback stays ``::1``. A network such as the
    limiter's ``2001:db8::/64`` is cut to its /48 too.
    """
    text = client.strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if isinstance(ip, ipaddress.IPv4Address):
            return ".".join(str(ip).split(".")[:3]) + ".x"
        if ip.is_loopback:
            return str(ip)
        return str(ipaddress.IPv6Network((ip, 48), strict=False))
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            pass
        else:
            if isinstance(net, ipaddress.IPv4Network):
                return mask_client(str(net.network_address)) if net.prefixlen >= 24 else str(net)
            if net.prefixlen > 48:
                return str(net.supernet(new_prefix=48))
            return str(net)
    return text[:64]


_WORDS = re.compile(r"[^a-z0-9]+")


def reason_of(error: Any) -> tuple[int, str]:
    """(status, reason) of an error the gate answered itself.

    A GateError carries both (``status`` and its ``code``, e.g. 429 and
    ``rate_limit_exceeded``); a werkzeug HTTPException has an int ``code`` and a
    ``name`` ("Method Not Allowed" becomes ``method_not_allowed``).
    """
    status = getattr(error, "status", None)
    code = getattr(error, "code", None)
    if isinstance(status, int):
        reason = code if isinstance(code, str) and code else type(error).__name__
        return status, reason
    if isinstance(code, int):
        name = str(getattr(error, "name", "") or type(error).__name__)
        return code, _WORDS.sub("_", name.lower()).strip("_") or "error"
    return 500, type(error).__name__


def _round(value: float | None, digits: int = 3) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


class Board:
    """Counts and history of one worker, fed by signals and a once-a-second sample."""

    def __init__(self, started_wall: float, started: float) -> None:
        self.started_wall = started_wall
        self.started = started
        # ("jobs"|"in"|"out"|"wait"|"waited", model) and ("cjobs"|"ctokens", client)
        self.rates = Rolling(RATE_SECONDS)
        self.recent_rejections = Rolling(RECENT_SECONDS)
        self.total_rejections: Counter[Key] = Counter()
        self.requests = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.history: deque[Sample] = deque(maxlen=HISTORY_SECONDS)
        self._wait_sum = 0.0
        self._wait_count = 0
        # (sum, count) of the queue waits of the jobs that ended in each of the last samples
        self._recent_waits: deque[tuple[float, int]] = deque(maxlen=WAIT_SECONDS)

    # What happened

    def finished(
        self,
        now: float,
        *,
        model: str | None,
        client: str,
        queued: bool,
        waited: float,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """A forwarded call ended (``queued``: an inference or embed job, queued per model)."""
        self.requests += 1
        self.tokens_in += prompt_tokens
        self.tokens_out += completion_tokens
        if not queued or model is None:
            return
        tokens = prompt_tokens + completion_tokens
        who = mask_client(client)
        rates = self.rates
        rates.add(now, ("jobs", model))
        rates.add(now, ("waited", model), waited)
        rates.add(now, ("cjobs", who))
        if tokens:
            rates.add(now, ("in", model), prompt_tokens)
            rates.add(now, ("out", model), completion_tokens)
            rates.add(now, ("ctokens", who), tokens)
        self._wait_sum += waited
        self._wait_count += 1

    def rejected(self, now: float, status: int, reason: str, count: int = 1) -> None:
        """The gate answered ``count`` requests with an error of its own."""
        self.total_rejections[(status, reason)] += count
        self.recent_rejections.add(now, (status, reason), count)

    def sample(self, wall: float, snapshot: Mapping[str, Any] | None) -> Sample:
        """Record one second of history from the work queue's snapshot (None: no queue)."""
        waiting = running = None
        oldest = None
        if snapshot is not None:
            totals = snapshot.get("totals", {})
            waiting = int(totals.get("waiting", 0))
            running = int(totals.get("running", 0))
            oldest = max(
                (
                    float(lane.get("oldest_wait") or 0.0)
                    for lane in _lanes(snapshot)
                    if lane.get("waiting")
                ),
                default=0.0,
            )
        self._recent_waits.append((self._wait_sum, self._wait_count))
        self._wait_sum, self._wait_count = 0.0, 0
        count = sum(n for _, n in self._recent_waits)
        wait = sum(total for total, _ in self._recent_waits) / count if count else None
        sample = Sample(wall, waiting, running, oldest, wait)
        self.history.append(sample)
        return sample

    # What the page shows

    def document(
        self,
        now: float,
        wall: float,
        *,
        snapshot: Mapping[str, Any] | None,
        upstream: Mapping[str, Any],
        worker: Mapping[str, Any],
        history: bool = True,
    ) -> dict[str, Any]:
        """The status.json document (its schema is docs/STATUS.md)."""
        rates = self.rates.totals(now)
        minutes = RATE_SECONDS / 60
        loaded = {m["name"]: m for m in upstream.get("loaded") or () if m.get("name")}

        models: dict[str, dict[str, Any]] = {}
        lanes = (snapshot or {}).get("models") or {}
        names = set(lanes) | set(loaded)
        names |= {key[1] for key in rates if key[0] == "jobs"}
        for name in sorted(names):
            lane = lanes.get(name)
            jobs = rates[("jobs", name)]
            tokens_in, tokens_out = rates[("in", name)], rates[("out", name)]
            models[name] = {
                **_lane(lane),
                "active": bool(lane.get("active")) if lane else False,
                "draining": bool(lane.get("draining")) if lane else False,
                "loaded": name in loaded,
                "jobs_per_minute": _round(jobs / minutes, 1),
                "tokens_per_minute": _round((tokens_in + tokens_out) / minutes, 1),
                "tokens_in_per_minute": _round(tokens_in / minutes, 1),
                "tokens_out_per_minute": _round(tokens_out / minutes, 1),
                "wait_avg": _round(rates[("waited", name)] / jobs) if jobs else None,
            }

        clients: dict[str, dict[str, Any]] = {}
        for client, counts in ((snapshot or {}).get("clients") or {}).items():
            entry = clients.setdefault(mask_client(client), _client_entry())
            entry["waiting"] += int(counts.get("waiting", 0))
            entry["running"] += int(counts.get("running", 0))
        for key, value in rates.items():
            if key[0] in ("cjobs", "ctokens"):
                entry = clients.setdefault(key[1], _client_entry())
                field = "jobs_per_minute" if key[0] == "cjobs" else "tokens_per_minute"
                entry[field] = _round(value / minutes, 1)
        busiest = sorted(
            clients.items(),
            key=lambda item: (-item[1]["running"] - item[1]["waiting"], item[0]),
        )[:MAX_CLIENTS]

        totals = (snapshot or {}).get("totals") or {}
        queue: dict[str, Any] | None = None
        if snapshot is not None:
            queue = {
                "running": int(totals.get("running", 0)),
                "waiting": int(totals.get("waiting", 0)),
                "oldest_wait": _round(
                    max(
                        (float(lane.get("oldest_wait") or 0) for lane in _lanes(snapshot)),
                        default=0.0,
                    )
                ),
                "admitted": int(totals.get("admitted", 0)),
                "rejected": dict(totals.get("rejected") or {}),
                "active_models": list(totals.get("active_models") or []),
                "max_active_models": totals.get("max_active_models"),
                "queue_max": totals.get("queue_max"),
                "queue_max_per_client": totals.get("queue_max_per_client"),
                "activations": totals.get("activations"),
                "forced_switches": totals.get("forced_switches"),
                "avg_seconds": _round(totals.get("avg_seconds")),
                "switch": dict(snapshot.get("switch") or {}),
                "retry_after": _round(snapshot.get("retry_after")),
                "closed": bool(snapshot.get("closed", False)),
                "admin": _lane(snapshot.get("admin")),
            }

        all_jobs = sum(v for k, v in rates.items() if k[0] == "jobs")
        all_tokens = sum(v for k, v in rates.items() if k[0] in ("in", "out"))
        doc: dict[str, Any] = {
            "version": SCHEMA_VERSION,
            "generated": round(wall, 3),
            "worker": dict(worker),
            "upstream": dict(upstream),
            "queue": queue,
            "models": models,
            "clients": dict(busiest),
            "rates": {
                "window": RATE_SECONDS,
                "jobs_per_minute": _round(all_jobs / minutes, 1),
                "tokens_per_minute": _round(all_tokens / minutes, 1),
            },
            "totals": {
                "requests": self.requests,
                "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out,
            },
            "rejections": {
                "window": RECENT_SECONDS,
                "recent": _by_status(self.recent_rejections.totals(now).items()),
                "total": _by_status(self.total_rejections.items()),
            },
        }
        if history:
            doc["history"] = self.history_document()
        return doc

    def history_document(self) -> dict[str, Any]:
        """The history as columns, oldest first: compact for 900 samples."""
        samples = list(self.history)
        return {
            "interval": 1,
            "window": HISTORY_SECONDS,
            "t": [round(s.wall, 1) for s in samples],
            "waiting": [s.waiting for s in samples],
            "running": [s.running for s in samples],
            "oldest_wait": [_round(s.oldest_wait, 2) for s in samples],
            "wait": [_round(s.wait, 2) for s in samples],
        }


_LANE_FIELDS = ("running", "slots", "waiting", "clients_waiting", "admitted")


def _lane(lane: Mapping[str, Any] | None) -> dict[str, Any]:
    """The work queue's view of one lane; every field None when the queue has no such lane."""
    if not lane:
        out: dict[str, Any] = dict.fromkeys(_LANE_FIELDS)
        out.update(oldest_wait=None, avg_seconds=None, rejected={})
        return out
    out = {name: lane.get(name) for name in _LANE_FIELDS}
    out["oldest_wait"] = _round(lane.get("oldest_wait"))
    out["avg_seconds"] = _round(lane.get("avg_seconds"))
    out["rejected"] = dict(lane.get("rejected") or {})
    return out


def _lanes(snapshot: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    yield from (snapshot.get("models") or {}).values()
    if snapshot.get("admin"):
        yield snapshot["admin"]


def _client_entry() -> dict[str, Any]:
    return {"waiting": 0, "running": 0, "jobs_per_minute": 0.0, "tokens_per_minute": 0.0}


def _by_status(items: Iterable[tuple[Key, float]]) -> dict[str, dict[str, int]]:
    """{(429, "rate_limit_exceeded"): 3} as {"429": {"rate_limit_exceeded": 3}}."""
    out: dict[str, dict[str, int]] = {}
    for (status, reason), count in sorted(items, key=lambda item: str(item[0])):
        out.setdefault(str(status), {})[str(reason)] = int(count)
    return out
