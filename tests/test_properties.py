"""Property-based bad input: whatever a client sends, the status is never INTERNAL or UNKNOWN."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_ROUTES
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Routes that fail on purpose with INTERNAL, or stream for seconds, are not what is tested here.
ROUTES = sorted(name for name in TEST_ROUTES if not name.startswith(("crash", "slow")))

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
int32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)

messages = st.builds(
    pb.Message,
    role=st.integers(-3, 7),
    text=text,
    tool_call_id=text,
    tool_calls=st.lists(st.builds(pb.ToolCall, id=text, name=text, arguments_json=text), max_size=2),
    reasoning=st.lists(st.builds(pb.ReasoningBlock, text=text, signature=text), max_size=1),
)


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        model=draw(st.one_of(st.sampled_from(ROUTES), text)),
        messages=draw(st.lists(messages, max_size=4)),
        stop_sequences=draw(st.lists(text, max_size=3)),
        request_id=draw(text),
        metadata=draw(st.dictionaries(text, text, max_size=3)),
    )
    optional: dict[str, Any] = {
        "max_output_tokens": int32,
        "temperature": floats,
        "top_p": floats,
        "seed": st.integers(-(2**63), 2**63 - 1),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            setattr(req, name, draw(strategy))
    for name in draw(st.lists(text, max_size=3)):
        req.tools.add(name=name)
    if draw(st.booleans()):
        req.tool_choice.mode = draw(st.integers(-1, 6))  # type: ignore[assignment]
        req.tool_choice.name = draw(text)
    if draw(st.booleans()):
        req.reasoning.effort = draw(st.integers(-1, 5))  # type: ignore[assignment]
        if draw(st.booleans()):
            req.reasoning.budget_tokens = draw(int32)
    return req


@pytest.fixture(scope="module")
def channel(live_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(live_address) as channel:
        yield channel


def status_of(call: Any) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests())
def test_generated_requests_never_yield_internal_or_unknown(channel: grpc.Channel, req: pb.GenerateRequest) -> None:
    stub = pb_grpc.GenerationServiceStub(channel)
    assert status_of(stub.Generate(req, timeout=10)) not in FORBIDDEN


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_yield_internal_or_unknown(channel: grpc.Channel, raw: bytes) -> None:
    generate = channel.unary_stream(
        "/tokenwire.v1.GenerationService/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    assert status_of(generate(raw, timeout=10)) not in FORBIDDEN
