"""AWS Bedrock's ConverseStream: one API over the models Bedrock serves (Claude, Llama, Mistral,
Nova, ...), by model id or inference-profile id or ARN.

The AWS SDK (`aiobotocore`, the `tokenwire[bedrock]` extra, imported when a Bedrock route is
configured) resolves credentials through the standard chain (environment, shared files and
profiles, SSO, container and instance roles; refreshed as they expire) and signs each request
with SigV4 (botocore's signer); a Bedrock API key (`AWS_BEARER_TOKEN_BEDROCK`) is sent as a bearer
token instead. The request goes through the gateway's own HTTP transport and the body is read raw
through `EventStreamDecoder`: botocore's event-stream iterator costs several times the per-chunk
budget (bench/parse_cost.py), turns bad JSON in a valid frame into an empty event, drops unknown
event types, and aiobotocore leaves the body open after a break until `stream.close()`. Read here,
the body is closed in the read loop's `finally` on every path, nothing is retried (the router
owns retries: botocore's default is 5 requests on a 429), and the route's `max_connections` is its
pool size (aiobotocore's `max_pool_connections` would cap concurrent streams at 10).

Usage: Bedrock's `inputTokens` leaves out cached tokens (as Anthropic does); the contract's input
total includes them, so they are added, as the Anthropic adapter does.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson

from service.config import ConfigError, RouteConfig
from service.errors import ErrorCode, GatewayError, invalid_request, register_secret
from service.events import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerationRequest,
    Part,
    PartKind,
    ProviderEvent,
    ReasoningDelta,
    ReasoningEffort,
    ResponseFormatType,
    Role,
    Source,
    TextDelta,
    ToolCallDelta,
    ToolChoiceMode,
    Usage,
)
from service.providers.base import MIB, TEXT_ONLY, Capabilities, PromptCaching, bounds, media, read_options, vendor_sdk
from service.providers.framing import ERROR_PREFIX, EXCEPTION_PREFIX, EventStreamDecoder, Framing
from service.providers.upstream import (
    STATUS_CODES,
    ConnectionOptions,
    ErrorTable,
    HTTPProvider,
    HTTPSettings,
    loads,
    status_error,
    stream_error,
    token_count,
    truncated,
)

# messageStop's stopReason: every value of botocore's StopReason enum (a test checks the list).
STOP_REASONS = {
    "end_turn": FinishReason.STOP,
    "tool_use": FinishReason.TOOL_CALLS,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "stop_sequence": FinishReason.STOP_SEQUENCE,
    "guardrail_intervened": FinishReason.CONTENT_FILTER,
    "content_filtered": FinishReason.CONTENT_FILTER,
    "malformed_model_output": FinishReason.OTHER,
    "malformed_tool_use": FinishReason.OTHER,
}
# In-stream exceptions are named in lower camel case (pre-stream ones, by status and header, are not).
ERRORS = ErrorTable(
    stream_types={
        "throttlingException": ErrorCode.PROVIDER_RATE_LIMITED,
        "serviceUnavailableException": ErrorCode.PROVIDER_UNAVAILABLE,
        "internalServerException": ErrorCode.PROVIDER_UNAVAILABLE,
        "modelStreamErrorException": ErrorCode.PROVIDER_UNAVAILABLE,
        "validationException": ErrorCode.PROVIDER_REJECTED_REQUEST,
    },
    # 424 ModelErrorException: the model failed on this input. 429 is ThrottlingException or
    # ModelNotReadyException, both retryable.
    statuses={**STATUS_CODES, 424: ErrorCode.PROVIDER_ERROR},
)
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
_DOCUMENT_FORMATS = {
    "application/pdf": "pdf",
    "text/csv": "csv",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "text/html": "html",
    "text/plain": "txt",
    "text/markdown": "md",
}
# Inline bytes or an S3 object (`s3://bucket/key`); 3.75 MB per image, 4.5 MB per document.
_S3_OR_DATA = frozenset({Source.DATA, Source.URL})
_IMAGES = media(dict.fromkeys(_IMAGE_FORMATS, _S3_OR_DATA), int(3.75 * 1000 * 1000), ("s3",))
_DOCUMENTS = media(dict.fromkeys(_DOCUMENT_FORMATS, _S3_OR_DATA), int(4.5 * 1000 * 1000), ("s3",))
_CACHE_TTLS = {300.0: "5m", 3600.0: "1h"}
_EFFORT_BUDGETS = {ReasoningEffort.LOW: 2048, ReasoningEffort.MEDIUM: 8192, ReasoningEffort.HIGH: 24576}
_MIN_BUDGET = 1024
# Document names take letters, digits, spaces, hyphens, parentheses and square brackets.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9 \-()\[\]]+")
_JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
_ = MIB


@dataclass(frozen=True, slots=True)
class BedrockOptions(ConnectionOptions):
    """A Bedrock route's options (`[routes.NAME.options]`)."""

    # The AWS region; empty: AWS_REGION, then AWS_DEFAULT_REGION.
    region: str = ""
    # Another endpoint (a VPC endpoint, a test fake); empty: https://bedrock-runtime.REGION.amazonaws.com.
    endpoint_url: str = ""
    # "auto": the API key when its variable is set, else the AWS credential chain.
    auth: str = bounds("auto", choices=("auto", "sigv4", "api-key"))
    # The variable holding a Bedrock API key (a bearer token).
    api_key_env: str = "AWS_BEARER_TOKEN_BEDROCK"
    # A profile of the shared AWS config for the credential chain; empty: the default chain.
    profile: str = ""
    # How the model takes a reasoning request: "anthropic" (Claude's thinking budget), "nova"
    # (Nova's reasoningConfig effort), or "none" (reasoning requests are refused).
    reasoning: str = bounds("none", choices=("none", "anthropic", "nova"))
    # Whether the model takes outputConfig.textFormat (JSON schema output); else refused.
    structured_output: bool = False
    # Whether the model takes cachePoint blocks; else cache markers are refused.
    prompt_cache: bool = False


