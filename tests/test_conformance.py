"""The conformance suite: one set of tests that every provider passes through its real SDK against
its fake (a real server on 127.0.0.1 speaking the vendor's wire). Text, parallel tool calls,
reasoning where the vendor has it, usage, every finish reason of the vendor, each upstream fault
of QUALITY.md, cancel within 200 ms (seen by the fake), and no key in any log with debug logging on.

Adding a provider: its module, its fake (with a `Kit`), and one line in KITS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from fakes import anthropic as fake_anthropic_module
from fakes import bedrock as fake_bedrock_module
from fakes import flow as fake_flow_module
from fakes import gemini as fake_gemini_module
from fakes import openai as fake_openai_module
from fakes import replicate as fake_replicate_module
from fakes import watsonx as fake_watsonx_module
from fakes.kit import Kit
from fakes.replies import ResetReply, StatusReply, StreamReply, ToolCallScript, Usage
from fakes.server import FakeServer

from conftest import ErrorInfo, RetryInfo, Running, assert_well_formed, collect, detail, request, rich_status
from tokenwire.v1 import generation_pb2 as pb

KITS: list[Kit] = [
    fake_openai_module.KIT,
    fake_anthropic_module.KIT,
    fake_bedrock_module.KIT,
    fake_bedrock_module.API_KEY_KIT,
    fake_flow_module.KIT,
    fake_gemini_module.KIT,
    fake_gemini_module.VERTEX_KIT,
    fake_watsonx_module.KIT,
    fake_watsonx_module.DEPLOYMENT_KIT,
    fake_replicate_module.KIT,
]
TIMEOUTS = {"read_timeout_seconds": 1.0, "connect_timeout_seconds": 1.0}


@pytest.fixture(params=KITS, ids=lambda kit: kit.name)
def kit(request: pytest.FixtureRequest) -> Kit:
    value: Kit = request.param
    return value


@pytest.fixture
async def fake(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeServer]:
    for name in kit.unset:
        monkeypatch.delenv(name, raising=False)
    async with kit.fake() as server:
        for name, value in kit.env(server).items():
            monkeypatch.setenv(name, value)
        yield server


def routes(kit: Kit, base_url: str) -> dict[str, Any]:
    def route(url: str, **extra: Any) -> dict[str, Any]:
        return {"provider": kit.provider, "model": kit.model, "options": kit.options(url) | TIMEOUTS} | extra

    return {
        "plain": route(base_url, max_retries=0),
        "retrying": route(base_url, max_retries=2),
        # Nothing listens on port 9 of loopback: connection refused.
        "nowhere": route(base_url.rsplit(":", 1)[0] + ":9", max_retries=0),
    }


@pytest.fixture
async def gateway(start_server: Any, kit: Kit, fake: FakeServer) -> Running:
    running: Running = await start_server(routes=routes(kit, fake.base_url))
    return running


def kinds(messages: list[pb.GenerateResponse]) -> list[str]:
    return [str(m.WhichOneof("event")) for m in messages]


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.text_delta.text for m in messages if m.HasField("text_delta"))


def finish_reason(name: str) -> int:
    return pb.FinishReason.Value(f"FINISH_REASON_{name}")


# --- What every stream carries ---------------------------------------------------------------


async def test_text(gateway: Running, fake: FakeServer, kit: Kit) -> None:
    fake.enqueue(
        StreamReply(text=["Hel", "lo, ", "wörld 🌍"], usage=Usage(input_tokens=11, output_tokens=5), interval=0.03)
    )
    messages, code, _ = await collect(gateway.stub.Generate(request(model="plain")))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert kinds(messages) == ["start", "text_delta", "text_delta", "text_delta", "finish"]
    assert text_of(messages) == "Hello, wörld 🌍"
    assert messages[0].start.provider == kit.provider
    finish = messages[-1].finish
    assert (finish.reason, finish.raw_reason) == (pb.FINISH_REASON_STOP, kit.text_finish)
    assert finish.usage.source == pb.USAGE_SOURCE_PROVIDER
    assert (finish.usage.input_tokens, finish.usage.output_tokens) == (11, 5)
    assert finish.timing.HasField("time_to_first_token")


async def test_parallel_tool_calls(gateway: Running, fake: FakeServer, kit: Kit) -> None:
    if not kit.tools:
        pytest.skip(f"{kit.name} takes no tools")
    fake.enqueue(
        StreamReply(
            text=[],
            tool_calls=[
                ToolCallScript("call_1", "get_weather", ['{"city": ', '"Paris"}']),
                ToolCallScript("call_2", "get_time", ['{"tz": "CET"}']),
            ],
        )
    )
    tools = [pb.Tool(name="get_weather"), pb.Tool(name="get_time")]
    messages, code, _ = await collect(gateway.stub.Generate(request(model="plain", tools=tools)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    calls: dict[int, dict[str, str]] = {}
    for m in messages:
        if m.HasField("tool_call_delta"):
            d = m.tool_call_delta
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id:
                call["id"], call["name"] = d.id, d.name
            call["arguments"] += d.arguments_delta
    # The arguments as JSON: a vendor that sends whole calls (Gemini) serializes them its own way.
    parsed = {i: call | {"arguments": json.loads(call["arguments"])} for i, call in calls.items()}
    assert parsed == {
        0: {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
        1: {"id": "call_2", "name": "get_time", "arguments": {"tz": "CET"}},
    }
    assert messages[-1].finish.reason == pb.FINISH_REASON_TOOL_CALLS


async def test_reasoning(gateway: Running, fake: FakeServer, kit: Kit) -> None:
    if not kit.reasoning:
        pytest.skip(f"{kit.name} streams no reasoning")
    fake.enqueue(StreamReply(reasoning=["Let me ", "think."], text=["42"], signature="sig-xyz"))
    call = gateway.stub.Generate(request(model="plain", reasoning=pb.ReasoningOptions(budget_tokens=2048)))
    messages, code, _ = await collect(call)
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    thinking = [m.reasoning_delta for m in messages if m.HasField("reasoning_delta")]
    assert "".join(r.text for r in thinking) == "Let me think."
    if kit.provider != "openai":  # Chat Completions streams no signature
        assert "sig-xyz" in [r.signature for r in thinking]
    assert text_of(messages) == "42"


async def test_usage_with_cached_input(gateway: Running, fake: FakeServer, kit: Kit) -> None:
    fake.enqueue(StreamReply(usage=Usage(input_tokens=100, output_tokens=20, cache_read_tokens=30)))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="plain")))
    assert code == grpc.StatusCode.OK
    usage = messages[-1].finish.usage
    assert usage.source == pb.USAGE_SOURCE_PROVIDER
    assert usage.output_tokens == 20 and usage.cache_read_input_tokens == 30
    assert usage.input_tokens >= 100


async def test_no_usage_is_estimated_never_zero(gateway: Running, fake: FakeServer, kit: Kit) -> None:
    fake.enqueue(StreamReply(usage=None))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="plain")))
    assert code == grpc.StatusCode.OK
    usage = messages[-1].finish.usage
    assert usage.source == pb.USAGE_SOURCE_ESTIMATED and usage.output_tokens > 0


def _every_finish_reason() -> list[Any]:
    return [
        pytest.param(kit, raw, neutral, id=f"{kit.name}-{raw}")
        for kit in KITS
        for raw, neutral in {**kit.finish_reasons, "a_reason_from_the_future": "OTHER"}.items()
    ]


@pytest.mark.parametrize(("kit", "raw", "neutral"), _every_finish_reason(), indirect=["kit"])
async def test_every_finish_reason_is_mapped_and_kept_raw(
    gateway: Running, fake: FakeServer, kit: Kit, raw: str, neutral: str
) -> None:
    fake.enqueue(StreamReply(finish=raw, stop_sequence="END" if neutral == "STOP_SEQUENCE" else None))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="plain")))
    if raw not in kit.finish_reasons and not kit.unknown_reason_finishes:
        assert_well_formed(messages)
        assert code == grpc.StatusCode.UNAVAILABLE and messages[-1].error.code == pb.ERROR_CODE_PROVIDER_ERROR
        assert raw in messages[-1].error.message
        return
    assert code == grpc.StatusCode.OK
    finish = messages[-1].finish
    assert (finish.reason, finish.raw_reason) == (finish_reason(neutral), raw)


# --- Upstream faults (QUALITY.md) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "grpc_code", "reason"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT, "PROVIDER_REJECTED_REQUEST"),
        (500, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        (503, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "PROVIDER_RATE_LIMITED"),
        (403, grpc.StatusCode.INTERNAL, "PROVIDER_AUTH_FAILED"),
    ],
)
async def test_http_errors_map_to_the_contract(
    gateway: Running, fake: FakeServer, kit: Kit, status: int, grpc_code: grpc.StatusCode, reason: str
) -> None:
    fake.enqueue(StatusReply(status, message="prompt is too long: 250000 tokens > 200000 maximum"))
    messages, code, trailing = await collect(gateway.stub.Generate(request(model="plain")))
    assert messages == [] and code == grpc_code
    info = detail(rich_status(trailing), ErrorInfo)
    assert info.reason == reason and info.metadata["provider"] == kit.provider
    assert info.metadata["provider_http_status"] == str(status)
    if status == 400:
        assert "prompt is too long" in rich_status(trailing).message
    assert len(fake.requests) == 1, "the SDK retried on its own"


async def test_429_with_a_short_retry_after_is_retried_then_streams_once(gateway: Running, fake: FakeServer) -> None:
    fake.enqueue(StatusReply(429, headers={"retry-after": "0.3"}), StreamReply(text=["a", "b", "c"]))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="retrying"), timeout=10))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert text_of(messages) == "abc" and len(fake.requests) == 2
    assert fake.requests[1].received_at - fake.requests[0].received_at >= 0.29


async def test_429_with_a_retry_after_beyond_the_deadline_is_not_retried(gateway: Running, fake: FakeServer) -> None:
    fake.enqueue(StatusReply(429, headers={"retry-after": "5"}))
    messages, code, trailing = await collect(gateway.stub.Generate(request(model="retrying"), timeout=2))
    assert messages == [] and code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail(rich_status(trailing), RetryInfo).retry_delay.seconds == 5
    assert len(fake.requests) == 1


async def test_5xx_until_retries_are_exhausted(gateway: Running, fake: FakeServer) -> None:
    fake.default = StatusReply(503, headers={"retry-after": "0.05"})
    messages, code, _ = await collect(gateway.stub.Generate(request(model="retrying"), timeout=10))
    assert messages == [] and code == grpc.StatusCode.UNAVAILABLE
    assert len(fake.requests) == 3


async def test_connection_refused_is_unavailable(gateway: Running) -> None:
    messages, code, trailing = await collect(gateway.stub.Generate(request(model="nowhere")))
    assert messages == [] and code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_UNAVAILABLE"


async def test_a_bad_provider_key_is_internal_and_leaks_no_key(
    start_server: Any, kit: Kit, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in kit.bad_env(fake).items():
        monkeypatch.setenv(name, value)
    running = await start_server(routes=routes(kit, fake.base_url))
    messages, code, trailing = await collect(running.stub.Generate(request(model="retrying")))
    assert messages == [] and code == grpc.StatusCode.INTERNAL
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_AUTH_FAILED"
    for secret in kit.secrets(fake):
        assert secret not in str(rich_status(trailing)) and secret not in str(trailing)
    assert len(fake.requests) == 1  # not retried


async def test_a_failure_before_the_first_delta_is_retried(gateway: Running, fake: FakeServer) -> None:
    fake.enqueue(StreamReply(fault="reset", fault_after=0), ResetReply(), StreamReply(text=["x", "y"]))
    messages, code, _ = await collect(gateway.stub.Generate(request(model="retrying"), timeout=10))
    assert code == grpc.StatusCode.OK and text_of(messages) == "xy"
    assert len(fake.requests) == 3


@pytest.mark.parametrize(
    ("fault", "error_code"),
    [
        ("error_event", pb.ERROR_CODE_PROVIDER_UNAVAILABLE),
        ("reset", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
        ("eof", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
        ("truncated_chunk", pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED),
        ("malformed", pb.ERROR_CODE_PROVIDER_PROTOCOL_ERROR),
        ("stall", pb.ERROR_CODE_PROVIDER_TIMEOUT),
    ],
)
async def test_mid_stream_faults_end_in_a_terminal_error(
    gateway: Running, fake: FakeServer, kit: Kit, fault: str, error_code: int
) -> None:
    fake.enqueue(StreamReply(text=["one ", "two ", "three ", "four"], fault=fault, fault_after=2, interval=0.03))
    started = time.monotonic()
    messages, code, _ = await collect(gateway.stub.Generate(request(model="plain"), timeout=10))
    assert_well_formed(messages)
    assert kinds(messages) == ["start", "text_delta", "text_delta", "error"]
    error = messages[-1].error
    assert error.code == error_code and error.retryable and error.last_sequence == 3
    assert error.provider == kit.provider and code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 5


# --- The caller leaves: the fake sees the disconnect within 200 ms ----------------------------


async def test_cancel_mid_stream_disconnects_the_provider(gateway: Running, fake: FakeServer) -> None:
    fake.enqueue(StreamReply(text=[f"t{i} " for i in range(500)], interval=0.01))
    call = gateway.stub.Generate(request(model="plain"))
    seen = 0
    async for message in call:
        seen += message.HasField("text_delta")
        if seen == 3:
            break
    cancelled_at = time.monotonic()
    call.cancel()
    assert await fake.wait_disconnected(timeout=2.0) - cancelled_at < 0.2


async def test_cancel_before_the_first_token_disconnects_the_provider(gateway: Running, fake: FakeServer) -> None:
    fake.enqueue(StreamReply(first_delay=5.0))
    call = gateway.stub.Generate(request(model="plain"))
    await fake.wait_requests(1)
    await asyncio.sleep(0.05)
    cancelled_at = time.monotonic()
    call.cancel()
    assert await fake.wait_disconnected(timeout=2.0) - cancelled_at < 0.2


# --- Keys ----------------------------------------------------------------------------------------


async def test_no_key_in_any_log_with_debug_logging_on(
    gateway: Running, fake: FakeServer, kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    # Every logger at DEBUG: the SDKs' own (openai, anthropic, botocore, ibm_watsonx_ai, httpx) included.
    caplog.set_level(logging.DEBUG)
    fake.enqueue(
        StreamReply(text=["fine"]),
        StatusReply(401, message="bad key"),
        StatusReply(400, message="bad request"),
        StreamReply(text=["a", "b"], fault="error_event", fault_after=1),
    )
    outputs = [await collect(gateway.stub.Generate(request(model="plain"))) for _ in range(4)]
    assert outputs[0][1] == grpc.StatusCode.OK
    assert [o[1] for o in outputs[1:]] == [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,
    ]
    assert caplog.records, "debug logging was not on"
    for secret in kit.secrets(fake):
        assert secret not in caplog.text
        assert all(secret not in str(o) for o in outputs)


# --- The simulated model: no upstream, the same shapes -----------------------------------------
# It has no wire to fake, so it is scripted through its route options instead; what a caller sees
# must be what every vendor above gives: the same events in the same order, the same finishes,
# usage reported, faults as terminal errors, and a hang-up that stops generating.

SIM_FAST = {"first_token_ms": 0.0, "tokens_per_second": 0.0, "answer_tokens": 12}
# Paced so that no two deltas arrive together (a fast stream's deltas may be coalesced).
SIM_PACED = {"first_token_ms": 0.0, "tokens_per_second": 100.0, "answer_tokens": 12}
# The simulated model calls, unforced, a tool the prompt names.
TOOL_PROMPT = "What is the weather in Paris? Use get_weather or lookup."


def shape(messages: list[pb.GenerateResponse]) -> list[str]:
    """The event kinds with repeats collapsed: what a caller's code branches on."""
    out: list[str] = []
    for kind in kinds(messages):
        if not out or out[-1] != kind:
            out.append(kind)
    return out


