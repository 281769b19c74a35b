"""Event parsers on vendor events the fake providers do not produce: the corners of each format."""

from __future__ import annotations

import httpx2
import orjson
import pytest

from service.errors import ErrorCode, GatewayError
from service.events import FinishReason, ReasoningDelta, TextDelta, ToolCallDelta
from service.providers.anthropic import EventParser
from service.providers.openai import ChunkParser, OpenAIProvider
from service.providers.upstream import sdk_error


def chunk(delta: dict[str, object] | None = None, finish: str | None = None, **extra: object) -> bytes:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return orjson.dumps({"object": "chat.completion.chunk", "choices": [choice], **extra})


def event(kind: str, **fields: object) -> tuple[bytes, bytes]:
    return kind.encode(), orjson.dumps({"type": kind, **fields})


def test_anthropic_cumulative_usage_is_never_summed() -> None:
    parser = EventParser("anthropic")
    parser.handle(*event("message_start", message={"usage": {"input_tokens": 30, "output_tokens": 1}}))
    parser.handle(*event("message_delta", delta={"stop_reason": None}, usage={"output_tokens": 10}))
    parser.handle(*event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 25}))
    parser.handle(*event("message_stop"))
    finished = parser.finish()
    assert finished.usage is not None
    assert (finished.usage.input_tokens, finished.usage.output_tokens) == (30, 25)


def test_anthropic_stream_without_message_stop_is_truncated() -> None:
    parser = EventParser("anthropic")
    parser.handle(*event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 3}))
    with pytest.raises(GatewayError) as caught:
        parser.finish()
    assert caught.value.code is ErrorCode.PROVIDER_STREAM_TRUNCATED


@pytest.mark.parametrize("stop_reason", [None, ""])
def test_anthropic_message_stop_without_a_stop_reason_is_truncated(stop_reason: str | None) -> None:
    # The Anthropic twin of an OpenAI [DONE] without a finish_reason: the answer may be cut short.
    parser = EventParser("anthropic")
    parser.handle(*event("message_start", message={"usage": {"input_tokens": 3, "output_tokens": 1}}))
    parser.handle(*event("content_block_delta", index=0, delta={"type": "text_delta", "text": "The answer is"}))
    if stop_reason is not None:
        parser.handle(*event("message_delta", delta={"stop_reason": stop_reason}, usage={"output_tokens": 3}))
    parser.handle(*event("message_stop"))
    assert parser.done
    with pytest.raises(GatewayError) as caught:
        parser.finish()
    assert caught.value.code is ErrorCode.PROVIDER_STREAM_TRUNCATED


def test_anthropic_tool_calls_are_numbered_among_tool_calls_only() -> None:
    parser = EventParser("anthropic")
    parser.handle(*event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
    parser.handle(*event("content_block_start", index=1, content_block={"type": "tool_use", "id": "t1", "name": "f"}))
    parser.handle(*event("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": "{}"}))
    assert parser.out == [ToolCallDelta(index=0, id="t1", name="f"), ToolCallDelta(index=0, arguments="{}")]


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        ("overloaded_error", ErrorCode.PROVIDER_UNAVAILABLE),
        ("api_error", ErrorCode.PROVIDER_UNAVAILABLE),
        ("rate_limit_error", ErrorCode.PROVIDER_RATE_LIMITED),
        ("invalid_request_error", ErrorCode.PROVIDER_REJECTED_REQUEST),
        ("something_new", ErrorCode.PROVIDER_ERROR),
    ],
)
def test_anthropic_error_events(error_type: str, code: ErrorCode) -> None:
    parser = EventParser("anthropic")
    with pytest.raises(GatewayError) as caught:
        parser.handle(*event("error", error={"type": error_type, "message": "details"}))
    assert caught.value.code is code and caught.value.retryable == code.retryable


def test_openai_finish_then_eof_without_done_still_finishes() -> None:
    # Some compatible servers end the body after the finish_reason chunk, with no [DONE].
    parser = ChunkParser("openai-compatible")
    parser.handle(b"", chunk({"content": "hi"}))
    parser.handle(b"", chunk(finish="length"))
    finished = parser.finish()
    assert (finished.reason, finished.raw_reason, finished.usage) == (FinishReason.LENGTH, "length", None)


def test_openai_eof_without_finish_or_done_is_truncated() -> None:
    parser = ChunkParser("openai")
    parser.handle(b"", chunk({"content": "hi"}))
    with pytest.raises(GatewayError) as caught:
        parser.finish()
    assert caught.value.code is ErrorCode.PROVIDER_STREAM_TRUNCATED


def test_openai_refusal_is_relayed_and_finishes_as_refusal() -> None:
    parser = ChunkParser("openai")
    parser.handle(b"", chunk({"refusal": "I can't help with that."}))
    parser.handle(b"", chunk(finish="stop"))
    parser.handle(b"", b"[DONE]")
    assert parser.out == [TextDelta("I can't help with that.")]
    finished = parser.finish()
    assert (finished.reason, finished.raw_reason) == (FinishReason.REFUSAL, "stop")


def test_openai_reasoning_field_variants() -> None:
    parser = ChunkParser("openai-compatible")
    parser.handle(b"", chunk({"reasoning_content": "vllm"}))
    parser.handle(b"", chunk({"reasoning": "ollama"}))
    assert parser.out == [ReasoningDelta("vllm"), ReasoningDelta("ollama")]


@pytest.mark.parametrize(
    ("error_type", "code"),
    [("server_error", ErrorCode.PROVIDER_UNAVAILABLE), ("rate_limit_exceeded", ErrorCode.PROVIDER_RATE_LIMITED)],
)
def test_openai_error_chunk(error_type: str, code: ErrorCode) -> None:
    parser = ChunkParser("openai")
    with pytest.raises(GatewayError) as caught:
        parser.handle(b"", orjson.dumps({"error": {"message": "boom", "type": error_type}}))
    assert caught.value.code is code


def test_openai_tool_call_with_a_bad_index_is_refused() -> None:
    parser = ChunkParser("openai")
    with pytest.raises(TypeError):
        parser.handle(b"", chunk({"tool_calls": [{"index": "zero", "function": {"arguments": "{}"}}]}))


def test_openai_done_without_a_finish_reason_is_truncated_not_finished() -> None:
    # What a proxy that cuts a stream short may send: [DONE] after a partial answer.
    parser = ChunkParser("openai")
    parser.handle(b"", chunk({"content": "The answer is"}))
    parser.handle(b"", b"[DONE]")
    with pytest.raises(GatewayError) as caught:
        parser.finish()
    assert caught.value.code is ErrorCode.PROVIDER_STREAM_TRUNCATED


def test_anthropic_tool_call_without_input_gets_an_empty_object() -> None:
    parser = EventParser("anthropic")
    parser.handle(*event("content_block_start", index=0, content_block={"type": "tool_use", "id": "t", "name": "now"}))
    parser.handle(*event("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": ""}))
    parser.handle(*event("content_block_stop", index=0))
    assert parser.out == [ToolCallDelta(index=0, id="t", name="now"), ToolCallDelta(index=0, arguments="{}")]


def test_a_body_that_does_not_decode_is_a_protocol_error() -> None:
    err = sdk_error("openai", httpx2.DecodingError("bad gzip"), OpenAIProvider.errors, started=True)
    assert err is not None and err.code is ErrorCode.PROVIDER_PROTOCOL_ERROR