def _b64(data: bytes | None) -> str:
    assert data is not None
    return base64.b64encode(data).decode("ascii")


def _source(part: Part) -> dict[str, Any]:
    if part.source is Source.URL:
        return {"s3Location": {"uri": part.url}}
    return {"bytes": _b64(part.data)}


def _block(part: Part, where: str) -> dict[str, Any]:
    if part.kind is PartKind.TEXT:
        return {"text": part.text}
    if not part.media_type:
        # Converse needs the format, which an s3:// URL does not say.
        raise invalid_request(f"{where}.media_type", "Bedrock needs the media type of an S3 object")
    if part.kind is PartKind.IMAGE:
        return {"image": {"format": _IMAGE_FORMATS[part.media_type], "source": _source(part)}}
    name = _NAME_UNSAFE.sub(" ", part.title).strip() or "document"
    return {"document": {"format": _DOCUMENT_FORMATS[part.media_type], "name": name, "source": _source(part)}}


def _content(message: ChatMessage, where: str) -> list[dict[str, Any]]:
    if not message.parts:
        return [{"text": message.text}] if message.text else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(message.parts):
        blocks.append(_block(part, f"{where}.parts[{j}]"))
        if part.cache is not None:
            point: dict[str, Any] = {"type": "default"}
            if part.cache.ttl is not None:
                point["ttl"] = _CACHE_TTLS[_CAPS_TTLS.cache_ttl(part.cache.ttl) or 300.0]
            blocks.append({"cachePoint": point})
    return blocks


_CAPS_TTLS = Capabilities(cache_ttls=tuple(_CACHE_TTLS))


