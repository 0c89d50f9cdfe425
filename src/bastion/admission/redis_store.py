"""Rate-limit state in Redis, shared by every replica: one Lua script per step of a request,
called on the event loop with redis-py's asyncio client (EVALSHA; its pipeline loads the
scripts again when Redis has lost them).

Why Lua and not the `limits` library's storage API, which the memory store uses: that API works
one counter at a time (hit a moving window, increment a fixed window, read its expiry), each
call its own round trip, and offers no way to compose two counters and a set of slot leases into
one atomic operation. Built on it, a completion cost about a dozen round trips (+4.3 ms p50), and
"is there room for these tokens?" followed by "reserve them" was a race between replicas: two of
them could both see room for the last reservation and overshoot the hour's budget. A script runs
atomically inside Redis, so each step is one round trip and no other replica can act between its
check and its write. The connection still comes from `limits` (its async RedisStorage on
redis-py, built from the URL, opens and authenticates it), so the URL forms it accepts are the
ones Bastion accepts.

Layout, all keys of one organisation in one hash slot ({org} tag, for Redis Cluster):
  bastion:{org}:rpm:<key>  sorted set, one member per request of the last minute, scored by ms
  bastion:{org}:tokens     hash {used, id}; expires when the token window ends; `id` names the
                           window, so a refund never lands in a later window
  bastion:{org}:slots      sorted set, one member per running request, scored by its lease's
                           expiry; running requests renew their leases, a dead replica's expire
Times come from Redis's own clock (TIME), so replicas with skewed clocks agree; what comes back
is relative (ms until a reset), turned into epoch seconds on this host's clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from limits.storage import storage_from_string
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, NoScriptError

from bastion.admission.store import RPM_WINDOW_S, Admission, Query, Requests, Snapshot, Usage

log = logging.getLogger("bastion.admission")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The token window: used, ms until it ends, its id ('' when there is none).
_TOKENS = """
local function tokens(key, window_ms)
  local h = redis.call('HMGET', key, 'used', 'id')
  local ttl = redis.call('PTTL', key)
  if not h[2] or ttl < 0 then return 0, window_ms, '' end
  return tonumber(h[1]), ttl, h[2]
end
"""

# The key's requests per minute: prune, then count this request if there is room (and `add`).
# -> allowed (1/0), requests remaining, ms until the oldest counted request leaves the window
_RPM = """
local function rpm(key, limit, member, add)
  if limit <= 0 then return 1, 0, 0 end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - %(rpm_ms)d)
  local n = redis.call('ZCARD', key)
  local allowed = 1
  if n >= limit then
    allowed = 0
  elseif add then
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, %(rpm_ms)d)
    n = n + 1
  end
  local reset = %(rpm_ms)d
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if oldest[2] then reset = tonumber(oldest[2]) + %(rpm_ms)d - now end
  return allowed, limit - n, reset
end
""" % {"rpm_ms": RPM_WINDOW_S * 1000}

# KEYS: rpm, tokens, slots. ARGV: rpm limit (0: none), member, token window ms, count slots (0/1),
# count this request (1) or only look (0)
# -> {allowed, rpm remaining, ms until rpm reset, tokens used, ms until token reset, slots}
AUTHENTICATE = _NOW + _TOKENS + _RPM + """
local allowed, remaining, reset = rpm(KEYS[1], tonumber(ARGV[1]), ARGV[2], ARGV[5] == '1')
local used, ttl = tokens(KEYS[2], tonumber(ARGV[3]))
local slots = 0
if ARGV[4] == '1' then slots = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf') end
return {allowed, remaining, reset, used, ttl, slots}
"""

# KEYS: tokens, slots, rpm. ARGV: tokens per hour (-1: none), estimate, concurrency (-1: none),
# member, lease ms, token window ms, rpm limit (0: none or already counted), sequences (slots
# taken: member, member/1, ... member/(k-1); see store.slot_members)
# -> {0 admitted | 1 no tokens | 2 no slot | 3 no requests left this minute, tokens used,
#     ms until token reset, slots, window id, rpm remaining, ms until rpm reset}
ADMIT = _NOW + _TOKENS + _RPM + """
local tph, estimate, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, window_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local allowed, remaining, reset = rpm(KEYS[3], tonumber(ARGV[7]), ARGV[4], true)
local n = 0
if cap >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  n = redis.call('ZCARD', KEYS[2])
end
local used, ttl, id = 0, window_ms, ''
if tph >= 0 then used, ttl, id = tokens(KEYS[1], window_ms) end
if allowed == 0 then return {3, used, ttl, n, '', remaining, reset} end
if tph >= 0 and used + estimate > tph then return {1, used, ttl, n, '', remaining, reset} end
local k = tonumber(ARGV[8])
if cap >= 0 then
  if n + k > cap then return {2, used, ttl, n, '', remaining, reset} end
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  for i = 1, k - 1 do redis.call('ZADD', KEYS[2], now + lease, ARGV[4] .. '/' .. i) end
  redis.call('PEXPIRE', KEYS[2], lease * 4 + 1000)
  n = n + k
