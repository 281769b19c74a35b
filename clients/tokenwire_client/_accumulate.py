"""The contract's stream rules, free of I/O so the async and sync clients share them."""

from __future__ import annotations

import time
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
    Citation,
    CitationDelta,
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
from ._resume import FINAL_REASONS, Durable, is_break

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(slots=True)
class _ReasoningBuffer:
    parts: list[str] = field(default_factory=list)
    signature: str = ""
    redacted_data: str = ""


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

    A stream read from a cursor (Resume or Poll with ``after`` > 0) begins at message
    ``after + 1``, not at Start: the stream is already under way, ``stream_id`` names it,
    and what is assembled is what came after the cursor.
    """

    def __init__(self, *, after: int = 0, stream_id: str = "") -> None:
        self._after = after
        self._stream_id = stream_id
        self._last_sequence = after
        self._started: Started | None = None
        self._finished: Finished | None = None
        self._error: pb.Error | None = None
        self._text: list[str] = []
        self._reasoning: list[_ReasoningBuffer] = []
        self._tool_calls: dict[int, _ToolCallBuffer] = {}
        self._citations: list[Citation] = []

    @property
    def started(self) -> Started | None:
        return self._started

    @property
    def finished(self) -> Finished | None:
        return self._finished

    @property
    def last_sequence(self) -> int:
        """The sequence of the last message fed (or the cursor read from); 0 before the first."""
        return self._last_sequence

    @property
    def begun(self) -> bool:
        """Whether the stream is under way: its Start was fed, or it is read from past Start."""
        return self._started is not None or self._last_sequence > 0

    @property
    def ended(self) -> bool:
        """Whether the terminal event, Finish or Error, was fed."""
        return self._finished is not None or self._error is not None

    @property
    def stream_id(self) -> str:
        return self._started.stream_id if self._started is not None else self._stream_id

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
                if delta.redacted_data:
                    # A redacted block is whole: it goes back as a block of its own.
                    self._reasoning.append(_ReasoningBuffer(redacted_data=delta.redacted_data))
                else:
                    self._add_reasoning(delta.text, delta.signature)
                return ReasoningDelta(sequence, delta.text, delta.signature, delta.redacted_data)
            case "citation_delta":
                citation = Citation.from_proto(message.citation_delta)
                self._citations.append(citation)
                return CitationDelta(sequence, citation)
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
        last = self._reasoning[-1] if self._reasoning else None
        if last is None or last.redacted_data or (text and last.signature):
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
        if not self.begun:
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
        begun = self.begun
        return error_from_status(
            code,
            details,
            trailing_metadata,
            self._error,
            stream_id=self.stream_id,
            last_sequence=self._last_sequence if begun else None,
            truncated=begun and self._finished is None,
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
        return [ReasoningBlock("".join(block.parts), block.signature, block.redacted_data) for block in self._reasoning]

    def _assembled_tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(index, call.id, call.name, "".join(call.parts)) for index, call in sorted(self._tool_calls.items())
        ]

    def response(self) -> Response:
        """The whole response; only once the Finish event was fed.

        Read from a cursor past Start, it has what came after the cursor, and no route,
        provider or resume window: those were in the Start it did not read.
        """
        started, finished = self._started, self._finished
        if finished is None or not self.begun:
            raise RuntimeError("the stream has not finished")
        return Response(
            stream_id=self.stream_id,
            route=started.route if started else "",
            provider=started.provider if started else "",
            upstream_model=started.upstream_model if started else "",
            text="".join(self._text),
            reasoning=self._reasoning_blocks(),
            tool_calls=self._assembled_tool_calls(),
            finish_reason=finished.reason,
            raw_finish_reason=finished.raw_reason,
            stop_sequence=finished.stop_sequence,
            usage=finished.usage,
            timing=finished.timing,
            last_sequence=finished.sequence,
            resume_token=started.resume_token if started else "",
            resume_window=started.resume_window if started else None,
            citations=list(self._citations),
            provider_request_id=finished.provider_request_id,
            provider_model=finished.provider_model,
        )


class Cancellable(Protocol):
    def cancel(self) -> bool: ...


_CallT = TypeVar("_CallT", bound=Cancellable)


class StreamLifecycle(Generic[_CallT]):
    """The lifecycle the async and the sync stream share.

    A call started on demand, the accumulator that checks it, and how the stream ended.
    A durable stream (``durable`` given) may go through several calls: after a break it
    reopens one that continues from the last message delivered, into the same accumulator,
    so that sequences run on and every message is delivered once.
    """

    def __init__(
        self,
        start_call: Callable[[], _CallT],
        *,
        durable: Durable[_CallT] | None = None,
        accumulator: StreamAccumulator | None = None,
    ) -> None:
        self._start_call = start_call
        self._call: _CallT | None = None
        self._accumulator = accumulator or StreamAccumulator()
        self._ended = False
        self._entered = False
        # Re-raised by every later read, so that no caller mistakes a failed stream for
        # a finished one.
        self._failure: TokenwireError | None = None
        self._durable = durable
        self._deadline: float | None = None
        self._attempts = 0
        self._reconnects = 0
        self._progress = self._accumulator.last_sequence
        self._cancel_sent = False

    @property
    def started(self) -> Started | None:
        """The Start event, once received: it names the provider actually serving."""
        return self._accumulator.started

    @property
    def stream_id(self) -> str:
        """The stream's id, once known (from Start, or as given to resume)."""
        return self._accumulator.stream_id

    @property
    def durable(self) -> bool:
        return self._durable is not None

    @property
    def reconnects(self) -> int:
        """How many times this stream reopened its call after a break."""
        return self._reconnects

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
            call = self._open()
            self._call = call
            # A cancel() from another thread may have come while the call was opening.
            if self._ended:
                call.cancel()
        return self._call

    def _open(self) -> _CallT:
        durable = self._durable
        if durable is None:
            return self._start_call()
        if self._call is None and self._reconnects == 0:
            # The first call gets the caller's timeout as it is; the ones after, what is left of it.
            if durable.timeout is not None:
                self._deadline = time.monotonic() + durable.timeout
            return self._start_call()
        remaining = self._remaining()
        accumulator = self._accumulator
        if not accumulator.begun:
            return durable.reopen(remaining)
        started = accumulator.started
        token = started.resume_token if started is not None and started.resume_token else durable.token
        return durable.resume(accumulator.stream_id, token, accumulator.last_sequence, remaining)

    def _remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _plan_reconnect(self, error: TokenwireError) -> float | None:
        """The wait before reopening the call after ``error``; None when it must raise instead."""
        durable = self._durable
        if durable is None or self._failure is not None:
            return None
        accumulator = self._accumulator
        if accumulator.ended or not is_break(error, begun=accumulator.begun):
            return None
        if accumulator.begun and not self._resume_token():
            return None  # a server that granted no token cannot be resumed
        if accumulator.last_sequence > self._progress:
            self._progress = accumulator.last_sequence
            self._attempts = 0
        if self._attempts >= durable.policy.max_attempts:
            return None
        self._attempts += 1
        retry_after = error.retry_after if isinstance(error, APIStatusError) else None
        delay = durable.policy.backoff(self._attempts, retry_after)
        remaining = self._remaining()
        if remaining is not None and remaining <= delay:
            return None
        return delay

    def _drop_call(self) -> None:
        """Forgets the broken call, so that the next read opens the one that continues it."""
        call, self._call = self._call, None
        self._ended = False
        self._reconnects += 1
        if call is not None:
            call.cancel()

    def _resume_token(self) -> str:
        started = self._accumulator.started
        if started is not None and started.resume_token:
            return started.resume_token
        return self._durable.token if self._durable is not None else ""

    def _stop_target(self) -> tuple[str, str] | None:
        """The durable stream to Cancel when this one is stopped early, once; else None.

        None for an ephemeral stream, one that received its terminal event, one whose token
        is unknown (it broke before Start), and one the server already said is over.
        """
        if self._durable is None or self._cancel_sent or self._accumulator.ended:
            return None
        failure = self._failure
        if isinstance(failure, APIStatusError) and failure.reason in FINAL_REASONS:
            return None
        token = self._resume_token()
        if not token:
            return None
        self._cancel_sent = True
        return self._accumulator.stream_id, token

    def _readable(self) -> bool:
        """Whether a read may go on; raises how the stream failed, if it did."""
        if self._failure is not None:
            raise self._failure
        return not self._ended

    def _fail(self, error: TokenwireError) -> None:
        self._failure = error
        # Stops the server too when the stream broke the contract.
        self._stop()
