"""Typed views of the tokenwire wire messages.

The client never hands protobuf messages to callers: every field that has presence on
the wire (usage counts, time to first token, tokens per second) becomes ``None`` when
unset, because "unknown" and 0 mean different things.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from google.protobuf import duration_pb2

from tokenwire.v1 import generation_pb2 as pb

from ._errors import ResponseParseError


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


class FinishReason(StrEnum):
    """Why the model stopped, normalized across providers."""

    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    REFUSAL = "refusal"
    CANCELLED = "cancelled"
    OTHER = "other"

    @classmethod
    def from_proto(cls, value: int) -> FinishReason:
        # A reason added to the contract after this client was built is still a reason
        # the model stopped for: OTHER says so, and Finished.raw_reason has the detail.
        return _FINISH_REASONS.get(value, cls.OTHER)


_FINISH_REASONS: dict[int, FinishReason] = {
    pb.FINISH_REASON_UNSPECIFIED: FinishReason.UNSPECIFIED,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
    pb.FINISH_REASON_TOOL_CALLS: FinishReason.TOOL_CALLS,
    pb.FINISH_REASON_CONTENT_FILTER: FinishReason.CONTENT_FILTER,
    pb.FINISH_REASON_REFUSAL: FinishReason.REFUSAL,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    pb.FINISH_REASON_OTHER: FinishReason.OTHER,
}


class UsageSource(StrEnum):
    """Whether token counts were reported by the provider or estimated by the server."""

    UNSPECIFIED = "unspecified"
    PROVIDER = "provider"
    ESTIMATED = "estimated"

    @classmethod
    def from_proto(cls, value: int) -> UsageSource:
        return _USAGE_SOURCES.get(value, cls.UNSPECIFIED)


_USAGE_SOURCES: dict[int, UsageSource] = {
    pb.USAGE_SOURCE_PROVIDER: UsageSource.PROVIDER,
    pb.USAGE_SOURCE_ESTIMATED: UsageSource.ESTIMATED,
}


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a whole request; ``None`` means the count is unknown."""

    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_write_input_tokens: int | None
    reasoning_tokens: int | None
    source: UsageSource

    @classmethod
    def from_proto(cls, usage: pb.Usage) -> Usage:
        return cls(
            input_tokens=usage.input_tokens if usage.HasField("input_tokens") else None,
            output_tokens=(usage.output_tokens if usage.HasField("output_tokens") else None),
            cache_read_input_tokens=(
                usage.cache_read_input_tokens if usage.HasField("cache_read_input_tokens") else None
            ),
            cache_write_input_tokens=(
                usage.cache_write_input_tokens if usage.HasField("cache_write_input_tokens") else None
            ),
            reasoning_tokens=(usage.reasoning_tokens if usage.HasField("reasoning_tokens") else None),
            source=UsageSource.from_proto(usage.source),
        )


@dataclass(frozen=True, slots=True)
class Timing:
    """Server-side timing of a request, in seconds."""

    time_to_first_token: float | None
    total_duration: float
    output_tokens_per_second: float | None

    @classmethod
    def from_proto(cls, timing: pb.Timing) -> Timing:
        return cls(
            time_to_first_token=(
                _seconds(timing.time_to_first_token) if timing.HasField("time_to_first_token") else None
            ),
            total_duration=_seconds(timing.total_duration),
            output_tokens_per_second=(
                timing.output_tokens_per_second if timing.HasField("output_tokens_per_second") else None
            ),
        )


@dataclass(frozen=True, slots=True)
class Started:
    """The stream began; names the provider that serves it, after any fallback.

    On a durable stream, ``resume_token`` (with ``stream_id``) is what Resume, Poll and Cancel
    need, and ``resume_window`` the seconds the server granted; "" and None on an ephemeral one.
    The token is a capability: it is left out of the repr, so that logging an event leaks nothing.
    """

    sequence: int
    stream_id: str
    route: str
    provider: str
    upstream_model: str
    create_time: datetime
    resume_token: str = field(default="", repr=False)
    resume_window: float | None = None

    @property
    def durable(self) -> bool:
        return bool(self.resume_token)

    @classmethod
    def from_proto(cls, sequence: int, start: pb.Start) -> Started:
        return cls(
            sequence=sequence,
            stream_id=start.stream_id,
            route=start.route,
            provider=start.provider,
            upstream_model=start.upstream_model,
            create_time=start.create_time.ToDatetime(tzinfo=UTC),
            resume_token=start.resume_token,
            resume_window=_seconds(start.resume_window) if start.HasField("resume_window") else None,
        )


