"""The Gemini adapter's own checks, against the google-genai SDK where it says something: its finish
reasons against the SDK's enum, its request body against the SDK's own REST conversion, and the
chunk shapes the conformance suite does not script (blocked prompts, error chunks whose "error" is
not the first key, usage that leaves zeros out). End to end it runs in tests/test_conformance.py."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.genai import types

from service.config import ConfigError, build_routes
from service.errors import ErrorCode, GatewayError
from service.events import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    Part,
    PartKind,
    ReasoningBlock,
    ReasoningDelta,
    ResponseFormat,
    ResponseFormatType,
    Role,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from service.providers.gemini import FINISH_REASONS, GeminiProvider, StreamParser, request_body


def req(*messages: ChatMessage, **fields: Any) -> GenerationRequest:
    return GenerationRequest(stream_id="s", route="r", upstream_model="gemini-x", messages=messages, **fields)


def test_every_finish_reason_of_the_sdk_is_mapped() -> None:
    assert set(FINISH_REASONS) == {reason.value for reason in types.FinishReason}


def test_the_body_is_geminis_rest_shape() -> None:
    image = Part(PartKind.IMAGE, media_type="image/png", data=b"\x89PNG")
    document = Part(PartKind.DOCUMENT, media_type="application/pdf", url="gs://bucket/a.pdf")
    request = req(
        ChatMessage(Role.SYSTEM, "Be brief."),
        ChatMessage(Role.USER, parts=(Part(PartKind.TEXT, text="Look:"), image, document)),
        ChatMessage(
            Role.ASSISTANT,
            reasoning=(ReasoningBlock("thinking", "c2lnLTE="),),
            tool_calls=(ToolCall("c1", "lookup", '{"q": "x"}'),),
        ),
        ChatMessage(Role.TOOL, "found", tool_call_id="c1"),
        max_output_tokens=100,
        temperature=0.5,
        stop_sequences=("END",),
        seed=7,
        tools=(ToolSpec("lookup", "Looks up", {"type": "object", "properties": {"q": {"type": "string"}}}),),
        tool_choice=ToolChoice(ToolChoiceMode.NAMED, "lookup"),
        reasoning_budget_tokens=1024,
        response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, schema={"type": "object"}),
    )
    body = request_body(request)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    user, model, tool = body["contents"]
    assert user["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(b"\x89PNG").decode()}}
    assert user["parts"][2] == {"fileData": {"fileUri": "gs://bucket/a.pdf", "mimeType": "application/pdf"}}
    assert model == {
        "role": "model",
        "parts": [
            {"text": "thinking", "thought": True, "thoughtSignature": "c2lnLTE="},
            {"functionCall": {"name": "lookup", "args": {"q": "x"}, "id": "c1"}},
        ],
    }
    assert tool == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "lookup", "response": {"result": "found"}, "id": "c1"}}],
    }
    assert body["generationConfig"] == {
        "maxOutputTokens": 100,
        "temperature": 0.5,
        "stopSequences": ["END"],
        "seed": 7,
        "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object"},
        "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True},
    }
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}}
    # The SDK reads the same body as its own request type: every field name is one it knows.
    parsed = types.GenerateContentConfig.model_validate(
        {**body["generationConfig"], "system_instruction": body["systemInstruction"], "tools": body["tools"]}
    )
    assert parsed.thinking_config is not None and parsed.thinking_config.thinking_budget == 1024
    for content in body["contents"]:
        types.Content.model_validate(content)


def parse(*chunks: dict[str, Any]) -> tuple[list[Any], Any]:
    parser = StreamParser("gemini")
    for chunk in chunks:
        parser.handle(b"", orjson.dumps(chunk))
    return parser.out, parser.finish()


def test_thoughts_signatures_calls_and_usage_without_zeros() -> None:
    out, finish = parse(
        {"candidates": [{"content": {"parts": [{"text": "hmm", "thought": True}]}}]},
        {"candidates": [{"content": {"parts": [{"text": "Hi", "thoughtSignature": "s1"}]}}]},
        {
            "candidates": [
                {"content": {"parts": [{"functionCall": {"name": "f", "args": {"a": 1}}}]}, "finishReason": "STOP"}
            ],
            "usageMetadata": {"promptTokenCount": 10, "thoughtsTokenCount": 4, "cachedContentTokenCount": 6},
            "modelVersion": "gemini-x-001",
            "responseId": "r-1",
        },
    )
    assert out == [
        ReasoningDelta("hmm"),
        TextDelta("Hi"),
        ReasoningDelta("", signature="s1"),
        ToolCallDelta(index=0, id="call_0", name="f", arguments='{"a":1}'),
    ]
    assert (finish.reason, finish.raw_reason) == (FinishReason.TOOL_CALLS, "STOP")
    assert finish.usage.input_tokens == 10 and finish.usage.output_tokens == 4
    assert finish.usage.cache_read_input_tokens == 6 and finish.usage.reasoning_tokens == 4
    assert (finish.provider_request_id, finish.provider_model) == ("r-1", "gemini-x-001")


def test_a_blocked_prompt_ends_with_its_block_reason() -> None:
    out, finish = parse({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})
    assert out == [] and (finish.reason, finish.raw_reason) == (FinishReason.CONTENT_FILTER, "PROHIBITED_CONTENT")


def test_an_error_chunk_is_raised_wherever_its_key_is() -> None:
    error = {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}
    with pytest.raises(GatewayError) as caught:
        parse({"candidates": [], "error": error})
    assert caught.value.code is ErrorCode.PROVIDER_RATE_LIMITED


def test_options(monkeypatch: pytest.MonkeyPatch) -> None:
    def route(**options: Any) -> Any:
        return build_routes({"r": {"provider": "gemini", "model": "gemini-x", "options": options}}, "t")["r"]

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        GeminiProvider(route())
    monkeypatch.setenv("GEMINI_API_KEY", "k-1")
    developer = GeminiProvider(route())
    assert developer.url == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
    )
    assert developer.headers["x-goog-api-key"] == "k-1"
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    with pytest.raises(ConfigError, match="project"):
        GeminiProvider(route(api="vertex"))
    vertex = GeminiProvider(route(api="vertex", project="p-1", location="europe-west4"))
    assert vertex.url == (
        "https://europe-west4-aiplatform.googleapis.com/v1beta1/projects/p-1/locations/europe-west4/"
        "publishers/google/models/gemini-x:streamGenerateContent?alt=sse"
    )
    assert "x-goog-api-key" not in vertex.headers


def test_the_readme_example_routes_start(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```toml gemini\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    routes = build_routes(tomllib.loads(block)["routes"], "README")
    assert {name: GeminiProvider(route).options.api for name, route in routes.items()} == {
        "gemini-flash": "developer",
        "gemini-on-vertex": "vertex",
    }
