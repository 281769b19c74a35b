"""Anthropic Messages streaming through the official `anthropic` SDK.

Mapping notes: system messages go to the separate `system` field; tool results are `tool_result`
blocks in a user turn; consecutive messages of one role are merged into one turn, as the API
wants; `max_tokens` is required, so the route supplies a default. In the stream, content blocks
are numbered across text, thinking and tool use: tool calls are renumbered from 0 for the
contract. `message_delta` usage is cumulative — the last one wins, nothing is summed.
"""

from __future__ import annotations

import base64
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import orjson
from anthropic._models import FinalRequestOptions

from service.config import RouteConfig
from service.errors import invalid_request
from service.events import (
    CacheMarker,
    ChatMessage,
    CitationDelta,
    CitationLocation,
    Finished,
    FinishReason,
    GenerationRequest,
    Part,
    PartKind,
    ProviderEvent,
    ReasoningDelta,
    ReasoningEffort,
    ResponseFormat,
    ResponseFormatType,
    Role,
    Source,
    TextDelta,
    ToolCallDelta,
    ToolChoiceMode,
    Usage,
)
from service.providers.base import ALL_SOURCES, MIB, Capabilities, PromptCaching, bounds, media, read_options
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
    token_count,
    truncated,
)

_STOP_REASONS = {
    "end_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "stop_sequence": FinishReason.STOP_SEQUENCE,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.REFUSAL,
}
# Thinking budgets for an effort, on routes in "budget" reasoning mode.
_EFFORT_BUDGETS = {ReasoningEffort.LOW: 2048, ReasoningEffort.MEDIUM: 8192, ReasoningEffort.HIGH: 24576}
# The smallest thinking budget Anthropic accepts; smaller ones are raised to it.
_MIN_BUDGET = 1024
# Images: 5 MiB each, inline, by URL or as an uploaded file. PDFs: 32 MiB, the same three ways;
# plain text inline (a `text` source) or as an uploaded file. No audio.
_IMAGES = media(dict.fromkeys(("image/jpeg", "image/png", "image/gif", "image/webp"), ALL_SOURCES), 5 * MIB)
_DOCUMENTS = media({"application/pdf": ALL_SOURCES, "text/plain": frozenset({Source.DATA, Source.FILE_ID})}, 32 * MIB)
# cache_control's lifetimes: 5 minutes (the default) and 1 hour.
_CACHE_TTLS = {300.0: "5m", 3600.0: "1h"}
# Uploaded files (`file` sources) are a beta of the Messages API.
_FILES_BETA = "files-api-2025-04-14"
_STRUCTURED_OUTPUT_MODES = ("native", "tool")
_JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def _cache_control(marker: CacheMarker) -> dict[str, str]:
    control = {"type": "ephemeral"}
    if marker.ttl is not None:
        # Validation refused a ttl longer than an hour.
        control["ttl"] = _CACHE_TTLS[next(t for t in _CACHE_TTLS if t >= marker.ttl)]
    return control


def _source(part: Part) -> dict[str, Any]:
    source = part.source
    if source is Source.URL:
        return {"type": "url", "url": part.url}
    if source is Source.FILE_ID:
        return {"type": "file", "file_id": part.file_id}
    assert part.data is not None
    if part.media_type == "text/plain":
        return {"type": "text", "media_type": "text/plain", "data": part.data.decode()}
    return {"type": "base64", "media_type": part.media_type, "data": base64.b64encode(part.data).decode("ascii")}


def _block(part: Part) -> dict[str, Any]:
    """One content block. Validation let through only what this route takes (see _IMAGES, ...)."""
    block: dict[str, Any]
    if part.kind is PartKind.TEXT:
        block = {"type": "text", "text": part.text}
    elif part.kind is PartKind.IMAGE:
        block = {"type": "image", "source": _source(part)}
    else:
        block = {"type": "document", "source": _source(part)}
        if part.title:
            block["title"] = part.title
        if part.context:
            block["context"] = part.context
        if part.citations:
            block["citations"] = {"enabled": True}
    if part.cache is not None:
        block["cache_control"] = _cache_control(part.cache)
    return block


