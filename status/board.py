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
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from workqueue.core import LaneSnapshot, QueueSnapshot

#: Seconds of history the charts show, one sample a second.
HISTORY_SECONDS = 900
#: Window of the per-minute rates.
RATE_SECONDS = 60
#: Window of the "recent" rejection counts.
RECENT_SECONDS = 900
#: The history's "wait" is the mean queue wait of the jobs that ended in this many seconds.
WAIT_SECONDS = 10
#: Names come from clients (a model in a request body, an address, a key name), so the
#: Board tracks at most this many of each; past the cap, new names are counted as OTHER
#: until a tracked one has been idle for LABEL_IDLE seconds and expires.
MAX_MODELS = 32
MAX_CLIENTS = 200
MAX_REASONS = 32
LABEL_IDLE = 120.0
#: What names past a cap are counted and shown as.
OTHER = "other"

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
        counts = self.current(now)
        counts[key] = counts.get(key, 0) + amount

    def current(self, now: float) -> dict[Key, float]:
        """The sums of the second ``now`` falls in, to add to (``add`` for several keys)."""
        second = int(now)
        if not self._buckets or self._buckets[-1][0] < second:
            self._buckets.append((second, {}))
            self._trim(second)
        return self._buckets[-1][1]

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


class Labels:
    """A bounded set of names from clients: the first ``cap`` are kept, the rest fold into OTHER.

    A name not seen for ``idle`` seconds expires and frees its place, so the set
    follows the names in use without ever growing past ``cap``.
    """

    def __init__(self, cap: int, idle: float = math.inf) -> None:
        self.cap = cap
        self.idle = idle
        self._seen: OrderedDict[str, float] = OrderedDict()  # least recently seen first
        #: No name expires before this time: ``expire`` has nothing to do until then. (At
        #: most the earliest time a name was last seen, plus ``idle``.)
        self.due = math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, name: object) -> bool:
        return name in self._seen

    def label(self, name: str, now: float, *, claim: bool = True) -> str:
        """``name`` if it holds (or now takes) a place, else OTHER.

        With ``claim`` false a name not yet held is counted as OTHER without taking a
        place (a model the upstream answered 404 for must not crowd out real ones).
        """
        seen = self._seen
        if name in seen:
            seen[name] = now
            seen.move_to_end(name)
        else:
            self.expire(now)
            if not claim or len(seen) >= self.cap:
                return OTHER
            seen[name] = now
        if now + self.idle < self.due:
            self.due = now + self.idle
        return name

    def expire(self, now: float) -> list[str]:
        """Drop the names not seen for ``idle`` seconds; return them."""
        if now < self.due:
            return []
        gone = []
        seen = self._seen
        while seen:
            name, last = next(iter(seen.items()))
            if last + self.idle > now:
                break
            del seen[name]
            gone.append(name)
        self.due = min(seen.values(), default=math.inf) + self.idle
        return gone


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


def names_a_model(status: int | None) -> bool:
    """Whether a call answered ``status`` may give its model a place among MAX_MODELS.

    Not when the upstream refused it (4xx: an unknown model is 404), so made-up
    names never crowd out the models in use; a call that got no answer may.
    """
    return status is None or not 400 <= status < 500


def _round(value: float | None, digits: int = 3) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


