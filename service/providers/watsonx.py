"""IBM watsonx.ai chat: `POST {url}/ml/v1/text/chat_stream?version=...` for a foundation model in a
project or a space, or `{url}/ml/v1/deployments/{id}/text/chat_stream?version=...` for a deployment,
with an IAM access token (exchanged for an API key, cached, refreshed before it expires) or a fixed
bearer token (a Cloud Pak for Data token).

The `ibm-watsonx-ai` SDK (the `tokenwire[watsonx]` extra, imported when a watsonx route is
configured) gives the endpoints: the chat and deployment paths, the API version it is released
with, the IAM token endpoint and its form. Nothing is sent through it, for what its HTTP does here:
`max_retries=0` still sends 4 requests on a 401/500/503 (its httpx transport retries again), a 429
gets 11; with `verify` unset an untrusted certificate falls back to no verification, process-wide;
its IAM authenticator is bound to an `APIClient`, whose construction blocks on network calls (a
token, service lookups); every HTTP error is one `WMLClientError` with the status only in its text;
and its stream iterator does not notice a stream that ends without a finish reason. So the token
exchange and the chat request go through tokenwire's own transport, with the route's CA bundle (or
the system's trust) always verified, one request per attempt, and the body read raw through the
shared read loop.

The chat stream is OpenAI-like server-sent events: `data:` chunks with `choices[0].delta` (content,
reasoning_content, tool_calls) and `finish_reason`, usage in the last chunk; a failure inside the
stream is an `event: error` frame whose data is watsonx's error body (`{"errors": [{"code",
"message"}], "status_code"}`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib.resources
import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson

from service.config import ConfigError, RouteConfig
from service.errors import ErrorCode, GatewayError, invalid_request, register_secret, unregister_secret
from service.events import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerationRequest,
    Part,
    PartKind,
    ResponseFormatType,
    Role,
    Source,
    ToolChoiceMode,
)
from service.providers.base import MIB, Capabilities, bounds, media, read_options, vendor_sdk
from service.providers.chat_completions import (
    ChunkReader,
    add_sampling,
    function_tools,
    json_schema_format,
    reasoning_effort,
)
from service.providers.upstream import (
    STATUS_CODES,
    ConnectionOptions,
    ErrorTable,
    HTTPProvider,
    HTTPSettings,
    json_or_none,
    loads,
    provider_text,
    status_error,
    transport_error,
    truncated,
)

# Every finish reason watsonx documents for chat (TextChatResultChoice), plus OpenAI's
# content_filter that its OpenAI-compatible models may pass on. "error" is not here: a generation
# that ended in an error is a failure, not a finish (see ChatStreamParser.finish).
FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    # The request's (or the service's) time limit for the generation.
    "time_limit": FinishReason.OTHER,
    "cancelled": FinishReason.CANCELLED,
    "content_filter": FinishReason.CONTENT_FILTER,
}
# watsonx's error codes (`errors[0].code`), in error bodies and `event: error` frames.
ERRORS = ErrorTable(
    stream_types={
        "internal_error": ErrorCode.PROVIDER_UNAVAILABLE,
        "internal_server_error": ErrorCode.PROVIDER_UNAVAILABLE,
        "service_unavailable": ErrorCode.PROVIDER_UNAVAILABLE,
        "model_unavailable": ErrorCode.PROVIDER_UNAVAILABLE,
        "downstream_request_failed": ErrorCode.PROVIDER_UNAVAILABLE,
        "too_many_requests": ErrorCode.PROVIDER_RATE_LIMITED,
        "rate_limit_exceeded": ErrorCode.PROVIDER_RATE_LIMITED,
        "token_quota_reached": ErrorCode.PROVIDER_RATE_LIMITED,
        "request_timeout": ErrorCode.PROVIDER_TIMEOUT,
        "invalid_input_argument": ErrorCode.PROVIDER_REJECTED_REQUEST,
        "json_validation_error": ErrorCode.PROVIDER_REJECTED_REQUEST,
        "invalid_request_entity": ErrorCode.PROVIDER_REJECTED_REQUEST,
        "model_not_supported": ErrorCode.PROVIDER_REJECTED_REQUEST,
        "authentication_token_expired": ErrorCode.PROVIDER_AUTH_FAILED,
        "authorization_rejected": ErrorCode.PROVIDER_AUTH_FAILED,
        "user_authorization_failed": ErrorCode.PROVIDER_AUTH_FAILED,
    },
    statuses={**STATUS_CODES, 499: ErrorCode.PROVIDER_UNAVAILABLE},
)
# IAM answers an API key it does not know with 400 (BXNIM0415E): the server's credentials, not the request.
_IAM_ERRORS = ErrorTable(statuses={**STATUS_CODES, 400: ErrorCode.PROVIDER_AUTH_FAILED})
# Vision models (Llama 3.2 vision, Granite vision, Pixtral) take images as base64 data: URLs only.
_IMAGES = media(dict.fromkeys(("image/png", "image/jpeg"), frozenset({Source.DATA})), 4 * MIB)
_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
_IAM_CLOUD = "https://iam.cloud.ibm.com"
# A token is refreshed once this share of its lifetime is left (at most 5 minutes before its end).
_REFRESH_SHARE = 0.2
_REFRESH_MAX_SECONDS = 300.0
# After a failed refresh while the token is still valid, the next try (at most half of what is left).
_REFRESH_RETRY_SECONDS = 5.0
log = logging.getLogger("tokenwire.watsonx")


@dataclass(frozen=True, slots=True)
class WatsonxOptions(ConnectionOptions):
    """A watsonx route's options (`[routes.NAME.options]`)."""

    # The service's base URL: a region's (https://us-south.ml.cloud.ibm.com) or a Cloud Pak for Data cluster's.
    url: str = ""
    # Where the model runs: a project or a space (the route's `model` is its model id), or a
    # deployment (the route's `model` is then informational).
    project_id: str = ""
    space_id: str = ""
    deployment_id: str = ""
    # The `version=` date of the API; empty: the one the SDK is released with.
    api_version: str = ""
    # "iam": an IBM Cloud API key exchanged for IAM tokens; "token": a bearer token as it is (CPD).
    auth: str = bounds("iam", choices=("iam", "token"))
    api_key_env: str = "WATSONX_APIKEY"
    token_env: str = "WATSONX_TOKEN"
    # The IAM service; empty: IBM Cloud's, for a `url` among the SDK's IBM Cloud URLs (compared
    # whatever its case, default port, trailing slash or dot). Required for any other `url`.
    iam_url: str = ""
    # The bound of one token exchange at IAM (connecting, sending, reading), whatever the route's timeouts.
    iam_timeout_seconds: float = bounds(10.0, minimum=0.1, maximum=120.0)
    # PEM file of the CAs to trust for the service and IAM; empty: the system's trust. Never off.
    ca_bundle_file: str = ""
    max_tokens_field: str = bounds("max_tokens", choices=_MAX_TOKENS_FIELDS)