@dataclass(frozen=True, slots=True)
class TextDelta:
    sequence: int
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of reasoning; ``redacted_data`` is a whole redacted block (text and signature "")."""

    sequence: int
    text: str
    signature: str
    redacted_data: str = ""


class CitationLocation(StrEnum):
    """How a citation's ``start_index`` and ``end_index`` locate the cited text."""

    UNSPECIFIED = "unspecified"
    CHARACTERS = "characters"
    PAGES = "pages"
    CONTENT_BLOCKS = "content_blocks"
    URL = "url"

    @classmethod
    def from_proto(cls, value: int) -> CitationLocation:
        # A location type added after this client was built is still a citation: UNSPECIFIED.
        return _LOCATIONS.get(value, cls.UNSPECIFIED)


_LOCATIONS: dict[int, CitationLocation] = {
    value: CitationLocation[name.removeprefix("CITATION_LOCATION_TYPE_")]
    for name, value in pb.CitationLocationType.items()
}


@dataclass(frozen=True, slots=True)
class Citation:
    """A source for the answer text from ``text_start`` to ``text_end`` (code points, end exclusive).

    ``document_index`` counts the request's document parts from 0; ``start_index`` and
    ``end_index`` locate ``cited_text`` in it as ``location`` says (pages from 1, end exclusive).
    """

    text_start: int
    text_end: int
    cited_text: str
    document_index: int
    document_title: str
    location: CitationLocation
    start_index: int
    end_index: int
    url: str

    @classmethod
    def from_proto(cls, c: pb.CitationDelta) -> Citation:
        return cls(
            text_start=c.text_start,
            text_end=c.text_end,
            cited_text=c.cited_text,
            document_index=c.document_index,
            document_title=c.document_title,
            location=CitationLocation.from_proto(c.location_type),
            start_index=c.start_index,
            end_index=c.end_index,
            url=c.url,
        )


@dataclass(frozen=True, slots=True)
class CitationDelta:
    sequence: int
    citation: Citation


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call; ``id`` and ``name`` are set on the first piece only."""

    sequence: int
    index: int
    id: str
    name: str
    arguments_delta: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    sequence: int


@dataclass(frozen=True, slots=True)
class Finished:
    sequence: int
    reason: FinishReason
    raw_reason: str
    stop_sequence: str
    usage: Usage
    timing: Timing
    # The provider's id of the request and the exact model snapshot that answered ("": unknown).
    provider_request_id: str = ""
    provider_model: str = ""

    @classmethod
    def from_proto(cls, sequence: int, finish: pb.Finish) -> Finished:
        return cls(
            sequence=sequence,
            reason=FinishReason.from_proto(finish.reason),
            raw_reason=finish.raw_reason,
            stop_sequence=finish.stop_sequence,
            usage=Usage.from_proto(finish.usage),
            timing=Timing.from_proto(finish.timing),
            provider_request_id=finish.provider_request_id,
            provider_model=finish.provider_model,
        )


Event = Started | TextDelta | ReasoningDelta | ToolCallDelta | CitationDelta | Heartbeat | Finished
"""A typed stream event. A terminal Error is not an event: it is raised instead."""


@dataclass(frozen=True, slots=True)
class ReasoningBlock:
    """Reasoning to send back with the next turn (``assistant(reasoning=...)``), as it came."""

    text: str
    signature: str
    redacted_data: str = ""


@dataclass(frozen=True, slots=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments_json: str

    def arguments(self) -> Any:
        """The decoded arguments; a call without argument text has no arguments."""
        return json.loads(self.arguments_json or "{}")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a stream has delivered so far, finished or not (after a failure, say)."""

    started: Started | None
    text: str
    reasoning: list[ReasoningBlock]
    tool_calls: list[ToolCall]
    last_sequence: int


@dataclass(frozen=True, slots=True)
class Response:
    """A whole response, assembled from a stream that ended with Finish."""

    stream_id: str
    route: str
    provider: str
    upstream_model: str
    text: str
    reasoning: list[ReasoningBlock]
    tool_calls: list[ToolCall]
    finish_reason: FinishReason
    raw_finish_reason: str
    stop_sequence: str
    usage: Usage
    timing: Timing
    last_sequence: int
    # Durable streams only (see Started); the token stays out of the repr.
    resume_token: str = field(default="", repr=False)
    resume_window: float | None = None
    citations: list[Citation] = field(default_factory=list)
    provider_request_id: str = ""
    provider_model: str = ""

    def parsed(self) -> Any:
        """The answer decoded as JSON, for a request with a JSON response format.

        Raises ResponseParseError when the text is not one JSON value (for example when the
        answer was cut short by max_output_tokens), with the text and where parsing failed.
        """
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as exc:
            excerpt = self.text[max(exc.pos - 30, 0) : exc.pos + 30]
            cut = (
                " (the answer was cut short by max_output_tokens)" if self.finish_reason is FinishReason.LENGTH else ""
            )
            raise ResponseParseError(
                f"the model's answer is not valid JSON{cut}: {exc.msg} at character {exc.pos} (near {excerpt!r})",
                text=self.text,
                finish_reason=self.finish_reason.value,
                position=exc.pos,
            ) from None


