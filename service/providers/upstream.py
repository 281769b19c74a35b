"""What the HTTP provider adapters share: credentials, timeouts, reading the raw event stream, and
turning HTTP and transport failures into the error taxonomy.

The vendor SDKs build the request (auth, headers, base URLs) and make their error classes; a route
builds its request once through its SDK and keeps it as a template (`TemplateSender`), and the
adapters read the response body themselves, through `events`, and parse each event with orjson.
Retries are not the SDKs' business here: every client is built with `max_retries=0`, and the
router is the one retry owner, because only it knows the caller's deadline and the fallbacks.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import email.utils
import math
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import httpx2
import orjson

from service.config import ConfigError, RouteConfig
from service.errors import ErrorCode, GatewayError, register_secret, sanitize, stream_truncated
from service.events import EventStream, Finished, GenerationRequest, ProviderEvent
from service.providers import http1
from service.providers.base import Provider, bounds
from service.providers.framing import Framing, FramingError
from service.providers.sse import SSEDecoder

# Longest provider-supplied error text passed on to callers (after sanitizing).
_MAX_PROVIDER_MESSAGE = 300
# After its end marker, a body gets this long to end by itself so that its connection can be
# reused; the rest of it is almost always in hand already, and the Finish waits for this.
_DRAIN_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """The options every HTTP route takes for its connections to the provider: each provider's
    typed options (see `service.providers.base.read_options`) extend this class, and
    `HTTPSettings.of` turns them into the route's settings."""

    connect_timeout_seconds: float = bounds(10.0, minimum=0.1, maximum=600.0)
    read_timeout_seconds: float = bounds(120.0, minimum=0.1, maximum=3600.0)
    # Connections to the provider open at once, all kept alive for reuse: a stream holds one
    # for its whole life, so this bounds the route's concurrent streams.
    max_connections: int = bounds(1000, minimum=1, maximum=100_000)
    # The transport's pool (service/providers/http1.py): idle keep-alive expiry, connection
    # lifetime, and how long a DNS answer is reused.
    keepalive_expiry_seconds: float = bounds(http1.KEEPALIVE_EXPIRY, minimum=0.0)
    max_connection_age_seconds: float = bounds(http1.MAX_CONNECTION_AGE, minimum=0.0)
    dns_ttl_seconds: float = bounds(http1.DNS_TTL, minimum=0.0)


def checked_url(route: RouteConfig, key: str, url: str) -> str:
    """A route's provider URL option `key`, which must be set and be http(s)."""
    if not url:
        raise ConfigError(f"[routes.{route.name}] options.{key} is required for provider {route.provider!r}")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"[routes.{route.name}] options.{key} must be an http:// or https:// URL")
    return url