def _b64(data: bytes | None) -> str:
    assert data is not None
    return base64.b64encode(data).decode("ascii")


def _text_of(message: ChatMessage, where: str) -> str:
    """A message that takes text only (system, assistant, tool): its parts must all be text."""
    if not message.parts:
        return message.text
    for j, part in enumerate(message.parts):
        if part.kind is not PartKind.TEXT:
            raise invalid_request(
                f"{where}.parts[{j}].{part.kind.value}",
                f"watsonx takes {part.kind.value} parts in user messages only",
            )
    return "".join(p.text for p in message.parts)


def _user_part(part: Part) -> dict[str, Any]:
    if part.kind is PartKind.TEXT:
        return {"type": "text", "text": part.text}
    # Validation let through only what _IMAGES takes: inline PNG or JPEG.
    return {"type": "image_url", "image_url": {"url": f"data:{part.media_type};base64,{_b64(part.data)}"}}


def _message(message: ChatMessage, where: str) -> dict[str, Any]:
    role = message.role
    if role is Role.USER:
        content: Any = [_user_part(p) for p in message.parts] if message.parts else message.text
        return {"role": "user", "content": content}
    if role is Role.TOOL:
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": _text_of(message, where)}
    if role is Role.ASSISTANT:
        out: dict[str, Any] = {"role": "assistant"}
        text = _text_of(message, where)
        if text or not message.tool_calls:
            out["content"] = text
        if message.tool_calls:
            # Earlier reasoning is not sent back: the chat API has no field for it.
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
                }
                for call in message.tool_calls
            ]
        return out
    return {"role": "system", "content": _text_of(message, where)}


