"""Framing decoders: what turns a response body's bytes into (name, payload) events for a read loop.

The read loop (`service.providers.upstream.HTTPProvider`) feeds each piece of the body as it
arrives and hands every completed event to the vendor's parser. Two framings exist today:
- server-sent events (`service.providers.sse.SSEDecoder`: name = the `event:` field, payload =
  the joined `data:` lines), used by OpenAI, Anthropic and watsonx.ai;
- AWS's `application/vnd.amazon.eventstream` (`EventStreamDecoder` here), used by Bedrock: binary
  messages with a prelude, typed headers, a payload and two CRC32s.
"""

from __future__ import annotations

import struct
import zlib
from typing import Protocol

Event = tuple[bytes, bytes]


class FramingError(Exception):
    """The body is not a usable stream in its framing (a bad checksum, an oversized event, ...).
    Its text says which, in words fit for a caller: it never quotes the body."""


class Framing(Protocol):
    def feed(self, chunk: bytes) -> list[Event]:
        """The events `chunk` completed."""
        ...

    def close(self) -> list[Event]:
        """The events the end of the body completed; raises FramingError when it ends mid-event."""
        ...


# The limits botocore enforces (botocore.eventstream): a frame beyond them is refused there too.
MAX_HEADERS_BYTES = 128 * 1024
MAX_PAYLOAD_BYTES = 24 * 1024 * 1024
_PRELUDE = struct.Struct(">III")
_PRELUDE_BYTES = 12
# Fixed sizes of the header value types that carry no length of their own.
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
_STRING, _BYTES = 7, 6
# Event names for the two kinds of message that are not events: the vendor's modelled
# exceptions (`:message-type: exception`, named by `:exception-type`) and untyped errors
# (`:message-type: error`, with `:error-code` and `:error-message` headers, no payload).
EXCEPTION_PREFIX = b"exception:"
ERROR_PREFIX = b"error:"


class EventStreamDecoder:
    """AWS event-stream messages -> (name, payload). Each message is checked whole: its prelude CRC
    (over the two lengths) and its message CRC (over everything before it) must match, or the
    body is broken and FramingError says so. Events are named by `:event-type`; see
    EXCEPTION_PREFIX and ERROR_PREFIX for the others."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[Event] = []
        start, size = 0, len(buffer)
        while size - start >= _PRELUDE_BYTES:
            total, headers_length, prelude_crc = _PRELUDE.unpack_from(buffer, start)
            if zlib.crc32(buffer[start : start + 8]) != prelude_crc:
                raise FramingError("an event-stream message's prelude checksum does not match")
            if headers_length > MAX_HEADERS_BYTES or total - headers_length - 16 > MAX_PAYLOAD_BYTES:
                raise FramingError("an event-stream message is larger than the framing allows")
            if total < 16 + headers_length:
                raise FramingError("an event-stream message's lengths contradict each other")
            if size - start < total:
                break
            end = start + total
            message_crc = int.from_bytes(buffer[end - 4 : end], "big")
            if zlib.crc32(buffer[start + 8 : end - 4], prelude_crc) != message_crc:
                raise FramingError("an event-stream message's checksum does not match")
            headers_end = start + _PRELUDE_BYTES + headers_length
            events.append(_event(_headers(buffer, start + _PRELUDE_BYTES, headers_end), buffer[headers_end : end - 4]))
            start = end
        self._buffer = buffer[start:] if start < size else b""
        return events

    def close(self) -> list[Event]:
        if self._buffer:
            self._buffer = b""
            raise FramingError("the event stream ended in the middle of a message")
        return []


def _headers(buffer: bytes, at: int, end: int) -> dict[bytes, bytes]:
    """The string (and bytes) headers; the other types are skipped: no event of ours uses them."""
    headers: dict[bytes, bytes] = {}
    try:
        while at < end:
            name_length = buffer[at]
            name = buffer[at + 1 : at + 1 + name_length]
            at += 1 + name_length
            kind = buffer[at]
            at += 1
            if kind in (_STRING, _BYTES):
                length = int.from_bytes(buffer[at : at + 2], "big")
                headers[name] = buffer[at + 2 : at + 2 + length]
                at += 2 + length
            else:
                at += _FIXED[kind]
    except (IndexError, KeyError):
        raise FramingError("an event-stream message has a header it cannot be read by") from None
    if at != end:
        raise FramingError("an event-stream message's headers overrun their length")
    return headers


def _event(headers: dict[bytes, bytes], payload: bytes) -> Event:
    kind = headers.get(b":message-type", b"event")
    if kind == b"event":
        return headers.get(b":event-type", b""), payload
    if kind == b"exception":
        return EXCEPTION_PREFIX + headers.get(b":exception-type", b""), payload
    return ERROR_PREFIX + headers.get(b":error-code", b""), headers.get(b":error-message", b"")


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message with string headers (for fakes and tests; the gateway only reads)."""
    encoded = b"".join(
        bytes([len(n := name.encode())]) + n + bytes([_STRING]) + len(v := value.encode()).to_bytes(2, "big") + v
        for name, value in headers.items()
    )
    total = _PRELUDE_BYTES + len(encoded) + len(payload) + 4
    lengths = struct.pack(">II", total, len(encoded))
    prelude = lengths + zlib.crc32(lengths).to_bytes(4, "big")
    body = prelude + encoded + payload
    return body + zlib.crc32(body[8:], zlib.crc32(lengths)).to_bytes(4, "big")
