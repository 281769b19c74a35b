"""A fake IBM watsonx.ai over TLS (its certificate from a `trustme` CA; point a route's
`ca_bundle_file` at `CA_FILE`): the chat stream `POST /ml/v1/text/chat_stream?version=...` (a model
in a project or space) and `POST /ml/v1/deployments/{id}/text/chat_stream?version=...`, and IBM
Cloud IAM's token endpoint `POST /identity/token` on the same origin.

IAM exchanges any API key for an access token that lives `token_lifetime` seconds (keys in
`refused_keys` get IAM's 400 BXNIM0415E); the chat endpoint takes only an unexpired token issued
for `api_key`, or `cpd_token` (a Cloud Pak for Data bearer token), and answers anything else with
401 `authentication_token_expired`. Token exchanges are recorded in `iam_requests`, not in
`requests`: the suite counts the model's requests.

Two ways for the service to refuse a token: `tokens.clear()` revokes the tokens issued so far (a new
one is taken), while an enqueued `StatusReply(401)` stands for credentials the service refuses
outright: its 401 is also the answer to the next request whose token IAM issued after it (the
adapter's one resend with a new token), without taking another reply from the queue.

The stream is written as watsonx writes it: `id: N` / `event: message` / `data: {chunk}` frames, a
chunk being `{"id", "object": "chat.completion.chunk", "model_id", "model", "created", "choices":
[{"index": 0, "delta": {...}, "finish_reason"}]}`, the first delta with the role, tool calls as
OpenAI-style deltas, the finish reason and usage in the last chunk. Errors are watsonx's body
`{"errors": [{"code", "message", "more_info"}], "trace", "status_code"}`, as the body of an error
status or as the data of an `event: error` frame.
"""

from __future__ import annotations

import ssl
import tempfile
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson
import trustme

from .kit import Kit
from .replies import Reply, ResetReply, StreamReply
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

DEFAULT_API_KEY = "fake-watsonx-apikey-0000000000000000000001"
PROJECT_ID = "0f0e0d0c-0000-4000-8000-00000000f00d"
DEPLOYMENT_ID = "fake-deployment-1"
IAM_PATH = "/identity/token"
CHAT_PATH = "/ml/v1/text/chat_stream"
_DEPLOYMENT_PREFIX = "/ml/v1/deployments/"
_DEPLOYMENT_SUFFIX = "/text/chat_stream"
_GRANT = "urn:ibm:params:oauth:grant-type:apikey"
_CODES = {
    400: "invalid_input_argument",
    401: "authentication_token_expired",
    403: "authorization_rejected",
    404: "model_not_supported",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}
_ROLES = {"system", "user", "assistant", "tool"}

# One CA for every fake of the process; its PEM in a file a route's ca_bundle_file points at.
_CA = trustme.CA()
_CERT = _CA.issue_cert("127.0.0.1", "localhost")
with tempfile.NamedTemporaryFile("wb", suffix=".pem", prefix="tokenwire-watsonx-ca-", delete=False) as _f:
    _f.write(_CA.cert_pem.bytes())
CA_FILE = _f.name


def server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _CERT.configure_cert(context)
    return context


