"""The Chat Completions stream's shapes, shared by the adapters whose vendors speak them: OpenAI
(and Azure, and the compatible servers) and IBM watsonx.ai's chat_stream. No vendor SDK here, so
that a route of one vendor does not load the other's.

`ChunkReader` reads the parts of a chunk both vendors send alike — choice 0's delta (text,
reasoning, refusal, tool-call pieces), its finish reason, the usage — and each adapter's parser
adds its own end markers, error shapes and finish rules.
"""

from __future__ import annotations

from typing import Any

from service.events import (
    Finished,
    FinishReason,
    GenerationRequest,
    ProviderEvent,
    ReasoningDelta,
    ReasoningEffort,
    ResponseFormat,
    TextDelta,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from service.providers.upstream import token_count


def effort_for_budget(budget: int) -> ReasoningEffort:
    """Chat Completions takes an effort, not a budget: the closest effort to a token budget."""
    if budget <= 4096:
        return ReasoningEffort.LOW
    if budget <= 16384:
        return ReasoningEffort.MEDIUM
    return ReasoningEffort.HIGH


def reasoning_effort(request: GenerationRequest) -> ReasoningEffort | None:
    """The request's effort, or the one closest to its token budget."""
    effort = request.reasoning_effort
    if effort is None and request.reasoning_budget_tokens is not None:
        effort = effort_for_budget(request.reasoning_budget_tokens)
    return effort


def add_sampling(body: dict[str, Any], request: GenerationRequest, max_tokens_field: str) -> None:
    """The generation options the caller set, under their Chat Completions names."""
    if request.max_output_tokens is not None:
        body[max_tokens_field] = request.max_output_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.stop_sequences:
        body["stop"] = list(request.stop_sequences)
    if request.seed is not None:
        body["seed"] = request.seed


def function_tools(tools: tuple[ToolSpec, ...]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                **({"description": tool.description} if tool.description else {}),
                "parameters": tool.parameters or {"type": "object", "properties": {}},
            },
        }
        for tool in tools
    ]


def json_schema_format(fmt: ResponseFormat, name: str) -> dict[str, Any]:
    """`response_format` for a JSON schema; `name` is the schema's (a vendor may require one)."""
    schema: dict[str, Any] = {"name": name, "schema": fmt.schema, "strict": fmt.strict}
    if fmt.description:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


def usage_from(raw: dict[str, Any]) -> Usage:
    prompt = raw.get("prompt_tokens_details")
    completion = raw.get("completion_tokens_details")
    return Usage(
        input_tokens=token_count(raw.get("prompt_tokens")),
        output_tokens=token_count(raw.get("completion_tokens")),
        cache_read_input_tokens=token_count(prompt.get("cached_tokens")) if isinstance(prompt, dict) else None,
        reasoning_tokens=token_count(completion.get("reasoning_tokens")) if isinstance(completion, dict) else None,
    )


def _well_typed(piece: ToolCallDelta) -> bool:
    return (
        type(piece.index) is int
        and 0 <= piece.index < 2**31
        and isinstance(piece.id, str)
        and isinstance(piece.name, str)
        and isinstance(piece.arguments, str)
    )


class ChunkReader:
    """What a chat completion chunk says of choice 0 and of the usage. Only choice 0 is read
    (tokenwire asks for one). A value of the wrong type raises TypeError (the read loop's
    protocol error)."""

    __slots__ = ("calls", "done", "finish_reason", "kind", "model", "out", "refused", "request_id", "usage")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.out: list[ProviderEvent] = []
        self.done = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.refused = False
        # Tool calls begun (a piece with an id or a name).
        self.calls = 0
        self.request_id = ""
        # The snapshot that answered, read from the usage chunk: once per stream, not per chunk.
        self.model = ""

    # Where the usage chunk names the model that answered, first found wins.
    model_keys: tuple[str, ...] = ("model",)

    def _read(self, chunk: dict[str, Any]) -> None:
        usage = chunk.get("usage")
        if usage:
            self.usage = usage_from(usage)
            for key in self.model_keys:
                model = chunk.get(key)
                if isinstance(model, str) and model:
                    self.model = model
                    break
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) == 0:
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        out = self.out
        delta = choice.get("delta")
        if delta:
            # OpenAI's reasoning models stream none; vLLM, DeepSeek and watsonx send
            # `reasoning_content`; Ollama and OpenRouter send `reasoning`.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):
                out.append(ReasoningDelta(reasoning))
            content = delta.get("content")
            if content and isinstance(content, str):
                out.append(TextDelta(content))
            refusal = delta.get("refusal")
            if refusal and isinstance(refusal, str):
                self.refused = True
                out.append(TextDelta(refusal))
            calls = delta.get("tool_calls")
            if calls:
                for position, call in enumerate(calls):
                    function = call.get("function") or {}
                    piece = ToolCallDelta(
                        index=call.get("index", position),
                        id=call.get("id") or "",
                        name=function.get("name") or "",
                        arguments=function.get("arguments") or "",
                    )
                    if not _well_typed(piece):
                        raise TypeError("tool call delta")
                    if piece.id or piece.name:
                        self.calls += 1
                    if piece.id or piece.name or piece.arguments:
                        out.append(piece)
        reason = choice.get("finish_reason")
        if reason:
            if not isinstance(reason, str):
                raise TypeError("finish_reason")
            self.finish_reason = reason

    def _finished(self, reason: FinishReason, raw: str) -> Finished:
        if self.refused and reason is FinishReason.STOP:
            # The model declined (its refusal streamed as text): not an ordinary stop.
            reason = FinishReason.REFUSAL
        return Finished(
            reason=reason,
            raw_reason=raw,
            usage=self.usage,
            provider_request_id=self.request_id,
            provider_model=self.model,
        )
