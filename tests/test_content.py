"""Content beyond text end to end: images, documents, audio, cache markers, JSON response formats,
citations and redacted reasoning, through a real tokenwire server, the official SDKs and the fake
providers, which record the exact JSON that arrives upstream and refuse what the vendors refuse."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import orjson
import pytest
from fakes import FakeAnthropic, FakeOpenAI, StatusReply, StreamReply, ToolCallScript

from conftest import FAST, BadRequest, Running, assert_well_formed, collect, detail, rich_status, vendor_route
from tokenwire.v1 import generation_pb2 as pb

# The smallest real PNG (1x1, transparent) and a minimal PDF: bytes the vendors would read.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
)
WAV = b"RIFF$\x00\x00\x00WAVEfmt " + bytes(28)
INVOICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string"},
        "total": {"type": "number", "minimum": 0},
        "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}},
    },
    "required": ["invoice_number", "total", "lines"],
    "additionalProperties": False,
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ask(*parts: pb.ContentPart, model: str, **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.ContentPart(text="What is this?"), *parts])],
        **fields,
    )


def image(**source: Any) -> pb.ContentPart:
    return pb.ContentPart(image=pb.ImagePart(**source))


def document(**source: Any) -> pb.ContentPart:
    return pb.ContentPart(document=pb.DocumentPart(**source))


def audio(**source: Any) -> pb.ContentPart:
    return pb.ContentPart(audio=pb.AudioPart(**source))


def schema_format(schema: dict[str, Any], strict: bool = True) -> pb.ResponseFormat:
    fmt = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name="invoice", strict=strict)
    fmt.schema.update(schema)
    return fmt


def ttl(seconds: int) -> pb.CacheControl:
    control = pb.CacheControl()
    control.ttl.FromSeconds(seconds)
    return control


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.text_delta.text for m in messages if m.HasField("text_delta"))


@pytest.fixture
async def gateway(start_server: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> Running:
    routes = {
        "openai": vendor_route(fake_openai),
        "openai-breakpoints": vendor_route(fake_openai, prompt_cache="breakpoints"),
        "anthropic": vendor_route(fake_anthropic),
        "anthropic-tool": vendor_route(fake_anthropic, structured_output="tool"),
        "sim": {"provider": "simulated", "model": "tokenwire-sim-1", "options": FAST},
    }
    running: Running = await start_server(routes=routes, max_request_bytes=16 * 1024 * 1024)
    return running


async def ok(gateway: Running, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    messages, code, trailing = await collect(gateway.stub.Generate(request))
    assert code == grpc.StatusCode.OK, rich_status(trailing).message
    assert_well_formed(messages)
    return messages


async def refused(gateway: Running, request: pb.GenerateRequest) -> tuple[str, str]:
    """The field and message of an INVALID_ARGUMENT refusal, which must come before any message."""
    messages, code, trailing = await collect(gateway.stub.Generate(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and messages == []
    status = rich_status(trailing)
    (violation,) = detail(status, BadRequest).field_violations
    return violation.field, status.message


# --- What arrives upstream -------------------------------------------------------------------


async def test_an_image_reaches_openai_as_a_data_url(gateway: Running, fake_openai: FakeOpenAI) -> None:
    await ok(gateway, ask(image(media_type="image/png", data=PNG), model="openai"))
    assert fake_openai.requests[-1].body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(PNG)}},
            ],
        }
    ]


async def test_an_image_url_and_audio_reach_openai(gateway: Running, fake_openai: FakeOpenAI) -> None:
    await ok(
        gateway,
        ask(image(url="https://example.com/cat.png"), audio(media_type="audio/wav", data=WAV), model="openai"),
    )
    content = fake_openai.requests[-1].body["messages"][0]["content"]
    assert content[1:] == [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}},
    ]


async def test_an_image_reaches_anthropic_as_an_image_block(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    await ok(
        gateway,
        ask(
            image(media_type="image/png", data=PNG),
            image(url="https://example.com/cat.png"),
            image(file_id="file_011CNha8iCJcU1wXNR6q4V8w"),
            model="anthropic",
        ),
    )
    recorded = fake_anthropic.requests[-1]
    assert recorded.body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(PNG)}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "image", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}},
    ]
    # File sources are a beta: the header goes with them, and only with them.
    assert "files-api-2025-04-14" in recorded.headers["anthropic-beta"]
    await ok(gateway, ask(image(media_type="image/png", data=PNG), model="anthropic"))
    assert "anthropic-beta" not in fake_anthropic.requests[-1].headers


async def test_a_pdf_with_a_json_schema_through_openai(gateway: Running, fake_openai: FakeOpenAI) -> None:
    answer = '{"invoice_number": "INV-7", "total": 12.5, "lines": []}'
    fake_openai.enqueue(StreamReply(text=[answer[:20], answer[20:]]))
    request = ask(
        document(media_type="application/pdf", data=PDF, title="invoice.pdf"),
        model="openai",
        response_format=schema_format(INVOICE_SCHEMA),
    )
    messages = await ok(gateway, request)
    assert orjson.loads(text_of(messages)) == {"invoice_number": "INV-7", "total": 12.5, "lines": []}
    body = fake_openai.requests[-1].body
    assert body["messages"][0]["content"][1] == {
        "type": "file",
        "file": {"filename": "invoice.pdf", "file_data": "data:application/pdf;base64," + b64(PDF)},
    }
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "invoice", "schema": INVOICE_SCHEMA, "strict": True},
    }
    # Whole numbers go up as JSON integers, not as the doubles a Struct holds.
    assert type(body["response_format"]["json_schema"]["schema"]["properties"]["total"]["minimum"]) is int


async def test_openai_json_object_and_file_ids(gateway: Running, fake_openai: FakeOpenAI) -> None:
    request = ask(
        document(file_id="file-abc123"),
        model="openai",
        response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
    )
    await ok(gateway, request)
    body = fake_openai.requests[-1].body
    assert body["messages"][0]["content"][1] == {"type": "file", "file": {"file_id": "file-abc123"}}
    assert body["response_format"] == {"type": "json_object"}


async def test_a_pdf_with_a_json_schema_through_anthropic_native(
    gateway: Running, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(StreamReply(text=['{"invoice_number": "INV-7", ', '"total": 3, "lines": []}']))
    request = ask(
        document(media_type="application/pdf", data=PDF, title="invoice.pdf", context="From ACME", citations=True),
        model="anthropic",
        response_format=schema_format(INVOICE_SCHEMA),
    )
    messages = await ok(gateway, request)
    assert orjson.loads(text_of(messages))["invoice_number"] == "INV-7"
    body = fake_anthropic.requests[-1].body
    assert body["messages"][0]["content"][1] == {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": b64(PDF)},
        "title": "invoice.pdf",
        "context": "From ACME",
        "citations": {"enabled": True},
    }
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": INVOICE_SCHEMA}}
    assert "tools" not in body


async def test_anthropic_json_by_a_forced_tool(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(
        StreamReply(text=[], tool_calls=[ToolCallScript("toolu_1", "invoice", ['{"invoice_number": "I', '-1"}'])])
    )
    messages = await ok(gateway, ask(model="anthropic-tool", response_format=schema_format(INVOICE_SCHEMA)))
    # The forced tool's input is the answer: text deltas, a STOP, no tool call.
    assert text_of(messages) == '{"invoice_number": "I-1"}'
    assert not any(m.HasField("tool_call_delta") for m in messages)
    finish = messages[-1].finish
    assert (finish.reason, finish.raw_reason) == (pb.FINISH_REASON_STOP, "tool_use")
    body = fake_anthropic.requests[-1].body
    assert body["tools"] == [
        {
            "name": "invoice",
            "description": "Answer by calling this tool: its input is the answer.",
            "input_schema": INVOICE_SCHEMA,
            "strict": True,
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "invoice"}
    assert "output_config" not in body


async def test_anthropic_plain_text_documents_and_tool_mode_json_object(
    gateway: Running, fake_anthropic: FakeAnthropic
) -> None:
    fake_anthropic.enqueue(StreamReply(text=[], tool_calls=[ToolCallScript("toolu_1", "json_answer", [])]))
    request = ask(
        document(media_type="text/plain", data="Grüße, 世界".encode()),
        model="anthropic-tool",
        response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
    )
    messages = await ok(gateway, request)
    assert text_of(messages) == "{}"  # a forced call with no input is the empty object
    body = fake_anthropic.requests[-1].body
    assert body["messages"][0]["content"][1] == {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "Grüße, 世界"},
    }
    assert body["tools"][0]["input_schema"] == {"type": "object"}


# --- Cache markers ---------------------------------------------------------------------------


def cached_conversation(model: str, marker: pb.CacheControl) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model,
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, text="You are a support agent. " * 50, cache_control=marker),
            pb.Message(
                role=pb.ROLE_USER,
                parts=[
                    pb.ContentPart(
                        image=pb.ImagePart(media_type="image/png", data=PNG), cache_control=pb.CacheControl()
                    ),
                    pb.ContentPart(text="What is wrong here?"),
                ],
            ),
        ],
    )


async def test_cache_markers_become_anthropic_cache_control(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    await ok(gateway, cached_conversation("anthropic", ttl(3600)))
    body = fake_anthropic.requests[-1].body
    # A cached system prompt is a list of blocks: only a block can carry cache_control.
    assert body["system"] == [
        {"type": "text", "text": "You are a support agent. " * 50, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    ]
    assert body["messages"][0]["content"] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": b64(PNG)},
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "text", "text": "What is wrong here?"},
    ]
    # 10 minutes is kept for the next lifetime Anthropic offers that is as long: an hour.
    await ok(gateway, cached_conversation("anthropic", ttl(600)))
    assert fake_anthropic.requests[-1].body["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    await ok(gateway, cached_conversation("anthropic", ttl(300)))
    assert fake_anthropic.requests[-1].body["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "5m"}


async def test_cache_markers_on_openai(gateway: Running, fake_openai: FakeOpenAI) -> None:
    await ok(gateway, cached_conversation("openai-breakpoints", pb.CacheControl()))
    messages = fake_openai.requests[-1].body["messages"]
    assert messages[0] == {
        "role": "system",
        "content": [
            {"type": "text", "text": "You are a support agent. " * 50, "prompt_cache_breakpoint": {"mode": "explicit"}}
        ],
    }
    assert messages[1]["content"][0]["prompt_cache_breakpoint"] == {"mode": "explicit"}
    assert "prompt_cache_breakpoint" not in messages[1]["content"][1]
    # Automatic caching: the markers are accepted and have nothing to map to.
    await ok(gateway, cached_conversation("openai", pb.CacheControl()))
    sent = orjson.dumps(fake_openai.requests[-1].body)
    assert b"prompt_cache" not in sent and b"cache_control" not in sent


# --- Citations, redacted reasoning, request id and model snapshot ---------------------------


async def test_anthropic_citations_stream_as_citation_deltas(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    citation = {
        "type": "char_location",
        "cited_text": "The grass is green.",
        "document_index": 0,
        "document_title": "Facts",
        "start_char_index": 0,
        "end_char_index": 19,
    }
    page = {
        "type": "page_location",
        "cited_text": "Page one.",
        "document_index": 1,
        "document_title": None,
        "start_page_number": 1,
        "end_page_number": 2,
    }
    fake_anthropic.enqueue(StreamReply(text=["The grass ", "is green."], citations=[citation, page]))
    request = ask(
        document(media_type="text/plain", data=b"The grass is green. The sky is blue.", title="Facts", citations=True),
        document(media_type="application/pdf", data=PDF, citations=True),
        model="anthropic",
    )
    messages = await ok(gateway, request)
    kinds = [m.WhichOneof("event") for m in messages]
    # Sent when their text block ends: after the text they support.
    assert kinds[-3:] == ["citation_delta", "citation_delta", "finish"]
    assert set(kinds[1:-3]) == {"text_delta"} and text_of(messages) == "The grass is green."
    first, second = (m.citation_delta for m in messages if m.HasField("citation_delta"))
    assert first == pb.CitationDelta(
        text_start=0,
        text_end=len("The grass is green."),
        cited_text="The grass is green.",
        document_index=0,
        document_title="Facts",
        location_type=pb.CITATION_LOCATION_TYPE_CHARACTERS,
        start_index=0,
        end_index=19,
    )
    assert (second.location_type, second.start_index, second.end_index, second.document_index) == (
        pb.CITATION_LOCATION_TYPE_PAGES,
        1,
        2,
        1,
    )


async def test_redacted_thinking_round_trip(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.enqueue(StreamReply(redacted=["EmwKAhgBEgy3va3pzix/LafPsn4aDFIT"], reasoning=["Hm."], text=["Hi."]))
    messages = await ok(
        gateway,
        pb.GenerateRequest(
            model="anthropic",
            messages=[pb.Message(role=pb.ROLE_USER, text="Hello")],
            reasoning=pb.ReasoningOptions(budget_tokens=2048),
        ),
    )
    reasoning = [m.reasoning_delta for m in messages if m.HasField("reasoning_delta")]
    assert reasoning[0] == pb.ReasoningDelta(redacted_data="EmwKAhgBEgy3va3pzix/LafPsn4aDFIT")
    # The next turn sends it back, as its own block, before the signed one.
    turn = pb.Message(
        role=pb.ROLE_ASSISTANT,
        text="Hi.",
        reasoning=[
            pb.ReasoningBlock(redacted_data="EmwKAhgBEgy3va3pzix/LafPsn4aDFIT"),
            pb.ReasoningBlock(text="Hm.", signature="sig-1"),
        ],
    )
    await ok(
        gateway,
        pb.GenerateRequest(
            model="anthropic",
            messages=[pb.Message(role=pb.ROLE_USER, text="Hello"), turn, pb.Message(role=pb.ROLE_USER, text="More")],
        ),
    )
    assert fake_anthropic.requests[-1].body["messages"][1]["content"] == [
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT"},
        {"type": "thinking", "thinking": "Hm.", "signature": "sig-1"},
        {"type": "text", "text": "Hi."},
    ]


@pytest.mark.parametrize(("route", "header"), [("openai", "req_"), ("anthropic", "req_")])
async def test_finish_names_the_provider_request_and_model_snapshot(
    gateway: Running, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, route: str, header: str
) -> None:
    fake = fake_openai if route == "openai" else fake_anthropic
    fake.enqueue(StreamReply(model="snapshot-2026-01-01"))
    messages = await ok(gateway, pb.GenerateRequest(model=route, messages=[pb.Message(role=pb.ROLE_USER, text="Hi")]))
    finish = messages[-1].finish
    assert finish.provider_model == "snapshot-2026-01-01"
    assert finish.provider_request_id.startswith(header) and len(finish.provider_request_id) > 10
    # The configured model stays on Start; the snapshot is what answered.
    assert messages[0].start.upstream_model in ("gpt-test", "claude-test")


# --- Refused per route, never dropped, never sent half ---------------------------------------

REFUSALS = [
    ("openai", audio(media_type="audio/ogg", data=b"OggS\x00"), "messages[0].parts[1].audio.media_type", "audio/wav"),
    ("openai", document(url="https://example.com/a.pdf"), "messages[0].parts[1].document.url", "data, file_id"),
    ("openai", image(file_id="file-1"), "messages[0].parts[1].image.file_id", "data, url"),
    ("openai", document(media_type="text/plain", data=b"hi"), "messages[0].parts[1].document.media_type", "pdf"),
    (
        "openai",
        document(media_type="application/pdf", data=PDF, citations=True),
        "messages[0].parts[1].document.citations",
        "cannot cite",
    ),
    ("openai", image(url="http://example.com/a.png"), "messages[0].parts[1].image.url", "https"),
    ("anthropic", audio(media_type="audio/wav", data=WAV), "messages[0].parts[1].audio", "does not accept audio"),
    ("anthropic", image(url="http://example.com/a.png"), "messages[0].parts[1].image.url", "fetches only https"),
    ("anthropic", image(media_type="image/tiff", data=b"II*\x00"), "messages[0].parts[1].image.media_type", "tiff"),
    (
        "anthropic",
        document(media_type="text/plain", url="https://e.com/a.txt"),
        "messages[0].parts[1].document.url",
        "",
    ),
    ("anthropic", pb.ContentPart(text="x", cache_control=ttl(7200)), "messages[0].parts[1].cache_control.ttl", "3600"),
    ("openai", pb.ContentPart(text="x", cache_control=ttl(60)), "messages[0].parts[1].cache_control.ttl", "automatic"),
    (
        "openai-breakpoints",
        pb.ContentPart(text="x", cache_control=ttl(3600)),
        "messages[0].parts[1].cache_control.ttl",
        "1800",
    ),
]


@pytest.mark.parametrize(("route", "part", "field", "fragment"), REFUSALS)
async def test_a_part_a_route_cannot_take_is_refused_naming_it(
    gateway: Running,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    route: str,
    part: pb.ContentPart,
    field: str,
    fragment: str,
) -> None:
    name, message = await refused(gateway, ask(part, model=route))
    assert name == field and route in message and fragment in message
    assert fake_openai.requests == [] and fake_anthropic.requests == []  # nothing was sent, not even half


@pytest.mark.parametrize(
    ("route", "fmt", "field"),
    [
        ("anthropic", pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT), "response_format.type"),
    ],
)
async def test_a_format_a_route_cannot_produce_is_refused(
    gateway: Running, fake_anthropic: FakeAnthropic, route: str, fmt: pb.ResponseFormat, field: str
) -> None:
    name, message = await refused(gateway, ask(model=route, response_format=fmt))
    assert name == field and "json_object" in message and fake_anthropic.requests == []


async def test_forced_tool_json_refuses_tools_and_thinking(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    with_tools = ask(model="anthropic-tool", response_format=schema_format(INVOICE_SCHEMA), tools=[pb.Tool(name="t")])
    assert (await refused(gateway, with_tools))[0] == "response_format"
    thinking = ask(
        model="anthropic-tool",
        response_format=schema_format(INVOICE_SCHEMA),
        reasoning=pb.ReasoningOptions(budget_tokens=2048),
    )
    assert (await refused(gateway, thinking))[0] == "response_format"
    assert fake_anthropic.requests == []


async def test_every_route_takes_at_most_four_cache_markers(gateway: Running) -> None:
    marked = [pb.ContentPart(text=f"part {i}", cache_control=pb.CacheControl()) for i in range(5)]
    for route in ("anthropic", "openai-breakpoints", "sim"):
        name, _ = await refused(gateway, ask(*marked, model=route))
        assert name == "messages[0].parts[5].cache_control"


async def test_fallbacks_that_cannot_take_the_parts_are_skipped(
    start_server: Any, fake_anthropic: FakeAnthropic
) -> None:
    routes = {
        "anthropic": vendor_route(fake_anthropic) | {"fallbacks": ["sim"]},
        "sim": {"provider": "simulated", "model": "m", "options": FAST},
        "sim-down": {
            "provider": "simulated",
            "model": "m",
            "options": FAST | {"fail_after_chunks": 0},
            "max_retries": 0,
            "fallbacks": ["anthropic"],
        },
    }
    running: Running = await start_server(routes=routes)
    # The route named decides what is accepted, whatever its fallbacks could take.
    field, _ = await refused(running, ask(audio(media_type="audio/wav", data=WAV), model="anthropic"))
    assert field == "messages[0].parts[1].audio"
    # Anthropic is down before its first token: the simulated fallback takes the image.
    fake_anthropic.enqueue(StatusReply(503))
    messages = await ok(running, ask(image(media_type="image/png", data=PNG), model="anthropic"))
    assert (messages[0].start.route, messages[0].start.provider) == ("anthropic", "simulated")
    assert "I received an image (image/png, 70 bytes inline)." in text_of(messages)
    # A fallback that cannot take audio is skipped, not sent a request without it.
    requests = len(fake_anthropic.requests)
    messages, code, _ = await collect(
        running.stub.Generate(ask(audio(media_type="audio/wav", data=WAV), model="sim-down"))
    )
    assert code == grpc.StatusCode.UNAVAILABLE and messages == []
    assert len(fake_anthropic.requests) == requests


# --- Sizes ------------------------------------------------------------------------------------


async def test_large_media_within_and_beyond_the_limits(gateway: Running, fake_anthropic: FakeAnthropic) -> None:
    within = PNG + bytes(int(4.5 * 1024 * 1024))
    await ok(gateway, ask(image(media_type="image/png", data=within), model="anthropic"))
    sent = fake_anthropic.requests[-1].body["messages"][0]["content"][1]["source"]["data"]
    assert base64.b64decode(sent) == within
    # Over Anthropic's 5 MiB per image, within the server's 16 MiB request limit: the part is named.
    beyond = PNG + bytes(6 * 1024 * 1024)
    field, message = await refused(gateway, ask(image(media_type="image/png", data=beyond), model="anthropic"))
    assert field == "messages[0].parts[1].image.data" and "5242880" in message and "URL" in message
    assert len(fake_anthropic.requests) == 1


async def test_the_request_limit_holds_for_media(start_server: Any) -> None:
    running: Running = await start_server(
        routes={"sim": {"provider": "simulated", "model": "m", "options": FAST}}, max_request_bytes=1024 * 1024
    )
    # Over the limit, below gRPC's receive limit (twice it): the server reads it and says why.
    field, message = await refused(running, ask(image(media_type="image/png", data=bytes(1536 * 1024)), model="sim"))
    assert field == "request" and "1048576" in message
    # Past twice the limit gRPC itself refuses the message before tokenwire sees it.
    messages, code, _ = await collect(
        running.stub.Generate(ask(image(media_type="image/png", data=bytes(3 * 1024 * 1024)), model="sim"))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and messages == []
    # A URL is the way for media larger than the request limit.
    await ok(running, ask(image(url="https://example.com/huge.png"), model="sim"))


# --- Capabilities --------------------------------------------------------------------------------


async def test_list_models_says_what_each_route_accepts(gateway: Running) -> None:
    models = {m.name: m for m in (await gateway.stub.ListModels(pb.ListModelsRequest())).models}
    openai, anthropic, sim = models["openai"], models["anthropic"], models["sim"]
    png = next(t for t in openai.images.media_types if t.media_type == "image/png")
    assert (png.data, png.url, png.file_id) == (True, True, False)
    assert openai.images.url_schemes == ["https"] and openai.images.max_part_bytes == 20 * 1024 * 1024
    assert [t.media_type for t in openai.audio.media_types] == ["audio/mpeg", "audio/wav"]
    assert openai.prompt_caching == pb.PROMPT_CACHING_AUTOMATIC and not openai.cache_ttls
    assert models["openai-breakpoints"].prompt_caching == pb.PROMPT_CACHING_EXPLICIT
    assert [d.seconds for d in models["openai-breakpoints"].cache_ttls] == [1800]
    assert not openai.supports_citations
    assert list(openai.response_formats) == [
        pb.RESPONSE_FORMAT_TYPE_TEXT,
        pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
        pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
    ]
    assert not anthropic.audio.media_types and anthropic.supports_citations
    assert [d.seconds for d in anthropic.cache_ttls] == [300, 3600]
    assert list(anthropic.response_formats) == [pb.RESPONSE_FORMAT_TYPE_TEXT, pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA]
    assert pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT in models["anthropic-tool"].response_formats
    text = next(t for t in anthropic.documents.media_types if t.media_type == "text/plain")
    assert (text.data, text.url, text.file_id) == (True, False, True)
    assert sim.images.url_schemes == ["http", "https"] and sim.supports_citations
