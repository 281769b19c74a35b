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


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True, slots=True)
class ReasoningBlock:
    text: str
    signature: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    reasoning: tuple[ReasoningBlock, ...] = ()


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


ProviderEvent = TextDelta | ReasoningDelta | ToolCallDelta | Finished
# What a provider returns for one response; the consumer closes it with aclose().
EventStream = AsyncGenerator[ProviderEvent, None]
