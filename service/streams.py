"""The sequencer: numbers a stream's events, guarantees its single terminal event, measures it.

It is the one place where the contract's stream guarantees are made, for every provider alike:
sequence 1 on Start and no gaps, exactly one Finish or Error last, usage that is never silently
0, and timing. Providers only yield neutral events; a provider stream that stops without its
`Finished` marker becomes an Error here, never a Finish.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import assert_never

from service.errors import (
    GatewayError,
    describe_exception,
    internal_error,
    new_correlation_id,
    stream_truncated,
)
from service.events import (
    CitationDelta,
    CitationLocation,
    EventStream,
    Finished,
    ProviderEvent,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from service.wire import duration, error_event
from tokenwire.v1 import generation_pb2 as pb

log = logging.getLogger("tokenwire.streams")

_FINISH_REASONS = {name.removeprefix("FINISH_REASON_").lower(): v for name, v in pb.FinishReason.items()}
_LOCATIONS = {
    location: pb.CitationLocationType.Value("CITATION_LOCATION_TYPE_" + location.name) for location in CitationLocation
}
# The Start message of each (route, provider, upstream model): routes are few and fixed, but a
# fallback's model is one more key, so the cache is bounded anyway.
_START_TEMPLATES: dict[tuple[str, str, str], pb.GenerateResponse] = {}
_MAX_START_TEMPLATES = 1024
# Rough characters per token, used only when a provider reports no usage at all.
_CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What the Start event says, and when the request arrived."""

    stream_id: str
    route: str
    provider: str
    upstream_model: str
    received_at: float  # time.monotonic() at request receipt
    create_time: datetime
    prompt_chars: int
    # Durable streams only: the capability Resume, Poll and Cancel need, and the window granted.
    resume_token: str = ""
    resume_window: float | None = None


