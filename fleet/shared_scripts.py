"""The fleet's slots shared through Redis: one atomic script per grant, release and sync.

Each gate places its own jobs (``FleetScheduler``); before a job starts on a backend it
takes a *grant* for that (backend, model) here. The grant script admits it only while the
backend runs fewer than the model's slots of it, fewer than ``max_models`` distinct models
(or the model already among them), and, where the backend has a ``vram`` budget, while
the sizes of its distinct models fit; and while no gate drains the backend for another
model (a switch due there); and while the job's client (its API key) runs fewer grants,
every gate's together, than its ``max_running`` (passed with the call). Every grant has
a lease, renewed by its gate's sync; a gate that dies stops renewing, and the next script
anywhere drops its grants.

Time is Redis's own (``TIME``); tests may pass ``now_ms``. docs/SHARED_QUEUE.md ("Several
backends") describes the keys and scripts. No gevent here: tests drive it directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import Backend

# Every key of the fleet's shared slots starts with this; tests use their own prefix.
KEY_PREFIX = "gate:fl:"

# ARGV[1] is now (ms, or '' for Redis's TIME), ARGV[2] the lease (ms); KEYS[1] the prefix.
_PRELUDE = r"""
local P = KEYS[1]
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local LEASE = tonumber(ARGV[2])

local function count_client(client, owner, n)
  -- Each client's running grants: every gate's (cr), and each gate's own (cro).
  if not client or client == '' then return end
  if redis.call('HINCRBY', P .. 'cr', client, n) <= 0 then
    redis.call('HDEL', P .. 'cr', client)
  end
  local key = owner .. '\t' .. client
  if redis.call('HINCRBY', P .. 'cro', key, n) <= 0 then
    redis.call('HDEL', P .. 'cro', key)
  end
end

local function elsewhere(client, owner)
  -- The client's running grants held by gates other than owner.
  if client == '' then return 0 end
  local all = tonumber(redis.call('HGET', P .. 'cr', client) or '0')
  local own = tonumber(redis.call('HGET', P .. 'cro', owner .. '\t' .. client) or '0')
  return all - own
end

local function drop(id)
  local f = redis.call('HMGET', P .. 'job:' .. id, 'b', 'm', 'c', 'o')
  local b = f[1]
  if b then
    redis.call('SREM', P .. 'on:' .. b, id)
    redis.call('HSET', P .. 'work:' .. b, f[2], now)
    count_client(f[3], f[4], -1)
  end
  redis.call('DEL', P .. 'job:' .. id)
  return redis.call('ZREM', P .. 'leases', id)
end

local function reap()
  -- Grants whose lease lapsed (their gate died or lost Redis) free their slots.
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now)) do
    drop(id)
    redis.call('HINCRBY', P .. 'stats', 'reaped', 1)
  end
end

local function usage(b, owner)
  -- Per model on backend b: jobs of every gate, jobs of gates other than owner, size.
  local count, others, sizes, n = {}, {}, {}, 0
  for _, id in ipairs(redis.call('SMEMBERS', P .. 'on:' .. b)) do
    local f = redis.call('HMGET', P .. 'job:' .. id, 'm', 'o', 's')
    local m = f[1]
    if m then
      if not count[m] then
        count[m], others[m], sizes[m], n = 0, 0, 0, n + 1
      end
      count[m] = count[m] + 1
      if f[2] ~= owner then others[m] = others[m] + 1 end
      local s = tonumber(f[3]) or 0
      if s > sizes[m] then sizes[m] = s end
    end
  end
  return count, others, sizes, n
end