@pytest.fixture
async def sim(start_server: Any) -> Running:
    fault = SIM_PACED | {"fail_after_chunks": 2}
    running: Running = await start_server(
        routes={
            "plain": {"provider": "simulated", "model": "sim-1", "options": SIM_FAST},
            "slow": {
                "provider": "simulated",
                "model": "sim-1",
                "options": {"first_token_ms": 0.0, "tokens_per_second": 50.0},
            },
            "failing": {"provider": "simulated", "model": "sim-1", "options": fault},
            "stalling": {
                "provider": "simulated",
                "model": "sim-1",
                "options": SIM_PACED | {"stall_after_chunks": 2, "stall_seconds": 0.2},
            },
        }
    )
    return running


async def test_simulated_text(sim: Running) -> None:
    messages, code, _ = await collect(sim.stub.Generate(request(model="plain")))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert shape(messages) == ["start", "text_delta", "finish"]
    assert messages[0].start.provider == "simulated"
    finish = messages[-1].finish
    assert (finish.reason, finish.raw_reason) == (pb.FINISH_REASON_STOP, "stop")
    assert finish.usage.source == pb.USAGE_SOURCE_PROVIDER
    assert finish.usage.input_tokens > 0 and finish.usage.output_tokens >= len(messages) - 2
    assert finish.timing.HasField("time_to_first_token")


