"""Builders for requests, so callers rarely touch protobuf messages directly."""

from __future__ import annotations

import math
import mimetypes
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
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


ResponseFormatLike = pb.ResponseFormat | Literal["text", "json_object"]
"""A pb.ResponseFormat (see :func:`json_schema`), or "text" / "json_object"."""

MediaSource = str | os.PathLike[str] | bytes
"""Where a part's content is: bytes, a URL ("https://..."), or any other str or path: a file to read."""

CacheLike = bool | float
"""A cache marker: True for the provider's default lifetime, or the shortest lifetime in seconds."""

# Media types told by a file's first bytes, for bytes given without one.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"ID3", "audio/mpeg"),
    (b"\xff\xfb", "audio/mpeg"),
    (b"OggS", "audio/ogg"),
    (b"fLaC", "audio/flac"),
)
# mimetypes' names that the vendors spell otherwise.
_MEDIA_ALIASES = {"audio/x-wav": "audio/wav", "audio/wave": "audio/wav", "audio/mp3": "audio/mpeg"}


def _sniff(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    return next((media_type for magic, media_type in _MAGIC if data.startswith(magic)), "")


def _cache(cache: CacheLike) -> pb.CacheControl | None:
    if cache is False:
        return None
    control = pb.CacheControl()
    if cache is not True:
        if not math.isfinite(cache) or cache < 1:
            raise ValueError(f"a cache lifetime is a finite number of seconds >= 1, got {cache!r}")
        control.ttl.FromNanoseconds(round(cache * 1e9))
    return control


def _part(part: pb.ContentPart, cache: CacheLike) -> pb.ContentPart:
    control = _cache(cache)
    if control is not None:
        part.cache_control.CopyFrom(control)
    return part


def text(content: str, *, cache: CacheLike = False) -> pb.ContentPart:
    """A text part; ``cache`` marks the prompt up to and including it for the provider's cache."""
    return _part(pb.ContentPart(text=content), cache)


def _media(
    message: type[pb.ImagePart] | type[pb.DocumentPart] | type[pb.AudioPart],
    source: MediaSource | None,
    file_id: str,
    media_type: str,
    **extra: Any,
) -> Any:
    if (source is None) == (not file_id):
        raise ValueError("give a part's content as bytes, a URL or a path, or give a file_id: one of them")
    if file_id:
        return message(file_id=file_id, media_type=media_type, **extra)
    if isinstance(source, bytes):
        media_type = media_type or _sniff(source)
        if not media_type:
            raise ValueError("cannot tell the media type of these bytes: pass media_type=")
        return message(data=source, media_type=media_type, **extra)
    if isinstance(source, str) and "://" in source:
        return message(url=source, media_type=media_type, **extra)
    assert source is not None
    path = Path(source)
    data = path.read_bytes()
    if not media_type:
        guessed = mimetypes.guess_type(path.name)[0] or _sniff(data)
        media_type = _MEDIA_ALIASES.get(guessed, guessed)
        if not media_type:
            raise ValueError(f"cannot tell the media type of {path}: pass media_type=")
    return message(data=data, media_type=media_type, **extra)


def image(
    source: MediaSource | None = None, *, file_id: str = "", media_type: str = "", cache: CacheLike = False
) -> pb.ContentPart:
    """An image part from a file path, bytes, a URL (the provider fetches it) or a provider file id.

    The media type is taken from the file's name or its first bytes unless given.
    """
    return _part(pb.ContentPart(image=_media(pb.ImagePart, source, file_id, media_type)), cache)


def document(
    source: MediaSource | None = None,
    *,
    file_id: str = "",
    media_type: str = "",
    title: str = "",
    context: str = "",
    citations: bool = False,
    cache: CacheLike = False,
) -> pb.ContentPart:
    """A document part (a PDF, or plain text), like :func:`image`; ``citations`` asks to cite it."""
    part = _media(pb.DocumentPart, source, file_id, media_type, title=title, context=context, citations=citations)
    return _part(pb.ContentPart(document=part), cache)


def audio(
    source: MediaSource | None = None, *, file_id: str = "", media_type: str = "", cache: CacheLike = False
) -> pb.ContentPart:
    """An audio part (WAV, MP3, ...), like :func:`image`."""
    return _part(pb.ContentPart(audio=_media(pb.AudioPart, source, file_id, media_type)), cache)


def json_schema(
    name: str, schema: Mapping[str, Any], *, strict: bool = True, description: str = ""
) -> pb.ResponseFormat:
    """A response format: JSON that matches ``schema`` (a JSON Schema object). See Response.parsed()."""
    fmt = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, name=name, description=description, strict=strict)
    fmt.schema.update(schema)
    return fmt


_FORMATS: dict[str, pb.ResponseFormatType.ValueType] = {
    "text": pb.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
}


def _response_format(fmt: ResponseFormatLike) -> pb.ResponseFormat:
    if isinstance(fmt, pb.ResponseFormat):
        return fmt
    if fmt not in _FORMATS:
        raise ValueError(f"response_format is 'text', 'json_object' or json_schema(...), got {fmt!r}")
    return pb.ResponseFormat(type=_FORMATS[fmt])


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
    response_format: ResponseFormatLike | None


def _content_message(
    role: pb.Role.ValueType, content: tuple[str | pb.ContentPart, ...], cache: CacheLike
) -> pb.Message:
    if len(content) == 1 and isinstance(content[0], str):
        message = pb.Message(role=role, text=content[0])
    else:
        message = pb.Message(role=role, parts=[pb.ContentPart(text=c) if isinstance(c, str) else c for c in content])
    control = _cache(cache)
    if control is not None:
        message.cache_control.CopyFrom(control)
    return message


def system(*content: str | pb.ContentPart, cache: CacheLike = False) -> pb.Message:
    """A system message: one text, or text parts. ``cache=True`` marks it for the prompt cache."""
    return _content_message(pb.ROLE_SYSTEM, content, cache)


def user(*content: str | pb.ContentPart, cache: CacheLike = False) -> pb.Message:
    """A user message: one text, or parts in order, e.g. ``user("What is this?", image("a.png"))``."""
    return _content_message(pb.ROLE_USER, content, cache)


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
        reasoning=[
            pb.ReasoningBlock(text=block.text, signature=block.signature, redacted_data=block.redacted_data)
            for block in reasoning
        ],
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
    response_format: ResponseFormatLike | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest; options left as None stay unset, meaning the server's default.

    ``tool_choice`` is "auto", "none", "required" or the name of a tool to force.

    ``response_format`` is "json_object" or :func:`json_schema`: the answer is JSON then, and
    ``Response.parsed()`` decodes it.

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
    if response_format is not None:
        request.response_format.CopyFrom(_response_format(response_format))
    return request
