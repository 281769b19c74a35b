"""The producer's in-process tail (service.durable._Tail): readers in the producing process read what
the journal acknowledged from the producer's memory instead of reading it back from a journal that is
not in process (Redis), and never anything else.

The journal here is the memory journal told it is not in process (so the producer keeps a tail),
with appends that can be held, refused or answered with an error after they landed; and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from redis.asyncio import Redis
from redis_server import RedisServer

import service.durable as durable_module
import service.server
from conftest import FAST, TEST_ROUTES, Running, assert_well_formed, collect, eventually, read_to_end, request
from service.config import ServerConfig
from service.durable import DurableStreams, Follower, _Tail
from service.journal import Batch, JournalUnavailable, StreamStatus
from service.journal.memory import MemoryJournal
from service.supervisor import StreamSupervisor
from tokenwire.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(30)

ROUTES: dict[str, dict[str, Any]] = TEST_ROUTES | {
    # 120 tokens at 200/s: long enough to act in the middle, short enough to read to its end.
    "paced": {
        "provider": "recording",
        "model": "m",
        "options": FAST | {"tokens_per_second": 200, "answer_tokens": 120},
    },
}


def durable(model: str = "paced", **fields: Any) -> pb.GenerateRequest:
    window = duration_pb2.Duration()
    window.FromSeconds(30)
    return request(model, resume_window=window, **fields)


class HeldJournal(MemoryJournal):
    """A memory journal taken for one that is not in process, whose append at `hold_at` waits for
    `release` before it writes, and then may fail: "refused" (nothing written) or "landed" (written,
    but the producer is told it failed, as when Redis ran a script whose reply was lost)."""

    in_process = False

    def __init__(self, hold_at: int = 0, fail: str = "") -> None:
        super().__init__()
        self.hold_at = hold_at
        self.fail = fail
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.reads = 0
        self.waits = 0

    async def append(
        self,
        stream_id: str,
        first_sequence: int,
        payloads: Sequence[bytes],
        *,
        expires_at: float,
        status: StreamStatus = StreamStatus.RUNNING,
    ) -> None:
        if first_sequence == self.hold_at and status is StreamStatus.RUNNING and not self.held.is_set():
            self.held.set()
            await self.release.wait()
            if self.fail == "refused":
                raise JournalUnavailable("refused: nothing written")
            await super().append(stream_id, first_sequence, payloads, expires_at=expires_at, status=status)
            if self.fail == "landed":
                raise JournalUnavailable("written, but the reply was lost")
            return
        await super().append(stream_id, first_sequence, payloads, expires_at=expires_at, status=status)

    async def read(self, stream_id: str, after: int, limit: int) -> Batch | None:
        self.reads += 1
        return await super().read(stream_id, after, limit)

    async def wait(self, stream_id: str, after: int, within: float) -> None:
        self.waits += 1
        await super().wait(stream_id, after, within)

    async def aclose(self) -> None:
        pass  # shared by the servers of a test: kept until the test ends


async def start_on(
    start_server: Callable[..., Any], journal: MemoryJournal, monkeypatch: pytest.MonkeyPatch
) -> Running:
    monkeypatch.setattr(service.server, "open_journal", lambda url, **_: journal)
    running: Running = await start_server(ROUTES)
    return running


async def journal_payloads(journal: MemoryJournal, stream_id: str) -> list[bytes]:
    """The stream as a reader on another replica reads it: a DurableStreams with no producer."""
    config = ServerConfig()
    elsewhere = DurableStreams(None, StreamSupervisor(config), journal, config)  # type: ignore[arg-type]
    assert stream_id not in elsewhere.producers
    return [p async for batch in Follower(elsewhere, stream_id, 0).batches() for p in batch]


def wire(messages: list[pb.GenerateResponse]) -> list[bytes]:
    return [m.SerializeToString() for m in messages]


async def test_the_tail_is_bounded_and_contiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable_module, "TAIL_MAX_MESSAGES", 8)
    monkeypatch.setattr(durable_module, "TAIL_MAX_BYTES", 100)
    tail = _Tail()
    assert tail.covers(0) and tail.after(0, 10) == []
    for sequence in range(1, 501):
        tail.push(sequence, b"%d" % sequence)
        assert len(tail) <= 8 and tail.size <= 100
    assert (tail.first, tail.last, len(tail)) == (493, 500, 8)
    assert tail.after(492, 100) == [b"%d" % n for n in range(493, 501)]
    assert tail.after(498, 1) == [b"499"]
    assert not tail.covers(491) and tail.covers(492) and tail.covers(500) and not tail.covers(501)
    # By bytes: one large message is kept alone, never none.
    tail.push(501, b"x" * 1000)
    assert (tail.first, len(tail), tail.after(500, 5)) == (501, 1, [b"x" * 1000])
    # A sequence that does not follow closes the tail instead of holding a gap.
    tail.push(503, b"gap")
    assert tail.closed and tail.last == 501
    tail.release()
    assert len(tail) == 0 and tail.size == 0


async def test_a_tail_wait_wakes_on_a_push_and_on_the_close_and_times_out() -> None:
    tail = _Tail()
    tail.push(1, b"one")
    assert await tail.wait(0, 5.0)  # already there
    waiting = asyncio.ensure_future(tail.wait(1, 5.0))
    await asyncio.sleep(0)
    tail.push(2, b"two")
    assert await asyncio.wait_for(waiting, 1.0)
    assert await tail.wait(2, 0.01) is False  # nothing came
    cancelled = asyncio.ensure_future(tail.wait(2, 5.0))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert not tail._waiters  # a cancelled reader leaves nothing behind
    closing = asyncio.ensure_future(tail.wait(2, 5.0))
    await asyncio.sleep(0)
    tail.close()
    assert await asyncio.wait_for(closing, 1.0)


async def test_a_memory_journal_gets_no_tail(start_server: Callable[..., Any]) -> None:
    running: Running = await start_server(ROUTES, journal="memory")
    call: Any = running.stub.Generate(durable(request_id="no-tail"))
    first = await call.read()
    assert first.WhichOneof("event") == "start"
    producer = running.server.gateway.durable.producers["no-tail"]
    assert producer.tail is None
    messages, code, _ = await read_to_end(call, [first])
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)


async def test_an_append_not_yet_acknowledged_is_not_served(
    start_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = HeldJournal(hold_at=5)
    running = await start_on(start_server, journal, monkeypatch)
    call: Any = running.stub.Generate(durable(request_id="held"))
    seen: list[pb.GenerateResponse] = []

    async def read() -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            seen.append(message)

    reader = asyncio.ensure_future(read())
    await asyncio.wait_for(journal.held.wait(), 5.0)
    await asyncio.sleep(0.3)  # the held write is pending: whatever was served by now is all there is
    assert [m.sequence for m in seen] == [1, 2, 3, 4]
    journal.release.set()
    await asyncio.wait_for(reader, 10.0)
    assert await call.code() == grpc.StatusCode.OK
    assert_well_formed(seen)
    assert seen[-1].WhichOneof("event") == "finish"
    assert wire(seen) == await journal_payloads(journal, "held")
    assert journal.reads == 1  # the first caller read the tail; the one read is the other replica's


@pytest.mark.parametrize("fail", ["refused", "landed"])
async def test_a_failed_append_ends_the_stream_as_resume_elsewhere_tells_it(
    start_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    journal = HeldJournal(hold_at=5, fail=fail)
    running = await start_on(start_server, journal, monkeypatch)
    call: Any = running.stub.Generate(durable(request_id=f"fails-{fail}"))
    seen: list[pb.GenerateResponse] = []

    async def read() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # the status is read below
            while (message := await call.read()) is not grpc.aio.EOF:
                seen.append(message)

    reader = asyncio.ensure_future(read())
    await asyncio.wait_for(journal.held.wait(), 5.0)
    await asyncio.sleep(0.2)
    assert [m.sequence for m in seen] == [1, 2, 3, 4]
    journal.release.set()
    await asyncio.wait_for(reader, 10.0)
    assert await call.code() == grpc.StatusCode.UNAVAILABLE
    assert_well_formed(seen)
    assert seen[-1].error.code == pb.ERROR_CODE_JOURNAL_UNAVAILABLE
    # The refused message was never served; the one that landed was, from the journal, where the
    # tail had stopped: the first caller saw exactly what a reader on another replica reads.
    assert len(seen) == (5 if fail == "refused" else 6)
    assert wire(seen) == await journal_payloads(journal, f"fails-{fail}")


async def test_a_reader_behind_the_tail_reads_the_journal_and_the_tail_goes_with_its_readers(
    start_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable_module, "TAIL_MAX_MESSAGES", 8)
    journal = HeldJournal()
    running = await start_on(start_server, journal, monkeypatch)
    streams = running.server.gateway.durable
    call: Any = running.stub.Generate(durable(request_id="behind"))
    first: list[pb.GenerateResponse] = []
    while len(first) < 30:
        message = await call.read()
        assert message is not grpc.aio.EOF
        first.append(message)
    producer = streams.producers["behind"]
    tail = producer.tail
    assert tail is not None and len(tail) <= 8 and tail.first > 1
    assert journal.reads == 0  # the first caller reads the tail
    token = first[0].start.resume_token
    # A reader here from the start: the journal for what the tail dropped, then the tail.
    resumed, code, _ = await collect(running.stub.Resume(pb.ResumeRequest(stream_id="behind", resume_token=token)))
    assert code == grpc.StatusCode.OK
    assert journal.reads >= 1
    assert journal.waits == 0  # caught up, it went back to the tail rather than wait on the journal
    rest, code, _ = await read_to_end(call)
    assert code == grpc.StatusCode.OK
    whole = first + rest
    assert_well_formed(whole)
    assert wire(resumed) == wire(whole) == await journal_payloads(journal, "behind")
    # The producer ended and its readers here left: the tail is gone.
    await eventually(lambda: "behind" not in streams.producers, within=2.0)
    assert producer.tail is None


async def test_a_reader_at_the_tail_of_an_ended_producer_reads_its_terminal_from_the_journal(
    start_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A terminal the producer did not write (a Cancel's fenced write, a reaper) is in the journal only.
    journal = HeldJournal()
    running = await start_on(start_server, journal, monkeypatch)
    streams = running.server.gateway.durable
    call: Any = running.stub.Generate(durable(request_id="closed"))
    first = [await call.read(), await call.read()]
    producer = streams.producers["closed"]
    assert producer.tail is not None
    # Fenced out from under the producer: the terminal is written by someone else.
    record = await journal.get("closed")
    assert record is not None
    cut = record.last_sequence
    await streams._append_terminal(record, durable_module.stream_cancelled())
    messages, code, _ = await read_to_end(call, first)
    assert code == grpc.StatusCode.CANCELLED
    assert_well_formed(messages)
    assert messages[-1].sequence == cut + 1 and messages[-1].error.code == pb.ERROR_CODE_STREAM_CANCELLED
    assert wire(messages) == await journal_payloads(journal, "closed")


async def test_on_redis_the_first_caller_reads_nothing_back_and_sees_what_resume_elsewhere_gives(
    start_server: Callable[..., Any], redis_server: RedisServer
) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    producing: Running = await start_server(ROUTES, journal=redis_server.url)
    other: Running = await start_server(ROUTES, journal=redis_server.url)
    journal = producing.server.journal
    reads = 0
    read = journal.read

    async def counted(stream_id: str, after: int, limit: int) -> Batch | None:
        nonlocal reads
        reads += 1
        return await read(stream_id, after, limit)

    journal.read = counted  # type: ignore[method-assign]
    sid = f"redis-tail-{time.time_ns()}"
    first, code, _ = await collect(producing.stub.Generate(durable(request_id=sid)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(first)
    assert reads == 0
    token = first[0].start.resume_token
    again, code, _ = await collect(other.stub.Resume(pb.ResumeRequest(stream_id=sid, resume_token=token)))
    assert code == grpc.StatusCode.OK
    assert wire(again) == wire(first)
    middle, code, _ = await collect(
        other.stub.Resume(pb.ResumeRequest(stream_id=sid, resume_token=token, after_sequence=len(first) // 2))
    )
    assert code == grpc.StatusCode.OK and wire(middle) == wire(first)[len(first) // 2 :]


def test_with_no_reader_here_the_tail_holds_nothing_yet_stays_at_the_head() -> None:
    tail = _Tail()
    for sequence in range(1, 101):
        tail.push(sequence, b"x" * 100, hold=False)
    assert len(tail) == 0 and tail.size == 0
    # A reader at the head waits on the tail; one behind it reads the journal.
    assert tail.covers(100) and not tail.covers(99)
    tail.push(101, b"next")
    assert tail.after(100, 10) == [b"next"] and len(tail) == 1
    tail.push(102, b"end", terminal=True, hold=False)
    assert tail.terminal and tail.closed and len(tail) == 0
