"""The work queue's rules as Lua scripts on one Redis: shared by every worker and host.

``RedisScheduler`` applies the rules of ``core.Scheduler`` to state kept in Redis, each
event one atomic script, so gates on many hosts admit jobs as if they were one. It does
no waiting itself (``shared.SharedWorkQueue`` does, with gevent); tests drive it
directly against a real redis-server.

Time is Redis's own (``TIME`` inside the scripts), so hosts' clocks never disagree
about leases or waits; tests may pass ``now_ms`` instead. Keys are built inside the
scripts, so this needs one Redis (or a primary), not Redis Cluster. docs/SHARED_QUEUE.md
describes the keys and scripts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from endpoints import normalize_model

from .core import (
    DEFAULT_AGING,
    DEFAULT_PRIORITY,
    PRIORITIES,
    REASONS,
    ClassSnapshot,
    ClientSnapshot,
    LaneSnapshot,
    QueueSnapshot,
    estimate_wait,
    priority_rank,
)

# Every key of the work queue starts with this; tests use their own prefix.
KEY_PREFIX = "gate:wq:"
# A lease renewed every LEASE / 3 seconds survives two missed renewals.
DEFAULT_LEASE = 15.0

# Shared helpers. ARGV[1..8] are the same for every script (see RedisScheduler._argv);
# KEYS[1] is the key prefix. Lanes are "m:<model>" or "a" (the admin lane); a job's class
# ('pri') is its rank in core.PRIORITIES: '0' interactive, '1' normal, '2' batch.
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
local CONC = tonumber(ARGV[3])
local MAX_ACTIVE = tonumber(ARGV[4])
local ADMIN_SLOTS = tonumber(ARGV[5])
local SWITCH_AFTER = tonumber(ARGV[6])
local OVERRIDES = {}
for model, n in string.gmatch(ARGV[7], '([^\t\n]+)\t(%d+)') do
  OVERRIDES['m:' .. model] = tonumber(n)
end
local AGING = tonumber(ARGV[8])
local FACTORS = {0.5, 1.0, 2.0}  -- core.SWITCH_FACTORS, by class

local function line(lane, pri, client)
  -- One client's waiting jobs of one class in one lane, in arrival order.
  return P .. 'cq:' .. lane .. '\0' .. pri .. '\0' .. client
end

local function slots(lane)
  if lane == 'a' then return ADMIN_SLOTS end
  return OVERRIDES[lane] or CONC
end

local function may_run(client)
  -- Whether one more job of client may start (its API key's max_running, if any).
  local cap = redis.call('HGET', P .. 'cap', client)
  if not cap then return true end
  return tonumber(redis.call('HGET', P .. 'cr', client) or '0') < tonumber(cap)
end

local function oldest_ready(lane, pri)
  -- The lane's oldest waiting job (of class pri; of any when pri is nil) whose client may
  -- run one more, and its seq; nil when there is none.
  local key = P .. 'q:' .. lane
  if pri then key = P .. 'qc:' .. lane .. ':' .. pri end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  if may_run(redis.call('HGET', P .. 'job:' .. first[1], 'client')) then
    return first[1], tonumber(first[2])
  end
  local best, best_seq = nil, nil
  for p = pri or 0, pri or 2 do
    for _, client in ipairs(redis.call('LRANGE', P .. 'turns:' .. lane .. ':' .. p, 0, -1)) do
      if may_run(client) then
        local id = redis.call('LINDEX', line(lane, p, client), 0)
        local seq = tonumber(redis.call('ZSCORE', P .. 'q:' .. lane, id))
        if not best_seq or seq < best_seq then best, best_seq = id, seq end
      end
    end
  end
  return best, best_seq
end

local function due(lane)
  -- When the lane may force a switch (core.switch_due): each class's oldest job's switch
  -- clock, and the lane counts as interactive once its oldest job has waited AGING. Jobs
  -- of clients at their running cap count for none of it.
  local slice = tonumber(redis.call('GET', P .. 'slice') or '0')
  local best, first = math.huge, nil
  for pri = 0, 2 do
    local id = oldest_ready(lane, pri)
    if id then
      local sub = tonumber(redis.call('HGET', P .. 'job:' .. id, 'sub'))
      best = math.min(best, math.max(sub, slice) + SWITCH_AFTER * FACTORS[pri + 1])
      if not first or sub < first then first = sub end
    end
  end
  if first then
    local top = math.max(first, slice) + SWITCH_AFTER * FACTORS[1]
    best = math.min(best, math.max(first + AGING, top))
  end
  return best
end

local function next_model()
  -- The model lane without a place whose switch falls due first (ties: its oldest job
  -- whose client may run one more).
  local queued = redis.call('ZRANGE', P .. 'queued', 0, -1)
  local best, best_due, best_seq = nil, nil, nil
  for _, lane in ipairs(queued) do
    if redis.call('SISMEMBER', P .. 'active', lane) == 0 then
      local id, seq = oldest_ready(lane, nil)
      if id then
        local d = due(lane)
        if not best or d < best_due or (d == best_due and seq < best_seq) then
          best, best_due, best_seq = lane, d, seq
        end
      end
    end
  end
  return best, best_due
end

local function switch_target()
  -- A free place needs no switch (core.Scheduler._switch_due).
  if redis.call('SCARD', P .. 'active') < MAX_ACTIVE then return nil end
  local lane, d = next_model()
  if lane and d <= now then return lane end
  return nil
end

local function refresh_queued(lane)
  if lane == 'a' then return end
  local first = redis.call('ZRANGE', P .. 'q:' .. lane, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', P .. 'queued', lane)
  else
    redis.call('ZADD', P .. 'queued', first[2], lane)
  end
end

local function enqueue(id, lane, client, pri, seq)
  redis.call('ZADD', P .. 'wait', seq, id)
  redis.call('ZADD', P .. 'q:' .. lane, seq, id)
  redis.call('ZADD', P .. 'qc:' .. lane .. ':' .. pri, seq, id)
  if redis.call('RPUSH', line(lane, pri, client), id) == 1 then
    -- The client's next job of its class: its aging clock starts now.
    redis.call('RPUSH', P .. 'turns:' .. lane .. ':' .. pri, client)
    redis.call('HSET', P .. 'job:' .. id, 'front', now)
    redis.call('ZADD', P .. 'fronts:' .. lane, redis.call('INCR', P .. 'fseq'), id)
  end
  refresh_queued(lane)
  redis.call('HINCRBY', P .. 'cw', client, 1)
  redis.call('HINCRBY', P .. 'pc', 'w' .. pri, 1)
end

local function dequeue(id, lane, client, pri, take)
  -- take: the job starts, so its client's turn in its class goes to the end.
  redis.call('ZREM', P .. 'wait', id)
  redis.call('ZREM', P .. 'q:' .. lane, id)
  redis.call('ZREM', P .. 'qc:' .. lane .. ':' .. pri, id)
  local cq = line(lane, pri, client)
  redis.call('LREM', cq, 1, id)
  local turns = P .. 'turns:' .. lane .. ':' .. pri
  if redis.call('LLEN', cq) == 0 then
    redis.call('LREM', turns, 0, client)
  elseif take then
    redis.call('LREM', turns, 1, client)
    redis.call('RPUSH', turns, client)
  end
  if redis.call('ZREM', P .. 'fronts:' .. lane, id) == 1 then
    local nxt = redis.call('LINDEX', cq, 0)
    if nxt then
      redis.call('HSET', P .. 'job:' .. nxt, 'front', now)
      redis.call('ZADD', P .. 'fronts:' .. lane, redis.call('INCR', P .. 'fseq'), nxt)
    end
  end
  refresh_queued(lane)
  if redis.call('HINCRBY', P .. 'cw', client, -1) <= 0 then
    redis.call('HDEL', P .. 'cw', client)
  end
  redis.call('HINCRBY', P .. 'pc', 'w' .. pri, -1)
end

local function pick(lane)
  -- The job to start next: the front job that aged first, else the highest class's
  -- next client in turn (core.LaneQueue.pick). A client at its running cap is passed
  -- over and keeps its place.
  for _, id in ipairs(redis.call('ZRANGE', P .. 'fronts:' .. lane, 0, -1)) do
    local fields = redis.call('HMGET', P .. 'job:' .. id, 'front', 'client')
    if tonumber(fields[1]) + AGING > now then break end
    if may_run(fields[2]) then return id end
  end
  for pri = 0, 2 do
    for _, client in ipairs(redis.call('LRANGE', P .. 'turns:' .. lane .. ':' .. pri, 0, -1)) do
      if may_run(client) then return redis.call('LINDEX', line(lane, pri, client), 0) end
    end
  end
  return nil
end

local function start(id, lane, notify)
  local job = P .. 'job:' .. id
  redis.call('HSET', job, 'state', 'r')
  redis.call('HINCRBY', P .. 'cr', redis.call('HGET', job, 'client'), 1)
  redis.call('HINCRBY', P .. 'pc', 'r' .. (redis.call('HGET', job, 'pri') or '1'), 1)
  redis.call('SADD', P .. 'run:' .. lane, id)
  if lane ~= 'a' and redis.call('SADD', P .. 'active', lane) == 1 then
    redis.call('HSET', P .. 'placed', lane, redis.call('INCR', P .. 'pseq'))
  end
  redis.call('ZADD', P .. 'leases', now + LEASE, id)
  redis.call('HINCRBY', P .. 'stats', 'admitted', 1)
  if notify then
    local wake = P .. 'wake:' .. redis.call('HGET', job, 'owner')
    redis.call('RPUSH', wake, id)
    redis.call('PEXPIRE', wake, LEASE)
  end
end

local function fill(lane)
  -- Start lane's waiting jobs up to its slots: aged front jobs, then by class, clients
  -- in turn within a class.
  while redis.call('SCARD', P .. 'run:' .. lane) < slots(lane) do
    local id = pick(lane)
    if not id then return end
    local fields = redis.call('HMGET', P .. 'job:' .. id, 'client', 'pri')
    dequeue(id, lane, fields[1], fields[2], true)
    start(id, lane, true)
  end
end

local function placed()
  -- The model lanes holding a place, in the order they took it (core.Scheduler._active):
  -- a set's members come in hash order.
  local lanes = redis.call('SMEMBERS', P .. 'active')
  local order = {}
  for _, lane in ipairs(lanes) do
    order[lane] = tonumber(redis.call('HGET', P .. 'placed', lane) or '0')
  end
  table.sort(lanes, function(a, b)
    if order[a] ~= order[b] then return order[a] < order[b] end
    return a < b
  end)
  return lanes
end

local function pump()
  fill('a')
  while true do
    local target = switch_target()
    if not target then
      -- Affinity: running models take their own waiting jobs first, in the order they
      -- took their places (a capped client's next job may be in more than one).
      for _, lane in ipairs(placed()) do fill(lane) end
    end
    -- A model holds its place while it has running jobs (kept through the fill above,
    -- so a model that just drained takes its own waiting jobs before any other model).
    for _, lane in ipairs(redis.call('SMEMBERS', P .. 'active')) do
      if redis.call('SCARD', P .. 'run:' .. lane) == 0 then
        redis.call('SREM', P .. 'active', lane)
        redis.call('HDEL', P .. 'placed', lane)
      end
    end
    if redis.call('SCARD', P .. 'active') >= MAX_ACTIVE then return end
    local chosen = target or next_model()
    if not chosen then return end
    redis.call('SET', P .. 'slice', now)
    redis.call('HINCRBY', P .. 'stats', 'activations', 1)
    if target then redis.call('HINCRBY', P .. 'stats', 'forced_switches', 1) end
    fill(chosen)
  end
end

local function remove(id)
  -- Forget a job however it ended; return what it was: 'running', 'waiting' or 'none'.
  local job = P .. 'job:' .. id
  local fields = redis.call('HMGET', job, 'lane', 'client', 'state', 'pri')
  local lane, client, state, pri = fields[1], fields[2], fields[3], fields[4] or '1'
  redis.call('ZREM', P .. 'leases', id)
  if not lane then return 'none' end
  redis.call('DEL', job)
  if state == 'w' then
    dequeue(id, lane, client, pri, false)
    return 'waiting'
  end
  -- The lane keeps its place until the next pump (see there).
  redis.call('HINCRBY', P .. 'pc', 'r' .. pri, -1)
  redis.call('SREM', P .. 'run:' .. lane, id)
  if redis.call('HINCRBY', P .. 'cr', client, -1) <= 0 then
    redis.call('HDEL', P .. 'cr', client)
  end
  return 'running'
end

local function reap()
  -- Jobs whose lease lapsed: their process died or lost Redis for a whole lease.
  local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(expired) do
    if remove(id) ~= 'none' then redis.call('HINCRBY', P .. 'stats', 'reaped', 1) end
  end
  return #expired
end

local function can_start(lane)
  if oldest_ready(lane, nil) then return false end
  local running = redis.call('SCARD', P .. 'run:' .. lane)
  if lane == 'a' then return running < ADMIN_SLOTS end
  if switch_target() then return false end
  if redis.call('SISMEMBER', P .. 'active', lane) == 1 then return running < slots(lane) end
  return redis.call('SCARD', P .. 'active') < MAX_ACTIVE
end
"""

