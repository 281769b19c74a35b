"""The OpenAI and Anthropic adapters end to end: a real tokenwire server, the real SDKs, and fake
providers that are real HTTP servers on 127.0.0.1 speaking each vendor's exact SSE framing."""

from __future__ import annotations

import asyncio
import re
import time
import tomllib
from typing import Any

import grpc
import orjson
import pytest
from fakes import FakeAnthropic, FakeOpenAI, ResetReply, StatusReply, StreamReply, ToolCallScript, Usage

from conftest import (
    ANTHROPIC_KEY_ENV,
    OPENAI_KEY_ENV,
    ROOT,
    ErrorInfo,
    RetryInfo,
    Running,
    assert_well_formed,
    collect,
    detail,
    request,
    rich_status,
)
from service.config import build_routes
from service.providers import create_provider
from service.providers.anthropic import AnthropicProvider
from tokenwire.v1 import generation_pb2 as pb

VENDORS = ("openai", "anthropic")
TOOLS = [
    pb.Tool(name="get_weather", description="Current weather"),
    pb.Tool(name="get_time", description="Current time"),
]


def provider_routes(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, **extra: Any) -> dict[str, Any]:
    """Routes on the fakes; `extra` overrides route keys for every route (e.g. max_retries)."""
    common = {"read_timeout_seconds": 1.0, "connect_timeout_seconds": 1.0}
    routes: dict[str, Any] = {
        "openai": {
            "provider": "openai",
            "model": "gpt-test",
            "options": common | {"base_url": fake_openai.base_url, "api_key_env": OPENAI_KEY_ENV},
        },
        "anthropic": {
            "provider": "anthropic",
            "model": "claude-test",
            "options": common | {"base_url": fake_anthropic.base_url, "api_key_env": ANTHROPIC_KEY_ENV},
        },
        "azure": {
            "provider": "azure-openai",
            "model": "my-deployment",
            "options": common | {"endpoint": fake_openai.base_url.removesuffix("/v1"), "api_key_env": OPENAI_KEY_ENV},
        },
        "local": {
            "provider": "openai-compatible",
            "model": "llama-test",
            "options": common | {"base_url": fake_openai.base_url, "api_key_env": OPENAI_KEY_ENV},
        },
        "openai-then-anthropic": {
            "provider": "openai",
            "model": "gpt-test",
            "options": common | {"base_url": fake_openai.base_url, "api_key_env": OPENAI_KEY_ENV},
            "fallbacks": ["anthropic"],
        },
        "nowhere": {
            # Nothing listens on port 9 of loopback: connection refused.
            "provider": "openai",
            "model": "gpt-test",
            "options": common | {"base_url": "http://127.0.0.1:9/v1", "api_key_env": OPENAI_KEY_ENV},
        },
    }
    for route in routes.values():
        route.update(extra)
    return routes


