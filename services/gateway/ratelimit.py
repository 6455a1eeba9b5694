"""Per-key rate limits shared by every gateway replica: token buckets in Redis.

One Lua script admits a request atomically against all three limits of its key, or
refuses it without touching any: requests per minute and tokens per minute are token
buckets (capacity = the per-minute limit, refilled continuously at limit/60 per second,
Redis's own clock), concurrent streams are a sorted set of lease ids whose scores are
expiry times (so a gateway that dies mid-stream leaks a slot for at most ``lease_ttl_s``).
Tokens are reserved as prompt + max_tokens and settled to the real count when the stream
ends, however it ends. Admission runs before the prompt is tokenized, so that a key with
an empty bucket costs no tokenizing: it reserves what is known then (the token-id prompt,
or one token for a text prompt, plus max_tokens or one), and once the prompt is tokenized
``Lease.extend`` takes the rest, atomically, refusing as admission would have when the
bucket is short.

When Redis cannot be reached the limiter follows its mode: ``closed`` refuses with
UNAVAILABLE, ``open`` admits without limits; either way it logs, counts the error, and uses
Redis again as soon as it answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmesh.errors import ServiceError, unavailable
from llmesh.gateway import metrics
from llmesh.gateway.caller import Caller
from llmesh.overload import retry_trailers

log = logging.getLogger("llmesh.gateway.ratelimit")

# KEYS: req bucket, tok bucket, lease zset. ARGV: rpm, tpm, concurrency, tokens, lease id, ttl_s.
# Returns {0} when admitted, else {1, limit name, retry-after ms}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, ttl = tonumber(ARGV[4]), tonumber(ARGV[6])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(v[1]), tonumber(v[2])
  if tokens == nil then return cap end
  return math.min(cap, tokens + (now - ts) * cap / 60.0)
end
local req, tok = 0, 0
if rpm > 0 then
  req = level(KEYS[1], rpm)
  if req < 1 then return {1, 'requests_per_minute', math.ceil((1 - req) * 60000 / rpm)} end
end
if tpm > 0 then
  tok = level(KEYS[2], tpm)
  if tok < cost then return {1, 'tokens_per_minute', math.ceil((cost - tok) * 60000 / tpm)} end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then
    return {1, 'concurrent_streams', 1000}
  end
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[5])
  redis.call('EXPIRE', KEYS[3], math.ceil(ttl) + 1)
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'tokens', req - 1, 'ts', now)
  redis.call('EXPIRE', KEYS[1], 120)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'tokens', tok - cost, 'ts', now)
  redis.call('EXPIRE', KEYS[2], 120)
end
return {0}
"""

# KEYS: tok bucket, lease zset. ARGV: tpm, refund tokens (may be negative), lease id.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and refund ~= 0 then
  local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens, ts = tonumber(v[1]), tonumber(v[2])
  if tokens == nil then tokens, ts = tpm, now end
  tokens = math.min(tpm, tokens + (now - ts) * tpm / 60.0 + refund)
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
  redis.call('EXPIRE', KEYS[1], 120)
end
redis.call('ZREM', KEYS[2], ARGV[3])
return 0
"""

# KEYS: tok bucket. ARGV: tpm, extra tokens (negative: give some back).
# Returns {0} when taken, else {1, 'tokens_per_minute', retry-after ms}.
_EXTEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local tpm, extra = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(v[1]), tonumber(v[2])
if tokens == nil then tokens, ts = tpm, now end
tokens = math.min(tpm, tokens + (now - ts) * tpm / 60.0)
if extra > 0 and tokens < extra then
  return {1, 'tokens_per_minute', math.ceil((extra - tokens) * 60000 / tpm)}
end
redis.call('HSET', KEYS[1], 'tokens', math.min(tpm, tokens - extra), 'ts', now)
redis.call('EXPIRE', KEYS[1], 120)
return {0}
"""

LIMIT_NAMES = {"requests_per_minute": "requests per minute", "tokens_per_minute": "tokens per minute",
               "concurrent_streams": "concurrent streams"}


class RedisGuard:
    """Counts and logs Redis failures once per outage (not once per request)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.down = False

    def failed(self, where: str, exc: BaseException) -> None:
        metrics.REDIS_ERRORS.labels(where).inc()
        if not self.down:
            log.warning("redis unreachable; failing %s", self.mode, extra={"where": where, "error": str(exc)})
        self.down = True

    def ok(self) -> None:
        if self.down:
            log.warning("redis reachable again")
        self.down = False

    def observed(self, up: bool) -> None:
        """The health check's verdict (no request failed: no error counted)."""
        if up:
            self.ok()
        else:
            self.down = True

    def refuse(self, what: str) -> ServiceError:
        return unavailable(f"the gateway cannot reach its Redis to check {what}; try again shortly")