def route_key(route: RouteConfig, key_env: str, *, required: bool = True) -> str:
    """The API key in the environment variable `key_env` ("" for none), registered as a secret."""
    key = os.environ.get(key_env, "") if key_env else ""
    if required and not key:
        raise ConfigError(
            f"[routes.{route.name}] environment variable {key_env or '(none)'} is not set; it holds the "
            f"provider's API key (change the variable's name with options.api_key_env)"
        )
    if key:
        # From here on no log line or message can carry it, whatever shape it has.
        register_secret(key)
    return key


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    """A route's connection settings: where, with which key, and its `ConnectionOptions`."""

    base_url: str
    api_key: str
    connect_timeout: float
    read_timeout: float
    max_connections: int
    keepalive_expiry: float = http1.KEEPALIVE_EXPIRY
    max_connection_age: float = http1.MAX_CONNECTION_AGE
    dns_ttl: float = http1.DNS_TTL

    @staticmethod
    def of(options: ConnectionOptions, base_url: str, api_key: str) -> HTTPSettings:
        return HTTPSettings(
            base_url=base_url,
            api_key=api_key,
            connect_timeout=options.connect_timeout_seconds,
            read_timeout=options.read_timeout_seconds,
            max_connections=options.max_connections,
            keepalive_expiry=options.keepalive_expiry_seconds,
            max_connection_age=options.max_connection_age_seconds,
            dns_ttl=options.dns_ttl_seconds,
        )

    def transport(self) -> http1.Transport | None:
        """The route's own connection pool; None where an environment proxy applies to the route
        (its requests then go through httpx2's transport, see `http1.http_client`)."""
        if http1.proxied(self.base_url):
            return None
        return http1.Transport(
            max_connections=self.max_connections,
            keepalive_expiry=self.keepalive_expiry,
            max_connection_age=self.max_connection_age,
            dns_ttl=self.dns_ttl,
        )

    def http_client(
        self,
        client_class: type[httpx2.AsyncClient],
        transport: http1.Transport | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        also: tuple[str, ...] = (),
    ) -> httpx2.AsyncClient:
        """The httpx2 client for the route's SDK (`client_class`, the SDK's own defaults), on
        `transport` when given (one pool shared with the route's request templates); see
        `http1.http_client` for `ssl_context` and `also` (other hosts the route reaches)."""
        return http1.http_client(
            client_class,
            self.base_url,
            self.max_connections,
            keepalive_expiry=self.keepalive_expiry,
            max_connection_age=self.max_connection_age,
            dns_ttl=self.dns_ttl,
            transport=transport,
            ssl_context=ssl_context,
            also=also,
        )

    def limits(self, request: GenerationRequest) -> tuple[float, float]:
        """The route's (connect, read) timeouts, never longer than what is left of the caller's
        deadline. Writing and waiting for a pooled connection take the connect timeout.

        The read timeout bounds the silence between two pieces of the body: a stalled provider
        ends as PROVIDER_TIMEOUT instead of holding the stream open.
        """
        connect, read = self.connect_timeout, self.read_timeout
        if request.deadline is not None:
            remaining = max(request.deadline - time.monotonic(), 0.001)
            connect, read = min(connect, remaining), min(read, remaining)
        return connect, read

    def timeout(self, request: GenerationRequest) -> httpx2.Timeout:
        """`limits` as httpx2's timeouts."""
        connect, read = self.limits(request)
        return httpx2.Timeout(connect=connect, read=read, write=connect, pool=connect)


def loads(data: bytes, provider: str) -> dict[str, Any]:
    """One event's JSON object; anything else is a protocol error, never a silently skipped chunk."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise GatewayError(
            ErrorCode.PROVIDER_PROTOCOL_ERROR, "the provider sent an event that is not valid JSON", provider=provider
        ) from None
    if not isinstance(value, dict):
        raise GatewayError(
            ErrorCode.PROVIDER_PROTOCOL_ERROR, "the provider sent an event that is not a JSON object", provider=provider
        )
    return value


async def drain(read: Callable[[], Awaitable[bytes]]) -> None:
    """Reads what is left of a body after its end marker, briefly, so the connection can be reused.

    The answer is complete by now: a body that does not end in time, or breaks, costs only the
    connection.
    """
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            while await read():
                pass
    except (TimeoutError, httpx2.HTTPError):
        pass


def body_reader(response: httpx2.Response) -> Callable[[], Awaitable[bytes]]:
    """`read()` for a response's body: whatever arrived since the last call, b"" at its end.

    A body from our own transport (`http1`) is read straight from its connection. One through
    httpx2's transport (an environment proxy), or compressed on the way (a proxy may do that;
    the vendors do not), goes through httpx2's decoding iterator.
    """
    body = response.extensions.get(http1.BODY)
    if isinstance(body, http1.Body) and "content-encoding" not in response.headers:
        return body.read
    chunks = response.aiter_bytes()
    return lambda: anext(chunks, b"")


def token_count(value: object) -> int | None:
    """A usage count as the provider sent it; None when it is missing or not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def retry_after(headers: Mapping[str, str] | httpx2.Headers) -> float | None:
    """Seconds the provider asked us to wait: `retry-after-ms`, or `retry-after` as seconds or a date."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return _bounded(float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return _bounded(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return _bounded(when.timestamp() - time.time())


def _bounded(seconds: float) -> float | None:
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), 24 * 3600.0)


def provider_text(message: object, limit: int = _MAX_PROVIDER_MESSAGE) -> str:
    """A provider's own text (an error message, type or code), fit for a caller: sanitized (see
    `service.errors.sanitize`), bounded."""
    if not isinstance(message, str):
        return ""
    text = sanitize(message)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_or_none(raw: bytes) -> Any:
    """An error body as JSON, or None when it is not JSON (a proxy's HTML page, an empty body)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def error_detail(body: object) -> tuple[str, str]:
    """The (type, message) of a vendor error body: `{"error": {...}}` or the error object itself."""
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):
            body = inner
    if not isinstance(body, dict):
        return "", ""
    kind = body.get("type") or body.get("code") or ""
    return provider_text(kind, 64), provider_text(body.get("message"))


