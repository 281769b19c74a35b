"""OpenAI Chat Completions streaming: OpenAI itself, Azure OpenAI, and OpenAI-compatible servers
(vLLM, Ollama, LM Studio, llama.cpp's server, ...), through the official `openai` SDK.

The SDK builds the route's request once, sent from a template after that, and the body is read
raw (see `service.providers.upstream`). Usage is
always requested (`stream_options.include_usage`), so it arrives in a last chunk with no choices
before `data: [DONE]`.
"""

from __future__ import annotations

import base64
import urllib.parse
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx2
import openai
from openai._models import FinalRequestOptions

from service.config import RouteConfig
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
from service.providers.base import MIB, Capabilities, PromptCaching, bounds, media, read_options
from service.providers.chat_completions import (
    ChunkReader,
    add_sampling,
    function_tools,
    json_schema_format,
    reasoning_effort,
)
from service.providers.upstream import (
    SSE_STREAM_TYPES,
    ConnectionOptions,
    ErrorTable,
    HTTPProvider,
    HTTPSettings,
    TemplateSender,
    checked_url,
    json_bytes,
    loads,
    route_key,
    stream_error,
    truncated,
)

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}
_MAX_TOKENS_FIELDS = ("max_completion_tokens", "max_tokens")
_INLINE_OR_URL = frozenset({Source.DATA, Source.URL})
# What Chat Completions takes: images inline (as data: URLs) or by URL; PDFs inline or as an
# uploaded file; WAV and MP3 audio inline only. 20 MiB per image or recording, 32 MiB per PDF.
_IMAGES = media(dict.fromkeys(("image/png", "image/jpeg", "image/gif", "image/webp"), _INLINE_OR_URL), 20 * MIB)
_DOCUMENTS = media({"application/pdf": frozenset({Source.DATA, Source.FILE_ID})}, 32 * MIB)
_AUDIO_FORMATS = {"audio/wav": "wav", "audio/mpeg": "mp3"}
_AUDIO = media(dict.fromkeys(_AUDIO_FORMATS, frozenset({Source.DATA})), 20 * MIB)
# OpenAI's explicit breakpoints keep a prefix 30 minutes, the one lifetime they offer.
_BREAKPOINT_TTLS = (1800.0,)
_PROMPT_CACHE_MODES = ("automatic", "breakpoints")
# The openai SDK's ways of making credentials per request (AsyncOpenAI's and AsyncAzureOpenAI's).
_DYNAMIC_AUTH = ("_api_key_provider", "_provider_runtime", "_workload_identity_auth", "_azure_ad_token_provider")


def _b64(data: bytes | None) -> str:
    assert data is not None
    return base64.b64encode(data).decode("ascii")


def _part(part: Part, breakpoints: bool) -> dict[str, Any]:
    """One content part. Validation let through only what this route takes (see _IMAGES, ...)."""
    kind, source = part.kind, part.source
    block: dict[str, Any]
    if kind is PartKind.TEXT:
        block = {"type": "text", "text": part.text}
    elif kind is PartKind.IMAGE:
        url = part.url if source is Source.URL else f"data:{part.media_type};base64,{_b64(part.data)}"
        block = {"type": "image_url", "image_url": {"url": url}}
    elif kind is PartKind.DOCUMENT:
        file: dict[str, str] = {}
        if source is Source.FILE_ID:
            file["file_id"] = part.file_id
        else:
            file["filename"] = part.title or "document.pdf"
            file["file_data"] = f"data:application/pdf;base64,{_b64(part.data)}"
        block = {"type": "file", "file": file}
    else:
        block = {
            "type": "input_audio",
            "input_audio": {"data": _b64(part.data), "format": _AUDIO_FORMATS[part.media_type]},
        }
    if part.cache is not None and breakpoints:
        # The ttl was checked against the one lifetime offered, which is the default.
        block["prompt_cache_breakpoint"] = {"mode": "explicit"}
    return block


def _content(message: ChatMessage, breakpoints: bool) -> str | list[dict[str, Any]]:
    if message.parts:
        return [_part(part, breakpoints) for part in message.parts]
    return message.text


