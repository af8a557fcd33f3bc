"""The fleet's slots shared through Redis: one atomic script per grant, release and sync.

Each gate places its own jobs (``FleetScheduler``); before a job starts on a backend it
takes a *grant* for that (backend, model) here. The grant script admits it only while the
backend runs fewer than the model's slots of it, fewer than ``max_models`` distinct models
(or the model already among them), and, where the backend has a ``vram`` budget, while
the sizes of its distinct models fit. Every grant has a lease, renewed by its gate's
sync; a gate that dies stops renewing, and the next script anywhere drops its grants.

Time is Redis's own (``TIME``); tests may pass ``now_ms``. docs/SHARED_QUEUE.md ("Several
backends") describes the keys and scripts. No gevent here: tests drive it directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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

local function drop(id)
  local b = redis.call('HGET', P .. 'job:' .. id, 'b')
  if b then redis.call('SREM', P .. 'on:' .. b, id) end
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

local function add(id, b, m, owner, size)
  redis.call('HSET', P .. 'job:' .. id, 'b', b, 'm', m, 'o', owner, 's', size)
  redis.call('SADD', P .. 'on:' .. b, id)
  redis.call('ZADD', P .. 'leases', now + LEASE, id)
end
"""

# ARGV: 3 id, 4 backend, 5 model, 6 owner, 7 slots, 8 max_models, 9 size, 10 vram ('').
# Returns {granted (1/0), {model, n, ...} of the jobs other gates run on the backend}.
_GRANT = (
    _PRELUDE
    + r"""
local id, b, m, owner = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local slots, max_models, size = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
reap()
local count, others, sizes, n = usage(b, owner)
local ok = 1
if redis.call('EXISTS', P .. 'job:' .. id) == 1 then
  ok = 1  -- granted already (a repeated call)
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
  add(id, b, m, owner, size)
  redis.call('HINCRBY', P .. 'stats', 'granted', 1)
elseif ok == 0 then
  redis.call('HINCRBY', P .. 'stats', 'refused', 1)
end
return {ok, flat(others)}
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

# ARGV: 3 owner, 4 '1' if it has jobs waiting, 5 n, then n × (id, backend, model, size)
# of the owner's running jobs, then the backends to report. Renews the owner's grants; a
# running job Redis does not know is counted again, whatever the slots say (it runs). An
# owner with jobs waiting is woken by releases for a lease. Returns {ids counted again,
# then per backend reported {model, n, ...} of the jobs other gates run there}.
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
  local base = 6 + i * 4
  local id = ARGV[base]
  if redis.call('EXISTS', P .. 'job:' .. id) == 1 then
    redis.call('ZADD', P .. 'leases', now + LEASE, id)
  else
    add(id, ARGV[base + 1], ARGV[base + 2], owner, tonumber(ARGV[base + 3]) or 0)
    counted[#counted + 1] = id
    redis.call('HINCRBY', P .. 'stats', 'counted_again', 1)
  end
end
local out = {counted}
for i = 6 + n * 4, #ARGV do
  local _, others = usage(ARGV[i], owner)
  out[#out + 1] = flat(others)
end
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
class Synced:
    """The sync script's answer: ids counted again, and other gates' jobs per backend."""

    counted: list[str]
    others: dict[str, dict[str, int]]


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
        now_ms: int | None = None,
    ) -> tuple[bool, dict[str, int]]:
        """Take one of ``model``'s ``slots`` on ``backend`` for ``job_id`` if the backend's
        slots, ``max_models`` and ``vram`` allow it; return whether it was granted and the
        jobs other gates run there, per model."""
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
        )
        ok, others = self._grant(keys=[self.prefix], args=args)
        return bool(int(ok)), _counts(others)

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
        running: Iterable[tuple[str, str, str, int]],
        backends: Sequence[str],
        *,
        waiting: bool = False,
        now_ms: int | None = None,
    ) -> Synced:
        """Renew ``owner``'s grants (``running``: id, backend, model, size of each of its
        jobs that runs), count again those Redis lost, and read other gates' jobs on each
        of ``backends``. While ``waiting``, releases by other owners wake ``owner``."""
        jobs = [str(field) for job in running for field in job]
        flag = "1" if waiting else ""
        args = self._argv(now_ms, owner, flag, str(len(jobs) // 4), *jobs, *backends)
        reply = self._sync(keys=[self.prefix], args=args)
        counted = [_text(job_id) for job_id in reply[0]]
        return Synced(counted, {name: _counts(reply[1 + i]) for i, name in enumerate(backends)})

    def usage(
        self, backends: Sequence[str], *, now_ms: int | None = None
    ) -> dict[str, dict[str, int]]:
        """Every gate's running jobs per model on each of ``backends`` (lapsed ones dropped)."""
        reply = self._usage(keys=[self.prefix], args=self._argv(now_ms, *backends))
        return {name: _counts(reply[i]) for i, name in enumerate(backends)}

    def stats(self) -> dict[str, int]:
        """Counts kept in Redis: granted, refused, reaped, counted_again."""
        raw = self.client.hgetall(self.prefix + "stats")
        return {_text(k): int(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _counts(flat: Any) -> dict[str, int]:
    if not isinstance(flat, list):
        return {}
    return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
