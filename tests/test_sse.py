"""The SSE decoder: framing rules, whatever way the body is split into chunks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.providers.sse import SSEDecoder, SSEError

OPENAI_BODY = b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: [DONE]\n\n'
ANTHROPIC_BODY = (
    b'event: message_start\ndata: {"type":"message_start"}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
)


def decode_all(chunks: list[bytes]) -> list[tuple[bytes, bytes]]:
    decoder = SSEDecoder()
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def test_bare_data_frames() -> None:
    assert decode_all([OPENAI_BODY]) == [(b"", b'{"a":1}'), (b"", b'{"a":2}'), (b"", b"[DONE]")]


def test_named_events() -> None:
    assert [name for name, _ in decode_all([ANTHROPIC_BODY])] == [b"message_start", b"ping", b"content_block_delta"]


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_ends(newline: bytes) -> None:
    body = ANTHROPIC_BODY.replace(b"\n", newline)
    # A CR at the end of what has arrived may be half of a CRLF: the next byte settles it.
    assert decode_all([body, b"\n"]) == decode_all([ANTHROPIC_BODY])


def test_a_crlf_split_between_chunks_is_one_line_end() -> None:
    # "\r" ends one chunk, "\n\r\n" starts the next: one event, not an empty one in between.
    assert decode_all([b"data: x\r", b"\n\r\ndata: y\r\n\r\n"]) == [(b"", b"x"), (b"", b"y")]


def test_multiline_data_comments_and_ignored_fields() -> None:
    body = b": keep-alive\n\nid: 7\nretry: 10\ndata: line one\ndata:line two\n\n"
    assert decode_all([body]) == [(b"", b"line one\nline two")]


def test_an_unfinished_event_waits_for_its_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"partial"') == []
    assert decoder.pending
    assert decoder.feed(b": 1}\n\n") == [(b"", b'{"partial": 1}')]
    assert not decoder.pending


def test_an_oversized_event_is_refused() -> None:
    decoder = SSEDecoder(max_event_bytes=1024)
    decoder.feed(b"data: " + b"x" * 1000)
    with pytest.raises(SSEError):
        decoder.feed(b"x" * 100)


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_split_of_the_body_gives_the_same_events(cuts: list[int]) -> None:
    for body in (OPENAI_BODY, ANTHROPIC_BODY, ANTHROPIC_BODY.replace(b"\n", b"\r\n")):
        chunks, rest = [], body
        for cut in cuts:
            chunks.append(rest[:cut])
            rest = rest[cut:]
        chunks.append(rest)
        assert decode_all(chunks) == decode_all([body])


def test_a_large_event_in_many_small_chunks() -> None:
    payload = b"x" * 300_000
    body = b"data: " + payload + b"\r\n\r\ndata: next\r\n\r\n"
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    assert decode_all(chunks) == [(b"", payload), (b"", b"next")]
