"""A fake exported flow of a flow builder, in the shape of seed 003 (Stack AI's
`stream_exported_flow`): `POST /stream_exported_flow?flow_id=...&org=...`, a bearer key, a JSON body
of inputs (`{"in-0": ..., "user_id": ...}`), and server-sent events of JSON: each delta
`data: {"outputs": {"out-0": "<text>"}}`, the end `data: {"done": true, "finish_reason": ...,
"usage": {...}}`, and a failure `data: {"error": {"type": ..., "message": ...}}` (the flow's error
message, which the seed's client checks as `data.error`). Served to the `sse-endpoint` provider."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from .kit import Kit
from .replies import Reply, StreamReply
from .server import FakeServer, Frame, RenderedStream, RequestContext, random_id

DEFAULT_API_KEY = "stack-public-key-0001"
FLOW_ID = "65f1c0ffee"
ORG = "org-fake"
PATH = "/stream_exported_flow"


def data(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class FakeFlow(FakeServer):
    """Point an `sse-endpoint` route's `url` at `fake.flow_url`."""

    request_id_header = "x-request-id"

    def __init__(self, api_key: str = DEFAULT_API_KEY, *, default: Reply | None = None) -> None:
        super().__init__(api_key, default=default)

    @property
    def base_url(self) -> str:
        return self.origin

    @property
    def flow_url(self) -> str:
        return flow_url(self.origin)

    def _route(self, method: str, path: str) -> dict[str, str] | None:
        return {} if method == "POST" and path == PATH else None

    def _streams(self, params: Mapping[str, str], body: dict[str, Any]) -> bool:
        return True

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme == "Bearer" and token == self.api_key

    def _new_request_id(self) -> str:
        return random_id(20)

    def _unauthorized_message(self) -> str:
        return "Invalid API key"

    def _not_found_message(self, method: str, path: str) -> str:
        return "Flow not found"

    def _error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        kind = error_type or ("server_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps({"error": {"type": kind, "message": message}})

    def _rejection(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        if not isinstance(body.get("in-0"), str) or not body["in-0"]:
            return "input in-0 is required"
        return None

    def _render_stream(self, reply: StreamReply, ctx: RequestContext) -> RenderedStream:
        frames = [Frame(data({"outputs": {"out-0": piece}}), True) for piece in reply.text]
        end: dict[str, Any] = {"done": True, "finish_reason": reply.finish or "stop"}
        if reply.usage is not None:
            u = reply.usage
            usage: dict[str, Any] = {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens}
            if u.cache_read_tokens is not None:
                usage["cached_tokens"] = u.cache_read_tokens
            end["usage"] = usage
        frames.append(Frame(data(end), finish=True))
        error = {"type": reply.error_type or "server_error", "message": reply.error_message}
        return RenderedStream(
            frames=frames, error_frame=data({"error": error}), malformed_frame=b'data: {"outputs": {"out-0\n\n'
        )

    def _render_message(self, reply: StreamReply, ctx: RequestContext) -> bytes:
        raise AssertionError("the flow endpoint only streams")


def flow_url(origin: str) -> str:
    return f"{origin}{PATH}?flow_id={FLOW_ID}&org={ORG}"


KEY_ENV = "TOKENWIRE_CONFORMANCE_FLOW_KEY"
# The route of README's example, on the fake.
OPTIONS: dict[str, Any] = {
    "api_key_env": KEY_ENV,
    "body": {"in-0": "{prompt}", "user_id": "tokenwire"},
    "text_pointer": "/outputs/out-0",
    "error_pointer": "/error",
    "end_pointer": "/done",
    "finish_reason_pointer": "/finish_reason",
    "input_tokens_pointer": "/usage/input_tokens",
    "output_tokens_pointer": "/usage/output_tokens",
    "cached_tokens_pointer": "/usage/cached_tokens",
}

KIT = Kit(
    name="sse-endpoint",
    provider="sse-endpoint",
    model="my-flow",
    fake=FakeFlow,
    options=lambda base_url: OPTIONS | {"url": flow_url(base_url)},
    env=lambda fake: {KEY_ENV: fake.api_key},
    bad_env=lambda fake: {KEY_ENV: "LEAKCANARY-wrong-flow-key"},
    secrets=lambda fake: [fake.api_key, "LEAKCANARY"],
    finish_reasons={
        "stop": "STOP",
        "end": "STOP",
        "complete": "STOP",
        "length": "LENGTH",
        "max_tokens": "LENGTH",
        "content_filter": "CONTENT_FILTER",
        "safety": "CONTENT_FILTER",
        "refusal": "REFUSAL",
    },
    text_finish="stop",
    tools=False,
)
