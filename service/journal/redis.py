"""The Redis Streams journal: durable streams kept in one Redis, shared by every replica that uses it.

Keys, under a prefix ("tokenwire:" by default). `{stream_id}` is a Redis Cluster hash tag, so both
keys of one stream hash to one slot and a script may touch them together:

    <prefix>{<stream_id>}:rec   hash: token_digest, fingerprint, window, status, last_sequence,
                                expires_at, start_failure, owner (the record, see base.StreamRecord),
                                and last_read (Redis time in ms a reader on another replica last
                                marked it read)
    <prefix>{<stream_id>}:log   stream: entry `0-<sequence>`, field "p" = the payload's exact bytes
    <prefix>wake:<uuid4>        stream: wake-ups of this process's blocking reader (see `wait`)
    <prefix>replica:<id>        string, PX LEASE_SECONDS: the lease of the replica <id> (see below)
    <prefix>cancel:<id>         pub/sub channel: stream ids whose Cancel reached another replica

Entry ids are explicit, so besides the scripts' own check (status RUNNING and last_sequence ==
first - 1), a second writer is also fenced by XADD's rule that ids only grow. Both keys get
PEXPIREAT `expires_at`, so Redis forgets a stream by itself; its clock is the one that counts.

Every write is one Lua script (one round trip, atomic); a read is one pipeline (see `read`). Errors
map to the journal's own: Redis's OOM (maxmemory) to JournalFull, a connection error or timeout
to JournalUnavailable. Terminal appends and failed starts run a copy of their script flagged
`allow-oom`, so a full Redis can still end a stream clearly.

`wait` does not take a connection per stream: one task per RedisJournal runs `XREAD BLOCK` on a
dedicated connection over every log key being waited on (plus the wake key, which an XADD from
this process uses to interrupt the XREAD when a new key must join it) and wakes the waiters whose
keys got entries. A stream that vanished (expired) or failed before Start gets no entry: the reader
checks the waited-on records every BLOCK period (1 s), so those waiters return within about that.

Replicas. `start` gives this process a replica id (uuid4) and a lease: one key set with PX
LEASE_SECONDS and renewed every RENEW_SECONDS on a connection of its own (one round trip). Each
record names its owner. The reader's 1 s check also reads the waited streams' owners and asks, in
the same round, whether the distinct owners' lease keys exist; a waiter whose stream's owner has
none is woken, and its reader ends the stream with the fenced terminal append (service.durable).
So a replica that died is noticed between LEASE - RENEW and LEASE + 2 BLOCK seconds after it died
(2 to 5 s). A renewal that finds the key gone (this process stalled past the lease, or Redis lost
its data) or that has failed for a whole lease means other replicas may already have ended this
replica's streams: `on_lease_lost` is called, and the replica takes a new id and lease for new
streams. A lapsed id is never renewed, so a stream once seen ownerless stays so.

Cancels across replicas: each replica subscribes to one channel of its own (one pub/sub connection
per process, not per stream); a Cancel on another replica PUBLISHes the stream id there, and
PUBLISH's count of receivers tells it at once whether the owner is listening.

Readers on other replicas keep a stream from being abandoned: `reading` marks the streams they
hold, and one task writes `last_read` (Redis's own clock, so hosts' clocks never compare) for all of
them every TOUCH_SECONDS, one script per stream in one pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.journal.base import (
    Batch,
    Fenced,
    Journal,
    JournalError,
    JournalFull,
    JournalUnavailable,
    StreamRecord,
    StreamStatus,
)

log = logging.getLogger("tokenwire.journal")

# The record's fields, in the order every script and read returns them (HMGET).
_FIELDS = (
    "token_digest",
    "fingerprint",
    "window",
    "status",
    "last_sequence",
    "expires_at",
    "start_failure",
    "owner",
)
_HMGET_RECORD = "redis.call('HMGET', KEYS[1], " + ", ".join(f"'{f}'" for f in _FIELDS) + ")"
# The one field of a log entry.
_PAYLOAD = b"p"

# Scripts carry a shebang (Redis 7): without `allow-oom` Redis refuses the whole script when it is
# over maxmemory, before any write, so a refused append leaves nothing half done.
_CREATE = f"""#!lua
-- KEYS: rec, log. ARGV: token_digest, fingerprint, window, status, last_sequence, expires_at,
-- start_failure, expires_ms, owner. Returns nil when created, else the existing record.
local failure = redis.call('HGET', KEYS[1], 'start_failure')
if failure and failure == '' then
  return {_HMGET_RECORD}
