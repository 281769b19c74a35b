"""A fake Gemini Developer API and Vertex AI: `POST
/v1beta/models/{model}:streamGenerateContent?alt=sse` with the key in `x-goog-api-key`, or Vertex's
`/v1beta1/projects/{p}/locations/{l}/publishers/google/models/{model}:streamGenerateContent?alt=sse`
with an OAuth bearer token that its own token endpoint issued (see `_respond`), answered as Gemini
writes it: `data: ` lines of camelCase GenerateContentResponse JSON separated by CRLF CRLF, usage
metadata cumulative on every chunk with zero counts left out, the finish reason on the last chunk,
function calls whole (one part each), thoughts as parts with `"thought": true` and the signature on
the next part; errors as `{"error": {"code", "message", "status"}}`, in the body of an error status
or as a chunk of the stream; a wrong key is a 400 INVALID_ARGUMENT whose details say API_KEY_INVALID
(Gemini sends no 401), a wrong Vertex token a 401 UNAUTHENTICATED."""

from __future__ import annotations

import base64
import json
import re
import tempfile
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson

from .kit import Kit
from .replies import Reply, StreamReply
from .server import (
    FakeServer,
    Frame,
    Plan,
    RecordedRequest,
    RenderedStream,
    RequestContext,
    _Connection,
    _Incoming,
    random_id,
)

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
_VERTEX_PATH = re.compile(
    r"^/v1beta1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/publishers/google/models/"
    r"(?P<model>[^/:]+):streamGenerateContent$"
)
TOKEN_PATH = "/token"
SERVICE_ACCOUNT = "tokenwire-test@fake-project.iam.gserviceaccount.com"
VERTEX_PROJECT = "fake-project"
VERTEX_LOCATION = "us-central1"
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
        match = _PATH.match(path) or _VERTEX_PATH.match(path)
        return {"model": match["model"]} if method == "POST" and match else None

    @property
    def access_token(self) -> str:
        """The OAuth token the fake's token endpoint issues to SERVICE_ACCOUNT (Vertex's bearer)."""
        return f"ya29.fake-{self.api_key[-8:]}"

    async def _respond(self, conn: _Connection, incoming: _Incoming) -> bool:
        """Google's OAuth token endpoint (`token_uri` of a service-account key) is answered here and
        not recorded: the requests the suite counts are the model's. Any service account gets a
        token; only SERVICE_ACCOUNT's is accepted by the model endpoint. The assertion's signature
        is not checked (the fake has no use for the public key)."""
        if incoming.target.partition("?")[0] != TOKEN_PATH:
            return await super()._respond(conn, incoming)
        form = dict(parse_qsl(incoming.body.decode()))
        claims = form.get("assertion", "..").split(".")[1]
        issuer = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4))).get("iss")
        token = self.access_token if issuer == SERVICE_ACCOUNT else f"ya29.other-{random_id(8)}"
        body = orjson.dumps({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})
        plan = self._json_plan(200, body, random_id(8), True)
        record = RecordedRequest("POST", TOKEN_PATH, {}, incoming.headers, None, incoming.received_at)
        return await self._execute(conn, record, plan)

    def _streams(self, params: Mapping[str, str], body: dict[str, Any]) -> bool:
        return True

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        # Which API the request is for decides how a refusal looks (see _error_plan).
        self._vertex = "x-goog-api-key" not in headers
        if not self._vertex:
            return headers["x-goog-api-key"] == self.api_key
        return headers.get("authorization") == f"Bearer {self.access_token}"

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
        if status == 401 and getattr(self, "_vertex", False):
            # Vertex refuses a bad token with 401 UNAUTHENTICATED.
            message = "Request had invalid authentication credentials."
            return super()._error_plan(status, "UNAUTHENTICATED", message, keep_alive, **kw)
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


_RSA_KEY: list[str] = []


def _fake(fake: FakeServer) -> FakeGemini:
    assert isinstance(fake, FakeGemini)
    return fake


def _private_key() -> str:
    if not _RSA_KEY:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _RSA_KEY.append(pem.decode())
    return _RSA_KEY[0]


def service_account_file(fake: FakeServer, email: str = SERVICE_ACCOUNT) -> str:
    """A service-account key file whose token_uri is the fake's: application default credentials
    (GOOGLE_APPLICATION_CREDENTIALS) then get their token from it, on loopback."""
    info = {
        "type": "service_account",
        "project_id": VERTEX_PROJECT,
        "private_key_id": "fake-key-1",
        "private_key": _private_key(),
        "client_email": email,
        "client_id": "1",
        "token_uri": fake.origin + TOKEN_PATH,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, prefix="tokenwire-sa-") as f:
        json.dump(info, f)
    return f.name


VERTEX_KIT = Kit(
    name="gemini-vertex",
    provider="gemini",
    model="gemini-2.5-flash",
    fake=FakeGemini,
    options=lambda base_url: {
        "api": "vertex",
        "base_url": base_url,
        "project": VERTEX_PROJECT,
        "location": VERTEX_LOCATION,
    },
    env=lambda fake: {"GOOGLE_APPLICATION_CREDENTIALS": service_account_file(fake)},
    bad_env=lambda fake: {
        "GOOGLE_APPLICATION_CREDENTIALS": service_account_file(fake, "LEAKCANARY@other.iam.gserviceaccount.com")
    },
    secrets=lambda fake: [_fake(fake).access_token, "BEGIN PRIVATE KEY", "ya29.other"],
    finish_reasons=KIT.finish_reasons,
    text_finish="STOP",
    reasoning=True,
    unset=(*KIT.unset, "GOOGLE_CLOUD_LOCATION", "CLOUDSDK_CONFIG"),
)
