"""The exceptions of the tokenwire client.

A failed call becomes an :class:`APIStatusError` subclass chosen by its gRPC code,
carrying the facts the server attached: the google.rpc rich status in the trailing
metadata and, when the stream had started, the terminal Error event. A stream that
breaks the contract's sequencing or termination guarantees becomes a
:class:`StreamProtocolError` instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
from google.protobuf.message import DecodeError

# googleapis-common-protos ships .pyi stubs but no py.typed marker, so mypy reads them
# only if configured to; everything taken from these modules gets a concrete type below.
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

from tokenwire.v1 import generation_pb2 as pb

TrailingMetadata = Iterable[tuple[str, str | bytes]]
"""Trailing metadata as grpc.aio (Metadata) and sync grpc (pairs) both give it."""

_DETAILS_KEY = "grpc-status-details-bin"
_DOMAIN = "tokenwire"

# gRPC itself ends calls with these codes, without rich details, when the server is
# unreachable or overloaded: worth retrying even though nobody said so.
_RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class Fault(StrEnum):
    """Whose fault an error is."""

    CALLER = "caller"
    PROVIDER = "provider"
    SERVER = "server"
    UNKNOWN = "unknown"


_RICH_FAULTS: dict[str, Fault] = {
    "CALLER": Fault.CALLER,
    "PROVIDER": Fault.PROVIDER,
    "SERVER": Fault.SERVER,
}

_EVENT_FAULTS: dict[int, Fault] = {
    pb.FAULT_CALLER: Fault.CALLER,
    pb.FAULT_PROVIDER: Fault.PROVIDER,
    pb.FAULT_SERVER: Fault.SERVER,
}


class TokenwireError(Exception):
    """Base of every exception the tokenwire client raises.

    Every one answers ``retryable``, so a retry loop can catch this class alone.
    """

    retryable: bool = False
    stream_id: str = ""
    last_sequence: int | None = None


class ClientClosedError(TokenwireError):
    """The client was used after it was closed."""


class ResponseParseError(TokenwireError):
    """The answer of a stream that asked for JSON is not the JSON asked for.

    ``text`` is the whole answer, ``finish_reason`` why it ended (``length`` means it was cut
    short: ask for more output tokens), ``position`` the character where parsing failed.
    """

    def __init__(self, message: str, *, text: str, finish_reason: str, position: int | None) -> None:
        super().__init__(message)
        self.text = text
        self.finish_reason = finish_reason
        self.position = position


class StreamProtocolError(TokenwireError):
    """The stream broke a guarantee of the contract: the response is not trustworthy."""


class StreamIntegrityError(StreamProtocolError):
    """A message arrived out of sequence, after the terminal event, or malformed."""


class TruncatedStreamError(StreamProtocolError):
    """The call ended without a terminal event, so the response may be incomplete."""

    # The transport lost the end of the stream; the same request may well succeed.
    retryable = True


class APIStatusError(TokenwireError):
    """The call ended with a non-OK gRPC status.

    Attributes:
        code: the gRPC status code; it also chose the subclass.
        message: the status message, sanitized by the server.
        reason: the google.rpc.ErrorInfo reason, e.g. "ROUTE_NOT_FOUND"; "" when absent.
        fault: whose fault it is; UNKNOWN when the server did not say.
        retryable: whether the same request may succeed when sent again.
        retry_after: seconds to wait before retrying, when the server said.
        provider: the provider that failed, when one did.
        provider_http_status: the provider's HTTP status, when it answered with one.
        correlation_id: names the failure in the server's logs.
        stream_id: the stream's id, when known.
        last_sequence: the last complete message before the failure; None when the
            stream never started.
        field_violations: (field, description) pairs of an invalid request.
        truncated: the stream had started and ended without a terminal event (the
            connection broke, or a server stopped a reader that did not read).
    """

    def __init__(
        self,
        *,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        fault: Fault = Fault.UNKNOWN,
        retryable: bool = False,
        retry_after: float | None = None,
        provider: str = "",
        provider_http_status: int | None = None,
        correlation_id: str = "",
        stream_id: str = "",
        last_sequence: int | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        truncated: bool = False,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.fault = fault
        self.retryable = retryable
        self.retry_after = retry_after
        self.provider = provider
        self.provider_http_status = provider_http_status
        self.correlation_id = correlation_id
        self.stream_id = stream_id
        self.last_sequence = last_sequence
        self.field_violations = list(field_violations)
        self.truncated = truncated
        super().__init__(str(self))

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only construction: pickle (process pools, task queues) needs to be told how.
        return (_rebuild, (type(self), dict(vars(self))))

    def __str__(self) -> str:
        notes = [f"reason {self.reason}"] if self.reason else []
        if self.correlation_id:
            notes.append(f"correlation id {self.correlation_id}")
        text = f"{self.code.name}: {self.message or 'no details'}"
        return f"{text} ({', '.join(notes)})" if notes else text


def _rebuild(kind: type[APIStatusError], state: dict[str, object]) -> APIStatusError:
    error = kind.__new__(kind)
    error.__dict__.update(state)
    Exception.__init__(error, str(error))
    return error


class InvalidRequestError(APIStatusError):
    """INVALID_ARGUMENT: the request, or the provider's view of it, is malformed."""