end
-- No stream, or one that failed before Start (it has no messages): (re)create it. A log left
-- without its record would fence the first XADD, so it goes too.
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'token_digest', ARGV[1], 'fingerprint', ARGV[2], 'window', ARGV[3],
  'status', ARGV[4], 'last_sequence', ARGV[5], 'expires_at', ARGV[6], 'start_failure', ARGV[7],
  'owner', ARGV[9])
redis.call('PEXPIREAT', KEYS[1], ARGV[8])
return false
"""

_APPEND_BODY = """
-- KEYS: rec, log. ARGV: first_sequence, status, expires_at, expires_ms, payload...
local state = redis.call('HMGET', KEYS[1], 'status', 'last_sequence', 'start_failure')
if not state[1] then
  return redis.error_reply('FENCED the stream is gone')
end
if state[1] ~= 'RUNNING' or state[3] ~= '' then
  return redis.error_reply('FENCED the stream has ended')
end
local first = tonumber(ARGV[1])
local next_sequence = tonumber(state[2]) + 1
if first ~= next_sequence then
  return redis.error_reply(string.format('FENCED the stream continues at %d', next_sequence))
end
local last = first - 1
for i = 5, #ARGV do
  last = last + 1
  redis.call('XADD', KEYS[2], string.format('0-%d', last), 'p', ARGV[i])
