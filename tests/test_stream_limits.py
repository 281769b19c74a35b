"""A stream's life against real fake providers: heartbeats, the maximum duration, slow readers, and
cancels that leave nothing behind."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import grpc
import pytest
from fakes import FakeAnthropic, FakeOpenAI, StreamReply, ToolCallScript

import service.supervisor
from conftest import (
    ErrorInfo,
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

VENDORS = ("openai", "anthropic")
TOOLS = [pb.Tool(name="lookup"), pb.Tool(name="other")]
# A client flow-control window of about 1 KiB: a handler writing to a reader that does not read
# is blocked in its write almost at once.
TINY_WINDOW = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1024),
]


@pytest.fixture
def fakes(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> dict[str, FakeOpenAI | FakeAnthropic]:
    return {"openai": fake_openai, "anthropic": fake_anthropic}


def kinds(messages: list[pb.GenerateResponse]) -> list[str]:
    return [str(m.WhichOneof("event")) for m in messages]


@pytest.mark.parametrize("vendor", VENDORS)
async def test_heartbeats_fill_upstream_silences(start_server: Any, fakes: dict[str, Any], vendor: str) -> None:
    fake = fakes[vendor]
    fake.enqueue(StreamReply(text=["one", " two", " three"], interval=0.45))
    running = await start_server(routes={"r": vendor_route(fake)}, heartbeat_interval_seconds=0.1)
    messages, code, _ = await collect(running.stub.Generate(request(model="r"), timeout=10))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)  # heartbeats are sequenced like every other message
    assert "".join(m.text_delta.text for m in messages) == "one two three"
    # Each 0.45 s silence between two deltas holds heartbeats 0.1 s apart.
    between = "".join("h" if k == "heartbeat" else "|" for k in kinds(messages) if k in ("heartbeat", "text_delta"))
    silences = between.split("|")[1:-1]
    assert len(silences) == 2
    assert all(3 <= len(s) <= 5 for s in silences), between


async def test_no_heartbeat_while_the_provider_keeps_talking(start_server: Any, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(StreamReply(text=["x"] * 40, interval=0.01))
    running = await start_server(routes={"r": vendor_route(fake_openai)}, heartbeat_interval_seconds=0.2)
    messages, code, _ = await collect(running.stub.Generate(request(model="r"), timeout=10))
    assert code == grpc.StatusCode.OK
    assert "heartbeat" not in kinds(messages)
    assert kinds(messages).count("text_delta") == 40


async def test_heartbeats_can_be_turned_off(start_server: Any, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(StreamReply(text=["a", "b"], interval=0.5))
    running = await start_server(routes={"r": vendor_route(fake_openai)}, heartbeat_interval_seconds=0)
    messages, code, _ = await collect(running.stub.Generate(request(model="r"), timeout=10))
    assert code == grpc.StatusCode.OK
    assert kinds(messages) == ["start", "text_delta", "text_delta", "finish"]


def assert_duration_exceeded(code: grpc.StatusCode, trailing: Any) -> None:
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    info = detail(rich_status(trailing), ErrorInfo)
    assert info.reason == "STREAM_DURATION_EXCEEDED" and info.metadata["retryable"] == "false"


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_stream_past_its_maximum_duration_ends_with_an_error_and_closes_the_provider(
    start_server: Any, fakes: dict[str, Any], vendor: str
) -> None:
    fake = fakes[vendor]
    fake.enqueue(StreamReply(text=["tick "] * 400, interval=0.01))  # 4 s of tokens
    running = await start_server(routes={"r": vendor_route(fake)}, max_stream_duration_seconds=1)
    started = time.monotonic()
    messages, code, trailing = await collect(running.stub.Generate(request(model="r"), timeout=10))
    ended = time.monotonic()
    assert 0.9 <= ended - started < 2.0
    assert_well_formed(messages)
    error = messages[-1].error
    assert error.code == pb.ERROR_CODE_STREAM_DURATION_EXCEEDED and not error.retryable
    assert error.last_sequence == messages[-1].sequence - 1
    assert_duration_exceeded(code, trailing)
    disconnected = await fake.wait_disconnected(0, timeout=1.0)
    assert disconnected - ended < 0.2


async def test_a_stream_past_its_maximum_duration_before_its_first_token_is_a_plain_status(
    start_server: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(StreamReply(first_delay=5.0))
    running = await start_server(routes={"r": vendor_route(fake_openai)}, max_stream_duration_seconds=1)
    messages, code, trailing = await collect(running.stub.Generate(request(model="r"), timeout=10))
    assert messages == []
    assert_duration_exceeded(code, trailing)
    await fake_openai.wait_disconnected(0, timeout=1.0)
    assert running.server.generation.active_streams == 0


async def test_a_stalled_reader_past_the_maximum_duration_is_cut_and_its_provider_closed(
    start_server: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(service.supervisor, "_STALLED_WRITE_SECONDS", 0.5)
    # ~12 MB of SSE: more than the sockets' buffers hold, so the provider is still writing.
    fake_openai.enqueue(StreamReply(text=["x" * 400] * 30_000, events_per_write=100))
    running = await start_server(routes={"r": vendor_route(fake_openai)}, max_stream_duration_seconds=1)
    async with grpc.aio.insecure_channel(running.address, options=TINY_WINDOW) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(request(model="r"), timeout=4)
        first = await call.read()
        assert isinstance(first, pb.GenerateResponse)
        # The reader stops reading; 1 s + 0.5 s after the request the server gives up on it.
        disconnected = await fake_openai.wait_disconnected(0, timeout=3.0)
        assert disconnected - first_request_time(fake_openai) < 2.0
        await eventually(lambda: running.server.generation.active_streams == 0, within=1.0)
        messages, code, _ = await read_to_end(call, [first])
    # What was queued for it still arrives, in order; gRPC then ends the call at its deadline.
    assert [m.sequence for m in messages] == list(range(1, len(messages) + 1))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "outcome=STREAM_DURATION_EXCEEDED (the caller had stopped reading)" in caplog.text


def first_request_time(fake: FakeOpenAI) -> float:
    return fake.requests[0].received_at


async def test_a_stalled_reader_pauses_the_provider_and_then_gets_every_chunk_once(
    start_server: Any, fake_openai: FakeOpenAI
) -> None:
    # ~15 MB of SSE: more than gRPC flow control and the sockets' buffers take in.
    pieces = [f"<{i:05d}>" + "y" * 990 for i in range(15_000)]
    fake_openai.enqueue(StreamReply(text=pieces, events_per_write=50))
    running = await start_server(routes={"r": vendor_route(fake_openai)})
    call = running.stub.Generate(request(model="r"), timeout=60)
    first = await call.read()
    assert isinstance(first, pb.GenerateResponse)
    record = (await fake_openai.wait_requests(1))[0]
    # The reader stalls. The server sends what gRPC flow control allows, keeps at most a small
    # buffer of events, and stops reading the provider's socket: the provider's writes stall.
    await asyncio.sleep(1.0)
    paused_at = record.bytes_sent
    await asyncio.sleep(0.5)
    assert record.bytes_sent == paused_at
    assert not record.completed
    messages, code, _ = await read_to_end(call, [first])
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    # Every chunk once, in order; the ones that queued while the reader stalled share messages.
    assert "".join(m.text_delta.text for m in messages if m.HasField("text_delta")) == "".join(pieces)
    assert len(messages) < len(pieces)
    assert record.completed


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("vendor", VENDORS)
async def test_cancels_close_the_provider_promptly_and_leave_nothing_behind(
    start_server: Any, fakes: dict[str, Any], vendor: str
) -> None:
    fake: FakeOpenAI | FakeAnthropic = fakes[vendor]
    fake.default = StreamReply(text=["tok "] * 2000, interval=0.005)
    running = await start_server(routes={"r": vendor_route(fake)})
    gen = running.server.generation

    async def cycle(index: int, chunks: int) -> float:
        if chunks == 0:
            fake.enqueue(StreamReply(first_delay=10.0))
        call = running.stub.Generate(request(model="r"))
        if chunks == 0:
            await fake.wait_requests(index + 1)
        for _ in range(chunks):
            assert isinstance(await call.read(), pb.GenerateResponse)
        cancelled_at = time.monotonic()
        call.cancel()
        return await fake.wait_disconnected(index, timeout=1.0) - cancelled_at

    await cycle(0, 3)  # warm up: the client, the SDK and the gRPC channel allocate once
    await eventually(lambda: gen.active_streams == 0)
    tasks, fds = len(asyncio.all_tasks()), open_fds()
    latencies = [await cycle(i, 0 if i % 2 else 4) for i in range(1, 41)]
    assert max(latencies) < 0.2, sorted(latencies)[-3:]
    # Handlers, provider readers, sockets and concurrency slots are all back where they were.
    await eventually(lambda: gen.active_streams == 0 and fake.open_connections == 0)
    await eventually(lambda: len(asyncio.all_tasks()) <= tasks)
    assert open_fds() <= fds
    assert gen.idle.is_set()


@pytest.mark.parametrize("vendor", VENDORS)
async def test_deltas_that_queue_up_are_merged_and_keep_every_guarantee(
    start_server: Any, fakes: dict[str, Any], vendor: str
) -> None:
    fake = fakes[vendor]
    calls = [
        ToolCallScript("call_a", "lookup", ['{"q": ', '"x', "y", '"}']),
        ToolCallScript("call_b", "other", ["{", '"n": ', "1", "}"]),
    ]
    reasoning = [f"r{i} " for i in range(40)]
    text = [f"t{i} " for i in range(400)]
    # Everything in bursts of 50 frames: what arrives together queues behind one write.
    fake.enqueue(StreamReply(reasoning=reasoning, text=text, tool_calls=calls, events_per_write=50))
    running = await start_server(routes={"r": vendor_route(fake)})
    messages, code, _ = await collect(running.stub.Generate(request(model="r", tools=TOOLS)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert len(messages) < len(reasoning) + len(text)  # merged
    assert "".join(m.text_delta.text for m in messages) == "".join(text)
    got_reasoning = [m.reasoning_delta for m in messages if m.HasField("reasoning_delta")]
    assert "".join(r.text for r in got_reasoning) == "".join(reasoning)
    if vendor == "anthropic":
        # The signature still comes last, after all the reasoning text it signs.
        assert got_reasoning[-1].signature == "sig-1" and all(not r.signature for r in got_reasoning[:-1])
    calls_seen: dict[int, list[pb.ToolCallDelta]] = {}
    for m in messages:
        if m.HasField("tool_call_delta"):
            calls_seen.setdefault(m.tool_call_delta.index, []).append(m.tool_call_delta)
    assert sorted(calls_seen) == [0, 1]
    for index, script in enumerate(calls):
        deltas = calls_seen[index]
        assert (deltas[0].id, deltas[0].name) == (script.id, script.name)
        assert all(not d.id and not d.name for d in deltas[1:])
        assert "".join(d.arguments_delta for d in deltas) == "".join(script.arguments)