@dataclass(frozen=True, slots=True)
class ErrorTable:
    """One vendor's failures as data: which code each is in the taxonomy (CONTRACT.md's table), and
    where the wait a rate limit asks for comes from. The read loop and `sdk_error` consult it; an
    adapter states it once instead of testing exception classes in a chain.
    """

    # In-stream error types (an error event inside a status-200 body, by its type or code) -> code.
    stream_types: Mapping[str, ErrorCode] = field(default_factory=dict)
    # HTTP statuses whose code is not the one their range gives (4xx rejected, 5xx unavailable).
    statuses: Mapping[int, ErrorCode] = field(default_factory=lambda: dict(STATUS_CODES))
    # The SDK's exception for an HTTP error status (it carries `.response` and `.body`), and its
    # exception for a failed connection (it wraps httpx2's); None for an adapter that sends itself.
    status_exception: type[Exception] | None = None
    connection_exception: type[Exception] | None = None
    # The seconds to wait before a retry, from an error response's headers.
    retry_after: Callable[[Mapping[str, str] | httpx2.Headers], float | None] = field(
        default_factory=lambda: retry_after
    )

    def status_code(self, status: int) -> ErrorCode:
        code = self.statuses.get(status)
        if code is not None:
            return code
        if status >= 500:
            return ErrorCode.PROVIDER_UNAVAILABLE
        if 400 <= status < 500:
            return ErrorCode.PROVIDER_REJECTED_REQUEST
        return ErrorCode.PROVIDER_ERROR

    def with_stream_types(self, **extra: ErrorCode) -> ErrorTable:
        return dataclasses.replace(self, stream_types={**self.stream_types, **extra})


# The statuses every vendor uses alike (the rest follow their range).
STATUS_CODES: Mapping[int, ErrorCode] = {
    429: ErrorCode.PROVIDER_RATE_LIMITED,
    # The server's key is at fault, not the caller; the provider's text may quote the key.
    401: ErrorCode.PROVIDER_AUTH_FAILED,
    403: ErrorCode.PROVIDER_AUTH_FAILED,
    408: ErrorCode.PROVIDER_TIMEOUT,
    409: ErrorCode.PROVIDER_UNAVAILABLE,
}
# What the caller is told for each code of an HTTP error status.
_STATUS_TEXT: Mapping[ErrorCode, str] = {
    ErrorCode.PROVIDER_RATE_LIMITED: "rate limited; retry later",
    ErrorCode.PROVIDER_AUTH_FAILED: "it rejected this server's credentials",
    ErrorCode.PROVIDER_TIMEOUT: "request timeout",
    ErrorCode.PROVIDER_UNAVAILABLE: "the provider is failing or overloaded",
    ErrorCode.PROVIDER_REJECTED_REQUEST: "it rejected the request",
}
_NOT_FOUND_TEXT = "the provider does not know this model or endpoint; the route may be misconfigured"

# In-stream error types of the SSE vendors (OpenAI and the servers that copy it, Anthropic).
SSE_STREAM_TYPES: Mapping[str, ErrorCode] = {
    "overloaded_error": ErrorCode.PROVIDER_UNAVAILABLE,
    "api_error": ErrorCode.PROVIDER_UNAVAILABLE,
    "server_error": ErrorCode.PROVIDER_UNAVAILABLE,
    "service_unavailable": ErrorCode.PROVIDER_UNAVAILABLE,
    "rate_limit_error": ErrorCode.PROVIDER_RATE_LIMITED,
    "rate_limit_exceeded": ErrorCode.PROVIDER_RATE_LIMITED,
    "requests": ErrorCode.PROVIDER_RATE_LIMITED,
    "tokens": ErrorCode.PROVIDER_RATE_LIMITED,
    "timeout_error": ErrorCode.PROVIDER_TIMEOUT,
    "invalid_request_error": ErrorCode.PROVIDER_REJECTED_REQUEST,
    "request_too_large": ErrorCode.PROVIDER_REJECTED_REQUEST,
    "authentication_error": ErrorCode.PROVIDER_AUTH_FAILED,
    "permission_error": ErrorCode.PROVIDER_AUTH_FAILED,
}
DEFAULT_ERRORS = ErrorTable(stream_types=SSE_STREAM_TYPES)


