"""Errors: bad input never reaches a provider, faults end in the mapped status, nothing leaks."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import (
    BadRequest,
    ErrorInfo,
    Recorder,
    RetryInfo,
    Running,
    assert_well_formed,
    collect,
    detail,
    eventually,
    request,
    rich_status,
)
from tokenwire.v1 import generation_pb2 as pb

SECRET_SHAPES = ("Bearer", "sim-not-a-real-token", "RuntimeError", "Traceback")


def user(text: str = "hi") -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, text=text)


def struct(**fields: Any) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(fields)
    return value


def with_arguments(arguments: str) -> dict[str, Any]:
    """Fields of a request whose assistant message calls a tool with these arguments."""
    call = pb.ToolCall(id="1", name="t", arguments_json=arguments)
    return {"messages": [user(), pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call])]}


ARGUMENTS = "messages[1].tool_calls[0].arguments_json"


def nested(depth: int, inner: str = "1") -> str:
    """A JSON object whose innermost value is `depth` levels deep (the object itself is the first)."""
    return '{"a": ' + "[" * (depth - 1) + inner + "]" * (depth - 1) + "}"


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("no messages", {"messages": []}, "messages"),
    ("empty text", {"messages": [pb.Message(role=pb.ROLE_USER, text="")]}, "messages[0].text"),
    ("no role", {"messages": [pb.Message(text="hi")]}, "messages[0].role"),
    ("unknown role number", {"messages": [pb.Message(role=99, text="hi")]}, "messages[0].role"),  # type: ignore[arg-type]
    (
        "tool message without call id",
        {"messages": [pb.Message(role=pb.ROLE_TOOL, text="x")]},
        "messages[0].tool_call_id",
    ),
    ("negative max tokens", {"max_output_tokens": -1}, "max_output_tokens"),
    ("zero max tokens", {"max_output_tokens": 0}, "max_output_tokens"),
    ("huge max tokens", {"max_output_tokens": 2_000_000_000}, "max_output_tokens"),
    ("NaN temperature", {"temperature": math.nan}, "temperature"),
    ("infinite temperature", {"temperature": math.inf}, "temperature"),
    ("negative temperature", {"temperature": -0.5}, "temperature"),
    ("top_p zero", {"top_p": 0.0}, "top_p"),
    ("empty stop sequence", {"stop_sequences": [""]}, "stop_sequences[0]"),
    ("too many stop sequences", {"stop_sequences": ["s"] * 17}, "stop_sequences"),
    ("bad tool name", {"tools": [pb.Tool(name="no spaces allowed")]}, "tools[0].name"),
    ("duplicate tools", {"tools": [pb.Tool(name="t"), pb.Tool(name="t")]}, "tools[1].name"),
    (
        "named tool choice without that tool",
        {"tools": [pb.Tool(name="t")], "tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NAMED, name="u")},
        "tool_choice.name",
    ),
    ("unknown tool choice mode", {"tool_choice": pb.ToolChoice(mode=42)}, "tool_choice.mode"),  # type: ignore[arg-type]
    ("unknown reasoning effort", {"reasoning": pb.ReasoningOptions(effort=9)}, "reasoning.effort"),  # type: ignore[arg-type]
    ("NaN in tool parameters", {"tools": [pb.Tool(name="t", parameters=struct(max=math.nan))]}, "tools[0].parameters"),
    ("request id with spaces", {"request_id": "a b"}, "request_id"),
    ("too much caller metadata", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    (
        "tool call arguments not JSON",
        {
            "messages": [
                user(),
                pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="1", name="t", arguments_json="{")]),
            ]
        },
        "messages[1].tool_calls[0].arguments_json",
    ),
    ("tool call arguments with NaN", with_arguments('{"city": NaN}'), ARGUMENTS),
    ("tool call arguments with Infinity", with_arguments('{"t": -Infinity}'), ARGUMENTS),
    ("tool call arguments with a number beyond a double", with_arguments('{"t": 1e400}'), ARGUMENTS),
    ("tool call arguments with a lone surrogate", with_arguments('{"t": "\\ud800"}'), ARGUMENTS),
    ("tool call arguments nested 100,000 deep", with_arguments("[" * 100_000 + "]" * 100_000), ARGUMENTS),
    ("tool call arguments object nested 100,000 deep", with_arguments(nested(100_000)), ARGUMENTS),
    ("tool call arguments nested one level too deep", with_arguments(nested(65)), ARGUMENTS),
]


@pytest.mark.parametrize(("case", "fields", "field"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_request_is_invalid_argument_and_never_reaches_the_provider(
    running: Running, recorder: Recorder, case: str, fields: dict[str, Any], field: str
) -> None:
    req = pb.GenerateRequest(model="recorded", messages=[user()])
    for name, value in fields.items():
        if isinstance(value, list | dict):
            req.ClearField(name)  # type: ignore[arg-type]
            target = getattr(req, name)
            target.update(value) if isinstance(value, dict) else target.extend(value)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(req, name).CopyFrom(value)
        else:
            setattr(req, name, value)
    messages, code, trailing = await collect(running.stub.Generate(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, case
    assert messages == []
    status = rich_status(trailing)
    assert detail(status, ErrorInfo).reason == "INVALID_REQUEST"
    assert detail(status, ErrorInfo).metadata["fault"] == "CALLER"
    assert [v.field for v in detail(status, BadRequest).field_violations] == [field]
    assert recorder.requests == []


async def test_tool_call_arguments_at_the_depth_limit_are_accepted(running: Running, recorder: Recorder) -> None:
    req = pb.GenerateRequest(model="recorded")
    req.messages.extend([*with_arguments(nested(64))["messages"], pb.Message(role=pb.ROLE_TOOL, tool_call_id="1")])
    _, code, _ = await collect(running.stub.Generate(req))
    assert code == grpc.StatusCode.OK
    assert recorder.requests[0].messages[1].tool_calls[0].arguments_json == nested(64)


def nested_objects(depth: int) -> struct_pb2.Struct:
    """A Struct whose JSON is `depth` objects deep, itself the first."""
    inner: dict[str, Any] = {}
    for _ in range(depth - 2):
        inner = {"a": inner}
    return struct(a=inner)


async def test_tool_parameters_too_deep_for_protobuf_are_refused_with_the_likely_cause(
    running: Running, recorder: Recorder
) -> None:
    # 33 objects deep is the most protobuf's limit of 100 nested messages lets through (the
    # README's figure); one more, and grpc hands the handler no request at all.
    fits = pb.GenerateRequest(
        model="recorded", messages=[user()], tools=[pb.Tool(name="t", parameters=nested_objects(33))]
    )
    _, code, _ = await collect(running.stub.Generate(fits))
    assert code == grpc.StatusCode.OK
    deeper = pb.GenerateRequest(model="recorded", messages=[user()])
    deeper.tools.add(name="t").parameters.CopyFrom(nested_objects(34))
    call = running.stub.Generate(deeper)
    messages, code, trailing = await collect(call)
    assert (messages, code) == ([], grpc.StatusCode.INVALID_ARGUMENT)
    details = await call.details()
    assert details is not None
    assert details.startswith("request: is not a valid tokenwire.v1.GenerateRequest message: it nests deeper than")
    assert "google.protobuf.Struct" in details and "33 levels" in details
    assert [v.field for v in detail(rich_status(trailing), BadRequest).field_violations] == ["request"]
    assert len(recorder.requests) == 1
    # Bytes that are no message at all are told apart from a message that is only too deep.
    garbage: Any = running.channel.unary_stream("/tokenwire.v1.GenerationService/Generate")
    messages, code, trailing = await collect(garbage(b"\xff\xff\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_status(trailing).message == "request: is not a valid tokenwire.v1.GenerateRequest message"


async def test_unknown_route_is_not_found(running: Running) -> None:
    messages, code, trailing = await collect(running.stub.Generate(request(model="gpt-17")))
    assert code == grpc.StatusCode.NOT_FOUND and messages == []
    assert detail(rich_status(trailing), ErrorInfo).reason == "ROUTE_NOT_FOUND"


async def test_empty_model_is_invalid(running: Running) -> None:
    _, code, _ = await collect(running.stub.Generate(request(model="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_fields_are_accepted(running: Running) -> None:
    # Field 999, wire type 2 (length-delimited), 3 bytes: what a newer client could send.
    raw = request().SerializeToString() + b"\xba\x3e\x03abc"
    call = running.channel.unary_stream(
        "/tokenwire.v1.GenerationService/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )(raw)
    messages, code, _ = await collect(call)
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)


async def test_undecodable_request_is_invalid_argument(running: Running) -> None:
    call = running.channel.unary_stream(
        "/tokenwire.v1.GenerationService/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )(b"\x0a\xff\xff\xff")
    _, code, _ = await collect(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_oversized_request_is_invalid_argument(start_server: Any, recorder: Recorder) -> None:
    running = await start_server(max_request_bytes=2048)
    _, code, trailing = await collect(running.stub.Generate(request(model="recorded", text="x" * 3000)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in detail(rich_status(trailing), BadRequest).field_violations] == ["request"]
    assert recorder.requests == []


async def test_oversized_metadata_is_invalid_argument(start_server: Any, recorder: Recorder) -> None:
    running = await start_server(max_metadata_bytes=1024)
    call = running.stub.Generate(request(model="recorded"), metadata=(("x-labels", "a" * 1500),))
    messages, code, trailing = await collect(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and messages == []
    assert [v.field for v in detail(rich_status(trailing), BadRequest).field_violations] == ["metadata"]
    assert recorder.requests == []
    # Within the limit, the same call goes through.
    messages, code, _ = await collect(running.stub.Generate(request(model="recorded"), metadata=(("x-labels", "a"),)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)


async def test_error_after_start_is_a_terminal_event_mirrored_by_the_status(running: Running) -> None:
    messages, code, trailing = await collect(running.stub.Generate(request(model="error-after-3")))
    assert_well_formed(messages)
    # Three chunks of text (deltas that queue behind a write go out merged), then the Error.
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "start" and set(kinds[1:-1]) == {"text_delta"} and kinds[-1] == "error"
    error = messages[-1].error
    assert error.code == pb.ERROR_CODE_PROVIDER_UNAVAILABLE
    assert error.fault == pb.FAULT_PROVIDER
    assert error.retryable and error.provider == "simulated" and error.provider_http_status == 503
    assert error.last_sequence == messages[-2].sequence
    assert (
        code
        == grpc.StatusCode.UNAVAILABLE
        == grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == error.grpc_code))
    )
    status = rich_status(trailing)
    assert status.message == error.message
    info = detail(status, ErrorInfo)
    assert (info.reason, info.domain, info.metadata["fault"], info.metadata["retryable"]) == (
        "PROVIDER_UNAVAILABLE",
        "tokenwire",
        "PROVIDER",
        "true",
    )
    assert info.metadata["stream_id"] == messages[0].start.stream_id
    await eventually(lambda: running.server.generation.active_streams == 0)


async def test_failure_before_first_token_is_a_plain_status_without_messages(running: Running) -> None:
    call = running.stub.Generate(request(model="down"))
    messages, code, trailing = await collect(call)
    assert messages == [] and code == grpc.StatusCode.UNAVAILABLE
    # Nothing was sent before the failure, so a client may still retry the call transparently.
    assert not await call.initial_metadata()
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_UNAVAILABLE"
    await eventually(lambda: running.server.generation.active_streams == 0)


async def test_provider_rate_limit_is_resource_exhausted_with_retry_info(running: Running) -> None:
    _, code, trailing = await collect(running.stub.Generate(request(model="rate-limited")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail(rich_status(trailing), RetryInfo).retry_delay.seconds == 1


async def test_stall_ends_with_provider_timeout(running: Running) -> None:
    messages, code, _ = await collect(running.stub.Generate(request(model="stall")))
    assert_well_formed(messages)
    assert messages[-1].error.code == pb.ERROR_CODE_PROVIDER_TIMEOUT
    assert code == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: running.server.generation.active_streams == 0)


@pytest.mark.parametrize("route", ["crash-before", "crash-after"])
async def test_unexpected_exception_is_internal_with_correlation_id_and_no_leak(
    running: Running, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    messages, code, trailing = await collect(running.stub.Generate(request(model=route)))
    assert code == grpc.StatusCode.INTERNAL
    status = rich_status(trailing)
    correlation_id = detail(status, ErrorInfo).metadata["correlation_id"]
    assert correlation_id.startswith("err-") and correlation_id in status.message
    if route == "crash-after":
        assert_well_formed(messages)
        assert messages[-1].error.correlation_id == correlation_id
        assert messages[-1].error.code == pb.ERROR_CODE_INTERNAL
    else:
        assert messages == []
    visible = status.SerializeToString().decode("latin-1") + "".join(str(m) for m in messages)
    for shape in SECRET_SHAPES:
        assert shape not in visible
    # The server logs the bug with its correlation id, but never the credential-shaped text.
    logged = "\n".join(caplog.messages)
    assert correlation_id in logged
    assert "sim-not-a-real-token" not in caplog.text
    await eventually(lambda: running.server.generation.active_streams == 0)


async def test_concurrency_limit_is_resource_exhausted_and_health_still_answers(start_server: Any) -> None:
    running = await start_server(max_concurrent_streams=2)
    calls = [running.stub.Generate(request(model="slow")) for _ in range(2)]
    for call in calls:  # both streams are open once their first message arrived
        await call.read()
    messages, code, trailing = await collect(running.stub.Generate(request(model="slow")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and messages == []
    status = rich_status(trailing)
    assert detail(status, ErrorInfo).reason == "SERVER_OVERLOADED"
    assert detail(status, RetryInfo).retry_delay.seconds == 1
    health = health_pb2_grpc.HealthStub(running.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for call in calls:
        call.cancel()
    await eventually(lambda: running.server.generation.active_streams == 0)


async def cancel_and_expect_provider_closed(call: Any, running: Running, recorder: Recorder) -> None:
    """Cancels the call; the provider's stream must close within 200 ms and the slot return."""
    cancelled_at = asyncio.get_running_loop().time()
    call.cancel()
    await eventually(lambda: recorder.closed)
    assert recorder.finished == [False]
    assert recorder.closed[0] - cancelled_at < 0.2
    await eventually(lambda: running.server.generation.active_streams == 0)