class Lease:
    """One admitted stream: settle it exactly once when the stream ends."""

    def __init__(self, limiter: RateLimiter | None, caller: Caller, reserved: int, lease_id: str) -> None:
        self._limiter, self._caller, self.reserved, self.lease_id = limiter, caller, reserved, lease_id
        self._settled = False

    async def settle(self, used_tokens: int) -> None:
        if self._settled or self._limiter is None:
            return
        self._settled = True
        await self._limiter.settle(self, self._caller, used_tokens)

    async def extend(self, tokens: int) -> None:
        """Make the reservation ``tokens`` (prompt + max_tokens, once the prompt is
        tokenized), or raise RESOURCE_EXHAUSTED leaving it as it was."""
        if self._limiter is not None and not self._settled and tokens != self.reserved:
            await self._limiter.extend(self, self._caller, tokens)


class RateLimiter:
    def __init__(self, client: aioredis.Redis, guard: RedisGuard, lease_ttl_s: float = 900.0) -> None:
        self._redis = client
        self._guard = guard
        self._ttl = lease_ttl_s
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._extend = client.register_script(_EXTEND)

    @staticmethod
    def _keys(caller: Caller) -> list[str]:
        base = f"llmesh:rl:{caller.key_id}:"
        return [base + "req", base + "tok", base + "streams"]

    async def admit(self, caller: Caller, tokens: int) -> Lease:
        """Take one request and ``tokens`` from the key's budgets, or raise RESOURCE_EXHAUSTED."""
        if not (caller.rpm or caller.tpm or caller.concurrency):
            return Lease(None, caller, 0, "")
        _check_fits_tpm(caller, tokens)
        lease_id = uuid.uuid4().hex
        try:
            res = await self._admit(keys=self._keys(caller), args=[
                caller.rpm, caller.tpm, caller.concurrency, tokens, lease_id, self._ttl])
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._guard.failed("ratelimit", e)
            if self._guard.mode == "open":
                return Lease(None, caller, 0, "")
            raise self._guard.refuse("rate limits") from None
        self._guard.ok()
        if int(res[0]) == 0:
            return Lease(self, caller, tokens, lease_id)
        raise _refused(caller, res)

    async def extend(self, lease: Lease, caller: Caller, tokens: int) -> None:
        if not caller.tpm:
            lease.reserved = tokens
            return
        _check_fits_tpm(caller, tokens)
        try:
            res = await self._extend(keys=[self._keys(caller)[1]], args=[caller.tpm, tokens - lease.reserved])
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._guard.failed("ratelimit", e)
            if self._guard.mode == "open":
                return
            raise self._guard.refuse("rate limits") from None
        self._guard.ok()
        if int(res[0]) != 0:
            raise _refused(caller, res)
        lease.reserved = tokens

    async def settle(self, lease: Lease, caller: Caller, used_tokens: int) -> None:
        keys = self._keys(caller)
        try:
            await self._settle(keys=[keys[1], keys[2]],
                               args=[caller.tpm, lease.reserved - used_tokens, lease.lease_id])
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._guard.failed("settle", e)
            return
        self._guard.ok()



def _check_fits_tpm(caller: Caller, tokens: int) -> None:
    if caller.tpm and tokens > caller.tpm:
        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"this request reserves {tokens} tokens (prompt + max_tokens), more than the "
                           f"key's tokens per minute limit of {caller.tpm}; lower max_tokens or shorten "
                           "the prompt", trailers=(("retry-after", "60"),))


def _refused(caller: Caller, res) -> ServiceError:
    """RESOURCE_EXHAUSTED for a script's refusal ``{1, limit name, retry-after ms}``."""
    limit = res[1].decode() if isinstance(res[1], bytes) else str(res[1])
    retry_s = max(1, math.ceil(int(res[2]) / 1000))
    metrics.RATE_LIMITED.labels(limit).inc()
    value = {"requests_per_minute": caller.rpm, "tokens_per_minute": caller.tpm,
             "concurrent_streams": caller.concurrency}[limit]
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"rate limit exceeded: {LIMIT_NAMES[limit]} (limit {value} for key {caller.key_id}); "
                        f"retry after {retry_s} s", trailers=retry_trailers(int(res[2]) / 1000))