def _content(message: ChatMessage) -> list[dict[str, Any]]:
    if message.role is Role.TOOL:
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        if message.parts:
            block["content"] = [_block(part) for part in message.parts]
        elif message.text:
            block["content"] = message.text
        return [block]
    blocks: list[dict[str, Any]] = []
    for r in message.reasoning:
        if r.redacted_data:
            blocks.append({"type": "redacted_thinking", "data": r.redacted_data})
        elif r.signature:
            # Reasoning without a signature (from another provider) cannot be verified: it is not sent.
            blocks.append({"type": "thinking", "thinking": r.text, "signature": r.signature})
    if message.parts:
        blocks.extend(_block(part) for part in message.parts)
    elif message.text:
        blocks.append({"type": "text", "text": message.text})
    blocks.extend(
        {"type": "tool_use", "id": call.id, "name": call.name, "input": orjson.loads(call.arguments_json)}
        for call in message.tool_calls
    )
    return blocks


def _turns(messages: tuple[ChatMessage, ...]) -> tuple[str | list[dict[str, Any]], list[dict[str, Any]]]:
    """The system prompt, and the conversation as alternating user/assistant turns.

    The system prompt is one text, unless a system message has parts (a cache marker on a
    system prompt is one): then it is a list of text blocks, which can carry `cache_control`.
    """
    system: list[ChatMessage] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role is Role.SYSTEM:
            system.append(message)
            continue
        role = "assistant" if message.role is Role.ASSISTANT else "user"
        blocks = _content(message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if any(m.parts for m in system):
        return [b for m in system for b in _content(m)], turns
    return "\n\n".join(m.text for m in system), turns


def request_body(
    request: GenerationRequest, *, default_max_tokens: int, reasoning_mode: str, structured_output: str = "native"
) -> dict[str, Any]:
    """The Messages parameters: generation options only when the caller set them.

    A JSON response format becomes `output_config.format` ("native", structured outputs), or with
    `structured_output="tool"` a tool the model is forced to call, whose input is the answer.
    """
    system, turns = _turns(request.messages)
    body: dict[str, Any] = {"model": request.upstream_model, "messages": turns, "stream": True}
    if system:
        body["system"] = system
    budget = request.reasoning_budget_tokens
    effort = request.reasoning_effort
    max_tokens = request.max_output_tokens
    if reasoning_mode == "adaptive" and budget is None and effort is not None:
        body["thinking"] = {"type": "adaptive"}
        body["output_config"] = {"effort": effort.value}
    elif budget is not None or effort is not None:
        budget = max(budget if budget is not None else _EFFORT_BUDGETS[effort or ReasoningEffort.MEDIUM], _MIN_BUDGET)
        if max_tokens is not None and budget >= max_tokens:
            # Thinking counts against max_tokens, and its budget must stay below it.
            if max_tokens <= _MIN_BUDGET:
                raise invalid_request(
                    "max_output_tokens",
                    f"must be above {_MIN_BUDGET} when reasoning is on: Anthropic's thinking needs at least "
                    f"{_MIN_BUDGET} tokens of it",
                )
            budget = max_tokens - 1
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if max_tokens is None:
        # Leave the answer its usual room on top of the thinking.
        max_tokens = default_max_tokens + (budget or 0)
    body["max_tokens"] = max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop_sequences:
        body["stop_sequences"] = list(request.stop_sequences)
    # `seed` has no Anthropic equivalent; it is a best-effort hint everywhere, so it is dropped.
    if request.tools:
        body["tools"] = [
            {
                "name": tool.name,
                **({"description": tool.description} if tool.description else {}),
                "input_schema": tool.parameters or {"type": "object", "properties": {}},
            }
            for tool in request.tools
        ]
        choice = request.tool_choice
        if choice.mode is ToolChoiceMode.NAMED:
            body["tool_choice"] = {"type": "tool", "name": choice.name}
        elif choice.mode is ToolChoiceMode.REQUIRED:
            body["tool_choice"] = {"type": "any"}
        elif choice.mode is ToolChoiceMode.NONE:
            body["tool_choice"] = {"type": "none"}
    fmt = request.response_format
    if fmt is not None and fmt.type is not ResponseFormatType.TEXT:
        if structured_output == "tool":
            _forced_tool(body, request, fmt)
        else:
            # Objects in Anthropic's structured outputs must list their properties: "any JSON
            # object" cannot be said natively (the route's capabilities refuse it).
            body.setdefault("output_config", {})["format"] = {"type": "json_schema", "schema": fmt.schema}
    return body


def json_tool_name(fmt: ResponseFormat) -> str:
    return fmt.name or "json_answer"


def _forced_tool(body: dict[str, Any], request: GenerationRequest, fmt: ResponseFormat) -> None:
    where = "response_format"
    if request.tools:
        raise invalid_request(where, "this route answers in JSON through a forced tool call: it takes no tools with it")
    if "thinking" in body:
        raise invalid_request(
            where, "this route answers in JSON through a forced tool call, which thinking cannot go with"
        )
    tool: dict[str, Any] = {
        "name": json_tool_name(fmt),
        "description": fmt.description or "Answer by calling this tool: its input is the answer.",
        "input_schema": fmt.schema if fmt.type is ResponseFormatType.JSON_SCHEMA else _JSON_OBJECT_SCHEMA,
    }
    if fmt.strict:
        tool["strict"] = True
    body["tools"] = [tool]
    body["tool_choice"] = {"type": "tool", "name": tool["name"]}


def uses_files(request: GenerationRequest) -> bool:
    return any(part.file_id for message in request.messages for part in message.parts)


class EventParser:
    """Messages stream events -> neutral events."""

    __slots__ = (
        "done",
        "json_tool",
        "kind",
        "model",
        "out",
        "request_id",
        "start_usage",
        "stop_reason",
        "stop_sequence",
        "tool_indexes",
        "tools_without_arguments",
        "usage",
    )

    def __init__(self, kind: str, json_tool: str = "") -> None:
        self.kind = kind
        # The forced tool whose input is the answer (structured output by tool), or "".
        self.json_tool = json_tool
        self.request_id = ""
        self.model = ""
        self.out: list[ProviderEvent] = []
        self.done = False
        # Content block index -> the tool call's position among this response's tool calls.
        self.tool_indexes: dict[int, int] = {}
        # Tool calls (by content block index) that have streamed no argument text yet.
        self.tools_without_arguments: set[int] = set()
        self.start_usage: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self.stop_sequence = ""

    def handle(self, name: bytes, data: bytes) -> None:
        event = loads(data, self.kind)
        kind = event.get("type")
        if kind == "content_block_delta":
            self._delta(event["index"], event["delta"])
        elif kind == "content_block_start":
            self._block_start(event["index"], event["content_block"])
        elif kind == "content_block_stop":
            self._block_stop(event["index"])
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            self.stop_reason = delta.get("stop_reason") or self.stop_reason
            self.stop_sequence = delta.get("stop_sequence") or self.stop_sequence
            usage = event.get("usage")
            if usage:
                # Cumulative totals: the latest replaces the earlier ones.
                self.usage = usage
        elif kind == "message_start":
            message = event["message"]
            self.start_usage = message.get("usage") or {}
            model = message.get("model")
            if isinstance(model, str):
                self.model = model
        elif kind == "message_stop":
            self.done = True
        elif kind == "error" or name == b"error":
            raise stream_error(self.kind, event, AnthropicProvider.errors)
        # ping, content_block_stop and event types added later carry nothing to relay.

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        kind = delta["type"]
        if kind == "text_delta":
            text = delta["text"]
            if text:
                self.out.append(TextDelta(_text(text)))
        elif kind == "input_json_delta":
            piece = delta["partial_json"]
            if piece:
                self.tools_without_arguments.discard(index)
                position = self.tool_indexes[index]
                if position < 0:
                    self.out.append(TextDelta(_text(piece)))  # the forced JSON tool's input is the answer
                else:
                    self.out.append(ToolCallDelta(index=position, arguments=_text(piece)))
        elif kind == "thinking_delta":
            thinking = delta["thinking"]
            if thinking:
                self.out.append(ReasoningDelta(_text(thinking)))
        elif kind == "signature_delta":
            self.out.append(ReasoningDelta("", signature=_text(delta["signature"])))

    def _block_start(self, index: int, block: dict[str, Any]) -> None:
        kind = block["type"]
        if kind == "tool_use":
            self.tools_without_arguments.add(index)
            if self.json_tool and block["name"] == self.json_tool:
                self.tool_indexes[index] = -1
                return
            # A forced JSON tool (index -1) comes with no other tools: positions stay from 0.
            position = self.tool_indexes[index] = len(self.tool_indexes)
            self.out.append(ToolCallDelta(index=position, id=_text(block["id"]), name=_text(block["name"])))
        elif kind == "text" and block.get("text"):
            self.out.append(TextDelta(_text(block["text"])))
        elif kind == "thinking" and block.get("thinking"):
            self.out.append(ReasoningDelta(_text(block["thinking"])))
        elif kind == "redacted_thinking":
            self.out.append(ReasoningDelta("", redacted_data=_text(block["data"])))

    def _block_stop(self, index: int) -> None:
        if index in self.tools_without_arguments:
            # A call of a tool without parameters streams no input at all; the contract's
            # arguments are always a JSON object.
            self.tools_without_arguments.discard(index)
            position = self.tool_indexes[index]
            self.out.append(TextDelta("{}") if position < 0 else ToolCallDelta(index=position, arguments="{}"))

    def finish(self) -> Finished:
        # message_stop ends the body, but message_delta's stop_reason is what says the answer is
        # complete: without it the stream never said why it stopped, and did not finish cleanly
        # (as an OpenAI [DONE] without a finish_reason).
        if not self.done or self.stop_reason is None:
            raise truncated(self.kind)
        raw = self.stop_reason
        reason = _STOP_REASONS.get(raw, FinishReason.OTHER)
        if reason is FinishReason.TOOL_CALLS and self.json_tool and all(p < 0 for p in self.tool_indexes.values()):
            reason = FinishReason.STOP  # the only call was the answer
        return Finished(
            reason=reason,
            raw_reason=raw,
            stop_sequence=self.stop_sequence,
            usage=self._usage(),
            provider_request_id=self.request_id,
            provider_model=self.model,
        )

    def _usage(self) -> Usage | None:
        if self.usage is None and not self.start_usage:
            return None
        # message_delta's totals win; message_start's stand where the delta leaves a count out.
        totals = {**self.start_usage, **{k: v for k, v in (self.usage or {}).items() if v is not None}}
        uncached = token_count(totals.get("input_tokens"))
        cache_read = token_count(totals.get("cache_read_input_tokens"))
        cache_write = token_count(totals.get("cache_creation_input_tokens"))
        details = totals.get("output_tokens_details")
        return Usage(
            # Anthropic counts cached prompt tokens apart; the contract's input includes them.
            input_tokens=None if uncached is None else uncached + (cache_read or 0) + (cache_write or 0),
            output_tokens=token_count(totals.get("output_tokens")) if self.usage is not None else None,
            cache_read_input_tokens=cache_read,
            cache_write_input_tokens=cache_write,
            reasoning_tokens=token_count(details.get("thinking_tokens")) if isinstance(details, dict) else None,
        )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _index(value: object) -> int:
    if type(value) is not int or value < 0:
        raise TypeError("expected an index")
    return value


# A citation's location type -> the contract's, and its start and end keys.
_CITATION_LOCATIONS = {
    "char_location": (CitationLocation.CHARACTERS, "start_char_index", "end_char_index"),
    "page_location": (CitationLocation.PAGES, "start_page_number", "end_page_number"),
    "content_block_location": (CitationLocation.CONTENT_BLOCKS, "start_block_index", "end_block_index"),
}


class CitingEventParser(EventParser):
    """An EventParser that also relays `citations_delta`s, for requests that asked for citations.

    A citation belongs to the text block it arrives in, so it is sent when that block ends, with
    the block's range of the answer text. Counting the answer's characters for that is done here
    only, so that requests without citations pay nothing for it.
    """

    __slots__ = ("answer_chars", "block_starts", "citations")

    def __init__(self, kind: str, json_tool: str = "") -> None:
        super().__init__(kind, json_tool)
        self.answer_chars = 0
        self.block_starts: dict[int, int] = {}
        self.citations: dict[int, list[CitationDelta]] = {}

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        kind = delta["type"]
        if kind == "citations_delta":
            self.citations.setdefault(index, []).append(self._citation(delta["citation"]))
            return
        if kind == "text_delta":
            self.answer_chars += len(_text(delta["text"]))
        super()._delta(index, delta)

    def _block_start(self, index: int, block: dict[str, Any]) -> None:
        if block["type"] == "text":
            self.block_starts[index] = self.answer_chars
            self.answer_chars += len(_text(block.get("text") or ""))
        super()._block_start(index, block)

    def _block_stop(self, index: int) -> None:
        super()._block_stop(index)
        citations = self.citations.pop(index, None)
        if citations:
            start = self.block_starts.get(index, self.answer_chars)
            for citation in citations:
                citation.text_start, citation.text_end = start, self.answer_chars
                self.out.append(citation)

    def _citation(self, raw: dict[str, Any]) -> CitationDelta:
        citation = CitationDelta(0, 0, _text(raw.get("cited_text") or ""))
        kind = raw["type"]
        if kind in _CITATION_LOCATIONS:
            citation.location, start, end = _CITATION_LOCATIONS[kind]
            citation.start_index, citation.end_index = _index(raw[start]), _index(raw[end])
            citation.document_index = _index(raw.get("document_index", 0))
            citation.document_title = _text(raw.get("document_title") or "")
        elif kind == "web_search_result_location":
            citation.location = CitationLocation.URL
            citation.url = _text(raw["url"])
            citation.document_title = _text(raw.get("title") or "")
        return citation


def per_request_headers(client: anthropic.AsyncAnthropic) -> bool:
    """Whether the SDK adds to each request what a template cannot hold: credentials it refreshes
    (its credential cache) or its middleware's work. (A route's trace_upstream, the trace
    context, is the other such thing.)"""
    return client.custom_auth is not None or bool(client.middleware)


@dataclass(frozen=True, slots=True)
class AnthropicOptions(ConnectionOptions):
    """An `anthropic` route's options (`[routes.NAME.options]`)."""

    base_url: str = "https://api.anthropic.com"
    api_key_env: str = "ANTHROPIC_API_KEY"
    # Sent when the caller sets no max_output_tokens: the API requires one.
    max_tokens: int = bounds(4096, minimum=1, maximum=1_000_000)
    reasoning_mode: str = bounds("budget", choices=("budget", "adaptive"))
    # How a JSON response format is asked for: "native" structured outputs (output_config.format),
    # or "tool", a forced tool call, for models without them.
    structured_output: str = bounds("native", choices=_STRUCTURED_OUTPUT_MODES)


class AnthropicProvider(HTTPProvider):
    kind = "anthropic"
    supports_tools = True
    supports_reasoning = True
    errors = ErrorTable(
        stream_types=SSE_STREAM_TYPES,
        status_exception=anthropic.APIStatusError,
        connection_exception=anthropic.APIConnectionError,
    )
    request_id_header = "request-id"

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.options = o = read_options(AnthropicOptions, route)
        self.settings = HTTPSettings.of(o, checked_url(route, "base_url", o.base_url), route_key(route, o.api_key_env))
        self.default_max_tokens = o.max_tokens
        self.reasoning_mode = o.reasoning_mode
        self.structured_output = o.structured_output
        formats = {ResponseFormatType.TEXT, ResponseFormatType.JSON_SCHEMA}
        if self.structured_output == "tool":
            formats.add(ResponseFormatType.JSON_OBJECT)
        self.capabilities = Capabilities(
            images=_IMAGES,
            documents=_DOCUMENTS,
            prompt_caching=PromptCaching.EXPLICIT,
            cache_ttls=tuple(_CACHE_TTLS),
            response_formats=frozenset(formats),
            citations=True,
            document_context=True,
        )
        self.transport = self.settings.transport()
        self.client = anthropic.AsyncAnthropic(
            api_key=self.settings.api_key,
            base_url=self.settings.base_url,
            # The router retries (it knows the caller's deadline); SDK retries would stack on it.
            max_retries=0,
            timeout=self.settings.read_timeout,
            http_client=self.settings.http_client(anthropic.DefaultAsyncHttpxClient, self.transport),
            # tokenwire's own span covers the call (service/tracing.py): none of the SDK's, and
            # the trace context goes upstream only where the route's trace_upstream says so.
            open_telemetry={"traces": False, "propagation": route.trace_upstream},
        )
        self.sender = TemplateSender(
            self.client,
            self.transport,
            FinalRequestOptions,
            credential=lambda: (self.client.api_key, self.client.auth_token),
            dynamic=lambda: self.route.trace_upstream or per_request_headers(self.client),
        )

    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        body = request_body(
            request,
            default_max_tokens=self.default_max_tokens,
            reasoning_mode=self.reasoning_mode,
            structured_output=self.structured_output,
        )
        headers = {"anthropic-beta": _FILES_BETA} if uses_files(request) else None
        return self.sender.post("/v1/messages", json_bytes(body), self.settings.limits(request), headers)

    def _parser(self, request: GenerationRequest) -> EventParser:
        fmt = request.response_format
        json_tool = ""
        if self.structured_output == "tool" and fmt is not None and fmt.type is not ResponseFormatType.TEXT:
            json_tool = json_tool_name(fmt)
        if any(part.citations for message in request.messages for part in message.parts):
            return CitingEventParser(self.kind, json_tool)
        return EventParser(self.kind, json_tool)

    async def aclose(self) -> None:
        await self.client.close()
