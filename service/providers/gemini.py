"""Google Gemini: the Developer API (an API key in `x-goog-api-key`) and Vertex AI (a project, a
location and Google credentials), `streamGenerateContent?alt=sse`.

The `google-genai` SDK (the `tokenwire[gemini]` extra, imported when a Gemini route is configured)
builds each request's URL and headers (base URL, API version, Vertex's project/location path, the
key header, its client headers) and, on Vertex, resolves and refreshes the credentials (ADC, a
service-account file) for the bearer token. The body, Gemini's documented camelCase REST shape, is
built here, and the request goes through tokenwire's own transport with the response read raw
through the shared read loop. The SDK's own stream path is not used, for what it does here:
`break` and `aclose()` leave its upstream streaming (only cancelling the task closes it); with
aiohttp installed (the Bedrock extra brings it) it switches to aiohttp, where `HttpOptions(timeout)`
is a deadline for the whole stream; it retries on its own (tenacity) and retries a failed
connection once more implicitly; it raises a mid-stream error only when "error" is the chunk's
first key; and it builds a pydantic model per chunk. None of that applies on this path: nothing is
retried but by the router, the body is closed on every way out, and the read timeout is the
silence between two chunks.

Usage metadata is cumulative on every chunk and omits zero counts: the last one seen is the
usage, with a missing count read as 0. `promptTokenCount` includes cached tokens (the contract's
input total does too); output is candidates plus thoughts (as OpenAI's completion tokens include
reasoning), thoughts also as the reasoning count.
"""

from __future__ import annotations

import base64
import dataclasses
import os
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
from service.providers.base import MIB, Capabilities, PromptCaching, bounds, media, read_options, vendor_sdk
from service.providers.upstream import (
    STATUS_CODES,
    ConnectionOptions,
    ErrorTable,
    HTTPProvider,
    HTTPSettings,
    json_or_none,
    loads,
    status_error,
    stream_error,
    token_count,
    truncated,
)

# Every value of the SDK's FinishReason enum (a test checks the list). STOP with function calls
# in the answer is TOOL_CALLS (Gemini has no reason of its own for them).
FINISH_REASONS = {
    "STOP": FinishReason.STOP,
    "MAX_TOKENS": FinishReason.LENGTH,
    "SAFETY": FinishReason.CONTENT_FILTER,
    "RECITATION": FinishReason.CONTENT_FILTER,
    "BLOCKLIST": FinishReason.CONTENT_FILTER,
    "PROHIBITED_CONTENT": FinishReason.CONTENT_FILTER,
    "SPII": FinishReason.CONTENT_FILTER,
    "IMAGE_SAFETY": FinishReason.CONTENT_FILTER,
    "IMAGE_PROHIBITED_CONTENT": FinishReason.CONTENT_FILTER,
    "IMAGE_RECITATION": FinishReason.CONTENT_FILTER,
    "MODEL_ARMOR": FinishReason.CONTENT_FILTER,
    "LANGUAGE": FinishReason.OTHER,
    "OTHER": FinishReason.OTHER,
    "FINISH_REASON_UNSPECIFIED": FinishReason.OTHER,
    "MALFORMED_FUNCTION_CALL": FinishReason.OTHER,
    "UNEXPECTED_TOOL_CALL": FinishReason.OTHER,
    "TOO_MANY_TOOL_CALLS": FinishReason.OTHER,
    "MISSING_THOUGHT_SIGNATURE": FinishReason.OTHER,
    "MALFORMED_RESPONSE": FinishReason.OTHER,
    "IMAGE_OTHER": FinishReason.OTHER,
    "NO_IMAGE": FinishReason.OTHER,
    "ESCALATION": FinishReason.OTHER,
    "PUP_LIMITED_DISABLED": FinishReason.OTHER,
    "CONTINUATION": FinishReason.OTHER,
}
# Google's error statuses (google.rpc.Code names), in error bodies and in-stream error chunks.
ERRORS = ErrorTable(
    stream_types={
        "UNAVAILABLE": ErrorCode.PROVIDER_UNAVAILABLE,
        "INTERNAL": ErrorCode.PROVIDER_UNAVAILABLE,
        "RESOURCE_EXHAUSTED": ErrorCode.PROVIDER_RATE_LIMITED,
        "DEADLINE_EXCEEDED": ErrorCode.PROVIDER_TIMEOUT,
        "INVALID_ARGUMENT": ErrorCode.PROVIDER_REJECTED_REQUEST,
        "FAILED_PRECONDITION": ErrorCode.PROVIDER_REJECTED_REQUEST,
        "UNAUTHENTICATED": ErrorCode.PROVIDER_AUTH_FAILED,
        "PERMISSION_DENIED": ErrorCode.PROVIDER_AUTH_FAILED,
    },
    statuses={**STATUS_CODES, 499: ErrorCode.PROVIDER_UNAVAILABLE},
)
_INLINE_OR_URL = frozenset({Source.DATA, Source.URL, Source.FILE_ID})
# Inline data rides in the request (20 MB in all); larger media go by Files API URI or URL.
_IMAGES = media(
    dict.fromkeys(("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"), _INLINE_OR_URL),
    20 * MIB,
    ("https", "gs"),
)
_DOCUMENTS = media(
    dict.fromkeys(("application/pdf", "text/plain", "text/html", "text/csv", "text/markdown"), _INLINE_OR_URL),
    20 * MIB,
    ("https", "gs"),
)
_AUDIO = media(
    dict.fromkeys(
        ("audio/wav", "audio/mpeg", "audio/mp3", "audio/aiff", "audio/aac", "audio/ogg", "audio/flac"),
        _INLINE_OR_URL,
    ),
    20 * MIB,
    ("https", "gs"),
)
_EFFORT_BUDGETS = {ReasoningEffort.LOW: 2048, ReasoningEffort.MEDIUM: 8192, ReasoningEffort.HIGH: 24576}
_DEVELOPER_URL = "https://generativelanguage.googleapis.com/"


