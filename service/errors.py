"""The error taxonomy: what went wrong, whose fault it is, its gRPC code, and whether to retry.

Every failure that reaches a caller is a `GatewayError` built by tokenwire's own code with a
sanitized message; exception text from libraries never becomes a message.
"""

from __future__ import annotations

import enum
import re
import secrets
import traceback
from dataclasses import dataclass

import grpc


class Fault(enum.StrEnum):
    CALLER = "CALLER"
    PROVIDER = "PROVIDER"
    SERVER = "SERVER"


@dataclass(frozen=True, slots=True)
class _Spec:
    status: grpc.StatusCode
    fault: Fault
    retryable: bool


class ErrorCode(enum.StrEnum):
    """Mirrors tokenwire.v1.ErrorCode; the value is the google.rpc.ErrorInfo reason."""

    INVALID_REQUEST = "INVALID_REQUEST"
    ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    PROVIDER_RATE_LIMITED = "PROVIDER_RATE_LIMITED"
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    PROVIDER_TIMEOUT = "PROVIDER_TIMEOUT"
    PROVIDER_STREAM_TRUNCATED = "PROVIDER_STREAM_TRUNCATED"
    PROVIDER_PROTOCOL_ERROR = "PROVIDER_PROTOCOL_ERROR"
    PROVIDER_REJECTED_REQUEST = "PROVIDER_REJECTED_REQUEST"
    PROVIDER_AUTH_FAILED = "PROVIDER_AUTH_FAILED"
    PROVIDER_ERROR = "PROVIDER_ERROR"
    SERVER_SHUTTING_DOWN = "SERVER_SHUTTING_DOWN"
    SERVER_OVERLOADED = "SERVER_OVERLOADED"
    STREAM_DURATION_EXCEEDED = "STREAM_DURATION_EXCEEDED"
    INTERNAL = "INTERNAL"

    @property
    def status(self) -> grpc.StatusCode:
        return _SPECS[self].status

    @property
    def fault(self) -> Fault:
        return _SPECS[self].fault

    @property
    def retryable(self) -> bool:
        return _SPECS[self].retryable


_C = grpc.StatusCode
_SPECS: dict[ErrorCode, _Spec] = {
    ErrorCode.INVALID_REQUEST: _Spec(_C.INVALID_ARGUMENT, Fault.CALLER, False),
    ErrorCode.ROUTE_NOT_FOUND: _Spec(_C.NOT_FOUND, Fault.CALLER, False),
    ErrorCode.UNAUTHENTICATED: _Spec(_C.UNAUTHENTICATED, Fault.CALLER, False),
    ErrorCode.PERMISSION_DENIED: _Spec(_C.PERMISSION_DENIED, Fault.CALLER, False),
    ErrorCode.QUOTA_EXCEEDED: _Spec(_C.RESOURCE_EXHAUSTED, Fault.CALLER, True),
    ErrorCode.PROVIDER_RATE_LIMITED: _Spec(_C.RESOURCE_EXHAUSTED, Fault.PROVIDER, True),
    ErrorCode.PROVIDER_UNAVAILABLE: _Spec(_C.UNAVAILABLE, Fault.PROVIDER, True),
    ErrorCode.PROVIDER_TIMEOUT: _Spec(_C.UNAVAILABLE, Fault.PROVIDER, True),
    ErrorCode.PROVIDER_STREAM_TRUNCATED: _Spec(_C.UNAVAILABLE, Fault.PROVIDER, True),
    ErrorCode.PROVIDER_PROTOCOL_ERROR: _Spec(_C.UNAVAILABLE, Fault.PROVIDER, True),
    ErrorCode.PROVIDER_REJECTED_REQUEST: _Spec(_C.INVALID_ARGUMENT, Fault.PROVIDER, False),
    # The server's provider key is bad: an operator's problem, never the caller's credentials.
    ErrorCode.PROVIDER_AUTH_FAILED: _Spec(_C.INTERNAL, Fault.PROVIDER, False),
    ErrorCode.PROVIDER_ERROR: _Spec(_C.UNAVAILABLE, Fault.PROVIDER, True),
    ErrorCode.SERVER_SHUTTING_DOWN: _Spec(_C.UNAVAILABLE, Fault.SERVER, True),
    ErrorCode.SERVER_OVERLOADED: _Spec(_C.RESOURCE_EXHAUSTED, Fault.SERVER, True),
    ErrorCode.STREAM_DURATION_EXCEEDED: _Spec(_C.DEADLINE_EXCEEDED, Fault.SERVER, False),
    ErrorCode.INTERNAL: _Spec(_C.INTERNAL, Fault.SERVER, False),
}


class GatewayError(Exception):
    """A failure with a known meaning. `message` must never contain secrets or raw library text."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: float | None = None,
        provider: str = "",
        provider_http_status: int | None = None,
        field_violations: tuple[tuple[str, str], ...] = (),
        correlation_id: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.provider = provider
        self.provider_http_status = provider_http_status
        self.field_violations = field_violations
        self.correlation_id = correlation_id

    @property
    def status(self) -> grpc.StatusCode:
        return self.code.status

    @property
    def retryable(self) -> bool:
        return self.code.retryable

    def __repr__(self) -> str:
        return f"GatewayError({self.code.value}, {self.message!r})"


def invalid_request(field: str, description: str) -> GatewayError:
    return GatewayError(
        ErrorCode.INVALID_REQUEST,
        f"{field}: {description}",
        field_violations=((field, description),),
    )


def new_correlation_id() -> str:
    return "err-" + secrets.token_hex(8)


def internal_error(correlation_id: str) -> GatewayError:
    return GatewayError(
        ErrorCode.INTERNAL,
        f"internal error; quote correlation id {correlation_id} when reporting it",
        correlation_id=correlation_id,
    )


# Shapes of credentials that must never leave the process, whatever text they hide in: bearer
# tokens, provider keys (sk-..., sk-ant-...), and key=value / "key": "value" pairs named like secrets.
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(
        r"(?i)((?:api[_-]?key|authorization|x-api-key|token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
        r"[^\s\"',;]{4,}"
    ),
)


def redact(text: str) -> str:
    """Removes anything shaped like a credential. Defence in depth for messages and log lines."""
    text = _SECRET_PATTERNS[0].sub(r"\1 [redacted]", text)
    text = _SECRET_PATTERNS[1].sub("sk-[redacted]", text)
    return _SECRET_PATTERNS[2].sub(r"\1[redacted]", text)


def describe_exception(exc: BaseException) -> str:
    """A traceback for the server's log, with anything credential-shaped removed at the source."""
    return redact("".join(traceback.format_exception(exc)).rstrip())
