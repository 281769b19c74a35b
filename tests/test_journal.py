"""The journal interface's guarantees, one suite run against every journal."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis
from redis_server import RedisServer, running_redis

from service.journal import Batch, Fenced, Journal, JournalFull, JournalUnavailable, StreamRecord, StreamStatus
from service.journal.memory import MemoryJournal
from service.journal.redis import BLOCK_SECONDS, RedisJournal

pytestmark = pytest.mark.timeout(20)


def _prefix() -> str:
    # Tests share one redis-server: each gets keys of its own.
    return f"tokenwire-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["memory", "redis"])
async def journal(request: pytest.FixtureRequest) -> AsyncIterator[Journal]:
    j: Journal
    if request.param == "memory":
        j = MemoryJournal(max_total_bytes=1 << 20)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        j = RedisJournal(server.url, prefix=_prefix())
    try:
        yield j
    finally:
        await j.aclose()


def _record(stream_id: str = "s1", *, ttl: float = 30.0, fingerprint: bytes = b"f" * 32) -> StreamRecord:
    return StreamRecord(
        stream_id=stream_id,
        token_digest=b"t" * 32,
        fingerprint=fingerprint,
        window=ttl,
        expires_at=time.time() + ttl,
    )


def _later(seconds: float = 30.0) -> float:
    return time.time() + seconds


async def test_create_is_idempotent_and_returns_the_winner(journal: Journal) -> None:
    assert await journal.create(_record()) is None
    existing = await journal.create(_record(fingerprint=b"g" * 32))
    assert existing is not None and existing.fingerprint == b"f" * 32
    record = await journal.get("s1")
    assert record is not None and record.status is StreamStatus.RUNNING and record.last_sequence == 0


async def test_concurrent_creates_have_one_winner(journal: Journal) -> None:
    results = await asyncio.gather(*(journal.create(_record(fingerprint=bytes([i]) * 32)) for i in range(8)))
    assert results.count(None) == 1


async def test_append_and_read_by_cursor(journal: Journal) -> None:
    await journal.create(_record())
    await journal.append("s1", 1, [b"a", b"b"], expires_at=_later())
    await journal.append("s1", 3, [b"c"], expires_at=_later())
    batch = await journal.read("s1", 0, 100)
    assert batch is not None and list(batch.payloads) == [b"a", b"b", b"c"] and batch.first == 1
    assert not batch.terminal and batch.last == 3
    middle = await journal.read("s1", 1, 1)
    assert middle is not None and list(middle.payloads) == [b"b"] and middle.first == 2 and middle.last == 2
    past = await journal.read("s1", 3, 10)
    assert past is not None and list(past.payloads) == [] and past.last == 3


async def test_payloads_are_kept_byte_exact(journal: Journal) -> None:
    await journal.create(_record())
    odd = [bytes(range(256)), b"", b"\x00\xff" * 1000]
    await journal.append("s1", 1, odd, expires_at=_later())
    batch = await journal.read("s1", 0, 10)
    assert batch is not None and list(batch.payloads) == odd


async def test_append_is_fenced(journal: Journal) -> None:
    await journal.create(_record())
    await journal.append("s1", 1, [b"a"], expires_at=_later())
    with pytest.raises(Fenced):
        await journal.append("s1", 1, [b"again"], expires_at=_later())  # a second writer
    with pytest.raises(Fenced):
        await journal.append("s1", 3, [b"gap"], expires_at=_later())
    with pytest.raises(Fenced):
        await journal.append("nobody", 1, [b"x"], expires_at=_later())
    batch = await journal.read("s1", 0, 10)
    assert batch is not None and list(batch.payloads) == [b"a"]


async def test_exactly_one_terminal_entry(journal: Journal) -> None:
    await journal.create(_record())
    await journal.append("s1", 1, [b"start"], expires_at=_later())
    outcomes = await asyncio.gather(
        journal.append("s1", 2, [b"finish"], expires_at=_later(), status=StreamStatus.FINISHED),
        journal.append("s1", 2, [b"cancel"], expires_at=_later(), status=StreamStatus.CANCELLED),
        journal.append("s1", 2, [b"lost"], expires_at=_later(), status=StreamStatus.FAILED),
        return_exceptions=True,
    )
    assert sum(o is None for o in outcomes) == 1
    assert all(isinstance(o, Fenced) for o in outcomes if o is not None)
    batch = await journal.read("s1", 0, 10)
    assert batch is not None and len(batch.payloads) == 2 and batch.terminal
    with pytest.raises(Fenced):
        await journal.append("s1", 3, [b"after the end"], expires_at=_later())


async def test_wait_wakes_on_append_and_end(journal: Journal) -> None:
    await journal.create(_record())
    waiter = asyncio.create_task(journal.wait("s1", 0, 10))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await journal.append("s1", 1, [b"a"], expires_at=_later())
    await asyncio.wait_for(waiter, 2)
    ending = asyncio.create_task(journal.wait("s1", 1, 10))
    await asyncio.sleep(0.05)
    await journal.append("s1", 2, [b"end"], expires_at=_later(), status=StreamStatus.FAILED)
    await asyncio.wait_for(ending, 2)
    started = time.monotonic()
    await journal.wait("s1", 2, 10)  # an ended stream: at once
    assert time.monotonic() - started < 1


async def test_wait_times_out_quietly(journal: Journal) -> None:
    await journal.create(_record())
    started = time.monotonic()
    await journal.wait("s1", 0, 0.2)
    assert 0.15 <= time.monotonic() - started < 2
    await journal.wait("unknown", 0, 5)  # nothing to wait for


async def test_many_waiters_of_one_stream(journal: Journal) -> None:
    await journal.create(_record())
    waiters = [asyncio.create_task(journal.wait("s1", 0, 10)) for _ in range(20)]
    await asyncio.sleep(0.05)
    waiters[0].cancel()  # one reader leaving does not disturb the others
    await journal.append("s1", 1, [b"a"], expires_at=_later())
    done, pending = await asyncio.wait(waiters[1:], timeout=2)
    assert not pending and len(done) == 19


async def test_ended_stream_expires(journal: Journal) -> None:
    await journal.create(_record())
    await journal.append("s1", 1, [b"a", b"end"], expires_at=time.time() + 0.3, status=StreamStatus.FINISHED)
    assert await journal.get("s1") is not None
    await asyncio.sleep(0.5)
    assert await journal.get("s1") is None
    assert await journal.read("s1", 0, 10) is None
    assert await journal.create(_record()) is None  # the id is free again


async def test_failed_start_is_replaced_by_a_new_create(journal: Journal) -> None:
    await journal.create(_record())
    await journal.fail_start("s1", b"error", expires_at=_later())
    record = await journal.get("s1")
    assert record is not None and record.start_failure == b"error" and record.ended
    assert await journal.create(_record(fingerprint=b"h" * 32)) is None
    record = await journal.get("s1")
    assert record is not None and record.fingerprint == b"h" * 32 and not record.start_failure


async def test_batch_terminal_only_with_the_last_message() -> None:
    record = StreamRecord("s", b"", b"", 1.0, status=StreamStatus.FINISHED, last_sequence=3)
    assert Batch([b"c"], record, 3).terminal
    assert not Batch([b"b"], record, 2).terminal
    assert not Batch([], record, 4).terminal


async def test_memory_journal_bounds_its_total() -> None:
    journal = MemoryJournal(max_total_bytes=100)
    await journal.create(_record())
    await journal.append("s1", 1, [b"x" * 60], expires_at=_later())
    with pytest.raises(JournalFull):
        await journal.append("s1", 2, [b"y" * 60], expires_at=_later())
    # The terminal entry always fits, so a full journal can still end the stream clearly.
    await journal.append("s1", 2, [b"e" * 60], expires_at=time.time() + 0.2, status=StreamStatus.FAILED)
    assert journal.total_bytes == 120
    await asyncio.sleep(0.4)
    assert await journal.get("s1") is None and journal.total_bytes == 0 and len(journal) == 0
    await journal.aclose()


# The Redis journal's own cases, against a real redis-server.


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, protocol=3)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_second_replica_sees_the_same_streams(redis_server: RedisServer) -> None:
    prefix = _prefix()
    a, b = RedisJournal(redis_server.url, prefix=prefix), RedisJournal(redis_server.url, prefix=prefix)
    try:
        assert await a.create(_record()) is None
        existing = await b.create(_record(fingerprint=b"g" * 32))
        assert existing is not None and existing.fingerprint == b"f" * 32
        waiter = asyncio.create_task(b.wait("s1", 0, 10))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        await a.append("s1", 1, [b"a", b"b"], expires_at=_later())
        await asyncio.wait_for(waiter, 2)
        batch = await b.read("s1", 0, 10)
        assert batch is not None and list(batch.payloads) == [b"a", b"b"] and batch.last == 2
        # Two writers at one sequence: one wins, the other is fenced, whichever replica it is on.
        outcomes = await asyncio.gather(
            a.append("s1", 3, [b"from a"], expires_at=_later()),
            b.append("s1", 3, [b"from b"], expires_at=_later()),
            return_exceptions=True,
        )
        assert sorted(type(o).__name__ for o in outcomes) == ["Fenced", "NoneType"]
        ending = asyncio.create_task(a.wait("s1", 3, 10))
        await asyncio.sleep(0.1)
        await b.append("s1", 4, [b"end"], expires_at=_later(), status=StreamStatus.FINISHED)
        await asyncio.wait_for(ending, 2)
        batch = await a.read("s1", 3, 10)
        assert batch is not None and batch.terminal and batch.record.status is StreamStatus.FINISHED
    finally:
        await a.aclose()
        await b.aclose()


async def _journal_clients(raw: Redis) -> dict[str, int]:
    counts: dict[str, int] = {}
    for client in await raw.client_list():
        name = str(client.get("name", ""))
        if name.startswith("tokenwire-journal"):
            key = f"{name} {client['cmd']}" if name == "tokenwire-journal-reader" else name
            counts[key] = counts.get(key, 0) + 1
    return counts


async def test_many_waiters_share_one_blocking_connection(redis_server: RedisServer, raw: Redis) -> None:
    prefix = _prefix()
    journal = RedisJournal(redis_server.url, prefix=prefix, max_connections=4)
    writer = RedisJournal(redis_server.url, prefix=prefix)
    try:
        ids = [f"s{i}" for i in range(50)]
        for sid in ids:
            await journal.create(_record(sid))
        assert await _journal_clients(raw) == {"tokenwire-journal": 1}
        waiters = []
        for round_ in range(5):
            waiters += [asyncio.create_task(journal.wait(sid, 0, 15)) for sid in ids[round_ * 10 : round_ * 10 + 10]]
            await asyncio.sleep(0.2)
            counts = await _journal_clients(raw)
            # One connection blocks in XREAD, however many streams are waited on; the commands'
            # pool stays within its bound.
            assert counts.get("tokenwire-journal-reader xread") == 1, counts
            assert sum(v for k, v in counts.items() if k.startswith("tokenwire-journal-reader")) == 1, counts
            assert counts.get("tokenwire-journal", 0) <= 4, counts
        assert not any(w.done() for w in waiters)
        # Written by another replica: only the XREAD can wake them.
        for sid in ids:
            await writer.append(sid, 1, [b"x"], expires_at=_later())
        done, pending = await asyncio.wait(waiters, timeout=3)
        assert not pending and len(done) == 50
    finally:
        await writer.aclose()
        await journal.aclose()


async def test_payloads_of_every_byte_value(redis_server: RedisServer, raw: Redis) -> None:
    prefix = _prefix()
    journal = RedisJournal(redis_server.url, prefix=prefix)
    try:
        await journal.create(_record())
        payloads = [bytes([i]) for i in range(256)] + [bytes(range(256)) * 64, b"", b"*1\r\n$-1\r\n\x00"]
        for first in range(0, len(payloads), 8):
            await journal.append("s1", first + 1, payloads[first : first + 8], expires_at=_later())
        batch = await journal.read("s1", 0, 1000)
        assert batch is not None and list(batch.payloads) == payloads and batch.last == len(payloads)
        # Stored as the brief says: entry 0-<sequence>, one field holding the bytes as they are.
        entries = await raw.xrange(f"{prefix}{{s1}}:log", "-", "+") or []
        assert [e[0] for e in entries] == [f"0-{n}".encode() for n in range(1, len(payloads) + 1)]
        assert [e[1] for e in entries] == [{b"p": p} for p in payloads]
    finally:
        await journal.aclose()


async def test_expiry_by_pexpireat(redis_server: RedisServer, raw: Redis) -> None:
    prefix = _prefix()
    journal = RedisJournal(redis_server.url, prefix=prefix)
    rec, log = f"{prefix}{{s1}}:rec", f"{prefix}{{s1}}:log"
    try:
        await journal.create(_record(ttl=0.4))
        assert await raw.exists(rec) == 1 and 0 < await raw.pttl(rec) <= 410
        await asyncio.sleep(0.6)
        assert await raw.exists(rec) == 0  # a running stream nobody wrote to: gone at its expiry
        await journal.create(_record())
        await journal.append("s1", 1, [b"a", b"end"], expires_at=time.time() + 0.5, status=StreamStatus.FINISHED)
        assert await raw.exists(rec, log) == 2
        assert 0 < await raw.pttl(rec) <= 510 and 0 < await raw.pttl(log) <= 510
        await asyncio.sleep(0.7)
        assert await raw.exists(rec, log) == 0
    finally:
        await journal.aclose()


async def test_a_waiter_returns_when_its_stream_vanishes_or_fails_elsewhere(redis_server: RedisServer) -> None:
    prefix = _prefix()
    journal, other = RedisJournal(redis_server.url, prefix=prefix), RedisJournal(redis_server.url, prefix=prefix)
    try:
        await journal.create(_record("short", ttl=0.3))
        await journal.create(_record("doomed"))
        started = time.monotonic()
        vanished = asyncio.create_task(journal.wait("short", 0, 10))
        failed = asyncio.create_task(journal.wait("doomed", 0, 10))
        await asyncio.sleep(0.1)
        await other.fail_start("doomed", b"error", expires_at=_later())  # on another replica
        await asyncio.wait_for(asyncio.gather(vanished, failed), 0.3 + 2 * BLOCK_SECONDS + 0.5)
        assert time.monotonic() - started < 0.3 + 2 * BLOCK_SECONDS + 0.5
    finally:
        await other.aclose()
        await journal.aclose()


async def test_aclose_leaves_no_task_behind(redis_server: RedisServer) -> None:
    before = asyncio.all_tasks()
    journal = RedisJournal(redis_server.url, prefix=_prefix())
    await journal.create(_record())
    waiter = asyncio.create_task(journal.wait("s1", 0, 10))
    await asyncio.sleep(0.1)
    await journal.aclose()
    await asyncio.wait_for(waiter, 1)  # its waiter returns
    assert asyncio.all_tasks() - before == set()
    await journal.wait("s1", 0, 10)  # closed: nothing to wait for


async def test_redis_down_then_back() -> None:
    with running_redis() as server:
        journal = RedisJournal(server.url, prefix=_prefix(), socket_timeout=0.5, connect_timeout=0.5)
        try:
            await journal.create(_record())
            await journal.append("s1", 1, [b"a"], expires_at=_later())
            waiter = asyncio.create_task(journal.wait("s1", 1, 15))
            await asyncio.sleep(0.2)
            server.stop()
            await asyncio.wait_for(waiter, 2)  # a dead Redis ends the wait; it does not hang
            with pytest.raises(JournalUnavailable):
                await journal.append("s1", 2, [b"b"], expires_at=_later())
            with pytest.raises(JournalUnavailable):
                await journal.read("s1", 0, 10)
            with pytest.raises(JournalUnavailable):
                await journal.create(_record("s2"))
            started = time.monotonic()
            await journal.wait("s1", 1, 10)
            assert time.monotonic() - started < 2
            server.start()  # no persistence: the streams are gone, the journal works again
            assert await journal.get("s1") is None
            assert await journal.create(_record()) is None
            waiter = asyncio.create_task(journal.wait("s1", 0, 10))
            await asyncio.sleep(0.1)
            await journal.append("s1", 1, [b"again"], expires_at=_later())
            await asyncio.wait_for(waiter, 2 + BLOCK_SECONDS)
        finally:
            await journal.aclose()


async def test_redis_silent_is_unavailable_within_the_timeouts() -> None:
    with running_redis() as server:
        journal = RedisJournal(server.url, prefix=_prefix(), socket_timeout=0.5, connect_timeout=0.5)
        assert server.process is not None
        try:
            await journal.create(_record())
            waiter = asyncio.create_task(journal.wait("s1", 0, 15))
            await asyncio.sleep(0.2)
            server.process.send_signal(signal.SIGSTOP)  # it accepts nothing and answers nothing
            started = time.monotonic()
            with pytest.raises(JournalUnavailable):
                await journal.append("s1", 1, [b"a"], expires_at=_later())
            assert time.monotonic() - started < 1.5
            # The blocked XREAD's socket timeout (BLOCK + 2 s) ends it, and so the wait.
            await asyncio.wait_for(waiter, BLOCK_SECONDS + 3)
        finally:
            server.process.send_signal(signal.SIGCONT)
            await journal.aclose()


async def test_redis_over_maxmemory_is_full_but_can_still_end_a_stream() -> None:
    with running_redis("--maxmemory-policy", "noeviction") as server:
        journal = RedisJournal(server.url, prefix=_prefix())
        raw = Redis.from_url(server.url, protocol=3)
        try:
            await journal.create(_record())
            used = int((await raw.info("memory"))["used_memory"])
            await raw.config_set("maxmemory", used + 256 * 1024)
            sequence, refused = 0, None
            while refused is None and sequence < 1000:
                try:
                    await journal.append("s1", sequence + 1, [b"x" * 8192], expires_at=_later())
                    sequence += 1
                except JournalFull as e:
                    refused = e
            assert refused is not None and 0 < sequence < 1000
            # Far over the limit now (its margin no longer depends on buffers coming and going).
            await raw.config_set("maxmemory", 1)
            with pytest.raises(JournalFull):
                await journal.append("s1", sequence + 1, [b"y"], expires_at=_later())
            with pytest.raises(JournalFull):
                await journal.create(_record("s2"))
            # The terminal entry is written all the same, and reads go on.
            await journal.append("s1", sequence + 1, [b"journal full"], expires_at=_later(), status=StreamStatus.FAILED)
            batch = await journal.read("s1", sequence, 10)
            assert batch is not None and list(batch.payloads) == [b"journal full"] and batch.terminal
        finally:
            await raw.aclose()
            await journal.aclose()


# Replicas: the owner, the lease, cancels across replicas, readers elsewhere (Redis only).


async def test_the_owner_is_kept_by_both_journals(journal: Journal) -> None:
    await journal.create(replace(_record("owned"), owner="replica-a"))
    record = await journal.get("owned")
    assert record is not None and record.owner == "replica-a"


async def _started(url: str, prefix: str, **kwargs: float) -> tuple[RedisJournal, list[str], list[int]]:
    j = RedisJournal(url, prefix=prefix, **kwargs)  # type: ignore[arg-type]
    cancels: list[str] = []
    lost: list[int] = []
    await j.start(cancels.append, lambda: lost.append(1))
    return j, cancels, lost


async def test_a_lease_lapses_when_its_replica_stops_renewing(redis_server: RedisServer, raw: Redis) -> None:
    prefix = _prefix()
    a, _, _ = await _started(redis_server.url, prefix, lease_seconds=0.6, renew_seconds=0.2)
    b, _, _ = await _started(redis_server.url, prefix)
    try:
        assert a.replica and b.replica and a.replica != b.replica
        ttl = await raw.pttl(f"{prefix}replica:{a.replica}")
        assert 0 < ttl <= 600
        await asyncio.sleep(1.0)  # renewed meanwhile
        assert await b.owner_alive(a.replica)
        assert a._lease_task is not None
        a._lease_task.cancel()  # a replica that stops renewing (SIGKILL, a partition)
        await asyncio.sleep(0.8)
        b._alive_until.clear()
        assert not await b.owner_alive(a.replica)
        assert await b.owner_alive("")  # a record with no owner: a journal of one process
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_waiter_is_woken_when_its_owner_lapses(redis_server: RedisServer) -> None:
    prefix = _prefix()
    a, _, _ = await _started(redis_server.url, prefix, lease_seconds=0.6, renew_seconds=0.2)
    b, _, _ = await _started(redis_server.url, prefix)
    try:
        await a.create(replace(_record("orphan"), owner=a.replica))
        assert a._lease_task is not None
        a._lease_task.cancel()
        started = time.monotonic()
        await b.wait("orphan", 0, 10.0)
        # The lease (0.6 s) plus at most two checks (1 s each).
        assert time.monotonic() - started < 0.6 + 2 * BLOCK_SECONDS + 0.5
        assert not await b.owner_alive(a.replica)
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_clean_close_drops_the_lease_at_once(redis_server: RedisServer, raw: Redis) -> None:
    prefix = _prefix()
    a, _, _ = await _started(redis_server.url, prefix)
    key = f"{prefix}replica:{a.replica}"
    assert await raw.exists(key)
    await a.aclose()
    assert not await raw.exists(key)


async def test_a_lease_found_gone_is_told_and_replaced(redis_server: RedisServer, raw: Redis) -> None:
    prefix = _prefix()
    a, _, lost = await _started(redis_server.url, prefix, lease_seconds=3.0, renew_seconds=0.1)
    try:
        old = a.replica
        await raw.delete(f"{prefix}replica:{old}")  # as if this process stalled past its lease
        for _ in range(50):
            if lost:
                break
            await asyncio.sleep(0.05)
        assert lost == [1]
        assert a.replica != old
        await asyncio.sleep(0.3)
        assert await raw.exists(f"{prefix}replica:{a.replica}")
    finally:
        await a.aclose()


async def test_cancel_reaches_the_owner_through_one_subscription(redis_server: RedisServer, raw: Redis) -> None:
    prefix = _prefix()
    a, cancels, _ = await _started(redis_server.url, prefix)
    b, _, _ = await _started(redis_server.url, prefix)
    try:
        assert await b.request_cancel(a.replica, "s-1")
        assert await b.request_cancel(a.replica, "s-2")
        for _ in range(100):
            if len(cancels) == 2:
                break
            await asyncio.sleep(0.01)
        assert cancels == ["s-1", "s-2"]
        assert not await b.request_cancel("nobody-listens", "s-3")
        # One subscription connection per replica, whatever the number of streams.
        clients = await raw.client_list()
        assert sum(1 for c in clients if c.get("name") == "tokenwire-journal-cancels") == 2
    finally:
        await a.aclose()
        await b.aclose()


async def test_readers_elsewhere_mark_the_stream_read(redis_server: RedisServer, raw: Redis) -> None:
    prefix = _prefix()
    a, _, _ = await _started(redis_server.url, prefix)
    b, _, _ = await _started(redis_server.url, prefix)
    try:
        await a.create(replace(_record("read"), owner=a.replica))
        assert await a.read_age("read") is None
        b.reading("read", +1)
        await asyncio.sleep(1.5)
        age = await a.read_age("read")
        assert age is not None and 0 <= age < 1.2  # marked again while held
        b.reading("read", -1)
        await asyncio.sleep(1.3)
        later = await a.read_age("read")
        assert later is not None and later > 0.2  # not marked after it left
        # A mark never creates a record.
        b.reading("gone", 0)
        await asyncio.sleep(0.2)
        assert not await raw.exists(f"{prefix}{{gone}}:rec")
    finally:
        await a.aclose()
        await b.aclose()


async def test_every_field_of_a_record_comes_back(journal: Journal) -> None:
    # A journal that builds records by hand must not drop a field the interface grows.
    record = dataclasses.replace(_record(), owner="replica-x", window=12.5)
    await journal.create(record)
    await journal.append("s1", 1, [b"a"], expires_at=record.expires_at)
    got = await journal.get("s1")
    assert got is not None
    expected = dataclasses.replace(record, last_sequence=1)
    for f in dataclasses.fields(StreamRecord):
        if f.name != "expires_at":
            assert getattr(got, f.name) == getattr(expected, f.name), f.name
    assert abs(got.expires_at - expected.expires_at) < 0.01


async def test_concurrent_appends_of_many_streams_each_get_their_own_answer(journal: Journal) -> None:
    # The Redis journal sends appends that queue behind one in flight together: each must still
    # be fenced, refused or done on its own.
    ids = [f"many-{i}" for i in range(30)]
    for stream_id in ids:
        assert await journal.create(_record(stream_id)) is None
    outcomes = await asyncio.gather(
        *(
            journal.append(stream_id, 2 if i == 7 else 1, [f"{stream_id}-a".encode()], expires_at=_later())
            for i, stream_id in enumerate(ids)
        ),
        return_exceptions=True,
    )
    assert isinstance(outcomes[7], Fenced)
    assert all(o is None for i, o in enumerate(outcomes) if i != 7)
    second = await asyncio.gather(
        *(
            journal.append(stream_id, 2, [f"{stream_id}-b".encode()], expires_at=_later(), status=StreamStatus.FINISHED)
            for stream_id in ids
            if stream_id != "many-7"
        )
    )
    assert second == [None] * 29
    for stream_id in ids:
        batch = await journal.read(stream_id, 0, 10)
        assert batch is not None
        expected = [] if stream_id == "many-7" else [f"{stream_id}-a".encode(), f"{stream_id}-b".encode()]
        assert list(batch.payloads) == expected


async def test_a_record_never_names_an_owner_without_a_lease(redis_server: RedisServer, raw: Redis) -> None:
    # Redis restarted without persistence: the lease is gone, and the first create after the outage
    # finds it so. The record it writes must name a replica whose lease is already back, or a reader
    # elsewhere would take the owner for dead (for good) and end its live streams.
    prefix = _prefix()
    a, _, _ = await _started(redis_server.url, prefix, renew_seconds=30.0)  # no renewal during the test
    b, _, _ = await _started(redis_server.url, prefix)
    try:
        await raw.delete(f"{prefix}replica:{a.replica}")
        a._unverified = True  # as after a failed command
        await a.create(replace(_record("after-restart"), owner=a.replica))
        record = await a.get("after-restart")
        assert record is not None and record.owner == a.replica
        assert await raw.exists(f"{prefix}replica:{record.owner}")
        assert await b.owner_alive(record.owner)
    finally:
        await a.aclose()
        await b.aclose()