end
if tph >= 0 then
  if id == '' then
    id = ARGV[4]
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'used', estimate, 'id', id)
    redis.call('PEXPIRE', KEYS[1], window_ms)
    ttl = window_ms
  else
    redis.call('HINCRBY', KEYS[1], 'used', estimate)
  end
  used = used + estimate
end
return {0, used, ttl, n, id, remaining, reset}
"""

# KEYS: tokens, slots. ARGV: member, window id, token delta (negative: a refund), token window ms,
# sequences (the member's slots)
# -> {tokens used, ms until token reset, slots}
SETTLE = _NOW + _TOKENS + """
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 1, tonumber(ARGV[5] or '1') - 1 do redis.call('ZREM', KEYS[2], ARGV[1] .. '/' .. i) end
local window_ms = tonumber(ARGV[4])
local used, ttl, id = tokens(KEYS[1], window_ms)
local delta = tonumber(ARGV[3])
if delta ~= 0 and ARGV[2] ~= '' and id == ARGV[2] then
  if used + delta < 0 then delta = -used end
  used = redis.call('HINCRBY', KEYS[1], 'used', delta)
end
return {used, ttl, redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')}
"""

# KEYS: slots. ARGV: lease ms, members... Only members still present are renewed (XX).
RENEW = _NOW + """
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease * 4 + 1000)
return 0
"""


class RedisStore:
    """The steps of a request as scripts run on the event loop: no worker thread per round
    trip. A connection error or a Redis that stops answering (2 s) propagates, and the limiter
    turns it into a 503 (fail closed)."""

    def __init__(self, url: str, token_window_s: int, slot_lease_s: float) -> None:
        # 2 s socket timeouts: an unreachable or stalled Redis must fail requests closed, not
        # hang them. One immediate retry, no backoff, on a dropped connection only (a restart:
        # the pooled connection is replaced at once, and a Redis that is down costs a request
        # one failed reconnect); never on a timeout, so a stalled Redis gets a request its 503
        # after one socket timeout, not two.
        options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
        retry = Retry(NoBackoff(), 1, supported_errors=(ConnectionError, OSError))
        aio = storage_from_string(f"async+{url}", implementation="redispy", retry=retry,
                                  **options)
        self.client: Any = aio.bridge.get_connection()  # type: ignore[attr-defined]
        # the synchronous storage of the same URL, for other short-lived state used from worker
        # threads (dashboard sign-outs); it connects only when first used
        self.storage = storage_from_string(url, **options)
        self.window_ms = token_window_s * 1000
        self.lease_ms = int(slot_lease_s * 1000)
        self._authenticate = self.client.register_script(AUTHENTICATE)
        self._admit = self.client.register_script(ADMIT)
        self._settle = self.client.register_script(SETTLE)
        self._renew = self.client.register_script(RENEW)
        self._scripts = (self._authenticate, self._admit, self._settle, self._renew)
        self._loading: asyncio.Future[None] | None = None  # SCRIPT LOADs after a lost cache
        self._released: set[asyncio.Task[None]] = set()  # releases whose reply is still due
        self._pool: Any = getattr(self.client, "connection_pool", None)  # None: a cluster

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA through the client (a cluster client routes each call itself). NOSCRIPT:
        Redis lost its script cache (a restart, SCRIPT FLUSH); the call runs again once every
        script is loaded."""
        if self._pool is None:
            return await script(keys=keys, args=args)
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._reload()
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)

    async def _reload(self) -> None:
        """All the scripts at once, so that the release this request sends next does not miss
        its script too and reach Redis after the client's next admission; one load for all the
        calls that found the cache empty together."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load_scripts())
        await asyncio.shield(self._loading)

    async def _load_scripts(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for script in self._scripts:
                pipe.script_load(script.script)
            await pipe.execute()

    @staticmethod
    def _keys(org_id: str) -> tuple[str, str]:
        return f"bastion:{{{org_id}}}:tokens", f"bastion:{{{org_id}}}:slots"

    @staticmethod
    def _rpm_key(q: Query) -> str:
        return f"bastion:{{{q.org_id}}}:rpm:{q.key_id}"

    async def authenticate(self, q: Query, member: str) -> tuple[bool, Snapshot]:
        return await self._look(q, member, count=True)

    async def peek(self, q: Query) -> Snapshot:
        return (await self._look(q, "", count=False))[1]

    async def _look(self, q: Query, member: str, count: bool) -> tuple[bool, Snapshot]:
        tokens, slots = self._keys(q.org_id)
        allowed, remaining, reset, used, ttl, n = await self._call(
            self._authenticate, keys=[self._rpm_key(q), tokens, slots],
            args=[q.rpm or 0, member, self.window_ms, int(q.concurrency is not None),
                  int(count)])
        now = time.time()
        requests = Requests(int(remaining), now + int(reset) / 1000) if q.rpm else None
        return bool(allowed), Snapshot(requests, Usage(int(used), now + int(ttl) / 1000, int(n)))

    async def admit(self, q: Query, estimate: int, member: str, count: bool,
                    sequences: int = 1) -> Admission:
        rpm = (q.rpm or 0) if count else 0
        outcome, used, ttl, n, window, remaining, reset = await self._call(
            self._admit, keys=[*self._keys(q.org_id), self._rpm_key(q)],
            args=[-1 if not q.tokens_per_hour else q.tokens_per_hour, estimate,
                  -1 if q.concurrency is None else q.concurrency, member, self.lease_ms,
                  self.window_ms, rpm, max(1, sequences)])
        now = time.time()
        usage = Usage(int(used), now + int(ttl) / 1000, int(n))
        requests = Requests(int(remaining), now + int(reset) / 1000) if rpm else None
        refused = {0: None, 1: "tokens", 2: "concurrency", 3: "requests"}[int(outcome)]
        return Admission(refused, usage, _text(window), requests)  # type: ignore[arg-type]

    async def settle(self, q: Query, member: str, window: str, delta: int,
                     sequences: int = 1) -> Usage | None:
        """Send the release and return once it is written to Redis's socket (the Gatekeeper
        calls this after the response's last byte, before the server reads what the client
        sends next): any request the client sends next reaches Redis after it, so it finds the
        slot free. The reply is read in the background, on the same pooled connection, which
        goes back to the pool then: the round trip is off the request's path. None: the caller
        estimates the usage after the release from its admission's snapshot."""
        keys = list(self._keys(q.org_id))
        args = [member, window, delta, self.window_ms, max(1, sequences)]
        if self._pool is None:  # a cluster client has a pool per node: wait for the reply
            used, ttl, n = await self._settle(keys=keys, args=args)
            return Usage(int(used), time.time() + int(ttl) / 1000, int(n))
        conn = await self._pool.get_connection()
        try:  # a write on a connection Redis dropped is retried once on a new one
            await conn.retry.call_with_retry(
                lambda: conn.send_command("EVALSHA", self._settle.sha, len(keys), *keys, *args),
                lambda _: conn.disconnect())
        except BaseException:
            await conn.disconnect()
            await self._pool.release(conn)
            raise
        task = asyncio.create_task(self._reply(conn, keys, args))
        self._released.add(task)
        task.add_done_callback(self._released.discard)
        return None

    async def _reply(self, conn: Any, keys: list[str], args: list[Any]) -> None:
        try:
            try:
                await conn.read_response()
            except NoScriptError:  # Redis lost its script cache: once more, after loading them
                # all (this release now lands after whatever was sent meanwhile; at worst a
                # request sent just then finds the slot still taken)
                await self._pool.release(conn)
                conn = None
                await self._call(self._settle, keys, args)
        except Exception as exc:  # the lease runs out by itself
            if conn is not None:
                await conn.disconnect()  # a reply may still be on its way: never reuse it
            log.warning("could not settle a request's limits (%s: %s); its slot's lease will "
                        "lapse", type(exc).__name__, exc)
        finally:
            if conn is not None:
                await self._pool.release(conn)

    async def renew(self, held: dict[str, str]) -> None:
        """held: member -> org id; one round trip for all of them."""
        if not held:
            return
        by_org: dict[str, list[str]] = defaultdict(list)
        for member, org_id in held.items():
            by_org[org_id].append(member)
        async with self.client.pipeline(transaction=False) as pipe:
            for org_id, members in by_org.items():
                await self._renew(keys=[self._keys(org_id)[1]], args=[self.lease_ms, *members],
                                  client=pipe)
            await pipe.execute()

    async def close(self) -> None:
        if self._released:
            await asyncio.wait(set(self._released), timeout=5)
        await self.client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