def request_body(
    request: GenerationRequest, *, scope: dict[str, str], max_tokens_field: str = "max_tokens"
) -> dict[str, Any]:
    """The chat_stream body. `scope`: `model_id` and `project_id` or `space_id`; empty for a
    deployment (its path names it). Generation options only when the caller set them."""
    body: dict[str, Any] = {
        **scope,
        "messages": [_message(m, f"messages[{i}]") for i, m in enumerate(request.messages)],
    }
    add_sampling(body, request, max_tokens_field)
    choice = request.tool_choice
    if request.tools:
        body["tools"] = function_tools(request.tools)
        if choice.mode is ToolChoiceMode.NAMED:
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            # watsonx keeps the modes apart from a named choice.
            body["tool_choice_option"] = choice.mode.value
    elif choice.mode is ToolChoiceMode.NAMED:
        raise invalid_request("tool_choice", "a named tool choice needs tools")
    effort = reasoning_effort(request)
    if effort is not None:
        body["reasoning_effort"] = effort.value
        body["include_reasoning"] = True
    fmt = request.response_format
    if fmt is not None and fmt.type is not ResponseFormatType.TEXT:
        if fmt.type is ResponseFormatType.JSON_SCHEMA:
            body["response_format"] = json_schema_format(fmt, fmt.name or "response")
        else:
            body["response_format"] = {"type": "json_object"}
    return body


def _first_error(body: object) -> tuple[dict[str, Any], int | None]:
    """watsonx's error body -> (its first error, for error_detail; the status_code it states)."""
    if not isinstance(body, dict):
        return {}, None
    errors = body.get("errors")
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    status = body.get("status_code")
    return first, status if isinstance(status, int) and not isinstance(status, bool) else None


def http_error(
    provider: str, status: int, headers: httpx2.Headers | dict[str, str], first: dict[str, Any]
) -> GatewayError:
    """An error status: classified by watsonx's code (`errors[0].code`, the table of in-stream
    frames) when it knows it, else by the status; a 403 with `token_quota_reached` is a rate limit,
    a 400 with `model_unavailable` the provider's outage, not the caller's fault."""
    raw_code = first.get("code")
    code = ERRORS.stream_types.get(raw_code) if isinstance(raw_code, str) else None
    table = ERRORS if code is None else dataclasses.replace(ERRORS, statuses={**ERRORS.statuses, status: code})
    return status_error(provider, status, headers, first, table)


class TokenExpired(GatewayError):
    """watsonx's `authentication_token_expired` (in an `event: error` frame or an error body): the
    access token the request carried is no longer good, whatever its cached lifetime says."""


_TOKEN_EXPIRED = "authentication_token_expired"


def in_stream_error(provider: str, body: object) -> GatewayError:
    """An `event: error` frame (or an error body as a chunk): classified by its code, else by the
    status it states."""
    first, status = _first_error(body)
    raw_code = first.get("code")
    kind = raw_code if isinstance(raw_code, str) else ""
    code = ERRORS.stream_types.get(kind)
    if code is None:
        code = ERRORS.status_code(status) if status is not None else ErrorCode.PROVIDER_ERROR
    message = f"the provider sent an error event ({kind or 'untyped'}) in its stream"
    text = first.get("message")
    if code is ErrorCode.PROVIDER_REJECTED_REQUEST and isinstance(text, str) and text:
        message += f": {provider_text(text)}"
    kind_of = TokenExpired if kind == _TOKEN_EXPIRED else GatewayError
    return kind_of(code, message, provider=provider, provider_http_status=status or 0)


