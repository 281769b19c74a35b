"""Generate over a real channel: the stream invariants and what the simulated model honours."""

from __future__ import annotations

import asyncio
import json

import grpc
from google.protobuf import struct_pb2

from conftest import Running, assert_well_formed, collect, request
from tokenwire.v1 import generation_pb2 as pb


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.text_delta.text for m in messages if m.WhichOneof("event") == "text_delta")


async def test_stream_is_sequenced_and_finishes_once(running: Running) -> None:
    messages, code, _ = await collect(running.stub.Generate(request(request_id="req-1")))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    start = messages[0].start
    assert (start.stream_id, start.route, start.provider, start.upstream_model) == (
        "req-1",
        "sim",
        "simulated",
        "tokenwire-sim-1",
    )
    assert start.create_time.seconds > 0
    finish = messages[-1].finish
    assert finish.reason == pb.FINISH_REASON_STOP and finish.raw_reason == "stop"
    assert text_of(messages).endswith(".")
    assert all(m.text_delta.text for m in messages if m.WhichOneof("event") == "text_delta")


async def test_server_generates_a_stream_id_when_none_is_given(running: Running) -> None:
    messages, _, _ = await collect(running.stub.Generate(request()))
    other, _, _ = await collect(running.stub.Generate(request()))
    assert len(messages[0].start.stream_id) >= 16
    assert messages[0].start.stream_id != other[0].start.stream_id


async def test_usage_has_presence_and_timing_is_measured(running: Running) -> None:
    messages, _, _ = await collect(running.stub.Generate(request()))
    finish = messages[-1].finish
    usage = finish.usage
    assert usage.source == pb.USAGE_SOURCE_PROVIDER
    for name in ("input_tokens", "output_tokens", "cache_read_input_tokens", "reasoning_tokens"):
        assert usage.HasField(name), name
    # One token per simulated delta; deltas that queued behind a write share a message.
    deltas = sum(m.WhichOneof("event") == "text_delta" for m in messages)
    assert usage.output_tokens >= deltas > 0
    assert usage.reasoning_tokens == 0  # known zero, not unknown
    timing = finish.timing
    assert timing.HasField("time_to_first_token") and timing.HasField("total_duration")
    assert timing.total_duration.ToNanoseconds() >= timing.time_to_first_token.ToNanoseconds() > 0
    assert timing.output_tokens_per_second > 0


async def test_max_output_tokens_finishes_with_length(running: Running) -> None:
    messages, code, _ = await collect(running.stub.Generate(request(max_output_tokens=3, seed=0)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert messages[-1].finish.reason == pb.FINISH_REASON_LENGTH
    assert messages[-1].finish.usage.output_tokens == 3
    assert text_of(messages) == "Streaming lets a"  # deterministic for a fixed seed


async def test_same_request_streams_the_same_text(running: Running) -> None:
    first, _, _ = await collect(running.stub.Generate(request(seed=7)))
    second, _, _ = await collect(running.stub.Generate(request(seed=7)))
    assert text_of(first) == text_of(second) != ""


async def test_stop_sequence_spanning_tokens_is_never_streamed(running: Running) -> None:
    full, _, _ = await collect(running.stub.Generate(request(seed=0)))
    text = text_of(full)
    stop = "reader start"  # spans two streamed tokens: " reader" and " start"
    assert stop in text
    messages, code, _ = await collect(running.stub.Generate(request(seed=0, stop_sequences=["zzz", stop])))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    finish = messages[-1].finish
    assert finish.reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert finish.stop_sequence == stop
    assert text_of(messages) == text[: text.index(stop)]


async def test_tool_call_streams_in_pieces_and_utf8_is_exact(running: Running) -> None:
    parameters = struct_pb2.Struct()
    parameters.update({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}})
    prompt = "weather in Zürich 🌦️ مرحبا \u0007 𝄞"
    # At a pace, so that each piece goes out before the next: none queue up to be merged.
    req = request(
        model="slow",
        text=prompt,
        tools=[pb.Tool(name="weather", description="forecast", parameters=parameters)],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
    )
    messages, code, _ = await collect(running.stub.Generate(req))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    deltas = [m.tool_call_delta for m in messages if m.WhichOneof("event") == "tool_call_delta"]
    assert len(deltas) > 1
    assert deltas[0].id.startswith("call_") and deltas[0].name == "weather"
    assert all(d.id == "" and d.name == "" and d.index == 0 for d in deltas[1:])
    arguments = json.loads("".join(d.arguments_delta for d in deltas))
    assert arguments == {"city": prompt, "days": 1}
    assert messages[-1].finish.reason == pb.FINISH_REASON_TOOL_CALLS


async def test_reasoning_streams_before_text_with_a_signature(running: Running) -> None:
    req = request(reasoning=pb.ReasoningOptions(effort=pb.REASONING_EFFORT_LOW))
    messages, _, _ = await collect(running.stub.Generate(req))
    assert_well_formed(messages)
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds.index("reasoning_delta") < kinds.index("text_delta")
    signed = [m.reasoning_delta.signature for m in messages if m.reasoning_delta.signature]
    assert len(signed) == 1
    usage = messages[-1].finish.usage
    assert usage.reasoning_tokens == 12
    assert usage.output_tokens > usage.reasoning_tokens


async def test_a_conversation_with_tool_results_is_accepted(running: Running) -> None:
    req = pb.GenerateRequest(
        model="sim",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, text="Be brief."),
            pb.Message(role=pb.ROLE_USER, text="weather?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id="c1", name="weather", arguments_json='{"city": "Oslo"}')],
                reasoning=[pb.ReasoningBlock(text="think", signature="sig")],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="c1", text="rain"),
        ],
        tools=[pb.Tool(name="weather")],
    )
    messages, code, _ = await collect(running.stub.Generate(req))
    assert code == grpc.StatusCode.OK
    assert messages[-1].finish.reason == pb.FINISH_REASON_STOP


