"""A fake Anthropic Messages endpoint speaking the exact streaming wire format."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from .kit import Kit
from .replies import Reply, StreamReply, Usage
from .server import FakeServer, Frame, RenderedStream, RequestContext, random_id

DEFAULT_API_KEY = "test-anthropic-key-0001"
FALLBACK_MODEL = "claude-sonnet-4-5"
# A content_block_delta frame whose data is cut off: not valid JSON.
MALFORMED = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {\n\n'
_NATURAL: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def natural_error(status: int) -> str:
    if status in _NATURAL:
        return _NATURAL[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def stop_reason(reply: StreamReply) -> str:
    if reply.finish is not None:
        return reply.finish
    return "tool_use" if reply.tool_calls else "end_turn"


def event(name: bytes, obj: Any) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def start_usage(usage: Usage | None) -> dict[str, Any]:
    """The usage in message_start: output_tokens is 1 there, as Anthropic sends it."""
    if usage is None:
        return {}
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens or 0,
        "cache_read_input_tokens": usage.cache_read_tokens or 0,
        "output_tokens": 1,
    }


def final_usage(usage: Usage) -> dict[str, Any]:
    """Cumulative totals, as message_delta and a non-streaming message carry them."""
    totals: dict[str, Any] = {
        "output_tokens": usage.output_tokens,
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens or 0,
        "cache_read_input_tokens": usage.cache_read_tokens or 0,
    }
    if usage.reasoning_tokens is not None:
        totals["output_tokens_details"] = {"thinking_tokens": usage.reasoning_tokens}
    return totals


def tool_input(arguments: str) -> Any:
    try:
        return orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError:
        return {}


class FakeAnthropic(FakeServer):
    """`POST /v1/messages`. Point `anthropic.AsyncAnthropic(base_url=fake.base_url)` at it."""

    request_id_header = "request-id"

    def __init__(self, api_key: str = DEFAULT_API_KEY, *, default: Reply | None = None) -> None:
        super().__init__(api_key, default=default)

    @property
    def base_url(self) -> str:
        return self.origin

    def _route(self, method: str, path: str) -> dict[str, str] | None:
        return {} if method == "POST" and path == "/v1/messages" else None

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        if headers.get("x-api-key") == self.api_key:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() == self.api_key

    def _new_request_id(self) -> str:
        return f"req_{random_id(24)}"

    def _unauthorized_message(self) -> str:
        return "invalid x-api-key"

    def _not_found_message(self, method: str, path: str) -> str:
        return "Not Found"

    def _error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        error = {"type": error_type or natural_error(status), "message": message}
        return orjson.dumps({"type": "error", "error": error, "request_id": request_id})

    def _model(self, reply: StreamReply, ctx: RequestContext) -> str:
        if reply.model:
            return reply.model
        model = ctx.body.get("model")
        return model if isinstance(model, str) and model else FALLBACK_MODEL

    def _rejection(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        """The content shapes the Messages API refuses with a 400, as its documentation states them."""
        markers = 0
        system = body.get("system")
        blocks: list[Any] = list(system) if isinstance(system, list) else []
        for message in body.get("messages") or ():
            content = message.get("content")
            if isinstance(content, list):
                blocks += content
                blocks += [
                    b for c in content if isinstance(c, dict) for b in (c.get("content") or ()) if isinstance(b, dict)
                ]
        for b in blocks:
            if not isinstance(b, dict):
                return "content blocks must be objects"
            control = b.get("cache_control")
            if control is not None:
                markers += 1
                if (
                    control.get("type") != "ephemeral"
                    or control.get("ttl", "5m") not in ("5m", "1h")
                    or len(control) > 2
                ):
                    return f"cache_control: unexpected value {control!r}"
            kind = b.get("type")
            if kind in ("image", "document"):
                problem = _source_problem(kind, b.get("source"), headers)
                if problem:
                    return problem
            elif kind not in ("text", "thinking", "redacted_thinking", "tool_use", "tool_result"):
                return f"unknown content block type {kind!r}"
        if markers > 4:
            return "A maximum of 4 blocks with cache_control may be provided."
        fmt = (body.get("output_config") or {}).get("format")
        if fmt is not None and (fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict)):
            return f"output_config.format: unexpected value {fmt!r}"
        return None

    def _render_stream(self, reply: StreamReply, ctx: RequestContext) -> RenderedStream:
        message: dict[str, Any] = {
            "id": f"msg_{random_id(24)}",
            "type": "message",
            "role": "assistant",
            "model": self._model(reply, ctx),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage(reply.usage),
        }
        frames = [
            Frame(event(b"message_start", {"type": "message_start", "message": message})),
            Frame(event(b"ping", {"type": "ping"})),
        ]
        index = 0

        def block(start: dict[str, Any], deltas: list[dict[str, Any]], closing: list[dict[str, Any]]) -> None:
            nonlocal index
            opening = {"type": "content_block_start", "index": index, "content_block": start}
            frames.append(Frame(event(b"content_block_start", opening)))
            for delta in deltas:
                obj = {"type": "content_block_delta", "index": index, "delta": delta}
                frames.append(Frame(event(b"content_block_delta", obj), delta=True))
            for delta in closing:
                obj = {"type": "content_block_delta", "index": index, "delta": delta}
                frames.append(Frame(event(b"content_block_delta", obj)))
            frames.append(Frame(event(b"content_block_stop", {"type": "content_block_stop", "index": index})))
            index += 1

        for data in reply.redacted:
            block({"type": "redacted_thinking", "data": data}, [], [])
        if reply.reasoning:
            block(
                {"type": "thinking", "thinking": "", "signature": ""},
                [{"type": "thinking_delta", "thinking": piece} for piece in reply.reasoning],
                [{"type": "signature_delta", "signature": reply.signature}],
            )
        if reply.text:
            citations = [{"type": "citations_delta", "citation": dict(c)} for c in reply.citations]
            block(
                {"type": "text", "text": "", **({"citations": []} if citations else {})},
                [{"type": "text_delta", "text": piece} for piece in reply.text],
                citations,
            )
        for call in reply.tool_calls:
            block(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
                [{"type": "input_json_delta", "partial_json": piece} for piece in call.arguments],
                [],
            )
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(reply), "stop_sequence": reply.stop_sequence},
        }
        if reply.usage is not None:
            delta["usage"] = final_usage(reply.usage)
        frames.append(Frame(event(b"message_delta", delta), finish=True))
        frames.append(Frame(event(b"message_stop", {"type": "message_stop"}), finish=True))
        error_type = reply.error_type or "overloaded_error"
        error = {"type": "error", "error": {"type": error_type, "message": reply.error_message}}
        return RenderedStream(
            frames=frames,
            error_frame=event(b"error", error),
            malformed_frame=MALFORMED,
        )

    def _render_message(self, reply: StreamReply, ctx: RequestContext) -> bytes:
        content: list[dict[str, Any]] = []
        if reply.reasoning:
            content.append({"type": "thinking", "thinking": "".join(reply.reasoning), "signature": reply.signature})
        if reply.text:
            content.append({"type": "text", "text": "".join(reply.text)})
        content += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input("".join(c.arguments))}
            for c in reply.tool_calls
        ]
        usage = start_usage(None)
        if reply.usage is not None:
            usage = {**start_usage(reply.usage), **final_usage(reply.usage)}
        return orjson.dumps(
            {
                "id": f"msg_{random_id(24)}",
                "type": "message",
                "role": "assistant",
                "model": self._model(reply, ctx),
                "content": content,
                "stop_reason": stop_reason(reply),
                "stop_sequence": reply.stop_sequence,
                "usage": usage,
            }
        )


_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def _source_problem(kind: str, source: Any, headers: Mapping[str, str]) -> str | None:
    if not isinstance(source, dict):
        return f"{kind}.source: Field required"
    stype = source.get("type")
    if stype == "base64":
        allowed = _IMAGE_TYPES if kind == "image" else ("application/pdf",)
        if source.get("media_type") not in allowed:
            return f"{kind}.source.media_type: Input should be one of {allowed}"
        try:
            base64.b64decode(source.get("data", ""), validate=True)
        except (binascii.Error, ValueError):
            return f"{kind}.source.data: invalid base64 data"
    elif stype == "url":
        if not str(source.get("url", "")).startswith("https://"):
            return f"{kind}.source.url: only https URLs are supported"
    elif stype == "file":
        if "files-api-2025-04-14" not in headers.get("anthropic-beta", ""):
            return f"{kind}.source: file sources need the files-api beta"
    elif stype == "text" and kind == "document":
        if source.get("media_type") != "text/plain" or not isinstance(source.get("data"), str):
            return "document.source: a text source takes media_type text/plain and string data"
    else:
        return f"{kind}.source.type: unexpected value {stype!r}"
    return None


def _kit() -> Kit:
    env = "TOKENWIRE_CONFORMANCE_ANTHROPIC_KEY"
    return Kit(
        name="anthropic",
        provider="anthropic",
        model="claude-test",
        fake=FakeAnthropic,
        options=lambda base_url: {"base_url": base_url, "api_key_env": env},
        env=lambda fake: {env: fake.api_key},
        bad_env=lambda fake: {env: "wrong-anthropic-key-LEAKCANARY-1"},
        secrets=lambda fake: [fake.api_key, "LEAKCANARY"],
        finish_reasons={
            "end_turn": "STOP",
            "max_tokens": "LENGTH",
            "model_context_window_exceeded": "LENGTH",
            "stop_sequence": "STOP_SEQUENCE",
            "tool_use": "TOOL_CALLS",
            "refusal": "REFUSAL",
            "pause_turn": "OTHER",
        },
        text_finish="end_turn",
        reasoning=True,
    )


KIT = _kit()