class StreamStatus(StrEnum):
    """Where a durable stream is in its life."""

    UNSPECIFIED = "unspecified"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def from_proto(cls, value: int) -> StreamStatus:
        return _STREAM_STATUSES.get(value, cls.UNSPECIFIED)


_STREAM_STATUSES: dict[int, StreamStatus] = {
    pb.STREAM_STATUS_RUNNING: StreamStatus.RUNNING,
    pb.STREAM_STATUS_FINISHED: StreamStatus.FINISHED,
    pb.STREAM_STATUS_FAILED: StreamStatus.FAILED,
    pb.STREAM_STATUS_CANCELLED: StreamStatus.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class StreamState:
    """A durable stream's state, as Poll and Cancel answer it."""

    stream_id: str
    status: StreamStatus
    last_sequence: int
    expire_time: datetime | None

    @property
    def ended(self) -> bool:
        return self.status in (StreamStatus.FINISHED, StreamStatus.FAILED, StreamStatus.CANCELLED)

    @classmethod
    def from_proto(cls, state: pb.StreamState) -> StreamState:
        return cls(
            stream_id=state.stream_id,
            status=StreamStatus.from_proto(state.status),
            last_sequence=state.last_sequence,
            expire_time=state.expire_time.ToDatetime(tzinfo=UTC) if state.HasField("expire_time") else None,
        )


@dataclass(frozen=True, slots=True)
class PollBatch:
    """One answer of the long-poll read.

    ``messages`` are the wire messages, in sequence order (a terminal Error among them is a
    message like any other here); ``events`` their typed events, without the Error. Poll
    again with ``after=next_after`` until ``terminal``.
    """

    messages: list[pb.GenerateResponse]
    events: list[Event]
    next_after: int
    terminal: bool
    state: StreamState

    @property
    def text(self) -> str:
        return "".join(event.text for event in self.events if isinstance(event, TextDelta))

    @property
    def error(self) -> pb.Error | None:
        """The terminal Error, when the batch ends with one."""
        last = self.messages[-1] if self.messages else None
        return last.error if last is not None and last.HasField("error") else None


@dataclass(frozen=True, slots=True)
class MediaSupport:
    """The parts of one kind a route accepts: media type -> the sources it may come from."""

    media_types: dict[str, frozenset[str]]
    max_part_bytes: int
    url_schemes: list[str]

    @classmethod
    def from_proto(cls, support: pb.MediaSupport) -> MediaSupport:
        return cls(
            media_types={
                t.media_type: frozenset(s for s, on in (("data", t.data), ("url", t.url), ("file_id", t.file_id)) if on)
                for t in support.media_types
            },
            max_part_bytes=support.max_part_bytes,
            url_schemes=list(support.url_schemes),
        )


_FORMAT_NAMES = {
    pb.RESPONSE_FORMAT_TYPE_TEXT: "text",
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
}


_PROMPT_CACHING: dict[int, str] = {
    value: name.removeprefix("PROMPT_CACHING_").lower() for name, value in pb.PromptCaching.items()
}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A route the server serves, to be named in ``model``, and what it accepts."""

    name: str
    provider: str
    upstream_model: str
    description: str
    supports_tools: bool
    supports_reasoning: bool
    fallbacks: list[str]
    images: MediaSupport | None = None
    documents: MediaSupport | None = None
    audio: MediaSupport | None = None
    # "none", "automatic" or "explicit" ("unspecified" from an older server).
    prompt_caching: str = "unspecified"
    cache_ttls: list[float] = field(default_factory=list)
    # "text", "json_object", "json_schema".
    response_formats: list[str] = field(default_factory=list)
    supports_citations: bool = False

    @classmethod
    def from_proto(cls, model: pb.Model) -> ModelInfo:
        return cls(
            name=model.name,
            provider=model.provider,
            upstream_model=model.upstream_model,
            description=model.description,
            supports_tools=model.supports_tools,
            supports_reasoning=model.supports_reasoning,
            fallbacks=list(model.fallbacks),
            images=MediaSupport.from_proto(model.images),
            documents=MediaSupport.from_proto(model.documents),
            audio=MediaSupport.from_proto(model.audio),
            prompt_caching=_PROMPT_CACHING.get(model.prompt_caching, "unspecified"),
            cache_ttls=[_seconds(ttl) for ttl in model.cache_ttls],
            response_formats=[_FORMAT_NAMES[f] for f in model.response_formats if f in _FORMAT_NAMES],
            supports_citations=model.supports_citations,
        )