class NotFoundError(APIStatusError):
    """NOT_FOUND: the route does not exist."""


class AuthenticationError(APIStatusError):
    """UNAUTHENTICATED: the caller's key is missing or invalid."""


class PermissionDeniedError(APIStatusError):
    """PERMISSION_DENIED: the caller may not use this route."""


class RateLimitError(APIStatusError):
    """RESOURCE_EXHAUSTED: a quota, a provider rate limit or the server's capacity."""


class UnavailableError(APIStatusError):
    """UNAVAILABLE: the server or the provider could not serve; usually retryable."""


class DeadlineExceededError(APIStatusError):
    """DEADLINE_EXCEEDED: the client's deadline or the server's stream time limit."""


class StreamCancelledError(APIStatusError):
    """CANCELLED: the call was cancelled, by the server or by this client."""


class InternalServerError(APIStatusError):
    """INTERNAL, UNKNOWN or any other code: quote the correlation id to report it."""


# Durable streams. Each code the contract added for them gets a class of its own, a subclass
# of the class its gRPC code already chose, so that code written before durable streams (an
# ``except NotFoundError``, say) still catches them.


class StreamNotFoundError(NotFoundError):
    """STREAM_NOT_FOUND: no durable stream with this id and token (unknown, expired or a wrong token)."""


class CursorOutOfRangeError(APIStatusError):
    """OUT_OF_RANGE (CURSOR_OUT_OF_RANGE): the cursor is past the stream's last journaled message."""


class StreamAlreadyExistsError(APIStatusError):
    """ALREADY_EXISTS (STREAM_ALREADY_EXISTS): this request_id names a stream of another request."""


class StreamStoppedError(StreamCancelledError):
    """STREAM_CANCELLED: a Cancel call stopped the durable stream (this client's, or another's)."""


class StreamAbandonedError(APIStatusError):
    """ABORTED (STREAM_ABANDONED): no reader came back within the resume window, so the server stopped it."""


class ProducerLostError(UnavailableError):
    """PRODUCER_LOST: the server producing the stream died; send the request again (it cannot resume)."""


class JournalFullError(RateLimitError):
    """JOURNAL_FULL: the stream outgrew the journal's bounds, and ended rather than lose messages."""


class JournalUnavailableError(UnavailableError):
    """JOURNAL_UNAVAILABLE: the server could not reach its journal (Redis, say)."""