def status_error(
    provider: str,
    status: int,
    headers: Mapping[str, str] | httpx2.Headers,
    body: object,
    table: ErrorTable = DEFAULT_ERRORS,
    *,
    kind: str = "",
) -> GatewayError:
    """An HTTP error response from the provider, classified by `table`. `kind`: the error's type
    when the vendor says it outside the body (AWS's x-amzn-errortype header)."""
    body_kind, text = error_detail(body)
    kind = kind or body_kind
    about = f"the provider answered HTTP {status}" + (f" ({kind})" if kind else "")
    code = table.status_code(status)
    if status == 404 and code is ErrorCode.PROVIDER_REJECTED_REQUEST:
        explanation = _NOT_FOUND_TEXT
    else:
        explanation = _STATUS_TEXT.get(code, "unexpected status")
        if code is ErrorCode.PROVIDER_REJECTED_REQUEST and text:
            explanation += f": {text}"
    return GatewayError(
        code,
        f"{about}: {explanation}",
        retry_after=table.retry_after(headers),
        provider=provider,
        provider_http_status=status,
    )


def stream_error(provider: str, body: object, table: ErrorTable = DEFAULT_ERRORS, *, kind: str = "") -> GatewayError:
    """An error the provider sent inside its event stream, after answering 200."""
    body_kind, text = error_detail(body)
    kind = kind or body_kind
    code = table.stream_types.get(kind, ErrorCode.PROVIDER_ERROR)
    message = f"the provider sent an error event ({kind or 'untyped'}) in its stream"
    if code is ErrorCode.PROVIDER_REJECTED_REQUEST and text:
        message += f": {text}"
    return GatewayError(code, message, provider=provider)


def transport_error(provider: str, exc: BaseException, *, started: bool) -> GatewayError:
    """A connection-level failure (httpx2's own exceptions, which escape the SDKs mid-body)."""
    if isinstance(exc, httpx2.PoolTimeout):
        # Our own limit, not the provider's: every connection of the route is streaming.
        return GatewayError(
            ErrorCode.SERVER_OVERLOADED,
            "every connection to this route's provider is busy (options.max_connections); retry",
            retry_after=1.0,
            provider=provider,
        )
    if isinstance(exc, httpx2.ConnectTimeout):
        return GatewayError(ErrorCode.PROVIDER_UNAVAILABLE, "timed out connecting to the provider", provider=provider)
    if isinstance(exc, httpx2.TimeoutException):
        return GatewayError(
            ErrorCode.PROVIDER_TIMEOUT, "the provider sent nothing within the read timeout", provider=provider
        )
    if isinstance(exc, httpx2.ConnectError):
        return GatewayError(ErrorCode.PROVIDER_UNAVAILABLE, "could not connect to the provider", provider=provider)
    if started:
        return stream_truncated(provider, "the provider's connection broke in the middle of its stream")
    return GatewayError(
        ErrorCode.PROVIDER_UNAVAILABLE, "the provider closed the connection without answering", provider=provider
    )


def truncated(provider: str) -> GatewayError:
    return stream_truncated(provider)


