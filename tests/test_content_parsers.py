"""The vendor parsers on content events: citations (only where asked for), redacted thinking, the
forced JSON tool, and the model snapshot and request id on the Finished event."""

from __future__ import annotations

from typing import Any

import orjson

from service.events import CitationDelta, CitationLocation, ReasoningDelta, TextDelta
from service.providers.anthropic import CitingEventParser, EventParser
from service.providers.openai import ChunkParser


def feed(parser: Any, *events: dict[str, Any]) -> list[Any]:
    for event in events:
        parser.handle(event.get("type", "").encode(), orjson.dumps(event))
    out: list[Any] = parser.out
    return out


def text_block(index: int, *texts: str, citations: tuple[dict[str, Any], ...] = ()) -> list[dict[str, Any]]:
    return [
        {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
        *(
            {"type": "content_block_delta", "index": index, "delta": {"type": "citations_delta", "citation": c}}
            for c in citations
        ),
        *({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}} for t in texts),
        {"type": "content_block_stop", "index": index},
    ]


CITATION = {"type": "char_location", "cited_text": "c", "document_index": 2, "start_char_index": 4, "end_char_index": 9}


def test_a_citation_gets_the_answer_range_of_its_text_block() -> None:
    out = feed(
        CitingEventParser("anthropic"),
        *text_block(0, "Plain ", "intro. "),
        *text_block(1, "Cited ", "claim.", citations=(CITATION,)),
        *text_block(2, " Rest."),
    )
    citations = [e for e in out if isinstance(e, CitationDelta)]
    assert citations == [
        CitationDelta(13, 25, "c", document_index=2, location=CitationLocation.CHARACTERS, start_index=4, end_index=9)
    ]
    # Sent right after its block's text, before the next block's.
    assert out.index(citations[0]) == 4


def test_without_citations_asked_for_the_plain_parser_counts_nothing() -> None:
    parser = EventParser("anthropic")
    out = feed(parser, *text_block(0, "Cited", citations=(CITATION,)))
    assert out == [TextDelta("Cited")]
    assert not hasattr(parser, "answer_chars")


def test_redacted_thinking_and_the_message_start_model() -> None:
    parser = EventParser("anthropic")
    parser.request_id = "req_1"
    out = feed(
        parser,
        {"type": "message_start", "message": {"model": "claude-x-20261101", "usage": {"input_tokens": 3}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "redacted_thinking", "data": "opaque"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    )
    assert out == [ReasoningDelta("", redacted_data="opaque")]
    finished = parser.finish()
    assert (finished.provider_model, finished.provider_request_id) == ("claude-x-20261101", "req_1")


def test_openai_reads_the_snapshot_from_its_usage_chunk() -> None:
    parser = ChunkParser("openai")
    feed(
        parser,
        {"model": "gpt-x-2026-01-01", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]},
        {"model": "gpt-x-2026-01-01", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
    )
    assert parser.finish().provider_model == "gpt-x-2026-01-01"
