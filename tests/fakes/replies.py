"""Vendor-neutral scripts for what a fake provider answers; each fake renders them in its own wire format."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

FAULTS: Final[frozenset[str]] = frozenset({"error_event", "reset", "stall", "eof", "malformed", "truncated_chunk"})


@dataclass
class ToolCallScript:
    """One tool call: its arguments JSON text is streamed piece by piece, in order."""

    id: str
    name: str
    arguments: Sequence[str]

    def __post_init__(self) -> None:
        if isinstance(self.arguments, str):
            raise TypeError("ToolCallScript.arguments takes a sequence of pieces, not one string")


@dataclass
class Usage:
    """Token counts, sent as-is (OpenAI `prompt_tokens` counts cached tokens too; Anthropic `input_tokens` does not)."""

    input_tokens: int = 12
    output_tokens: int = 7
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None  # Anthropic only (cache_creation_input_tokens)
    reasoning_tokens: int | None = None  # OpenAI reasoning_tokens; Anthropic output_tokens_details.thinking_tokens


@dataclass
class StreamReply:
    """A successful answer: `text/event-stream` when the request asked for `"stream": true`, else one JSON body.

    Delta frames are the scripted pieces (one per reasoning, text and tool-argument piece), so a vendor-neutral
    `fault_after` means the same point in both formats. `interval` is slept before every delta frame but the first;
    `first_delay` before the first frame after the response headers. With `events_per_write` > 1 the frames of one
    write wait for the sum of their delays, then go out together as one HTTP chunk.

    A fault goes right after delta frame number `fault_after`; with `fault_after=0`, right before the first delta
    (after the opening frames); when the reply has no more than `fault_after` deltas, right before the vendor's end
    marker. `completed` in the record means the script ran to its end (fault included) before the client left.

    `rewrite(index, frame)` replaces each rendered frame's bytes before anything is planned, for framings a
    vendor's format allows but the renderer never writes (a BOM, CR line ends, an extra or a missing event);
    a frame rewritten to b"" is dropped.
    """

    text: Sequence[str] = ("Hello", ", world", "!")
    reasoning: Sequence[str] = ()
    signature: str = "sig-1"
    # Anthropic only: `redacted_thinking` blocks' data, sent before everything else; and
    # citation objects sent as `citations_delta`s in the text block, after its text.
    redacted: Sequence[str] = ()
    citations: Sequence[Mapping[str, object]] = ()
    tool_calls: Sequence[ToolCallScript] = ()
    finish: str | None = None
    stop_sequence: str | None = None
    usage: Usage | None = field(default_factory=Usage)
    model: str = ""
    first_delay: float = 0.0
    interval: float = 0.0
    events_per_write: int = 1
    fault: str | None = None  # one of FAULTS
    fault_after: int = 0
    error_type: str = ""
    error_message: str = "simulated failure"
    stall_seconds: float = 60.0
    rewrite: Callable[[int, bytes], bytes] | None = None

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {sorted(FAULTS)}")
        if self.events_per_write < 1:
            raise ValueError("events_per_write must be at least 1")
        if self.fault_after < 0:
            raise ValueError("fault_after must not be negative")
        for name in ("text", "reasoning", "tool_calls"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"StreamReply.{name} takes a sequence of pieces, not one string")


@dataclass
class StatusReply:
    """A non-200 JSON error response in the vendor's error format."""

    status: int
    error_type: str = ""
    message: str = "simulated error"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ResetReply:
    """Reset the TCP connection (SO_LINGER 0, then close) right after reading the request; no response."""


Reply: TypeAlias = StreamReply | StatusReply | ResetReply