def sdk_error(provider: str, exc: Exception, table: ErrorTable, *, started: bool) -> GatewayError | None:
    """Classifies an exception from a vendor SDK or from httpx2 by `table`; None when it is neither (a bug)."""
    if table.status_exception is not None and isinstance(exc, table.status_exception):
        response: httpx2.Response = getattr(exc, "response")  # noqa: B009 - typed per SDK
        return status_error(provider, response.status_code, response.headers, getattr(exc, "body", None), table)
    if table.connection_exception is not None and isinstance(exc, table.connection_exception):
        # The SDKs wrap httpx2's exception; it says what happened.
        cause = exc.__cause__
        if isinstance(cause, httpx2.HTTPError):
            return transport_error(provider, cause, started=started)
        name = type(exc).__name__
        code = ErrorCode.PROVIDER_TIMEOUT if "Timeout" in name else ErrorCode.PROVIDER_UNAVAILABLE
        return GatewayError(code, "could not reach the provider", provider=provider)
    if isinstance(exc, httpx2.TransportError):
        return transport_error(provider, exc, started=started)
    if isinstance(exc, httpx2.RequestError):
        # A body that does not decode (a broken compressed stream), or a redirect loop.
        return GatewayError(
            ErrorCode.PROVIDER_PROTOCOL_ERROR, "the provider's response could not be read", provider=provider
        )
    return None


class StreamParser(Protocol):
    """Turns one vendor's events into neutral events, appending them to `out`."""

    out: list[ProviderEvent]
    # Set once the vendor's end marker arrived: nothing after it matters.
    done: bool
    # The provider's id of the request, from its response headers ("" when it sent none).
    request_id: str

    def handle(self, name: bytes, data: bytes) -> None: ...

    def finish(self) -> Finished:
        """The terminal event once the body ended; raises when the end marker never came."""
        ...


_ORJSON_BUFFER = 4096


def json_bytes(body: dict[str, Any]) -> bytes:
    """A request body as JSON bytes, made by orjson in one copy.

    The SDKs, given the dict, walk it once more and serialize it with `json.dumps` to a str and
    then encode that: for a prompt of a few MiB, two more copies of it at once. The bodies hold
    only what JSON has (validation refuses NaN and infinities), so both ways send the same JSON.
    """
    content = orjson.dumps(body)
    if len(content) < _ORJSON_BUFFER:
        # orjson's bytes keep its whole first buffer (4 KiB, measured with tracemalloc), and the
        # request holds them for the stream's life: an exact-size copy of a small body instead.
        content = b"".join((content, b""))
    return content


@contextlib.asynccontextmanager
async def post_streaming(
    client: Any, path: str, content: bytes, limits: httpx2.Timeout, headers: Mapping[str, str] | None = None
) -> AsyncIterator[httpx2.Response]:
    """POSTs the JSON bytes `content` through a vendor SDK's client and yields the response with
    its body unread.

    The SDK supplies the base URL (and Azure's deployment path), authentication, its headers and,
    for an error status, its exception classes. Its generic `post` is used rather than the typed
    `create`: that one first walks the whole body to rename aliased keys (our bodies have none),
    which cost more than the rest of sending the request.
    """
    response: httpx2.Response = await client.post(
        path,
        cast_to=httpx2.Response,
        content=content,
        options={"timeout": limits, "headers": headers} if headers else {"timeout": limits},
        stream=True,
        stream_cls=None,
    )
    try:
        yield response
    finally:
        await response.aclose()


@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """A route's request as its SDK builds it, made once: the head's lines that are the same for
    every request (request line with Azure's deployment path and api-version query, Host, the
    auth header, the SDK's User-Agent and X-Stainless-* headers, content type, anthropic-version).
    Per request only the lines that carry its read timeout, its Content-Length and its body are
    added (`render`)."""

    url: httpx2.URL
    origin: http1.Origin
    # Holds the auth header: kept out of the repr, as the credential is.
    head: bytes = field(repr=False)
    # The headers whose value the SDK sets to the request's read timeout, in seconds.
    timeout_headers: tuple[bytes, ...] = ()
    # The SDK's credentials when it was built: when they change it is built again.
    credential: object = field(default=None, repr=False)

    def render(self, read_timeout: float, length: int) -> bytes:
        value = str(read_timeout).encode()
        parts = [self.head]
        for name in self.timeout_headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"Content-Length: %d\r\n\r\n" % length)
        return b"".join(parts)


# Two read timeouts no route has: the SDK builds the request with each, and the headers whose
# value follows them are the ones `render` fills in.
_PROBE_TIMEOUTS = (httpx2.Timeout(7.25, read=11.75), httpx2.Timeout(7.5, read=13.5))
_BODY_HEADERS = (b"content-length", b"transfer-encoding")


