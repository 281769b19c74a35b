"""A fake AWS Bedrock runtime: `POST /model/{modelId}/converse-stream` answered in AWS's binary
`application/vnd.amazon.eventstream` framing (prelude, string headers, JSON payload, CRC32s), as
Bedrock writes it (every payload padded with a `p` field). Requests must be SigV4-signed for the
fake's access key (the Authorization header's shape is checked; the signature itself cannot be
without the secret's derivation, which is botocore's, not the server's) or carry the Bedrock API
key as a bearer token."""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from service.providers.framing import encode_message

from .kit import Kit
from .replies import Reply, StreamReply
from .server import FakeServer, Frame, Plan, RenderedStream, RequestContext, random_id

DEFAULT_ACCESS_KEY = "AKIAFAKEBEDROCK00001"
DEFAULT_SECRET_KEY = "fake-bedrock-secret-0001"
DEFAULT_API_KEY = "ABSKfakebedrockapikey0001"
REGION = "us-east-1"
_NATURAL: dict[int, str] = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
_PATH = re.compile(r"^/model/(?P<model>[^/]+)/converse-stream$")
_SIGV4 = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[A-Z0-9]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/bedrock/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})$"
)
_PADDING = string.ascii_letters + string.digits


def event(name: str, payload: dict[str, Any]) -> bytes:
    """One event message, padded as Bedrock pads them (so that lengths do not reveal content)."""
    body = orjson.dumps({**payload, "p": _PADDING[: 1 + len(name) % 20]})
    headers = {":event-type": name, ":content-type": "application/json", ":message-type": "event"}
    return encode_message(headers, body)


def exception(name: str, message: str) -> bytes:
    headers = {":exception-type": name, ":content-type": "application/json", ":message-type": "exception"}
    return encode_message(headers, orjson.dumps({"message": message}))


def stop_reason(reply: StreamReply) -> str:
    if reply.finish is not None:
        return reply.finish
    return "tool_use" if reply.tool_calls else "end_turn"


class FakeBedrock(FakeServer):
    """Point the `bedrock` provider at it with `endpoint_url = fake.base_url`."""

    request_id_header = "x-amzn-requestid"
    stream_content_type: ClassVar[str] = "application/vnd.amazon.eventstream"

    def __init__(
        self,
        access_key: str = DEFAULT_ACCESS_KEY,
        *,
        api_key: str = DEFAULT_API_KEY,
        region: str = REGION,
        default: Reply | None = None,
    ) -> None:
        super().__init__(api_key, default=default)
        self.access_key = access_key
        self.region = region
        # The Authorization headers' parts as received, for tests of the signing.
        self.signatures: list[dict[str, str]] = []

    @property
    def base_url(self) -> str:
        return self.origin

    def _route(self, method: str, path: str) -> dict[str, str] | None:
        match = _PATH.match(path)
        return {"model": match["model"]} if method == "POST" and match else None

    def _streams(self, params: Mapping[str, str], body: dict[str, Any]) -> bool:
        return True

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme == "Bearer":
            return token == self.api_key
        match = _SIGV4.match(authorization)
        if match is None or not re.fullmatch(r"\d{8}T\d{6}Z", headers.get("x-amz-date", "")):
            return False
        parts = match.groupdict()
        self.signatures.append(parts)
        signed = parts["signed"].split(";")
        return (
            parts["key"] == self.access_key
            and parts["region"] == self.region
            and parts["date"] == headers["x-amz-date"][:8]
            and {"host", "x-amz-date"} <= set(signed)
            and all(name in headers for name in signed)
        )

    def _new_request_id(self) -> str:
        return f"{random_id(8)}-{random_id(4)}-{random_id(4)}-{random_id(4)}-{random_id(12)}".lower()

    def _unauthorized_message(self) -> str:
        return "The security token included in the request is invalid."

    def _not_found_message(self, method: str, path: str) -> str:
        return "The requested resource could not be found."

    def _error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        return orjson.dumps({"message": message})

    def _error_plan(self, status: int, error_type: str, message: str, keep_alive: bool, **kw: Any) -> Plan:
        kind = error_type or _NATURAL.get(status, "InternalServerException" if status >= 500 else "ValidationException")
        extra = {"x-amzn-errortype": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
        kw["extra"] = {**extra, **(kw.get("extra") or {})}
        return super()._error_plan(status, error_type, message, keep_alive, **kw)

    def _rejection(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        """What Converse refuses with a ValidationException: the shapes its model does not take."""
        if "stream" in body or "model" in body:
            return "extraneous key [stream] is not permitted"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: must not be empty"
        roles = [m.get("role") for m in messages]
        if roles[0] != "user" or any(a == b for a, b in itertools.pairwise(roles)):
            return "A conversation must start with a user message and alternate user and assistant turns."
        known = {"text", "image", "document", "toolUse", "toolResult", "reasoningContent", "cachePoint"}
        for m in messages:
            for block in m.get("content") or ():
                if len(block) != 1 or next(iter(block)) not in known:
                    return f"content block {sorted(block)!r} is not a ContentBlock"
        return None

    def _render_stream(self, reply: StreamReply, ctx: RequestContext) -> RenderedStream:
        frames = [Frame(event("messageStart", {"role": "assistant"}))]
        index = 0
        delta: dict[str, Any]
        if reply.reasoning:
            for piece in reply.reasoning:
                delta = {"reasoningContent": {"text": piece}}
                frames.append(Frame(event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}), True))
            delta = {"reasoningContent": {"signature": reply.signature}}
            frames.append(Frame(event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta})))
            frames.append(Frame(event("contentBlockStop", {"contentBlockIndex": index})))
            index += 1
        if reply.text:
            for piece in reply.text:
                delta = {"text": piece}
                frames.append(Frame(event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}), True))
            frames.append(Frame(event("contentBlockStop", {"contentBlockIndex": index})))
            index += 1
        for call in reply.tool_calls:
            start = {"toolUse": {"toolUseId": call.id, "name": call.name}}
            frames.append(Frame(event("contentBlockStart", {"contentBlockIndex": index, "start": start})))
            for piece in call.arguments:
                delta = {"toolUse": {"input": piece}}
                frames.append(Frame(event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}), True))
            frames.append(Frame(event("contentBlockStop", {"contentBlockIndex": index})))
            index += 1
        stop: dict[str, Any] = {"stopReason": stop_reason(reply)}
        frames.append(Frame(event("messageStop", stop), finish=True))
        metadata: dict[str, Any] = {"metrics": {"latencyMs": 123}}
        if reply.usage is not None:
            u = reply.usage
            usage = {"inputTokens": u.input_tokens, "outputTokens": u.output_tokens}
            usage["totalTokens"] = u.input_tokens + u.output_tokens
            if u.cache_read_tokens is not None:
                usage["cacheReadInputTokens"] = u.cache_read_tokens
            if u.cache_write_tokens is not None:
                usage["cacheWriteInputTokens"] = u.cache_write_tokens
            metadata["usage"] = usage
        frames.append(Frame(event("metadata", metadata), finish=True))
        return RenderedStream(
            frames=frames,
            error_frame=exception(reply.error_type or "modelStreamErrorException", reply.error_message),
            # A frame whose checksums hold but whose JSON is cut off.
            malformed_frame=encode_message(
                {":event-type": "contentBlockDelta", ":content-type": "application/json", ":message-type": "event"},
                b'{"contentBlockIndex": 0, "delta": {',
            ),
        )

    def _render_message(self, reply: StreamReply, ctx: RequestContext) -> bytes:
        raise AssertionError("the gateway only streams")