@dataclass(frozen=True, slots=True)
class GeminiOptions(ConnectionOptions):
    """A Gemini route's options (`[routes.NAME.options]`)."""

    # "developer": the Gemini Developer API with a key; "vertex": Vertex AI.
    api: str = bounds("developer", choices=("developer", "vertex"))
    api_key_env: str = "GEMINI_API_KEY"
    # Another endpoint (a proxy, a regional endpoint, a test fake); empty: Google's.
    base_url: str = ""
    api_version: str = ""
    # Vertex only: the project and location (defaults: GOOGLE_CLOUD_PROJECT, GOOGLE_CLOUD_LOCATION)
    # and a service-account key file (default: application default credentials).
    project: str = ""
    location: str = ""
    credentials_file: str = ""


def _b64(data: bytes | None) -> str:
    assert data is not None
    return base64.b64encode(data).decode("ascii")


def _part(part: Part) -> dict[str, Any]:
    if part.kind is PartKind.TEXT:
        return {"text": part.text}
    if part.source is Source.DATA:
        return {"inlineData": {"mimeType": part.media_type, "data": _b64(part.data)}}
    uri = part.url or part.file_id
    data: dict[str, Any] = {"fileUri": uri}
    if part.media_type:
        data["mimeType"] = part.media_type
    return {"fileData": data}


def _parts(message: ChatMessage) -> list[dict[str, Any]]:
    if not message.parts:
        return [{"text": message.text}] if message.text else []
    return [_part(p) for p in message.parts]


