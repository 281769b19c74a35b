"""Errors over HTTP: each code's status, its Retry-After, and one JSON body for every endpoint.

The status follows the gRPC code the contract gives each error (`service.wire.STATUS_CODES`),
mapped the usual way (google.rpc's HTTP mapping), so a caller of either door reads the same
taxonomy. The body is OpenAI's error shape, which the OpenAI SDKs parse, with tokenwire's
fields beside OpenAI's: `{"error": {"message", "type", "param", "code", "status", "retryable",
...}}`.
"""

from __future__ import annotations

import math
from typing import Any

import grpc

from service.errors import GatewayError, sanitize
from service.wire import STATUS_CODES

_C = grpc.StatusCode
HTTP_STATUSES: dict[grpc.StatusCode, int] = {
    _C.INVALID_ARGUMENT: 400,
    _C.OUT_OF_RANGE: 400,
    _C.UNAUTHENTICATED: 401,
    _C.PERMISSION_DENIED: 403,
    _C.NOT_FOUND: 404,
    _C.ALREADY_EXISTS: 409,
    _C.ABORTED: 409,
    _C.RESOURCE_EXHAUSTED: 429,
    # nginx's "client closed request": there is no standard status for a cancelled call.
    _C.CANCELLED: 499,
    _C.INTERNAL: 500,
    _C.UNAVAILABLE: 503,
    _C.DEADLINE_EXCEEDED: 504,
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def http_status(err: GatewayError) -> int:
    return HTTP_STATUSES.get(STATUS_CODES[err.code], 500)


def retry_after_header(err: GatewayError) -> dict[str, str]:
    """Retry-After in whole seconds (HTTP has no fractions), for an error a retry may cure."""
    if not err.retryable:
        return {}
    return {"Retry-After": str(max(1, math.ceil(err.retry_after))) if err.retry_after is not None else "1"}


def error_body(err: GatewayError, *, stream_id: str = "", last_sequence: int | None = None) -> dict[str, Any]:
    status = http_status(err)
    field = err.field_violations[0][0] if err.field_violations else None
    body: dict[str, Any] = {
        "message": sanitize(err.message),
        "type": _TYPES.get(status, "server_error"),
        "param": field,
        "code": err.code.value.lower(),
        "status": STATUS_CODES[err.code].name,
        "retryable": err.retryable,
    }
    if err.retry_after is not None:
        body["retry_after_seconds"] = err.retry_after
    if err.provider:
        body["provider"] = sanitize(err.provider)
    if err.provider_http_status is not None:
        body["provider_http_status"] = err.provider_http_status
    if err.correlation_id:
        body["correlation_id"] = err.correlation_id
    if stream_id:
        body["stream_id"] = stream_id
    if last_sequence is not None:
        body["last_sequence"] = last_sequence
    return {"error": body}
