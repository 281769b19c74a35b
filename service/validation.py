"""Request validation: the contract's message in, a provider-neutral request out.

Everything a provider must never see is rejected here with INVALID_ARGUMENT and the offending
field named, before any provider is called.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from typing import Any

import jsonschema
import orjson
from google.protobuf import json_format, struct_pb2

from service.errors import invalid_request
from service.events import (
    CacheMarker,
    ChatMessage,
    GenerationRequest,
    Part,
    PartKind,
    ReasoningBlock,
    ReasoningEffort,
    ResponseFormat,
    ResponseFormatType,
    Role,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from service.routing import Route
from tokenwire.v1 import generation_pb2 as pb

MAX_OUTPUT_TOKENS = 1_000_000
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_TOOLS = 128
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 256
# Deepest nesting of objects and arrays in caller JSON (`{}` is 1 deep): far beyond any real tool
# call or schema, and well within every parser and encoder on the way (orjson's limit is 1024,
# Python's recursive ones about 1000). A google.protobuf.Struct meets protobuf's own nesting
# limit first (see the README).
MAX_JSON_DEPTH = 64

_ROLES = {
    pb.ROLE_SYSTEM: Role.SYSTEM,
    pb.ROLE_USER: Role.USER,
    pb.ROLE_ASSISTANT: Role.ASSISTANT,
    pb.ROLE_TOOL: Role.TOOL,
}
_TOOL_CHOICES = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    pb.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    pb.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    pb.TOOL_CHOICE_MODE_NAMED: ToolChoiceMode.NAMED,
}
_EFFORTS = {
    pb.REASONING_EFFORT_LOW: ReasoningEffort.LOW,
    pb.REASONING_EFFORT_MEDIUM: ReasoningEffort.MEDIUM,
    pb.REASONING_EFFORT_HIGH: ReasoningEffort.HIGH,
}
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_URL_CHARS = 8192
MAX_TITLE_CHARS = 256
MAX_CONTEXT_CHARS = 8192
_FILE_ID = re.compile(r"[\x21-\x7e]{1,256}")
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_FORMATS = {
    pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_TEXT: ResponseFormatType.TEXT,
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: ResponseFormatType.JSON_OBJECT,
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: ResponseFormatType.JSON_SCHEMA,
}
_MEDIA_KINDS = {"image": PartKind.IMAGE, "document": PartKind.DOCUMENT, "audio": PartKind.AUDIO}
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def _enum_name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def prompt_chars(request: GenerationRequest) -> int:
    return sum(
        len(m.text) + sum(len(c.arguments_json) for c in m.tool_calls) + sum(len(p.text) for p in m.parts)
        for m in request.messages
    )


def validate_request(
    request: pb.GenerateRequest,
    route: Route,
    *,
    stream_id: str,
    deadline: float | None,
    max_request_bytes: int,
    size: int | None = None,
) -> GenerationRequest:
    # `size`: the request's size on the wire, when known; ByteSize() serializes the message to
    # find it, which for a large prompt costs two more copies of it for a moment.
    size = request.ByteSize() if size is None else size
    if size > max_request_bytes:
        raise invalid_request("request", f"is {size} bytes; this server accepts at most {max_request_bytes}")
    if not request.messages:
        raise invalid_request("messages", "at least one message is required")
    messages = tuple(_message(m, i) for i, m in enumerate(request.messages))

    max_tokens: int | None = None
    if request.HasField("max_output_tokens"):
        max_tokens = request.max_output_tokens
        if not 1 <= max_tokens <= MAX_OUTPUT_TOKENS:
            raise invalid_request("max_output_tokens", f"must be from 1 to {MAX_OUTPUT_TOKENS}, got {max_tokens}")
    temperature: float | None = None
    if request.HasField("temperature"):
        temperature = request.temperature
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            raise invalid_request("temperature", f"must be a finite number from 0 to 2, got {temperature}")
    top_p: float | None = None
    if request.HasField("top_p"):
        top_p = request.top_p
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise invalid_request("top_p", f"must be a finite number above 0 and at most 1, got {top_p}")

    stops = tuple(request.stop_sequences)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid_request("stop_sequences", f"at most {MAX_STOP_SEQUENCES} are allowed, got {len(stops)}")
    for i, stop in enumerate(stops):
        if not stop or len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise invalid_request(f"stop_sequences[{i}]", f"must be 1 to {MAX_STOP_SEQUENCE_CHARS} characters")

    tools = _tools(request)
    if tools and not route.provider.supports_tools:
        raise invalid_request("tools", f"route {route.name!r} does not support tools")
    choice = _tool_choice(request, tools)

    effort: ReasoningEffort | None = None
    budget: int | None = None
    if request.HasField("reasoning"):
        reasoning = request.reasoning
        if reasoning.effort != pb.REASONING_EFFORT_UNSPECIFIED:
            if reasoning.effort not in _EFFORTS:
                raise invalid_request("reasoning.effort", f"unknown value {reasoning.effort}")
            effort = _EFFORTS[reasoning.effort]
        if reasoning.HasField("budget_tokens"):
            budget = reasoning.budget_tokens
            if not 1 <= budget <= MAX_OUTPUT_TOKENS:
                raise invalid_request("reasoning.budget_tokens", f"must be from 1 to {MAX_OUTPUT_TOKENS}, got {budget}")
        if (effort is not None or budget is not None) and not route.provider.supports_reasoning:
            raise invalid_request("reasoning", f"route {route.name!r} does not support reasoning options")

    if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
        raise invalid_request("request_id", "must be 1 to 128 printable ASCII characters without spaces")
    _check_metadata(request)
    response_format = _response_format(request.response_format) if request.HasField("response_format") else None

    generation = GenerationRequest(
        stream_id=stream_id,
        route=route.name,
        upstream_model=route.config.model,
        messages=messages,
        max_output_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_sequences=stops,
        seed=request.seed if request.HasField("seed") else None,
        tools=tools,
        tool_choice=choice,
        reasoning_effort=effort,
        reasoning_budget_tokens=budget,
        response_format=response_format,
        deadline=deadline,
    )
    # Plain text requests have nothing more a route could refuse.
    if response_format is not None or any(m.parts for m in messages):
        refusal = route.provider.capabilities.refusal(generation, route.name)
        if refusal is not None:
            raise refusal
    return generation


def _message(m: pb.Message, i: int) -> ChatMessage:
    field = f"messages[{i}]"
    # Read once: every read of a string field makes a new copy of it out of the parsed message.
    text = m.text
    role = _ROLES.get(m.role)
    if role is None:
        raise invalid_request(
            f"{field}.role", f"must be system, user, assistant or tool; got {_enum_name(pb.Role, m.role)}"
        )
    if role in (Role.SYSTEM, Role.USER) and not text and not m.parts:
        raise invalid_request(f"{field}.text", f"must not be empty in a {role.value} message")
    if role is not Role.ASSISTANT and (m.tool_calls or m.reasoning):
        raise invalid_request(field, "only assistant messages carry tool_calls and reasoning")
    if role is Role.ASSISTANT and not (text or m.parts or m.tool_calls or m.reasoning):
        raise invalid_request(field, "an assistant message needs text, tool_calls or reasoning")
    if (role is Role.TOOL) != bool(m.tool_call_id):
        raise invalid_request(f"{field}.tool_call_id", "is required in tool messages and only there")
    calls = []
    for j, call in enumerate(m.tool_calls):
        where = f"{field}.tool_calls[{j}]"
        if not call.id or not call.name:
            raise invalid_request(where, "id and name are required")
        if not isinstance(caller_json(call.arguments_json, f"{where}.arguments_json"), dict):
            raise invalid_request(f"{where}.arguments_json", "must be a JSON object")
        calls.append(ToolCall(call.id, call.name, call.arguments_json))
    parts: tuple[Part, ...] = ()
    if m.parts or m.HasField("cache_control"):
        parts = _parts(m, field, role, text)
        if m.parts:
            text = ""
    reasoning = []
    for j, r in enumerate(m.reasoning):
        if r.redacted_data and (r.text or r.signature):
            raise invalid_request(f"{field}.reasoning[{j}]", "a redacted block has no text or signature")
        reasoning.append(ReasoningBlock(r.text, r.signature, r.redacted_data))
    return ChatMessage(
        role=role,
        text=text,
        tool_calls=tuple(calls),
        tool_call_id=m.tool_call_id,
        reasoning=tuple(reasoning),
        parts=parts,
    )


def _parts(m: pb.Message, field: str, role: Role, text: str) -> tuple[Part, ...]:
    """The message's parts; a cache marker on the message goes onto its last part (its text as one)."""
    if m.parts and text:
        raise invalid_request(f"{field}.text", "must be empty when parts are given: content goes in one or the other")
    parts = [_part(p, f"{field}.parts[{j}]", role) for j, p in enumerate(m.parts)]
    if m.HasField("cache_control"):
        marker = _cache(m.cache_control, f"{field}.cache_control")
        if parts:
            last = parts[-1]
            if last.cache is not None:
                raise invalid_request(f"{field}.cache_control", "its last part has a cache marker already")
            parts[-1] = _with_cache(last, marker)
        elif text:
            parts = [Part(PartKind.TEXT, text=text, cache=marker)]
        else:
            raise invalid_request(f"{field}.cache_control", "needs a message with text or parts to mark")
    return tuple(parts)


