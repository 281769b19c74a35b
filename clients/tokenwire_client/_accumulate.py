"""The contract's stream rules, free of I/O so the async and sync clients share them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import grpc

from tokenwire.v1 import generation_pb2 as pb

from ._errors import (
    APIStatusError,
    StreamIntegrityError,
    TokenwireError,
    TrailingMetadata,
    TruncatedStreamError,
    error_from_status,
)
from ._events import (
    Event,
    Finished,
    Heartbeat,
    ReasoningBlock,
    ReasoningDelta,
    Response,
    Snapshot,
    Started,
    TextDelta,
    ToolCall,
    ToolCallDelta,
)

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(slots=True)
class _ReasoningBuffer:
    parts: list[str] = field(default_factory=list)
    signature: str = ""


@dataclass(slots=True)
class _ToolCallBuffer:
    id: str
    name: str
    parts: list[str] = field(default_factory=list)


class StreamAccumulator:
    """Checks one Generate stream against the contract and assembles its response.

    Feed it every message in the order received. When the call ends, call
    :meth:`check_complete` after an OK status, or raise :meth:`status_error` for any other.

    Reasoning: text is appended to the current block. A signature seals the block it
    arrives with (a later signature replaces it), and reasoning text after a signature
    opens a new block, as providers that sign each thinking block at its end send them.
    """

    def __init__(self) -> None:
        self._last_sequence = 0
        self._started: Started | None = None
        self._finished: Finished | None = None
        self._error: pb.Error | None = None
        self._text: list[str] = []
        self._reasoning: list[_ReasoningBuffer] = []
        self._tool_calls: dict[int, _ToolCallBuffer] = {}

    @property
    def started(self) -> Started | None:
        return self._started

    @property
    def finished(self) -> Finished | None:
        return self._finished

    @property
    def last_sequence(self) -> int:
        """The sequence of the last message fed; 0 before the first."""
        return self._last_sequence

    def feed(self, message: pb.GenerateResponse) -> Event | None:
        """Checks and records one message; returns its event, or None if it has none.

        An Error message has no event: it is kept for :meth:`status_error`, because the
        call's status follows it. Event cases this client does not know yield None too, as
        the contract requires, yet still count in the sequence.
        """
        if self._finished is not None or self._error is not None:
            raise StreamIntegrityError(
                f"message with sequence {message.sequence} after the terminal event at sequence {self._last_sequence}"
            )
        expected = self._last_sequence + 1
        if message.sequence != expected:
            raise StreamIntegrityError(f"expected sequence {expected}, got {message.sequence}")
        kind = message.WhichOneof("event")
        if expected == 1 and kind != "start":
            raise StreamIntegrityError(f"the first message must be a Start event, got {kind or 'an unknown one'}")
        if expected != 1 and kind == "start":
            raise StreamIntegrityError(f"a second Start event at sequence {expected}")
        self._last_sequence = expected
        try:
            return self._record(expected, kind, message)
        except (ValueError, TypeError, OverflowError) as exc:
            raise StreamIntegrityError(f"malformed {kind} message at sequence {expected}: {exc}") from None

    def _record(self, sequence: int, kind: str | None, message: pb.GenerateResponse) -> Event | None:
        match kind:
            case "start":
                self._started = Started.from_proto(sequence, message.start)
                return self._started
            case "text_delta":
                self._text.append(message.text_delta.text)
                return TextDelta(sequence, message.text_delta.text)
            case "reasoning_delta":
                delta = message.reasoning_delta
                self._add_reasoning(delta.text, delta.signature)
                return ReasoningDelta(sequence, delta.text, delta.signature)
            case "tool_call_delta":
                call = message.tool_call_delta
                buffer = self._tool_calls.setdefault(call.index, _ToolCallBuffer(call.id, call.name))
                buffer.parts.append(call.arguments_delta)
                return ToolCallDelta(sequence, call.index, call.id, call.name, call.arguments_delta)
            case "heartbeat":
                return Heartbeat(sequence)
            case "finish":
                self._finished = Finished.from_proto(sequence, message.finish)
                return self._finished
            case "error":
                self._error = message.error
                return None
            case _:
                return None

    def _add_reasoning(self, text: str, signature: str) -> None:
        if not text and not signature:
            return
        if not self._reasoning or (text and self._reasoning[-1].signature):
            self._reasoning.append(_ReasoningBuffer())
        block = self._reasoning[-1]
        block.parts.append(text)
        if signature:
            block.signature = signature

    def check_complete(self) -> None:
        """Raises unless the stream, whose call ended with an OK status, is complete."""
        if self._finished is not None:
            return
        if self._error is not None:
            # The contract puts the Error's code in the status; an OK status after an
            # Error is a server bug, and the Error is still what happened.
            raise self.status_error(
                _STATUS_CODES.get(self._error.grpc_code, grpc.StatusCode.UNKNOWN),
                self._error.message,
                None,
            )
        if self._started is None:
            raise TruncatedStreamError("the call ended without sending any message")
        raise TruncatedStreamError(
            f"the stream ended after sequence {self._last_sequence} without a Finish or Error event"
        )

    def status_error(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: TrailingMetadata | None,
    ) -> APIStatusError:
        """The exception for the call's non-OK status, with what the stream told."""
        started = self._started
        return error_from_status(
            code,
            details,
            trailing_metadata,
            self._error,
            stream_id=started.stream_id if started else "",
            last_sequence=self._last_sequence if started else None,
            truncated=started is not None and self._finished is None,
        )

    def snapshot(self) -> Snapshot:
        """Everything received so far, whether or not the stream finished."""
        return Snapshot(
            started=self._started,
            text="".join(self._text),
            reasoning=self._reasoning_blocks(),
            tool_calls=self._assembled_tool_calls(),
            last_sequence=self._last_sequence,
        )

    def _reasoning_blocks(self) -> list[ReasoningBlock]:
        return [ReasoningBlock("".join(block.parts), block.signature) for block in self._reasoning]

    def _assembled_tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(index, call.id, call.name, "".join(call.parts)) for index, call in sorted(self._tool_calls.items())
        ]

    def response(self) -> Response:
        """The whole response; only once the Finish event was fed."""
        started, finished = self._started, self._finished
        if started is None or finished is None:
            raise RuntimeError("the stream has not finished")
        return Response(
            stream_id=started.stream_id,
            route=started.route,
            provider=started.provider,
            upstream_model=started.upstream_model,
            text="".join(self._text),
            reasoning=self._reasoning_blocks(),
            tool_calls=self._assembled_tool_calls(),
            finish_reason=finished.reason,
            raw_finish_reason=finished.raw_reason,
            stop_sequence=finished.stop_sequence,
            usage=finished.usage,
            timing=finished.timing,
            last_sequence=finished.sequence,
        )


