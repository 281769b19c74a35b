"""Provider-neutral request and event types.

Provider adapters receive a `GenerationRequest` and yield `ProviderEvent`s; they know nothing about
gRPC. The gRPC layer converts the contract's messages to and from these types.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ToolChoiceMode(enum.StrEnum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    NAMED = "named"


class ReasoningEffort(enum.StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    REFUSAL = "refusal"
    CANCELLED = "cancelled"
    OTHER = "other"


class PartKind(enum.StrEnum):
    TEXT = "text"
    IMAGE = "image"
    DOCUMENT = "document"
    AUDIO = "audio"


class Source(enum.StrEnum):
    """Where a media part's content is."""

    DATA = "data"
    URL = "url"
    FILE_ID = "file_id"


@dataclass(frozen=True, slots=True)
class CacheMarker:
    """A prompt-cache breakpoint after the part that carries it."""

    # The shortest lifetime asked for, in seconds; None: the provider's default.
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a message's content. Media parts have exactly one of data, url, file_id."""

    kind: PartKind
    text: str = ""
    media_type: str = ""  # "" only with a url or file_id that named none
    data: bytes | None = None
    url: str = ""
    file_id: str = ""
    # Documents only.
    title: str = ""
    context: str = ""
    citations: bool = False
    cache: CacheMarker | None = None

    @property
    def source(self) -> Source | None:
        if self.data is not None:
            return Source.DATA
        if self.url:
            return Source.URL
        if self.file_id:
            return Source.FILE_ID
        return None


class ResponseFormatType(enum.StrEnum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    type: ResponseFormatType
    name: str = ""
    description: str = ""
    # A JSON Schema object (JSON_SCHEMA only).
    schema: dict[str, Any] = field(default_factory=dict)
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True, slots=True)
class ReasoningBlock:
    text: str
    signature: str
    # Reasoning the provider redacted: opaque, sent back as it came; text and signature are "".
    redacted_data: str = ""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    reasoning: tuple[ReasoningBlock, ...] = ()
    # The content as parts, when the caller sent parts (then `text` is ""), or when a cache
    # marker on the message needed its text as a part to carry it.
    parts: tuple[Part, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str = ""
    # A JSON Schema object; empty means the tool takes no arguments.
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    name: str = ""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One request as a provider sees it: the route's upstream model and the caller's options.

    Optional options are None when the caller left them unset: adapters send only what is set.
    """

    stream_id: str
    route: str
    upstream_model: str
    messages: tuple[ChatMessage, ...]
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    reasoning_effort: ReasoningEffort | None = None
    reasoning_budget_tokens: int | None = None
    # None: free text, the provider's default.
    response_format: ResponseFormat | None = None
    # The caller's deadline as a time.monotonic() value, or None when the caller set none.
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the provider reported them; None means the provider did not say."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_write_input_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ReasoningDelta:
    text: str
    signature: str = ""
    # A whole redacted reasoning block (text and signature are "" then).
    redacted_data: str = ""


class CitationLocation(enum.StrEnum):
    UNSPECIFIED = "unspecified"
    CHARACTERS = "characters"
    PAGES = "pages"
    CONTENT_BLOCKS = "content_blocks"
    URL = "url"


@dataclass(slots=True)
class CitationDelta:
    """A source for the answer text from `text_start` to `text_end` (code points, end exclusive)."""

    text_start: int
    text_end: int
    cited_text: str
    document_index: int = 0
    document_title: str = ""
    location: CitationLocation = CitationLocation.UNSPECIFIED
    start_index: int = 0
    end_index: int = 0
    url: str = ""


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class Finished:
    """The provider's own end marker: the only way a provider stream ends successfully."""

    reason: FinishReason
    raw_reason: str
    stop_sequence: str = ""
    usage: Usage | None = None
    # The provider's own request id and the exact model snapshot that answered, when it said.
    provider_request_id: str = ""
    provider_model: str = ""


ProviderEvent = TextDelta | ReasoningDelta | ToolCallDelta | Finished | CitationDelta
# What a provider returns for one response; the consumer closes it with aclose().
EventStream = AsyncGenerator[ProviderEvent, None]