def request_template(first: httpx2.Request, second: httpx2.Request, credential: object) -> RequestTemplate | None:
    """The template of two builds of one request, made with the read timeouts of _PROBE_TIMEOUTS;
    None when they differ in anything else (a per-request id or signature: only the SDK can make
    such a request)."""
    url = first.url
    if (
        first.method != "POST"
        or second.method != "POST"
        or url != second.url
        or url.raw_scheme not in (b"http", b"https")
        # A user and password in the URL: the client adds their Basic auth only as it sends.
        or url.userinfo
    ):
        return None
    a, b = first.headers.raw, second.headers.raw
    if len(a) != len(b):
        return None
    reads = [str(t.read).encode() for t in _PROBE_TIMEOUTS]
    lines = [b"POST " + url.raw_path + b" HTTP/1.1"]
    timeout_headers: list[bytes] = []
    for (name, value), (other_name, other_value) in zip(a, b, strict=True):
        lower = name.lower()
        if lower != other_name.lower():
            return None
        if lower in _BODY_HEADERS or lower == b"cookie":
            # The body's are per request; cookies come from the client's jar as each is sent.
            continue
        if value == other_value:
            lines.append(name + b": " + value)
        elif [value, other_value] == reads:
            timeout_headers.append(name)
        else:
            return None
    lines.append(b"")
    return RequestTemplate(url, http1.origin_of(url), b"\r\n".join(lines), tuple(timeout_headers), credential)


async def sdk_request(client: Any, options_class: Any, path: str, limits: httpx2.Timeout) -> httpx2.Request:
    """The request a vendor SDK's `client` sends for `post_streaming(client, path, ...)`, made the
    way its `request()` makes it for a first attempt, without sending it."""
    options = options_class.construct(
        method="post", url=path, content=b"{}", timeout=limits, idempotency_key=client._idempotency_key()
    )
    options = await client._prepare_options(options)
    request: httpx2.Request = client._build_request(options, retries_taken=0)
    await client._prepare_request(request)
    return request


# Templates one route keeps (Azure has one per deployment a request names).
_MAX_TEMPLATES = 64