_ERRORS_BY_CODE: dict[grpc.StatusCode, type[APIStatusError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: StreamCancelledError,
    # Only durable streams answer these two codes, so the code alone names the class.
    grpc.StatusCode.OUT_OF_RANGE: CursorOutOfRangeError,
    grpc.StatusCode.ALREADY_EXISTS: StreamAlreadyExistsError,
}

# A reason is more precise than a code: it picks the class where both are known.
_ERRORS_BY_REASON: dict[str, type[APIStatusError]] = {
    "STREAM_NOT_FOUND": StreamNotFoundError,
    "CURSOR_OUT_OF_RANGE": CursorOutOfRangeError,
    "STREAM_ALREADY_EXISTS": StreamAlreadyExistsError,
    "STREAM_CANCELLED": StreamStoppedError,
    "STREAM_ABANDONED": StreamAbandonedError,
    "PRODUCER_LOST": ProducerLostError,
    "JOURNAL_FULL": JournalFullError,
    "JOURNAL_UNAVAILABLE": JournalUnavailableError,
}


@dataclass
class _RichStatus:
    """The facts of a google.rpc.Status that this client understands."""

    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    field_violations: list[tuple[str, str]] = field(default_factory=list)


def _rich_status(trailing_metadata: TrailingMetadata | None) -> _RichStatus:
    rich = _RichStatus()
    raw = next(
        (value for key, value in trailing_metadata or () if key == _DETAILS_KEY and isinstance(value, bytes)),
        None,
    )
    if raw is None:
        return rich
    try:
        status = status_pb2.Status.FromString(raw)
    except DecodeError:
        # A mangled trailer must not hide the status code, which is still valid.
        return rich
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            # Metadata keys of another domain (a proxy's, say) mean something else.
            if info.domain == _DOMAIN:
                rich.reason = str(info.reason)
                rich.metadata = {str(k): str(v) for k, v in info.metadata.items()}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            rich.retry_after = int(retry.retry_delay.ToNanoseconds()) / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            rich.field_violations = [(str(v.field), str(v.description)) for v in bad_request.field_violations]
    return rich


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _reason(code: pb.ErrorCode.ValueType) -> str:
    """The ErrorInfo reason of an ErrorCode; "" for one this client does not know."""
    if code == pb.ERROR_CODE_UNSPECIFIED:
        return ""
    try:
        return pb.ErrorCode.Name(code).removeprefix("ERROR_CODE_")
    except ValueError:
        return ""


def error_from_status(
    code: grpc.StatusCode,
    details: str,
    trailing_metadata: TrailingMetadata | None,
    error_event: pb.Error | None = None,
    *,
    stream_id: str = "",
    last_sequence: int | None = None,
    truncated: bool = False,
) -> APIStatusError:
    """The typed exception for a call that ended with a non-OK status.

    ``stream_id`` and ``last_sequence`` are what the client itself saw of a started
    stream; the server's own facts take precedence over them.
    """
    rich = _rich_status(trailing_metadata)
    meta = rich.metadata
    reason = rich.reason
    fault = _RICH_FAULTS.get(meta.get("fault", ""), Fault.UNKNOWN)
    retryable = meta["retryable"] == "true" if "retryable" in meta else code in _RETRYABLE_CODES
    retry_after = rich.retry_after
    provider = meta.get("provider", "")
    provider_http_status = _int_or_none(meta.get("provider_http_status"))
    correlation_id = meta.get("correlation_id", "")
    message = details
    if error_event is not None:
        # The Error event and the rich status state the same facts; the event is typed,
        # so where both say something the event wins.
        reason = _reason(error_event.code) or reason
        fault = _EVENT_FAULTS.get(error_event.fault, fault)
        retryable = error_event.retryable
        if error_event.HasField("retry_after"):
            retry_after = error_event.retry_after.ToNanoseconds() / 1e9
        provider = error_event.provider or provider
        if error_event.HasField("provider_http_status"):
            provider_http_status = error_event.provider_http_status
        correlation_id = error_event.correlation_id or correlation_id
        last_sequence = error_event.last_sequence or last_sequence
        message = message or error_event.message
    kind = _ERRORS_BY_REASON.get(reason) or _ERRORS_BY_CODE.get(code, InternalServerError)
    return kind(
        code=code,
        message=message,
        reason=reason,
        fault=fault,
        retryable=retryable,
        retry_after=retry_after,
        provider=provider,
        provider_http_status=provider_http_status,
        correlation_id=correlation_id,
        stream_id=meta.get("stream_id") or stream_id,
        last_sequence=last_sequence,
        field_violations=rich.field_violations,
        truncated=truncated and error_event is None,
    )