# ARGV[9..]: job id, lane, client, owner, queue_max, queue_max_per_client, then
# "requeue" ('1': a job that already waited elsewhere, so the bounds do not turn it away),
# the ms it already waited (its arrival is set that far back), its class, and the client's
# running cap (its API key's max_running; '' for none), which the client keeps until its
# next job.
# Returns {'running'} | {'waiting'} | {'client_queue_full', lane_waiting} | {'queue_full', waiting}.
_SUBMIT = (
    _PRELUDE
    + r"""
local id, lane, client, owner = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local queue_max, per_client = tonumber(ARGV[13]), tonumber(ARGV[14])
local requeue, sub = ARGV[15] == '1', now - tonumber(ARGV[16])
local pri = ARGV[17]
if reap() > 0 then pump() end
if redis.call('EXISTS', P .. 'job:' .. id) == 1 then return redis.error_reply('job exists') end
if ARGV[18] ~= '' then
  redis.call('HSET', P .. 'cap', client, ARGV[18])
else
  redis.call('HDEL', P .. 'cap', client)
end
local job = P .. 'job:' .. id
if may_run(client) and can_start(lane) then
  redis.call('HSET', job, 'lane', lane, 'client', client, 'owner', owner, 'sub', sub, 'state', 'w',
    'pri', pri)
  if lane ~= 'a' and redis.call('SISMEMBER', P .. 'active', lane) == 0 then
    redis.call('SET', P .. 'slice', now)
    redis.call('HINCRBY', P .. 'stats', 'activations', 1)
  end
  start(id, lane, false)  -- it runs at once: its owner needs no wake-up
  return {'running'}
end
if not requeue and tonumber(redis.call('HGET', P .. 'cw', client) or '0') >= per_client then
  redis.call('HINCRBY', P .. 'stats', 'client_queue_full', 1)
  return {'client_queue_full', redis.call('ZCARD', P .. 'q:' .. lane)}
end
if not requeue and redis.call('ZCARD', P .. 'wait') >= queue_max then
  redis.call('HINCRBY', P .. 'stats', 'queue_full', 1)
  return {'queue_full', redis.call('ZCARD', P .. 'wait')}
end
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', job, 'lane', lane, 'client', client, 'owner', owner, 'sub', sub, 'state', 'w',
  'pri', pri)
enqueue(id, lane, client, pri, seq)
redis.call('ZADD', P .. 'leases', now + LEASE, id)
return {'waiting'}
"""
)

