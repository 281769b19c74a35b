"""error_from_status against hand-built gRPC statuses: rich details, bare codes, Error events."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

from tokenwire.v1 import generation_pb2 as pb
from tokenwire_client import (
    APIStatusError,
    AuthenticationError,
    DeadlineExceededError,
    Fault,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StreamCancelledError,
    TokenwireError,
    UnavailableError,
    error_from_status,
)


def trailers(code: grpc.StatusCode, message: str, *details: Message) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying a google.rpc.Status, as a tokenwire server sends it."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def error_info(reason: str, **metadata: str) -> Message:
    info: Message = error_details_pb2.ErrorInfo(reason=reason, domain="tokenwire", metadata=metadata)
    return info


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, RateLimitError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.CANCELLED, StreamCancelledError),
        (grpc.StatusCode.INTERNAL, InternalServerError),
        (grpc.StatusCode.UNKNOWN, InternalServerError),
        (grpc.StatusCode.DATA_LOSS, InternalServerError),
        (grpc.StatusCode.UNIMPLEMENTED, InternalServerError),
    ],
)
def test_code_chooses_the_exception_class(code: grpc.StatusCode, expected: type[APIStatusError]) -> None:
    exc = error_from_status(code, "boom", None)

    assert type(exc) is expected
    assert isinstance(exc, TokenwireError)
    assert exc.code is code
    assert exc.message == "boom"


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False),
        (grpc.StatusCode.INTERNAL, False),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
    ],
)
def test_bare_status_derives_retryable_from_the_code(code: grpc.StatusCode, retryable: bool) -> None:
    # What gRPC itself produces, e.g. when the server is down: no details at all.
    exc = error_from_status(code, "failed to connect to all addresses", ())

    assert exc.retryable is retryable
    assert exc.fault is Fault.UNKNOWN
    assert exc.reason == ""
    assert exc.retry_after is None
    assert exc.provider == ""
    assert exc.provider_http_status is None
    assert exc.last_sequence is None
    assert exc.field_violations == []


def test_str_is_one_clear_line() -> None:
    details = trailers(grpc.StatusCode.NOT_FOUND, "unknown route 'x'", error_info("ROUTE_NOT_FOUND", fault="CALLER"))

    assert str(error_from_status(grpc.StatusCode.NOT_FOUND, "unknown route 'x'", details)) == (
        "NOT_FOUND: unknown route 'x' (reason ROUTE_NOT_FOUND)"
    )
    assert str(error_from_status(grpc.StatusCode.UNAVAILABLE, "", None)) == "UNAVAILABLE: no details"


def test_rich_status_fills_every_fact() -> None:
    details = trailers(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the provider is rate limiting",
        error_info(
            "PROVIDER_RATE_LIMITED",
            fault="PROVIDER",
            retryable="true",
            provider="openai",
            provider_http_status="429",
            correlation_id="corr-7",
            stream_id="stream-9",
        ),
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)),
    )

    exc = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "the provider is rate limiting", details)

    assert isinstance(exc, RateLimitError)
    assert exc.reason == "PROVIDER_RATE_LIMITED"
    assert exc.fault is Fault.PROVIDER
    assert str(exc.fault) == "provider"
    assert exc.retryable is True
    assert exc.retry_after == 2.5
    assert exc.provider == "openai"
    assert exc.provider_http_status == 429
    assert exc.correlation_id == "corr-7"
    assert exc.stream_id == "stream-9"
    assert exc.last_sequence is None
    assert str(exc) == (
        "RESOURCE_EXHAUSTED: the provider is rate limiting (reason PROVIDER_RATE_LIMITED, correlation id corr-7)"
    )


def test_server_says_not_retryable_despite_a_retryable_code() -> None:
    details = trailers(
        grpc.StatusCode.UNAVAILABLE, "x", error_info("PROVIDER_ERROR", fault="SERVER", retryable="false")
    )

    exc = error_from_status(grpc.StatusCode.UNAVAILABLE, "x", details)

    assert exc.retryable is False
    assert exc.fault is Fault.SERVER


def test_bad_request_lists_field_violations() -> None:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="max_output_tokens", description="must be at least 1"),
            error_details_pb2.BadRequest.FieldViolation(field="messages", description="must not be empty"),
        ]
    )
    details = trailers(
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid request",
        error_info("INVALID_REQUEST", fault="CALLER", retryable="false"),
        bad_request,
    )

    exc = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "invalid request", details)

    assert isinstance(exc, InvalidRequestError)
    assert exc.fault is Fault.CALLER
    assert exc.field_violations == [("max_output_tokens", "must be at least 1"), ("messages", "must not be empty")]


def test_error_info_of_another_domain_is_ignored() -> None:
    foreign = error_details_pb2.ErrorInfo(reason="QUOTA", domain="proxy.example.com", metadata={"retryable": "false"})
    details = trailers(grpc.StatusCode.UNAVAILABLE, "x", foreign)

    exc = error_from_status(grpc.StatusCode.UNAVAILABLE, "x", details)

    assert exc.reason == ""
    assert exc.retryable is True


def test_mangled_details_do_not_hide_the_code() -> None:
    exc = error_from_status(grpc.StatusCode.INTERNAL, "oops", (("grpc-status-details-bin", b"\xff\xff\xff"),))

    assert isinstance(exc, InternalServerError)
    assert exc.reason == ""


def test_details_are_read_from_grpc_aio_metadata_too() -> None:
    raw = trailers(grpc.StatusCode.NOT_FOUND, "unknown route 'x'", error_info("ROUTE_NOT_FOUND", fault="CALLER"))
    metadata = grpc.aio.Metadata(("x-other", "value"), *raw)

    exc = error_from_status(grpc.StatusCode.NOT_FOUND, "unknown route 'x'", metadata)

    assert exc.reason == "ROUTE_NOT_FOUND"
    assert exc.fault is Fault.CALLER


def test_error_event_facts_win_over_the_rich_status() -> None:
    details = trailers(
        grpc.StatusCode.UNAVAILABLE,
        "the provider failed",
        error_info("PROVIDER_ERROR", fault="PROVIDER", retryable="true", provider="older", stream_id="stream-1"),
    )
    event = pb.Error(
        code=pb.ERROR_CODE_PROVIDER_UNAVAILABLE,
        fault=pb.FAULT_PROVIDER,
        grpc_code=grpc.StatusCode.UNAVAILABLE.value[0],
        message="the provider failed",
        retryable=True,
        retry_after=duration_pb2.Duration(seconds=3),
        provider="anthropic",
        provider_http_status=529,
        last_sequence=7,
        correlation_id="corr-1",
    )

    exc = error_from_status(grpc.StatusCode.UNAVAILABLE, "the provider failed", details, event, last_sequence=9)

    assert isinstance(exc, UnavailableError)
    assert exc.reason == "PROVIDER_UNAVAILABLE"
    assert exc.provider == "anthropic"
    assert exc.provider_http_status == 529
    assert exc.retry_after == 3.0
    assert exc.last_sequence == 7
    assert exc.correlation_id == "corr-1"
    assert exc.stream_id == "stream-1"


def test_error_event_fills_what_a_bare_status_lacks() -> None:
    event = pb.Error(
        code=pb.ERROR_CODE_SERVER_SHUTTING_DOWN,
        fault=pb.FAULT_SERVER,
        grpc_code=grpc.StatusCode.UNAVAILABLE.value[0],
        message="the server is shutting down",
        retryable=True,
        last_sequence=4,
    )

    exc = error_from_status(grpc.StatusCode.UNAVAILABLE, "", None, event, stream_id="s-2")

    assert exc.message == "the server is shutting down"
    assert exc.reason == "SERVER_SHUTTING_DOWN"
    assert exc.fault is Fault.SERVER
    assert exc.retryable is True
    assert exc.retry_after is None
    assert exc.provider_http_status is None
    assert exc.last_sequence == 4
    assert exc.stream_id == "s-2"


def test_unknown_error_code_and_fault_in_the_event_keep_the_status_facts() -> None:
    details = trailers(grpc.StatusCode.INTERNAL, "bug", error_info("INTERNAL", fault="SERVER", correlation_id="c-3"))
    event = pb.Error(code=pb.ErrorCode.ValueType(999), fault=pb.Fault.ValueType(9), last_sequence=2)

    exc = error_from_status(grpc.StatusCode.INTERNAL, "bug", details, event)

    assert isinstance(exc, InternalServerError)
    assert exc.reason == "INTERNAL"
    assert exc.fault is Fault.SERVER
    assert exc.correlation_id == "c-3"
    assert str(exc) == "INTERNAL: bug (reason INTERNAL, correlation id c-3)"
