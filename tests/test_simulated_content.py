"""The simulated model with content parts and JSON response formats: it accepts every part and says
what it got, answers a JSON schema with an instance that validates (checked with `jsonschema`),
and cites documents that ask for it, so client teams can test all of it without a key."""

from __future__ import annotations

import json
from typing import Any

import grpc
import jsonschema
import orjson
import pytest

from conftest import assert_well_formed, collect
from service.providers.schema_instance import instance_of
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "invoice_number": {"type": "string", "minLength": 3, "maxLength": 12},
            "total": {"type": "number", "exclusiveMinimum": 0, "maximum": 10_000},
            "currency": {"enum": ["EUR", "USD"]},
            "paid": {"type": "boolean"},
            "lines": {
                "type": "array",
                "minItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                    "required": ["sku", "quantity"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["invoice_number", "total", "currency", "paid", "lines"],
        "additionalProperties": False,
    },
    {
        "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        "type": "object",
        "properties": {
            "author": {"$ref": "#/$defs/person"},
            "reviewers": {"type": "array", "items": {"$ref": "#/$defs/person"}},
        },
        "required": ["author"],
    },
    {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date-time"},
            "email": {"type": "string", "format": "email"},
            "id": {"type": "string", "format": "uuid"},
            "note": {"type": ["string", "null"]},
            "score": {"type": "integer", "minimum": 10, "maximum": 20, "multipleOf": 5},
            "ratio": {"type": "number", "minimum": 0.25, "maximum": 0.75},
            "kind": {"const": "claim"},
            "either": {"anyOf": [{"type": "integer", "minimum": 3}, {"type": "string"}]},
            "both": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                    {"properties": {"b": {"type": "string"}}, "required": ["b"]},
                ]
            },
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "minItems": 2},
        },
        "required": ["when", "email", "id", "note", "score", "ratio", "kind", "either", "both", "pair"],
    },
    {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 1},
    {"type": "object"},
]


def schema_request(schema: dict[str, Any], **fields: Any) -> pb.GenerateRequest:
    fmt = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="answer", strict=True)
    fmt.schema.update(schema)
    return pb.GenerateRequest(
        model="sim",
        messages=[pb.Message(role=pb.ROLE_USER, text="Extract the invoice.")],
        response_format=fmt,
        **fields,
    )


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.text_delta.text for m in messages if m.HasField("text_delta"))


def check(schema: dict[str, Any], value: Any) -> None:
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]
    assert not errors, errors


@pytest.mark.parametrize("schema", SCHEMAS)
async def test_a_json_schema_is_answered_with_a_valid_instance(
    stub: pb_grpc.GenerationServiceAsyncStub, schema: dict[str, Any]
) -> None:
    messages, code, _ = await collect(stub.Generate(schema_request(schema)))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    assert messages[-1].finish.reason == pb.FINISH_REASON_STOP
    check(schema, orjson.loads(text_of(messages)))


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_instances_validate(schema: dict[str, Any]) -> None:
    check(schema, instance_of(schema, "A sentence."))


async def test_json_object_answer_and_parts_described(stub: pb_grpc.GenerationServiceAsyncStub) -> None:
    request = pb.GenerateRequest(
        model="sim",
        messages=[
            pb.Message(
                role=pb.ROLE_USER,
                parts=[
                    pb.ContentPart(text="Summarise."),
                    pb.ContentPart(document=pb.DocumentPart(url="https://example.com/claim.pdf", title="claim")),
                ],
            )
        ],
        response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
    )
    messages, code, _ = await collect(stub.Generate(request))
    assert code == grpc.StatusCode.OK
    answer = orjson.loads(text_of(messages))
    assert isinstance(answer["answer"], str)
    assert (
        answer["received"] == "I received a document titled 'claim' (type not given, at https://example.com/claim.pdf)."
    )


async def test_every_kind_of_part_is_accepted_and_described(stub: pb_grpc.GenerationServiceAsyncStub) -> None:
    request = pb.GenerateRequest(
        model="sim",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, parts=[pb.ContentPart(text="Be brief.", cache_control=pb.CacheControl())]),
            pb.Message(
                role=pb.ROLE_USER,
                parts=[
                    pb.ContentPart(image=pb.ImagePart(media_type="image/png", data=b"\x89PNG\r\n\x1a\n" + bytes(100))),
                    pb.ContentPart(document=pb.DocumentPart(media_type="application/pdf", file_id="file-9")),
                    pb.ContentPart(audio=pb.AudioPart(media_type="audio/ogg", url="http://example.com/a.ogg")),
                    pb.ContentPart(text="What do you see?"),
                ],
            ),
        ],
    )
    messages, code, _ = await collect(stub.Generate(request))
    assert code == grpc.StatusCode.OK
    assert text_of(messages).startswith(
        "I received an image (image/png, 108 bytes inline), a document (application/pdf, file file-9), "
        "and a recording (audio/ogg, at http://example.com/a.ogg). "
    )
    finish = messages[-1].finish
    assert finish.provider_model == "tokenwire-sim-1" and finish.provider_request_id.startswith("sim-")
    # Media parts count in the prompt, as a vendor bills them.
    assert finish.usage.input_tokens > 258 + 1000 + 150


async def test_documents_that_ask_for_citations_are_cited(stub: pb_grpc.GenerationServiceAsyncStub) -> None:
    doc = b"Claims are paid within 30 days.\nSecond line."
    request = pb.GenerateRequest(
        model="sim",
        messages=[
            pb.Message(
                role=pb.ROLE_USER,
                parts=[
                    pb.ContentPart(document=pb.DocumentPart(media_type="text/plain", data=b"uncited")),
                    pb.ContentPart(
                        document=pb.DocumentPart(media_type="text/plain", data=doc, title="policy", citations=True)
                    ),
                    pb.ContentPart(text="When are claims paid?"),
                ],
            )
        ],
    )
    messages, code, _ = await collect(stub.Generate(request))
    assert code == grpc.StatusCode.OK
    (citation,) = [m.citation_delta for m in messages if m.HasField("citation_delta")]
    assert citation == pb.CitationDelta(
        text_start=0,
        text_end=len(text_of(messages)),
        cited_text="Claims are paid within 30 days.",
        document_index=1,
        document_title="policy",
        location_type=pb.CITATION_LOCATION_TYPE_CHARACTERS,
        start_index=0,
        end_index=31,
    )
    assert messages[-2].HasField("citation_delta")


async def test_a_json_answer_cut_by_max_tokens_finishes_with_length(stub: pb_grpc.GenerationServiceAsyncStub) -> None:
    messages, code, _ = await collect(stub.Generate(schema_request(SCHEMAS[0], max_output_tokens=2)))
    assert code == grpc.StatusCode.OK
    assert messages[-1].finish.reason == pb.FINISH_REASON_LENGTH
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text_of(messages))


def test_schema_instance_keys_do_not_depend_on_the_order_the_schema_arrived_in() -> None:
    # Schemas come through google.protobuf.Struct, whose maps keep no order.
    props = {"claim_id": {"type": "string"}, "cause": {"type": "string"}, "amount_eur": {"type": "number"}}
    required = ["claim_id", "amount_eur"]
    one = instance_of({"type": "object", "properties": props, "required": required})
    other = instance_of({"type": "object", "properties": dict(reversed(props.items())), "required": required})
    assert json.dumps(one) == json.dumps(other)
    assert list(one) == ["claim_id", "amount_eur", "cause"]