# The AWS chain must find the fake's keys and nothing of this machine's (files, profiles, instance roles).
_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_BEARER_TOKEN_BEDROCK",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
_ISOLATED = {
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _sigv4_env(fake: FakeServer) -> dict[str, str]:
    assert isinstance(fake, FakeBedrock)
    return _ISOLATED | {"AWS_ACCESS_KEY_ID": fake.access_key, "AWS_SECRET_ACCESS_KEY": DEFAULT_SECRET_KEY}


def _kit(name: str, auth: str) -> Kit:
    key_env = "TOKENWIRE_CONFORMANCE_BEDROCK_KEY"
    return Kit(
        name=name,
        provider="bedrock",
        model="anthropic.claude-test-v1:0",
        fake=FakeBedrock,
        options=lambda base_url: {
            "endpoint_url": base_url,
            "region": REGION,
            "auth": auth,
            "api_key_env": key_env,
            "reasoning": "anthropic",
        },
        env=(lambda fake: _sigv4_env(fake)) if auth == "sigv4" else (lambda fake: _ISOLATED | {key_env: fake.api_key}),
        bad_env=(
            (
                lambda fake: (
                    _ISOLATED | {"AWS_ACCESS_KEY_ID": "AKIAWRONG0000000000", "AWS_SECRET_ACCESS_KEY": "LEAKCANARY-s"}
                )
            )
            if auth == "sigv4"
            else (lambda fake: _ISOLATED | {key_env: "LEAKCANARY-wrong-bedrock-key"})
        ),
        secrets=lambda fake: [DEFAULT_SECRET_KEY, fake.api_key, "LEAKCANARY"],
        finish_reasons={
            "end_turn": "STOP",
            "tool_use": "TOOL_CALLS",
            "max_tokens": "LENGTH",
            "model_context_window_exceeded": "LENGTH",
            "stop_sequence": "STOP_SEQUENCE",
            "guardrail_intervened": "CONTENT_FILTER",
            "content_filtered": "CONTENT_FILTER",
            "malformed_model_output": "OTHER",
            "malformed_tool_use": "OTHER",
        },
        text_finish="end_turn",
        reasoning=True,
        unset=_AWS_VARIABLES,
    )


KIT = _kit("bedrock", "sigv4")
API_KEY_KIT = _kit("bedrock-api-key", "api-key")