end
redis.call('HSET', KEYS[1], 'last_sequence', string.format('%d', last), 'status', ARGV[2], 'expires_at', ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
redis.call('PEXPIREAT', KEYS[2], ARGV[4])
return last
"""
_APPEND = "#!lua\n" + _APPEND_BODY
# The terminal append: the same script, allowed to write when Redis is over maxmemory.
_APPEND_TERMINAL = "#!lua flags=allow-oom\n" + _APPEND_BODY

_FAIL_START = """#!lua flags=allow-oom
-- KEYS: rec. ARGV: failure, expires_at, expires_ms.
local state = redis.call('HMGET', KEYS[1], 'status', 'last_sequence', 'start_failure')
if not state[1] or state[1] ~= 'RUNNING' or state[3] ~= '' or state[2] ~= '0' then
  return redis.error_reply('FENCED the stream cannot fail before Start')
end
redis.call('HSET', KEYS[1], 'start_failure', ARGV[1], 'expires_at', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1
"""

# A reader on another replica marks the streams it reads this often (never creating a record).
_TOUCH = """#!lua
-- KEYS: rec. Sets last_read to Redis's time in ms, if the stream exists.
if redis.call('EXISTS', KEYS[1]) == 1 then
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'last_read', string.format('%d', ms))
  return 1
end
return 0
"""
# The age of last_read in seconds, by Redis's clock; nil when never marked.
_READ_AGE = """#!lua flags=no-writes,allow-oom
local last = redis.call('HGET', KEYS[1], 'last_read')
if not last then
  return false
end
local t = redis.call('TIME')
return tostring((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(last)) / 1000)
"""

# The lease: its key lives LEASE_SECONDS and is renewed every RENEW_SECONDS, so two renewals in a
# row may fail (a slow Redis, a busy loop) before it lapses.
LEASE_SECONDS = 3.0
RENEW_SECONDS = 1.0
TOUCH_SECONDS = 1.0
# A lease key seen present is trusted this long (a little less than a check period, so every
# check asks again).
_ALIVE_CACHE_SECONDS = 0.9
# The lapsed ids remembered (a replica takes a new id when its lease lapses; ids never come back).
_DEAD_CACHE_SIZE = 4096

# How long one XREAD blocks, which is also how soon a waiter notices a stream that vanished or
# failed before Start (neither writes an entry to wake it).
BLOCK_SECONDS = 1.0
# The blocking connection's socket timeout exceeds BLOCK by this much, so a blocked XREAD is never
# cut by its own timeout, while a Redis that stopped answering is still noticed.
_BLOCK_MARGIN = 2.0
# The wake stream keeps a few entries and lives an hour past its last use, in case this process
# dies without deleting it.
_WAKE_MAXLEN = 8
_WAKE_TTL_MS = 3_600_000
# Between XREADs that fail (Redis down), the reader backs off up to BLOCK_SECONDS.
_BACKOFF_FIRST = 0.05


@dataclass(slots=True, eq=False)
class _Waiter:
    after: int
    woken: asyncio.Future[None]


class RedisJournal(Journal):
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tokenwire:",
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        max_connections: int = 32,
        lease_seconds: float = LEASE_SECONDS,
        renew_seconds: float = RENEW_SECONDS,
    ) -> None:
        self.prefix = prefix
        self.url = url
        self._command_timeout = socket_timeout
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self._connect_timeout = connect_timeout
        # Commands: a bounded pool (a burst of streams queues for a connection instead of opening
        # hundreds), explicit timeouts, and no retries: a script whose reply was lost may have
        # run, and running it again would fence its own writer. A connection the server closed
        # (a restart) is not always noticed before use: once any command sees Redis fail, the
        # idle connections are dropped (`_outage`), so a restart costs at most the commands that
        # were sent before that, never a stream of failures.
        # RESP3 is pinned: it is what the tests run, and reply shapes differ between protocols.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            protocol=3,
            client_name="tokenwire-journal",
        )
        self._redis: Redis = Redis.from_pool(pool)
        # The blocking reader's own connection: its timeout outlasts the BLOCK, and retries are
        # off, so a dead Redis surfaces here as an error (the waiters return) instead of redis-py
        # re-sending the XREAD for a minute (its defaults: a 5 s timeout and ten retries).
        self._blocking: Redis = Redis.from_url(
            url,
            single_connection_client=True,
            socket_timeout=BLOCK_SECONDS + _BLOCK_MARGIN,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            protocol=3,
            client_name="tokenwire-journal-reader",
        )
        # The lease's own connection: a renewal never queues behind a burst of appends.
        self._lease_redis: Redis = Redis.from_url(
            url,
            single_connection_client=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            protocol=3,
            client_name="tokenwire-journal-lease",
        )
        # The cancel subscription's client (a PubSub takes one connection of its own from it).
        self._cancel_redis: Redis = Redis.from_url(
            url,
            socket_timeout=BLOCK_SECONDS + _BLOCK_MARGIN,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
            protocol=3,
            client_name="tokenwire-journal-cancels",
        )
        # Appends waiting for the next round trip, and the task that makes them (see `append`).
        self._appends: list[_Append] = []
        self._writing = False
        self._writer: asyncio.Task[None] | None = None
        self._create = self._redis.register_script(_CREATE)
        self._append = self._redis.register_script(_APPEND)
        self._append_terminal = self._redis.register_script(_APPEND_TERMINAL)
        self._fail_start = self._redis.register_script(_FAIL_START)
        self._touch = self._redis.register_script(_TOUCH)
        self._read_age = self._redis.register_script(_READ_AGE)

        # The lease and the cancel subscription (see `start`).
        self.replica = ""
        self._leased = False
        # Set when Redis failed a command: the next create checks the lease first.
        self._unverified = False
        self._flushing: asyncio.Task[None] | None = None
        self._lease_ok_at = 0.0
        self._lease_lost_told = False
        self._lease_task: asyncio.Task[None] | None = None
        self._cancel_task: asyncio.Task[None] | None = None
        self._on_cancel: Callable[[str], None] = lambda _sid: None
        self._on_lease_lost: Callable[[], None] = lambda: None
        self._subscribed = asyncio.Event()
        # Owners' lease keys: seen present (until when, monotonic), or seen gone (for good).
        self._alive_until: dict[str, float] = {}
        self._dead: set[str] = set()
        # Streams of other replicas read here: holders attached, and those to mark at the next touch.
        self._held: dict[str, int] = {}
        self._touched: set[str] = set()
        self._touch_task: asyncio.Task[None] | None = None

        self._waiters: dict[str, list[_Waiter]] = {}
        self._reader: asyncio.Task[None] | None = None
        # Set when a waiter arrives, for a reader that has nothing to watch.
        self._wanted = asyncio.Event()
        # What the XREAD in flight watches (stream id -> its cursor), None between XREADs.
        self._inflight: dict[str, int] | None = None
        self._nudged = False
        self._wake_key = f"{prefix}wake:{uuid.uuid4()}"
        self._wake_seen = b"0-0"
        self._next_check = 0.0
        self._closed = False

    def _rec(self, stream_id: str) -> str:
        return f"{self.prefix}{{{stream_id}}}:rec"

    def _log(self, stream_id: str) -> str:
        return f"{self.prefix}{{{stream_id}}}:log"

    async def create(self, record: StreamRecord) -> StreamRecord | None:
        sid = record.stream_id
        if record.owner and record.owner == self.replica and (not self._leased or self._unverified):
            # A record must never name an owner whose lease is not in Redis: others would end it.
            # After Redis failed us, the lease is checked first (a restarted Redis lost it).
            await self._verify_lease()
            record = replace(record, owner=self.replica)
        with self._noting_outage(), _mapped_errors():
            existing = await self._create(
                keys=[self._rec(sid), self._log(sid)],
                args=[
                    record.token_digest,
                    record.fingerprint,
                    repr(float(record.window)),
                    record.status.value,
                    record.last_sequence,
                    repr(float(record.expires_at)),
                    record.start_failure,
                    _ms(record.expires_at),
                    record.owner,
                ],
            )
        return None if existing is None else _record(sid, cast(list[bytes | None], existing))

    async def append(
        self,
        stream_id: str,
        first_sequence: int,
        payloads: Sequence[bytes],
        *,
        expires_at: float,
        status: StreamStatus = StreamStatus.RUNNING,
    ) -> None:
        # Appends of every stream of this process share round trips: an append with none in flight
        # goes out at once, by itself; the appends that queue while it is in flight go out after it
        # in one pipeline (never a wait to fill one).
        item = _Append(stream_id, first_sequence, payloads, expires_at, status, None)
        if self._writing:
            item.done = asyncio.get_running_loop().create_future()
            self._appends.append(item)
            await item.done
            return
        self._writing = True
        try:
            with self._noting_outage(), _mapped_errors():
                keys, args = self._append_args(item)
                await self._script_for(item)(keys=keys, args=args)
        finally:
            if self._appends:
                self._writer = asyncio.get_running_loop().create_task(self._write_queued(), name="journal appends")
            else:
                self._writing = False

    def _script_for(self, item: _Append) -> AsyncScript:
        return self._append if item.status is StreamStatus.RUNNING else self._append_terminal

    def _append_args(self, item: _Append) -> tuple[list[str], list[int | str | bytes]]:
        keys = [self._rec(item.stream_id), self._log(item.stream_id)]
        args: list[int | str | bytes] = [item.first_sequence, item.status.value]
        args += [repr(float(item.expires_at)), _ms(item.expires_at), *item.payloads]
        return keys, args

    async def _write_queued(self) -> None:
        try:
            while self._appends:
                batch, self._appends = self._appends, []
                await self._write_batch(batch)
        finally:
            self._writing = False
            for item in self._appends:  # only if this task was cancelled (a close)
                _settle(item.done, JournalUnavailable("the journal is closing"))
            self._appends = []

    async def _write_batch(self, batch: list[_Append]) -> None:
        try:
            with self._noting_outage(), _mapped_errors():
                async with self._redis.pipeline(transaction=False) as pipe:
                    for item in batch:
                        keys, args = self._append_args(item)
                        await self._script_for(item)(keys=keys, args=args, client=pipe)
                    results = await pipe.execute(raise_on_error=False)
        except JournalError as err:
            for item in batch:
                _settle(item.done, err)
            return
        except BaseException as exc:  # a bug, or a cancel: no writer waits forever
            for item in batch:
                _settle(item.done, exc if isinstance(exc, Exception) else JournalUnavailable("the journal is closing"))
            raise
        for item, result in zip(batch, results, strict=True):
            error: BaseException | None = None
            if isinstance(result, Exception):
                try:
                    with _mapped_errors():
                        raise result
                except JournalError as mapped:
                    error = mapped
            _settle(item.done, error)

    async def fail_start(self, stream_id: str, failure: bytes, *, expires_at: float) -> None:
        with _mapped_errors():
            await self._fail_start(
                keys=[self._rec(stream_id)], args=[failure, repr(float(expires_at)), _ms(expires_at)]
            )
        # This process's waiters learn it at once; other replicas' within a BLOCK period.
        self._wake(stream_id)

    async def get(self, stream_id: str) -> StreamRecord | None:
        with _mapped_errors():
            fields = await self._redis.hmget(self._rec(stream_id), _FIELDS)
        return _record(stream_id, cast(list[bytes | None], fields))

    async def read(self, stream_id: str, after: int, limit: int) -> Batch | None:
        # One round trip: a pipeline, not MULTI/EXEC, because Redis refuses every command queued
        # in a MULTI while it is over maxmemory, and a full journal must stay readable (its
        # streams' terminal entries are there). Without MULTI, the order keeps the pair coherent:
        # the record is read after the entries, so it is never older than they are; at worst it
        # is newer (the batch then is not terminal, and the next read brings the rest).
        with _mapped_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                if limit > 0:
                    pipe.xrange(self._log(stream_id), min=f"0-{max(after, 0) + 1}", max="+", count=limit)
                pipe.hmget(self._rec(stream_id), _FIELDS)
                replies = await pipe.execute()
        record = _record(stream_id, cast(list[bytes | None], replies[-1]))
        if record is None:
            return None
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], replies[0]) if limit > 0 else []
        return Batch([fields[_PAYLOAD] for _, fields in entries], record, after + 1)

    async def wait(self, stream_id: str, after: int, within: float) -> None:
        if within <= 0 or self._closed:
            return
        try:
            record = await self.get(stream_id)
        except JournalUnavailable:
            # Waiting on an unreachable store would only hang: the caller's next read says why.
            return
        if record is None or record.ended or record.last_sequence > after:
            return
        waiter = _Waiter(after, asyncio.get_running_loop().create_future())
        self._waiters.setdefault(stream_id, []).append(waiter)
        try:
            async with asyncio.timeout(within):
                await self._watch(stream_id, after)
                await waiter.woken
        except TimeoutError:
            pass
        finally:
            self._unwait(stream_id, waiter)

    async def aclose(self) -> None:
        self._closed = True
        if self._writer is not None and not self._writer.done():
            # Appends already handed over (terminal ones among them) go out before the close.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), self._command_timeout)
            self._writer.cancel()
        tasks = [
            t
            for t in (self._reader, self._lease_task, self._cancel_task, self._touch_task, self._flushing)
            if t is not None
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._reader = self._lease_task = self._cancel_task = self._touch_task = None
        for stream_id in list(self._waiters):
            self._wake(stream_id)
        with contextlib.suppress(RedisError, OSError):
            keys = [self._wake_key]
            if self._leased:
                # A clean stop: this replica's streams have ended (the drain), so its lease goes
                # at once; a stream it still owned would be ended by its readers right away.
                keys.append(self._lease_key(self.replica))
            await self._redis.delete(*keys)
        await self._blocking.aclose()
        await self._lease_redis.aclose()
        await self._cancel_redis.aclose()
        await self._redis.aclose()

    # Replicas: the lease, cancels from other replicas, readers elsewhere.

    async def start(self, on_cancel: Callable[[str], None], on_lease_lost: Callable[[], None]) -> None:
        self._on_cancel, self._on_lease_lost = on_cancel, on_lease_lost
        self.replica = uuid.uuid4().hex
        # A Redis that is down at start does not stop the server: ephemeral streams need none,
        # and the lease is taken by the renewal loop (or the first create) once it answers.
        with contextlib.suppress(JournalUnavailable, JournalError):
            await self._take_lease()
        loop = asyncio.get_running_loop()
        self._lease_task = loop.create_task(self._lease_loop(), name="redis-journal-lease")
        self._cancel_task = loop.create_task(self._cancel_loop(), name="redis-journal-cancels")
        # Cancels sent right after the first stream starts must be heard: wait (briefly) for the
        # subscription.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout + 1.0):
                await self._subscribed.wait()

    @contextlib.contextmanager
    def _noting_outage(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError):
            self._outage()
            raise

    def _outage(self) -> None:
        """Redis failed us: the lease is checked before the next create, and the pool's idle
        connections are dropped. Those may be connections to a Redis that restarted since: redis-py
        does not notice a peer's close on an idle connection before it sends on it, and commands
        are never retried here (a script whose reply was lost may have run)."""
        self._unverified = True
        if self._flushing is None or self._flushing.done():
            pool = self._redis.connection_pool
            self._flushing = asyncio.get_running_loop().create_task(pool.disconnect(inuse_connections=False))

    async def _verify_lease(self) -> None:
        """Renews the lease now, or takes a new one (and id) when it is gone."""
        if not self._leased:
            await self._take_lease()
            return
        with _mapped_errors():
            renewed = await self._lease_redis.set(
                self._lease_key(self.replica), b"1", px=int(self.lease_seconds * 1000), xx=True
            )
        if renewed:
            self._unverified = False
        else:
            self._lapsed_now()
            # The new id's lease before any record names it: a reader elsewhere that found an
            # owner without a lease would take it for dead, for good.
            await self._take_lease()

    def _lapsed_now(self) -> None:
        """The lease is gone: our streams are told, and a new id is taken (its lease by the caller
        or the next renewal)."""
        log.warning(
            "replica %s found its lease gone (a stall past %g s, or Redis lost it)", self.replica, self.lease_seconds
        )
        if not self._lease_lost_told:
            self._lease_lapsed()
        self._outage()  # a Redis that lost our lease may have restarted: fresh connections
        # A lapsed id is never taken again: a new id, a new lease, a new channel.
        self.replica, self._leased, self._unverified = uuid.uuid4().hex, False, False
        log.info("replica id is now %s", self.replica)

    def _lease_key(self, replica: str) -> str:
        return f"{self.prefix}replica:{replica}"

    def _cancel_channel(self, replica: str) -> str:
        return f"{self.prefix}cancel:{replica}"

    async def _take_lease(self) -> None:
        """Sets this replica's lease key (a new one: NX)."""
        sent = time.monotonic()
        with _mapped_errors():
            taken = await self._lease_redis.set(
                self._lease_key(self.replica), b"1", px=int(self.lease_seconds * 1000), nx=True
            )
        if not taken:
            raise JournalError(f"replica id {self.replica} is already leased")
        self._leased, self._lease_ok_at, self._lease_lost_told, self._unverified = True, sent, False, False

    async def _lease_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.renew_seconds)
            sent = time.monotonic()
            try:
                if not self._leased:
                    await self._take_lease()
                    continue
                with _mapped_errors():
                    renewed = await self._lease_redis.set(
                        self._lease_key(self.replica), b"1", px=int(self.lease_seconds * 1000), xx=True
                    )
            except JournalError as e:
                self._outage()
                if sent - self._lease_ok_at >= self.lease_seconds and not self._lease_lost_told:
                    # Whatever Redis holds now, the lease has run out: others may end our streams.
                    log.warning(
                        "replica %s could not renew its lease for %g s: %s", self.replica, self.lease_seconds, e
                    )
                    self._lease_lapsed()
                continue
            if renewed:
                # The same id renewed: a lapse told earlier (renewals failing) is over, and the next
                # one must be told again.
                self._lease_ok_at, self._unverified, self._lease_lost_told = sent, False, False
                continue
            self._lapsed_now()
            with contextlib.suppress(JournalError):
                await self._take_lease()

    def _lease_lapsed(self) -> None:
        self._lease_lost_told = True
        try:
            self._on_lease_lost()
        except Exception:
            log.exception("the lease-lost handler failed")

    async def owner_alive(self, owner: str) -> bool:
        if not owner or owner == self.replica:
            return True
        if owner in self._dead:
            return False
        if self._alive_until.get(owner, 0.0) > time.monotonic():
            return True
        try:
            await self._ask_owners([owner])
        except (RedisError, OSError):
            return True  # cannot be told: never end a stream on a guess
        return owner not in self._dead

    async def _ask_owners(self, owners: Sequence[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(self._lease_key(owner))
            found = await pipe.execute()
        until = time.monotonic() + _ALIVE_CACHE_SECONDS
        for owner, exists in zip(owners, found, strict=True):
            if exists:
                self._alive_until[owner] = until
            else:
                self._alive_until.pop(owner, None)
                if len(self._dead) >= _DEAD_CACHE_SIZE:
                    self._dead.clear()
                self._dead.add(owner)

    async def request_cancel(self, owner: str, stream_id: str) -> bool:
        with _mapped_errors():
            heard = await self._redis.publish(self._cancel_channel(owner), stream_id)
        return bool(heard)

    async def _cancel_loop(self) -> None:
        backoff = _BACKOFF_FIRST
        while not self._closed:
            pubsub: PubSub = self._cancel_redis.pubsub()
            channel = self._cancel_channel(self.replica)
            try:
                await pubsub.subscribe(channel)
                self._subscribed.set()
                backoff = _BACKOFF_FIRST
                while not self._closed:
                    if self._cancel_channel(self.replica) != channel:
                        break  # a new id after a lapsed lease: subscribe to its channel
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=BLOCK_SECONDS)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    stream_id = data.decode() if isinstance(data, bytes) else str(data)
                    try:
                        self._on_cancel(stream_id)
                    except Exception:
                        log.exception("the cancel handler failed for stream %s", stream_id)
            except (RedisError, OSError):
                self._subscribed.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BLOCK_SECONDS)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def reading(self, stream_id: str, delta: int) -> None:
        if delta:
            held = self._held.get(stream_id, 0) + delta
            if held > 0:
                self._held[stream_id] = held
            else:
                self._held.pop(stream_id, None)
        # Marked now (an attach, a poll) and again when it leaves: its window counts from then.
        self._touched.add(stream_id)
        if self._touch_task is None or self._touch_task.done():
            self._touch_task = asyncio.get_running_loop().create_task(self._touch_loop(), name="redis-journal-touch")

    async def _touch_loop(self) -> None:
        while not self._closed and (self._held or self._touched):
            sids = self._touched | set(self._held)
            self._touched = set()
            with contextlib.suppress(RedisError, OSError):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for sid in sids:
                        await self._touch(keys=[self._rec(sid)], client=pipe)
                    await pipe.execute()
            await asyncio.sleep(TOUCH_SECONDS)

    async def read_age(self, stream_id: str) -> float | None:
        with _mapped_errors():
            age = await self._read_age(keys=[self._rec(stream_id)])
        return None if age is None else float(age)

    # The blocking reader.

    async def _watch(self, stream_id: str, after: int) -> None:
        """Makes the reader watch `stream_id` from `after`: starts it, or interrupts its XREAD
        when that one does not cover this cursor."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="redis-journal-reader")
        self._wanted.set()
        inflight = self._inflight
        if inflight is None or self._nudged or inflight.get(stream_id, after + 1) <= after:
            # No XREAD in flight (the next one includes this waiter), one already interrupted,
            # or the one in flight wakes on any entry after this cursor.
            return
        self._nudged = True
        # A failure here means Redis is unreachable: the XREAD fails too and wakes everyone.
        with contextlib.suppress(RedisError, OSError):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {b"w": b""}, maxlen=_WAKE_MAXLEN, approximate=True)
                pipe.pexpire(self._wake_key, _WAKE_TTL_MS)
                await pipe.execute()

    async def _read_loop(self) -> None:
        backoff = _BACKOFF_FIRST
        while not self._closed:
            if not self._waiters:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            # One cursor per stream: the lowest of its waiters'; an entry past it wakes those
            # it is past, and the rest stay for the next round.
            watched = {sid: min(w.after for w in waiters) for sid, waiters in self._waiters.items()}
            by_key = {self._log(sid).encode(): sid for sid in watched}
            streams: dict[bytes | str | memoryview, int | bytes | str | memoryview] = {self._wake_key: self._wake_seen}
            streams.update({key: f"0-{max(watched[sid], 0)}" for key, sid in by_key.items()})
            self._inflight, self._nudged = watched, False
            try:
                reply = await self._blocking.xread(streams, count=1, block=int(BLOCK_SECONDS * 1000))
            except (RedisError, OSError):
                # Redis is down or silent (or refused the XREAD): every waiter returns, and its
                # next read says why, rather than hang; the reader tries again shortly.
                self._outage()
                for sid in list(self._waiters):
                    self._wake(sid)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BLOCK_SECONDS)
                continue
            finally:
                self._inflight = None
            backoff = _BACKOFF_FIRST
            for key, entry_id in _first_ids(reply).items():
                if key == self._wake_key.encode():
                    self._wake_seen = entry_id
                elif (woken := by_key.get(key)) is not None:
                    self._wake(woken, before=int(entry_id.split(b"-", 1)[1]))
            if time.monotonic() >= self._next_check:
                self._next_check = time.monotonic() + BLOCK_SECONDS
                await self._check_ended()

    async def _check_ended(self) -> None:
        """Wakes the waiters of streams that vanished or ended without an entry to say so, and of
        streams whose owner holds no lease (their readers end them): one round trip for the
        records, one more for the distinct owners' lease keys when some are not known alive."""
        sids = list(self._waiters)
        if not sids:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.hmget(self._rec(sid), ["status", "start_failure", "owner"])
                states = cast(list[list[bytes | None]], await pipe.execute())
        except (RedisError, OSError):
            states = [[None, None, None]] * len(sids)
        running = StreamStatus.RUNNING.value.encode()
        owned: dict[str, str] = {}
        for sid, (status, failure, owner) in zip(sids, states, strict=True):
            if status != running or failure:
                self._wake(sid)
            elif owner:
                owned[sid] = owner.decode()
        now = time.monotonic()
        ask = sorted(
            {
                o
                for o in owned.values()
                if o != self.replica and o not in self._dead and self._alive_until.get(o, 0.0) <= now
            }
        )
        if ask:
            with contextlib.suppress(RedisError, OSError):
                await self._ask_owners(ask)
        for sid, owner_id in owned.items():
            if owner_id in self._dead:
                self._wake(sid)

    def _wake(self, stream_id: str, *, before: int | None = None) -> None:
        """Wakes the stream's waiters (those whose cursor is below `before`, when given)."""
        waiters = self._waiters.get(stream_id)
        if not waiters:
            return
        # Woken waiters leave the list now, so the next XREAD no longer asks for what they had.
        keep: list[_Waiter] = []
        for w in waiters:
            if before is not None and w.after >= before:
                keep.append(w)
            elif not w.woken.done():
                w.woken.set_result(None)
        if keep:
            self._waiters[stream_id] = keep
        else:
            del self._waiters[stream_id]

    def _unwait(self, stream_id: str, waiter: _Waiter) -> None:
        waiters = self._waiters.get(stream_id)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[stream_id]