class Cancellable(Protocol):
    def cancel(self) -> bool: ...


_CallT = TypeVar("_CallT", bound=Cancellable)


class StreamLifecycle(Generic[_CallT]):
    """The lifecycle the async and the sync stream share.

    A call started on demand, the accumulator that checks it, and how the stream ended.
    """

    def __init__(self, start_call: Callable[[], _CallT]) -> None:
        self._start_call = start_call
        self._call: _CallT | None = None
        self._accumulator = StreamAccumulator()
        self._ended = False
        self._entered = False
        # Re-raised by every later read, so that no caller mistakes a failed stream for
        # a finished one.
        self._failure: TokenwireError | None = None

    @property
    def started(self) -> Started | None:
        """The Start event, once received: it names the provider actually serving."""
        return self._accumulator.started

    def snapshot(self) -> Snapshot:
        """What arrived so far: the partial answer after a failure, for instance."""
        return self._accumulator.snapshot()

    def _enter(self) -> None:
        self._entered = True
        self._ensure_call()

    def _require_entered(self) -> None:
        # Iteration outside the context manager could be abandoned half-way with nothing to
        # cancel the call: the server and the provider would go on generating.
        if not self._entered:
            raise TypeError(
                "iterate a stream inside its context manager: "
                "'async with client.generate(...) as stream' / 'with client.generate(...) as stream'"
            )

    def cancel(self) -> None:
        """Stops the call unless it has ended; later reads raise StreamCancelledError."""
        if self._ended:
            return
        # Set before cancelling, so that a read pending elsewhere reports it.
        if self._accumulator.finished is None:
            self._failure = self._accumulator.status_error(
                grpc.StatusCode.CANCELLED, "the client cancelled the stream", None
            )
        self._stop()

    def _stop(self) -> None:
        self._ended = True
        if self._call is not None:
            self._call.cancel()

    def _ensure_call(self) -> _CallT:
        if self._call is None:
            self._call = self._start_call()
        return self._call

    def _readable(self) -> bool:
        """Whether a read may go on; raises how the stream failed, if it did."""
        if self._failure is not None:
            raise self._failure
        return not self._ended

    def _fail(self, error: TokenwireError) -> None:
        self._failure = error
        # Stops the server too when the stream broke the contract.
        self._stop()