class Sequencer:
    """Turns one provider stream into the contract's sequenced GenerateResponse messages.

    After iteration, `failure` holds the error the stream ended with (None after Finish), so the
    gRPC layer can make the status mirror the terminal event.
    """

    def __init__(self, info: StreamInfo) -> None:
        self.info = info
        self.sequence = 0
        self.failure: GatewayError | None = None
        self.finish: pb.Finish | None = None
        self.first_delta_at: float | None = None
        self.output_chars = 0

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    def start_message(self) -> pb.GenerateResponse:
        info = self.info
        # What every stream of a route says alike is built once (4.2 -> 1.1 us a stream); only
        # the stream's own fields are set on a copy.
        key = (info.route, info.provider, info.upstream_model)
        template = _START_TEMPLATES.get(key)
        if template is None:
            template = pb.GenerateResponse(start=pb.Start(route=key[0], provider=key[1], upstream_model=key[2]))
            if len(_START_TEMPLATES) < _MAX_START_TEMPLATES:
                _START_TEMPLATES[key] = template
        message = pb.GenerateResponse()
        message.CopyFrom(template)
        message.sequence = self._next()
        start = message.start
        start.stream_id = info.stream_id
        # FromDatetime's arithmetic, for the aware UTC datetime every door gives: whole seconds
        # since the epoch and the microseconds.
        created = info.create_time
        start.create_time.seconds = int(created.timestamp())
        start.create_time.nanos = created.microsecond * 1000
        if info.resume_token:
            start.resume_token = info.resume_token
        if info.resume_window is not None:
            start.resume_window.CopyFrom(duration(info.resume_window))
        return message

    def message(self, event: ProviderEvent) -> pb.GenerateResponse | None:
        """The message for one provider event; None for an event that carries nothing.

        A `Finished` event becomes the Finish message, after which the stream is over.
        """
        if isinstance(event, TextDelta):
            if not event.text:
                return None
            self._delta(len(event.text))
            return pb.GenerateResponse(sequence=self._next(), text_delta=pb.TextDelta(text=event.text))
        if isinstance(event, ToolCallDelta):
            self._delta(len(event.arguments))
            return pb.GenerateResponse(
                sequence=self._next(),
                tool_call_delta=pb.ToolCallDelta(
                    index=event.index, id=event.id, name=event.name, arguments_delta=event.arguments
                ),
            )
        if isinstance(event, ReasoningDelta):
            self._delta(len(event.text))
            return pb.GenerateResponse(
                sequence=self._next(),
                reasoning_delta=pb.ReasoningDelta(
                    text=event.text, signature=event.signature, redacted_data=event.redacted_data
                ),
            )
        if isinstance(event, Finished):
            self.finish = self._finish(event)
            return pb.GenerateResponse(sequence=self._next(), finish=self.finish)
        if isinstance(event, CitationDelta):
            # Last: a citation is rare, and costs nothing on the way to the common events.
            return pb.GenerateResponse(sequence=self._next(), citation_delta=_citation(event))
        assert_never(event)

    def heartbeat_message(self) -> pb.GenerateResponse:
        return pb.GenerateResponse(sequence=self._next(), heartbeat=pb.Heartbeat())

    def error_message(self, failure: GatewayError) -> pb.GenerateResponse:
        """The terminal Error event; everything before it is complete and can be trusted."""
        self.failure = failure
        last = self.sequence
        return pb.GenerateResponse(sequence=self._next(), error=error_event(failure, last))

    def _delta(self, chars: int) -> None:
        if self.first_delta_at is None:
            self.first_delta_at = time.monotonic()
        self.output_chars += chars

    def _finish(self, event: Finished) -> pb.Finish:
        now = time.monotonic()
        usage = self._usage(event.usage)
        timing = pb.Timing(total_duration=duration(now - self.info.received_at))
        if self.first_delta_at is not None:
            timing.time_to_first_token.CopyFrom(duration(self.first_delta_at - self.info.received_at))
            generating = now - self.first_delta_at
            if usage.HasField("output_tokens") and usage.output_tokens and generating > 0:
                timing.output_tokens_per_second = usage.output_tokens / generating
        return pb.Finish(
            reason=_FINISH_REASONS.get(event.reason.value, pb.FINISH_REASON_OTHER),
            raw_reason=event.raw_reason,
            stop_sequence=event.stop_sequence,
            usage=usage,
            timing=timing,
            provider_request_id=event.provider_request_id,
            provider_model=event.provider_model,
        )

    def _usage(self, reported: Usage | None) -> pb.Usage:
        if reported is None:
            # Never report an unknown count as 0: estimate, and say so.
            return pb.Usage(
                input_tokens=math.ceil(self.info.prompt_chars / _CHARS_PER_TOKEN),
                output_tokens=math.ceil(self.output_chars / _CHARS_PER_TOKEN),
                source=pb.USAGE_SOURCE_ESTIMATED,
            )
        usage = pb.Usage(source=pb.USAGE_SOURCE_PROVIDER)
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_write_input_tokens",
            "reasoning_tokens",
        ):
            value = getattr(reported, name)
            if value is not None:
                setattr(usage, name, value)
        return usage


# How far the reader may get ahead of the writer: events, and characters of delta text in them.
# Past either, a caller that reads slowly stalls the provider's socket instead of growing our memory.
BUFFER_EVENTS = 64
BUFFER_CHARS = 64 * 1024
# The most delta text merged into one message (see Relay._merge_queued).
MERGE_MAX_CHARS = 4096