def _with_cache(part: Part, marker: CacheMarker) -> Part:
    return Part(
        part.kind,
        part.text,
        part.media_type,
        part.data,
        part.url,
        part.file_id,
        part.title,
        part.context,
        part.citations,
        marker,
    )


def _part(p: pb.ContentPart, where: str, role: Role) -> Part:
    kind = p.WhichOneof("part")
    cache = _cache(p.cache_control, f"{where}.cache_control") if p.HasField("cache_control") else None
    if kind == "text":
        if not p.text:
            raise invalid_request(f"{where}.text", "must not be empty")
        return Part(PartKind.TEXT, text=p.text, cache=cache)
    if kind is None:
        raise invalid_request(where, "has no content: set text, image, document or audio")
    if role is not Role.USER:
        raise invalid_request(where, f"a {role.value} message takes text parts only, not {kind}")
    media: pb.ImagePart | pb.DocumentPart | pb.AudioPart = getattr(p, kind)
    where = f"{where}.{kind}"
    source = media.WhichOneof("source")
    data: bytes | None = None
    url = file_id = ""
    if source == "data":
        data = media.data
        if not data:
            raise invalid_request(f"{where}.data", "must not be empty")
        if not media.media_type:
            raise invalid_request(f"{where}.media_type", "is required with data")
    elif source == "url":
        url = media.url
        if len(url) > MAX_URL_CHARS:
            raise invalid_request(f"{where}.url", f"must be at most {MAX_URL_CHARS} characters")
        parsed = urllib.parse.urlsplit(url)
        if not parsed.scheme or not parsed.netloc:
            raise invalid_request(f"{where}.url", "must be an absolute URL, such as https://example.com/a.png")
    elif source == "file_id":
        file_id = media.file_id
        if not _FILE_ID.fullmatch(file_id):
            raise invalid_request(f"{where}.file_id", "must be 1 to 256 printable ASCII characters")
    else:
        raise invalid_request(where, "needs a source: data, url or file_id")
    media_type = media.media_type.lower()
    if media_type and not _MEDIA_TYPE.fullmatch(media_type):
        raise invalid_request(f"{where}.media_type", f"is not a media type: {media.media_type[:64]!r}")
    title = context = ""
    citations = False
    if isinstance(media, pb.DocumentPart):
        title, context, citations = media.title, media.context, media.citations
        if len(title) > MAX_TITLE_CHARS:
            raise invalid_request(f"{where}.title", f"must be at most {MAX_TITLE_CHARS} characters")
        if len(context) > MAX_CONTEXT_CHARS:
            raise invalid_request(f"{where}.context", f"must be at most {MAX_CONTEXT_CHARS} characters")
        if media_type == "text/plain" and data is not None:
            try:
                data.decode()
            except UnicodeDecodeError:
                raise invalid_request(f"{where}.data", "a text/plain document must be valid UTF-8") from None
    return Part(_MEDIA_KINDS[kind], "", media_type, data, url, file_id, title, context, citations, cache)


