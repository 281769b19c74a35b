"""The watsonx adapter's own checks, against its TLS fake (tests/fakes/watsonx.py): the IAM token
cached and refreshed, one request per attempt, TLS verification that cannot be turned off (through an
environment proxy too), the deployment and project URLs and bodies, `event: error` frames, the
request mapping, and the SDK imported only for a watsonx route. End to end it runs in
tests/test_conformance.py."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from fakes.replies import StatusReply, StreamReply, Usage
from fakes.watsonx import CA_FILE, DEPLOYMENT_ID, PROJECT_ID, FakeWatsonx

from service.config import ConfigError, build_routes
from service.errors import ErrorCode, GatewayError, sanitize
from service.events import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerationRequest,
    Part,
    PartKind,
    ProviderEvent,
    ReasoningDelta,
    ReasoningEffort,
    ResponseFormat,
    ResponseFormatType,
    Role,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from service.providers import create_provider
from service.providers.watsonx import ChatStreamParser, WatsonxProvider, request_body

KEY_ENV = "TOKENWIRE_TEST_WATSONX_APIKEY"
ROOT = Path(__file__).resolve().parent.parent


def req(*messages: ChatMessage, **fields: Any) -> GenerationRequest:
    if not messages:
        messages = (ChatMessage(Role.USER, "Hi"),)
    return GenerationRequest(stream_id="s", route="r", upstream_model="ibm/granite", messages=messages, **fields)


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeWatsonx]:
    async with FakeWatsonx() as server:
        monkeypatch.setenv(KEY_ENV, server.api_key)
        yield server


def provider(fake: FakeWatsonx, **options: Any) -> WatsonxProvider:
    base = {
        "url": fake.base_url,
        "iam_url": fake.base_url,
        "project_id": PROJECT_ID,
        "ca_bundle_file": CA_FILE,
        "api_key_env": KEY_ENV,
        "read_timeout_seconds": 2.0,
    }
    spec = {"provider": "watsonx", "model": "ibm/granite-3-8b-instruct", "options": base | options}
    made = create_provider(build_routes({"r": spec}, "test")["r"])
    assert isinstance(made, WatsonxProvider)
    return made


async def run(p: WatsonxProvider, request: GenerationRequest | None = None) -> list[ProviderEvent]:
    return [event async for event in p.stream(request or req())]


async def failure(p: WatsonxProvider, request: GenerationRequest | None = None) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await run(p, request)
    return caught.value


async def exchanged(p: WatsonxProvider) -> None:
    """Until the token exchange under way (a background refresh) has ended."""
    assert p.iam is not None
    for _ in range(200):
        if p.iam._exchange is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the exchange did not end")


# --- IAM tokens -----------------------------------------------------------------------------


async def test_the_token_is_cached_then_refreshed_before_it_expires(fake: FakeWatsonx) -> None:
    fake.token_lifetime = 1.0  # refreshed once 0.2 s of it is left
    p = provider(fake)
    try:
        for _ in range(3):
            assert isinstance((await run(p))[-1], Finished)
        assert len(fake.iam_requests) == 1
        await asyncio.sleep(0.85)
        # In the refresh window: this stream keeps the valid token, the refresh runs beside it.
        assert isinstance((await run(p))[-1], Finished)
        await exchanged(p)
        assert len(fake.iam_requests) == 2
        assert isinstance((await run(p))[-1], Finished)
    finally:
        await p.aclose()
    tokens = [r.headers["authorization"] for r in fake.requests]
    assert tokens[0] == tokens[2] == tokens[3] != tokens[4]
    form = fake.iam_requests[0].body
    assert form == {"grant_type": "urn:ibm:params:oauth:grant-type:apikey", "apikey": fake.api_key}


async def test_only_the_current_and_the_previous_token_stay_registered_as_secrets(fake: FakeWatsonx) -> None:
    from service import errors

    fake.token_lifetime = 0.3  # refreshed after 0.24 s
    p = provider(fake)
    try:
        for _ in range(4):
            assert isinstance((await run(p))[-1], Finished)
            await asyncio.sleep(0.3)
    finally:
        await p.aclose()
    issued = fake.issued
    assert len(issued) == 4
    assert [t in errors._KNOWN_SECRETS for t in issued] == [False, False, True, True]


async def test_concurrent_streams_share_one_exchange(fake: FakeWatsonx) -> None:
    p = provider(fake)
    try:
        results = await asyncio.gather(*(run(p) for _ in range(5)))
    finally:
        await p.aclose()
    assert all(isinstance(r[-1], Finished) for r in results)
    assert len(fake.iam_requests) == 1


async def test_a_failed_refresh_while_the_token_is_valid_still_streams(fake: FakeWatsonx) -> None:
    fake.token_lifetime = 1.0  # refreshed once 0.2 s of it is left
    p = provider(fake)
    try:
        assert isinstance((await run(p))[-1], Finished)
        await asyncio.sleep(0.85)
        fake.iam_failures.append(503)
        assert isinstance((await run(p))[-1], Finished)
        await exchanged(p)
        assert len(fake.iam_requests) == 2  # the refresh was tried, and failed
        assert isinstance((await run(p))[-1], Finished)
        await exchanged(p)
        await asyncio.sleep(0.2)  # the first token has expired now: the stream waits for a new one
        assert isinstance((await run(p))[-1], Finished)
    finally:
        await p.aclose()
    tokens = [r.headers["authorization"] for r in fake.requests]
    assert len(set(tokens[:3])) == 1 and tokens[3] != tokens[0]
    assert tokens[3] == f"Bearer {fake.issued[-1]}"


async def test_concurrent_streams_during_an_iam_outage_share_one_failed_exchange(fake: FakeWatsonx) -> None:
    fake.iam_failures.extend([503] * 5)
    p = provider(fake)
    try:
        errors = await asyncio.gather(*(failure(p) for _ in range(5)))
        assert {e.code for e in errors} == {ErrorCode.PROVIDER_UNAVAILABLE}
        assert len(fake.iam_requests) == 1, "each waiter repeated the failed exchange"
        assert len({id(e) for e in errors}) == 5  # each its own copy of the one failure
        # The next attempt exchanges again (IAM still fails here: one request, again shared).
        errors = await asyncio.gather(*(failure(p) for _ in range(5)))
        assert len(fake.iam_requests) == 2
    finally:
        await p.aclose()
    assert fake.requests == []


async def test_a_hung_iam_is_bounded_by_its_own_timeout(fake: FakeWatsonx) -> None:
    fake.iam_delay = 5.0
    p = provider(fake, iam_timeout_seconds=0.3, read_timeout_seconds=30.0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        errors = await asyncio.gather(*(failure(p) for _ in range(5)))
    finally:
        await p.aclose()
    assert loop.time() - began < 1.5, "the streams waited for IAM one after another, or for the read timeout"
    assert {e.code for e in errors} == {ErrorCode.PROVIDER_TIMEOUT}
    assert errors[0].message == "IAM issued no access token (no answer within options.iam_timeout_seconds)"
    assert len(fake.iam_requests) == 1


async def test_the_wait_for_iam_ends_at_the_callers_deadline(fake: FakeWatsonx) -> None:
    import time

    fake.iam_delay = 5.0
    p = provider(fake, iam_timeout_seconds=10.0)
    began = time.monotonic()
    try:
        errors = await asyncio.gather(*(failure(p, req(deadline=began + 0.3)) for _ in range(3)))
    finally:
        await p.aclose()
    assert time.monotonic() - began < 1.5
    assert [e.message for e in errors] == ["IAM issued no access token (no answer before the deadline)"] * 3
    assert {e.code for e in errors} == {ErrorCode.PROVIDER_TIMEOUT} and len(fake.iam_requests) == 1


async def test_a_cached_token_the_service_refuses_is_exchanged_and_the_request_sent_again(fake: FakeWatsonx) -> None:
    p = provider(fake)
    try:
        await run(p)
        fake.tokens.clear()  # revoked: the fake no longer knows it
        assert isinstance((await run(p))[-1], Finished)
        assert len(fake.iam_requests) == 2 and len(fake.requests) == 3
        assert [r.status for r in fake.requests[1:]] == [401, 200]
        assert fake.requests[1].headers["authorization"] != fake.requests[2].headers["authorization"]
        # Credentials the service refuses (the new token too): one resend only, then the failure.
        fake.enqueue(StatusReply(401))
        err = await failure(p)
        assert err.code is ErrorCode.PROVIDER_AUTH_FAILED and err.provider_http_status == 401
        assert len(fake.iam_requests) == 3 and len(fake.requests) == 5
        assert isinstance((await run(p))[-1], Finished)
    finally:
        await p.aclose()
    assert len(fake.iam_requests) == 4 and len(fake.requests) == 6


async def test_a_fresh_token_the_service_refuses_is_not_sent_again(fake: FakeWatsonx) -> None:
    fake.enqueue(StatusReply(401))
    p = provider(fake)
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is ErrorCode.PROVIDER_AUTH_FAILED
    assert len(fake.iam_requests) == 1 and len(fake.requests) == 1


async def test_an_expired_token_error_in_the_stream_drops_the_token(fake: FakeWatsonx) -> None:
    p = provider(fake)
    try:
        await run(p)
        fake.enqueue(
            StreamReply(text=["a", "b"], fault="error_event", fault_after=1, error_type="authentication_token_expired")
        )
        err = await failure(p)
        assert err.code is ErrorCode.PROVIDER_AUTH_FAILED and "authentication_token_expired" in err.message
        assert isinstance((await run(p))[-1], Finished)
    finally:
        await p.aclose()
    assert len(fake.iam_requests) == 2
    tokens = [r.headers["authorization"] for r in fake.requests]
    assert tokens[0] == tokens[1] != tokens[2]


async def test_a_key_iam_refuses_is_an_auth_failure_that_names_no_key(fake: FakeWatsonx) -> None:
    fake.refused_keys.add(fake.api_key)
    p = provider(fake)
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is ErrorCode.PROVIDER_AUTH_FAILED and err.provider_http_status == 400
    expected = "IAM issued no access token (the provider answered HTTP 400: it rejected this server's credentials)"
    assert err.message == expected and sanitize(expected) == expected
    assert fake.requests == [] and len(fake.iam_requests) == 1


@pytest.mark.parametrize(
    ("status", "code"), [(500, ErrorCode.PROVIDER_UNAVAILABLE), (429, ErrorCode.PROVIDER_RATE_LIMITED)]
)
async def test_an_iam_failure_is_one_request(fake: FakeWatsonx, status: int, code: ErrorCode) -> None:
    fake.iam_failures.append(status)
    p = provider(fake)
    try:
        err = await failure(p)
        assert err.code is code and len(fake.iam_requests) == 1 and fake.requests == []
        assert err.message.startswith(f"IAM issued no access token (the provider answered HTTP {status}: ")
        assert "[redacted]" not in err.message
        assert isinstance((await run(p))[-1], Finished)  # the next attempt exchanges again
    finally:
        await p.aclose()


# --- One request per attempt -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (StatusReply(500), ErrorCode.PROVIDER_UNAVAILABLE),
        (StatusReply(503), ErrorCode.PROVIDER_UNAVAILABLE),
        (StatusReply(401), ErrorCode.PROVIDER_AUTH_FAILED),
        (StatusReply(429, headers={"retry-after": "7"}), ErrorCode.PROVIDER_RATE_LIMITED),
        (StatusReply(404, message="Model 'x' is not supported"), ErrorCode.PROVIDER_REJECTED_REQUEST),
    ],
)
async def test_each_attempt_is_one_request(fake: FakeWatsonx, reply: Any, code: ErrorCode) -> None:
    fake.enqueue(reply)
    p = provider(fake)
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is code
    assert len(fake.requests) == 1, "something retried on its own"
    if code is ErrorCode.PROVIDER_RATE_LIMITED:
        assert err.retry_after == 7.0
    if isinstance(reply, StatusReply) and reply.status == 404:
        assert "does not know this model" in err.message


async def test_a_400_passes_on_watsonx_text(fake: FakeWatsonx) -> None:
    fake.enqueue(StatusReply(400, message="The input tokens exceed the model's maximum of 8192"))
    p = provider(fake)
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is ErrorCode.PROVIDER_REJECTED_REQUEST
    assert "invalid_input_argument" in err.message and "8192" in err.message


@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        # watsonx's code decides when the table knows it, whatever the status says.
        (403, "token_quota_reached", ErrorCode.PROVIDER_RATE_LIMITED),
        (400, "model_unavailable", ErrorCode.PROVIDER_UNAVAILABLE),
        (400, "too_many_requests", ErrorCode.PROVIDER_RATE_LIMITED),
        (500, "invalid_input_argument", ErrorCode.PROVIDER_REJECTED_REQUEST),
        (400, "request_timeout", ErrorCode.PROVIDER_TIMEOUT),
        (403, "authorization_rejected", ErrorCode.PROVIDER_AUTH_FAILED),
        # A code it does not know: the status.
        (400, "something_new", ErrorCode.PROVIDER_REJECTED_REQUEST),
        (403, "something_new", ErrorCode.PROVIDER_AUTH_FAILED),
        (503, "something_new", ErrorCode.PROVIDER_UNAVAILABLE),
        (429, "something_new", ErrorCode.PROVIDER_RATE_LIMITED),
    ],
)
async def test_an_error_body_is_classified_by_its_code_then_its_status(
    fake: FakeWatsonx, status: int, error_type: str, code: ErrorCode
) -> None:
    fake.enqueue(StatusReply(status, error_type=error_type, message="simulated"))
    p = provider(fake)
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is code and err.provider_http_status == status
    assert f"HTTP {status} ({error_type})" in err.message
    assert len(fake.requests) == 1


def test_an_error_body_without_a_code_is_classified_by_its_status() -> None:
    from service.providers.watsonx import http_error

    assert http_error("watsonx", 400, {}, {}).code is ErrorCode.PROVIDER_REJECTED_REQUEST
    assert http_error("watsonx", 502, {}, {"code": 7}).code is ErrorCode.PROVIDER_UNAVAILABLE
    # 404 keeps its explanation when the code says the request is at fault.
    err = http_error("watsonx", 404, {}, {"code": "model_not_supported", "message": "x"})
    assert err.code is ErrorCode.PROVIDER_REJECTED_REQUEST and "does not know this model" in err.message


# --- TLS -------------------------------------------------------------------------------------


async def test_verification_is_on_with_the_system_trust_and_fails_clearly(fake: FakeWatsonx) -> None:
    p = provider(fake, ca_bundle_file="")
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is ErrorCode.PROVIDER_AUTH_FAILED
    assert "certificate of IAM could not be verified" in err.message
    assert fake.iam_requests == [] and fake.requests == []


async def test_a_bundle_of_another_ca_is_refused_too(fake: FakeWatsonx, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    # The token comes from a trusted IAM; the service's certificate is then the one refused.
    p = provider(fake, ca_bundle_file=str(other), auth="token", token_env=KEY_ENV)
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is ErrorCode.PROVIDER_AUTH_FAILED and "certificate of watsonx" in err.message
    assert fake.requests == []


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that tunnels to loopback only, recording each target."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            method, target, _ = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0].decode().split(" ")
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or host not in ("127.0.0.1", "localhost"):
                writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                return
            self.targets.append(target)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
            self._writers.append(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                try:
                    while data := await source.read(65536):
                        sink.write(data)
                        await sink.drain()
                finally:
                    sink.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ConnectProxy]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    async with ConnectProxy() as server:
        monkeypatch.setenv("HTTPS_PROXY", server.url)
        yield server


async def test_through_an_environment_proxy_tls_is_still_verified(
    fake: FakeWatsonx, proxy: ConnectProxy, tmp_path: Path
) -> None:
    p = provider(fake)
    try:
        assert isinstance((await run(p))[-1], Finished)
    finally:
        await p.aclose()
    origin = fake.base_url.removeprefix("https://")
    assert proxy.targets and set(proxy.targets) == {origin}, "the requests did not go through the proxy"
    # A bundle of another CA: the tunnel opens, the certificate is refused (and the system's trust
    # would refuse the fake's CA too: the route's bundle is what made the first stream work).
    other = tmp_path / "other-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    p = provider(fake, ca_bundle_file=str(other))
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is ErrorCode.PROVIDER_AUTH_FAILED and "certificate of IAM could not be verified" in err.message
    assert len(fake.iam_requests) == 1


async def test_the_proxy_decision_covers_the_iam_host(
    fake: FakeWatsonx, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service is exempt (NO_PROXY), IAM is not: IAM must be reached through the proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    port = fake.base_url.rpartition(":")[2]
    p = provider(fake, iam_url=f"https://localhost:{port}")
    try:
        assert isinstance((await run(p))[-1], Finished)
    finally:
        await p.aclose()
    assert proxy.targets == [f"localhost:{port}"]
    assert len(fake.iam_requests) == 1 and len(fake.requests) == 1


def test_an_unreadable_bundle_is_a_config_error(fake: FakeWatsonx) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:
        f.write("not a certificate")
        f.flush()
        with pytest.raises(ConfigError, match="ca_bundle_file"):
            provider(fake, ca_bundle_file=f.name)
    with pytest.raises(ConfigError, match="ca_bundle_file"):
        provider(fake, ca_bundle_file="/nonexistent/ca.pem")


# --- URLs and bodies -------------------------------------------------------------------------


async def test_a_deployment_route_posts_to_the_deployment(fake: FakeWatsonx, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_TEST_WATSONX_TOKEN", fake.cpd_token)
    p = provider(
        fake, project_id="", deployment_id=DEPLOYMENT_ID, auth="token", token_env="TOKENWIRE_TEST_WATSONX_TOKEN"
    )
    try:
        events = await run(p)
    finally:
        await p.aclose()
    assert isinstance(events[-1], Finished)
    sent = fake.requests[0]
    assert sent.path == f"/ml/v1/deployments/{DEPLOYMENT_ID}/text/chat_stream"
    assert sent.query["version"] == p.url.rpartition("version=")[2] and sent.query["version"][:2] == "20"
    assert not {"model_id", "project_id", "space_id"} & set(sent.body)
    assert sent.headers["authorization"] == f"Bearer {fake.cpd_token}" and fake.iam_requests == []


async def test_a_project_and_a_space_route(fake: FakeWatsonx) -> None:
    for options, scope in (
        ({}, {"project_id": PROJECT_ID}),
        ({"project_id": "", "space_id": "sp-1"}, {"space_id": "sp-1"}),
    ):
        p = provider(fake, api_version="2025-02-11", **options)
        try:
            await run(p)
        finally:
            await p.aclose()
        sent = fake.requests[-1]
        assert sent.path == "/ml/v1/text/chat_stream" and sent.query == {"version": "2025-02-11"}
        assert {k: sent.body[k] for k in ("model_id", *scope)} == {"model_id": "ibm/granite-3-8b-instruct", **scope}


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"url": ""}, "options.url is required"),
        ({"url": "http://127.0.0.1:1"}, "https://"),
        ({"space_id": "sp"}, "exactly one of"),
        ({"project_id": ""}, "exactly one of"),
        ({"api_key_env": "TOKENWIRE_TEST_UNSET_VARIABLE"}, "TOKENWIRE_TEST_UNSET_VARIABLE is not set"),
        ({"auth": "password"}, "options.auth"),
        ({"verify": False}, "unknown option"),
    ],
)
def test_config_errors(fake: FakeWatsonx, options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        provider(fake, **options)


def iam_of(url: str, monkeypatch: pytest.MonkeyPatch, **options: Any) -> str:
    """The IAM token URL a route on `url` would use (nothing is sent)."""
    monkeypatch.setenv(KEY_ENV, "fake-watsonx-apikey-for-iam-choice")
    spec = {"url": url, "project_id": PROJECT_ID, "api_key_env": KEY_ENV, **options}
    route = build_routes({"r": {"provider": "watsonx", "model": "m", "options": spec}}, "test")["r"]
    p = WatsonxProvider(route)
    assert p.iam is not None
    return p.iam.url


@pytest.mark.parametrize(
    "url",
    [
        "https://us-south.ml.cloud.ibm.com",
        "https://US-SOUTH.ml.cloud.ibm.com",
        "https://eu-de.ML.Cloud.IBM.com/",
        "https://us-south.ml.cloud.ibm.com:443",
        "https://us-south.ml.cloud.ibm.com.",
        "https://jp-tok.ml.cloud.ibm.com.:443//",
    ],
)
def test_ibm_cloud_urls_take_ibm_clouds_iam_however_spelled(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert iam_of(url, monkeypatch) == "https://iam.cloud.ibm.com/identity/token"


@pytest.mark.parametrize(
    "url",
    [
        "https://cpd.example.com",  # a Cloud Pak for Data cluster with the default auth = "iam"
        "https://us-south.ml.cloud.ibm.com:8443",
        "https://mars-1.ml.cloud.ibm.com",  # a region newer than the SDK, or a typo
        "https://us-south.ml.cloud.ibm.com/v2",
    ],
)
def test_an_unknown_url_needs_iam_url_and_never_gets_the_test_iam(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"\[routes\.r\] options\.iam_url is required") as caught:
        iam_of(url, monkeypatch)
    assert "test" not in str(caught.value)
    assert iam_of(url, monkeypatch, iam_url="https://iam.example.com/") == "https://iam.example.com/identity/token"


def test_normalized_url() -> None:
    from service.providers.watsonx import normalized_url

    assert normalized_url("HTTPS://Us-South.ML.cloud.ibm.com.:443/") == "https://us-south.ml.cloud.ibm.com"
    assert normalized_url("https://h.example:8443/a/") == "https://h.example:8443/a"
    for odd in ("https://user@h.example", "https://h.example:bad", "https://h.example/?a=1", "https://h.example#x"):
        assert normalized_url(odd) == "", odd


def test_the_request_mapping() -> None:
    png = b"\x89PNG\r\n"
    request = req(
        ChatMessage(Role.SYSTEM, "Be brief."),
        ChatMessage(
            Role.USER, parts=(Part(PartKind.TEXT, text="Look:"), Part(PartKind.IMAGE, media_type="image/png", data=png))
        ),
        ChatMessage(Role.ASSISTANT, tool_calls=(ToolCall("c1", "lookup", '{"q": "x"}'),)),
        ChatMessage(Role.TOOL, "found", tool_call_id="c1"),
        max_output_tokens=100,
        temperature=0.5,
        top_p=0.9,
        stop_sequences=("END",),
        seed=7,
        tools=(ToolSpec("lookup", "Looks up", {"type": "object", "properties": {"q": {"type": "string"}}}),),
        tool_choice=ToolChoice(ToolChoiceMode.NAMED, "lookup"),
        response_format=ResponseFormat(ResponseFormatType.JSON_SCHEMA, name="answer", schema={"type": "object"}),
    )
    body = request_body(request, scope={"model_id": "m", "project_id": "p"})
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            ],
        },
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "found"},
    ]
    assert {k: body[k] for k in ("model_id", "project_id", "max_tokens", "temperature", "top_p", "stop", "seed")} == {
        "model_id": "m",
        "project_id": "p",
        "max_tokens": 100,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["END"],
        "seed": 7,
    }
    assert body["tools"][0]["function"]["name"] == "lookup"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert "tool_choice_option" not in body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": False},
    }


def test_unset_options_are_not_sent_and_modes_are_tool_choice_options() -> None:
    body = request_body(req(), scope={})
    assert set(body) == {"messages"}
    tools = (ToolSpec("f"),)
    body = request_body(
        req(tools=tools, tool_choice=ToolChoice(ToolChoiceMode.REQUIRED), reasoning_effort=ReasoningEffort.HIGH),
        scope={},
        max_tokens_field="max_completion_tokens",
    )
    assert body["tool_choice_option"] == "required" and "tool_choice" not in body
    assert body["reasoning_effort"] == "high" and body["include_reasoning"] is True
    fmt = ResponseFormat(ResponseFormatType.JSON_OBJECT)
    assert request_body(req(response_format=fmt), scope={})["response_format"] == {"type": "json_object"}
    assert request_body(req(max_output_tokens=5), scope={}, max_tokens_field="max_completion_tokens") == {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 5,
    }


def test_media_outside_user_messages_and_unsupported_media_are_refused(fake: FakeWatsonx) -> None:
    image = Part(PartKind.IMAGE, media_type="image/png", data=b"x")
    with pytest.raises(GatewayError, match=r"messages\[0\]\.parts\[0\]\.image") as caught:
        request_body(req(ChatMessage(Role.SYSTEM, parts=(image,))), scope={})
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    p = provider(fake)
    pdf = Part(PartKind.DOCUMENT, media_type="application/pdf", data=b"%PDF")
    by_url = Part(PartKind.IMAGE, media_type="image/png", url="https://example.com/a.png")
    gif = Part(PartKind.IMAGE, media_type="image/gif", data=b"GIF8")
    for part, where in ((pdf, "document"), (by_url, "image.url"), (gif, "image.media_type")):
        refusal = p.capabilities.refusal(req(ChatMessage(Role.USER, parts=(part,))), "r")
        assert refusal is not None and refusal.code is ErrorCode.INVALID_REQUEST
        assert f"messages[0].parts[0].{where}" in refusal.message
    assert p.capabilities.refusal(req(ChatMessage(Role.USER, parts=(image,))), "r") is None


async def test_an_image_reaches_the_fake_as_a_data_url(fake: FakeWatsonx) -> None:
    p = provider(fake)
    image = Part(PartKind.IMAGE, media_type="image/jpeg", data=b"\xff\xd8\xff")
    try:
        await run(p, req(ChatMessage(Role.USER, parts=(Part(PartKind.TEXT, text="What is it?"), image))))
    finally:
        await p.aclose()
    assert fake.rejections == []
    assert fake.requests[0].body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")


# --- The stream ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        ("internal_error", ErrorCode.PROVIDER_UNAVAILABLE),
        ("too_many_requests", ErrorCode.PROVIDER_RATE_LIMITED),
        ("invalid_input_argument", ErrorCode.PROVIDER_REJECTED_REQUEST),
        ("authentication_token_expired", ErrorCode.PROVIDER_AUTH_FAILED),
    ],
)
async def test_an_error_event_is_mapped(fake: FakeWatsonx, error_type: str, code: ErrorCode) -> None:
    fake.enqueue(
        StreamReply(text=["a", "b"], fault="error_event", fault_after=1, error_type=error_type, error_message="boom")
    )
    p = provider(fake)
    seen: list[ProviderEvent] = []

    async def consume() -> None:
        async for event in p.stream(req()):
            seen.append(event)

    try:
        with pytest.raises(GatewayError) as caught:
            await consume()
    finally:
        await p.aclose()
    assert seen == [TextDelta("a")]
    assert caught.value.code is code and error_type in caught.value.message
    assert ("boom" in caught.value.message) == (code is ErrorCode.PROVIDER_REJECTED_REQUEST)


def test_an_error_event_of_an_unknown_code_is_classified_by_its_status() -> None:
    parser = ChatStreamParser("watsonx")
    with pytest.raises(GatewayError) as caught:
        parser.handle(b"error", b'{"errors": [{"code": "something_new", "message": "x"}], "status_code": 503}')
    assert caught.value.code is ErrorCode.PROVIDER_UNAVAILABLE and caught.value.provider_http_status == 503
    with pytest.raises(GatewayError) as caught:
        ChatStreamParser("watsonx").handle(b"error", b"not json")
    assert caught.value.code is ErrorCode.PROVIDER_ERROR


def chunk(choice: dict[str, Any] | None = None, **extra: Any) -> bytes:
    import orjson

    return orjson.dumps({"id": "chat-1", "model_id": "m", **({"choices": [choice]} if choice else {}), **extra})


def test_reasoning_tool_calls_and_usage_after_the_finish() -> None:
    parser = ChatStreamParser("watsonx")
    parser.handle(b"message", chunk({"index": 0, "delta": {"role": "assistant", "reasoning_content": "hmm"}}))
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
    parser.handle(b"message", chunk({"index": 0, "delta": {"tool_calls": [call]}}))
    parser.handle(
        b"message", chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}})
    )
    parser.handle(b"message", chunk({"index": 0, "delta": {}, "finish_reason": "stop"}))
    assert not parser.done  # usage may follow in a chunk of its own
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}
    parser.handle(b"message", chunk(usage=usage))
    assert parser.done
    assert parser.out == [
        ReasoningDelta("hmm"),
        ToolCallDelta(index=0, id="c1", name="f", arguments=""),
        ToolCallDelta(index=0, arguments="{}"),
    ]
    finished = parser.finish()
    # A model that ends its tool calls with "stop" still ended them with tool calls.
    assert (finished.reason, finished.raw_reason) == (FinishReason.TOOL_CALLS, "stop")
    assert finished.usage is not None
    assert (finished.usage.input_tokens, finished.usage.output_tokens, finished.usage.cache_read_input_tokens) == (
        9,
        4,
        0,
    )
    assert finished.provider_request_id == "chat-1" and finished.provider_model == "m"


def test_a_refusal_or_reasoning_under_either_name_is_read_as_for_any_chat_completions_stream() -> None:
    parser = ChatStreamParser("watsonx")
    parser.handle(b"message", chunk({"index": 0, "delta": {"reasoning": "think"}}))
    parser.handle(b"message", chunk({"index": 0, "delta": {"refusal": "I won't."}, "finish_reason": "stop"}))
    parser.handle(b"message", chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}))
    assert parser.out == [ReasoningDelta("think"), TextDelta("I won't.")]
    finished = parser.finish()
    assert (finished.reason, finished.raw_reason) == (FinishReason.REFUSAL, "stop")


async def test_finish_reason_error_is_a_failure_not_a_finish(fake: FakeWatsonx) -> None:
    fake.enqueue(StreamReply(text=["partial"], finish="error"))
    p = provider(fake)
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is ErrorCode.PROVIDER_UNAVAILABLE and "finish_reason 'error'" in err.message


async def test_no_usage_and_no_finish_is_truncated(fake: FakeWatsonx) -> None:
    fake.enqueue(
        StreamReply(
            text=["a"], usage=Usage(3, 1), rewrite=lambda i, data: b"" if b'finish_reason":"stop' in data else data
        )
    )
    p = provider(fake)
    try:
        err = await failure(p)
    finally:
        await p.aclose()
    assert err.code is ErrorCode.PROVIDER_STREAM_TRUNCATED


# --- Packaging -------------------------------------------------------------------------------


def test_the_sdk_is_imported_only_for_a_watsonx_route() -> None:
    script = """
