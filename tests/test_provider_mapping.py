"""Request mapping to each vendor's parameters, and route options of the HTTP providers."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import ConfigError, build_routes
from service.errors import ErrorCode, GatewayError
from service.events import (
    ChatMessage,
    GenerationRequest,
    ReasoningBlock,
    ReasoningEffort,
    Role,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from service.providers import anthropic as anthropic_adapter
from service.providers import create_provider
from service.providers import openai as openai_adapter

WEATHER = ToolSpec("get_weather", "Current weather", {"type": "object", "properties": {"city": {"type": "string"}}})
CONVERSATION = (
    ChatMessage(Role.SYSTEM, "Be brief."),
    ChatMessage(Role.USER, "Weather in Paris and Rome?"),
    ChatMessage(
        Role.ASSISTANT,
        "Checking.",
        tool_calls=(
            ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
            ToolCall("call_2", "get_weather", '{"city": "Rome"}'),
        ),
        reasoning=(ReasoningBlock("Two cities, two calls.", "sig-abc"),),
    ),
    ChatMessage(Role.TOOL, "18 C", tool_call_id="call_1"),
    ChatMessage(Role.TOOL, "21 C", tool_call_id="call_2"),
)


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(
        stream_id="s1", route="r", upstream_model="model-x", messages=fields.pop("messages", CONVERSATION), **fields
    )


def test_openai_body_sends_only_what_the_caller_set() -> None:
    body = openai_adapter.request_body(request(), "max_completion_tokens")
    assert body == {
        "model": "model-x",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "21 C"},
        ],
    }


def test_openai_body_options_tools_and_reasoning() -> None:
    body = openai_adapter.request_body(
        request(
            max_output_tokens=64,
            temperature=0.0,
            top_p=0.5,
            stop_sequences=("END",),
            seed=7,
            tools=(WEATHER,),
            tool_choice=ToolChoice(ToolChoiceMode.NAMED, "get_weather"),
            reasoning_budget_tokens=10_000,
        ),
        "max_tokens",
    )
    assert body["max_tokens"] == 64 and "max_completion_tokens" not in body
    # 0.0 is a value the caller set, not "unset".
    assert (body["temperature"], body["top_p"], body["stop"], body["seed"]) == (0.0, 0.5, ["END"], 7)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER.parameters},
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["reasoning_effort"] == "medium"


@pytest.mark.parametrize(
    ("mode", "openai", "anthropic"),
    [
        (ToolChoiceMode.AUTO, None, None),
        (ToolChoiceMode.NONE, "none", {"type": "none"}),
        (ToolChoiceMode.REQUIRED, "required", {"type": "any"}),
    ],
)
def test_tool_choice_modes(mode: ToolChoiceMode, openai: Any, anthropic: Any) -> None:
    r = request(tools=(WEATHER,), tool_choice=ToolChoice(mode))
    assert openai_adapter.request_body(r, "max_tokens").get("tool_choice") == openai
    assert (
        anthropic_adapter.request_body(r, default_max_tokens=100, reasoning_mode="budget").get("tool_choice")
        == anthropic
    )


def test_anthropic_body_system_tool_results_and_thinking_blocks() -> None:
    body = anthropic_adapter.request_body(request(), default_max_tokens=4096, reasoning_mode="budget")
    assert body == {
        "model": "model-x",
        "stream": True,
        "max_tokens": 4096,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Two cities, two calls.", "signature": "sig-abc"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
                ],
            },
            # Both results in one user turn, as the API requires after parallel calls.
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "21 C"},
                ],
            },
        ],
    }


def test_anthropic_body_options_and_reasoning() -> None:
    body = anthropic_adapter.request_body(
        request(
            temperature=1.0, stop_sequences=("END",), seed=3, reasoning_effort=ReasoningEffort.LOW, tools=(WEATHER,)
        ),
        default_max_tokens=1000,
        reasoning_mode="budget",
    )
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    # Thinking counts against max_tokens: the answer keeps its usual room on top.
    assert body["max_tokens"] == 1000 + 2048
    assert (body["temperature"], body["stop_sequences"]) == (1.0, ["END"]) and "seed" not in body
    assert body["tools"] == [
        {"name": "get_weather", "description": "Current weather", "input_schema": WEATHER.parameters}
    ]
    adaptive = anthropic_adapter.request_body(
        request(reasoning_effort=ReasoningEffort.HIGH, max_output_tokens=500),
        default_max_tokens=1000,
        reasoning_mode="adaptive",
    )
    assert adaptive["thinking"] == {"type": "adaptive"} and adaptive["output_config"] == {"effort": "high"}
    assert adaptive["max_tokens"] == 500


def routes(provider: str, **options: Any) -> Any:
    model = "owner/model" if provider == "replicate" else "m"
    return build_routes({"r": {"provider": provider, "model": model, "options": options}}, "test")["r"]


def test_a_missing_key_stops_the_server_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENWIRE_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="TOKENWIRE_TEST_NO_SUCH_KEY is not set"):
        create_provider(routes("openai", api_key_env="TOKENWIRE_TEST_NO_SUCH_KEY"))
    with pytest.raises(ConfigError, match="ANTHROPIC_KEY_FOR_TEST is not set"):
        create_provider(routes("anthropic", api_key_env="ANTHROPIC_KEY_FOR_TEST"))


@pytest.mark.parametrize(
    ("provider", "options", "problem"),
    [
        ("azure-openai", {}, "options.endpoint is required"),
        ("openai-compatible", {}, "options.base_url is required"),
        ("openai", {"base_url": "ftp://x"}, "must be an http:// or https:// URL"),
        ("openai", {"max_tokens_field": "max_new_tokens"}, "max_tokens_field must be one of"),
        ("anthropic", {"reasoning_mode": "deep"}, "reasoning_mode must be one of"),
        ("anthropic", {"read_timeout_seconds": 0}, "read_timeout_seconds must be from"),
        ("anthropic", {"temperature": 1}, "unknown option"),
    ],
)
def test_bad_route_options_are_named(
    monkeypatch: pytest.MonkeyPatch, provider: str, options: dict[str, Any], problem: str
) -> None:
    for name in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(name, "test-key-for-config-checks")
    with pytest.raises(ConfigError, match=problem):
        create_provider(routes(provider, **options))


@pytest.mark.parametrize(
    ("provider", "options"),
    [
        ("openai", {}),
        ("azure-openai", {"endpoint": "http://127.0.0.1:9"}),
        ("openai-compatible", {"base_url": "http://127.0.0.1:9/v1"}),
        ("anthropic", {}),
        ("gemini", {}),
        ("bedrock", {"region": "us-east-1", "auth": "api-key"}),
        ("sse-endpoint", {"url": "http://127.0.0.1:9/generate", "end_data": "[DONE]"}),
        ("watsonx", {"url": "https://127.0.0.1:9", "project_id": "p", "auth": "token"}),
        ("replicate", {}),
    ],
)
async def test_every_http_route_takes_the_connection_options(
    monkeypatch: pytest.MonkeyPatch, provider: str, options: dict[str, Any]
) -> None:
    for name in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.setenv(name, "test-key-for-config-checks")
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "test-key-for-config-checks")
    monkeypatch.setenv("WATSONX_TOKEN", "test-key-for-config-checks")
    monkeypatch.setenv("REPLICATE_API_TOKEN", "test-key-for-config-checks")
    with pytest.raises(ConfigError, match=r"options\.keepalive_expiry_seconds must be from 0\.0, got -1"):
        create_provider(routes(provider, **options, keepalive_expiry_seconds=-1))
    pool = {"max_connections": 7, "keepalive_expiry_seconds": 5, "max_connection_age_seconds": 60, "dns_ttl_seconds": 0}
    created: Any = create_provider(routes(provider, **options, **pool, read_timeout_seconds=9))
    s = created.settings
    assert (s.max_connections, s.keepalive_expiry, s.max_connection_age, s.dns_ttl, s.read_timeout) == (7, 5, 60, 0, 9)
    await created.aclose()


async def test_a_local_server_needs_no_key() -> None:
    provider = create_provider(routes("openai-compatible", base_url="http://127.0.0.1:9/v1"))
    assert provider.kind == "openai-compatible"
    await provider.aclose()


@pytest.mark.parametrize(
    ("max_output", "budget", "sent_max", "sent_budget"),
    [
        (None, 100, 4096 + 1024, 1024),  # below Anthropic's minimum budget: raised to it
        (3000, 2048, 3000, 2048),
        (1500, 2048, 1500, 1499),  # the budget must stay below max_tokens
    ],
)
def test_anthropic_thinking_budget_fits_max_tokens(
    max_output: int | None, budget: int, sent_max: int, sent_budget: int
) -> None:
    body = anthropic_adapter.request_body(
        request(max_output_tokens=max_output, reasoning_budget_tokens=budget),
        default_max_tokens=4096,
        reasoning_mode="budget",
    )
    assert (body["max_tokens"], body["thinking"]["budget_tokens"]) == (sent_max, sent_budget)


def test_anthropic_reasoning_with_too_few_max_tokens_is_the_callers_to_fix() -> None:
    with pytest.raises(GatewayError) as caught:
        anthropic_adapter.request_body(
            request(max_output_tokens=512, reasoning_effort=ReasoningEffort.LOW),
            default_max_tokens=4096,
            reasoning_mode="budget",
        )
    assert caught.value.code is ErrorCode.INVALID_REQUEST and caught.value.field_violations[0][0] == "max_output_tokens"


def test_anthropic_drops_reasoning_without_a_signature() -> None:
    messages = (
        ChatMessage(Role.USER, "Hi"),
        ChatMessage(Role.ASSISTANT, "Hello", reasoning=(ReasoningBlock("from another provider", ""),)),
        ChatMessage(Role.USER, "Again"),
    )
    body = anthropic_adapter.request_body(request(messages=messages), default_max_tokens=10, reasoning_mode="budget")
    assert body["messages"][1]["content"] == [{"type": "text", "text": "Hello"}]
