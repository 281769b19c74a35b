"""An incremental text/event-stream decoder for provider response bodies.

The vendor SDKs' own stream iterators build a model object per chunk, which costs more CPU than
the whole relay budget. Adapters instead feed the raw body bytes through this decoder and parse
each event's data with a fast JSON parser. It follows the parts of the SSE specification that
LLM APIs use: events end at a blank line, `data:` lines join with a newline, `event:` names the
event, comment lines (`:`) and `id:`/`retry:` fields are ignored, and LF, CRLF and CR all end a
line.
"""

from __future__ import annotations

# An event larger than this is no LLM chunk: the upstream is broken or hostile.
MAX_EVENT_BYTES = 8 * 1024 * 1024

SSEEvent = tuple[bytes, bytes]  # (event name, b"" when unnamed; data)


class SSEError(Exception):
    """The body is not a usable event stream (an event beyond MAX_EVENT_BYTES)."""


class SSEDecoder:
    """Feed it body chunks as they arrive; it returns the events each chunk completed."""

    __slots__ = ("_buffer", "max_event_bytes")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        held = b""
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF split across two chunks:
            # keep it back, or "\r" + "\n\n" would read as two line ends, i.e. a blank line.
            if buffer.endswith(b"\r"):
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[SSEEvent] = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            block = buffer[start:end]
            start = end + 2
            # The shape nearly every LLM chunk has: one `data: ` line and nothing else.
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append((b"", block[6:]))
            elif block:
                event = _parse_block(block)
                if event is not None:
                    events.append(event)
        rest = buffer[start:] + held if start else buffer + held
        if len(rest) > self.max_event_bytes:
            raise SSEError(f"an event exceeds {self.max_event_bytes} bytes")
        self._buffer = rest
        return events

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished event are buffered (the body stopped mid-event)."""
        return bool(self._buffer.strip())


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
    if not data:
        # An event without data is not dispatched (the specification's rule); Anthropic sends none.
        return None
    return name, b"\n".join(data)
