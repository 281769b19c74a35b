"""The error taxonomy matches the contract: the proto's ErrorCode, and CONTRACT.md's mapping."""

from __future__ import annotations

import grpc
import pytest

from service.errors import ErrorCode, Fault
from service.wire import STATUS_CODES
from tokenwire.v1 import generation_pb2 as pb

C = grpc.StatusCode


def test_error_codes_mirror_the_proto_enum() -> None:
    proto = {name.removeprefix("ERROR_CODE_") for name, _ in pb.ErrorCode.items()} - {"UNSPECIFIED"}
    assert {code.value for code in ErrorCode} == proto
    assert set(STATUS_CODES) == set(ErrorCode)


def test_fault_follows_the_proto_grouping() -> None:
    # The proto numbers caller codes 1-19, provider codes 20-39 and server codes from 40.
    for code in ErrorCode:
        number = pb.ErrorCode.Value("ERROR_CODE_" + code.value)
        expected = Fault.CALLER if number < 20 else Fault.PROVIDER if number < 40 else Fault.SERVER
        assert code.fault is expected, code


@pytest.mark.parametrize(
    ("code", "status", "retryable"),
    [
        (ErrorCode.INVALID_REQUEST, C.INVALID_ARGUMENT, False),
        (ErrorCode.ROUTE_NOT_FOUND, C.NOT_FOUND, False),
        (ErrorCode.UNAUTHENTICATED, C.UNAUTHENTICATED, False),
        (ErrorCode.PERMISSION_DENIED, C.PERMISSION_DENIED, False),
        (ErrorCode.QUOTA_EXCEEDED, C.RESOURCE_EXHAUSTED, True),
        (ErrorCode.SERVER_OVERLOADED, C.RESOURCE_EXHAUSTED, True),
        (ErrorCode.PROVIDER_RATE_LIMITED, C.RESOURCE_EXHAUSTED, True),
        (ErrorCode.PROVIDER_UNAVAILABLE, C.UNAVAILABLE, True),
        (ErrorCode.PROVIDER_TIMEOUT, C.UNAVAILABLE, True),
        (ErrorCode.PROVIDER_STREAM_TRUNCATED, C.UNAVAILABLE, True),
        (ErrorCode.PROVIDER_REJECTED_REQUEST, C.INVALID_ARGUMENT, False),
        (ErrorCode.PROVIDER_AUTH_FAILED, C.INTERNAL, False),  # never UNAUTHENTICATED: not the caller's key
        (ErrorCode.SERVER_SHUTTING_DOWN, C.UNAVAILABLE, True),
        (ErrorCode.INTERNAL, C.INTERNAL, False),
        (ErrorCode.STREAM_NOT_FOUND, C.NOT_FOUND, False),
        (ErrorCode.CURSOR_OUT_OF_RANGE, C.OUT_OF_RANGE, False),
        (ErrorCode.STREAM_ALREADY_EXISTS, C.ALREADY_EXISTS, False),
        (ErrorCode.STREAM_CANCELLED, C.CANCELLED, False),
        (ErrorCode.STREAM_ABANDONED, C.ABORTED, False),
        (ErrorCode.PRODUCER_LOST, C.UNAVAILABLE, True),
        (ErrorCode.JOURNAL_FULL, C.RESOURCE_EXHAUSTED, True),
        (ErrorCode.JOURNAL_UNAVAILABLE, C.UNAVAILABLE, True),
    ],
)
def test_contract_mapping(code: ErrorCode, status: grpc.StatusCode, retryable: bool) -> None:
    assert STATUS_CODES[code] is status
    assert code.retryable is retryable
