"""OpenAI Chat Completions over the gateway: its request in, its chunks (or one completion) out.

The request becomes a `tokenwire.v1.GenerateRequest` and goes through the one validation every
door uses; only the JSON's shape (types, the parts this contract has no place for) is checked
here. A part tokenwire cannot carry is INVALID_ARGUMENT naming it, never dropped.

Chunks are rendered from pre-built byte prefixes with orjson for the variable parts: this is the
hot path of the door (one per relayed message), and building model objects or dicts per chunk
would cost more than the relay itself.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf import json_format

from service.errors import invalid_request
from tokenwire.v1 import generation_pb2 as pb

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    # The newer name OpenAI gives system instructions for its reasoning models.
    "developer": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
_TOOL_CHOICES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
# OpenAI has fewer finish reasons than the contract: the contract's own is in `tokenwire`.
_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FINISH_REASON_REFUSAL: "content_filter",
}
_INT32 = 2**31 - 1
_INT64 = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ChatRequest:
    request: pb.GenerateRequest
    stream: bool
    include_usage: bool


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_request(name, "must be a number")
    return float(value)


def _content(content: Any, field: str, message: pb.Message) -> None:
    """A message's content: a string, null, or a list of parts (text, image_url, input_audio, file).

    Text alone stays `Message.text`; anything else becomes the contract's ordered parts, which
    validation then checks against the route like any gRPC request's (so a part a route cannot
    take is refused naming it, never dropped).
    """
    if content is None:
        return
    if isinstance(content, str):
        message.text = content
        return
    if not isinstance(content, list):
        raise invalid_request(field, "must be a string or a list of content parts")
    if all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part.get("text"), str):
                raise invalid_request(f"{field}[{i}].text", "must be a string")
            texts.append(part["text"])
        message.text = "".join(texts)
        return
    for i, part in enumerate(content):
        message.parts.append(_part(part, f"{field}[{i}]"))


def _part(part: Any, field: str) -> pb.ContentPart:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid_request(f"{field}.text", "must be a string")
        return pb.ContentPart(text=part["text"])
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if not isinstance(url, str):
            raise invalid_request(f"{field}.image_url.url", "must be a string: an https URL or a data: URL")
        media_type, data = _data_url(url, f"{field}.image_url.url")
        if data is None:
            return pb.ContentPart(image=pb.ImagePart(url=url))
        return pb.ContentPart(image=pb.ImagePart(media_type=media_type, data=data))
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise invalid_request(f"{field}.input_audio", "must be {data: base64, format: wav | mp3}")
        audio_type = _AUDIO_FORMATS.get(str(audio.get("format")))
        if audio_type is None:
            raise invalid_request(f"{field}.input_audio.format", "must be wav or mp3")
        return pb.ContentPart(audio=pb.AudioPart(media_type=audio_type, data=_base64(audio["data"], field)))
    if kind == "file":
        file = part.get("file")
        if not isinstance(file, dict):
            raise invalid_request(f"{field}.file", "must be {file_data | file_id, filename}")
        title = file.get("filename", "")
        if not isinstance(title, str):
            raise invalid_request(f"{field}.file.filename", "must be a string")
        if isinstance(file.get("file_id"), str):
            return pb.ContentPart(document=pb.DocumentPart(file_id=file["file_id"], title=title))
        data_url = file.get("file_data")
        if not isinstance(data_url, str):
            raise invalid_request(f"{field}.file", "needs file_data (a data: URL) or file_id")
        media_type, data = _data_url(data_url, f"{field}.file.file_data")
        if data is None:
            raise invalid_request(f"{field}.file.file_data", "must be a data: URL")
        return pb.ContentPart(document=pb.DocumentPart(media_type=media_type, data=data, title=title))
    raise invalid_request(field, f"is not a content part this door knows: {str(kind)[:32]!r}")


_AUDIO_FORMATS = {"wav": "audio/wav", "mp3": "audio/mpeg"}


def _data_url(url: str, field: str) -> tuple[str, bytes | None]:
    """(media type, bytes) of a base64 data: URL; ("", None) for any other URL."""
    if not url.startswith("data:"):
        return "", None
    head, comma, payload = url[5:].partition(",")
    media_type, _, encoding = head.partition(";")
    if not comma or encoding != "base64" or not media_type:
        raise invalid_request(field, "a data: URL must be data:<media type>;base64,<data>")
    return media_type, _base64(payload, field)


def _base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request(field, "is not valid base64") from None


def _response_format(fmt: Any, request: pb.GenerateRequest) -> None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        request.response_format.type = pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT
        return
    if kind != "json_schema":
        raise invalid_request("response_format", 'must be {"type": "text" | "json_object" | "json_schema", ...}')
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema"), dict):
        raise invalid_request("response_format.json_schema", "must be {name, schema, strict?, description?}")
    out = request.response_format
    out.type = pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    out.name = spec["name"]
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise invalid_request("response_format.json_schema.description", "must be a string")
    out.description = description
    strict = spec.get("strict", False)
    if not isinstance(strict, bool):
        raise invalid_request("response_format.json_schema.strict", "must be true or false")
    out.strict = strict
    try:
        json_format.ParseDict(spec["schema"], out.schema)
    except (json_format.ParseError, RecursionError, ValueError):
        raise invalid_request("response_format.json_schema.schema", "cannot be carried (nested too deep?)") from None


def _message(m: Any, i: int) -> pb.Message:
    field = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid_request(field, "must be an object")
    role = _ROLES.get(m.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise invalid_request(f"{field}.role", "must be system, developer, user, assistant or tool")
    message = pb.Message(role=role)
    _content(m.get("content"), f"{field}.content", message)
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise invalid_request(f"{field}.tool_calls", "must be a list")
        for j, call in enumerate(calls):
            where = f"{field}.tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise invalid_request(where, "must be {id, type: function, function: {name, arguments}}")
            ident, name, arguments = call.get("id"), function.get("name"), function.get("arguments", "{}")
            if not isinstance(ident, str) or not isinstance(name, str) or not isinstance(arguments, str):
                raise invalid_request(where, "id, function.name and function.arguments must be strings")
            message.tool_calls.append(pb.ToolCall(id=ident, name=name, arguments_json=arguments))
    tool_call_id = m.get("tool_call_id")
    if tool_call_id is not None:
        if not isinstance(tool_call_id, str):
            raise invalid_request(f"{field}.tool_call_id", "must be a string")
        message.tool_call_id = tool_call_id
    return message


def _tools(body: dict[str, Any], request: pb.GenerateRequest) -> None:
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise invalid_request("tools", "must be a list")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid_request(f"tools[{i}]", 'must be {"type": "function", "function": {"name", ...}}')
        description = function.get("description", "")
        if not isinstance(description, str):
            raise invalid_request(f"tools[{i}].function.description", "must be a string")
        spec = pb.Tool(name=function["name"], description=description)
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise invalid_request(f"tools[{i}].function.parameters", "must be a JSON Schema object")
            try:
                json_format.ParseDict(parameters, spec.parameters)
            except (json_format.ParseError, RecursionError, ValueError):
                # Too deep for protobuf's Struct, or a value it cannot hold.
                raise invalid_request(
                    f"tools[{i}].function.parameters", "cannot be carried (nested too deep?)"
                ) from None
        request.tools.append(spec)
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        request.tool_choice.mode = _TOOL_CHOICES[choice]
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        request.tool_choice.mode = pb.TOOL_CHOICE_MODE_NAMED
        request.tool_choice.name = choice["function"]["name"]
    else:
        raise invalid_request("tool_choice", 'must be "auto", "none", "required" or {"type": "function", ...}')


def chat_request(body: Any, request_id: str) -> ChatRequest:
    """The GenerateRequest an OpenAI chat completion request asks for; INVALID_ARGUMENT otherwise."""
    if not isinstance(body, dict):
        raise invalid_request("body", "must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model", "is required: name a route (see GET /v1/models)")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid_request("messages", "must be a list of messages")
    request = pb.GenerateRequest(model=model, request_id=request_id)
    request.messages.extend(_message(m, i) for i, m in enumerate(messages))
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid_request("n", "only 1 choice per request is supported")
    fmt = body.get("response_format")
    if fmt is not None:
        _response_format(fmt, request)
    if body.get("logprobs"):
        raise invalid_request("logprobs", "is not supported")
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or not -_INT32 <= value <= _INT32:
            raise invalid_request(name, "must be an integer")
        request.max_output_tokens = value
        break
    temperature = _number(body, "temperature")
    if temperature is not None:
        request.temperature = temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        request.top_p = top_p
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed) or not -_INT64 <= seed <= _INT64:
            raise invalid_request("seed", "must be a 64-bit integer")
        request.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        request.stop_sequences.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        request.stop_sequences.extend(stop)
    elif stop is not None:
        raise invalid_request("stop", "must be a string or a list of strings")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise invalid_request("metadata", "must be an object of strings")
        request.metadata.update(metadata)
    _tools(body, request)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid_request("stream", "must be true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_request("stream_options", "must be an object")
        include_usage = options.get("include_usage") is True
    return ChatRequest(request, stream, include_usage)


def usage_json(usage: pb.Usage) -> dict[str, Any]:
    prompt = usage.input_tokens
    completion = usage.output_tokens
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if usage.HasField("cache_read_input_tokens"):
        out["prompt_tokens_details"] = {"cached_tokens": usage.cache_read_input_tokens}
    if usage.HasField("reasoning_tokens"):
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    # Whether the provider counted them or tokenwire estimated them (the contract never says 0
    # for unknown).
    out["tokenwire_source"] = "provider" if usage.source == pb.USAGE_SOURCE_PROVIDER else "estimated"
    return out


def _finish_extension(finish: pb.Finish) -> dict[str, Any]:
    extension: dict[str, Any] = {
        "finish_reason": pb.FinishReason.Name(finish.reason).removeprefix("FINISH_REASON_").lower(),
        "raw_finish_reason": finish.raw_reason,
    }
    if finish.stop_sequence:
        extension["stop_sequence"] = finish.stop_sequence
    timing = finish.timing
    if timing.HasField("time_to_first_token"):
        extension["time_to_first_token_ms"] = timing.time_to_first_token.ToNanoseconds() / 1e6
    if timing.HasField("output_tokens_per_second"):
        extension["output_tokens_per_second"] = timing.output_tokens_per_second
    return extension


class ChunkRenderer:
    """Renders one stream's contract messages as `chat.completion.chunk` SSE events."""

    __slots__ = ("_after", "_before", "_include_usage", "_prefix")

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        head = orjson.dumps(
            {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        )
        # `data: {"id":…,"model":…,"choices":[{"index":0,"delta":` … `,"finish_reason":null}]}`
        self._prefix = head[:-1]
        self._before = b"data: " + self._prefix + b',"choices":[{"index":0,"delta":'
        self._after = b',"logprobs":null,"finish_reason":null}]}\n\n'
        self._include_usage = include_usage

    def start(self) -> bytes:
        return self._before + b'{"role":"assistant","content":""}' + self._after

    def text(self, text: str) -> bytes:
        return self._before + b'{"content":' + orjson.dumps(text) + b"}" + self._after

    def reasoning(self, text: str) -> bytes:
        # The field OpenAI-compatible servers (vLLM, DeepSeek) use for a reasoning delta.
        return self._before + b'{"reasoning_content":' + orjson.dumps(text) + b"}" + self._after

    def tool_call(self, delta: pb.ToolCallDelta) -> bytes:
        call: dict[str, Any] = {"index": delta.index}
        function: dict[str, str] = {"arguments": delta.arguments_delta}
        if delta.id:
            call["id"] = delta.id
            call["type"] = "function"
        if delta.name:
            function["name"] = delta.name
        call["function"] = function
        return self._before + orjson.dumps({"tool_calls": [call]}) + self._after

    def finish(self, finish: pb.Finish) -> bytes:
        reason = _FINISH_REASONS.get(finish.reason, "stop")
        chunk = (
            self._before
            + b"{}"
            + b',"logprobs":null,"finish_reason":'
            + orjson.dumps(reason)
            + b"}],"
            + b'"tokenwire":'
            + orjson.dumps(_finish_extension(finish))
            + b"}\n\n"
        )
        if self._include_usage:
            # The usage chunk: the last before [DONE], with no choices (as OpenAI sends it).
            chunk += (
                b"data: " + self._prefix + b',"choices":[],"usage":' + orjson.dumps(usage_json(finish.usage)) + b"}\n\n"
            )
        return chunk + b"data: [DONE]\n\n"

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        # An error event and no [DONE]: an SDK raises it, and nobody mistakes the stream for a success.
        return b"data: " + orjson.dumps(body) + b"\n\n"


class Completion:
    """The non-streaming answer: the stream's messages folded into one `chat.completion`."""

    def __init__(self, completion_id: str, model: str) -> None:
        self.completion_id = completion_id
        self.model = model
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, message: pb.GenerateResponse) -> None:
        event = message.WhichOneof("event")
        if event == "text_delta":
            self.text.append(message.text_delta.text)
        elif event == "reasoning_delta":
            self.reasoning.append(message.reasoning_delta.text)
        elif event == "tool_call_delta":
            delta = message.tool_call_delta
            call = self.calls.setdefault(
                delta.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = call["id"] or delta.id
            call["function"]["name"] = call["function"]["name"] or delta.name
            call["function"]["arguments"] += delta.arguments_delta

    def body(self, finish: pb.Finish) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) if self.text else None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _FINISH_REASONS.get(finish.reason, "stop"),
                }
            ],
            "usage": usage_json(finish.usage),
            "tokenwire": _finish_extension(finish),
        }


def model_list(models: list[pb.Model]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": m.provider,
                "tokenwire": {
                    "upstream_model": m.upstream_model,
                    "description": m.description,
                    "supports_tools": m.supports_tools,
                    "supports_reasoning": m.supports_reasoning,
                    "fallbacks": list(m.fallbacks),
                },
            }
            for m in models
        ],
    }