class Board:
    """Counts and history of one worker, fed by signals and a once-a-second sample."""

    def __init__(self, started_wall: float, started: float, *, mask_clients: bool = True) -> None:
        self.started_wall = started_wall
        self.started = started
        self.mask_clients = mask_clients
        # The names the counts below are kept under (see Labels): bounded whatever clients send.
        self.models = Labels(MAX_MODELS, LABEL_IDLE)
        self.clients = Labels(MAX_CLIENTS, LABEL_IDLE)
        self.reasons = Labels(MAX_REASONS)
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
        ok: bool = True,
    ) -> None:
        """A forwarded call ended (``queued``: an inference or embed job, queued per model;
        ``ok``: the upstream answered it, so its model may take one of MAX_MODELS places)."""
        self.requests += 1
        self.tokens_in += prompt_tokens
        self.tokens_out += completion_tokens
        if not queued or model is None:
            return
        model = self.models.label(model, now, claim=ok)
        who = self.clients.label(self.show_client(client), now)
        counts = self.rates.current(now)  # what Rolling.add does, for six keys at once
        key: Key = ("jobs", model)
        counts[key] = counts.get(key, 0) + 1
        key = ("waited", model)
        counts[key] = counts.get(key, 0) + waited
        key = ("cjobs", who)
        counts[key] = counts.get(key, 0) + 1
        tokens = prompt_tokens + completion_tokens
        if tokens:
            key = ("in", model)
            counts[key] = counts.get(key, 0) + prompt_tokens
            key = ("out", model)
            counts[key] = counts.get(key, 0) + completion_tokens
            key = ("ctokens", who)
            counts[key] = counts.get(key, 0) + tokens
        self._wait_sum += waited
        self._wait_count += 1

    def rejected(self, now: float, status: int, reason: str, count: int = 1) -> None:
        """The gate answered ``count`` requests with an error of its own."""
        reason = self.reasons.label(reason, now)
        self.total_rejections[(status, reason)] += count
        self.recent_rejections.add(now, (status, reason), count)

    def show_client(self, client: str) -> str:
        """A client as the page names it: masked (mask_client) unless masking is off."""
        return mask_client(client) if self.mask_clients else client.strip()[:64]

    def sample(self, wall: float, snapshot: QueueSnapshot | None) -> Sample:
        """Record one second of history from the work queue's snapshot (None: no queue)."""
        waiting = running = None
        oldest = None
        if snapshot is not None:
            waiting = snapshot["totals"]["waiting"]
            running = snapshot["totals"]["running"]
            oldest = max(
                (lane["oldest_wait"] for lane in _lanes(snapshot) if lane["waiting"]),
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
        snapshot: QueueSnapshot | None,
        upstream: Mapping[str, Any],
        worker: Mapping[str, Any],
        history: bool = True,
    ) -> dict[str, Any]:
        """The status.json document (its schema is docs/STATUS.md)."""
        rates = self.rates.totals(now)
        minutes = RATE_SECONDS / 60
        loaded = {m["name"]: m for m in upstream.get("loaded") or () if m.get("name")}

        rows: dict[str, dict[str, Any]] = {}
        lanes = snapshot["models"] if snapshot is not None else {}
        names = set(lanes) | set(loaded)
        names |= {key[1] for key in rates if key[0] == "jobs"}
        for name in names:
            lane = lanes.get(name)
            rows[name] = {
                **_lane(lane),
                "active": lane["active"] if lane else False,
                "draining": lane["draining"] if lane else False,
                "loaded": name in loaded,
                "jobs": rates[("jobs", name)],
                "in": rates[("in", name)],
                "out": rates[("out", name)],
                "waited": rates[("waited", name)],
            }
        models = {
            name: _model_row(row, minutes)
            for name, row in sorted(_fold(rows, MAX_MODELS, _model_weight, _fold_model).items())
        }

        clients: dict[str, dict[str, Any]] = {}
        for client, counts in (snapshot["clients"] if snapshot is not None else {}).items():
            entry = clients.setdefault(self.show_client(client), _client_entry())
            entry["waiting"] += counts["waiting"]
            entry["running"] += counts["running"]
        for key, value in rates.items():
            if key[0] in ("cjobs", "ctokens"):
                entry = clients.setdefault(key[1], _client_entry())
                field = "jobs_per_minute" if key[0] == "cjobs" else "tokens_per_minute"
                entry[field] = _round(entry[field] + value / minutes, 1)
        busiest = sorted(
            _fold(clients, MAX_CLIENTS, _client_weight, _fold_client).items(),
            key=lambda item: (item[0] == OTHER, _client_weight(item[1]), item[0]),
        )

        queue: dict[str, Any] | None = None
        if snapshot is not None:
            totals = snapshot["totals"]
            queue = {
                "running": totals["running"],
                "waiting": totals["waiting"],
                "oldest_wait": _round(
                    max((lane["oldest_wait"] for lane in _lanes(snapshot)), default=0.0)
                ),
                "admitted": totals["admitted"],
                "rejected": dict(totals["rejected"]),
                "active_models": list(totals["active_models"]),
                "max_active_models": totals["max_active_models"],
                "queue_max": totals["queue_max"],
                "queue_max_per_client": totals["queue_max_per_client"],
                "activations": totals["activations"],
                "forced_switches": totals["forced_switches"],
                "avg_seconds": _round(totals["avg_seconds"]),
                "switch": dict(snapshot["switch"]),
                "retry_after": _round(snapshot["retry_after"]),
                "closed": snapshot["closed"],
                "shared": snapshot["shared"],
                "fallback": snapshot["fallback"],
                "admin": _lane(snapshot["admin"]),
                "priorities": {
                    name: dict(row) for name, row in snapshot.get("priorities", {}).items()
                },
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


def _lane(lane: LaneSnapshot | None) -> dict[str, Any]:
    """The work queue's view of one lane; every field None when the queue has no such lane."""
    if not lane:
        out: dict[str, Any] = dict.fromkeys(_LANE_FIELDS)
        out.update(oldest_wait=None, avg_seconds=None, rejected={})
        return out
    return {
        "running": lane["running"],
        "slots": lane["slots"],
        "waiting": lane["waiting"],
        "clients_waiting": lane["clients_waiting"],
        "admitted": lane["admitted"],
        "oldest_wait": _round(lane["oldest_wait"]),
        "avg_seconds": _round(lane["avg_seconds"]),
        # Not counted per lane when the queue is shared through Redis.
        "rejected": dict(lane["rejected"] or {}),
    }


def _model_weight(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """Sort key of a model row: busy first, then the most jobs, then by name."""
    busy = (row["running"] or 0) + (row["waiting"] or 0)
    return (-busy, not row["active"], -row["jobs"], not row["loaded"])


def _fold_model(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row adding up ``rows`` (the models past MAX_MODELS)."""
    out: dict[str, Any] = {}
    for field in (*_LANE_FIELDS, "jobs", "in", "out", "waited"):
        values = [row[field] for row in rows if row.get(field) is not None]
        out[field] = sum(values) if values else None
    waits = [row["oldest_wait"] for row in rows if row.get("oldest_wait") is not None]
    out["oldest_wait"] = max(waits) if waits else None
    out["avg_seconds"] = None
    rejected: Counter[str] = Counter()
    for row in rows:
        rejected.update(row.get("rejected") or {})
    out["rejected"] = dict(rejected)
    for flag in ("active", "draining", "loaded"):
        out[flag] = any(row.get(flag) for row in rows)
    return out


def _model_row(row: Mapping[str, Any], minutes: float) -> dict[str, Any]:
    """A model's status.json entry from its lane and its rates over the last minute."""
    out = {key: value for key, value in row.items() if key not in ("jobs", "in", "out", "waited")}
    jobs, tokens_in, tokens_out = row["jobs"], row["in"], row["out"]
    if row["draining"]:
        state = "draining"
    elif row["active"]:
        state = "active"
    elif row["waiting"]:
        state = "waiting"
    else:
        state = "idle"
    out["state"] = state
    out["jobs_per_minute"] = _round(jobs / minutes, 1)
    out["tokens_per_minute"] = _round((tokens_in + tokens_out) / minutes, 1)
    out["tokens_in_per_minute"] = _round(tokens_in / minutes, 1)
    out["tokens_out_per_minute"] = _round(tokens_out / minutes, 1)
    out["wait_avg"] = _round(row["waited"] / jobs) if jobs else None
    return out


def _client_weight(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    return (-entry["running"] - entry["waiting"], -entry["jobs_per_minute"])


def _fold_client(entries: list[dict[str, Any]]) -> dict[str, Any]:
    out = _client_entry()
    for entry in entries:
        for field in out:
            out[field] += entry[field]
    out["jobs_per_minute"] = _round(out["jobs_per_minute"], 1)
    out["tokens_per_minute"] = _round(out["tokens_per_minute"], 1)
    return out


def _fold(
    rows: dict[str, dict[str, Any]],
    cap: int,
    weight: Any,
    fold: Any,
) -> dict[str, dict[str, Any]]:
    """At most ``cap`` rows plus OTHER: the heaviest by ``weight``, the rest added up."""
    named = [(name, row) for name, row in rows.items() if name != OTHER]
    if len(named) <= cap:
        return rows
    named.sort(key=lambda item: (weight(item[1]), item[0]))
    rest = [row for _, row in named[cap:]]
    if OTHER in rows:
        rest.append(rows[OTHER])
    return {**dict(named[:cap]), OTHER: fold(rest)}


def _lanes(snapshot: QueueSnapshot) -> Iterable[LaneSnapshot]:
    yield from snapshot["models"].values()
    yield snapshot["admin"]


def _client_entry() -> dict[str, Any]:
    return {"waiting": 0, "running": 0, "jobs_per_minute": 0.0, "tokens_per_minute": 0.0}


def _by_status(items: Iterable[tuple[Key, float]]) -> dict[str, dict[str, int]]:
    """{(429, "rate_limit_exceeded"): 3} as {"429": {"rate_limit_exceeded": 3}}."""
    out: dict[str, dict[str, int]] = {}
    for (status, reason), count in sorted(items, key=lambda item: str(item[0])):
        out.setdefault(str(status), {})[str(reason)] = int(count)
    return out
