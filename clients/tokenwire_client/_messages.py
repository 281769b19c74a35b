"""Builders for requests, so callers rarely touch protobuf messages directly."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypedDict

from tokenwire.v1 import generation_pb2 as pb

from ._events import ReasoningBlock, ToolCall

MessageLike = pb.Message | Mapping[str, Any]
"""A pb.Message, or a dict such as {"role": "user", "text": "Hi"} ("content" works too)."""

ToolLike = pb.Tool | Mapping[str, Any]
"""A pb.Tool, or a dict with "name", "description" and "parameters" (a JSON Schema)."""

ReasoningEffort = Literal["low", "medium", "high"]

DEFAULT_RESUME_WINDOW = 60.0
"""Seconds asked for by ``durable=True`` without a ``resume_window``; the server may shorten it."""

_ROLES: dict[str, pb.Role.ValueType] = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
_MESSAGE_KEYS = frozenset({"role", "text", "content", "tool_call_id"})
_TOOL_KEYS = frozenset({"name", "description", "parameters"})
_TOOL_CHOICE_MODES: dict[str, pb.ToolChoiceMode.ValueType] = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
_EFFORTS: dict[str, pb.ReasoningEffort.ValueType] = {
    "low": pb.REASONING_EFFORT_LOW,
    "medium": pb.REASONING_EFFORT_MEDIUM,
    "high": pb.REASONING_EFFORT_HIGH,
}


class RequestOptions(TypedDict, total=False):
    """The keyword options of :func:`build_request`, as the clients' ``generate`` takes."""

    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop_sequences: Iterable[str]
    seed: int | None
    tools: Iterable[ToolLike]
    tool_choice: str | None
    reasoning_effort: ReasoningEffort | None
    reasoning_budget_tokens: int | None
    request_id: str
    metadata: Mapping[str, str] | None
    durable: bool
    resume_window: float | None


def system(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_SYSTEM, text=text)


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, text=text)


def assistant(
    text: str = "",
    tool_calls: Iterable[ToolCall | pb.ToolCall] = (),
    reasoning: Iterable[ReasoningBlock | pb.ReasoningBlock] = (),
) -> pb.Message:
    """An earlier model turn; takes a Response's tool_calls and reasoning as they are."""
    return pb.Message(
        role=pb.ROLE_ASSISTANT,
        text=text,
        tool_calls=[pb.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments_json) for call in tool_calls],
        reasoning=[pb.ReasoningBlock(text=block.text, signature=block.signature) for block in reasoning],
    )


def tool_result(tool_call_id: str, text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_TOOL, tool_call_id=tool_call_id, text=text)


def _unknown_keys(given: Mapping[str, Any], known: frozenset[str], what: str) -> None:
    # A misspelt key would otherwise be dropped silently from the request.
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known: {sorted(known)}")


def _message(message: MessageLike) -> pb.Message:
    if isinstance(message, pb.Message):
        return message
    if not isinstance(message, Mapping):
        raise TypeError(f"a message is a pb.Message or a dict, not {type(message).__name__}")
    _unknown_keys(message, _MESSAGE_KEYS, "message")
    role = _ROLES.get(message.get("role", ""))
    if role is None:
        raise ValueError(f"message role must be one of {sorted(_ROLES)}, got {message.get('role')!r}")
    text = message["text"] if "text" in message else message.get("content", "")
    if not isinstance(text, str):
        # Content blocks (lists of parts) are another API's shape; this contract carries text.
        raise TypeError(f"message text must be a str, not {type(text).__name__}")
    return pb.Message(role=role, text=text, tool_call_id=message.get("tool_call_id", ""))


def _tool(tool: ToolLike) -> pb.Tool:
    if isinstance(tool, pb.Tool):
        return tool
    _unknown_keys(tool, _TOOL_KEYS, "tool")
    built = pb.Tool(name=tool["name"], description=tool.get("description", ""))
    if tool.get("parameters") is not None:
        built.parameters.update(tool["parameters"])
    return built


def _tool_choice(choice: str) -> pb.ToolChoice:
    mode = _TOOL_CHOICE_MODES.get(choice)
    if mode is None:
        # Any other string names a tool; a tool called "auto", "none" or "required"
        # cannot be forced by name.
        return pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NAMED, name=choice)
    return pb.ToolChoice(mode=mode)


def build_request(
    model: str,
    messages: Iterable[MessageLike],
    *,
    max_output_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop_sequences: Iterable[str] = (),
    seed: int | None = None,
    tools: Iterable[ToolLike] = (),
    tool_choice: str | None = None,
    reasoning_effort: ReasoningEffort | None = None,
    reasoning_budget_tokens: int | None = None,
    request_id: str = "",
    metadata: Mapping[str, str] | None = None,
    durable: bool = False,
    resume_window: float | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; options left as None stay unset, meaning the server's default.

    ``tool_choice`` is "auto", "none", "required" or the name of a tool to force.

    ``durable=True`` or a ``resume_window`` (seconds, at least 1) makes the stream durable:
    it can be resumed after a break, polled and cancelled by id. A durable request always
    has a request_id (a random one unless given), because retrying a start that failed
    before Start with the same id attaches to the stream instead of paying the provider again.
    """
    if resume_window is None and durable:
        resume_window = DEFAULT_RESUME_WINDOW
    if resume_window is not None:
        if not math.isfinite(resume_window) or resume_window < 1:
            raise ValueError(f"resume_window must be a finite number of seconds >= 1, got {resume_window!r}")
        request_id = request_id or uuid.uuid4().hex
    if isinstance(messages, str | bytes):
        raise TypeError("messages is a list of messages; for a single prompt pass [user(text)]")
    request = pb.GenerateRequest(
        model=model,
        messages=[_message(message) for message in messages],
        stop_sequences=list(stop_sequences),
        tools=[_tool(tool) for tool in tools],
        request_id=request_id,
        metadata=dict(metadata or {}),
    )
    if max_output_tokens is not None:
        request.max_output_tokens = max_output_tokens
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    if tool_choice is not None:
        request.tool_choice.CopyFrom(_tool_choice(tool_choice))
    if reasoning_effort is not None:
        if reasoning_effort not in _EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {sorted(_EFFORTS)}, got {reasoning_effort!r}")
        request.reasoning.effort = _EFFORTS[reasoning_effort]
    if reasoning_budget_tokens is not None:
        request.reasoning.budget_tokens = reasoning_budget_tokens
    if resume_window is not None:
        request.resume_window.FromNanoseconds(round(resume_window * 1e9))
    return request