# ARGV[9]: job id; ARGV[10]: the reason a waiting job leaves ('queue_timeout', 'cancelled'),
# counted in stats if it was still waiting. Returns what the job was: 'running',
# 'waiting' or 'none'.
_FINISH = (
    _PRELUDE
    + r"""
local was = remove(ARGV[9])
if was == 'waiting' and ARGV[10] ~= '' then redis.call('HINCRBY', P .. 'stats', ARGV[10], 1) end
reap()
pump()
return was
"""
)

# ARGV[9]: the owner; ARGV[10]: n, the number of running jobs; ARGV[11 .. 10 + 4n]: each
# running job's id, lane, client and class; the rest: ids of waiting jobs. Renews every lease;
# a running job that Redis no longer knows (its lease lapsed while Redis was out of
# reach, or Redis restarted empty, or it ran on the process's own slots meanwhile) is
# counted again as running, whatever the slots: it runs, so it holds one. Then reaps,
# applies due switches, and returns {waiting ids Redis no longer knows, ids counted again}.
_TICK = (
    _PRELUDE
    + r"""
local owner, n = ARGV[9], tonumber(ARGV[10])
local missing, counted = {}, {}
for i = 11, 10 + 4 * n, 4 do
  local id, lane, client, pri = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if not redis.call('ZSCORE', P .. 'leases', id) then
    local job = P .. 'job:' .. id
    redis.call('HSET', job, 'lane', lane, 'client', client, 'owner', owner, 'sub', now,
      'pri', pri)
    start(id, lane, false)
    redis.call('HINCRBY', P .. 'stats', 'admitted', -1)  -- admitted once already
    redis.call('HINCRBY', P .. 'stats', 'counted_again', 1)
    table.insert(counted, id)
  end
  redis.call('ZADD', P .. 'leases', now + LEASE, id)
end
for i = 11 + 4 * n, #ARGV do
  if redis.call('ZSCORE', P .. 'leases', ARGV[i]) then
    redis.call('ZADD', P .. 'leases', now + LEASE, ARGV[i])
  else
    table.insert(missing, ARGV[i])
  end
end
reap()
pump()
return {missing, counted}
"""
)