class ChatStreamParser(ChunkReader):
    """chat_stream chunks -> neutral events."""

    __slots__ = ()
    model_keys = ("model_id", "model")

    def handle(self, name: bytes, data: bytes) -> None:
        if name == b"error":
            try:
                body: object = orjson.loads(data)
            except orjson.JSONDecodeError:
                body = None
            raise in_stream_error(self.kind, body)
        if data == b"[DONE]":
            self.done = True
            return
        chunk = loads(data, self.kind)
        if "errors" in chunk:
            raise in_stream_error(self.kind, chunk)
        if not self.request_id:
            chunk_id = chunk.get("id")
            if isinstance(chunk_id, str):
                self.request_id = chunk_id
        self._read(chunk)
        # Usage comes with the finish reason or in a chunk of its own after it: the answer is
        # whole once both are in (or the body ends).
        if self.finish_reason is not None and self.usage is not None:
            self.done = True

    def finish(self) -> Finished:
        raw = self.finish_reason
        if raw is None:
            raise truncated(self.kind)
        if raw == "error":
            # watsonx's own "Error encountered": the answer is not whole, whatever came before.
            raise GatewayError(
                ErrorCode.PROVIDER_UNAVAILABLE,
                "the provider ended its stream with finish_reason 'error'",
                provider=self.kind,
            )
        reason = FINISH_REASONS.get(raw, FinishReason.OTHER)
        if reason is FinishReason.STOP and self.calls:
            reason = FinishReason.TOOL_CALLS
        return self._finished(reason, raw)


