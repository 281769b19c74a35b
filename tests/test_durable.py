"""Durable streams end to end: a real server, real channels, every durable-stream case of QUALITY.md.

Every test runs on each journal (see `journal_url`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from fakes import FakeAnthropic, FakeOpenAI, StreamReply
from fakes.proxy import FaultProxy
from google.protobuf import duration_pb2
from redis.asyncio import Redis
from redis_server import RedisServer, running_redis

from conftest import (
    FAST,
    TEST_ROUTES,
    ErrorInfo,
    Recorder,
    Running,
    assert_well_formed,
    collect,
    detail,
    eventually,
    read_to_end,
    request,
    rich_status,
    vendor_route,
)
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(30)

ROUTES: dict[str, dict[str, Any]] = TEST_ROUTES | {
    # Deterministic and quick, but slow enough to be broken in the middle: 200 tokens at 400/s.
    "paced": {
        "provider": "recording",
        "model": "m",
        "options": FAST | {"tokens_per_second": 400, "answer_tokens": 200},
    },
}


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


def durable(model: str = "paced", window: float = 30.0, **fields: Any) -> pb.GenerateRequest:
    return request(model, resume_window=seconds(window), **fields)


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.text_delta.text for m in messages if m.WhichOneof("event") == "text_delta")


@pytest.fixture(params=["memory", "redis"])
async def journal_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    server: RedisServer = request.getfixturevalue("redis_server")
    # The tests reuse stream ids: each starts from an empty database.
    client = Redis.from_url(server.url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return server.url


@pytest.fixture
async def server(start_server: Callable[..., Any], journal_url: str) -> Running:
    running: Running = await start_server(ROUTES, journal=journal_url)
    return running


async def read_some(call: Any, n: int) -> list[pb.GenerateResponse]:
    messages: list[pb.GenerateResponse] = []
    while len(messages) < n:
        message = await call.read()
        assert message is not grpc.aio.EOF
        messages.append(message)
    return messages


async def reference_text(stub: pb_grpc.GenerationServiceAsyncStub, model: str = "paced") -> str:
    """The answer of an unbroken, ephemeral run of the same deterministic request."""
    messages, code, _ = await collect(stub.Generate(request(model)))
    assert code == grpc.StatusCode.OK
    return text_of(messages)


async def test_durable_stream_reads_to_its_finish_with_a_token(server: Running) -> None:
    messages, code, _ = await collect(server.stub.Generate(durable("sim", request_id="d-1")))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    start = messages[0].start
    assert start.stream_id == "d-1"
    assert len(start.resume_token) >= 22  # 128 bits at least, URL-safe base64
    assert start.resume_window.ToSeconds() == 30
    assert messages[-1].WhichOneof("event") == "finish"


async def test_ephemeral_start_has_no_token(server: Running) -> None:
    messages, _, _ = await collect(server.stub.Generate(request("sim")))
    assert messages[0].start.resume_token == "" and not messages[0].start.HasField("resume_window")


async def test_window_is_capped_and_checked(start_server: Callable[..., Any], journal_url: str) -> None:
    running: Running = await start_server(ROUTES, journal=journal_url, max_resume_window_seconds=5.0)
    messages, _, _ = await collect(running.stub.Generate(durable("sim", window=3600)))
    assert messages[0].start.resume_window.ToSeconds() == 5
    _, code, trailing = await collect(running.stub.Generate(durable("sim", window=0.2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "resume_window" in rich_status(trailing).message


async def test_broken_call_resumes_to_the_identical_answer(server: Running, recorder: Recorder) -> None:
    expected = await reference_text(server.stub)
    call = server.stub.Generate(durable(request_id="broken"))
    first = await read_some(call, 12)
    call.cancel()  # the caller's connection breaks at message 12
    token = first[0].start.resume_token
    rest, code, _ = await collect(
        server.stub.Resume(pb.ResumeRequest(stream_id="broken", resume_token=token, after_sequence=12))
    )
    assert code == grpc.StatusCode.OK
    whole = first + rest
    assert_well_formed(whole)
    assert text_of(whole) == expected
    assert len(recorder.requests) == 2  # the reference run and this one: the provider was called once


async def test_resumed_messages_are_byte_identical(server: Running) -> None:
    first, code, _ = await collect(server.stub.Generate(durable("sim", request_id="same")))
    assert code == grpc.StatusCode.OK
    token = first[0].start.resume_token
    again, code, _ = await collect(server.stub.Resume(pb.ResumeRequest(stream_id="same", resume_token=token)))
    assert code == grpc.StatusCode.OK
    assert [m.SerializeToString() for m in again] == [m.SerializeToString() for m in first]


async def test_resume_from_the_middle_the_last_and_past_it(server: Running) -> None:
    messages, _, _ = await collect(server.stub.Generate(durable("sim", request_id="cursor")))
    token = messages[0].start.resume_token
    last = messages[-1].sequence

    async def resume(after: int) -> tuple[list[pb.GenerateResponse], grpc.StatusCode, Any]:
        return await collect(
            server.stub.Resume(pb.ResumeRequest(stream_id="cursor", resume_token=token, after_sequence=after))
        )

    middle, code, _ = await resume(3)
    assert code == grpc.StatusCode.OK and [m.sequence for m in middle] == list(range(4, last + 1))
    at_end, code, _ = await resume(last)
    assert code == grpc.StatusCode.OK and at_end == []
    past, code, trailing = await resume(last + 1)
    assert code == grpc.StatusCode.OUT_OF_RANGE and past == []
    assert detail(rich_status(trailing), ErrorInfo).reason == "CURSOR_OUT_OF_RANGE"


async def test_status_of_a_resume_mirrors_the_terminal_error(server: Running) -> None:
    messages, code, _ = await collect(server.stub.Generate(durable("error-after-3", request_id="fails")))
    assert code == grpc.StatusCode.UNAVAILABLE
    token = messages[0].start.resume_token
    last = messages[-1].sequence
    for after in (0, last):  # also from the terminal message itself: nothing sent, same status
        _, code, trailing = await collect(
            server.stub.Resume(pb.ResumeRequest(stream_id="fails", resume_token=token, after_sequence=after))
        )
        assert code == grpc.StatusCode.UNAVAILABLE
        assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_UNAVAILABLE"


async def test_unknown_id_and_wrong_token_are_the_same_not_found(server: Running) -> None:
    messages, _, _ = await collect(server.stub.Generate(durable("sim", request_id="mine")))
    token = messages[0].start.resume_token
    answers = []
    for stream_id, tok in (("mine", token[:-1] + ("A" if token[-1] != "A" else "B")), ("nobody", token), ("mine", "")):
        _, code, trailing = await collect(server.stub.Resume(pb.ResumeRequest(stream_id=stream_id, resume_token=tok)))
        status = rich_status(trailing)
        answers.append((code, status.message, detail(status, ErrorInfo).reason))
    assert answers[0][0] == grpc.StatusCode.NOT_FOUND and answers[0][2] == "STREAM_NOT_FOUND"
    assert answers[0] == answers[1] == answers[2]
    with pytest.raises(grpc.aio.AioRpcError) as poll:
        await server.stub.Poll(pb.PollRequest(stream_id="mine", resume_token="wrong"))
    assert poll.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as cancel:
        await server.stub.Cancel(pb.CancelRequest(stream_id="mine", resume_token="wrong"))
    assert cancel.value.code() == grpc.StatusCode.NOT_FOUND


async def test_ended_stream_expires_after_its_window(server: Running) -> None:
    messages, _, _ = await collect(server.stub.Generate(durable("sim", window=1.0, request_id="short")))
    token = messages[0].start.resume_token
    _, code, _ = await collect(server.stub.Resume(pb.ResumeRequest(stream_id="short", resume_token=token)))
    assert code == grpc.StatusCode.OK
    await asyncio.sleep(1.3)
    _, code, _ = await collect(server.stub.Resume(pb.ResumeRequest(stream_id="short", resume_token=token)))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_many_concurrent_readers_of_one_stream(server: Running) -> None:
    call = server.stub.Generate(durable(request_id="crowd"))
    first = await read_some(call, 1)
    token = first[0].start.resume_token
    readers = [collect(server.stub.Resume(pb.ResumeRequest(stream_id="crowd", resume_token=token))) for _ in range(25)]
    results = await asyncio.gather(read_to_end(call), *readers)
    own = first + results[0][0]
    assert_well_formed(own)
    for messages, code, _ in results[1:]:
        assert code == grpc.StatusCode.OK
        assert [m.SerializeToString() for m in messages] == [m.SerializeToString() for m in own]


async def test_cancel_mid_stream_closes_the_provider_and_ends_every_reader(server: Running, recorder: Recorder) -> None:
    call = server.stub.Generate(durable("slow", request_id="stop-me"))
    first = await read_some(call, 5)
    token = first[0].start.resume_token
    other = server.stub.Resume(pb.ResumeRequest(stream_id="stop-me", resume_token=token, after_sequence=2))
    loop = asyncio.get_running_loop()
    sent = loop.time()
    answer = await server.stub.Cancel(pb.CancelRequest(stream_id="stop-me", resume_token=token))
    assert answer.state.status == pb.STREAM_STATUS_CANCELLED
    await eventually(lambda: len(recorder.closed) == 1, within=1.0)
    assert recorder.closed[0] - sent < 0.2
    assert recorder.finished == [False]
    rest, code, trailing = await read_to_end(call)
    whole = first + rest
    assert_well_formed(whole)
    assert whole[-1].error.code == pb.ERROR_CODE_STREAM_CANCELLED and not whole[-1].error.retryable
    assert code == grpc.StatusCode.CANCELLED
    assert detail(rich_status(trailing), ErrorInfo).reason == "STREAM_CANCELLED"
    seen, code, _ = await collect(other)
    assert code == grpc.StatusCode.CANCELLED and seen[-1].SerializeToString() == whole[-1].SerializeToString()
    # Twice is harmless, and so is after the end: the state says what happened.
    again = await server.stub.Cancel(pb.CancelRequest(stream_id="stop-me", resume_token=token))
    assert again.state.status == pb.STREAM_STATUS_CANCELLED and again.state.last_sequence == whole[-1].sequence
    assert server.server.generation.active_streams == 0


async def test_cancel_after_the_finish_changes_nothing(server: Running) -> None:
    messages, _, _ = await collect(server.stub.Generate(durable("sim", request_id="done")))
    token = messages[0].start.resume_token
    answer = await server.stub.Cancel(pb.CancelRequest(stream_id="done", resume_token=token))
    assert answer.state.status == pb.STREAM_STATUS_FINISHED
    assert answer.state.last_sequence == messages[-1].sequence
    assert answer.state.expire_time.ToDatetime().timestamp() > time.time()
    again, code, _ = await collect(server.stub.Resume(pb.ResumeRequest(stream_id="done", resume_token=token)))
    assert code == grpc.StatusCode.OK and again[-1].WhichOneof("event") == "finish"


async def test_generation_goes_on_after_its_call_breaks(server: Running, recorder: Recorder) -> None:
    call = server.stub.Generate(durable(request_id="detached"))
    first = await read_some(call, 3)
    call.cancel()
    token = first[0].start.resume_token
    # Nobody reads, yet the producer finishes: a reader never holds it back.
    for _ in range(100):
        state = await server.stub.Poll(pb.PollRequest(stream_id="detached", resume_token=token, after_sequence=3))
        if state.state.status != pb.STREAM_STATUS_RUNNING:
            break
        await asyncio.sleep(0.05)
    assert state.state.status == pb.STREAM_STATUS_FINISHED
    assert len(recorder.closed) == 1
    rest, code, _ = await collect(
        server.stub.Resume(pb.ResumeRequest(stream_id="detached", resume_token=token, after_sequence=3))
    )
    assert code == grpc.StatusCode.OK
    assert_well_formed(first + rest)


async def test_no_reader_for_the_window_abandons_the_stream(
    start_server: Callable[..., Any], journal_url: str, recorder: Recorder
) -> None:
    running: Running = await start_server(ROUTES, journal=journal_url)
    call = running.stub.Generate(durable("slow", window=1.0, request_id="left"))
    first = await read_some(call, 2)
    call.cancel()
    token = first[0].start.resume_token
    await eventually(lambda: len(recorder.closed) == 1, within=3.0)
    assert recorder.finished == [False]
    rest, _, trailing = await collect(
        running.stub.Resume(pb.ResumeRequest(stream_id="left", resume_token=token, after_sequence=2))
    )
    assert rest[-1].error.code == pb.ERROR_CODE_STREAM_ABANDONED
    assert detail(rich_status(trailing), ErrorInfo).reason == "STREAM_ABANDONED"
    assert running.server.generation.active_streams == 0
    if journal_url == "memory":
        journal: Any = running.server.journal
        await eventually(lambda: len(journal) == 0 and journal.total_bytes == 0, within=3.0)


async def test_poll_reads_the_stream_by_cursor_to_its_end(server: Running) -> None:
    call = server.stub.Generate(durable(request_id="polled"))
    first = await read_some(call, 1)
    call.cancel()
    token = first[0].start.resume_token
    after, batches = 0, 0
    seen: list[pb.GenerateResponse] = []
    while True:
        batch = await server.stub.Poll(
            pb.PollRequest(
                stream_id="polled", resume_token=token, after_sequence=after, wait=seconds(5), max_messages=20
            )
        )
        batches += 1
        assert len(batch.messages) <= 20
        seen.extend(batch.messages)
        after = batch.next_after_sequence
        assert after == (seen[-1].sequence if seen else 0)
        if batch.terminal:
            assert batch.state.status == pb.STREAM_STATUS_FINISHED
            break
        assert batches < 500
    assert_well_formed(seen)
    assert batches > 1


async def test_short_poll_and_an_empty_wait_are_ok(server: Running) -> None:
    call = server.stub.Generate(durable("slow", request_id="quiet"))
    first = await read_some(call, 1)
    token = first[0].start.resume_token
    messages = await read_some(call, 3)
    last = messages[-1].sequence
    short = await server.stub.Poll(pb.PollRequest(stream_id="quiet", resume_token=token, after_sequence=0))
    assert [m.sequence for m in short.messages][:4] == [1, 2, 3, 4] and not short.terminal
    assert short.state.status == pb.STREAM_STATUS_RUNNING
    # The same bytes as the first delivery.
    assert short.messages[0].SerializeToString() == first[0].SerializeToString()
    await server.stub.Cancel(pb.CancelRequest(stream_id="quiet", resume_token=token))
    ended = await server.stub.Poll(pb.PollRequest(stream_id="quiet", resume_token=token, after_sequence=last))
    assert ended.terminal and ended.state.status == pb.STREAM_STATUS_CANCELLED
    beyond = await server.stub.Poll(
        pb.PollRequest(stream_id="quiet", resume_token=token, after_sequence=ended.next_after_sequence, wait=seconds(2))
    )
    assert list(beyond.messages) == [] and not beyond.terminal  # nothing after the terminal: at once
    with pytest.raises(grpc.aio.AioRpcError) as too_many:
        await server.stub.Poll(pb.PollRequest(stream_id="quiet", resume_token=token, max_messages=5000))
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_poll_waits_for_the_first_message(server: Running) -> None:
    call = server.stub.Generate(durable("slow", request_id="waiting"))
    first = await read_some(call, 1)
    token = first[0].start.resume_token
    loop = asyncio.get_running_loop()
    started = loop.time()
    last = first[-1].sequence
    batch = await server.stub.Poll(
        pb.PollRequest(stream_id="waiting", resume_token=token, after_sequence=last + 1, wait=seconds(5))
    )
    assert batch.messages and batch.messages[0].sequence == last + 2
    assert loop.time() - started < 4
    call.cancel()


async def test_same_request_id_attaches_instead_of_calling_again(server: Running, recorder: Recorder) -> None:
    req = durable(request_id="once")
    first = server.stub.Generate(req)
    head = await read_some(first, 2)
    second, code, _ = await collect(server.stub.Generate(req))
    assert code == grpc.StatusCode.OK
    assert second[0].SerializeToString() == head[0].SerializeToString()
    assert_well_formed(second)
    assert len(recorder.requests) == 1
    first.cancel()
    _, code, trailing = await collect(server.stub.Generate(durable(request_id="once", text="something else")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert detail(rich_status(trailing), ErrorInfo).reason == "STREAM_ALREADY_EXISTS"


async def test_a_failed_start_is_a_plain_status_and_can_be_tried_again(server: Running) -> None:
    messages, code, trailing = await collect(server.stub.Generate(durable("down", request_id="retry-me")))
    assert messages == [] and code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_UNAVAILABLE"
    _, code, _ = await collect(server.stub.Generate(durable("down", request_id="retry-me")))
    assert code == grpc.StatusCode.UNAVAILABLE  # tried again, not ALREADY_EXISTS


async def test_journal_bound_per_stream_ends_the_stream_clearly(
    start_server: Callable[..., Any], journal_url: str
) -> None:
    running: Running = await start_server(ROUTES, journal=journal_url, journal_max_stream_messages=16)
    messages, code, trailing = await collect(running.stub.Generate(durable("slow", request_id="big")))
    assert_well_formed(messages)
    assert len(messages) == 16
    assert messages[-1].error.code == pb.ERROR_CODE_JOURNAL_FULL
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail(rich_status(trailing), ErrorInfo).reason == "JOURNAL_FULL"


async def test_concurrency_limit_counts_generations_not_readers(
    start_server: Callable[..., Any], journal_url: str
) -> None:
    running: Running = await start_server(ROUTES, journal=journal_url, max_concurrent_streams=1)
    call = running.stub.Generate(durable("slow", request_id="only"))
    first = await read_some(call, 1)
    token = first[0].start.resume_token
    readers = [running.stub.Resume(pb.ResumeRequest(stream_id="only", resume_token=token)) for _ in range(3)]
    for reader in readers:
        head = await reader.read()
        assert isinstance(head, pb.GenerateResponse) and head.sequence == 1
    _, code, _ = await collect(running.stub.Generate(request("sim")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await running.stub.Cancel(pb.CancelRequest(stream_id="only", resume_token=token))
    for reader in readers:
        reader.cancel()
    call.cancel()


async def test_shutdown_journals_the_terminal_error(start_server: Callable[..., Any], journal_url: str) -> None:
    running: Running = await start_server(ROUTES, journal=journal_url, shutdown_grace_seconds=1.0)
    call = running.stub.Generate(durable("slow", request_id="shut"))
    await read_some(call, 3)
    stopping = asyncio.create_task(running.server.stop())
    rest, code, trailing = await read_to_end(call)
    await stopping
    assert rest[-1].error.code == pb.ERROR_CODE_SERVER_SHUTTING_DOWN and rest[-1].error.retryable
    assert code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "SERVER_SHUTTING_DOWN"


async def test_duration_limit_applies_to_durable_streams(start_server: Callable[..., Any], journal_url: str) -> None:
    running: Running = await start_server(ROUTES, journal=journal_url, max_stream_duration_seconds=1)
    messages, code, _ = await collect(running.stub.Generate(durable("slow", request_id="long")))
    assert_well_formed(messages)
    assert messages[-1].error.code == pb.ERROR_CODE_STREAM_DURATION_EXCEEDED
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_broken_by_a_reset_connection_resumes(server: Running) -> None:
    expected = await reference_text(server.stub)
    port = int(server.address.rsplit(":", 1)[1])
    async with FaultProxy(port) as proxy:
        channel = grpc.aio.insecure_channel(proxy.address)
        try:
            stub = pb_grpc.GenerationServiceStub(channel)
            # Connected through the proxy first; the reset counts from the connection's first byte,
            # so a small warm-up (no ListModels answer, whose size grows with the routes' capabilities).
            await channel.channel_ready()
            proxy.reset_after(1500)
            call = stub.Generate(durable(request_id="reset"))
            got: list[pb.GenerateResponse] = []
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for message in call:
                    got.append(message)
            assert got and got[-1].WhichOneof("event") not in ("finish", "error")
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await channel.close()
    rest, code, _ = await collect(
        server.stub.Resume(
            pb.ResumeRequest(stream_id="reset", resume_token=got[0].start.resume_token, after_sequence=got[-1].sequence)
        )
    )
    assert code == grpc.StatusCode.OK
    assert_well_formed(got + rest)
    assert text_of(got + rest) == expected


async def test_broken_by_closing_the_channel_resumes_on_another(server: Running) -> None:
    expected = await reference_text(server.stub)
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.GenerationServiceStub(channel)
    call = stub.Generate(durable(request_id="closed"))
    first = await read_some(call, 20)
    await channel.close()
    rest, code, _ = await collect(
        server.stub.Resume(
            pb.ResumeRequest(stream_id="closed", resume_token=first[0].start.resume_token, after_sequence=20)
        )
    )
    assert code == grpc.StatusCode.OK
    assert text_of(first + rest) == expected


async def test_hundred_durable_streams_at_once(server: Running) -> None:
    async def one(i: int) -> list[pb.GenerateResponse]:
        messages, code, _ = await collect(server.stub.Generate(durable("sim", request_id=f"many-{i}")))
        assert code == grpc.StatusCode.OK
        return messages

    for messages in await asyncio.gather(*(one(i) for i in range(100))):
        assert_well_formed(messages)


RECORDER_FREE_ID = "ephemeral-1"


async def test_ephemeral_cancel_still_stops_the_provider_at_once(server: Running, recorder: Recorder) -> None:
    call = server.stub.Generate(request("slow", request_id=RECORDER_FREE_ID))
    await read_some(call, 3)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    call.cancel()
    await eventually(lambda: len(recorder.closed) == 1, within=1.0)
    assert recorder.closed[0] - sent < 0.2
    # Ephemeral streams are never journaled.
    assert await server.server.journal.get(RECORDER_FREE_ID) is None


@pytest.mark.timeout(60)
async def test_redis_stalled_mid_stream_ends_durable_streams_clearly_and_spares_ephemeral_ones(
    start_server: Callable[..., Any], recorder: Recorder
) -> None:
    with running_redis() as redis:
        running: Running = await start_server(ROUTES, journal=redis.url)
        durable_call = running.stub.Generate(durable("slow", request_id="frozen"))
        head = await read_some(durable_call, 3)
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)  # Redis stops answering; connections stay open
        try:
            ephemeral, code, _ = await collect(running.stub.Generate(request("paced")))
            assert code == grpc.StatusCode.OK and ephemeral[-1].WhichOneof("event") == "finish"
            started = time.monotonic()
            rest, code, trailing = await asyncio.wait_for(read_to_end(durable_call), 15)
            # A break, not an answer: no terminal event reached this reader, and the status says why.
            assert code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 15
            assert detail(rich_status(trailing), ErrorInfo).reason == "JOURNAL_UNAVAILABLE"
            seen = head + rest
            assert all(m.WhichOneof("event") not in ("finish", "error") for m in seen)
            # The producer cannot journal either: it stops the provider rather than run on unrecorded.
            await eventually(lambda: len(recorder.closed) == 2, within=10.0)  # the ephemeral one, and it
            assert recorder.finished[-1] is False
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        # Once Redis answers again, the producer journals the terminal Error it owes its readers.
        token = head[0].start.resume_token
        for _ in range(100):
            state = await running.stub.Poll(pb.PollRequest(stream_id="frozen", resume_token=token))
            if state.state.status != pb.STREAM_STATUS_RUNNING:
                break
            await asyncio.sleep(0.1)
        resumed, code, _ = await collect(
            running.stub.Resume(pb.ResumeRequest(stream_id="frozen", resume_token=token, after_sequence=3))
        )
        assert_well_formed(head + resumed)
        assert resumed[-1].error.code == pb.ERROR_CODE_JOURNAL_UNAVAILABLE and resumed[-1].error.retryable
        assert code == grpc.StatusCode.UNAVAILABLE
        await running.server.stop(grace=0.5)


async def test_broken_by_a_blackholed_path_resumes(server: Running) -> None:
    expected = await reference_text(server.stub)
    port = int(server.address.rsplit(":", 1)[1])
    async with FaultProxy(port) as proxy:
        channel = grpc.aio.insecure_channel(proxy.address)
        try:
            stub = pb_grpc.GenerationServiceStub(channel)
            call = stub.Generate(durable(request_id="blackholed"), timeout=1.5)
            got = await read_some(call, 5)
            proxy.blackhole()  # the path goes dead: nothing passes, nothing closes
            with contextlib.suppress(grpc.aio.AioRpcError):
                while (message := await call.read()) is not grpc.aio.EOF:
                    assert isinstance(message, pb.GenerateResponse)
                    got.append(message)
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert got[-1].WhichOneof("event") not in ("finish", "error")
        finally:
            await channel.close()
    rest, code, _ = await collect(
        server.stub.Resume(
            pb.ResumeRequest(
                stream_id="blackholed", resume_token=got[0].start.resume_token, after_sequence=got[-1].sequence
            )
        )
    )
    assert code == grpc.StatusCode.OK
    assert_well_formed(got + rest)
    assert text_of(got + rest) == expected


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
async def test_a_vendor_stream_broken_mid_way_resumes_to_the_identical_answer(
    start_server: Callable[..., Any],
    journal_url: str,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    vendor: str,
) -> None:
    fake = fake_openai if vendor == "openai" else fake_anthropic
    pieces = [f"piece {i} " for i in range(60)]
    fake.enqueue(StreamReply(text=pieces, interval=0.01), StreamReply(text=pieces, interval=0.01))
    running: Running = await start_server({"v": vendor_route(fake)}, journal=journal_url)
    unbroken, code, _ = await collect(running.stub.Generate(request("v")))
    assert code == grpc.StatusCode.OK
    call = running.stub.Generate(durable("v", request_id=f"vendor-{vendor}"))
    first = await read_some(call, 10)
    call.cancel()
    rest, code, _ = await collect(
        running.stub.Resume(
            pb.ResumeRequest(stream_id=f"vendor-{vendor}", resume_token=first[0].start.resume_token, after_sequence=10)
        )
    )
    assert code == grpc.StatusCode.OK
    assert_well_formed(first + rest)
    assert text_of(first + rest) == text_of(unbroken) == "".join(pieces)
    assert len(fake.requests) == 2  # the unbroken run and the durable one: called once each
    finish = (first + rest)[-1].finish
    assert finish.usage.source == pb.USAGE_SOURCE_PROVIDER


async def test_a_reader_on_another_replica_keeps_the_stream_alive(
    start_server: Callable[..., Any], redis_server: RedisServer, recorder: Recorder
) -> None:
    """Abandonment counts readers on every replica: one attached elsewhere keeps the stream going."""
    producer: Running = await start_server(ROUTES, journal=redis_server.url)
    other: Running = await start_server(ROUTES, journal=redis_server.url)
    call = producer.stub.Generate(durable("slow", window=1.0, request_id=f"kept-{time.time_ns()}"))
    first = await read_some(call, 2)
    start = first[0].start
    call.cancel()  # no reader on the producing replica from now on
    elsewhere = other.stub.Resume(pb.ResumeRequest(stream_id=start.stream_id, resume_token=start.resume_token))
    await read_some(elsewhere, 3)
    await asyncio.sleep(3.5)  # well past the window (1 s) and its slack for readers elsewhere (2 s)
    assert recorder.finished == [] and len(recorder.closed) == 0
    elsewhere.cancel()  # the last reader leaves: the stream is abandoned within the window and its slack
    await eventually(lambda: len(recorder.closed) == 1, within=6.0)
    rest, _, _ = await collect(
        other.stub.Resume(pb.ResumeRequest(stream_id=start.stream_id, resume_token=start.resume_token))
    )
    assert rest[-1].error.code == pb.ERROR_CODE_STREAM_ABANDONED


async def test_cancel_on_another_in_process_replica_stops_the_provider_at_once(
    start_server: Callable[..., Any], redis_server: RedisServer, recorder: Recorder
) -> None:
    producer: Running = await start_server(ROUTES, journal=redis_server.url)
    other: Running = await start_server(ROUTES, journal=redis_server.url)
    call = producer.stub.Generate(durable("slow", request_id=f"cancel-other-{time.time_ns()}"))
    first = await read_some(call, 3)
    start = first[0].start
    sent = asyncio.get_running_loop().time()
    answer = await other.stub.Cancel(pb.CancelRequest(stream_id=start.stream_id, resume_token=start.resume_token))
    assert answer.state.status == pb.STREAM_STATUS_CANCELLED
    await eventually(lambda: len(recorder.closed) == 1, within=1.0)
    assert recorder.closed[0] - sent < 0.25
    rest, code, _ = await read_to_end(call)
    assert_well_formed(first + rest)
    assert rest[-1].error.code == pb.ERROR_CODE_STREAM_CANCELLED and code == grpc.StatusCode.CANCELLED


async def test_a_start_refused_at_the_limit_leaves_no_producer_behind() -> None:
    # With a journal whose create yields (Redis), another start can take the last slot in between.
    import dataclasses
    import types

    from service.config import ServerConfig
    from service.durable import DurableStreams
    from service.errors import GatewayError
    from service.journal import StreamRecord
    from service.journal.memory import MemoryJournal
    from service.supervisor import StreamSupervisor

    class SlowJournal(MemoryJournal):
        async def create(self, record: StreamRecord) -> StreamRecord | None:
            await asyncio.sleep(0.01)
            return await super().create(record)

    class NeverOpens:
        async def open(self, route: Any, generation: Any) -> None:
            await asyncio.sleep(3600)

    config = dataclasses.replace(ServerConfig(), max_concurrent_streams=1)
    streams = DurableStreams(NeverOpens(), StreamSupervisor(config), SlowJournal(), config)  # type: ignore[arg-type]
    route = types.SimpleNamespace(name="r")

    async def start(i: int) -> str:
        generation = types.SimpleNamespace(stream_id=f"s{i}", messages=[])
        try:
            await streams.start(
                pb.GenerateRequest(request_id=f"s{i}"),
                route,  # type: ignore[arg-type]
                generation,  # type: ignore[arg-type]
                window=5.0,
                received_at=time.monotonic(),
                create_time=None,  # type: ignore[arg-type]
            )
        except GatewayError as err:
            return err.code.value
        return "started"

    assert sorted(await asyncio.gather(start(1), start(2))) == ["SERVER_OVERLOADED", "started"]
    await asyncio.sleep(0.05)
    assert len(streams.producers) == 1 == len(streams.supervisor.active)
    for task in list(streams.supervisor.active):
        task.cancel()


async def test_a_read_whose_record_is_newer_than_its_payloads_loses_nothing() -> None:
    # The Redis journal reads the payloads, then the record: a write can land in between.
    from service.config import ServerConfig
    from service.durable import DurableStreams, Follower, _terminal_payload, digest
    from service.errors import ErrorCode, GatewayError
    from service.journal import Batch, StreamRecord, StreamStatus
    from service.journal.memory import MemoryJournal
    from service.supervisor import StreamSupervisor

    class Racy(MemoryJournal):
        pending: tuple[str, int, bytes, StreamStatus] | None = None

        async def read(self, stream_id: str, after: int, limit: int) -> Batch | None:
            batch = await super().read(stream_id, after, limit)
            if self.pending is not None:
                sid, sequence, payload, status = self.pending
                self.pending = None
                await self.append(sid, sequence, [payload], expires_at=time.time() + 60, status=status)
                batch = await super().read(stream_id, after, limit)
                assert batch is not None
                batch = Batch(batch.payloads[:0], batch.record, batch.first)  # payloads from before
            return batch

    journal = Racy()
    config = ServerConfig()
    streams = DurableStreams(None, StreamSupervisor(config), journal, config)  # type: ignore[arg-type]
    for sid in ("ends", "goes-on"):
        await journal.create(StreamRecord(sid, digest("tok"), b"f", 30.0, expires_at=time.time() + 60))
        await journal.append(sid, 1, [b"one"], expires_at=time.time() + 60)
    cancelled = GatewayError(ErrorCode.STREAM_CANCELLED, "cancelled")
    journal.pending = ("ends", 2, _terminal_payload(2, cancelled), StreamStatus.CANCELLED)
    follower = Follower(streams, "ends", 1)
    sent = [p async for batch in follower.batches() for p in batch]
    assert len(sent) == 1 and follower.terminal == sent[0]  # the terminal is sent, not skipped
    journal.pending = ("goes-on", 2, b"two", StreamStatus.RUNNING)
    polled = await streams.poll("goes-on", "tok", 1, 0, 10)
    assert list(polled.payloads) == [] and polled.next_after == 1  # the cursor does not jump past "two"
    again = await streams.poll("goes-on", "tok", polled.next_after, 0, 10)
    assert list(again.payloads) == [b"two"]
    await journal.aclose()