@contextlib.contextmanager
def _mapped_errors() -> Iterator[None]:
    try:
        yield
    except OutOfMemoryError as e:
        raise JournalFull(f"redis is over its maxmemory: {e}") from e
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError) as e:
        # ReadOnlyError: a replica after a failover; for this journal, the store is unavailable.
        raise JournalUnavailable(f"redis: {e}") from e
    except ResponseError as e:
        if str(e).startswith("FENCED"):
            raise Fenced(str(e).removeprefix("FENCED ")) from e
        raise JournalError(f"redis: {e}") from e


@dataclass(slots=True, eq=False)
class _Append:
    stream_id: str
    first_sequence: int
    payloads: Sequence[bytes]
    expires_at: float
    status: StreamStatus
    # Set while it waits in the queue; an append sent at once has none.
    done: asyncio.Future[None] | None


def _settle(done: asyncio.Future[None] | None, error: BaseException | None) -> None:
    if done is None or done.done():  # its writer was cancelled and left
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _ms(expires_at: float) -> int:
    # PEXPIREAT takes whole milliseconds; rounding up never forgets a stream early.
    return math.ceil(expires_at * 1000)


def _record(stream_id: str, fields: Sequence[bytes | None]) -> StreamRecord | None:
    token_digest, fingerprint, window, status, last_sequence, expires_at, start_failure, owner = fields
    if status is None:
        return None
    return StreamRecord(
        stream_id=stream_id,
        token_digest=token_digest or b"",
        fingerprint=fingerprint or b"",
        window=float(window or 0),
        status=StreamStatus(status.decode()),
        last_sequence=int(last_sequence or 0),
        expires_at=float(expires_at or 0),
        start_failure=start_failure or b"",
        owner=owner.decode() if owner else "",
    )


def _first_ids(reply: Any) -> dict[bytes, bytes]:
    """The first entry id per key in an XREAD reply."""
    # redis-py 8 answers RESP3 with {key: [[entries]]}, RESP2 with [[key, [entries]]].
    items = cast(Mapping[bytes, Any], reply).items() if isinstance(reply, Mapping) else (reply or [])
    first: dict[bytes, bytes] = {}
    for key, entries in items:
        while entries and isinstance(entries[0], list):
            entries = entries[0]
        if entries:
            first[key] = entries[0][0]
    return first
