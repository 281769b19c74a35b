"""Property-based bad input: whatever a client sends, the status is never INTERNAL or UNKNOWN."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_ROUTES, assert_well_formed
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Routes that fail on purpose with INTERNAL, or stream for seconds, are not what is tested here.
ROUTES = sorted(name for name in TEST_ROUTES if not name.startswith(("crash", "slow")))

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
int32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)
specials = st.sampled_from([math.nan, math.inf, -math.inf])

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | specials | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(text, json_values, max_size=4)

user_messages = st.builds(pb.Message, role=st.just(pb.ROLE_USER), text=text.filter(bool))

messages = st.builds(
    pb.Message,
    role=st.integers(-3, 7),
    text=text,
    tool_call_id=text,
    tool_calls=st.lists(st.builds(pb.ToolCall, id=text, name=text, arguments_json=text), max_size=2),
    reasoning=st.lists(st.builds(pb.ReasoningBlock, text=text, signature=text), max_size=1),
)


def mostly(valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid nine times in ten: every check is reached, not only the first one a request fails."""
    return st.integers(0, 9).flatmap(lambda n: anything if n == 0 else valid)


names = st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True)


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        model=draw(mostly(st.sampled_from(ROUTES), text)),
        messages=draw(mostly(st.lists(user_messages, min_size=1, max_size=3), st.lists(messages, max_size=4))),
        stop_sequences=draw(mostly(st.lists(text.filter(bool), max_size=3), st.lists(text, max_size=17))),
        request_id=draw(mostly(st.just("") | names, text)),
        metadata=draw(mostly(st.dictionaries(names, names, max_size=3), st.dictionaries(text, text, max_size=20))),
    )
    optional: dict[str, st.SearchStrategy[Any]] = {
        "max_output_tokens": mostly(st.integers(1, 50), int32),
        "temperature": mostly(st.floats(0, 2), floats),
        "top_p": mostly(st.floats(0.01, 1), floats),
        "seed": st.integers(-(2**63), 2**63 - 1),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            setattr(req, name, draw(strategy))
    for name in draw(st.lists(mostly(names, text), max_size=3)):
        tool = req.tools.add(name=name)
        if draw(st.booleans()):
            tool.parameters.update(draw(json_objects))
    if draw(st.booleans()):
        req.tool_choice.mode = draw(st.integers(-1, 6))  # type: ignore[assignment]
        req.tool_choice.name = draw(mostly(st.sampled_from([t.name for t in req.tools] or [""]), text))
    if draw(st.booleans()):
        req.reasoning.effort = draw(st.integers(-1, 5))  # type: ignore[assignment]
        if draw(st.booleans()):
            req.reasoning.budget_tokens = draw(mostly(st.integers(1, 64), int32))
    return req


@pytest.fixture(scope="module")
def channel(live_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(live_address) as channel:
        yield channel


def status_of(call: Any) -> grpc.StatusCode:
    """Reads the whole call; a stream that succeeded must also be well formed."""
    messages = []
    try:
        for message in call:
            messages.append(message)
    except grpc.RpcError as exc:
        return exc.code()
    assert_well_formed(messages)
    assert messages[-1].WhichOneof("event") == "finish"
    return grpc.StatusCode.OK


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
