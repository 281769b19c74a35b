"""The typed client against a real server: events, final response, typed errors, cancellation."""

from __future__ import annotations

import pytest

from conftest import Recorder, Running, eventually
from tokenwire_client import (
    AsyncClient,
    Client,
    Finished,
    FinishReason,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    Started,
    TextDelta,
    UnavailableError,
    UsageSource,
    user,
)


@pytest.fixture
async def client(running: Running) -> AsyncClient:
    return AsyncClient(channel=running.channel)


async def test_events_are_typed_and_in_order(client: AsyncClient) -> None:
    async with client.generate("sim", [user("Hi")], max_output_tokens=4, seed=0) as stream:
        events = [event async for event in stream]
    assert isinstance(events[0], Started) and events[0].provider == "simulated"
    # Four tokens; deltas that queued behind a write arrive merged into one.
    assert "".join(e.text for e in events[1:-1] if isinstance(e, TextDelta)) == "Streaming lets a reader"
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason is FinishReason.LENGTH
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


async def test_text_stream_and_final_response(client: AsyncClient) -> None:
    async with client.generate("sim", [user("Hi")], request_id="abc") as stream:
        pieces = [piece async for piece in stream.text_stream]
        response = await stream.get_final_response()
    assert response.text == "".join(pieces) != ""
    assert response.stream_id == "abc" and response.finish_reason is FinishReason.STOP
    assert (response.usage.output_tokens or 0) >= len(pieces)
    assert response.usage.source is UsageSource.PROVIDER
    assert response.timing.time_to_first_token is not None and response.timing.total_duration > 0


async def test_tool_calls_are_assembled(client: AsyncClient) -> None:
    tools = [{"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    async with client.generate("sim", [user("find it")], tools=tools, tool_choice="lookup") as stream:
        response = await stream.get_final_response()
    assert response.finish_reason is FinishReason.TOOL_CALLS
    (call,) = response.tool_calls
    assert call.name == "lookup" and call.arguments() == {"q": "find it"}


async def test_error_after_start_raises_typed_error_with_last_sequence(client: AsyncClient) -> None:
    received = []

    async def read_all() -> None:
        async with client.generate("error-after-3", [user("Hi")]) as stream:
            async for event in stream:
                received.append(event)

    with pytest.raises(UnavailableError) as info:
        await read_all()
    error = info.value
    assert error.reason == "PROVIDER_UNAVAILABLE" and error.retryable and error.fault == "provider"
    assert error.last_sequence == received[-1].sequence >= 2
    assert error.provider_http_status == 503


async def test_errors_before_start(client: AsyncClient) -> None:
    with pytest.raises(NotFoundError) as not_found:
        await client.generate("nope", [user("Hi")]).get_final_response()
    assert not_found.value.last_sequence is None and not not_found.value.retryable
    with pytest.raises(InvalidRequestError) as invalid:
        await client.generate("sim", [user("Hi")], temperature=7.0).get_final_response()
    assert invalid.value.field_violations[0][0] == "temperature"
    with pytest.raises(RateLimitError) as limited:
        await client.generate("rate-limited", [user("Hi")]).get_final_response()
    assert limited.value.retry_after == 1.0


async def test_leaving_the_block_early_stops_the_provider(client: AsyncClient, recorder: Recorder) -> None:
    async with client.generate("slow", [user("Hi")]) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                break
    await eventually(lambda: recorder.closed)
    assert recorder.finished == [False]


async def test_list_models(client: AsyncClient) -> None:
    models = {m.name: m for m in await client.list_models()}
    assert models["sim"].provider == "simulated" and models["sim"].supports_tools


def test_sync_client(live_address: str) -> None:
    with Client(live_address) as client:
        with client.generate("sim", [user("Hi")], max_output_tokens=3) as stream:
            texts = list(stream.text_stream)
            response = stream.get_final_response()
        assert response.text == "".join(texts) and response.finish_reason is FinishReason.LENGTH
        with pytest.raises(NotFoundError):
            client.generate("nope", [user("Hi")]).get_final_response()
