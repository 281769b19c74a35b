"""A fake Gemini Developer API: `POST /v1beta/models/{model}:streamGenerateContent?alt=sse` with the
key in `x-goog-api-key`, answered as Gemini writes it: `data: ` lines of camelCase
GenerateContentResponse JSON separated by CRLF CRLF, usage metadata cumulative on every chunk with
zero counts left out, the finish reason on the last chunk, function calls whole (one part each),
thoughts as parts with `"thought": true` and the signature on the next part; errors as
`{"error": {"code", "message", "status"}}`, in the body of an error status or as a chunk of the
stream; a wrong key is a 400 INVALID_ARGUMENT whose details say API_KEY_INVALID (Gemini sends no 401)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from .kit import Kit
from .replies import Reply, StreamReply
from .server import FakeServer, Frame, Plan, RenderedStream, RequestContext, random_id

DEFAULT_API_KEY = "AIzaFakeGeminiKey0000000000000000000001"
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_PATH = re.compile(r"^/v1beta/models/(?P<model>[^/:]+):streamGenerateContent$")
_PART_KEYS = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "thought", "thoughtSignature"}
_KEY_INVALID = "API key not valid. Please pass a valid API key."


def chunk(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


class FakeGemini(FakeServer):
    """Point a `gemini` route's `base_url` at `fake.base_url`."""

    request_id_header = "x-fake-request-id"

    def __init__(self, api_key: str = DEFAULT_API_KEY, *, default: Reply | None = None) -> None:
        super().__init__(api_key, default=default)

    @property
    def base_url(self) -> str:
        return self.origin

    def _route(self, method: str, path: str) -> dict[str, str] | None:
        match = _PATH.match(path)
        return {"model": match["model"]} if method == "POST" and match else None

    def _streams(self, params: Mapping[str, str], body: dict[str, Any]) -> bool:
        return True

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        return headers.get("x-goog-api-key") == self.api_key

    def _new_request_id(self) -> str:
        return random_id(22)

    def _unauthorized_message(self) -> str:
        return _KEY_INVALID

    def _not_found_message(self, method: str, path: str) -> str:
        return "models/x is not found for API version v1beta, or is not supported for generateContent."

    def _error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        error: dict[str, Any] = {"code": status, "message": message, "status": error_type or _STATUS.get(status)}
        if message == _KEY_INVALID:
            error["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ]
        if error["status"] is None:
            error["status"] = "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"
        return orjson.dumps({"error": error})

    def _error_plan(self, status: int, error_type: str, message: str, keep_alive: bool, **kw: Any) -> Plan:
        if status == 401:
            # Gemini answers a bad key with 400 INVALID_ARGUMENT, its details saying API_KEY_INVALID.
            status, error_type, message = 400, "INVALID_ARGUMENT", _KEY_INVALID
        return super()._error_plan(status, error_type, message, keep_alive, **kw)

    def _rejection(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        if "model" in body or "stream" in body:
            return 'Invalid JSON payload received. Unknown name "model": Cannot find field.'
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        for content in contents:
            if content.get("role") not in ("user", "model"):
                return "Please use a valid role: user, model."
            for part in content.get("parts") or ():
                if not set(part) <= _PART_KEYS:
                    return f"Invalid JSON payload received. Unknown name {sorted(set(part) - _PART_KEYS)[0]!r}"
        return None

    def _render_stream(self, reply: StreamReply, ctx: RequestContext) -> RenderedStream:
        model = reply.model or f"{ctx.params.get('model', 'gemini')}-001"
        response_id = ctx.request_id
        u = reply.usage
        produced = 0

        def metadata(final: bool) -> dict[str, Any]:
            if u is None:
                return {}
            thoughts = u.reasoning_tokens or 0
            candidates = u.output_tokens - thoughts if final else min(produced, max(u.output_tokens - thoughts, 0))
            counts = {
                "promptTokenCount": u.input_tokens,
                "candidatesTokenCount": candidates,
                "cachedContentTokenCount": u.cache_read_tokens or 0,
                "thoughtsTokenCount": thoughts if final else 0,
                "totalTokenCount": u.input_tokens + candidates + (thoughts if final else 0),
            }
            # Gemini leaves zero counts out.
            return {"usageMetadata": {k: v for k, v in counts.items() if v}}

        def frame(parts: list[dict[str, Any]], finish: str | None = None) -> bytes:
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if finish is not None:
                candidate["finishReason"] = finish
            return chunk(
                {
                    "candidates": [candidate],
                    **metadata(finish is not None),
                    "modelVersion": model,
                    "responseId": response_id,
                }
            )

        frames: list[Frame] = []
        for piece in reply.reasoning:
            frames.append(Frame(frame([{"text": piece, "thought": True}]), True))
        signature = reply.signature if reply.reasoning else ""
        for piece in reply.text:
            produced += 1
            part: dict[str, Any] = {"text": piece}
            if signature:
                part["thoughtSignature"], signature = signature, ""
            frames.append(Frame(frame([part]), True))
        for call in reply.tool_calls:
            produced += 1
            text = "".join(call.arguments)
            part = {"functionCall": {"id": call.id, "name": call.name, "args": orjson.loads(text) if text else {}}}
            if signature:
                part["thoughtSignature"], signature = signature, ""
            frames.append(Frame(frame([part]), True))
        frames.append(Frame(frame([{"text": ""}], reply.finish or "STOP"), finish=True))
        status = reply.error_type or "UNAVAILABLE"
        code = {v: k for k, v in _STATUS.items()}.get(status, 500)
        error = chunk({"error": {"code": code, "message": reply.error_message, "status": status}})
        return RenderedStream(
            frames=frames, error_frame=error, malformed_frame=b'data: {"candidates": [{"content": \r\n\r\n'
        )

    def _render_message(self, reply: StreamReply, ctx: RequestContext) -> bytes:
        raise AssertionError("the gateway only streams")


KEY_ENV = "TOKENWIRE_CONFORMANCE_GEMINI_KEY"

KIT = Kit(
    name="gemini",
    provider="gemini",
    model="gemini-2.5-flash",
    fake=FakeGemini,
    options=lambda base_url: {"base_url": base_url, "api_key_env": KEY_ENV},
    env=lambda fake: {KEY_ENV: fake.api_key},
    bad_env=lambda fake: {KEY_ENV: "LEAKCANARY-wrong-gemini-key"},
    secrets=lambda fake: [fake.api_key, "LEAKCANARY"],
    finish_reasons={
        "STOP": "STOP",
        "MAX_TOKENS": "LENGTH",
        "SAFETY": "CONTENT_FILTER",
        "RECITATION": "CONTENT_FILTER",
        "BLOCKLIST": "CONTENT_FILTER",
        "PROHIBITED_CONTENT": "CONTENT_FILTER",
        "SPII": "CONTENT_FILTER",
        "IMAGE_SAFETY": "CONTENT_FILTER",
        "IMAGE_PROHIBITED_CONTENT": "CONTENT_FILTER",
        "IMAGE_RECITATION": "CONTENT_FILTER",
        "MODEL_ARMOR": "CONTENT_FILTER",
        "LANGUAGE": "OTHER",
        "OTHER": "OTHER",
        "FINISH_REASON_UNSPECIFIED": "OTHER",
        "MALFORMED_FUNCTION_CALL": "OTHER",
        "UNEXPECTED_TOOL_CALL": "OTHER",
        "TOO_MANY_TOOL_CALLS": "OTHER",
        "MISSING_THOUGHT_SIGNATURE": "OTHER",
        "MALFORMED_RESPONSE": "OTHER",
        "IMAGE_OTHER": "OTHER",
        "NO_IMAGE": "OTHER",
        "ESCALATION": "OTHER",
        "PUP_LIMITED_DISABLED": "OTHER",
        "CONTINUATION": "OTHER",
    },
    text_finish="STOP",
    reasoning=True,
    unset=("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_CLOUD_PROJECT"),
)