def _cache(cache: pb.CacheControl, where: str) -> CacheMarker:
    if not cache.HasField("ttl"):
        return CacheMarker()
    ttl = cache.ttl.ToNanoseconds() / 1e9
    if ttl < 1:
        raise invalid_request(f"{where}.ttl", "must be at least 1 s")
    return CacheMarker(ttl)


def _response_format(fmt: pb.ResponseFormat) -> ResponseFormat | None:
    kind = _FORMATS.get(fmt.type)
    if kind is None:
        raise invalid_request("response_format.type", f"unknown value {fmt.type}")
    if kind is not ResponseFormatType.JSON_SCHEMA:
        if fmt.name or fmt.description or fmt.HasField("schema") or fmt.strict:
            raise invalid_request(
                "response_format", "name, description, schema and strict go with RESPONSE_FORMAT_TYPE_JSON_SCHEMA only"
            )
        return ResponseFormat(kind)
    if not _TOOL_NAME.fullmatch(fmt.name):
        raise invalid_request("response_format.name", "must be 1 to 64 letters, digits, '_' or '-'")
    if not fmt.HasField("schema"):
        raise invalid_request("response_format.schema", "is required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA")
    # A Struct's numbers are doubles: `"maxLength": 12` comes back as 12.0, which a strict
    # provider may refuse where the meta-schema asks for an integer. In JSON they are one number.
    schema = _integral(caller_json(fmt.schema, "response_format.schema"))
    check_json_schema(schema, "response_format.schema")
    return ResponseFormat(kind, fmt.name, fmt.description, schema, fmt.strict)


