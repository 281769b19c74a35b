"""The error taxonomy: what went wrong, whose fault it is, and whether a retry may help.

Every failure that reaches a caller is a `GatewayError` built by tokenwire's own code with a
sanitized message; exception text from libraries never becomes a message. How each code travels
on the wire (its gRPC status) is `service.wire`'s business, so providers raise these errors
without knowing anything about gRPC.
"""

from __future__ import annotations

import enum
import re
import secrets
import traceback


class Fault(enum.StrEnum):
    CALLER = "CALLER"
    PROVIDER = "PROVIDER"
    SERVER = "SERVER"


class ErrorCode(enum.StrEnum):
    """Mirrors tokenwire.v1.ErrorCode (a test keeps them equal); the value is the ErrorInfo reason."""

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
    STREAM_NOT_FOUND = "STREAM_NOT_FOUND"
    CURSOR_OUT_OF_RANGE = "CURSOR_OUT_OF_RANGE"
    STREAM_ALREADY_EXISTS = "STREAM_ALREADY_EXISTS"
    STREAM_CANCELLED = "STREAM_CANCELLED"
    STREAM_ABANDONED = "STREAM_ABANDONED"
    PRODUCER_LOST = "PRODUCER_LOST"
    JOURNAL_FULL = "JOURNAL_FULL"
    JOURNAL_UNAVAILABLE = "JOURNAL_UNAVAILABLE"

    @property
    def fault(self) -> Fault:
        if self.name.startswith("PROVIDER_"):
            return Fault.PROVIDER
        return Fault.CALLER if self in _CALLER_CODES else Fault.SERVER

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE_CODES


_CALLER_CODES = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.ROUTE_NOT_FOUND,
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.QUOTA_EXCEEDED,
        ErrorCode.STREAM_NOT_FOUND,
        ErrorCode.CURSOR_OUT_OF_RANGE,
        ErrorCode.STREAM_ALREADY_EXISTS,
        ErrorCode.STREAM_CANCELLED,
        ErrorCode.STREAM_ABANDONED,
    }
)
_RETRYABLE_CODES = frozenset(
    {
        ErrorCode.QUOTA_EXCEEDED,
        ErrorCode.PROVIDER_RATE_LIMITED,
        ErrorCode.PROVIDER_UNAVAILABLE,
        ErrorCode.PROVIDER_TIMEOUT,
        ErrorCode.PROVIDER_STREAM_TRUNCATED,
        ErrorCode.PROVIDER_PROTOCOL_ERROR,
        ErrorCode.PROVIDER_ERROR,
        ErrorCode.SERVER_SHUTTING_DOWN,
        ErrorCode.SERVER_OVERLOADED,
        ErrorCode.PRODUCER_LOST,
        ErrorCode.JOURNAL_FULL,
        ErrorCode.JOURNAL_UNAVAILABLE,
    }
)


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
        # Sanitized where every error is built, so no path to a caller or a log can miss it.
        message = sanitize(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.provider = provider
        self.provider_http_status = provider_http_status
        self.field_violations = tuple((sanitize(f), sanitize(d)) for f, d in field_violations)
        self.correlation_id = correlation_id

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


def stream_truncated(
    provider: str, message: str = "the provider's stream ended without its end marker"
) -> GatewayError:
    """The one builder of PROVIDER_STREAM_TRUNCATED: a provider stream that stopped short of its end."""
    return GatewayError(ErrorCode.PROVIDER_STREAM_TRUNCATED, message, provider=provider)


def shutting_down(message: str) -> GatewayError:
    return GatewayError(ErrorCode.SERVER_SHUTTING_DOWN, message)


def new_correlation_id() -> str:
    return "err-" + secrets.token_hex(8)


def internal_error(correlation_id: str) -> GatewayError:
    return GatewayError(
        ErrorCode.INTERNAL,
        f"internal error; quote correlation id {correlation_id} when reporting it",
        correlation_id=correlation_id,
    )


# Shapes of credentials that must never leave the process, whatever text they hide in:
# authorization schemes, provider keys, and name=value / "name": "value" pairs named like secrets.
_SCHEME = re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{6,}")
_KEY_SHAPES = re.compile(r"\b(?:sk-[A-Za-z0-9_-]{8,}|AIza[0-9A-Za-z_-]{20,})")
_NAMED = re.compile(
    r"(?i)(\b(?:api[_-]?key|x-api-key|authorization|access[_-]?token|token|secret|password|key)[\"']?\s*[:=]\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s\"',;&]+)"
)


# The credentials this process holds (provider keys read at start-up), removed by exact value
# whatever shape they have.
_KNOWN_SECRETS: set[str] = set()


def register_secret(value: str) -> None:
    """Makes `redact` remove this exact value. Too short a value would redact ordinary words."""
    if len(value) >= 8:
        _KNOWN_SECRETS.add(value)


def unregister_secret(value: str) -> None:
    """Undoes `register_secret` for a credential this process no longer holds (a short-lived
    token that a new one replaced), so the set stays bounded."""
    _KNOWN_SECRETS.discard(value)


# Characters a terminal or a log parser acts on: C0 controls but tab and LF (a log line's
# traceback needs its lines), DEL and the C1 controls (U+009B is a one-character ESC [).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def redact(text: str) -> str:
    """Removes anything shaped like a credential and escapes control characters but LF and tab.
    Defence in depth for log lines (the log formatter applies it); messages use `sanitize`."""
    for secret in _KNOWN_SECRETS:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    text = _SCHEME.sub(r"\1 [redacted]", text)
    text = _KEY_SHAPES.sub("[redacted]", text)
    text = _NAMED.sub(r"\1[redacted]", text)
    # Escaped, not dropped: whoever reads it can tell that the provider sent something odd.
    return _CONTROL.sub(_escape, text)


def sanitize(text: str) -> str:
    """Diagnostic text fit for a caller: redacted, no control characters, on one line.

    The one sanitizer of every message, status detail and `Error` field, and of provider error
    text before it is quoted; never applied to relayed answer text, which is byte-exact.
    """
    # str.split() also splits at the Unicode line and paragraph separators.
    return " ".join(redact(text).split())


def describe_exception(exc: BaseException) -> str:
    """The exception's type and frames for the server's log, never its message.

    Exception text can hold anything a library put there (request headers, keys); the type and
    the frames are enough to find the bug.
    """
    frames = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    return redact(f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld)\n{frames}")
