"""Durable streams through the typed client against a real server: finish, transparent resume through a reset
connection, cancel, the poll loop, typed errors of Resume."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from fakes.proxy import FaultProxy

from conftest import FAST, TEST_ROUTES, Recorder, Running, eventually
from tokenwire_client import (
    AsyncClient,
    Client,
    CursorOutOfRangeError,
    Event,
    FinishReason,
    ResumePolicy,
    Started,
    StreamCancelledError,
    StreamNotFoundError,
    StreamStatus,
    StreamStoppedError,
    TextDelta,
    user,
)

pytestmark = pytest.mark.timeout(30)

ROUTES: dict[str, Any] = TEST_ROUTES | {
    # The simulated provider, deterministic, paced so that a connection can be cut in the middle: 200 tokens at 400/s.
    "paced": {
        "provider": "recording",
        "model": "m",
        "options": FAST | {"tokens_per_second": 400, "answer_tokens": 200},
    },
}
# Bytes that reach the client before the proxy resets its first connection: mid-answer.
RESET_AFTER = 1500
PROMPT = [user("Tell me about streaming.")]


@pytest.fixture
async def server(start_server: Callable[..., Any]) -> Running:
    running: Running = await start_server(ROUTES)
    return running


async def unbroken_text(server: Running, model: str) -> str:
    async with AsyncClient(channel=server.channel) as client:
        return await client.generate(model, PROMPT, seed=0).get_final_text()


async def test_durable_stream_reads_to_its_finish(server: Running) -> None:
    expected = await unbroken_text(server, "sim")
    async with AsyncClient(channel=server.channel) as client, client.generate("sim", PROMPT, seed=0, durable=True) as s:
        events = [event async for event in s]
        response = await s.get_final_response()
    started = events[0]
    assert isinstance(started, Started) and started.durable and started.resume_window == 60.0
    assert len(started.stream_id) == 32  # the client chose it, so that a retried start can attach
    assert response.text == expected and response.finish_reason is FinishReason.STOP
    assert response.stream_id == started.stream_id and response.resume_token == started.resume_token != ""
    assert s.reconnects == 0


def read_sync(address: str) -> tuple[list[Event], str, int]:
    policy = ResumePolicy(initial_backoff=0.02)
    with (
        Client(address, timeout=20, resume_policy=policy) as client,
        client.generate("paced", PROMPT, seed=0, durable=True) as stream,
    ):
        events = list(stream)
        return events, stream.get_final_text(), stream.reconnects


async def read_async(address: str) -> tuple[list[Event], str, int]:
    policy = ResumePolicy(initial_backoff=0.02)
    async with (
        AsyncClient(address, timeout=20, resume_policy=policy) as client,
        client.generate("paced", PROMPT, seed=0, durable=True) as stream,
    ):
        events = [event async for event in stream]
        return events, await stream.get_final_text(), stream.reconnects


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_a_reset_connection_resumes_transparently(server: Running, recorder: Recorder, flavour: str) -> None:
    expected = await unbroken_text(server, "paced")
    recorder.requests.clear()
    port = int(server.address.rsplit(":", 1)[1])
    async with FaultProxy(port) as proxy:
        proxy.reset_after(RESET_AFTER)

        async def heal_after_the_first_reset() -> None:
            # Once the limit is reached the first connection's reset is committed; later ones pass.
            await eventually(lambda: proxy.bytes_down >= RESET_AFTER, within=10)
            proxy.heal()

        healer = asyncio.create_task(heal_after_the_first_reset())
        if flavour == "async":
            events, text, reconnects = await read_async(proxy.address)
        else:
            events, text, reconnects = await asyncio.to_thread(read_sync, proxy.address)
        await healer
        assert proxy.connections >= 2
    assert reconnects >= 1
    assert text == expected
    # Every message exactly once, sequences running on across the resume.
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == expected
    assert len(recorder.requests) == 1  # the provider was called once


async def test_cancel_ends_a_durable_stream_for_every_reader(server: Running, recorder: Recorder) -> None:
    async with AsyncClient(channel=server.channel, timeout=20) as client:
        async with client.generate("slow", PROMPT, durable=True) as stream:
            async for event in stream:
                if isinstance(event, TextDelta):
                    break
            started = stream.started
            assert started is not None
            stream.cancel()
            with pytest.raises(StreamCancelledError):
                await stream.__anext__()
        # Leaving the block waited for the Cancel: the provider is stopped, not just this reader detached.
        await eventually(lambda: recorder.closed, within=1.0)
        assert recorder.finished == [False]
        with pytest.raises(StreamStoppedError) as info:
            await client.resume(started.stream_id, started.resume_token).get_final_response()
        assert info.value.reason == "STREAM_CANCELLED" and not info.value.retryable
        state = await client.cancel(started.stream_id, started.resume_token)  # twice is harmless
        assert state.status is StreamStatus.CANCELLED and state.ended


def test_sync_leaving_a_durable_stream_early_cancels_it(live_address: str, recorder: Recorder) -> None:
    with Client(live_address, timeout=20) as client:
        with client.generate("slow", PROMPT, durable=True) as stream:
            for event in stream:
                if isinstance(event, TextDelta):
                    break
        started = stream.started
        assert started is not None
        state = client.cancel(started.stream_id, started.resume_token)
        assert state.status is StreamStatus.CANCELLED
    assert recorder.finished == [False]


async def test_poll_loop_to_the_terminal_event(server: Running) -> None:
    client = AsyncClient(channel=server.channel, timeout=20)
    async with client.generate("paced", PROMPT, seed=0, durable=True) as stream:
        started = await stream.__anext__()
        assert isinstance(started, Started)
        # Read by polling while the stream runs; this reader is attached but reads nothing meanwhile.
        after, texts, batches = 0, [], 0
        while True:
            batch = await client.poll(started.stream_id, started.resume_token, after, wait=5, max_messages=50)
            batches += 1
            assert batch.next_after >= after
            texts.append(batch.text)
            after = batch.next_after
            if batch.terminal:
                break
        assert batch.state.status is StreamStatus.FINISHED and batch.state.last_sequence == after
        streamed = await stream.get_final_text()
    assert "".join(texts) == streamed != "" and batches >= 2


async def test_resume_errors_are_typed(server: Running) -> None:
    async with AsyncClient(channel=server.channel, timeout=10) as client:
        response = await client.generate("sim", PROMPT, durable=True).get_final_response()
        with pytest.raises(StreamNotFoundError):
            await client.resume(response.stream_id, "not-the-token").get_final_response()
        with pytest.raises(CursorOutOfRangeError):
            await client.resume(response.stream_id, response.resume_token, after=10_000).get_final_response()
        # From a cursor: what came after it, to the same Finish.
        tail = await client.resume(response.stream_id, response.resume_token, after=3).get_final_response()
        assert response.text.endswith(tail.text) and tail.last_sequence == response.last_sequence