# Plain data for the status page, as JSON.
_SNAPSHOT = (
    _PRELUDE
    + r"""
if reap() > 0 then pump() end
local lanes = {}
local function lane_of(lane)
  if not lanes[lane] then
    lanes[lane] = {
      running = redis.call('SCARD', P .. 'run:' .. lane),
      waiting = redis.call('ZCARD', P .. 'q:' .. lane),
      slots = slots(lane),
      clients_waiting = 0,
      active = redis.call('SISMEMBER', P .. 'active', lane) == 1,
      oldest_wait = 0,
    }
    local seen, clients = {}, 0
    for pri = 0, 2 do
      for _, client in ipairs(redis.call('LRANGE', P .. 'turns:' .. lane .. ':' .. pri, 0, -1)) do
        if not seen[client] then seen[client], clients = true, clients + 1 end
      end
    end
    lanes[lane].clients_waiting = clients
    local first = redis.call('ZRANGE', P .. 'q:' .. lane, 0, 0)
    if #first > 0 then
      local sub = tonumber(redis.call('HGET', P .. 'job:' .. first[1], 'sub') or now)
      lanes[lane].oldest_wait = (now - sub) / 1000
    end
  end
end
lane_of('a')
for _, lane in ipairs(redis.call('SMEMBERS', P .. 'active')) do lane_of(lane) end
for _, lane in ipairs(redis.call('ZRANGE', P .. 'queued', 0, -1)) do lane_of(lane) end
local target = switch_target()
local stats = redis.call('HGETALL', P .. 'stats')
return cjson.encode({
  lanes = lanes,
  waiting = redis.call('ZCARD', P .. 'wait'),
  active = redis.call('SMEMBERS', P .. 'active'),
  clients = redis.call('HGETALL', P .. 'cw'),
  running = redis.call('HGETALL', P .. 'cr'),
  target = target or false,
  stats = stats,
  classes = redis.call('HGETALL', P .. 'pc'),
})
"""
)