@pytest.fixture
async def gateway(
    start_server: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> Running:
    monkeypatch.setenv(OPENAI_KEY_ENV, fake_openai.api_key)
    monkeypatch.setenv(ANTHROPIC_KEY_ENV, fake_anthropic.api_key)
    running: Running = await start_server(routes=provider_routes(fake_openai, fake_anthropic, max_retries=0))
    return running


@pytest.fixture
def fakes(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> dict[str, Any]:
    return {"openai": fake_openai, "anthropic": fake_anthropic}


def kinds(messages: list[pb.GenerateResponse]) -> list[str]:
    return [str(m.WhichOneof("event")) for m in messages]


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.text_delta.text for m in messages if m.HasField("text_delta"))


def tool_calls(messages: list[pb.GenerateResponse]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for m in messages:
        if m.HasField("tool_call_delta"):
            d = m.tool_call_delta
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id:
                assert not call["id"], "id is sent on the first delta of a call only"
                call["id"], call["name"] = d.id, d.name
            call["arguments"] += d.arguments_delta
    return calls


# --- Streams: the same scenario yields the same event shapes from every vendor ---------------


@pytest.mark.parametrize("vendor", VENDORS)
async def test_text_stream(gateway: Running, fakes: dict[str, Any], vendor: str) -> None:
    # Paced, so that each piece is written before the next arrives: nothing queues to be merged.
    fakes[vendor].enqueue(
        StreamReply(text=["Hel", "lo, ", "wörld 🌍"], usage=Usage(input_tokens=11, output_tokens=5), interval=0.03)
    )
    messages, code, _ = await collect(gateway.stub.Generate(request(model=vendor)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert kinds(messages) == ["start", "text_delta", "text_delta", "text_delta", "finish"]
    assert text_of(messages) == "Hello, wörld 🌍"
    start, finish = messages[0].start, messages[-1].finish
    assert (start.route, start.provider) == (vendor, vendor)
    assert finish.reason == pb.FINISH_REASON_STOP
    assert finish.raw_reason == {"openai": "stop", "anthropic": "end_turn"}[vendor]
    assert finish.usage.source == pb.USAGE_SOURCE_PROVIDER
    assert (finish.usage.input_tokens, finish.usage.output_tokens) == (11, 5)
    assert finish.timing.HasField("time_to_first_token")


async def test_the_same_request_gives_the_same_event_shapes_from_both_vendors(
    gateway: Running, fakes: dict[str, Any]
) -> None:
    shapes = {}
    for vendor in VENDORS:
        fakes[vendor].enqueue(
            StreamReply(
                reasoning=["Think", "ing."],
                text=["Let me check."],
                tool_calls=[ToolCallScript("call_1", "get_weather", ['{"city":', ' "Paris"}'])],
            )
        )
        messages, code, _ = await collect(
            gateway.stub.Generate(request(model=vendor, tools=TOOLS, reasoning=pb.ReasoningOptions(budget_tokens=2048)))
        )
        assert code == grpc.StatusCode.OK
        assert_well_formed(messages)
        assert tool_calls(messages) == {0: {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}}
        assert messages[-1].finish.reason == pb.FINISH_REASON_TOOL_CALLS
        # Anthropic closes a thinking block with its signature; the reasoning text is the same.
        reasoning = [m.reasoning_delta for m in messages if m.HasField("reasoning_delta")]
        assert "".join(r.text for r in reasoning) == "Thinking."
        shapes[vendor] = [k for k, m in zip(kinds(messages), messages, strict=True) if not _signature_only(m)]
    assert shapes["openai"] == shapes["anthropic"]


def _signature_only(m: pb.GenerateResponse) -> bool:
    return m.HasField("reasoning_delta") and not m.reasoning_delta.text


@pytest.mark.parametrize("vendor", VENDORS)
async def test_parallel_tool_calls(gateway: Running, fakes: dict[str, Any], vendor: str) -> None:
    fakes[vendor].enqueue(
        StreamReply(
            text=[],
            tool_calls=[
                ToolCallScript("call_a", "get_weather", ['{"city"', ': "Rome"}']),
                ToolCallScript("call_b", "get_time", ['{"tz": ', '"CET"}']),
            ],
        )
    )
    messages, code, _ = await collect(gateway.stub.Generate(request(model=vendor, tools=TOOLS)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    calls = tool_calls(messages)
    assert calls == {
        0: {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        1: {"id": "call_b", "name": "get_time", "arguments": '{"tz": "CET"}'},
    }
    assert all(orjson.loads(c["arguments"]) for c in calls.values())
    assert messages[-1].finish.reason == pb.FINISH_REASON_TOOL_CALLS


async def test_anthropic_thinking_streams_with_its_signature(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(
        StreamReply(reasoning=["Let me ", "think."], signature="sig-XYZ", text=["Done."], interval=0.03)
    )
    messages, code, _ = await collect(
        gateway.stub.Generate(request(model="anthropic", reasoning=pb.ReasoningOptions(effort=pb.REASONING_EFFORT_LOW)))
    )
    assert code == grpc.StatusCode.OK
    reasoning = [m.reasoning_delta for m in messages if m.HasField("reasoning_delta")]
    assert [(r.text, r.signature) for r in reasoning] == [("Let me ", ""), ("think.", ""), ("", "sig-XYZ")]
    # Reasoning comes before the answer.
    assert kinds(messages).index("reasoning_delta") < kinds(messages).index("text_delta")
    assert fake_anthropic.requests[-1].body["thinking"] == {"type": "enabled", "budget_tokens": 2048}


@pytest.mark.parametrize("vendor", VENDORS)
async def test_usage_with_cache_and_reasoning_tokens(gateway: Running, fakes: dict[str, Any], vendor: str) -> None:
    fakes[vendor].enqueue(
        StreamReply(
            usage=Usage(
                input_tokens=100, output_tokens=40, cache_read_tokens=60, cache_write_tokens=20, reasoning_tokens=0
            )
        )
    )
    messages, _, _ = await collect(gateway.stub.Generate(request(model=vendor)))
    usage = messages[-1].finish.usage
    assert usage.source == pb.USAGE_SOURCE_PROVIDER
    assert usage.output_tokens == 40 and usage.cache_read_input_tokens == 60
    if vendor == "openai":
        # prompt_tokens already includes cached tokens; OpenAI reports no cache writes.
        assert usage.input_tokens == 100 and not usage.HasField("cache_write_input_tokens")
        # 0 reasoning tokens is a reported 0, not "unknown".
        assert usage.HasField("reasoning_tokens") and usage.reasoning_tokens == 0
    else:
        # Anthropic counts cached prompt tokens apart; the contract's input includes them.
        assert usage.input_tokens == 100 + 60 + 20 and usage.cache_write_input_tokens == 20


@pytest.mark.parametrize("vendor", VENDORS)
async def test_no_usage_from_the_provider_is_estimated_never_zero(
    gateway: Running, fakes: dict[str, Any], vendor: str
) -> None:
    fakes[vendor].enqueue(StreamReply(text=["Some answer text here."], usage=None))
    messages, code, _ = await collect(gateway.stub.Generate(request(model=vendor)))
    assert code == grpc.StatusCode.OK
    usage = messages[-1].finish.usage
    assert usage.source == pb.USAGE_SOURCE_ESTIMATED and usage.output_tokens > 0 and usage.input_tokens > 0


@pytest.mark.parametrize(
    ("vendor", "raw", "reason"),
    [
        ("openai", "length", pb.FINISH_REASON_LENGTH),
        ("openai", "content_filter", pb.FINISH_REASON_CONTENT_FILTER),
        ("openai", "some_new_reason", pb.FINISH_REASON_OTHER),
        ("anthropic", "max_tokens", pb.FINISH_REASON_LENGTH),
        ("anthropic", "stop_sequence", pb.FINISH_REASON_STOP_SEQUENCE),
        ("anthropic", "refusal", pb.FINISH_REASON_REFUSAL),
        ("anthropic", "pause_turn", pb.FINISH_REASON_OTHER),
    ],
)
async def test_finish_reasons_keep_their_raw_value(
    gateway: Running, fakes: dict[str, Any], vendor: str, raw: str, reason: int
) -> None:
    fakes[vendor].enqueue(StreamReply(finish=raw, stop_sequence="END" if raw == "stop_sequence" else None))
    messages, code, _ = await collect(gateway.stub.Generate(request(model=vendor)))
    assert code == grpc.StatusCode.OK
    finish = messages[-1].finish
    assert (finish.reason, finish.raw_reason) == (reason, raw)
    assert finish.stop_sequence == ("END" if raw == "stop_sequence" else "")


# --- What reaches the provider --------------------------------------------------------------


async def test_openai_request_as_the_provider_sees_it(gateway: Running, fake_openai: FakeOpenAI) -> None:
    call = gateway.stub.Generate(
        request(model="openai", max_output_tokens=50, metadata={"team": "search-secret-team"}),
        metadata=[("authorization", "Bearer caller-token-must-not-travel")],
    )
    _, code, _ = await collect(call)
    assert code == grpc.StatusCode.OK
    seen = fake_openai.requests[-1]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {fake_openai.api_key}"
    body = seen.body
    assert body["model"] == "gpt-test" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 50
    # Unset options are not sent as zeros.
    assert not {"temperature", "top_p", "seed", "stop", "tools"} & set(body)
    # Caller metadata and the caller's own credentials never travel upstream.
    upstream = str(seen.headers) + str(body)
    assert "search-secret-team" not in upstream and "caller-token-must-not-travel" not in upstream


async def test_anthropic_request_as_the_provider_sees_it(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    req = pb.GenerateRequest(
        model="anthropic",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, text="Be brief."),
            pb.Message(role=pb.ROLE_USER, text="Weather?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id="toolu_1", name="get_weather", arguments_json='{"city": "Oslo"}')],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="toolu_1", text="-3 C"),
        ],
        tools=TOOLS,
        stop_sequences=["END"],
    )
    _, code, _ = await collect(gateway.stub.Generate(req))
    assert code == grpc.StatusCode.OK
    seen = fake_anthropic.requests[-1]
    assert seen.path == "/v1/messages"
    # SDK 2.x sends the key as a bearer token; earlier versions used x-api-key.
    assert fake_anthropic.api_key in (seen.headers.get("x-api-key"), seen.headers.get("authorization", "")[7:])
    assert "anthropic-version" in seen.headers
    body = seen.body
    assert body["system"] == "Be brief." and body["max_tokens"] == 4096 and body["stop_sequences"] == ["END"]
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}],
    }
    assert body["messages"][2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "-3 C"}],
    }
    assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize(
    "arguments",
    [
        '{"city": NaN}',
        '{"t": Infinity}',
        '{"t": -Infinity}',
        '{"t": 1e400}',
        '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ],
    ids=["NaN", "Infinity", "-Infinity", "overflow", "nested-100000"],
)
@pytest.mark.parametrize("vendor", VENDORS)
async def test_tool_call_arguments_no_vendor_can_parse_are_invalid_argument(
    gateway: Running, fakes: dict[str, Any], vendor: str, arguments: str
) -> None:
    # Python's json reads NaN and Infinity, orjson and the vendors do not: validation reads
    # caller JSON as the adapters do, so nothing reaches INTERNAL or goes upstream as bad JSON.
    req = pb.GenerateRequest(
        model=vendor,
        messages=[
            pb.Message(role=pb.ROLE_USER, text="Weather?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="t1", name="get_weather", arguments_json=arguments)]
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="t1", text="-3 C"),
        ],
    )
    messages, code, trailing = await collect(gateway.stub.Generate(req))
    assert (messages, code) == ([], grpc.StatusCode.INVALID_ARGUMENT)
    assert detail(rich_status(trailing), ErrorInfo).reason == "INVALID_REQUEST"
    assert fakes[vendor].requests == []


async def test_azure_deployment_route(gateway: Running, fake_openai: FakeOpenAI) -> None:
    messages, code, _ = await collect(gateway.stub.Generate(request(model="azure")))
    assert code == grpc.StatusCode.OK and messages[0].start.provider == "azure-openai"
    seen = fake_openai.requests[-1]
    assert seen.path == "/openai/deployments/my-deployment/chat/completions"
    assert seen.query["api-version"] == "2024-10-21"
    assert seen.headers["api-key"] == fake_openai.api_key


async def test_openai_compatible_route_uses_max_tokens(gateway: Running, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(StreamReply(reasoning=["vLLM-style reasoning"], text=["ok"]))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="local", max_output_tokens=9)))
    assert code == grpc.StatusCode.OK and messages[0].start.provider == "openai-compatible"
    assert [m.reasoning_delta.text for m in messages if m.HasField("reasoning_delta")] == ["vLLM-style reasoning"]
    body = fake_openai.requests[-1].body
    assert body["max_tokens"] == 9 and "max_completion_tokens" not in body


# --- Provider errors before the first token ------------------------------------------------


@pytest.mark.parametrize(
    ("vendor", "status", "grpc_code", "reason"),
    [
        ("openai", 400, grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST"),
        ("anthropic", 400, grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST"),
        ("openai", 500, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("anthropic", 529, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("openai", 429, grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
        ("anthropic", 403, grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED"),
    ],
)
async def test_http_errors_map_to_the_contract(
    gateway: Running, fakes: dict[str, Any], vendor: str, status: int, grpc_code: grpc.StatusCode, reason: str
) -> None:
    fakes[vendor].enqueue(StatusReply(status, message="prompt is too long: 250000 tokens > 200000 maximum"))
    messages, code, trailing = await collect(gateway.stub.Generate(request(model=vendor)))
    assert messages == [] and code == grpc_code
    info = detail(rich_status(trailing), ErrorInfo)
    assert info.reason == reason and info.metadata["provider"] == vendor
    assert info.metadata["provider_http_status"] == str(status)
    if status == 400:
        # The caller's own mistake: the provider's explanation helps it fix the request.
        assert "prompt is too long" in rich_status(trailing).message


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_bad_provider_key_is_internal_and_leaks_no_key(
    start_server: Any, fakes: dict[str, Any], monkeypatch: pytest.MonkeyPatch, vendor: str
) -> None:
    wrong = "wrong-key-LEAKCANARY-0123456789"
    monkeypatch.setenv(OPENAI_KEY_ENV, wrong)
    monkeypatch.setenv(ANTHROPIC_KEY_ENV, wrong)
    running = await start_server(routes=provider_routes(fakes["openai"], fakes["anthropic"]))
    messages, code, trailing = await collect(running.stub.Generate(request(model=vendor)))
    assert messages == [] and code == grpc.StatusCode.INTERNAL
    status = rich_status(trailing)
    assert detail(status, ErrorInfo).reason == "PROVIDER_AUTH_FAILED"
    assert "LEAKCANARY" not in str(status) and "LEAKCANARY" not in str(trailing)
    # Not retried: another attempt with the same key fails the same way.
    assert len(fakes[vendor].requests) == 1


async def test_connection_refused_is_unavailable(gateway: Running) -> None:
    messages, code, trailing = await collect(gateway.stub.Generate(request(model="nowhere")))
    assert messages == [] and code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_UNAVAILABLE"


# --- Retries and fallback ------------------------------------------------------------------


@pytest.fixture
async def retrying(
    start_server: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> Running:
    monkeypatch.setenv(OPENAI_KEY_ENV, fake_openai.api_key)
    monkeypatch.setenv(ANTHROPIC_KEY_ENV, fake_anthropic.api_key)
    running: Running = await start_server(routes=provider_routes(fake_openai, fake_anthropic, max_retries=2))
    return running


@pytest.mark.parametrize("vendor", VENDORS)
async def test_429_with_a_short_retry_after_is_retried_then_streams_once(
    retrying: Running, fakes: dict[str, Any], vendor: str
) -> None:
    fake = fakes[vendor]
    fake.enqueue(StatusReply(429, headers={"retry-after": "0.3"}), StreamReply(text=["a", "b", "c"]))
    started = time.monotonic()
    messages, code, _ = await collect(retrying.stub.Generate(request(model=vendor), timeout=10))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert text_of(messages) == "abc"
    assert len(fake.requests) == 2
    # The provider's retry-after was honoured.
    assert fake.requests[1].received_at - fake.requests[0].received_at >= 0.29
    assert time.monotonic() - started < 5


async def test_429_with_a_retry_after_beyond_the_deadline_is_not_retried(
    retrying: Running, fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(StatusReply(429, headers={"retry-after": "5"}))
    started = time.monotonic()
    messages, code, trailing = await collect(retrying.stub.Generate(request(model="openai"), timeout=2))
    assert messages == [] and code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 1.5
    retry = detail(rich_status(trailing), RetryInfo)
    assert retry is not None and retry.retry_delay.seconds == 5
    assert len(fake_openai.requests) == 1


async def test_retry_after_ms_is_honoured(retrying: Running, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(StatusReply(529, headers={"retry-after-ms": "150"}), StreamReply())
    _, code, _ = await collect(retrying.stub.Generate(request(model="anthropic"), timeout=10))
    assert code == grpc.StatusCode.OK and len(fake_anthropic.requests) == 2
    gap = fake_anthropic.requests[1].received_at - fake_anthropic.requests[0].received_at
    assert 0.14 <= gap < 1.0


@pytest.mark.parametrize("vendor", VENDORS)
async def test_5xx_until_retries_are_exhausted(retrying: Running, fakes: dict[str, Any], vendor: str) -> None:
    fake = fakes[vendor]
    fake.default = StatusReply(503, headers={"retry-after": "0.05"})
    messages, code, trailing = await collect(retrying.stub.Generate(request(model=vendor), timeout=10))
    assert messages == [] and code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_UNAVAILABLE"
    assert len(fake.requests) == 3  # the first attempt and max_retries = 2


@pytest.mark.parametrize("fault", ["reset", "error_event", "eof", "malformed"])
async def test_a_failure_before_the_first_delta_is_retried(
    retrying: Running, fake_openai: FakeOpenAI, fault: str
) -> None:
    fake_openai.enqueue(StreamReply(fault=fault, fault_after=0), StreamReply(text=["x", "y"]))
    messages, code, _ = await collect(retrying.stub.Generate(request(model="openai"), timeout=10))
    assert code == grpc.StatusCode.OK and text_of(messages) == "xy"
    assert_well_formed(messages)
    assert len(fake_openai.requests) == 2


async def test_a_reset_before_any_response_is_retried(retrying: Running, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(ResetReply(), StreamReply(text=["ok"]))
    messages, code, _ = await collect(retrying.stub.Generate(request(model="anthropic"), timeout=10))
    assert code == grpc.StatusCode.OK and text_of(messages) == "ok"
    assert len(fake_anthropic.requests) == 2


async def test_fallback_to_another_vendor_before_the_first_delta(
    gateway: Running, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    fake_openai.enqueue(StatusReply(503))
    fake_anthropic.enqueue(StreamReply(text=["from ", "claude"]))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="openai-then-anthropic")))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    start = messages[0].start
    assert (start.route, start.provider, start.upstream_model) == ("openai-then-anthropic", "anthropic", "claude-test")
    assert text_of(messages) == "from claude"


async def test_no_fallback_after_the_first_delta(
    gateway: Running, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    fake_openai.enqueue(StreamReply(text=["a", "b", "c"], fault="reset", fault_after=2, interval=0.03))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="openai-then-anthropic")))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert text_of(messages) == "ab" and messages[-1].error.last_sequence == 3
    assert fake_anthropic.requests == []


# --- Mid-stream faults: a terminal Error after what was relayed, never a Finish -------------


@pytest.mark.parametrize(
    ("vendor", "fault", "error_code"),
    [
        ("openai", "error_event", pb.ERROR_CODE_PROVIDER_UNAVAILABLE),
        ("anthropic", "error_event", pb.ERROR_CODE_PROVIDER_UNAVAILABLE),
        ("openai", "reset", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
        ("anthropic", "reset", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
        ("openai", "eof", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
        ("anthropic", "eof", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
        ("openai", "truncated_chunk", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
        ("anthropic", "malformed", pb.ERROR_CODE_PROVIDER_PROTOCOL_ERROR),
        ("openai", "malformed", pb.ERROR_CODE_PROVIDER_PROTOCOL_ERROR),
        ("anthropic", "stall", pb.ERROR_CODE_PROVIDER_TIMEOUT),
        ("openai", "stall", pb.ERROR_CODE_PROVIDER_TIMEOUT),
        ("anthropic", "truncated_chunk", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
    ],
)
async def test_mid_stream_faults_end_in_a_terminal_error(
    gateway: Running, fakes: dict[str, Any], vendor: str, fault: str, error_code: int
) -> None:
    fakes[vendor].enqueue(
        StreamReply(text=["one ", "two ", "three ", "four"], fault=fault, fault_after=2, interval=0.03)
    )
    started = time.monotonic()
    messages, code, trailing = await collect(gateway.stub.Generate(request(model=vendor), timeout=10))
    assert_well_formed(messages)
    assert kinds(messages) == ["start", "text_delta", "text_delta", "error"]
    error = messages[-1].error
    assert error.code == error_code and error.retryable and error.last_sequence == 3
    assert error.provider == vendor
    assert code == grpc.StatusCode.UNAVAILABLE
    name = pb.ErrorCode.Name(error_code)  # type: ignore[arg-type]
    assert detail(rich_status(trailing), ErrorInfo).reason == name.removeprefix("ERROR_CODE_")
    # A stall ends at the route's 1 s read timeout, not at the caller's deadline.
    assert time.monotonic() - started < 5


async def test_anthropic_overloaded_error_event_says_so(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(StreamReply(fault="error_event", fault_after=1, error_type="overloaded_error"))
    messages, _, _ = await collect(gateway.stub.Generate(request(model="anthropic")))
    assert "overloaded_error" in messages[-1].error.message


# --- The caller leaves: the provider's stream is closed ------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
async def test_cancel_mid_stream_disconnects_the_provider(gateway: Running, fakes: dict[str, Any], vendor: str) -> None:
    fake = fakes[vendor]
    fake.enqueue(StreamReply(text=[f"t{i} " for i in range(500)], interval=0.01))
    call = gateway.stub.Generate(request(model=vendor))
    seen = 0
    async for message in call:
        seen += message.HasField("text_delta")
        if seen == 3:
            break
    cancelled_at = time.monotonic()
    call.cancel()
    disconnected_at = await fake.wait_disconnected(timeout=2.0)
    assert disconnected_at - cancelled_at < 0.2


async def test_cancel_before_the_first_token_disconnects_the_provider(
    gateway: Running, fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(StreamReply(first_delay=5.0))
    call = gateway.stub.Generate(request(model="openai"))
    await fake_openai.wait_requests(1)
    await asyncio.sleep(0.05)
    cancelled_at = time.monotonic()
    call.cancel()
    assert await fake_openai.wait_disconnected(timeout=2.0) - cancelled_at < 0.2


async def test_the_callers_deadline_disconnects_the_provider(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(StreamReply(text=[f"t{i} " for i in range(500)], interval=0.01))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="anthropic"), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and messages
    disconnected_at = await fake_anthropic.wait_disconnected(timeout=2.0)
    assert disconnected_at - fake_anthropic.requests[-1].received_at < 0.5 + 0.3


async def test_the_readmes_provider_routes_stream_from_the_fakes(
    start_server: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, flags=re.DOTALL)
    routes = tomllib.loads(block)["routes"]
    for route in routes.values():
        options = route.setdefault("options", {})
        if route["provider"] == "anthropic":
            options["base_url"] = fake_anthropic.base_url
        elif route["provider"] == "azure-openai":
            options["endpoint"] = fake_openai.base_url.removesuffix("/v1")
        else:
            options["base_url"] = fake_openai.base_url
        if route["provider"] == "openai-compatible":
            options["api_key_env"] = "OPENAI_API_KEY"  # the fake wants a key; a local server may not
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.api_key)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", fake_openai.api_key)
    monkeypatch.setenv("ANTHROPIC_API_KEY", fake_anthropic.api_key)
    running = await start_server(routes=routes)
    providers = {}
    for name in routes:
        messages, code, _ = await collect(running.stub.Generate(request(model=name)))
        assert code == grpc.StatusCode.OK, name
        assert_well_formed(messages)
        providers[name] = messages[0].start.provider
    assert providers == {name: route["provider"] for name, route in routes.items()}


async def test_a_route_at_its_connection_limit_says_the_server_is_overloaded(
    start_server: Any, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OPENAI_KEY_ENV, fake_openai.api_key)
    options = {"base_url": fake_openai.base_url, "api_key_env": OPENAI_KEY_ENV}
    limited = {"provider": "openai", "model": "m", "max_retries": 0}
    routes = {"one-connection": limited | {"options": options | {"max_connections": 1, "connect_timeout_seconds": 0.3}}}
    running = await start_server(routes=routes)
    fake_openai.enqueue(StreamReply(text=[f"t{i}" for i in range(100)], interval=0.01))
    first = running.stub.Generate(request(model="one-connection"))
    await fake_openai.wait_requests(1)
    messages, code, trailing = await collect(running.stub.Generate(request(model="one-connection")))
    assert messages == [] and code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail(rich_status(trailing), ErrorInfo).reason == "SERVER_OVERLOADED"
    assert detail(rich_status(trailing), RetryInfo).retry_delay.seconds == 1
    first_messages, first_code, _ = await collect(first)
    assert first_code == grpc.StatusCode.OK and len(first_messages) == 102


async def test_closing_a_provider_closes_its_http_client(
    fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ANTHROPIC_KEY_ENV, fake_anthropic.api_key)
    options = {"base_url": fake_anthropic.base_url, "api_key_env": ANTHROPIC_KEY_ENV}
    provider = create_provider(
        build_routes({"r": {"provider": "anthropic", "model": "m", "options": options}}, "t")["r"]
    )
    assert isinstance(provider, AnthropicProvider)
    http = provider.client._client
    await provider.aclose()
    assert http.is_closed