class Relay:
    """Relays one opened provider stream as the contract's messages, one terminal event last.

    The provider is read by a task of its own, at most BUFFER_EVENTS events (and BUFFER_CHARS
    characters of delta text) ahead of the writer, so that reading upstream and writing to the
    caller overlap, but a slow caller slows the provider down rather than filling memory. The
    provider's stream is closed on every path out: a finish, an error, `stop()`, or the caller's
    cancel.

    - `heartbeat_interval`: after that many seconds with nothing to send, a Heartbeat message,
      so that proxies with idle timeouts keep the stream open through long upstream silences.
    - `stop(error)`: ends the stream with that Error at once if the writer waits for the
      provider, or right after the write in flight returns.
    """

    def __init__(
        self,
        sequencer: Sequencer,
        first: ProviderEvent,
        events: EventStream,
        *,
        heartbeat_interval: float | None = None,
    ) -> None:
        self.sequencer = sequencer
        self._events = events
        # Provider events not yet written; a GatewayError or None (the provider's stream ended
        # without its end marker) is the reader's last entry.
        self._pending: deque[ProviderEvent | GatewayError | None] = deque((first,))
        self._pending_chars = _chars(first)
        self._heartbeat_interval = heartbeat_interval
        self._stopped: GatewayError | None = None
        self._beat = False
        self._last_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reader: asyncio.Task[None] | None = None
        # Set while the writer waits for the reader, and while the reader waits for room.
        self._writer_waiting: asyncio.Future[None] | None = None
        self._reader_waiting: asyncio.Future[None] | None = None

    async def aclose(self) -> None:
        """Closes the provider's stream, if it is still open; safe to call more than once.

        After the Finish went out, the reader may still be reading what is left of the body
        (briefly, so that the connection can be reused): the caller's status need not wait.
        Otherwise the reader is cancelled, and waited for even if this task is cancelled too,
        so that no provider stream outlives its caller.
        """
        reader = self._reader
        if reader is not None and self.sequencer.finish is not None:
            if not reader.done():
                _FINISHING.add(reader)
                reader.add_done_callback(_FINISHING.discard)
            return
        cancelled = False
        if reader is not None:
            reader.cancel()
            while not reader.done():
                try:
                    await asyncio.wait((reader,))
                except asyncio.CancelledError:
                    cancelled = True
        # A reader cancelled before it first ran never reached its own `finally`: closing an
        # already closed stream does nothing, so close it here in every case.
        await self._events.aclose()
        if cancelled:
            raise asyncio.CancelledError

    def stop(self, failure: GatewayError) -> None:
        """Ends the stream with `failure` as soon as no write is in flight."""
        if self._stopped is None:
            self._stopped = failure
            _wake(self._writer_waiting)

    async def messages(self) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Start, the deltas (and heartbeats), then one Finish or Error."""
        loop = asyncio.get_running_loop()
        sequencer = self.sequencer
        self._reader = loop.create_task(self._read(), name=f"provider reader {sequencer.info.stream_id}")
        if self._heartbeat_interval:
            self._timer = loop.call_later(self._heartbeat_interval, self._heartbeat_due, loop)
        pending = self._pending
        try:
            self._last_sent = loop.time()
            yield sequencer.start_message()
            while self._stopped is None:
                if not pending:
                    if self._beat:
                        self._beat = False
                        self._last_sent = loop.time()
                        yield sequencer.heartbeat_message()
                        continue
                    waiting = self._writer_waiting = loop.create_future()
                    try:
                        await waiting
                    finally:
                        self._writer_waiting = None
                    continue
                item = pending.popleft()
                self._pending_chars -= _chars(item)
                if pending and isinstance(item, TextDelta | ReasoningDelta | ToolCallDelta):
                    item = self._merge_queued(item)
                _wake(self._reader_waiting)
                if item is None:
                    self._stopped = stream_truncated(sequencer.info.provider)
                    break
                if isinstance(item, GatewayError):
                    self._stopped = item
                    break
                message = sequencer.message(item)
                if message is not None:
                    self._last_sent = loop.time()
                    self._beat = False  # a heartbeat due in the same instant is news no more
                    yield message
                    if sequencer.finish is not None:
                        return
        finally:
            if self._timer is not None:
                self._timer.cancel()
            await self.aclose()
        failure = self._stopped
        assert failure is not None
        yield sequencer.error_message(failure)

    def _merge_queued(self, item: TextDelta | ReasoningDelta | ToolCallDelta) -> ProviderEvent:
        """Folds the deltas of the same kind that queued behind `item` into one event.

        Only what queued while the previous write was in flight is here, so nothing is delayed to
        be merged; and one message then carries what would have cost a write each. A tool call's
        pieces merge only within the same call, reasoning only up to a signature. A merged event
        stays under MERGE_MAX_CHARS, so that one message never grows large.
        """
        pending = self._pending
        parts: list[str] = []
        size = _chars(item)

        def room(nxt: ProviderEvent | GatewayError | None) -> bool:
            return size + _chars(nxt) <= MERGE_MAX_CHARS

        if isinstance(item, TextDelta):
            while pending and isinstance(nxt := pending[0], TextDelta) and room(nxt):
                parts.append(nxt.text)
                size += len(nxt.text)
                pending.popleft()
            merged: ProviderEvent = TextDelta(item.text + "".join(parts)) if parts else item
        elif isinstance(item, ReasoningDelta):
            while (
                not item.signature
                and not item.redacted_data
                and pending
                and isinstance(nxt := pending[0], ReasoningDelta)
                and not nxt.signature
                and not nxt.redacted_data
                and room(nxt)
            ):
                parts.append(nxt.text)
                size += len(nxt.text)
                pending.popleft()
            merged = ReasoningDelta(item.text + "".join(parts)) if parts else item
        else:
            while (
                pending
                and isinstance(nxt := pending[0], ToolCallDelta)
                and nxt.index == item.index
                and not nxt.id
                and not nxt.name
                and room(nxt)
            ):
                parts.append(nxt.arguments)
                size += len(nxt.arguments)
                pending.popleft()
            merged = ToolCallDelta(item.index, item.id, item.name, item.arguments + "".join(parts)) if parts else item
        self._pending_chars -= sum(map(len, parts))
        return merged

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending
        try:
            async for event in self._events:
                pending.append(event)
                self._pending_chars += _chars(event)
                _wake(self._writer_waiting)
                if isinstance(event, Finished):
                    return
                while len(pending) >= BUFFER_EVENTS or self._pending_chars >= BUFFER_CHARS:
                    waiting = self._reader_waiting = loop.create_future()
                    try:
                        await waiting
                    finally:
                        self._reader_waiting = None
            pending.append(None)
        except GatewayError as err:
            pending.append(err)
        except Exception as exc:
            correlation_id = new_correlation_id()
            log.error(
                "internal error %s in stream %s: %s",
                correlation_id,
                self.sequencer.info.stream_id,
                describe_exception(exc),
            )
            pending.append(internal_error(correlation_id))
        finally:
            _wake(self._writer_waiting)
            await self._events.aclose()

    def _heartbeat_due(self, loop: asyncio.AbstractEventLoop) -> None:
        interval = self._heartbeat_interval
        assert interval is not None
        now = loop.time()
        due = self._last_sent + interval
        if now >= due:
            # Only while the writer waits for the provider: a write in flight is news enough.
            if self._writer_waiting is not None:
                self._beat = True
                _wake(self._writer_waiting)
            due = now + interval
        self._timer = loop.call_at(due, self._heartbeat_due, loop)


def _citation(event: CitationDelta) -> pb.CitationDelta:
    return pb.CitationDelta(
        text_start=event.text_start,
        text_end=event.text_end,
        cited_text=event.cited_text,
        document_index=event.document_index,
        document_title=event.document_title,
        location_type=_LOCATIONS[event.location],
        start_index=event.start_index,
        end_index=event.end_index,
        url=event.url,
    )


# Readers finishing the body after their stream's Finish went out; held so they are not collected.
_FINISHING: set[asyncio.Task[None]] = set()


def _chars(item: ProviderEvent | GatewayError | None) -> int:
    if isinstance(item, TextDelta | ReasoningDelta):
        return len(item.text)
    if isinstance(item, ToolCallDelta):
        return len(item.arguments)
    return 0


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
