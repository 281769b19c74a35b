"""The sequencer: numbers a stream's events, guarantees its single terminal event, measures it.

It is the one place where the contract's stream guarantees are made, for every provider alike:
sequence 1 on Start and no gaps, exactly one Finish or Error last, usage that is never silently
0, and timing. Providers only yield neutral events; a provider stream that stops without its
`Finished` marker becomes an Error here, never a Finish.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime

from google.protobuf import timestamp_pb2

from service.errors import ErrorCode, GatewayError, describe_exception, internal_error, new_correlation_id
from service.events import (
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
        # True only while waiting for the provider's next event: shutdown may interrupt that.
        self.waiting_upstream = False

    @property
    def ended(self) -> bool:
        """Whether the terminal event has been produced."""
        return self.finish is not None or self.failure is not None

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence

    def start_message(self) -> pb.GenerateResponse:
        info = self.info
        create_time = timestamp_pb2.Timestamp()
        create_time.FromDatetime(info.create_time)
        return pb.GenerateResponse(
            sequence=self._next(),
            start=pb.Start(
                stream_id=info.stream_id,
                route=info.route,
                provider=info.provider,
                upstream_model=info.upstream_model,
                create_time=create_time,
            ),
        )

    async def run(self, first: ProviderEvent, events: EventStream) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Yields Start, the deltas, and one terminal event. Closes `events` on every path."""
        event: ProviderEvent | None = first
        start = self.start_message()
        try:
            yield start
            while True:
                if isinstance(event, TextDelta):
                    if event.text:
                        self._delta(len(event.text))
                        yield pb.GenerateResponse(sequence=self._next(), text_delta=pb.TextDelta(text=event.text))
                elif isinstance(event, ToolCallDelta):
                    self._delta(len(event.arguments))
                    yield pb.GenerateResponse(
                        sequence=self._next(),
                        tool_call_delta=pb.ToolCallDelta(
                            index=event.index, id=event.id, name=event.name, arguments_delta=event.arguments
                        ),
                    )
                elif isinstance(event, ReasoningDelta):
                    self._delta(len(event.text))
                    yield pb.GenerateResponse(
                        sequence=self._next(),
                        reasoning_delta=pb.ReasoningDelta(text=event.text, signature=event.signature),
                    )
                elif isinstance(event, Finished):
                    self.finish = self._finish(event)
                    yield pb.GenerateResponse(sequence=self._next(), finish=self.finish)
                    return
                self.waiting_upstream = True
                try:
                    event = await anext(events, None)
                finally:
                    self.waiting_upstream = False
                if event is None:
                    raise GatewayError(
                        ErrorCode.PROVIDER_STREAM_TRUNCATED,
                        "the provider's stream ended without its end marker",
                        provider=self.info.provider,
                    )
        except GatewayError as err:
            self.failure = err
        except Exception as exc:
            correlation_id = new_correlation_id()
            log.error(
                "internal error %s in stream %s: %s", correlation_id, self.info.stream_id, describe_exception(exc)
            )
            self.failure = internal_error(correlation_id)
        finally:
            await events.aclose()
        yield self.error_message(self.failure)

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
