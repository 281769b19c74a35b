"""An incremental text/event-stream decoder for provider response bodies.

The vendor SDKs' own stream iterators build a model object per chunk, which costs more CPU than
the whole relay budget. Adapters instead feed the raw body bytes through this decoder and parse
each event's data with a fast JSON parser. It follows the parts of the SSE specification that
LLM APIs use: events end at a blank line, `data:` lines join with a newline, `event:` names the
event, comment lines (`:`) and `id:`/`retry:` fields are ignored, LF, CRLF and CR all end a
line, and a UTF-8 BOM that starts the body is stripped. Each byte is examined a bounded number of
times, however the events are split into chunks.

Two choices of ours: an event whose data is blank is skipped rather than dispatched (no vendor
sends one on purpose, and there is no JSON in it to parse), and `close()` ends the body, so a
line end that only the end of the body can settle (a last CR) still completes its event.
"""

from __future__ import annotations

from collections.abc import Callable

from service.providers.framing import FramingError

# An event larger than this is no LLM chunk: the upstream is broken or hostile.
MAX_EVENT_BYTES = 8 * 1024 * 1024

SSEEvent = tuple[bytes, bytes]  # (event name, b"" when unnamed; data, never blank)

_BOM = b"\xef\xbb\xbf"


class SSEError(FramingError):
    """The body is not a usable event stream (an event beyond MAX_EVENT_BYTES)."""


class SSEDecoder:
    """Feed it body chunks as they arrive; it returns the events each chunk completed. When the
    body has ended, `close()` returns the events its end completed.

    A vendor whose events need more of the specification than the LLM APIs' common part (ids,
    blank data) subclasses it with its own `parse_block`: the framing (line ends, BOM, blank
    lines, the size bound) stays this one.
    """

    __slots__ = ("_at_start", "_buffer", "_held_cr", "max_event_bytes")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        # The start of an event whose blank line has not arrived yet, line ends already LF. At
        # the start of the body, the bytes that may yet turn out to be a BOM.
        self._buffer = bytearray()
        # A CR that ended the previous chunk: half of a CRLF, or a line end of its own.
        self._held_cr = False
        # No byte of the body has been decoded yet: a BOM there is to be stripped.
        self._at_start = True
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._at_start:
            chunk = self._strip_bom(chunk)
            if self._at_start:
                return []
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if b"\r" in chunk:
            # Keep a trailing CR back: with the next chunk's LF it is one line end, not two.
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._held_cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer
        if not buffer:
            # The usual case: the chunk starts at an event boundary.
            end = chunk.find(b"\n\n")
            if end < 0:
                self._keep(chunk)
                return []
            events: list[SSEEvent] = []
            start = _split(chunk, 0, end, events, self.parse_block)
            if start < len(chunk):
                self._keep(chunk[start:])
            return events
        # A blank line may straddle the old bytes and the new: search from the last old byte.
        search_from = len(buffer) - 1
        buffer += chunk
        end = buffer.find(b"\n\n", search_from)
        if end < 0:
            self._check_size()
            return []
        data = bytes(buffer)
        events = []
        start = _split(data, 0, end, events, self.parse_block)
        del buffer[:start]
        self._check_size()
        return events

    def close(self) -> list[SSEEvent]:
        """The events that the end of the body completes; call it once, after the last chunk.

        A CR held back as maybe half of a CRLF is a line end of its own after all, and may be the
        one that ends the last event. An event still without its blank line is not dispatched
        (the specification's rule): its bytes stay `pending`.
        """
        # Bytes held as the start of a BOM that never completed are the start of an event.
        self._at_start = False
        if self._held_cr:
            return self.feed(b"\n")
        return []

    def _strip_bom(self, chunk: bytes) -> bytes:
        """The chunk without the body's leading BOM, once the first bytes settle whether it has one;
        b"" while they do not (the BOM may be split between chunks)."""
        head = bytes(self._buffer) + chunk if self._buffer else chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._buffer[:] = head
            return b""
        self._buffer.clear()
        self._at_start = False
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _keep(self, rest: bytes) -> None:
        self._buffer += rest
        self._check_size()

    def _check_size(self) -> None:
        if len(self._buffer) > self.max_event_bytes:
            raise SSEError(f"an event exceeds {self.max_event_bytes} bytes")

    @staticmethod
    def parse_block(block: bytes) -> SSEEvent | None:
        """One event's lines (LF-separated, the blank line excluded) as (name, data); None for a
        block that is not dispatched."""
        return _parse_block(block)

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished event are buffered (the body stopped mid-event)."""
        return bool(self._buffer.strip())


def _split(
    data: bytes, start: int, end: int, events: list[SSEEvent], parse_block: Callable[[bytes], SSEEvent | None]
) -> int:
    """Appends the complete events of `data` from `start`, whose first blank line is at `end`;
    returns where the unfinished rest begins."""
    while end >= 0:
        block = data[start:end]
        start = end + 2
        # The shape nearly every LLM chunk has: one `data: ` line holding a JSON object and nothing
        # else (so its data is never blank, and costs no check for it).
        if block.startswith(b"data: {") and b"\n" not in block:
            events.append((b"", block[6:]))
        elif block:
            event = parse_block(block)
            if event is not None:
                events.append(event)
        end = data.find(b"\n\n", start)
    return start


def _parse_block(block: bytes) -> SSEEvent | None:
    name = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    joined = b"\n".join(data)
    if not joined or joined.isspace():
        # An event without data is not dispatched (the specification's rule); Anthropic sends none.
        # One whose data is blank is dispatched by the specification, but carries nothing: no
        # vendor sends one on purpose, so it is skipped rather than failed as unparsable.
        return None
    return name, joined
