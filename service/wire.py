"""Errors on the wire: each code's gRPC status, the in-stream `Error` event, and the rich status
that mirrors it."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from service.errors import ErrorCode, GatewayError, sanitize
from service.events import ResponseFormatType, Source
from service.providers.base import Capabilities, MediaSupport
from tokenwire.v1 import generation_pb2 as pb

ERROR_DOMAIN = "tokenwire"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_C = grpc.StatusCode
STATUS_CODES: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_REQUEST: _C.INVALID_ARGUMENT,
    ErrorCode.ROUTE_NOT_FOUND: _C.NOT_FOUND,
    ErrorCode.UNAUTHENTICATED: _C.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: _C.PERMISSION_DENIED,
    ErrorCode.QUOTA_EXCEEDED: _C.RESOURCE_EXHAUSTED,
    ErrorCode.PROVIDER_RATE_LIMITED: _C.RESOURCE_EXHAUSTED,
    ErrorCode.PROVIDER_UNAVAILABLE: _C.UNAVAILABLE,
    ErrorCode.PROVIDER_TIMEOUT: _C.UNAVAILABLE,
    ErrorCode.PROVIDER_STREAM_TRUNCATED: _C.UNAVAILABLE,
    ErrorCode.PROVIDER_PROTOCOL_ERROR: _C.UNAVAILABLE,
    ErrorCode.PROVIDER_REJECTED_REQUEST: _C.INVALID_ARGUMENT,
    # The server's provider key is bad: an operator's problem, never the caller's credentials.
    ErrorCode.PROVIDER_AUTH_FAILED: _C.INTERNAL,
    ErrorCode.PROVIDER_ERROR: _C.UNAVAILABLE,
    ErrorCode.SERVER_SHUTTING_DOWN: _C.UNAVAILABLE,
    ErrorCode.SERVER_OVERLOADED: _C.RESOURCE_EXHAUSTED,
    ErrorCode.STREAM_DURATION_EXCEEDED: _C.DEADLINE_EXCEEDED,
    ErrorCode.INTERNAL: _C.INTERNAL,
    ErrorCode.STREAM_NOT_FOUND: _C.NOT_FOUND,
    ErrorCode.CURSOR_OUT_OF_RANGE: _C.OUT_OF_RANGE,
    ErrorCode.STREAM_ALREADY_EXISTS: _C.ALREADY_EXISTS,
    ErrorCode.STREAM_CANCELLED: _C.CANCELLED,
    ErrorCode.STREAM_ABANDONED: _C.ABORTED,
    ErrorCode.PRODUCER_LOST: _C.UNAVAILABLE,
    ErrorCode.JOURNAL_FULL: _C.RESOURCE_EXHAUSTED,
    ErrorCode.JOURNAL_UNAVAILABLE: _C.UNAVAILABLE,
}
_ERROR_CODES = {name.removeprefix("ERROR_CODE_"): value for name, value in pb.ErrorCode.items()}
_FAULTS = {"CALLER": pb.FAULT_CALLER, "PROVIDER": pb.FAULT_PROVIDER, "SERVER": pb.FAULT_SERVER}


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def error_event(err: GatewayError, last_sequence: int) -> pb.Error:
    event = pb.Error(
        code=_ERROR_CODES[err.code.value],
        fault=_FAULTS[err.code.fault.value],
        grpc_code=STATUS_CODES[err.code].value[0],
        message=sanitize(err.message),
        retryable=err.retryable,
        provider=sanitize(err.provider),
        last_sequence=last_sequence,
        correlation_id=err.correlation_id,
    )
    if err.retry_after is not None:
        event.retry_after.CopyFrom(duration(err.retry_after))
    if err.provider_http_status is not None:
        event.provider_http_status = err.provider_http_status
    return event


def status_metadata(err: GatewayError, stream_id: str) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying google.rpc.Status with ErrorInfo, RetryInfo and BadRequest."""
    info = error_details_pb2.ErrorInfo(
        reason=err.code.value,
        domain=ERROR_DOMAIN,
        metadata={"fault": err.code.fault.value, "retryable": "true" if err.retryable else "false"},
    )
    for key, value in (
        ("stream_id", stream_id),
        ("provider", err.provider),
        ("correlation_id", err.correlation_id),
        ("provider_http_status", "" if err.provider_http_status is None else str(err.provider_http_status)),
    ):
        if value:
            info.metadata[key] = sanitize(value)
    details = [info]
    if err.retryable and err.retry_after is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay=duration(err.retry_after)))
    if err.field_violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=sanitize(f), description=sanitize(d))
                    for f, d in err.field_violations
                ]
            )
        )
    status = status_pb2.Status(code=STATUS_CODES[err.code].value[0], message=sanitize(err.message))
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return ((_STATUS_DETAILS_KEY, status.SerializeToString()),)


def set_status(context: grpc.aio.ServicerContext[Any, Any], err: GatewayError, stream_id: str) -> None:
    context.set_code(STATUS_CODES[err.code])
    context.set_details(sanitize(err.message))
    context.set_trailing_metadata(status_metadata(err, stream_id))


_PROMPT_CACHING = {name.removeprefix("PROMPT_CACHING_").lower(): v for name, v in pb.PromptCaching.items()}
_RESPONSE_FORMATS = {
    ResponseFormatType.TEXT: pb.RESPONSE_FORMAT_TYPE_TEXT,
    ResponseFormatType.JSON_OBJECT: pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    ResponseFormatType.JSON_SCHEMA: pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}


def _media_support(support: MediaSupport) -> pb.MediaSupport:
    return pb.MediaSupport(
        media_types=[
            pb.MediaTypeSupport(
                media_type=media_type,
                data=Source.DATA in sources,
                url=Source.URL in sources,
                file_id=Source.FILE_ID in sources,
            )
            for media_type, sources in sorted(support.types.items())
        ],
        max_part_bytes=support.max_part_bytes if support.types else 0,
        url_schemes=support.url_schemes if support.types else (),
    )


def capabilities(caps: Capabilities) -> dict[str, Any]:
    """A route's capabilities as the fields of its ListModels entry."""
    return {
        "images": _media_support(caps.images),
        "documents": _media_support(caps.documents),
        "audio": _media_support(caps.audio),
        "prompt_caching": _PROMPT_CACHING[caps.prompt_caching.value],
        "cache_ttls": [duration(ttl) for ttl in caps.cache_ttls],
        "response_formats": sorted(_RESPONSE_FORMATS[f] for f in caps.response_formats),
        "supports_citations": caps.citations,
    }