async def test_cancel_closes_the_provider_stream_promptly(running: Running, recorder: Recorder) -> None:
    call = running.stub.Generate(request(model="slow"))
    for _ in range(3):
        await call.read()
    await cancel_and_expect_provider_closed(call, running, recorder)


async def test_cancel_before_the_first_token_closes_the_provider_stream(running: Running, recorder: Recorder) -> None:
    call = running.stub.Generate(request(model="slow-start"))
    await eventually(lambda: recorder.requests)  # the request reached the provider
    await cancel_and_expect_provider_closed(call, running, recorder)


@pytest.mark.parametrize("route", ["slow", "slow-start"])
async def test_deadline_is_deadline_exceeded_and_closes_the_provider_stream(
    running: Running, recorder: Recorder, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    messages, code, _ = await collect(running.stub.Generate(request(model=route), timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(m.WhichOneof("event") in ("start", "text_delta") for m in messages)
    assert bool(messages) == (route == "slow")  # slow-start's deadline comes before its first token
    await eventually(lambda: recorder.closed)
    assert recorder.finished == [False]
    assert recorder.requests[0].deadline is not None
    await eventually(lambda: "outcome=" in caplog.text)
    assert f"route='{route}' outcome=DEADLINE_EXCEEDED" in caplog.text


async def test_malformed_request_id_never_names_the_stream(running: Running) -> None:
    _, code, trailing = await collect(running.stub.Generate(request(request_id="x" * 5000)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    stream_id = detail(rich_status(trailing), ErrorInfo).metadata["stream_id"]
    assert len(stream_id) == 32 and "x" * 40 not in stream_id


async def test_caller_text_cannot_forge_log_lines(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    forged = "nope\n2026-01-01 00:00:00 ERROR tokenwire.generation: internal error err-0"
    req = request(model=forged, metadata={"label\nERROR": "x\ny"})
    _, code, _ = await collect(running.stub.Generate(req))
    assert code == grpc.StatusCode.NOT_FOUND
    (line,) = [m for m in caplog.messages if m.startswith("stream ")]
    assert "\n" not in line and "route='nope\\n2026" in line