def _integral(value: Any) -> Any:
    """`value` with every whole float as an int (the depth is bounded by caller_json)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def check_json_schema(schema: Any, field: str) -> None:
    """INVALID_ARGUMENT unless `schema` is a JSON Schema object (by its `$schema`, else draft 2020-12)."""
    if not isinstance(schema, dict) or not schema:
        raise invalid_request(field, "must be a non-empty JSON Schema object")
    dialect = schema.get("$schema")
    validator = _DIALECTS.get(dialect.rstrip("#") if isinstance(dialect, str) else "", jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "the top"
        raise invalid_request(field, f"is not a valid JSON Schema (at {at}): {exc.message[:200]}") from None


# The dialects a schema may name in `$schema`; any other (or none) is read as draft 2020-12.
_DIALECTS: dict[str, type[jsonschema.protocols.Validator]] = {
    str(v.META_SCHEMA["$schema"]).rstrip("#"): v
    for v in (
        jsonschema.Draft202012Validator,
        jsonschema.Draft201909Validator,
        jsonschema.Draft7Validator,
        jsonschema.Draft6Validator,
        jsonschema.Draft4Validator,
    )
}


def caller_json(source: str | struct_pb2.Struct, field: str) -> Any:
    """Caller JSON, as text or as a google.protobuf.Struct, read the way every adapter and vendor
    will read it; INVALID_ARGUMENT naming `field` otherwise.

    Every piece of caller JSON enters through here. The adapters parse with orjson and the vendors
    with standard parsers, so this is standard JSON only: no NaN or Infinity (Python's json reads
    both), no number beyond a double, no lone surrogate; and at most MAX_JSON_DEPTH deep, checked
    without recursion, so no nesting can raise RecursionError.
    """
    try:
        # JSON has no NaN or Infinity: a Struct holding one cannot be sent to any provider either.
        value = orjson.loads(source) if isinstance(source, str) else json_format.MessageToDict(source)
    except (ValueError, RecursionError):  # orjson.JSONDecodeError is a ValueError
        raise invalid_request(
            field, f"must be standard JSON (no NaN or Infinity) nested at most {MAX_JSON_DEPTH} levels deep"
        ) from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise invalid_request(field, f"must be nested at most {MAX_JSON_DEPTH} levels deep")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` deep, walked with a stack of our own."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _tools(request: pb.GenerateRequest) -> tuple[ToolSpec, ...]:
    if len(request.tools) > MAX_TOOLS:
        raise invalid_request("tools", f"at most {MAX_TOOLS} tools are allowed, got {len(request.tools)}")
    seen: set[str] = set()
    tools = []
    for i, tool in enumerate(request.tools):
        if not _TOOL_NAME.fullmatch(tool.name):
            raise invalid_request(f"tools[{i}].name", "must be 1 to 64 letters, digits, '_' or '-'")
        if tool.name in seen:
            raise invalid_request(f"tools[{i}].name", f"duplicate tool name {tool.name!r}")
        seen.add(tool.name)
        parameters = _json_schema(tool, i)
        tools.append(ToolSpec(tool.name, tool.description, parameters))
    return tuple(tools)


def _json_schema(tool: pb.Tool, i: int) -> dict[str, Any]:
    if not tool.HasField("parameters"):
        return {}
    schema: dict[str, Any] = caller_json(tool.parameters, f"tools[{i}].parameters")
    return schema


def _tool_choice(request: pb.GenerateRequest, tools: tuple[ToolSpec, ...]) -> ToolChoice:
    choice = request.tool_choice
    mode = _TOOL_CHOICES.get(choice.mode)
    if mode is None:
        raise invalid_request("tool_choice.mode", f"unknown value {choice.mode}")
    if mode is ToolChoiceMode.NAMED:
        if not any(t.name == choice.name for t in tools):
            raise invalid_request("tool_choice.name", f"names no tool of the request: {choice.name[:64]!r}")
    elif choice.name:
        raise invalid_request("tool_choice.name", "is only allowed with TOOL_CHOICE_MODE_NAMED")
    if mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.NAMED) and not tools:
        raise invalid_request("tool_choice", "requires at least one tool")
    return ToolChoice(mode, choice.name)


def _check_metadata(request: pb.GenerateRequest) -> None:
    if len(request.metadata) > MAX_METADATA_ENTRIES:
        raise invalid_request("metadata", f"at most {MAX_METADATA_ENTRIES} entries are allowed")
    for key, value in request.metadata.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise invalid_request(
                "metadata",
                f"keys must be 1 to {MAX_METADATA_KEY_CHARS} and values at most {MAX_METADATA_VALUE_CHARS} characters",
            )
