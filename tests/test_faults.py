"""Network faults on either side of the server, injected by a TCP proxy of our own: a caller that
vanishes or resets, a provider whose connection resets, goes silent or is slow."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from fakes import FakeOpenAI, StreamReply
from fakes.proxy import FaultProxy

from conftest import (
    ErrorInfo,
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

PACED = StreamReply(text=[f" t{i}" for i in range(2000)], interval=0.01)


@pytest.fixture
async def provider_proxy(fake_openai: FakeOpenAI) -> AsyncIterator[FaultProxy]:
    """A proxy between the server and the fake provider."""
    async with FaultProxy(fake_openai.port) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def caller_behind_proxy(running: Running) -> AsyncIterator[tuple[FaultProxy, pb_grpc.GenerationServiceAsyncStub]]:
    """A proxy between a caller and the server, and a stub whose calls cross it."""
    async with (
        FaultProxy(int(running.address.rsplit(":", 1)[1])) as proxy,
        grpc.aio.insecure_channel(proxy.address) as channel,
    ):
        yield proxy, pb_grpc.GenerationServiceStub(channel)


def through(proxy: FaultProxy, fake: FakeOpenAI, **options: Any) -> dict[str, Any]:
    """A route on the fake provider, reached through the proxy."""
    route = vendor_route(fake, **options)
    route["options"]["base_url"] = f"http://{proxy.address}/v1"
    return route


async def test_a_vanished_caller_is_noticed_by_keepalive_and_its_provider_stream_closed(
    start_server: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(PACED)
    running = await start_server(
        routes={"r": vendor_route(fake_openai)}, keepalive_time_seconds=1, keepalive_timeout_seconds=1
    )
    async with caller_behind_proxy(running) as (proxy, stub):
        call = stub.Generate(request(model="r"), timeout=30)
        for _ in range(5):
            await call.read()
        # The caller's machine drops off the network: no FIN, no RST, nothing comes back.
        vanished_at = time.monotonic()
        proxy.blackhole()
        disconnected = await fake_openai.wait_disconnected(0, timeout=6.0)
        # One keepalive interval for the ping to go out, one timeout for its answer.
        assert disconnected - vanished_at < 1 + 1 + 1.5
        await eventually(lambda: running.server.generation.active_streams == 0)
        call.cancel()


async def test_a_caller_connection_reset_closes_the_provider_stream_at_once(
    start_server: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(PACED)
    running = await start_server(routes={"r": vendor_route(fake_openai)})
    async with caller_behind_proxy(running) as (proxy, stub):
        call = stub.Generate(request(model="r"), timeout=30)
        for _ in range(5):
            await call.read()
        reset_at = time.monotonic()
        proxy.reset_all()
        disconnected = await fake_openai.wait_disconnected(0, timeout=2.0)
        assert disconnected - reset_at < 0.2
        await eventually(lambda: running.server.generation.active_streams == 0)
        _, code, _ = await read_to_end(call)
    assert code == grpc.StatusCode.UNAVAILABLE  # what the caller's own channel says


def assert_terminal_error(messages: list[pb.GenerateResponse], code: grpc.StatusCode, error: int) -> None:
    assert_well_formed(messages)
    assert messages[-1].error.code == error and messages[-1].error.retryable
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_a_provider_connection_reset_mid_stream_is_a_retryable_terminal_error(
    start_server: Any, fake_openai: FakeOpenAI, provider_proxy: FaultProxy
) -> None:
    fake_openai.enqueue(PACED)
    provider_proxy.reset_after(4000)  # the response headers and a few dozen deltas
    running = await start_server(routes={"r": through(provider_proxy, fake_openai)})
    messages, code, _ = await collect(running.stub.Generate(request(model="r"), timeout=10))
    assert len(messages) > 5
    assert_terminal_error(messages, code, pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED)


async def test_a_provider_that_goes_silent_mid_stream_times_out(
    start_server: Any, fake_openai: FakeOpenAI, provider_proxy: FaultProxy
) -> None:
    fake_openai.enqueue(PACED)
    running = await start_server(routes={"r": through(provider_proxy, fake_openai, read_timeout_seconds=0.5)})
    call = running.stub.Generate(request(model="r"), timeout=10)
    first = [await call.read() for _ in range(5)]
    silent_at = time.monotonic()
    provider_proxy.blackhole()
    rest, code, _ = await read_to_end(call)
    # Nothing arrives for the read timeout: the stream ends, it does not hang.
    assert 0.4 < time.monotonic() - silent_at < 2.0
    assert_terminal_error([*first, *rest], code, pb.ERROR_CODE_PROVIDER_TIMEOUT)


async def test_a_provider_that_never_answers_is_a_plain_unavailable_status(
    start_server: Any, fake_openai: FakeOpenAI, provider_proxy: FaultProxy
) -> None:
    provider_proxy.blackhole()  # connections are accepted, and nothing ever comes back
    running = await start_server(routes={"r": through(provider_proxy, fake_openai, read_timeout_seconds=0.5)})
    messages, code, trailing = await collect(running.stub.Generate(request(model="r"), timeout=10))
    assert messages == []
    assert code == grpc.StatusCode.UNAVAILABLE
    info = detail(rich_status(trailing), ErrorInfo)
    assert info.reason == "PROVIDER_TIMEOUT" and info.metadata["retryable"] == "true"


async def test_a_slow_network_to_the_provider_delays_but_loses_nothing(
    start_server: Any, fake_openai: FakeOpenAI, provider_proxy: FaultProxy
) -> None:
    fake_openai.enqueue(StreamReply(text=[f"<{i}>" for i in range(300)], interval=0.001))
    provider_proxy.latency = 0.05
    running = await start_server(routes={"r": through(provider_proxy, fake_openai)})
    messages, code, _ = await collect(running.stub.Generate(request(model="r"), timeout=10))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert "".join(m.text_delta.text for m in messages) == "".join(f"<{i}>" for i in range(300))
    # The request and the response each crossed the 50 ms link once before the first token.
    assert messages[-1].finish.timing.time_to_first_token.ToTimedelta().total_seconds() >= 0.1


async def test_a_cancel_reaches_a_provider_behind_a_slow_network(
    start_server: Any, fake_openai: FakeOpenAI, provider_proxy: FaultProxy
) -> None:
    fake_openai.enqueue(PACED)
    provider_proxy.latency = 0.05
    running = await start_server(routes={"r": through(provider_proxy, fake_openai)})
    call = running.stub.Generate(request(model="r"), timeout=10)
    for _ in range(3):
        await call.read()
    cancelled_at = time.monotonic()
    call.cancel()
    disconnected = await fake_openai.wait_disconnected(0, timeout=2.0)
    # Within 200 ms of our own, plus the one-way delay the link adds to the close.
    assert disconnected - cancelled_at < 0.2 + 0.05


async def test_a_slow_network_to_the_caller_delays_but_loses_nothing(
    start_server: Any, fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(StreamReply(text=[f"<{i}>" for i in range(200)], interval=0.002))
    running = await start_server(routes={"r": vendor_route(fake_openai)})
    async with caller_behind_proxy(running) as (proxy, stub):
        proxy.latency = 0.05
        messages, code, _ = await collect(stub.Generate(request(model="r"), timeout=10))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    # Nothing lost, nothing doubled, in order; deltas that queued behind a slow write may share a message.
    assert "".join(m.text_delta.text for m in messages if m.HasField("text_delta")) == "".join(
        f"<{i}>" for i in range(200)
    )


def pinging_every(seconds: float) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", int(seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.use_local_subchannel_pool", 1),
    ]


async def test_client_keepalive_pings_at_the_configured_interval_are_accepted(
    start_server: Any, fake_openai: FakeOpenAI
) -> None:
    # Silences between deltas, so the client's pings are not excused by the server's data.
    fake_openai.enqueue(StreamReply(text=["a", "b", "c", "d"], interval=0.8))
    running = await start_server(
        routes={"r": vendor_route(fake_openai)}, keepalive_min_ping_interval_seconds=1, heartbeat_interval_seconds=0
    )
    async with grpc.aio.insecure_channel(running.address, options=pinging_every(1.0)) as channel:
        call = pb_grpc.GenerationServiceStub(channel).Generate(request(model="r"), timeout=10)
        messages, code, _ = await collect(call)
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