async def test_simulated_tool_call(sim: Running) -> None:
    tools = [pb.Tool(name="get_weather")]
    messages, code, _ = await collect(sim.stub.Generate(request(model="plain", text=TOOL_PROMPT, tools=tools)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert shape(messages) == ["start", "tool_call_delta", "finish"]
    deltas = [m.tool_call_delta for m in messages if m.HasField("tool_call_delta")]
    assert {d.index for d in deltas} == {0} and deltas[0].id and deltas[0].name == "get_weather"
    assert not any(d.id for d in deltas[1:])
    assert isinstance(json.loads("".join(d.arguments_delta for d in deltas)), dict)
    assert (messages[-1].finish.reason, messages[-1].finish.raw_reason) == (pb.FINISH_REASON_TOOL_CALLS, "tool_calls")


async def test_simulated_reasoning(sim: Running) -> None:
    call = sim.stub.Generate(request(model="plain", reasoning=pb.ReasoningOptions(budget_tokens=8)))
    messages, code, _ = await collect(call)
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert shape(messages) == ["start", "reasoning_delta", "text_delta", "finish"]
    thinking = [m.reasoning_delta for m in messages if m.HasField("reasoning_delta")]
    assert "".join(r.text for r in thinking).strip() and thinking[-1].signature
    assert messages[-1].finish.usage.reasoning_tokens >= len(thinking) - 1 > 0


@pytest.mark.parametrize(
    ("fields", "neutral", "raw"),
    [
        ({}, "STOP", "stop"),
        ({"max_output_tokens": 3}, "LENGTH", "length"),
        ({"stop_sequences": ["the"]}, "STOP_SEQUENCE", "stop_sequence"),
        ({"tools": [pb.Tool(name="lookup")]}, "TOOL_CALLS", "tool_calls"),
    ],
)
async def test_simulated_finish_reasons(sim: Running, fields: dict[str, Any], neutral: str, raw: str) -> None:
    messages, code, _ = await collect(sim.stub.Generate(request(model="plain", text=TOOL_PROMPT, **fields)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    finish = messages[-1].finish
    assert (finish.reason, finish.raw_reason) == (finish_reason(neutral), raw)
    if neutral == "STOP_SEQUENCE":
        assert finish.stop_sequence == "the" and "the" not in text_of(messages)


async def test_simulated_mid_stream_fault_ends_in_a_terminal_error(sim: Running) -> None:
    messages, code, _ = await collect(sim.stub.Generate(request(model="failing")))
    assert_well_formed(messages)
    assert kinds(messages) == ["start", "text_delta", "text_delta", "error"]
    error = messages[-1].error
    assert (error.code, error.retryable, error.last_sequence) == (pb.ERROR_CODE_PROVIDER_UNAVAILABLE, True, 3)
    assert error.provider == "simulated" and code == grpc.StatusCode.UNAVAILABLE


async def test_simulated_stall_ends_in_a_timeout(sim: Running) -> None:
    messages, code, _ = await collect(sim.stub.Generate(request(model="stalling"), timeout=10))
    assert_well_formed(messages)
    assert kinds(messages) == ["start", "text_delta", "text_delta", "error"]
    assert messages[-1].error.code == pb.ERROR_CODE_PROVIDER_TIMEOUT and code == grpc.StatusCode.UNAVAILABLE


async def test_simulated_cancel_stops_generating(sim: Running) -> None:
    supervisor = sim.server.gateway.supervisor
    call = sim.stub.Generate(request(model="slow"))
    seen = 0
    async for message in call:
        seen += message.HasField("text_delta")
        if seen == 3:
            break
    assert supervisor.active
    cancelled_at = time.monotonic()
    call.cancel()
    await asyncio.wait_for(supervisor.idle.wait(), timeout=2.0)
    assert not supervisor.active and time.monotonic() - cancelled_at < 0.2


async def test_every_provider_streams_the_shapes_the_simulated_model_does(
    sim: Running, gateway: Running, fake: FakeServer, kit: Kit
) -> None:
    """The same request, from a vendor through its fake and from the simulated model: one shape."""
    fake.enqueue(StreamReply(text=["Hel", "lo"]))
    vendor, _, _ = await collect(gateway.stub.Generate(request(model="plain")))
    simulated, _, _ = await collect(sim.stub.Generate(request(model="plain")))
    assert shape(vendor) == shape(simulated) == ["start", "text_delta", "finish"]
    if kit.tools:
        tools = [pb.Tool(name="get_weather")]
        fake.enqueue(StreamReply(text=[], tool_calls=[ToolCallScript("call_1", "get_weather", ['{"city": "Paris"}'])]))
        vendor, _, _ = await collect(gateway.stub.Generate(request(model="plain", tools=tools)))
        simulated, _, _ = await collect(sim.stub.Generate(request(model="plain", text=TOOL_PROMPT, tools=tools)))
        assert shape(vendor) == shape(simulated) == ["start", "tool_call_delta", "finish"]
        assert vendor[-1].finish.reason == simulated[-1].finish.reason == pb.FINISH_REASON_TOOL_CALLS