class FakeWatsonx(FakeServer):
    """Point a `watsonx` route's `url` and `iam_url` at `fake.base_url`, `ca_bundle_file` at CA_FILE."""

    request_id_header = "x-global-transaction-id"

    def __init__(self, api_key: str = DEFAULT_API_KEY, *, default: Reply | None = None) -> None:
        super().__init__(api_key, default=default)
        self.ssl_context = server_context()
        self.token_lifetime = 3600.0
        self.refused_keys: set[str] = set()
        self.cpd_token = f"fake-cpd-token-{random_id(24)}"
        # token -> (the API key it was issued for, when it expires: time.monotonic())
        self.tokens: dict[str, tuple[str, float]] = {}
        self.iam_requests: list[RecordedRequest] = []
        # Statuses IAM answers, one per exchange, before it issues tokens again.
        self.iam_failures: list[int] = []
        # Seconds IAM takes to send its answer's body (its head goes at once): a slow or hung IAM.
        self.iam_delay = 0.0
        self._query: dict[str, str] = {}
        # After an enqueued 401: tokens issued from this index on get one 401 more (see above).
        self._refuse_from: int | None = None
        self._deployment = ""

    @property
    def base_url(self) -> str:
        return self.origin

    @property
    def issued(self) -> list[str]:
        """Every access token IAM issued so far."""
        return list(self.tokens)

    def _route(self, method: str, path: str) -> dict[str, str] | None:
        if method != "POST":
            return None
        if path == CHAT_PATH:
            self._deployment = ""
            return {}
        if path.startswith(_DEPLOYMENT_PREFIX) and path.endswith(_DEPLOYMENT_SUFFIX):
            deployment = path[len(_DEPLOYMENT_PREFIX) : -len(_DEPLOYMENT_SUFFIX)]
            if deployment and "/" not in deployment:
                self._deployment = deployment
                return {"deployment": deployment}
        return None

    async def _respond(self, conn: _Connection, incoming: _Incoming) -> bool:
        target, _, query = incoming.target.partition("?")
        if target != IAM_PATH:
            self._query = dict(parse_qsl(query))
            return await super()._respond(conn, incoming)
        form = dict(parse_qsl(incoming.body.decode()))
        record = RecordedRequest("POST", IAM_PATH, {}, incoming.headers, form, incoming.received_at)
        self.iam_requests.append(record)
        request_id = random_id(16)
        if self.iam_failures:
            status = self.iam_failures.pop(0)
            body = orjson.dumps({"errorCode": "BXNIM0000E", "errorMessage": "simulated IAM failure"})
            plan = self._json_plan(status, body, request_id, True, delay=self.iam_delay)
            return await self._execute(conn, record, plan)
        key = form.get("apikey", "")
        if form.get("grant_type") != _GRANT or not key or key in self.refused_keys:
            body = orjson.dumps(
                {
                    "errorCode": "BXNIM0415E",
                    "errorMessage": "Provided API key could not be found.",
                    "context": {"requestId": request_id},
                }
            )
            return await self._execute(conn, record, self._json_plan(400, body, request_id, True))
        token = f"fake-iam-token-{random_id(32)}"
        self.tokens[token] = (key, time.monotonic() + self.token_lifetime)
        body = orjson.dumps(
            {
                "access_token": token,
                "refresh_token": "not_supported",
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "expiration": int(time.time() + self.token_lifetime),
                "scope": "ibm openid",
            }
        )
        return await self._execute(conn, record, self._json_plan(200, body, request_id, True, delay=self.iam_delay))

    def _plan(self, incoming: _Incoming, path: str, body: Any, keep_alive: bool) -> Plan | ResetReply:
        token = incoming.headers.get("authorization", "").partition(" ")[2]
        authorized = self._authorized(incoming.headers)
        if self._refuse_from is not None and authorized and token in list(self.tokens)[self._refuse_from :]:
            self._refuse_from = None
            return self._error_plan(401, "", self._unauthorized_message(), keep_alive)
        plan = super()._plan(incoming, path, body, keep_alive)
        if isinstance(plan, Plan) and plan.status == 401 and authorized and token in self.tokens:
            # An enqueued 401 (the token itself was good): the credentials are refused.
            self._refuse_from = len(self.tokens)
        return plan

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme != "Bearer":
            return False
        if token == self.cpd_token:
            return True
        key, expires = self.tokens.get(token, ("", 0.0))
        return key == self.api_key and time.monotonic() < expires

    def _new_request_id(self) -> str:
        return random_id(24)

    def _unauthorized_message(self) -> str:
        return "Failed to authenticate the request due to an expired token"

    def _not_found_message(self, method: str, path: str) -> str:
        return f"Not found: {method} {path}"

    def _error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        code = error_type or _CODES.get(status) or ("internal_error" if status >= 500 else "invalid_input_argument")
        return orjson.dumps(
            {
                "errors": [{"code": code, "message": message, "more_info": "https://cloud.ibm.com/apidocs/watsonx-ai"}],
                "trace": request_id,
                "status_code": status,
            }
        )

    def _streams(self, params: Mapping[str, str], body: dict[str, Any]) -> bool:
        return True

    def _rejection(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        if not self._query.get("version"):
            return "Missing query parameter: version"
        scope = [k for k in ("project_id", "space_id") if k in body]
        if self._deployment:
            if scope or "model_id" in body:
                return "model_id, project_id and space_id are not allowed for a deployment"
        elif len(scope) != 1 or not isinstance(body.get("model_id"), str):
            return "Json document validation error: model_id and one of project_id or space_id are required"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "Json document validation error: messages must have at least 1 item"
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in _ROLES:
                return f"Json document validation error: messages[{i}].role {role!r}"
            content = message.get("content")
            if isinstance(content, list):
                if role != "user":
                    return f"messages[{i}]: only user messages take content parts"
                for part in content:
                    kind = part.get("type")
                    if kind == "image_url":
                        url = str((part.get("image_url") or {}).get("url", ""))
                        if not url.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")):
                            return f"messages[{i}]: image_url.url must be a base64 data URL"
                    elif kind != "text":
                        return f"messages[{i}]: unknown content type {kind!r}"
            if role == "tool" and not message.get("tool_call_id"):
                return f"messages[{i}]: tool_call_id is required"
        if "stream" in body or "model" in body:
            return "Json document validation error: unknown field"
        fmt = body.get("response_format")
        if fmt is not None and fmt.get("type") not in ("json_object", "json_schema", "text"):
            return "response_format.type must be text, json_object or json_schema"
        return None

    def _render_stream(self, reply: StreamReply, ctx: RequestContext) -> RenderedStream:
        model = reply.model or str(ctx.body.get("model_id") or "ibm/granite-deployed")
        base: dict[str, Any] = {
            "id": f"chat-{ctx.request_id}",
            "object": "chat.completion.chunk",
            "model_id": model,
            "model": model,
            "model_version": "3.3.0",
            "created": int(time.time()),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }
        counter = iter(range(1, 1_000_000))

        def frame(choice: dict[str, Any], **extra: Any) -> bytes:
            data = orjson.dumps({**base, "choices": [{"index": 0, **choice}], **extra})
            return b"id: %d\nevent: message\ndata: %b\n\n" % (next(counter), data)

        frames = [Frame(frame({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}))]
        frames += [
            Frame(frame({"delta": {"reasoning_content": piece}, "finish_reason": None}), delta=True)
            for piece in reply.reasoning
        ]
        frames += [
            Frame(frame({"delta": {"content": piece}, "finish_reason": None}), delta=True) for piece in reply.text
        ]
        for i, call in enumerate(reply.tool_calls):
            start = {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            frames.append(Frame(frame({"delta": {"tool_calls": [start]}, "finish_reason": None})))
            frames += [
                Frame(
                    frame({"delta": {"tool_calls": [{"index": i, "function": {"arguments": piece}}]}}),
                    delta=True,
                )
                for piece in call.arguments
            ]
        finish = reply.finish or ("tool_calls" if reply.tool_calls else "stop")
        extra: dict[str, Any] = {}
        u = reply.usage
        if u is not None:
            usage: dict[str, Any] = {
                "prompt_tokens": u.input_tokens,
                "completion_tokens": u.output_tokens,
                "total_tokens": u.input_tokens + u.output_tokens,
            }
            if u.cache_read_tokens is not None:
                usage["prompt_tokens_details"] = {"cached_tokens": u.cache_read_tokens}
            if u.reasoning_tokens is not None:
                usage["completion_tokens_details"] = {"reasoning_tokens": u.reasoning_tokens}
            extra["usage"] = usage
        frames.append(Frame(frame({"delta": {}, "finish_reason": finish}, **extra), finish=True))
        status = {v: k for k, v in _CODES.items()}.get(reply.error_type, 500)
        error = orjson.dumps(
            {
                "errors": [{"code": reply.error_type or "internal_error", "message": reply.error_message}],
                "trace": ctx.request_id,
                "status_code": status,
            }
        )
        return RenderedStream(
            frames=frames,
            error_frame=b"id: 0\nevent: error\ndata: " + error + b"\n\n",
            malformed_frame=b'id: 0\nevent: message\ndata: {"choices": [\n\n',
        )

    def _render_message(self, reply: StreamReply, ctx: RequestContext) -> bytes:
        raise AssertionError("the gateway only streams")


def _fake(fake: FakeServer) -> FakeWatsonx:
    assert isinstance(fake, FakeWatsonx)
    return fake


KEY_ENV = "TOKENWIRE_CONFORMANCE_WATSONX_APIKEY"
TOKEN_ENV = "TOKENWIRE_CONFORMANCE_WATSONX_TOKEN"
FINISH_REASONS = {
    "stop": "STOP",
    "length": "LENGTH",
    "tool_calls": "TOOL_CALLS",
    "time_limit": "OTHER",
    "cancelled": "CANCELLED",
    "content_filter": "CONTENT_FILTER",
}

KIT = Kit(
    name="watsonx",
    provider="watsonx",
    model="ibm/granite-3-8b-instruct",
    fake=FakeWatsonx,
    options=lambda base_url: {
        "url": base_url,
        "iam_url": base_url,
        "project_id": PROJECT_ID,
        "ca_bundle_file": CA_FILE,
        "api_key_env": KEY_ENV,
    },
    env=lambda fake: {KEY_ENV: fake.api_key},
    # A key IAM knows whose tokens the project refuses (a service ID without access).
    bad_env=lambda fake: {KEY_ENV: "LEAKCANARY-other-service-id-apikey"},
    secrets=lambda fake: [fake.api_key, "LEAKCANARY", *_fake(fake).issued],
    finish_reasons=FINISH_REASONS,
    text_finish="stop",
    unset=("WATSONX_APIKEY", "WATSONX_TOKEN"),
)

# A deployment on Cloud Pak for Data, with a bearer token as it is.
DEPLOYMENT_KIT = Kit(
    name="watsonx-deployment",
    provider="watsonx",
    model="my-deployed-granite",
    fake=FakeWatsonx,
    options=lambda base_url: {
        "url": base_url,
        "deployment_id": DEPLOYMENT_ID,
        "auth": "token",
        "token_env": TOKEN_ENV,
        "ca_bundle_file": CA_FILE,
    },
    env=lambda fake: {TOKEN_ENV: _fake(fake).cpd_token},
    bad_env=lambda fake: {TOKEN_ENV: "LEAKCANARY-expired-cpd-token"},
    secrets=lambda fake: [_fake(fake).cpd_token, "LEAKCANARY"],
    finish_reasons=FINISH_REASONS,
    text_finish="stop",
    unset=("WATSONX_APIKEY", "WATSONX_TOKEN"),
)
