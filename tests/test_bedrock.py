"""The Bedrock adapter's own checks, against botocore's: its event-stream decoder against botocore's
parser on the fake's bytes, its enums against the service model, its request body against the
ConverseStream input shape. (The behaviour end to end is in tests/test_conformance.py.)"""

from __future__ import annotations

import base64
import random
from typing import Any

import botocore.eventstream
import botocore.session
import pytest
from fakes.bedrock import FakeBedrock, event, exception
from fakes.replies import StreamReply, ToolCallScript
from fakes.server import RequestContext

from service.config import build_routes
from service.errors import GatewayError
from service.events import (
    CacheMarker,
    ChatMessage,
    GenerationRequest,
    Part,
    PartKind,
    ReasoningBlock,
    ResponseFormat,
    ResponseFormatType,
    Role,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from service.providers.bedrock import ERRORS, STOP_REASONS, BedrockOptions, BedrockProvider, request_body
from service.providers.framing import EXCEPTION_PREFIX, EventStreamDecoder, FramingError

MODEL = botocore.session.get_session().get_service_model("bedrock-runtime")


def _stream_bytes() -> bytes:
    reply = StreamReply(
        reasoning=["hm"],
        text=["Hel", "lo 🌍"],
        tool_calls=[ToolCallScript("t1", "f", ['{"a"', ": 1}"])],
    )
    rendered = FakeBedrock()._render_stream(reply, RequestContext({}, {}, "r"))
    return b"".join(f.data for f in rendered.frames) + rendered.error_frame


def test_the_decoder_reads_what_botocore_reads_however_the_body_is_split() -> None:
    data = _stream_bytes()
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(data)
    expected = []
    for message in buffer:
        headers = message.headers
        if headers[":message-type"] == "exception":
            expected.append((EXCEPTION_PREFIX + headers[":exception-type"].encode(), message.payload))
        else:
            expected.append((headers[":event-type"].encode(), message.payload))
    rng = random.Random(7)
    for _ in range(50):
        decoder, got, at = EventStreamDecoder(), [], 0
        while at < len(data):
            step = rng.randint(1, 97)
            got += decoder.feed(data[at : at + step])
            at += step
        got += decoder.close()
        assert got == expected


@pytest.mark.parametrize("where", ["prelude", "payload"])
def test_a_bad_checksum_is_refused_as_botocore_refuses_it(where: str) -> None:
    message = bytearray(event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x"}}))
    message[5 if where == "prelude" else -6] ^= 0x01
    with pytest.raises(FramingError):
        EventStreamDecoder().feed(bytes(message))
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(bytes(message))
    with pytest.raises((botocore.eventstream.ChecksumMismatch, botocore.eventstream.InvalidPayloadLength)):
        list(buffer)


def test_a_body_that_ends_mid_message_is_refused() -> None:
    decoder = EventStreamDecoder()
    assert decoder.feed(exception("throttlingException", "slow down")[:-3]) == []
    with pytest.raises(FramingError):
        decoder.close()


def test_every_stop_reason_and_stream_exception_of_the_service_model_is_mapped() -> None:
    assert set(STOP_REASONS) == set(MODEL.shape_for("StopReason").enum)
    output = MODEL.shape_for("ConverseStreamOutput")
    exceptions = {name for name, shape in output.members.items() if shape.metadata.get("exception")}
    assert exceptions == set(ERRORS.stream_types)


def _unknown_keys(value: Any, shape: Any, path: str) -> list[str]:
    """Keys of `value` that the botocore shape does not have (documents are free-form)."""
    if shape.metadata.get("document") or getattr(shape, "is_document_type", False):
        return []
    if shape.type_name == "structure":
        assert isinstance(value, dict), path
        problems = [f"{path}.{k}" for k in value if k not in shape.members]
        for key, item in value.items():
            if key in shape.members:
                problems += _unknown_keys(item, shape.members[key], f"{path}.{key}")
        return problems
    if shape.type_name == "list":
        return [p for i, item in enumerate(value) for p in _unknown_keys(item, shape.member, f"{path}[{i}]")]
    return []


def test_the_request_body_has_only_what_converse_stream_takes() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 16
    request = GenerationRequest(
        stream_id="s",
        route="r",
        upstream_model="anthropic.claude-test-v1:0",
        messages=(
            ChatMessage(
                Role.SYSTEM,
                parts=(Part(PartKind.TEXT, text="Be brief."), Part(PartKind.TEXT, text="x", cache=CacheMarker(3600))),
            ),
            ChatMessage(
                Role.USER,
                parts=(
                    Part(PartKind.TEXT, text="Look:"),
                    Part(PartKind.IMAGE, media_type="image/png", data=png),
                    Part(
                        PartKind.DOCUMENT, media_type="application/pdf", url="s3://bucket/a.pdf", title="Q3 report.pdf"
                    ),
                ),
            ),
            ChatMessage(
                Role.ASSISTANT,
                reasoning=(ReasoningBlock("thought", "sig"),),
                tool_calls=(ToolCall("t1", "get_weather", '{"city": "Paris"}'),),
            ),
            ChatMessage(Role.TOOL, text="sunny", tool_call_id="t1"),
        ),
        max_output_tokens=4096,
        temperature=0.5,
        top_p=0.9,
        stop_sequences=("END",),
        seed=7,
        tools=(ToolSpec("get_weather", "Weather", {"type": "object"}),),
        tool_choice=ToolChoice(ToolChoiceMode.NAMED, "get_weather"),
        reasoning_budget_tokens=2048,
        response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, name="answer", schema={"type": "object"}),
    )
    body = request_body(request, BedrockOptions(reasoning="anthropic", structured_output=True), "r")
    assert _unknown_keys(body, MODEL.operation_model("ConverseStream").input_shape, "body") == []
    assert body["system"] == [{"text": "Be brief."}, {"text": "x"}, {"cachePoint": {"type": "default", "ttl": "1h"}}]
    user = body["messages"][0]["content"]
    assert user[1] == {"image": {"format": "png", "source": {"bytes": base64.b64encode(png).decode()}}}
    assert user[2]["document"] == {
        "format": "pdf",
        "name": "Q3 report pdf",
        "source": {"s3Location": {"uri": "s3://bucket/a.pdf"}},
    }
    assistant = body["messages"][1]["content"]
    assert assistant[0] == {"reasoningContent": {"reasoningText": {"text": "thought", "signature": "sig"}}}
    assert assistant[1] == {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Paris"}}}
    assert body["messages"][2]["content"] == [{"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}}]
    assert body["inferenceConfig"] == {"maxTokens": 4096, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]}
    assert body["toolConfig"]["toolChoice"] == {"tool": {"name": "get_weather"}}
    assert body["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 2048}}
    assert body["outputConfig"]["textFormat"]["structure"]["jsonSchema"] == {
        "schema": '{"type":"object"}',
        "name": "answer",
    }


def _provider(monkeypatch: pytest.MonkeyPatch, **options: Any) -> BedrockProvider:
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "ABSK-test")
    routes = build_routes(
        {"b": {"provider": "bedrock", "model": "m", "options": {"region": "eu-west-1"} | options}}, "t"
    )
    provider = BedrockProvider(routes["b"])
    return provider


def test_what_a_route_cannot_take_is_refused_naming_the_part(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = _provider(monkeypatch)
    fmt = ResponseFormat(ResponseFormatType.JSON_SCHEMA, name="a", schema={"type": "object"})
    request = GenerationRequest("s", "b", "m", (ChatMessage(Role.USER, text="hi"),), response_format=fmt)
    refusal = provider.capabilities.refusal(request, "b")
    assert refusal is not None and "response_format" in str(refusal)
    cached = ChatMessage(Role.USER, parts=(Part(PartKind.TEXT, text="hi", cache=CacheMarker()),))
    refusal = provider.capabilities.refusal(GenerationRequest("s", "b", "m", (cached,)), "b")
    assert refusal is not None and "messages[0].parts[0].cache_control" in str(refusal)
    with pytest.raises(GatewayError, match="reasoning"):
        request_body(
            GenerationRequest("s", "b", "m", (ChatMessage(Role.USER, text="hi"),), reasoning_budget_tokens=2048),
            provider.options,
            "b",
        )


def test_unknown_options_are_refused_naming_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import ConfigError

    with pytest.raises(ConfigError, match="max_pool"):
        _provider(monkeypatch, max_pool=3)
    with pytest.raises(ConfigError, match="reasoning"):
        _provider(monkeypatch, reasoning="deepseek")


def test_the_readmes_bedrock_route_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    import tomllib

    from conftest import ROOT

    (block,) = re.findall(r"```toml bedrock\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "ABSK-readme")
    routes = build_routes(tomllib.loads(block)["routes"], "README")
    (route,) = routes.values()
    provider = BedrockProvider(route)
    assert provider.capabilities.prompt_caching.value == "explicit" and provider.options.reasoning == "anthropic"