def _message(message: ChatMessage, breakpoints: bool = False) -> dict[str, Any]:
    if message.role is Role.TOOL:
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": _content(message, breakpoints)}
    if message.role is Role.ASSISTANT and message.tool_calls:
        # Earlier reasoning is not sent back: Chat Completions has no field for it.
        return {
            "role": "assistant",
            "content": _content(message, breakpoints) or None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
                for call in message.tool_calls
            ],
        }
    return {"role": message.role.value, "content": _content(message, breakpoints)}


def request_body(request: GenerationRequest, max_tokens_field: str, *, breakpoints: bool = False) -> dict[str, Any]:
    """The Chat Completions parameters: generation options only when the caller set them.

    `breakpoints`: cache markers become `prompt_cache_breakpoint`s; otherwise the provider's
    automatic caching is all there is, and they have nothing to map to.
    """
    body: dict[str, Any] = {
        "model": request.upstream_model,
        "messages": [_message(m, breakpoints) for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    add_sampling(body, request, max_tokens_field)
    if request.tools:
        body["tools"] = function_tools(request.tools)
        choice = request.tool_choice
        if choice.mode is ToolChoiceMode.NAMED:
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice.mode is not ToolChoiceMode.AUTO:
            body["tool_choice"] = choice.mode.value
    effort = reasoning_effort(request)
    if effort is not None:
        body["reasoning_effort"] = effort.value
    fmt = request.response_format
    if fmt is not None:
        if fmt.type is ResponseFormatType.JSON_SCHEMA:
            body["response_format"] = json_schema_format(fmt, fmt.name)
        else:
            body["response_format"] = {"type": fmt.type.value}
    return body


class ChunkParser(ChunkReader):
    """`chat.completion.chunk` events -> neutral events."""

    __slots__ = ()

    def handle(self, name: bytes, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        chunk = loads(data, self.kind)
        if "error" in chunk and chunk["error"] is not None:
            raise stream_error(self.kind, chunk, OpenAIProvider.errors)
        self._read(chunk)

    def finish(self) -> Finished:
        raw = self.finish_reason
        # The finish_reason is what says the answer is complete: some compatible servers end
        # the body after it without [DONE], and a proxy that cuts a stream may still write
        # [DONE] — an answer with no finish_reason was cut short either way.
        if raw is None:
            raise truncated(self.kind)
        return self._finished(_FINISH_REASONS.get(raw, FinishReason.OTHER), raw)


def credentials_per_request(client: openai.AsyncOpenAI) -> bool:
    """Whether the SDK makes the credentials per request (a key provider, workload identity, an
    Azure AD token provider): then it sends every request itself, no template."""
    return client.custom_auth is not None or any(getattr(client, name, None) is not None for name in _DYNAMIC_AUTH)


@dataclass(frozen=True, slots=True)
class ChatOptions(ConnectionOptions):
    """The options every Chat Completions route takes (`[routes.NAME.options]`)."""

    api_key_env: str = "OPENAI_API_KEY"
    max_tokens_field: str = bounds("max_completion_tokens", choices=_MAX_TOKENS_FIELDS)
    # "breakpoints": models that take explicit `prompt_cache_breakpoint`s (gpt-5.6 and later).
    prompt_cache: str = bounds("automatic", choices=_PROMPT_CACHE_MODES)


@dataclass(frozen=True, slots=True)
class OpenAIOptions(ChatOptions):
    """An `openai` route's options."""

    base_url: str = "https://api.openai.com/v1"


@dataclass(frozen=True, slots=True)
class OpenAICompatibleOptions(OpenAIOptions):
    """An `openai-compatible` route's options: base_url required, key optional."""

    base_url: str = ""
    api_key_env: str = ""
    # `max_tokens` is the field every compatible server knows.
    max_tokens_field: str = bounds("max_tokens", choices=_MAX_TOKENS_FIELDS)


@dataclass(frozen=True, slots=True)
class AzureOpenAIOptions(ChatOptions):
    """An `azure-openai` route's options: the route's `model` is the deployment."""

    endpoint: str = ""
    api_key_env: str = "AZURE_OPENAI_API_KEY"
    api_version: str = "2024-10-21"


class OpenAIProvider(HTTPProvider):
    """api.openai.com, or any base URL speaking the same API with an OpenAI-style key."""

    kind = "openai"
    supports_tools = True
    supports_reasoning = True
    errors = ErrorTable(
        stream_types=SSE_STREAM_TYPES,
        status_exception=openai.APIStatusError,
        connection_exception=openai.APIConnectionError,
    )
    options_class: ClassVar[type[ChatOptions]] = OpenAIOptions
    request_id_header = "x-request-id"

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.options = o = read_options(self.options_class, route)
        self.settings = self._settings(o, route)
        self.max_tokens_field = o.max_tokens_field
        self.breakpoints = o.prompt_cache == "breakpoints"
        self.capabilities = Capabilities(
            images=_IMAGES,
            documents=_DOCUMENTS,
            audio=_AUDIO,
            prompt_caching=PromptCaching.EXPLICIT if self.breakpoints else PromptCaching.AUTOMATIC,
            cache_ttls=_BREAKPOINT_TTLS if self.breakpoints else (),
            response_formats=frozenset(ResponseFormatType),
        )
        self.transport = self.settings.transport()
        self.client = self._client()
        self.sender = TemplateSender(
            self.client,
            self.transport,
            FinalRequestOptions,
            credential=lambda: self.client.api_key,
            dynamic=lambda: credentials_per_request(self.client),
        )

    def _settings(self, o: ChatOptions, route: RouteConfig) -> HTTPSettings:
        assert isinstance(o, OpenAIOptions)
        return HTTPSettings.of(o, checked_url(route, "base_url", o.base_url), route_key(route, o.api_key_env))

    def _client(self) -> openai.AsyncOpenAI:
        s = self.settings
        return openai.AsyncOpenAI(
            api_key=s.api_key or "unused",
            base_url=s.base_url,
            # The router retries (it knows the caller's deadline); SDK retries would stack on it.
            max_retries=0,
            timeout=s.read_timeout,
            http_client=s.http_client(openai.DefaultAsyncHttpxClient, self.transport),
        )

    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        body = request_body(request, self.max_tokens_field, breakpoints=self.breakpoints)
        return self.sender.post(self._path(request), json_bytes(body), self.settings.limits(request))

    def _path(self, request: GenerationRequest) -> str:
        return "/chat/completions"

    def _parser(self, request: GenerationRequest) -> ChunkParser:
        return ChunkParser(self.kind)

    async def aclose(self) -> None:
        await self.client.close()


class OpenAICompatibleProvider(OpenAIProvider):
    """A self-hosted OpenAI-compatible server (vLLM, Ollama, ...): base_url required, key optional."""

    kind = "openai-compatible"
    options_class = OpenAICompatibleOptions

    def _settings(self, o: ChatOptions, route: RouteConfig) -> HTTPSettings:
        assert isinstance(o, OpenAIOptions)
        base_url = checked_url(route, "base_url", o.base_url)
        return HTTPSettings.of(o, base_url, route_key(route, o.api_key_env, required=False))


class AzureOpenAIProvider(OpenAIProvider):
    """An Azure OpenAI deployment: the route's `model` is the deployment name."""

    kind = "azure-openai"
    options_class = AzureOpenAIOptions

    def _settings(self, o: ChatOptions, route: RouteConfig) -> HTTPSettings:
        assert isinstance(o, AzureOpenAIOptions)
        return HTTPSettings.of(o, checked_url(route, "endpoint", o.endpoint), route_key(route, o.api_key_env))

    def _path(self, request: GenerationRequest) -> str:
        # The SDK puts the deployment into the path itself only when it is handed the body as a
        # dict to read the model from; it gets JSON bytes (see post_streaming), so it is done here.
        if "/deployments" in self.client.base_url.path:
            return "/chat/completions"
        return f"/deployments/{urllib.parse.quote(request.upstream_model, safe='')}/chat/completions"

    def _client(self) -> openai.AsyncOpenAI:
        s, o = self.settings, self.options
        assert isinstance(o, AzureOpenAIOptions)
        return openai.AsyncAzureOpenAI(
            api_key=s.api_key,
            azure_endpoint=s.base_url,
            api_version=o.api_version,
            max_retries=0,
            timeout=s.read_timeout,
            http_client=s.http_client(openai.DefaultAsyncHttpxClient, self.transport),
        )
