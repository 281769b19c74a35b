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


BOM = b"\xef\xbb\xbf"


def decode_all(chunks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Every event of a body, as an adapter's read loop gets them: each chunk's, then the end's."""
    decoder = SSEDecoder()
    events = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def splits(body: bytes, cuts: list[int]) -> list[bytes]:
    chunks, rest = [], body
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    return chunks


def test_bare_data_frames() -> None:
    assert decode_all([OPENAI_BODY]) == [(b"", b'{"a":1}'), (b"", b'{"a":2}'), (b"", b"[DONE]")]


def test_named_events() -> None:
    assert [name for name, _ in decode_all([ANTHROPIC_BODY])] == [b"message_start", b"ping", b"content_block_delta"]


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_ends(newline: bytes) -> None:
    body = ANTHROPIC_BODY.replace(b"\n", newline)
    # A CR at the end of what has arrived may be half of a CRLF: the next byte settles it, and
    # when none comes, the end of the body does.
    assert decode_all([body]) == decode_all([ANTHROPIC_BODY])
    assert decode_all([body, b"\n"]) == decode_all([ANTHROPIC_BODY])


def test_the_end_of_the_body_completes_an_event_whose_last_line_end_is_a_cr() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\r") == []
    assert decoder.close() == [(b"", b"x")]
    assert not decoder.pending


def test_the_end_of_the_body_does_not_complete_an_unfinished_event() -> None:
    # An event without its blank line is not dispatched (the specification's rule): the adapter
    # sees no end marker and reports the stream as truncated.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.close() == []
    assert decoder.pending


@pytest.mark.parametrize("cut", range(1, 4))
def test_a_leading_bom_is_stripped_however_it_is_split(cut: int) -> None:
    body = BOM + OPENAI_BODY
    assert decode_all([body[:cut], body[cut:]]) == decode_all([OPENAI_BODY])
    assert decode_all([body[i : i + 1] for i in range(len(body))]) == decode_all([OPENAI_BODY])


def test_only_the_leading_bom_is_stripped() -> None:
    assert decode_all([BOM + b"data: " + BOM + b"x\n\n"]) == [(b"", BOM + b"x")]
    # A second BOM is no BOM any more: it is part of the field name, an unknown field.
    assert decode_all([BOM + BOM + b"data: x\n\n"]) == []


@pytest.mark.parametrize("body", [b"\xef", b"\xef\xbb", b"\xef\xbbdata: x\n\n"])
def test_bytes_that_only_begin_like_a_bom_are_kept(body: bytes) -> None:
    # Not stripped: they stay the start of the first line, whose field is then no `data`.
    decoder = SSEDecoder()
    assert decoder.feed(body) + decoder.close() == []
    assert decoder.pending == (len(body) < 3)


@pytest.mark.parametrize("blank", [b"data:", b"data: ", b"data:\ndata:", b"event: ping\ndata:", b"data:\nid: 1"])
def test_an_event_with_empty_data_is_skipped(blank: bytes) -> None:
    # Nothing a vendor means to send: skipped, not handed to a JSON parser as an empty document.
    assert decode_all([blank + b"\n\n" + OPENAI_BODY]) == decode_all([OPENAI_BODY])
    assert decode_all([b"data: 1\n\n" + blank + b"\n\ndata: 2\n\n"]) == [(b"", b"1"), (b"", b"2")]


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
    expected = {OPENAI_BODY: decode_all([OPENAI_BODY]), ANTHROPIC_BODY: decode_all([ANTHROPIC_BODY])}
    for plain, events in expected.items():
        for newline in (b"\n", b"\r\n", b"\r"):
            for bom in (b"", BOM):
                body = bom + plain.replace(b"\n", newline)
                assert decode_all(splits(body, cuts)) == events


def test_a_large_event_in_many_small_chunks() -> None:
    payload = b"x" * 300_000
    body = b"data: " + payload + b"\r\n\r\ndata: next\r\n\r\n"
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    assert decode_all(chunks) == [(b"", payload), (b"", b"next")]