local function flat(t)
  local out = {}
  for k, v in pairs(t) do
    if v > 0 then
      out[#out + 1] = k
      out[#out + 1] = v
    end
  end
  return out
end

local function drain_of(b)
  -- The model backend b is drained for and the gate that drains it (nil: none); a
  -- drain lapses a lease after its gate last renewed it.
  local d = redis.call('GET', P .. 'drain:' .. b)
  if not d then return nil end
  local model, by, expiry = string.match(d, '^(.*)\t(.*)\t(%d+)$')
  if not model or tonumber(expiry) <= now then
    redis.call('DEL', P .. 'drain:' .. b)
    return nil
  end
  return model, by
end

local function seen(b, owner)
  -- What owner's placement needs of backend b besides its own jobs: the jobs of other
  -- gates per model, the model another gate drains it for (''), ms since a model last
  -- took a new place there (-1: never).
  local _, others = usage(b, owner)
  local drain = ''
  local model, by = drain_of(b)
  if model and by ~= owner then drain = model end
  local slice = tonumber(redis.call('GET', P .. 'slice:' .. b) or '-1')
  local ago = -1
  if slice >= 0 then ago = math.max(0, now - slice) end
  return {flat(others), drain, ago}
end

local function add(id, b, m, owner, size, client)
  redis.call('HSET', P .. 'job:' .. id, 'b', b, 'm', m, 'o', owner, 's', size, 'c', client)
  redis.call('SADD', P .. 'on:' .. b, id)
  redis.call('ZADD', P .. 'leases', now + LEASE, id)
  count_client(client, owner, 1)
end
"""

# ARGV: 3 id, 4 backend, 5 model, 6 owner, 7 slots, 8 max_models, 9 size, 10 vram (''),
# 11 switch_after (ms), 12 client (''), 13 its running cap (''). Returns {granted (1/0),
# seen(backend), the client's running grants at other gates}. A backend that a gate
# drains for another model grants nothing; nor does any backend to a client whose running
# grants, every gate's together, are at its cap (its API key's max_running). A grant for
# a model not running there is a new place (slice:<b>) unless the model had a job start
# or end there within switch_after (it takes back its place, as a held model does in
# FleetScheduler).
_GRANT = (
    _PRELUDE
    + r"""
local id, b, m, owner = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local slots, max_models, size = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local client, cap = ARGV[12], ARGV[13]
reap()
local count, others, sizes, n = usage(b, owner)
local ok = 1
local drain = drain_of(b)
if redis.call('EXISTS', P .. 'job:' .. id) == 1 then
  ok = 1  -- granted already (a repeated call)
elseif cap ~= '' and client ~= ''
    and tonumber(redis.call('HGET', P .. 'cr', client) or '0') >= tonumber(cap) then
  ok = 0
  redis.call('HINCRBY', P .. 'stats', 'capped', 1)
elseif drain and drain ~= m then
  ok = 0
elseif (count[m] or 0) >= slots then
  ok = 0
elseif not count[m] and n >= max_models then
  ok = 0
elseif not count[m] and ARGV[10] ~= '' then
  local used = size
  for _, s in pairs(sizes) do used = used + s end
  if used > tonumber(ARGV[10]) then ok = 0 end
end
if ok == 1 and redis.call('EXISTS', P .. 'job:' .. id) == 0 then
  local worked = tonumber(redis.call('HGET', P .. 'work:' .. b, m) or '-1')
  if not count[m] and (worked < 0 or now - worked > tonumber(ARGV[11])) then
    redis.call('SET', P .. 'slice:' .. b, now)
  end
  redis.call('HSET', P .. 'work:' .. b, m, now)
  add(id, b, m, owner, size, client)
  redis.call('HINCRBY', P .. 'stats', 'granted', 1)
elseif ok == 0 then
  redis.call('HINCRBY', P .. 'stats', 'refused', 1)
end
return {ok, seen(b, owner), elsewhere(client, owner)}
"""
)

# ARGV: 3 id, 4 owner. Returns 1 if the grant was held, else 0. Wakes the other gates
# with jobs waiting (their wake lists) when a slot freed.
_RELEASE = (
    _PRELUDE
    + r"""
reap()
local held = drop(ARGV[3])
if held == 1 then
  redis.call('ZREMRANGEBYSCORE', P .. 'waiters', '-inf', now)
  for _, owner in ipairs(redis.call('ZRANGE', P .. 'waiters', 0, -1)) do
    if owner ~= ARGV[4] then
      redis.call('RPUSH', P .. 'wake:' .. owner, 1)
      redis.call('PEXPIRE', P .. 'wake:' .. owner, LEASE)
    end
  end
end
return held
"""
)

# ARGV: 3 owner, 4 '1' if it has jobs waiting, 5 n, then n × (id, backend, model, size,
# client) of the owner's running jobs, 6 + 5n k, then k × (backend, model) the owner's
# placement drains for, then every backend. Renews the owner's grants; a running job Redis
# does not know is counted again, whatever the slots and its client's cap say (it runs).
# An owner with jobs waiting is woken by releases for a lease. A drain is the first
# gate's until it ends it or stops renewing it (a lease). Returns {ids counted again, then
# seen(backend) of each, then {client, n, ...}: each client's running grants at other
# gates}.
_SYNC = (
    _PRELUDE
    + r"""
local owner, n = ARGV[3], tonumber(ARGV[5])
reap()
if ARGV[4] == '1' then
  redis.call('ZADD', P .. 'waiters', now + LEASE, owner)
else
  redis.call('ZREM', P .. 'waiters', owner)
end
local counted = {}
for i = 0, n - 1 do
  local base = 6 + i * 5
  local id = ARGV[base]
  if redis.call('EXISTS', P .. 'job:' .. id) == 1 then
    redis.call('ZADD', P .. 'leases', now + LEASE, id)
  else
    add(id, ARGV[base + 1], ARGV[base + 2], owner, tonumber(ARGV[base + 3]) or 0,
        ARGV[base + 4])
    counted[#counted + 1] = id
    redis.call('HINCRBY', P .. 'stats', 'counted_again', 1)
  end
end
local k = tonumber(ARGV[6 + n * 5])
local wants = {}
for i = 0, k - 1 do
  local base = 7 + n * 5 + i * 2
  wants[ARGV[base]] = ARGV[base + 1]
end
local out = {counted}
for i = 7 + n * 5 + k * 2, #ARGV do
  local b = ARGV[i]
  local key = P .. 'drain:' .. b
  local d, by = drain_of(b)
  if wants[b] then
    if not d or by == owner then
      redis.call('SET', key, wants[b] .. '\t' .. owner .. '\t' .. (now + LEASE))
    end
  elseif d and by == owner then
    redis.call('DEL', key)
  end
  out[#out + 1] = seen(b, owner)
end
local clients = {}
for _, client in ipairs(redis.call('HKEYS', P .. 'cr')) do
  clients[client] = elsewhere(client, owner)
end
out[#out + 1] = flat(clients)
return out
"""
)

# ARGV: 3.. the backends. Returns per backend {model, n, ...} of every gate's jobs.
_USAGE = (
    _PRELUDE
    + r"""
reap()
local out = {}
for i = 3, #ARGV do
  local count = usage(ARGV[i], '')
  out[#out + 1] = flat(count)
end
return out
"""
)


@dataclass(frozen=True)
class Seen:
    """What other gates do on one backend: their jobs per model, the model one of them
    drains it for, and seconds since a model last took a new place there."""

    others: dict[str, int]
    drain: str | None = None
    placed_ago: float | None = None


@dataclass(frozen=True)
class Synced:
    """The sync script's answer: ids counted again, what other gates do per backend, and
    each client's running grants at other gates (clients with none left out)."""

    counted: list[str]
    seen: dict[str, Seen]
    clients: dict[str, int] = field(default_factory=dict)


class FleetGrants:
    """Grants of (backend, model) slots kept in Redis, shared by every gate."""

    def __init__(self, client: Any, *, lease: float, prefix: str = KEY_PREFIX) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be above 0, not {lease!r}")
        self.client = client
        self.prefix = prefix
        self.lease = float(lease)
        self._lease_ms = str(int(self.lease * 1000))
        self._grant = client.register_script(_GRANT)
        self._release = client.register_script(_RELEASE)
        self._sync = client.register_script(_SYNC)
        self._usage = client.register_script(_USAGE)

    def _argv(self, now_ms: int | None, *extra: str) -> list[str]:
        return ["" if now_ms is None else str(now_ms), self._lease_ms, *extra]

    def grant(
        self,
        job_id: str,
        backend: Backend,
        model: str,
        owner: str,
        *,
        slots: int,
        size: int = 0,
        switch_after: float = 0.0,
        client: str = "",
        max_running: int | None = None,
        now_ms: int | None = None,
    ) -> tuple[bool, Seen, int]:
        """Take one of ``model``'s ``slots`` on ``backend`` for ``job_id`` if the backend's
        slots, ``max_models`` and ``vram`` allow it, no gate drains it for another model,
        and ``client`` runs fewer than ``max_running`` grants across every gate; return
        whether it was granted, what other gates do there, and how many grants of
        ``client`` other gates hold."""
        args = self._argv(
            now_ms,
            job_id,
            backend.name,
            model,
            owner,
            str(slots),
            str(backend.max_models),
            str(max(0, int(size))),
            "" if backend.vram is None else str(backend.vram),
            str(int(switch_after * 1000)),
            client,
            "" if max_running is None else str(max_running),
        )
        ok, seen, elsewhere = self._grant(keys=[self.prefix], args=args)
        return bool(int(ok)), _seen(seen), int(elsewhere)

    def release(self, job_id: str, owner: str = "", *, now_ms: int | None = None) -> bool:
        """Give a grant back; whether it was held (a repeated release does nothing).

        A release wakes the other owners with jobs waiting (``wake_key``).
        """
        args = self._argv(now_ms, job_id, owner)
        return bool(int(self._release(keys=[self.prefix], args=args)))

    def wake_key(self, owner: str) -> str:
        """The list a release pushes onto while ``owner`` has jobs waiting."""
        return f"{self.prefix}wake:{owner}"

    def sync(
        self,
        owner: str,
        running: Iterable[tuple[str, str, str, int, str]],
        backends: Sequence[str],
        *,
        waiting: bool = False,
        drains: Mapping[str, str] | None = None,
        now_ms: int | None = None,
    ) -> Synced:
        """Renew ``owner``'s grants (``running``: id, backend, model, size and client of
        each of its jobs that runs), count again those Redis lost, and read what other
        gates do on each of ``backends`` (every backend) and each client's grants there.
        While ``waiting``, releases by other owners wake ``owner``. ``drains``: the
        backends its placement drains for a model (a switch is due there); its drains
        elsewhere end."""
        jobs = [str(field) for job in running for field in job]
        flag = "1" if waiting else ""
        wanted = [field for item in sorted((drains or {}).items()) for field in item]
        args = self._argv(
            now_ms,
            owner,
            flag,
            str(len(jobs) // 5),
            *jobs,
            str(len(wanted) // 2),
            *wanted,
            *backends,
        )
        reply = self._sync(keys=[self.prefix], args=args)
        counted = [_text(job_id) for job_id in reply[0]]
        seen = {name: _seen(reply[1 + i]) for i, name in enumerate(backends)}
        return Synced(counted, seen, _counts(reply[1 + len(backends)]))

    def usage(
        self, backends: Sequence[str], *, now_ms: int | None = None
    ) -> dict[str, dict[str, int]]:
        """Every gate's running jobs per model on each of ``backends`` (lapsed ones dropped)."""
        reply = self._usage(keys=[self.prefix], args=self._argv(now_ms, *backends))
        return {name: _counts(reply[i]) for i, name in enumerate(backends)}

    def client_counts(self) -> dict[str, int]:
        """Each client's running grants, every gate's together (as the last script left
        them: a lapsed grant counts until a script drops it)."""
        raw = self.client.hgetall(self.prefix + "cr")
        return {_text(k): int(v) for k, v in raw.items()}

    def stats(self) -> dict[str, int]:
        """Counts kept in Redis: granted, refused (capped: for a client's running cap),
        reaped, counted_again."""
        raw = self.client.hgetall(self.prefix + "stats")
        return {_text(k): int(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _seen(reply: Any) -> Seen:
    others, drain, ago = reply
    drain = _text(drain)
    ago = int(ago)
    return Seen(_counts(others), drain or None, ago / 1000 if ago >= 0 else None)


def _counts(flat: Any) -> dict[str, int]:
    if not isinstance(flat, list):
        return {}
    return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