def lane_of(model: str, admin: bool) -> str:
    """The lane key of a job: ``m:<model>`` for a model, ``a`` for the admin lane."""
    return "a" if admin else "m:" + normalize_model(model)


@dataclass(frozen=True)
class Decision:
    """The submit script's answer: running, waiting, client_queue_full or queue_full."""

    outcome: str
    waiting: int = 0


@dataclass(frozen=True)
class Ticked:
    """The tick script's answer: waiting ids Redis forgot, running ids it counted again."""

    missing: list[str]
    counted: list[str]


class RedisScheduler:
    """The scheduling rules applied atomically to state in Redis (one script per event)."""

    def __init__(
        self,
        client: Any,
        *,
        concurrency: int = 1,
        overrides: Mapping[str, int] | None = None,
        max_active_models: int = 1,
        queue_max: int = 512,
        queue_max_per_client: int = 32,
        switch_after: float = 10.0,
        admin_concurrency: int = 1,
        queue_timeout: float = 300.0,
        lease: float = DEFAULT_LEASE,
        prefix: str = KEY_PREFIX,
        priority_aging: float = DEFAULT_AGING,
    ) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be above 0, not {lease!r}")
        self.client = client
        self.prefix = prefix
        self.lease = float(lease)
        self.queue_max = queue_max
        self.queue_max_per_client = queue_max_per_client
        self.max_active_models = max_active_models
        self.queue_timeout = float(queue_timeout)
        self.concurrency = concurrency
        self.overrides = {normalize_model(m): n for m, n in (overrides or {}).items()}
        self.admin_concurrency = admin_concurrency
        self._config = [
            str(int(self.lease * 1000)),
            str(concurrency),
            str(max_active_models),
            str(admin_concurrency),
            str(int(switch_after * 1000)),
            "\n".join(f"{m}\t{n}" for m, n in sorted(self.overrides.items())),
            str(int(priority_aging * 1000)),
        ]
        self._submit = client.register_script(_SUBMIT)
        self._finish = client.register_script(_FINISH)
        self._tick = client.register_script(_TICK)
        self._snapshot = client.register_script(_SNAPSHOT)

    def slots(self, lane: str) -> int:
        if lane == "a":
            return self.admin_concurrency
        return self.overrides.get(lane[2:], self.concurrency)

    def wake_key(self, owner: str) -> str:
        """The list where the scripts push the ids of ``owner``'s jobs as they start."""
        return f"{self.prefix}wake:{owner}"

    def _argv(self, now_ms: int | None, *extra: str) -> list[str]:
        return ["" if now_ms is None else str(now_ms), *self._config, *extra]

    def submit(
        self,
        job_id: str,
        lane: str,
        client: str,
        owner: str,
        *,
        requeue: bool = False,
        waited: float = 0.0,
        max_waiting: int | None = None,
        max_running: int | None = None,
        now_ms: int | None = None,
        priority: str = DEFAULT_PRIORITY,
    ) -> Decision:
        """Add a job of class ``priority``: it runs at once, waits, or is turned away
        (client share, queue full).

        ``requeue``: the job already waited ``waited`` seconds in another queue (this
        process's own, while Redis was out of reach); it is not turned away, and its
        arrival counts from then for the switch rule and the oldest wait. ``max_waiting``
        is the client's own queue share, in place of ``queue_max_per_client``;
        ``max_running`` caps the client's running jobs (see ``core.Scheduler.submit``).
        """
        args = self._argv(
            now_ms,
            job_id,
            lane,
            client,
            owner,
            str(self.queue_max),
            str(self.queue_max_per_client if max_waiting is None else max_waiting),
            "1" if requeue else "",
            str(max(0, int(waited * 1000))),
            str(priority_rank(priority)),
            "" if max_running is None else str(max_running),
        )
        reply = self._submit(keys=[self.prefix], args=args)
        outcome = _text(reply[0])
        return Decision(outcome, int(reply[1]) if len(reply) > 1 else 0)

    def finish(self, job_id: str, *, reason: str = "", now_ms: int | None = None) -> str:
        """End a job (released, cancelled); return 'running', 'waiting' or 'none'.

        ``reason`` ("queue_timeout" or "cancelled") is counted if the job still waited.
        """
        args = self._argv(now_ms, job_id, reason)
        return _text(self._finish(keys=[self.prefix], args=args))

    def tick(
        self,
        owner: str,
        *,
        running: Iterable[tuple[str, str, str, str]] = (),
        waiting: Iterable[str] = (),
        now_ms: int | None = None,
    ) -> Ticked:
        """Renew the leases of ``owner``'s jobs, drop lapsed jobs, start what the rules allow.

        ``running`` holds (id, lane, client, class) of each job running: one that Redis
        does not know is counted again (``Ticked.counted``). Waiting ids that Redis does not
        know come back in ``Ticked.missing``.
        """
        jobs = [
            field
            for job_id, lane, client, priority in running
            for field in (job_id, lane, client, str(priority_rank(priority)))
        ]
        args = self._argv(now_ms, owner, str(len(jobs) // 4), *jobs, *waiting)
        missing, counted = self._tick(keys=[self.prefix], args=args)
        return Ticked([_text(m) for m in missing], [_text(c) for c in counted])

    def snapshot(
        self, *, avg_seconds: float | None = None, now_ms: int | None = None
    ) -> QueueSnapshot:
        """The shared state, for the status page (``avg_seconds``: for the Retry-After).

        Per-lane admissions, rejections and hold times are not kept in Redis (None).
        """
        raw = json.loads(self._snapshot(keys=[self.prefix], args=self._argv(now_ms)))
        stats = _pairs(raw["stats"])
        lanes: dict[str, Any] = raw["lanes"] if isinstance(raw["lanes"], dict) else {}
        target = raw["target"][2:] if raw["target"] else None
        active = sorted(m[2:] for m in raw["active"] or [])

        def lane(data: Mapping[str, Any], admin: bool) -> LaneSnapshot:
            active = bool(data["active"]) and not admin
            return {
                "running": int(data["running"]),
                "slots": int(data["slots"]),
                "waiting": int(data["waiting"]),
                "oldest_wait": float(data["oldest_wait"]),
                "clients_waiting": int(data["clients_waiting"]),
                "admitted": None,
                "rejected": None,
                "avg_seconds": None,
                "active": active,
                "draining": active and target is not None,
            }

        models = {key[2:]: lane(data, False) for key, data in lanes.items() if key != "a"}
        admin = lane(lanes["a"], True)
        clients: dict[str, ClientSnapshot] = {}
        for name, n in _pairs(raw["clients"]).items():
            clients.setdefault(name, {"waiting": 0, "running": 0})["waiting"] = int(n)
        for name, n in _pairs(raw["running"]).items():
            clients.setdefault(name, {"waiting": 0, "running": 0})["running"] = int(n)
        counts = _pairs(raw["classes"])
        priorities: dict[str, ClassSnapshot] = {
            name: {
                "waiting": int(counts.get(f"w{rank}", 0)),
                "running": int(counts.get(f"r{rank}", 0)),
            }
            for rank, name in enumerate(PRIORITIES)
        }
        waiting = int(raw["waiting"])
        slots = sum(models[m]["slots"] for m in active if m in models) or self.concurrency
        return {
            "models": dict(sorted(models.items())),
            "admin": admin,
            "clients": dict(sorted(clients.items())),
            "totals": {
                "running": sum(int(d["running"]) for d in lanes.values()),
                "waiting": waiting,
                "admitted": int(stats.get("admitted", 0)),
                "rejected": {reason: int(stats.get(reason, 0)) for reason in REASONS},
                "active_models": active,
                "max_active_models": self.max_active_models,
                "queue_max": self.queue_max,
                "queue_max_per_client": self.queue_max_per_client,
                "activations": int(stats.get("activations", 0)),
                "forced_switches": int(stats.get("forced_switches", 0)),
                "avg_seconds": avg_seconds,
                "reaped": int(stats.get("reaped", 0)),
                "counted_again": int(stats.get("counted_again", 0)),
            },
            "switch": {
                "pending": target is not None,
                "target": target,
                "waited": models[target]["oldest_wait"] if target in models else 0.0,
                "draining": active if target is not None else [],
            },
            "priorities": priorities,
            "retry_after": estimate_wait(
                avg_seconds, waiting - admin["waiting"], slots, self.queue_timeout
            ),
            "closed": False,
            "shared": True,
            "fallback": False,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Any) -> dict[str, str]:
    """A Redis flat [k, v, k, v] reply (cjson may give {} for an empty one) as a dict."""
    if not isinstance(flat, list):
        return {}
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