class IAMToken:
    """An IAM access token for an API key: fetched on first use, reused, and fetched again once
    little of its lifetime is left.

    One exchange at a time, shared: every stream that needs a token while one is under way takes
    that exchange's result, its token or its error (a failure is not repeated once per waiter).
    Within the refresh window the token is still valid: the refresh runs in the background and
    streams keep the current token; if it fails, it is tried again a little later, and the current
    token is served until it expires. Each exchange is bounded by `timeout` seconds of its own
    (options.iam_timeout_seconds), not by the route's read timeout."""

    def __init__(self, provider: str, client: httpx2.AsyncClient, url: str, api_key: str, timeout: float) -> None:
        self.provider = provider
        self.client = client
        self.url = url
        self.timeout = timeout
        self._form = urllib.parse.urlencode(
            {"grant_type": "urn:ibm:params:oauth:grant-type:apikey", "apikey": api_key}
        ).encode()
        self._token = ""
        # The token before it: streams that started with it may still be running. The redactor
        # knows these two only (one token per refresh would otherwise pile up there for good).
        self._previous = ""
        # time.monotonic() instants: when to refresh, when the token stops being valid, and (after
        # a failed early refresh) when to try again.
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._retry_at = 0.0
        self._exchange: asyncio.Task[str] | None = None
        # Exchanges made (for tests and logs: a cached token makes none).
        self.exchanges = 0

    async def get(self, deadline: float | None = None) -> tuple[str, bool]:
        """A valid token, and whether it came from the cache (False: this call waited for the
        exchange that issued it). `deadline` (time.monotonic()) bounds the wait for an exchange."""
        now = time.monotonic()
        if self._token and now < self._expires_at:
            if now >= self._refresh_at and now >= self._retry_at and self._exchange is None:
                self._start()
            return self._token, True
        task = self._exchange or self._start()
        try:
            if deadline is None or deadline - now >= self.timeout:
                # The exchange ends within its own timeout.
                return await asyncio.shield(task), False
            async with asyncio.timeout(max(deadline - now, 0.0)):
                return await asyncio.shield(task), False
        except TimeoutError:
            raise GatewayError(
                ErrorCode.PROVIDER_TIMEOUT, _iam_failed("no answer before the deadline"), provider=self.provider
            ) from None
        except GatewayError as shared:
            # Every waiter raises its own copy: one exception object raised by many tasks would
            # collect all their tracebacks.
            raise GatewayError(
                shared.code,
                shared.message,
                retry_after=shared.retry_after,
                provider=shared.provider,
                provider_http_status=shared.provider_http_status,
            ) from None

    def invalidate(self, token: str) -> None:
        """The service refused `token` (expired early, revoked): the next request fetches a new one."""
        if token and self._token == token:
            self._refresh_at = self._expires_at = self._retry_at = 0.0

    async def aclose(self) -> None:
        task = self._exchange
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start(self) -> asyncio.Task[str]:
        task = asyncio.get_running_loop().create_task(self._fetch())
        self._exchange = task
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[str]) -> None:
        if self._exchange is task:
            self._exchange = None
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        now = time.monotonic()
        left = self._expires_at - now
        if self._token and left > 0:
            # An early refresh failed: the token still serves; try again later, not per stream.
            self._retry_at = now + min(_REFRESH_RETRY_SECONDS, left / 2)
            log.warning(
                "watsonx: refreshing the IAM access token failed (%s); the current one serves for %.0f s more",
                error.message if isinstance(error, GatewayError) else type(error).__name__,
                left,
            )

    async def _fetch(self) -> str:
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        self.exchanges += 1
        sent_at = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.client.post(self.url, content=self._form, headers=headers, timeout=self.timeout)
        except TimeoutError:
            raise GatewayError(
                ErrorCode.PROVIDER_TIMEOUT,
                _iam_failed("no answer within options.iam_timeout_seconds"),
                provider=self.provider,
            ) from None
        except httpx2.HTTPError as exc:
            refused = untrusted(self.provider, exc, "IAM")
            if refused is not None:
                raise refused from None
            error = transport_error(self.provider, exc, started=False)
            raise GatewayError(
                error.code, _iam_failed(error.message), retry_after=error.retry_after, provider=self.provider
            ) from None
        try:
            body: Any = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        if response.status_code != 200:
            # IAM's body ({"errorCode": "BXNIM0415E", "errorMessage": ...}) is not passed on: it
            # describes the server's key.
            error = status_error(self.provider, response.status_code, response.headers, None, _IAM_ERRORS)
            raise GatewayError(
                error.code,
                _iam_failed(error.message),
                retry_after=error.retry_after,
                provider=self.provider,
                provider_http_status=response.status_code,
            )
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise GatewayError(
                ErrorCode.PROVIDER_PROTOCOL_ERROR, "IAM answered without an access token", provider=self.provider
            )
        register_secret(token)
        lifetime = _lifetime(body)
        if self._previous and self._previous not in (token, self._token):
            unregister_secret(self._previous)
        if self._token != token:
            self._previous = self._token
        self._token = token
        # Counted from when the request left: the token may have been issued a moment before the answer.
        self._expires_at = sent_at + lifetime
        self._refresh_at = self._expires_at - min(lifetime * _REFRESH_SHARE, _REFRESH_MAX_SECONDS)
        self._retry_at = 0.0
        return token


def _iam_failed(detail: str) -> str:
    """The message of a failed exchange. Worded so that the redactor leaves it whole: "token" is
    never followed by a word of 6 characters or more (`token failed` reads as a credential), nor
    "token" or "key" by a colon."""
    return f"IAM issued no access token ({detail})"


def _lifetime(body: dict[str, Any]) -> float:
    """Seconds the token lives: `expires_in`, else `expiration` (epoch seconds), else IAM's hour."""
    expires_in = body.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        return float(expires_in)
    expiration = body.get("expiration")
    if isinstance(expiration, int | float) and not isinstance(expiration, bool):
        left = expiration - time.time()
        if left > 0:
            return float(left)
    return 3600.0


