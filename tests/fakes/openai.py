"""A fake OpenAI (and Azure OpenAI) Chat Completions endpoint speaking the exact streaming wire format."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

import orjson

from .kit import Kit
from .replies import Reply, StreamReply, Usage
from .server import FakeServer, Frame, RenderedStream, RequestContext, random_id

DEFAULT_API_KEY = "test-openai-key-0001"
FALLBACK_MODEL = "gpt-4o-mini"
_AZURE_ROUTE = re.compile(r"^/openai/deployments/([^/]+)/chat/completions$")
# (type, code) that api.openai.com sends for a status.
_NATURAL: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}


def natural_error(status: int) -> tuple[str, str | None]:
    if status in _NATURAL:
        return _NATURAL[status]
    return ("server_error", None) if status >= 500 else ("invalid_request_error", None)


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens or 0},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens or 0},
    }


def finish_reason(reply: StreamReply) -> str:
    if reply.finish is not None:
        return reply.finish
    return "tool_calls" if reply.tool_calls else "stop"


class FakeOpenAI(FakeServer):
    """`POST /v1/chat/completions` and Azure's `POST /openai/deployments/{deployment}/chat/completions`.

    Point `openai.AsyncOpenAI(base_url=fake.base_url)` or
    `openai.AsyncAzureOpenAI(azure_endpoint=fake.azure_endpoint, api_version=...)` at it.
    """

    request_id_header = "x-request-id"

    def __init__(self, api_key: str = DEFAULT_API_KEY, *, default: Reply | None = None) -> None:
        super().__init__(api_key, default=default)

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    @property
    def azure_endpoint(self) -> str:
        return self.origin

    def _route(self, method: str, path: str) -> dict[str, str] | None:
        if method != "POST":
            return None
        if path == "/v1/chat/completions":
            return {}
        match = _AZURE_ROUTE.match(path)
        return {"deployment": match.group(1)} if match else None

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip() == self.api_key:
            return True
        return headers.get("api-key") == self.api_key

    def _new_request_id(self) -> str:
        return f"req_{secrets.token_hex(16)}"

    def _unauthorized_message(self) -> str:
        return "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."

    def _not_found_message(self, method: str, path: str) -> str:
        return f"Invalid URL ({method} {path})"

    def _error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        natural_type, code = natural_error(status)
        error = {"message": message, "type": error_type or natural_type, "param": None, "code": code}
        return orjson.dumps({"error": error})

    def _model(self, reply: StreamReply, ctx: RequestContext) -> str:
        if reply.model:
            return reply.model
        model = ctx.body.get("model")
        if isinstance(model, str) and model:
            return model
        return ctx.params.get("deployment") or FALLBACK_MODEL

    def _rejection(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        """The content part and response_format shapes Chat Completions refuses with a 400."""
        for i, message in enumerate(body.get("messages") or ()):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                problem = _part_problem(part, message.get("role"))
                if problem:
                    return f"Invalid '{where}': {problem}"
        fmt = body.get("response_format")
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_schema":
                schema = fmt.get("json_schema")
                if not isinstance(schema, dict) or not schema.get("name") or not isinstance(schema.get("schema"), dict):
                    return "Invalid 'response_format.json_schema': name and schema are required"
            elif kind not in ("text", "json_object"):
                return f"Invalid 'response_format.type': {kind!r}"
        return None

    def _render_stream(self, reply: StreamReply, ctx: RequestContext) -> RenderedStream:
        options = ctx.body.get("stream_options")
        include_usage = reply.usage is not None and isinstance(options, dict) and options.get("include_usage") is True
        base: dict[str, Any] = {
            "id": f"chatcmpl-{random_id(29)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._model(reply, ctx),
            "system_fingerprint": f"fp_{secrets.token_hex(5)}",
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            obj = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        frames = [Frame(chunk({"role": "assistant", "content": "", "refusal": None}))]
        frames += [Frame(chunk({"reasoning_content": piece}), delta=True) for piece in reply.reasoning]
        frames += [Frame(chunk({"content": piece}), delta=True) for piece in reply.text]
        for i, call in enumerate(reply.tool_calls):
            start = {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            frames.append(Frame(chunk({"tool_calls": [start]})))
            frames += [
                Frame(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}), delta=True)
                for piece in call.arguments
            ]
        frames.append(Frame(chunk({}, finish_reason(reply)), finish=True))
        if include_usage and reply.usage is not None:
            usage_chunk = {**base, "choices": [], "usage": usage_object(reply.usage)}
            frames.append(Frame(b"data: " + orjson.dumps(usage_chunk) + b"\n\n", finish=True))
        frames.append(Frame(b"data: [DONE]\n\n", finish=True))
        error = {"error": {"message": reply.error_message, "type": reply.error_type or "server_error", "code": None}}
        return RenderedStream(
            frames=frames,
            error_frame=b"data: " + orjson.dumps(error) + b"\n\n",
            malformed_frame=b'data: {"choices": [\n\n',
        )

    def _render_message(self, reply: StreamReply, ctx: RequestContext) -> bytes:
        text = "".join(reply.text)
        message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
        if reply.reasoning:
            message["reasoning_content"] = "".join(reply.reasoning)
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": "".join(c.arguments)}}
                for c in reply.tool_calls
            ]
        obj: dict[str, Any] = {
            "id": f"chatcmpl-{random_id(29)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model(reply, ctx),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(reply)}],
            "system_fingerprint": f"fp_{secrets.token_hex(5)}",
        }
        if reply.usage is not None:
            obj["usage"] = usage_object(reply.usage)
        return orjson.dumps(obj)


def _part_problem(part: Any, role: Any) -> str | None:
    if not isinstance(part, dict):
        return "a content part must be an object"
    kind = part.get("type")
    breakpoint_ = part.get("prompt_cache_breakpoint")
    if breakpoint_ is not None and (breakpoint_.get("mode") != "explicit" or breakpoint_.get("ttl", "30m") != "30m"):
        return f"unexpected prompt_cache_breakpoint {breakpoint_!r}"
    if role != "user" and kind != "text":
        return f"a {role} message takes text parts only"
    if kind == "text":
        return None if isinstance(part.get("text"), str) else "text is required"
    if kind == "image_url":
        url = str((part.get("image_url") or {}).get("url", ""))
        if re.match(r"^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=]+$", url) or url.startswith("https://"):
            return None
        return "image_url.url must be an https URL or a base64 data URL of an image"
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        if audio.get("format") not in ("wav", "mp3") or not audio.get("data"):
            return "input_audio takes base64 data and a format of wav or mp3"
        return None
    if kind == "file":
        file = part.get("file") or {}
        if "file_id" in file:
            return None
        if not str(file.get("file_data", "")).startswith("data:application/pdf;base64,") or not file.get("filename"):
            return "file takes a file_id, or file_data (a base64 data URL of a PDF) with a filename"
        return None
    return f"unknown content part type {kind!r}"


def _kit() -> Kit:
    env = "TOKENWIRE_CONFORMANCE_OPENAI_KEY"
    return Kit(
        name="openai",
        provider="openai",
        model="gpt-test",
        fake=FakeOpenAI,
        options=lambda base_url: {"base_url": base_url, "api_key_env": env},
        env=lambda fake: {env: fake.api_key},
        bad_env=lambda fake: {env: "wrong-openai-key-LEAKCANARY-1"},
        secrets=lambda fake: [fake.api_key, "LEAKCANARY"],
        finish_reasons={
            "stop": "STOP",
            "length": "LENGTH",
            "tool_calls": "TOOL_CALLS",
            "content_filter": "CONTENT_FILTER",
            "function_call": "OTHER",
        },
        text_finish="stop",
        reasoning=True,
    )


KIT = _kit()
