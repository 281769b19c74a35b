"""Validation of content parts, cache markers and response formats: INVALID_ARGUMENT naming the field
by index, before any provider is called; plain text requests go through the same checks as before."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conftest import BadRequest, Recorder, collect, detail, rich_status
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc


def user(*parts: pb.ContentPart, **fields: Any) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, parts=list(parts), **fields)


def image(**fields: Any) -> pb.ContentPart:
    return pb.ContentPart(image=pb.ImagePart(**fields))


def fmt(schema: dict[str, Any] | None = None, **fields: Any) -> pb.ResponseFormat:
    out = pb.ResponseFormat(**fields)
    if schema is not None:
        out.schema.update(schema)
    return out


def ttl(nanos: int) -> pb.CacheControl:
    control = pb.CacheControl()
    control.ttl.FromNanoseconds(nanos)
    return control


SCHEMA = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
CASES: list[tuple[list[pb.Message], pb.ResponseFormat | None, str, str]] = [
    ([user(pb.ContentPart())], None, "messages[0].parts[0]", "no content"),
    ([user(pb.ContentPart(text=""))], None, "messages[0].parts[0].text", "empty"),
    ([user(pb.ContentPart(text="a"), text="b")], None, "messages[0].text", "one or the other"),
    ([user(image(media_type="image/png"))], None, "messages[0].parts[0].image", "data, url or file_id"),
    ([user(image(data=b"x"))], None, "messages[0].parts[0].image.media_type", "required with data"),
    ([user(image(media_type="image/png", data=b""))], None, "messages[0].parts[0].image.data", "must not be empty"),
    ([user(image(media_type="png", data=b"x"))], None, "messages[0].parts[0].image.media_type", "not a media type"),
    ([user(image(url="/relative.png"))], None, "messages[0].parts[0].image.url", "absolute URL"),
    ([user(image(url="https://e.com/" + "a" * 8200))], None, "messages[0].parts[0].image.url", "8192"),
    ([user(image(file_id="has space"))], None, "messages[0].parts[0].image.file_id", "printable"),
    (
        [user(pb.ContentPart(document=pb.DocumentPart(media_type="text/plain", data=b"\xff\xfe")))],
        None,
        "messages[0].parts[0].document.data",
        "UTF-8",
    ),
    (
        [pb.Message(role=pb.ROLE_SYSTEM, parts=[image(url="https://e.com/a.png")])],
        None,
        "messages[0].parts[0]",
        "text parts only",
    ),
    (
        [user(pb.ContentPart(text="a", cache_control=ttl(500_000_000)))],
        None,
        "messages[0].parts[0].cache_control.ttl",
        "1 s",
    ),
    (
        [
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id="c", name="t", arguments_json="{}")],
                cache_control=pb.CacheControl(),
            ),
            pb.Message(role=pb.ROLE_USER, text="x"),
        ],
        None,
        "messages[0].cache_control",
        "text or parts",
    ),
    (
        [user(pb.ContentPart(text="a", cache_control=pb.CacheControl()), cache_control=pb.CacheControl())],
        None,
        "messages[0].cache_control",
        "already",
    ),
    (
        [
            pb.Message(role=pb.ROLE_ASSISTANT, reasoning=[pb.ReasoningBlock(text="t", redacted_data="d")]),
            pb.Message(role=pb.ROLE_USER, text="x"),
        ],
        None,
        "messages[0].reasoning[0]",
        "redacted",
    ),
    ([user(pb.ContentPart(text="x"))], fmt(type=SCHEMA, name="a"), "response_format.schema", "required"),
    ([user(pb.ContentPart(text="x"))], fmt({"type": "object"}, type=SCHEMA), "response_format.name", "1 to 64"),
    (
        [user(pb.ContentPart(text="x"))],
        fmt({"type": "objekt"}, type=SCHEMA, name="a"),
        "response_format.schema",
        "type",
    ),
    (
        [user(pb.ContentPart(text="x"))],
        fmt({"type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}, type=SCHEMA, name="a"),
        "response_format.schema",
        "properties/n/minimum",
    ),
    (
        [user(pb.ContentPart(text="x"))],
        fmt({"type": "object", "required": "n"}, type=SCHEMA, name="a"),
        "response_format.schema",
        "not a valid JSON Schema",
    ),
    (
        [user(pb.ContentPart(text="x"))],
        fmt({"type": "object"}, type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
        "response_format",
        "JSON_SCHEMA only",
    ),
    ([user(pb.ContentPart(text="x"))], fmt(type=99), "response_format.type", "unknown"),
]


@pytest.mark.parametrize(("messages", "response_format", "field", "fragment"), CASES)
async def test_bad_content_is_invalid_argument_naming_the_field(
    stub: pb_grpc.GenerationServiceAsyncStub,
    recorder: Recorder,
    messages: list[pb.Message],
    response_format: pb.ResponseFormat | None,
    field: str,
    fragment: str,
) -> None:
    request = pb.GenerateRequest(model="recorded", messages=messages)
    if response_format is not None:
        request.response_format.CopyFrom(response_format)
    got, code, trailing = await collect(stub.Generate(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and got == []
    status = rich_status(trailing)
    (violation,) = detail(status, BadRequest).field_violations
    assert violation.field == field and fragment in status.message, status.message
    assert recorder.requests == []  # the provider never saw it


async def test_a_draft_07_schema_is_read_as_draft_07(stub: pb_grpc.GenerationServiceAsyncStub) -> None:
    # Draft 7's `exclusiveMinimum` is a number; draft 4's was a boolean, which draft 7 refuses.
    good = fmt(
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "integer", "exclusiveMinimum": 0},
        type=SCHEMA,
        name="n",
    )
    bad = fmt(
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "integer", "exclusiveMinimum": True},
        type=SCHEMA,
        name="n",
    )
    for response_format, expected in ((good, grpc.StatusCode.OK), (bad, grpc.StatusCode.INVALID_ARGUMENT)):
        request = pb.GenerateRequest(
            model="sim", messages=[pb.Message(role=pb.ROLE_USER, text="n?")], response_format=response_format
        )
        _, code, _ = await collect(stub.Generate(request))
        assert code == expected


async def test_a_message_cache_marker_goes_on_its_last_part(
    stub: pb_grpc.GenerationServiceAsyncStub, recorder: Recorder
) -> None:
    request = pb.GenerateRequest(
        model="recorded",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, text="Long instructions.", cache_control=ttl(3600 * 10**9)),
            user(pb.ContentPart(text="a"), pb.ContentPart(text="b"), cache_control=pb.CacheControl()),
        ],
    )
    _, code, _ = await collect(stub.Generate(request))
    assert code == grpc.StatusCode.OK
    system, question = recorder.requests[0].messages
    assert (system.text, [(p.text, p.cache) for p in system.parts]) == (
        "Long instructions.",
        [("Long instructions.", system.parts[0].cache)],
    )
    assert system.parts[0].cache is not None and system.parts[0].cache.ttl == 3600
    assert [p.cache is not None for p in question.parts] == [False, True]


async def test_plain_text_requests_carry_no_parts(stub: pb_grpc.GenerationServiceAsyncStub, recorder: Recorder) -> None:
    _, code, _ = await collect(
        stub.Generate(pb.GenerateRequest(model="recorded", messages=[pb.Message(role=pb.ROLE_USER, text="hi")]))
    )
    assert code == grpc.StatusCode.OK
    (message,) = recorder.requests[0].messages
    assert message.parts == () and recorder.requests[0].response_format is None