def _turns(messages: tuple[ChatMessage, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """(system blocks, alternating user/assistant turns, whether any turn holds a tool call or result)."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    tool_history = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role is Role.SYSTEM:
            system += _content(message, where)
            continue
        blocks: list[dict[str, Any]]
        if message.role is Role.TOOL:
            tool_history = True
            role = "user"
            result = _content(message, where) or [{"text": ""}]
            blocks = [
                {
                    "toolResult": {
                        "toolUseId": message.tool_call_id,
                        "content": [b for b in result if "cachePoint" not in b],
                    }
                }
            ]
        elif message.role is Role.ASSISTANT:
            role = "assistant"
            blocks = []
            for block in message.reasoning:
                if block.redacted_data:
                    blocks.append({"reasoningContent": {"redactedContent": block.redacted_data}})
                elif block.signature:
                    text = {"text": block.text, "signature": block.signature}
                    blocks.append({"reasoningContent": {"reasoningText": text}})
            blocks += _content(message, where)
            for call in message.tool_calls:
                tool_history = True
                use = {"toolUseId": call.id, "name": call.name, "input": orjson.loads(call.arguments_json or "{}")}
                blocks.append({"toolUse": use})
        else:
            role = "user"
            blocks = _content(message, where)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns, tool_history


def request_body(request: GenerationRequest, options: BedrockOptions, route: str) -> dict[str, Any]:
    """ConverseStream's body (the model id goes in the path)."""
    system, messages, tool_history = _turns(request.messages)
    body: dict[str, Any] = {"messages": messages}
    if system:
        body["system"] = system
    inference: dict[str, Any] = {}
    if request.max_output_tokens is not None:
        inference["maxTokens"] = request.max_output_tokens
    if request.temperature is not None:
        inference["temperature"] = request.temperature
    if request.top_p is not None:
        inference["topP"] = request.top_p
    if request.stop_sequences:
        inference["stopSequences"] = list(request.stop_sequences)
    # `seed` has no Converse field; it is a best-effort hint everywhere, so it is dropped.
    if inference:
        body["inferenceConfig"] = inference
    choice = request.tool_choice
    if request.tools and (choice.mode is not ToolChoiceMode.NONE or tool_history):
        if choice.mode is ToolChoiceMode.NONE:
            raise invalid_request(
                "tool_choice", f"route {route!r} (Bedrock) cannot forbid tool calls in a conversation that has them"
            )
        tools: list[dict[str, Any]] = [
            {
                "toolSpec": {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description else {}),
                    "inputSchema": {"json": tool.parameters or {"type": "object", "properties": {}}},
                }
            }
            for tool in request.tools
        ]
        config: dict[str, Any] = {"tools": tools}
        if choice.mode is ToolChoiceMode.REQUIRED:
            config["toolChoice"] = {"any": {}}
        elif choice.mode is ToolChoiceMode.NAMED:
            config["toolChoice"] = {"tool": {"name": choice.name}}
        else:
            config["toolChoice"] = {"auto": {}}
        body["toolConfig"] = config
    effort, budget = request.reasoning_effort, request.reasoning_budget_tokens
    if effort is not None or budget is not None:
        if options.reasoning == "anthropic":
            tokens = budget if budget is not None else _EFFORT_BUDGETS[effort or ReasoningEffort.MEDIUM]
            thinking = {"type": "enabled", "budget_tokens": max(tokens, _MIN_BUDGET)}
            body["additionalModelRequestFields"] = {"thinking": thinking}
        elif options.reasoning == "nova":
            if effort is None:
                effort = ReasoningEffort.LOW if (budget or 0) <= 4096 else ReasoningEffort.HIGH
            config = {"type": "enabled", "maxReasoningEffort": effort.value}
            body["additionalModelRequestFields"] = {"reasoningConfig": config}
        else:
            raise invalid_request("reasoning", f"route {route!r} has no reasoning (options.reasoning is none)")
    fmt = request.response_format
    if fmt is not None and fmt.type is not ResponseFormatType.TEXT:
        schema = fmt.schema if fmt.type is ResponseFormatType.JSON_SCHEMA else _JSON_OBJECT_SCHEMA
        definition: dict[str, Any] = {"schema": orjson.dumps(schema).decode(), "name": fmt.name or "response"}
        if fmt.description:
            definition["description"] = fmt.description
        body["outputConfig"] = {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": definition}}}
    return body


class StreamParser:
    """ConverseStream events -> neutral events. Content blocks are numbered across text, reasoning
    and tool use; tool calls are renumbered from 0 for the contract."""

    __slots__ = ("done", "kind", "out", "request_id", "stop_reason", "tool_args", "tools", "usage")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.out: list[ProviderEvent] = []
        self.done = False
        self.request_id = ""
        self.stop_reason: str | None = None
        self.usage: Usage | None = None
        # Content block index -> tool call index; the tool calls whose arguments were seen.
        self.tools: dict[int, int] = {}
        self.tool_args: set[int] = set()

    def handle(self, name: bytes, data: bytes) -> None:
        if name == b"contentBlockDelta":
            event = loads(data, self.kind)
            delta = event["delta"]
            text = delta.get("text")
            if text is not None:
                if text:
                    self.out.append(TextDelta(_str(text)))
                return
            use = delta.get("toolUse")
            if use is not None:
                index = self.tools[_index(event["contentBlockIndex"])]
                piece = _str(use.get("input", ""))
                if piece:
                    self.tool_args.add(index)
                    self.out.append(ToolCallDelta(index=index, arguments=piece))
                return
            reasoning = delta.get("reasoningContent")
            if reasoning is not None:
                if reasoning.get("text"):
                    self.out.append(ReasoningDelta(_str(reasoning["text"])))
                if reasoning.get("signature"):
                    self.out.append(ReasoningDelta("", signature=_str(reasoning["signature"])))
                if reasoning.get("redactedContent"):
                    self.out.append(ReasoningDelta("", redacted_data=_str(reasoning["redactedContent"])))
            # Other deltas (citations of documents the route never asks to cite) carry no answer text.
        elif name == b"contentBlockStart":
            event = loads(data, self.kind)
            use = (event.get("start") or {}).get("toolUse")
            if use is not None:
                index = self.tools[_index(event["contentBlockIndex"])] = len(self.tools)
                self.out.append(ToolCallDelta(index=index, id=_str(use["toolUseId"]), name=_str(use["name"])))
        elif name == b"contentBlockStop":
            event = loads(data, self.kind)
            call = self.tools.get(_index(event["contentBlockIndex"]))
            if call is not None and call not in self.tool_args:
                # A call without arguments still gets a JSON object.
                self.tool_args.add(call)
                self.out.append(ToolCallDelta(index=call, arguments="{}"))
        elif name == b"messageStop":
            self.stop_reason = _str(loads(data, self.kind)["stopReason"])
        elif name == b"metadata":
            usage = loads(data, self.kind).get("usage")
            if isinstance(usage, dict):
                self.usage = _usage(usage)
            if self.stop_reason is not None:
                self.done = True
        elif name.startswith(EXCEPTION_PREFIX):
            kind = name[len(EXCEPTION_PREFIX) :].decode("utf-8", "replace")
            raise stream_error(self.kind, _object(data), ERRORS, kind=kind)
        elif name.startswith(ERROR_PREFIX):
            kind = name[len(ERROR_PREFIX) :].decode("utf-8", "replace")
            raise stream_error(self.kind, {"message": data.decode("utf-8", "replace")}, ERRORS, kind=kind)
        elif name != b"messageStart" and not name:
            raise ValueError("an event without a type")
        # Event types added after this adapter carry nothing it could relay; they are skipped.

    def finish(self) -> Finished:
        raw = self.stop_reason
        if raw is None:
            raise truncated(self.kind)
        return Finished(
            reason=STOP_REASONS.get(raw, FinishReason.OTHER),
            raw_reason=raw,
            usage=self.usage,
            provider_request_id=self.request_id,
        )


def _usage(raw: dict[str, Any]) -> Usage:
    uncached = token_count(raw.get("inputTokens"))
    cache_read = token_count(raw.get("cacheReadInputTokens"))
    cache_write = token_count(raw.get("cacheWriteInputTokens"))
    return Usage(
        input_tokens=None if uncached is None else uncached + (cache_read or 0) + (cache_write or 0),
        output_tokens=token_count(raw.get("outputTokens")),
        cache_read_input_tokens=cache_read,
        cache_write_input_tokens=cache_write,
    )


def _object(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _index(value: object) -> int:
    if type(value) is not int or not 0 <= value < 2**31:
        raise TypeError("contentBlockIndex")
    return value


class BedrockProvider(HTTPProvider):
    """A model on AWS Bedrock through ConverseStream; the route's `model` is a model id, an
    inference-profile id or an ARN."""

    kind = "bedrock"
    supports_tools = True
    supports_reasoning = True
    errors = ERRORS
    request_id_header = "x-amzn-requestid"

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.options = o = read_options(BedrockOptions, route)
        self.region = o.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
        if not self.region:
            raise ConfigError(f"[routes.{route.name}] options.region is required (or set AWS_REGION)")
        endpoint = o.endpoint_url or f"https://bedrock-runtime.{self.region}.amazonaws.com"
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"[routes.{route.name}] options.endpoint_url must be an http:// or https:// URL")
        token = os.environ.get(o.api_key_env, "") if o.api_key_env and o.auth != "sigv4" else ""
        if o.auth == "api-key" and not token:
            raise ConfigError(f"[routes.{route.name}] environment variable {o.api_key_env} is not set (auth = api-key)")
        if token:
            register_secret(token)
        self.settings = HTTPSettings.of(o, endpoint.rstrip("/"), token)
        self.path = f"/model/{urllib.parse.quote(route.model, safe='')}/converse-stream"
        self.capabilities = Capabilities(
            images=_IMAGES,
            documents=_DOCUMENTS,
            prompt_caching=PromptCaching.EXPLICIT if o.prompt_cache else PromptCaching.NONE,
            cache_ttls=tuple(_CACHE_TTLS) if o.prompt_cache else (),
            response_formats=frozenset(ResponseFormatType) if o.structured_output else TEXT_ONLY,
        )
        self.client = self.settings.http_client(httpx2.AsyncClient)
        self._credentials: Any = None
        self._credentials_lock = asyncio.Lock()
        if not token:
            # The SDK is needed only to sign; importing it here makes a missing extra a start-up error.
            with vendor_sdk(route, "AWS SDK", "bedrock"):
                import aiobotocore.session  # noqa: F401
                import botocore.auth  # noqa: F401

    def _framing(self) -> Framing:
        return EventStreamDecoder()

    def _parser(self, request: GenerationRequest) -> StreamParser:
        return StreamParser(self.kind)

    async def _signed_headers(self, url: str, body: bytes) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/vnd.amazon.eventstream"}
        if self.settings.api_key:
            return headers | {"authorization": f"Bearer {self.settings.api_key}"}
        import aiobotocore.session
        import botocore.auth
        import botocore.awsrequest
        import botocore.exceptions

        try:
            async with self._credentials_lock:
                if self._credentials is None:
                    session = aiobotocore.session.AioSession(profile=self.options.profile or None)
                    self._credentials = await session.get_credentials()
            if self._credentials is None:
                raise GatewayError(
                    ErrorCode.PROVIDER_AUTH_FAILED,
                    "no AWS credentials were found in the standard chain for this route",
                    provider=self.kind,
                )
            # Refreshable credentials (roles, SSO) renew here when they are about to expire.
            frozen = await self._credentials.get_frozen_credentials()
        except botocore.exceptions.BotoCoreError:
            raise GatewayError(
                ErrorCode.PROVIDER_AUTH_FAILED,
                "the AWS credentials of this route could not be obtained",
                provider=self.kind,
            ) from None
        for secret in (frozen.secret_key, frozen.token):
            if secret:
                register_secret(secret)
        signed = botocore.awsrequest.AWSRequest(method="POST", url=url, data=body, headers=headers)
        botocore.auth.SigV4Auth(frozen, "bedrock", self.region).add_auth(signed)
        return dict(signed.headers.items())

    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        return self._post(request)

    @asynccontextmanager
    async def _post(self, request: GenerationRequest) -> AsyncIterator[httpx2.Response]:
        body = orjson.dumps(request_body(request, self.options, self.route.name))
        url = self.settings.base_url + self.path
        headers = await self._signed_headers(url, body)
        sent = self.client.build_request(
            "POST", url, content=body, headers=headers, timeout=self.settings.timeout(request)
        )
        response = await self.client.send(sent, stream=True)
        try:
            if response.status_code != 200:
                raw = await response.aread()
                kind = response.headers.get("x-amzn-errortype", "").partition(":")[0]
                raise status_error(self.kind, response.status_code, response.headers, _object(raw), ERRORS, kind=kind)
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
