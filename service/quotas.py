"""Per-caller quotas: concurrent streams, requests per minute, tokens per minute.

A stream takes a lease when it is admitted and gives it back when it ends, with the tokens its
Finish reported (its usage as the provider gave it, or the estimate when it gave none): token
quotas are charged from what a stream actually used, so a stream is let in while its caller has
tokens left this minute, and its cost counts once it is known. Minutes are fixed windows.

Two stores, one interface: `MemoryQuotas` (one process) and `RedisQuotas` (every replica on one
Redis, each check-and-take one Lua script, so two replicas cannot both take the last slot). A
concurrency lease in Redis is a member of a sorted set scored by its expiry, which its replica
renews every few seconds: the slots of a replica that died free themselves within LEASE_SECONDS.
While Redis cannot be reached, requests go through uncounted ("open", the default) or are refused
("closed"), as `quota_store_failure` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.callers import Caller
from service.errors import ErrorCode, GatewayError

log = logging.getLogger("tokenwire.quotas")

WINDOW_SECONDS = 60
# Suggested to a caller at its concurrency limit: a stream may end any moment.
CONCURRENCY_RETRY_AFTER_SECONDS = 1.0
# A Redis concurrency lease lives this long unless its replica renews it (every RENEW_SECONDS).
LEASE_SECONDS = 15.0
RENEW_SECONDS = 5.0
# A quota check waits this long for Redis before the failure rule applies; after a failure, Redis
# is left alone this long (the rule applies at once), so an outage costs no request a timeout.
_REDIS_TIMEOUT_SECONDS = 0.5
_REDIS_BACKOFF_SECONDS = 1.0

Rejected = Callable[[Caller, str], None]


def quota_exceeded(which: str, detail: str, retry_after: float) -> GatewayError:
    return GatewayError(
        ErrorCode.QUOTA_EXCEEDED,
        f"this API key is over its {which} quota ({detail}); retry after {math.ceil(retry_after)} s",
        retry_after=max(retry_after, 0.001),
    )


def _rejection(caller: Caller, which: str, retry_after: float) -> GatewayError:
    if which == "concurrent_streams":
        return quota_exceeded(
            "concurrent streams", f"{caller.max_concurrent_streams} at once", CONCURRENCY_RETRY_AFTER_SECONDS
        )
    if which == "requests_per_minute":
        return quota_exceeded("requests", f"{caller.requests_per_minute} a minute", retry_after)
    return quota_exceeded("tokens", f"{caller.tokens_per_minute} a minute", retry_after)


class Lease:
    """One admitted stream's share of its caller's quotas; `release` once, on every path."""

    __slots__ = ("_quotas", "caller", "member")

    def __init__(self, quotas: Quotas | None, caller: Caller, member: str = "") -> None:
        self._quotas = quotas
        self.caller = caller
        self.member = member

    def release(self, tokens: int = 0) -> None:
        quotas, self._quotas = self._quotas, None
        if quotas is not None:
            quotas.give_back(self, tokens)


# A caller without quotas (every caller when auth is off) shares this lease: nothing to count.
FREE = Lease(None, Caller(id="", name=""))


class Quotas:
    """The interface both stores share."""

    def __init__(self, on_rejected: Rejected | None = None) -> None:
        self.on_rejected = on_rejected

    async def acquire(self, caller: Caller) -> Lease:
        if not caller.limited:
            return FREE
        return await self._acquire(caller)

    async def _acquire(self, caller: Caller) -> Lease:
        raise NotImplementedError

    def give_back(self, lease: Lease, tokens: int) -> None:
        raise NotImplementedError

    def _reject(self, caller: Caller, which: str, retry_after: float) -> GatewayError:
        if self.on_rejected is not None:
            self.on_rejected(caller, which)
        return _rejection(caller, which, retry_after)

    async def aclose(self) -> None:
        return None


@dataclass(slots=True)
class _Usage:
    concurrent: int = 0
    window: int = 0
    requests: int = 0
    tokens: int = 0
    members: set[str] = field(default_factory=set)


class MemoryQuotas(Quotas):
    """This process's counts, for a single replica."""

    def __init__(self, on_rejected: Rejected | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(on_rejected)
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def _current(self, caller_id: str) -> tuple[_Usage, float]:
        now = self._clock()
        window = int(now // WINDOW_SECONDS)
        usage = self._usage.get(caller_id)
        if usage is None:
            usage = self._usage[caller_id] = _Usage(window=window)
        if usage.window != window:
            usage.window, usage.requests, usage.tokens = window, 0, 0
        return usage, (window + 1) * WINDOW_SECONDS - now

    async def _acquire(self, caller: Caller) -> Lease:
        usage, left = self._current(caller.id)
        if caller.max_concurrent_streams and usage.concurrent >= caller.max_concurrent_streams:
            raise self._reject(caller, "concurrent_streams", CONCURRENCY_RETRY_AFTER_SECONDS)
        if caller.requests_per_minute and usage.requests >= caller.requests_per_minute:
            raise self._reject(caller, "requests_per_minute", left)
        if caller.tokens_per_minute and usage.tokens >= caller.tokens_per_minute:
            raise self._reject(caller, "tokens_per_minute", left)
        usage.concurrent += 1
        usage.requests += 1
        return Lease(self, caller)

    def give_back(self, lease: Lease, tokens: int) -> None:
        usage, _ = self._current(lease.caller.id)
        usage.concurrent -= 1
        usage.tokens += tokens


# KEYS: the caller's concurrency set, its requests and tokens counters' prefix.
# ARGV: member, max concurrent, requests a minute, tokens a minute, lease seconds, window seconds.
# Returns {0} when taken, else {which, milliseconds until the window turns}. Redis's clock, so
# that every replica counts the same minute.
_ACQUIRE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local window = math.floor(t / tonumber(ARGV[6]))
local left = math.ceil(((window + 1) * tonumber(ARGV[6]) - t) * 1000)
local requests = KEYS[2] .. ':r:' .. window
local tokens = KEYS[2] .. ':t:' .. window
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if tonumber(ARGV[2]) > 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return {1, 0} end
if tonumber(ARGV[3]) > 0 and tonumber(redis.call('GET', requests) or '0') >= tonumber(ARGV[3]) then
  return {2, left}
end
if tonumber(ARGV[4]) > 0 and tonumber(redis.call('GET', tokens) or '0') >= tonumber(ARGV[4]) then
  return {3, left}
end
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[5]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5])) + 1)
redis.call('INCR', requests)
redis.call('EXPIRE', requests, 2 * tonumber(ARGV[6]))
return {0, 0}
"""
# KEYS: concurrency set, counters' prefix. ARGV: member, tokens, window seconds.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local n = tonumber(ARGV[2])
if n > 0 then
  local now = redis.call('TIME')
  local window = math.floor((tonumber(now[1]) + tonumber(now[2]) / 1e6) / tonumber(ARGV[3]))
  local tokens = KEYS[2] .. ':t:' .. window
  redis.call('INCRBY', tokens, n)
  redis.call('EXPIRE', tokens, 2 * tonumber(ARGV[3]))
end
return 0
"""
# KEYS: concurrency sets, one per lease; ARGV: lease seconds, then the members in KEYS' order.
_RENEW = """
local now = redis.call('TIME')
local expiry = tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do redis.call('ZADD', key, 'XX', expiry, ARGV[i + 1]) end
return 0
"""
_WHICH = {1: "concurrent_streams", 2: "requests_per_minute", 3: "tokens_per_minute"}


