"""Property-based bad input: whatever a client sends, the status is never INTERNAL or UNKNOWN,
and caller JSON that validation accepts is JSON every adapter and vendor can read."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_ROUTES, assert_well_formed
from service.config import build_routes
from service.errors import ErrorCode, GatewayError
from service.events import GenerationRequest
from service.providers import anthropic, openai
from service.routing import Router
from service.validation import MAX_JSON_DEPTH, validate_request
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


def nest(depth: int, opener: str, inner: str) -> str:
    """`inner` inside `depth` levels of arrays or objects, as text."""
    if opener == "[":
        return "[" * depth + inner + "]" * depth
    return '{"a": ' * depth + inner + "}" * depth


# Numbers some parsers read and standard JSON does not have (Python's json takes the first three).
nonstandard_numbers = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "+1", "01", ".5", "0x10"])
# Around the depth limit, and far beyond it (Python's json raises RecursionError there).
depths = st.integers(1, MAX_JSON_DEPTH + 3) | st.integers(MAX_JSON_DEPTH, 3000) | st.just(100_000)
deep_json = st.builds(
    lambda depth, opener, inner: '{"x": ' + nest(depth, opener, inner) + "}",
    depths,
    st.sampled_from("[{"),
    nonstandard_numbers | st.sampled_from(["1", '"s"', "null", ""]),
)
json_texts = st.one_of(
    json_objects.map(lambda o: json.dumps(o, allow_nan=True)),  # NaN and Infinity as Python writes them
    nonstandard_numbers.map(lambda n: '{"n": ' + n + "}"),
    deep_json,
    text,
)


def deep_struct(depth: int, opener: str) -> struct_pb2.Struct:
    """A Struct whose JSON nests `depth` levels below its top object; protobuf's own limit on
    message nesting is reached well before MAX_JSON_DEPTH, so the server decodes only some."""
    inner: Any = 1.0
    for _ in range(depth):
        inner = [inner] if opener == "[" else {"a": inner}
    value = struct_pb2.Struct()
    value.update({"x": inner})
    return value


deep_structs = st.builds(deep_struct, st.integers(1, 120), st.sampled_from("[{"))

user_messages = st.builds(pb.Message, role=st.just(pb.ROLE_USER), text=text.filter(bool))


@st.composite
def tool_turns(draw: st.DrawFn) -> list[pb.Message]:
    """An assistant's tool calls with generated arguments, and the tool results that answer them."""
    arguments = draw(st.lists(json_texts, min_size=1, max_size=2))
    calls = [pb.ToolCall(id=f"c{i}", name="t", arguments_json=a) for i, a in enumerate(arguments)]
    results = [pb.Message(role=pb.ROLE_TOOL, tool_call_id=c.id, text="ok") for c in calls]
    return [pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=calls), *results]


conversations = st.builds(
    lambda first, turns: [*first, *turns],
    st.lists(user_messages, min_size=1, max_size=3),
    st.just([]) | tool_turns(),
)

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
        messages=draw(mostly(conversations, st.lists(messages, max_size=4))),
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
        elif draw(st.booleans()):
            tool.parameters.CopyFrom(draw(deep_structs))
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


ROUTE = Router(build_routes({"r": {"provider": "simulated", "model": "m"}}, "test")).get("r")


@settings(max_examples=300, deadline=None)
@given(arguments=json_texts, schema=st.none() | deep_structs | json_objects)
def test_caller_json_that_validation_accepts_every_adapter_can_send(
    arguments: str, schema: struct_pb2.Struct | dict[str, Any] | None
) -> None:
    # The class of bug: validation reading caller JSON one way, an adapter or a vendor another.
    req = pb.GenerateRequest(model="r")
    req.messages.add(role=pb.ROLE_USER, text="hi")
    req.messages.add(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="c", name="t", arguments_json=arguments)])
    req.messages.add(role=pb.ROLE_TOOL, tool_call_id="c", text="ok")
    tool = req.tools.add(name="t")
    if isinstance(schema, struct_pb2.Struct):
        tool.parameters.CopyFrom(schema)
    elif schema is not None:
        tool.parameters.update(schema)
    outcome: GenerationRequest | ErrorCode
    try:
        outcome = validate_request(req, ROUTE, stream_id="s", deadline=None, max_request_bytes=1 << 30)
    except GatewayError as err:
        outcome = err.code
    if isinstance(outcome, ErrorCode):
        assert outcome is ErrorCode.INVALID_REQUEST
        return
    generation = outcome
    # Anthropic's adapter parses the arguments with orjson; OpenAI's sends them on as text, for
    # the vendor's standard parser. Both send the body as standard JSON.
    bodies = [
        anthropic.request_body(generation, default_max_tokens=16, reasoning_mode="budget"),
        openai.request_body(generation, "max_tokens"),
    ]
    orjson.loads(arguments)
    for body in bodies:
        json.loads(json.dumps(body, allow_nan=False))
        orjson.dumps(body)