def untrusted(provider: str, exc: httpx2.HTTPError, service: str) -> GatewayError | None:
    """A connection refused because the server's certificate did not verify: the server's own
    configuration (options.ca_bundle_file), or someone in the way; retrying changes neither."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    return GatewayError(
        ErrorCode.PROVIDER_AUTH_FAILED,
        f"the TLS certificate of {service} could not be verified; options.ca_bundle_file names the CAs "
        "to trust (verification is never turned off)",
        provider=provider,
    )


def _ssl_context(route: RouteConfig, ca_bundle_file: str) -> ssl.SSLContext:
    """A verifying context: the route's CA bundle, or the system's trust. Never one that does not verify."""
    if not ca_bundle_file:
        return httpx2.create_ssl_context()
    try:
        context = ssl.create_default_context(cafile=ca_bundle_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[routes.{route.name}] options.ca_bundle_file could not be read as PEM certificates: {type(exc).__name__}"
        ) from None
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    return context


class WatsonxProvider(HTTPProvider):
    """A watsonx.ai foundation model in a project or space (the route's `model` is its model id,
    `ibm/granite-3-8b-instruct`), or a deployment (options.deployment_id)."""

    kind = "watsonx"
    supports_tools = True
    supports_reasoning = True
    errors = ERRORS
    request_id_header = "x-global-transaction-id"

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.options = o = read_options(WatsonxOptions, route)
        with vendor_sdk(route, "ibm-watsonx-ai SDK", "watsonx"):
            from ibm_watsonx_ai import href_definitions as hrefs
        name = f"[routes.{route.name}]"
        url = o.url.rstrip("/")
        if not url:
            raise ConfigError(f"{name} options.url is required (e.g. https://us-south.ml.cloud.ibm.com)")
        if not url.startswith("https://"):
            raise ConfigError(f"{name} options.url must be an https:// URL (watsonx is served over TLS only)")
        placements = [k for k in ("project_id", "space_id", "deployment_id") if getattr(o, k)]
        if len(placements) != 1:
            raise ConfigError(f"{name} exactly one of options.project_id, space_id or deployment_id is required")
        version = o.api_version or _sdk_api_version()
        query = "?" + urllib.parse.urlencode({"version": version})
        if o.deployment_id:
            deployment = urllib.parse.quote(o.deployment_id, safe="")
            self.url = hrefs.FM_DEPLOYMENT_CHAT_STREAM.format(url, deployment) + query
            self.scope: dict[str, str] = {}
        else:
            self.url = hrefs.FM_CHAT.format(url, "chat_stream") + query
            self.scope = {"model_id": route.model}
            self.scope["project_id" if o.project_id else "space_id"] = o.project_id or o.space_id
        self.settings = HTTPSettings.of(o, url, "")
        self.iam: IAMToken | None = None
        self.token = ""
        key = iam_token_url = ""
        if o.auth == "iam":
            key = _secret_env(name, o.api_key_env, "the IBM Cloud API key", "api_key_env")
            iam_base = o.iam_url.rstrip("/") or _default_iam(name, url, hrefs.PROD_SVT_URL)
            if not iam_base.startswith("https://"):
                raise ConfigError(f"{name} options.iam_url must be an https:// URL")
            iam_token_url = hrefs.IAM_TOKEN_URL.format(iam_base)
        else:
            self.token = _secret_env(name, o.token_env, "the bearer token", "token_env")
        context = _ssl_context(route, o.ca_bundle_file)
        # The route's TLS trust for the service and IAM alike; an environment proxy that applies
        # to either sends both through httpx2's transport, which decides per host.
        self.client = self.settings.http_client(
            httpx2.AsyncClient, ssl_context=context, also=(iam_token_url,) if iam_token_url else ()
        )
        if iam_token_url:
            self.iam = IAMToken(self.kind, self.client, iam_token_url, key, o.iam_timeout_seconds)
        self.headers = {"content-type": "application/json", "accept": "text/event-stream"}
        self.capabilities = Capabilities(images=_IMAGES, response_formats=frozenset(ResponseFormatType))

    def _parser(self, request: GenerationRequest) -> ChatStreamParser:
        return ChatStreamParser(self.kind)

    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        return self._post(request)

    @asynccontextmanager
    async def _post(self, request: GenerationRequest) -> AsyncIterator[httpx2.Response]:
        body = orjson.dumps(request_body(request, scope=self.scope, max_tokens_field=self.options.max_tokens_field))
        timeout = self.settings.timeout(request)
        token = self.token
        cached = False
        response: httpx2.Response | None = None
        # A cached IAM token the service refuses (revoked, expired early, a clock that stood still
        # while the machine slept) is dropped, and the request sent once more with a new one:
        # nothing has reached the caller yet. A token fresh from IAM that is refused fails at once.
        for resend in (False, True):
            if self.iam is not None:
                token, cached = await self.iam.get(request.deadline)
            if resend:
                timeout = self.settings.timeout(request)
            headers = self.headers | {"authorization": f"Bearer {token}"}
            sent = self.client.build_request("POST", self.url, content=body, headers=headers, timeout=timeout)
            try:
                response = await self.client.send(sent, stream=True)
            except httpx2.ConnectError as exc:
                refused = untrusted(self.kind, exc, "watsonx")
                if refused is not None:
                    raise refused from None
                raise
            if response.status_code != 401 or self.iam is None:
                break
            self.iam.invalidate(token)
            if resend or not cached:
                break
            await response.aclose()
        assert response is not None
        try:
            if response.status_code != 200:
                first, _ = _first_error(json_or_none(await response.aread()))
                raise http_error(self.kind, response.status_code, response.headers, first)
            try:
                yield response
            except TokenExpired:
                if self.iam is not None:
                    self.iam.invalidate(token)
                raise
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self.iam is not None:
            await self.iam.aclose()
        await self.client.aclose()


def normalized_url(url: str) -> str:
    """A base URL in one spelling, to compare: scheme and host lower-cased, the host without a
    trailing dot, no default port (443 for https), no trailing slash; "" when it does not parse, or
    has user info, a query or a fragment (no base URL of the SDK's has them)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if not host or parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return ""
    default = {"https": 443, "http": 80}.get(scheme)
    netloc = host if port is None or port == default else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def _default_iam(name: str, url: str, production: list[str]) -> str:
    """IBM Cloud's IAM, for a service URL among the SDK's IBM Cloud ones (`PROD_SVT_URL`), however
    it is spelled. Any other URL needs options.iam_url: the SDK's fallback, IBM's *test* IAM, would
    receive the production API key for a typo or a region newer than the SDK."""
    if normalized_url(url) in {normalized_url(u) for u in production}:
        return _IAM_CLOUD
    raise ConfigError(
        f"{name} options.iam_url is required: options.url is not one of the IBM Cloud watsonx URLs the "
        f"installed ibm-watsonx-ai SDK knows, so which IAM should receive the API key cannot be told; set "
        f'iam_url = "{_IAM_CLOUD}" for IBM Cloud, or use auth = "token" (a Cloud Pak for Data token)'
    )


def _secret_env(name: str, env: str, what: str, option: str) -> str:
    value = os.environ.get(env, "") if env else ""
    if not value:
        raise ConfigError(
            f"{name} environment variable {env or '(none)'} is not set; it holds {what} "
            f"(change the variable's name with options.{option})"
        )
    register_secret(value)
    return value


def _sdk_api_version() -> str:
    """The API version the installed SDK is released with (its own default for `version=`)."""
    try:
        return importlib.resources.files("ibm_watsonx_ai.utils").joinpath("API_VERSION_PARAM").read_text().strip()
    except (OSError, ModuleNotFoundError):
        return "2025-02-11"