class QuotaStoreUnavailable(GatewayError):
    def __init__(self) -> None:
        super().__init__(
            ErrorCode.JOURNAL_UNAVAILABLE, "the quota store (Redis) cannot be reached, and quotas fail closed; retry"
        )


class RedisQuotas(Quotas):
    """Counts in one Redis shared by every replica; see the module's docstring."""

    def __init__(
        self,
        url: str,
        *,
        fail_open: bool = True,
        prefix: str = "tokenwire:quota",
        on_rejected: Rejected | None = None,
        on_store_error: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(on_rejected)
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Short timeouts and no retries of redis-py's own: a quota check must fail fast.
        self._redis: Any = Redis.from_url(
            url,
            socket_timeout=_REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._release_script = self._redis.register_script(_RELEASE)
        self._renew_script = self._redis.register_script(_RENEW)
        self.fail_open = fail_open
        self.prefix = prefix
        self.on_store_error = on_store_error
        self._replica = uuid.uuid4().hex[:12]
        self._counter = itertools.count()
        # Leases held here, renewed together; those released wait in tasks of their own.
        self._held: dict[str, str] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._down_until = 0.0

    def _keys(self, caller_id: str) -> list[str]:
        return [f"{self.prefix}:{{{caller_id}}}:c", f"{self.prefix}:{{{caller_id}}}"]

    def _store_failed(self, what: str, exc: BaseException) -> GatewayError | None:
        self._down_until = time.monotonic() + _REDIS_BACKOFF_SECONDS
        if self.on_store_error is not None:
            self.on_store_error()
        log.warning(
            "quota store unreachable (%s: %s): requests are %s",
            what,
            type(exc).__name__,
            "let through uncounted" if self.fail_open else "refused",
        )
        return None if self.fail_open else QuotaStoreUnavailable()

    def _down(self) -> GatewayError | None:
        return None if self.fail_open else QuotaStoreUnavailable()

    async def _acquire(self, caller: Caller) -> Lease:
        if time.monotonic() < self._down_until:
            refused = self._down()
            if refused is not None:
                raise refused
            return Lease(None, caller)
        member = f"{self._replica}:{next(self._counter)}"
        keys = self._keys(caller.id)
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT_SECONDS):
                taken, left_ms = await self._acquire_script(
                    keys=keys,
                    args=[
                        member,
                        caller.max_concurrent_streams,
                        caller.requests_per_minute,
                        caller.tokens_per_minute,
                        LEASE_SECONDS,
                        WINDOW_SECONDS,
                    ],
                )
        except (OSError, TimeoutError, ConnectionError, _redis_errors()) as exc:
            refused = self._store_failed("acquire", exc)
            if refused is not None:
                raise refused from None
            return Lease(None, caller)
        if taken:
            raise self._reject(caller, _WHICH[int(taken)], int(left_ms) / 1000)
        if caller.max_concurrent_streams:
            self._held[member] = keys[0]
            if self._renewer is None:
                self._renewer = asyncio.get_running_loop().create_task(self._renew(), name="quota lease renewer")
        return Lease(self, caller, member)

    def give_back(self, lease: Lease, tokens: int) -> None:
        self._held.pop(lease.member, None)
        task = asyncio.get_running_loop().create_task(self._release(lease, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _release(self, lease: Lease, tokens: int) -> None:
        try:
            async with asyncio.timeout(2 * _REDIS_TIMEOUT_SECONDS):
                await self._release_script(
                    keys=self._keys(lease.caller.id), args=[lease.member, tokens, WINDOW_SECONDS]
                )
        except (OSError, TimeoutError, ConnectionError, _redis_errors()) as exc:
            # The slot frees itself when its lease runs out; the tokens are not counted.
            self._store_failed("release", exc)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            held = list(self._held.items())
            if not held:
                continue
            try:
                await self._renew_script(keys=[k for _, k in held], args=[LEASE_SECONDS, *(m for m, _ in held)])
            except (OSError, TimeoutError, ConnectionError, _redis_errors()) as exc:
                self._store_failed("renew", exc)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._pending:
            await asyncio.wait(self._pending, timeout=2.0)
        await self._redis.aclose()


def _redis_errors() -> type[Exception]:
    from redis.exceptions import RedisError

    return RedisError


def open_quotas(
    store: str,
    journal: str,
    *,
    fail_open: bool,
    on_rejected: Rejected | None = None,
    on_store_error: Callable[[], None] | None = None,
) -> Quotas:
    """The store `quota_store` names ("" follows the journal)."""
    url = store or ("" if journal == "memory" else journal)
    if not url or url == "memory":
        return MemoryQuotas(on_rejected)
    return RedisQuotas(url, fail_open=fail_open, on_rejected=on_rejected, on_store_error=on_store_error)
