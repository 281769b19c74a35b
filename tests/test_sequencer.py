"""The sequencer holds the contract even when a provider misbehaves."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from conftest import ErrorInfo, assert_well_formed, collect, detail, request, rich_status
from service.config import RouteConfig
from service.events import EventStream, Finished, FinishReason, GenerationRequest, TextDelta
from service.providers import KINDS
from service.providers.base import Provider
from service.streams import Relay, Sequencer, StreamInfo
from tokenwire.v1 import generation_pb2 as pb

CLOSED: list[str] = []


class ScriptedProvider(Provider):
    """An upstream that breaks the provider contract on cue."""

    kind = "scripted"

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.script = str(route.options["script"])

    def stream(self, request: GenerationRequest) -> EventStream:
        return self._run()

    async def _run(self) -> EventStream:
        try:
            if self.script == "ends-without-finish":
                yield TextDelta("partial")
                yield TextDelta("")
            elif self.script == "events-after-finish":
                yield TextDelta("done")
                yield Finished(FinishReason.STOP, "stop")
                yield TextDelta("ghost")
                yield Finished(FinishReason.LENGTH, "length")
            elif self.script == "no-usage":
                yield TextDelta("abcdefgh" * 3)
                yield Finished(FinishReason.CONTENT_FILTER, "content_filter")
            # "ends-before-any-event" yields nothing at all.
        finally:
            CLOSED.append(self.script)


def route(script: str) -> dict[str, Any]:
    return {"provider": "scripted", "model": "m", "options": {"script": script}, "max_retries": 0}


@pytest.fixture
async def stub(start_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(KINDS, "scripted", ScriptedProvider)
    CLOSED.clear()
    scripts = ("ends-without-finish", "ends-before-any-event", "events-after-finish", "no-usage")
    running = await start_server(routes={name: route(name) for name in scripts})
    return running.stub


async def test_a_stream_ending_without_its_marker_is_an_error_not_a_finish(stub: Any) -> None:
    messages, code, trailing = await collect(stub.Generate(request(model="ends-without-finish")))
    assert_well_formed(messages)
    assert [m.WhichOneof("event") for m in messages] == ["start", "text_delta", "error"]  # no empty delta
    assert messages[-1].error.code == pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED
    assert messages[-1].error.last_sequence == 2
    assert code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_STREAM_TRUNCATED"
    assert CLOSED == ["ends-without-finish"]


async def test_a_stream_with_no_event_at_all_fails_before_start(stub: Any) -> None:
    messages, code, trailing = await collect(stub.Generate(request(model="ends-before-any-event")))
    assert messages == [] and code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_STREAM_TRUNCATED"
    assert CLOSED == ["ends-before-any-event"]


async def test_nothing_follows_the_terminal_event_and_the_provider_is_closed(stub: Any) -> None:
    messages, code, _ = await collect(stub.Generate(request(model="events-after-finish")))
    assert code == grpc.StatusCode.OK
    assert [m.WhichOneof("event") for m in messages] == ["start", "text_delta", "finish"]
    assert messages[-1].finish.reason == pb.FINISH_REASON_STOP
    assert CLOSED == ["events-after-finish"]


async def test_unreported_usage_is_estimated_never_zero(stub: Any) -> None:
    messages, _, _ = await collect(stub.Generate(request(model="no-usage", text="four words of prompt")))
    finish = messages[-1].finish
    assert (finish.reason, finish.raw_reason) == (pb.FINISH_REASON_CONTENT_FILTER, "content_filter")
    usage = finish.usage
    assert usage.source == pb.USAGE_SOURCE_ESTIMATED
    assert usage.output_tokens == 6  # 24 characters at ~4 per token
    assert usage.input_tokens == 5  # 20 characters
    assert not usage.HasField("cache_read_input_tokens")  # unknown stays unset, not 0


async def test_a_relay_closed_before_its_reader_ran_still_closes_the_provider_stream() -> None:
    closed: list[bool] = []

    async def provider() -> EventStream:
        try:
            yield TextDelta("first")
            yield TextDelta("second")
        finally:
            closed.append(True)

    events = provider()
    first = await anext(events)  # as the router opens a stream: its first event is in hand
    info = StreamInfo("s", "r", "p", "m", received_at=0.0, create_time=datetime.now(UTC), prompt_chars=1)
    relay = Relay(Sequencer(info), first, events)
    messages = relay.messages()
    start = await anext(messages)
    assert start.WhichOneof("event") == "start"
    # The write of Start fails at once: the writer closes before the reader task ever ran.
    await messages.aclose()
    await relay.aclose()
    assert closed == [True]
