"""The typed client's content helpers, JSON responses and citations, against a real server; and the
demo's --image and --json-schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from conftest import Running
from tokenwire.v1 import generation_pb2 as pb
from tokenwire_client import (
    AsyncClient,
    CitationDelta,
    CitationLocation,
    InvalidRequestError,
    ReasoningBlock,
    ResponseParseError,
    StreamAccumulator,
    assistant,
    audio,
    document,
    image,
    json_schema,
    system,
    text,
    user,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"claim_id": {"type": "string"}, "amount": {"type": "number", "minimum": 0}},
    "required": ["claim_id", "amount"],
    "additionalProperties": False,
}


@pytest.fixture
async def client(running: Running) -> AsyncClient:
    return AsyncClient(channel=running.channel)


def test_parts_from_a_path_bytes_a_url_or_a_file_id(tmp_path: Path) -> None:
    path = tmp_path / "screen.png"
    path.write_bytes(PNG)
    assert image(path).image == pb.ImagePart(media_type="image/png", data=PNG)
    assert image(str(path), cache=True).HasField("cache_control")
    # Bytes: the media type from their first bytes, unless given.
    assert image(PNG).image.media_type == "image/png"
    assert document(b"%PDF-1.7 ...").document.media_type == "application/pdf"
    assert audio(b"RIFF\x00\x00\x00\x00WAVEfmt ").audio.media_type == "audio/wav"
    assert image("https://example.com/a.png").image == pb.ImagePart(url="https://example.com/a.png")
    assert document(file_id="file-1", citations=True).document == pb.DocumentPart(file_id="file-1", citations=True)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert document(notes, title="notes").document == pb.DocumentPart(
        media_type="text/plain", data=b"hello", title="notes"
    )
    with pytest.raises(ValueError, match="media type"):
        image(b"no magic here")
    with pytest.raises(ValueError, match="one of them"):
        image(PNG, file_id="file-1")
    with pytest.raises(ValueError, match="cache lifetime"):
        text("x", cache=0.5)
    part = text("x", cache=3600)
    assert part.cache_control.ttl.seconds == 3600


def test_messages_with_parts_and_cache_markers() -> None:
    message = user("What is this?", image(PNG))
    assert [p.WhichOneof("part") for p in message.parts] == ["text", "image"] and not message.text
    assert user("Hi") == pb.Message(role=pb.ROLE_USER, text="Hi")  # one text is still a text message
    cached = system("Long instructions.", cache=True)
    assert cached.text == "Long instructions." and cached.HasField("cache_control")
    back = assistant("Hi", reasoning=[ReasoningBlock("", "", "opaque")])
    assert back.reasoning[0].redacted_data == "opaque"


async def test_a_json_schema_answer_parsed(client: AsyncClient) -> None:
    async with client.generate(
        "sim", [user("Read the claim.", document(b"%PDF-1.7 fake"))], response_format=json_schema("claim", SCHEMA)
    ) as stream:
        response = await stream.get_final_response()
    value = response.parsed()
    jsonschema.validate(value, SCHEMA)
    assert response.provider_model == "tokenwire-sim-1" and response.provider_request_id.startswith("sim-")


async def test_an_answer_cut_short_is_a_clear_parse_error(client: AsyncClient) -> None:
    response = await client.generate(
        "sim", [user("Read the claim.")], response_format="json_object", max_output_tokens=1
    ).get_final_response()
    with pytest.raises(ResponseParseError, match="cut short by max_output_tokens") as caught:
        response.parsed()
    assert caught.value.text == response.text and caught.value.finish_reason == "length"


async def test_citations_are_collected_on_the_final_response(client: AsyncClient) -> None:
    events = []
    async with client.generate(
        "sim", [user("When?", document(b"Paid in 30 days.", media_type="text/plain", title="policy", citations=True))]
    ) as stream:
        events = [event async for event in stream]
        response = await stream.get_final_response()
    (citation,) = response.citations
    assert [e.citation for e in events if isinstance(e, CitationDelta)] == [citation]
    assert (citation.cited_text, citation.document_title, citation.location) == (
        "Paid in 30 days.",
        "policy",
        CitationLocation.CHARACTERS,
    )
    assert response.text[citation.text_start : citation.text_end] == response.text


async def test_a_refused_part_is_an_invalid_request_error(client: AsyncClient) -> None:
    with pytest.raises(InvalidRequestError, match=r"messages\[0\]\.parts\[1\]\.image\.media_type"):
        await client.generate("sim", [user("x", image(b"II*\x00", media_type="image/tiff"))]).get_final_response()


async def test_list_models_tells_capabilities(client: AsyncClient) -> None:
    sim = next(m for m in await client.list_models() if m.name == "sim")
    assert sim.images is not None and sim.images.media_types["image/png"] == {"data", "url", "file_id"}
    assert sim.prompt_caching == "explicit" and sim.cache_ttls == [300.0, 1800.0, 3600.0]
    assert sim.response_formats == ["text", "json_object", "json_schema"] and sim.supports_citations


def test_redacted_reasoning_accumulates_as_its_own_block() -> None:
    acc = StreamAccumulator()
    for m in (
        pb.GenerateResponse(sequence=1, start=pb.Start(stream_id="s")),
        pb.GenerateResponse(sequence=2, reasoning_delta=pb.ReasoningDelta(redacted_data="opaque")),
        pb.GenerateResponse(sequence=3, reasoning_delta=pb.ReasoningDelta(text="Thinking.")),
        pb.GenerateResponse(sequence=4, reasoning_delta=pb.ReasoningDelta(signature="sig")),
        pb.GenerateResponse(sequence=5, finish=pb.Finish(reason=pb.FINISH_REASON_STOP)),
    ):
        acc.feed(m)
    assert acc.response().reasoning == [ReasoningBlock("", "", "opaque"), ReasoningBlock("Thinking.", "sig")]


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwire_client", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_demo_image_and_json_schema(live_address: str, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    shot.write_bytes(PNG)
    schema = tmp_path / "claim.json"
    schema.write_text(json.dumps(SCHEMA))
    out = demo("--target", live_address, "--image", str(shot), "--json-schema", str(schema), "What is it?")
    assert out.returncode == 0, out.stderr
    parsed = next(line for line in out.stdout.splitlines() if line.startswith("parsed JSON: "))
    jsonschema.validate(json.loads(parsed.removeprefix("parsed JSON: ")), SCHEMA)
    out = demo("--target", live_address, "--image", str(shot), "Describe it.")
    assert out.returncode == 0 and "I received an image (image/png, 40 bytes inline)." in out.stdout
    # An answer cut short does not parse: exit status 1, with the reason.
    out = demo("--target", live_address, "--json-schema", str(schema), "--max-tokens", "1", "x")
    assert out.returncode == 1 and "not valid JSON" in out.stderr and "Traceback" not in out.stderr
    out = demo("--target", live_address, "--image", str(tmp_path / "missing.png"), "x")
    assert out.returncode == 2 and "cannot read" in out.stderr