class TemplateSender:
    """Sends a route's requests from `RequestTemplate`s: the SDK builds each path's request once
    (again when its credentials change), and per request only the head's variable lines and the
    orjson body are written, through the route's own transport. What a template cannot stand for
    goes through the SDK as before: credentials it refreshes per request (`dynamic()`), extra
    headers, a route behind an environment proxy, a request whose builds differ, a redirect.

    An error status is raised as the SDK's own exception, made by the SDK from the response,
    so that the route's ErrorTable classifies it as it classifies the SDK's.
    """

    def __init__(
        self,
        client: Any,
        transport: http1.Transport | None,
        options_class: Any,
        *,
        credential: Callable[[], object],
        dynamic: Callable[[], bool],
    ) -> None:
        self._client = client
        self._transport = transport
        self._options_class = options_class
        self._credential = credential
        self._dynamic = dynamic
        self._templates: dict[str, RequestTemplate | None] = {}
        # The SDK's httpx2 client: its cookie jar is kept as it keeps it on the SDK's path.
        self._http: httpx2.AsyncClient | None = getattr(client, "_client", None)

    async def template(self, path: str) -> RequestTemplate | None:
        """The template for POSTs to `path`; None when the SDK must send them itself.

        `dynamic()` is asked only when one is built: how an SDK client makes its credentials is
        fixed when the client is made (a few µs a request saved); its key is compared every time.
        """
        if self._transport is None:
            return None
        credential = self._credential()
        if path in self._templates:
            known = self._templates[path]
            if known is None or known.credential == credential:
                return known
        template = None
        # The client's own auth (an httpx Auth flow) is applied as it sends: only it can send.
        if not self._dynamic() and getattr(self._http, "auth", None) is None:
            first, second = [await sdk_request(self._client, self._options_class, path, t) for t in _PROBE_TIMEOUTS]
            template = request_template(first, second, credential)
        if len(self._templates) >= _MAX_TEMPLATES:
            self._templates.clear()
        self._templates[path] = template
        return template

    @contextlib.asynccontextmanager
    async def post(
        self, path: str, content: bytes, limits: tuple[float, float], headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[httpx2.Response]:
        """Like `post_streaming`: POSTs the JSON bytes `content` to `path` within `limits`
        (HTTPSettings.limits), and yields the response with its body unread."""
        template = None if headers else await self.template(path)
        response = None if template is None else await self._send(path, template, content, limits)
        if response is None:
            connect, read = limits
            timeout = httpx2.Timeout(connect=connect, read=read, write=connect, pool=connect)
            async with post_streaming(self._client, path, content, timeout, headers) as response:
                yield response
            return
        try:
            yield response
        finally:
            await response.aclose()

    async def _send(
        self, path: str, template: RequestTemplate, content: bytes, limits: tuple[float, float]
    ) -> httpx2.Response | None:
        connect, read = limits
        assert self._transport is not None
        head = template.render(read, len(content))
        jar = self._http.cookies if self._http is not None else None
        request = None
        if jar:
            # The client's cookies for this URL, as it would send them.
            request = httpx2.Request("POST", template.url)
            jar.set_cookie_header(request)
            cookie = request.headers.get("cookie")
            if cookie:
                head = head[:-2] + b"Cookie: " + cookie.encode("latin-1") + b"\r\n\r\n"
        response = await self._transport.send_head(
            template.origin, head, content, {"connect": connect, "read": read, "write": connect, "pool": connect}
        )
        if jar is not None and "set-cookie" in response.headers:
            # Kept as the client keeps them (a load balancer's stickiness, a bot-management cookie).
            response.request = request = request or httpx2.Request("POST", template.url)
            jar.extract_cookies(response)
        status = response.status_code
        if 200 <= status < 300:
            return response
        try:
            if status < 400:
                # The SDK's client follows redirects: it sends this one, and the path's requests
                # from now on (a redirect answered once is answered again).
                self._templates[path] = None
                return None
            response.request = request or httpx2.Request("POST", template.url)
            await response.aread()
            raise self._client._make_status_error_from_response(response)
        finally:
            await response.aclose()


class HTTPProvider(Provider):
    """A provider reached over HTTP through its vendor's SDK: its body read raw, through the
    vendor's framing (server-sent events unless it says otherwise), by one read loop."""

    # How the vendor's failures map to the taxonomy.
    errors: ClassVar[ErrorTable] = DEFAULT_ERRORS
    # The response header that carries the provider's request id.
    request_id_header: ClassVar[str]

    @abc.abstractmethod
    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        """Sends the request; entering yields the HTTP response, its body not yet read."""

    @abc.abstractmethod
    def _parser(self, request: GenerationRequest) -> StreamParser: ...

    def _framing(self) -> Framing:
        """A decoder of the body's framing, one per response: server-sent events unless overridden."""
        return SSEDecoder()

    def stream(self, request: GenerationRequest) -> EventStream:
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> EventStream:
        parser = self._parser(request)
        out = parser.out
        decoder = self._framing()
        started = False
        try:
            async with self._send(request) as response:
                parser.request_id = response.headers.get(self.request_id_header, "")
                read = body_reader(response)
                while True:
                    chunk = await read()
                    try:
                        if chunk:
                            started = True
                            events = decoder.feed(chunk)
                        else:
                            # The body ended, and its end may complete the last event (after a CR).
                            events = decoder.close()
                    except FramingError as exc:
                        raise GatewayError(
                            ErrorCode.PROVIDER_PROTOCOL_ERROR,
                            f"the provider's stream is broken: {exc}",
                            provider=self.kind,
                        ) from None
                    for name, data in events:
                        try:
                            parser.handle(name, data)
                        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
                            raise GatewayError(
                                ErrorCode.PROVIDER_PROTOCOL_ERROR,
                                "the provider sent an event of an unexpected shape",
                                provider=self.kind,
                            ) from None
                        if out:
                            for event in out:
                                yield event
                            out.clear()
                        if parser.done:
                            break
                    if parser.done:
                        if chunk:
                            await drain(read)
                        break
                    if not chunk:
                        break
                finished = parser.finish()
            yield finished
        except GatewayError:
            raise
        except Exception as exc:
            err = sdk_error(self.kind, exc, self.errors, started=started)
            if err is None:
                raise
            raise err from None