import os, sys
from service.config import build_routes
from service.providers import create_provider
create_provider(build_routes({"r": {"provider": "simulated", "model": "sim"}}, "t")["r"])
assert "ibm_watsonx_ai" not in sys.modules and "service.providers.watsonx" not in sys.modules
os.environ["K"] = "fake-watsonx-apikey-for-import-test"
options = {"url": "https://127.0.0.1:9", "iam_url": "https://127.0.0.1:9", "project_id": "p", "api_key_env": "K"}
create_provider(build_routes({"w": {"provider": "watsonx", "model": "m", "options": options}}, "t")["w"])
assert "ibm_watsonx_ai" in sys.modules
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATSONX")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_readme_example_routes_build(monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    readme = (ROOT / "README.md").read_text()
    block = readme.split("```toml watsonx\n", 1)[1].split("```", 1)[0]
    # The CA file has to exist: the fake's stands in for the cluster's.
    block = block.replace("/etc/ssl/cpd-ca.pem", CA_FILE)
    monkeypatch.setenv("WATSONX_APIKEY", "readme-watsonx-apikey-0001")
    monkeypatch.setenv("WATSONX_TOKEN", "readme-watsonx-token-0001")
    routes = build_routes(tomllib.loads(block)["routes"], "README")
    made = {name: WatsonxProvider(route) for name, route in routes.items()}
    project, deployment = made["granite"], made["granite-deployed"]
    assert project.url.startswith("https://us-south.ml.cloud.ibm.com/ml/v1/text/chat_stream?version=")
    assert project.iam is not None and project.iam.url == "https://iam.cloud.ibm.com/identity/token"
    assert deployment.url.startswith("https://cpd.example.com/ml/v1/deployments/YOUR_DEPLOYMENT_ID/text/chat_stream")
    assert deployment.iam is None and deployment.options.ca_bundle_file == CA_FILE
