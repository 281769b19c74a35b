"""The journal interface's guarantees, one suite run against every journal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from service.journal import Batch, Fenced, Journal, StreamRecord, StreamStatus
from service.journal.memory import MemoryJournal

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(params=["memory"])
async def journal(request: pytest.FixtureRequest) -> AsyncIterator[Journal]:
    j: Journal = MemoryJournal(max_total_bytes=1 << 20)
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
    from service.journal import JournalFull

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