async def test_list_models_shows_routes_and_capabilities(running: Running) -> None:
    response = await running.stub.ListModels(pb.ListModelsRequest())
    names = [m.name for m in response.models]
    assert names == sorted(names) and "sim" in names
    sim = next(m for m in response.models if m.name == "sim")
    assert (sim.provider, sim.upstream_model, sim.supports_tools, sim.supports_reasoning) == (
        "simulated",
        "tokenwire-sim-1",
        True,
        True,
    )


async def test_health_is_serving(running: Running) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", "tokenwire.v1.GenerationService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reasoning_and_tool_calls_count_against_max_output_tokens(running: Running) -> None:
    req = request(max_output_tokens=2, reasoning=pb.ReasoningOptions(effort=pb.REASONING_EFFORT_HIGH))
    messages, _, _ = await collect(running.stub.Generate(req))
    assert_well_formed(messages)
    kinds = [m.WhichOneof("event") for m in messages[1:]]
    assert set(kinds[:-1]) == {"reasoning_delta"} and kinds[-1] == "finish"
    finish = messages[-1].finish
    assert finish.reason == pb.FINISH_REASON_LENGTH
    assert finish.usage.output_tokens == finish.usage.reasoning_tokens == 2

    parameters = struct_pb2.Struct()
    parameters.update({"type": "object", "properties": {"query": {"type": "string"}}})
    tools = [pb.Tool(name="t", parameters=parameters)]
    req = request(max_output_tokens=1, tools=tools, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED))
    messages, _, _ = await collect(running.stub.Generate(req))
    assert [m.WhichOneof("event") for m in messages[1:]] == ["tool_call_delta", "finish"]  # cut off mid-call
    assert messages[-1].finish.reason == pb.FINISH_REASON_LENGTH
    assert messages[-1].finish.usage.output_tokens == 1


async def test_hundreds_of_concurrent_streams_are_each_well_formed(running: Running) -> None:
    async def one(i: int) -> tuple[list[pb.GenerateResponse], grpc.StatusCode]:
        messages, code, _ = await collect(running.stub.Generate(request(seed=i, request_id=f"load-{i}")))
        return messages, code

    results = await asyncio.gather(*(one(i) for i in range(300)))
    for i, (messages, code) in enumerate(results):
        assert code == grpc.StatusCode.OK
        assert_well_formed(messages)
        assert messages[0].start.stream_id == f"load-{i}"
        assert messages[-1].finish.reason == pb.FINISH_REASON_STOP
    assert running.server.generation.active_streams == 0
