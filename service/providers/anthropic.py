"""Anthropic Messages streaming through the official `anthropic` SDK.

Mapping notes: system messages go to the separate `system` field; tool results are `tool_result`
blocks in a user turn; consecutive messages of one role are merged into one turn, as the API
wants; `max_tokens` is required, so the route supplies a default. In the stream, content blocks
are numbered across text, thinking and tool use: tool calls are renumbered from 0 for the
contract. `message_delta` usage is cumulative — the last one wins, nothing is summed.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

import anthropic
import httpx2
import orjson

from service.config import RouteConfig
from service.errors import invalid_request
from service.events import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerationRequest,
    ProviderEvent,
    ReasoningDelta,
    ReasoningEffort,
    Role,
    TextDelta,
    ToolCallDelta,
    ToolChoiceMode,
    Usage,
)
from service.providers.base import Options
from service.providers.upstream import (
    HTTPProvider,
    HTTPSettings,
    loads,
    post_streaming,
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


def _content(message: ChatMessage) -> list[dict[str, Any]]:
    if message.role is Role.TOOL:
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
        if message.text:
            block["content"] = message.text
        return [block]
    # Reasoning without a signature (from another provider) cannot be verified: it is not sent.
    blocks: list[dict[str, Any]] = [
        {"type": "thinking", "thinking": r.text, "signature": r.signature} for r in message.reasoning if r.signature
    ]
    if message.text:
        blocks.append({"type": "text", "text": message.text})
    blocks.extend(
        {"type": "tool_use", "id": call.id, "name": call.name, "input": orjson.loads(call.arguments_json)}
        for call in message.tool_calls
    )
    return blocks


def _turns(messages: tuple[ChatMessage, ...]) -> tuple[str, list[dict[str, Any]]]:
    """The system text, and the conversation as alternating user/assistant turns."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role is Role.SYSTEM:
            system.append(message.text)
            continue
        role = "assistant" if message.role is Role.ASSISTANT else "user"
        blocks = _content(message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(system), turns


def request_body(request: GenerationRequest, *, default_max_tokens: int, reasoning_mode: str) -> dict[str, Any]:
    """The Messages parameters: generation options only when the caller set them."""
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
    return body


class EventParser:
    """Messages stream events -> neutral events."""

    __slots__ = (
        "done",
        "kind",
        "out",
        "start_usage",
        "stop_reason",
        "stop_sequence",
        "tool_indexes",
        "tools_without_arguments",
        "usage",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
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
            index = event["index"]
            if index in self.tools_without_arguments:
                # A call of a tool without parameters streams no input at all; the contract's
                # arguments are always a JSON object.
                self.tools_without_arguments.discard(index)
                self.out.append(ToolCallDelta(index=self.tool_indexes[index], arguments="{}"))
        elif kind == "message_delta":
            delta = event.get("delta") or {}
            self.stop_reason = delta.get("stop_reason") or self.stop_reason
            self.stop_sequence = delta.get("stop_sequence") or self.stop_sequence
            usage = event.get("usage")
            if usage:
                # Cumulative totals: the latest replaces the earlier ones.
                self.usage = usage
        elif kind == "message_start":
            self.start_usage = event["message"].get("usage") or {}
        elif kind == "message_stop":
            self.done = True
        elif kind == "error" or name == b"error":
            raise stream_error(self.kind, event)
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
                self.out.append(ToolCallDelta(index=self.tool_indexes[index], arguments=_text(piece)))
        elif kind == "thinking_delta":
            thinking = delta["thinking"]
            if thinking:
                self.out.append(ReasoningDelta(_text(thinking)))
        elif kind == "signature_delta":
            self.out.append(ReasoningDelta("", signature=_text(delta["signature"])))

    def _block_start(self, index: int, block: dict[str, Any]) -> None:
        kind = block["type"]
        if kind == "tool_use":
            position = self.tool_indexes[index] = len(self.tool_indexes)
            self.tools_without_arguments.add(index)
            self.out.append(ToolCallDelta(index=position, id=_text(block["id"]), name=_text(block["name"])))
        elif kind == "text" and block.get("text"):
            self.out.append(TextDelta(_text(block["text"])))
        elif kind == "thinking" and block.get("thinking"):
            self.out.append(ReasoningDelta(_text(block["thinking"])))

    def finish(self) -> Finished:
        # message_stop ends the body, but message_delta's stop_reason is what says the answer is
        # complete: without it the stream never said why it stopped, and did not finish cleanly
        # (as an OpenAI [DONE] without a finish_reason).
        if not self.done or self.stop_reason is None:
            raise truncated(self.kind)
        raw = self.stop_reason
        return Finished(
            reason=_STOP_REASONS.get(raw, FinishReason.OTHER),
            raw_reason=raw,
            stop_sequence=self.stop_sequence,
            usage=self._usage(),
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


class AnthropicProvider(HTTPProvider):
    kind = "anthropic"
    supports_tools = True
    supports_reasoning = True
    status_error_class: ClassVar[type[Exception]] = anthropic.APIStatusError
    connection_error_class: ClassVar[type[Exception]] = anthropic.APIConnectionError

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        options = Options(route)
        self.settings = HTTPSettings.read(
            options, route, default_key_env="ANTHROPIC_API_KEY", default_base_url="https://api.anthropic.com"
        )
        self.default_max_tokens = options.number("max_tokens", 4096, minimum=1, maximum=1_000_000)
        self.reasoning_mode = options.choice("reasoning_mode", "budget", ("budget", "adaptive"))
        options.done()
        self.client = anthropic.AsyncAnthropic(
            api_key=self.settings.api_key,
            base_url=self.settings.base_url,
            # The router retries (it knows the caller's deadline); SDK retries would stack on it.
            max_retries=0,
            timeout=self.settings.read_timeout,
            http_client=self.settings.http_client(anthropic.DefaultAsyncHttpxClient),
        )

    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        body = request_body(request, default_max_tokens=self.default_max_tokens, reasoning_mode=self.reasoning_mode)
        return post_streaming(self.client, "/v1/messages", body, self.settings.timeout(request))

    def _parser(self, request: GenerationRequest) -> EventParser:
        return EventParser(self.kind)

    async def aclose(self) -> None:
        await self.client.close()