def _contents(messages: tuple[ChatMessage, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """(system parts, alternating user/model turns, whether any turn holds a tool call or result)."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    tool_history = False
    for message in messages:
        if message.role is Role.SYSTEM:
            system += _parts(message)
            continue
        parts: list[dict[str, Any]]
        if message.role is Role.ASSISTANT:
            role = "model"
            parts = [
                {"text": block.text, "thought": True, "thoughtSignature": block.signature}
                for block in message.reasoning
                if block.signature and not block.redacted_data
            ]
            parts += _parts(message)
            for call in message.tool_calls:
                tool_history = True
                names[call.id] = call.name
                function: dict[str, Any] = {"name": call.name, "args": orjson.loads(call.arguments_json or "{}")}
                if call.id:
                    function["id"] = call.id
                parts.append({"functionCall": function})
        elif message.role is Role.TOOL:
            tool_history = True
            role = "user"
            text = message.text or "".join(p.text for p in message.parts)
            response: dict[str, Any] = {
                "name": names.get(message.tool_call_id, ""),
                "response": {"result": text},
            }
            if message.tool_call_id:
                response["id"] = message.tool_call_id
            parts = [{"functionResponse": response}]
        else:
            role = "user"
            parts = _parts(message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["parts"] += parts
        else:
            turns.append({"role": role, "parts": parts})
    return system, turns, tool_history


def request_body(request: GenerationRequest) -> dict[str, Any]:
    """generateContent's body (the model goes in the path)."""
    system, contents, tool_history = _contents(request.messages)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    if request.max_output_tokens is not None:
        config["maxOutputTokens"] = request.max_output_tokens
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.stop_sequences:
        config["stopSequences"] = list(request.stop_sequences)
    if request.seed is not None:
        config["seed"] = request.seed
    fmt = request.response_format
    if fmt is not None and fmt.type is not ResponseFormatType.TEXT:
        config["responseMimeType"] = "application/json"
        if fmt.type is ResponseFormatType.JSON_SCHEMA:
            config["responseJsonSchema"] = fmt.schema
    effort, budget = request.reasoning_effort, request.reasoning_budget_tokens
    if effort is not None or budget is not None:
        tokens = budget if budget is not None else _EFFORT_BUDGETS[effort or ReasoningEffort.MEDIUM]
        config["thinkingConfig"] = {"thinkingBudget": tokens, "includeThoughts": True}
    if config:
        body["generationConfig"] = config
    choice = request.tool_choice
    if request.tools and (choice.mode is not ToolChoiceMode.NONE or tool_history):
        declarations = [
            {
                "name": tool.name,
                **({"description": tool.description} if tool.description else {}),
                "parametersJsonSchema": tool.parameters or {"type": "object", "properties": {}},
            }
            for tool in request.tools
        ]
        body["tools"] = [{"functionDeclarations": declarations}]
        calling: dict[str, Any] = {"mode": "AUTO"}
        if choice.mode is ToolChoiceMode.NONE:
            calling = {"mode": "NONE"}
        elif choice.mode is ToolChoiceMode.REQUIRED:
            calling = {"mode": "ANY"}
        elif choice.mode is ToolChoiceMode.NAMED:
            calling = {"mode": "ANY", "allowedFunctionNames": [choice.name]}
        body["toolConfig"] = {"functionCallingConfig": calling}
    return body


class StreamParser:
    """`data:` chunks of GenerateContentResponse JSON -> neutral events. Only the first candidate
    is read (the gateway asks for one). Function calls arrive whole: one delta each."""

    __slots__ = ("calls", "done", "finish_reason", "kind", "model", "out", "request_id", "usage")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.out: list[ProviderEvent] = []
        self.done = False
        self.request_id = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model = ""
        self.calls = 0

    def handle(self, name: bytes, data: bytes) -> None:
        chunk = loads(data, self.kind)
        error = chunk.get("error")
        if error is not None:
            status = error.get("status") if isinstance(error, dict) else None
            raise stream_error(self.kind, error, ERRORS, kind=status if isinstance(status, str) else "")
        metadata = chunk.get("usageMetadata")
        if isinstance(metadata, dict):
            self.usage = _usage(metadata)
        model = chunk.get("modelVersion")
        if isinstance(model, str):
            self.model = model
        response_id = chunk.get("responseId")
        if isinstance(response_id, str) and not self.request_id:
            self.request_id = response_id
        candidates = chunk.get("candidates")
        if not candidates:
            feedback = chunk.get("promptFeedback")
            blocked = feedback.get("blockReason") if isinstance(feedback, dict) else None
            if isinstance(blocked, str):
                # The prompt was refused: no candidate comes.
                self.finish_reason = blocked
                self.done = True
            return
        candidate = candidates[0]
        for part in (candidate.get("content") or {}).get("parts") or ():
            self._part(part)
        reason = candidate.get("finishReason")
        if isinstance(reason, str):
            self.finish_reason = reason
            self.done = True

    def _part(self, part: dict[str, Any]) -> None:
        signature = part.get("thoughtSignature")
        text = part.get("text")
        if text is not None:
            if part.get("thought") is True:
                self.out.append(ReasoningDelta(_str(text), signature=_str(signature) if signature else ""))
            elif text:
                self.out.append(TextDelta(_str(text)))
                if signature:
                    # A signature on an answer part belongs to the reasoning before it.
                    self.out.append(ReasoningDelta("", signature=_str(signature)))
            return
        call = part.get("functionCall")
        if call is not None:
            index = self.calls
            self.calls += 1
            call_id = call.get("id") or f"call_{index}"
            arguments = orjson.dumps(call.get("args") or {}).decode()
            self.out.append(ToolCallDelta(index=index, id=_str(call_id), name=_str(call["name"]), arguments=arguments))
            if signature:
                self.out.append(ReasoningDelta("", signature=_str(signature)))
        # Other parts (executable code, inline data the model made) carry nothing the contract relays.

    def finish(self) -> Finished:
        raw = self.finish_reason
        if raw is None:
            raise truncated(self.kind)
        reason = FINISH_REASONS.get(raw)
        if reason is None:
            # A prompt's blockReason (SAFETY, OTHER, BLOCKLIST, ...) or a reason added later.
            reason = FinishReason.OTHER
        if reason is FinishReason.STOP and self.calls:
            reason = FinishReason.TOOL_CALLS
        return Finished(
            reason=reason,
            raw_reason=raw,
            usage=self.usage,
            provider_request_id=self.request_id,
            provider_model=self.model,
        )


def _usage(raw: dict[str, Any]) -> Usage:
    prompt = token_count(raw.get("promptTokenCount")) or 0
    candidates = token_count(raw.get("candidatesTokenCount")) or 0
    thoughts = token_count(raw.get("thoughtsTokenCount"))
    tool_prompt = token_count(raw.get("toolUsePromptTokenCount")) or 0
    return Usage(
        input_tokens=prompt + tool_prompt,
        output_tokens=candidates + (thoughts or 0),
        cache_read_input_tokens=token_count(raw.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def _key_invalid(error: object) -> bool:
    details = error.get("details") if isinstance(error, dict) else None
    return isinstance(details, list) and any(
        isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details
    )


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


class GeminiProvider(HTTPProvider):
    """A Gemini model on the Developer API or Vertex AI; the route's `model` is its name
    (`gemini-2.5-flash`), or on Vertex a publisher model path."""

    kind = "gemini"
    supports_tools = True
    supports_reasoning = True
    errors = ERRORS
    request_id_header = "x-request-id"

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.options = o = read_options(GeminiOptions, route)
        with vendor_sdk(route, "google-genai SDK", "gemini"):
            from google import genai
            from google.genai import types
        base_url = o.base_url
        if base_url and not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"[routes.{route.name}] options.base_url must be an http:// or https:// URL")
        http_options = types.HttpOptions(
            base_url=base_url or None,
            # The Developer API's features (thinking, JSON schemas) are on v1beta; Vertex keeps the SDK's.
            api_version=o.api_version or ("v1beta" if o.api == "developer" else None),
            # Never used to send (this adapter sends itself), but off in case a path ever does.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        key = ""
        if o.api == "developer":
            key = os.environ.get(o.api_key_env, "")
            if not key:
                raise ConfigError(
                    f"[routes.{route.name}] environment variable {o.api_key_env} is not set; it holds the "
                    "Gemini API key (change the variable's name with options.api_key_env)"
                )
            register_secret(key)
            self.sdk = genai.Client(api_key=key, http_options=http_options)
            self.path = f"models/{route.model}:streamGenerateContent?alt=sse"
        else:
            project = o.project or os.environ.get("GOOGLE_CLOUD_PROJECT", "")
            location = o.location or os.environ.get("GOOGLE_CLOUD_LOCATION", "") or "us-central1"
            if not project:
                raise ConfigError(f"[routes.{route.name}] options.project is required (or set GOOGLE_CLOUD_PROJECT)")
            credentials = None
            if o.credentials_file:
                from google.oauth2 import service_account

                try:
                    credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                        o.credentials_file, scopes=["https://www.googleapis.com/auth/cloud-platform"]
                    )
                except (OSError, ValueError) as exc:
                    raise ConfigError(
                        f"[routes.{route.name}] options.credentials_file could not be read: {type(exc).__name__}"
                    ) from None
            self.sdk = genai.Client(
                vertexai=True, project=project, location=location, credentials=credentials, http_options=http_options
            )
            model = route.model if "/" in route.model else f"publishers/google/models/{route.model}"
            self.path = f"{model}:streamGenerateContent?alt=sse"
        built = self.sdk._api_client._build_request("post", self.path, {}, None)
        self.url: str = built.url
        self.headers = {k.lower(): v for k, v in built.headers.items()} | {"accept": "text/event-stream"}
        parts = urllib.parse.urlsplit(self.url)
        origin = f"{parts.scheme}://{parts.netloc}"
        self.settings = HTTPSettings.of(o, origin, key)
        self.capabilities = Capabilities(
            images=_IMAGES,
            documents=_DOCUMENTS,
            audio=_AUDIO,
            # Implicit caching: markers are accepted and nothing is sent for them.
            prompt_caching=PromptCaching.AUTOMATIC,
            response_formats=frozenset(ResponseFormatType),
        )
        self.client = self.settings.http_client(httpx2.AsyncClient)

    def _parser(self, request: GenerationRequest) -> StreamParser:
        return StreamParser(self.kind)

    async def _auth_headers(self) -> dict[str, str]:
        if self.options.api == "developer":
            return self.headers
        api = self.sdk._api_client
        try:
            token = await api._async_access_token()
        except Exception:
            # google-auth's errors (no ADC, a refused refresh) say nothing a caller should read.
            raise GatewayError(
                ErrorCode.PROVIDER_AUTH_FAILED,
                "the Google credentials of this route could not be obtained",
                provider=self.kind,
            ) from None
        register_secret(token)
        headers = self.headers | {"authorization": f"Bearer {token}"}
        quota = getattr(api._credentials, "quota_project_id", None)
        if quota:
            headers["x-goog-user-project"] = quota
        return headers

    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        return self._post(request)

    @asynccontextmanager
    async def _post(self, request: GenerationRequest) -> AsyncIterator[httpx2.Response]:
        if request.tool_choice.mode is ToolChoiceMode.NAMED and not request.tools:
            raise invalid_request("tool_choice", "a named tool choice needs tools")
        body = orjson.dumps(request_body(request))
        headers = await self._auth_headers()
        sent = self.client.build_request(
            "POST", self.url, content=body, headers=headers, timeout=self.settings.timeout(request)
        )
        response = await self.client.send(sent, stream=True)
        try:
            if response.status_code != 200:
                error = json_or_none(await response.aread())
                inner = error.get("error") if isinstance(error, dict) else None
                status = inner.get("status") if isinstance(inner, dict) else None
                table = ERRORS
                if _key_invalid(inner):
                    # A wrong key is a 400 INVALID_ARGUMENT on Gemini; its details say which.
                    table = dataclasses.replace(
                        ERRORS, statuses={**ERRORS.statuses, 400: ErrorCode.PROVIDER_AUTH_FAILED}
                    )
                raise status_error(
                    self.kind,
                    response.status_code,
                    response.headers,
                    error,
                    table,
                    kind=status if isinstance(status, str) else "",
                )
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
