"""The request templates of the SDK providers (service.providers.upstream.TemplateSender): what a
template sends is what the SDK sends, a changed key rebuilds it, and an error status classifies
as it does through the SDK. Real SDKs, real fake providers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from fakes import FakeAnthropic, FakeOpenAI, StatusReply, StreamReply

from conftest import ANTHROPIC_KEY_ENV, OPENAI_KEY_ENV
from service.config import build_routes
from service.errors import GatewayError
from service.events import ChatMessage, Finished, GenerationRequest, Role
from service.providers import create_provider
from service.providers.anthropic import per_request_headers
from service.providers.openai import credentials_per_request
from service.providers.upstream import HTTPProvider, json_bytes, post_streaming

pytestmark = pytest.mark.timeout(30)

KINDS = ("openai", "azure-openai", "openai-compatible", "anthropic")


def provider(kind: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, **route: Any) -> Any:
    where = {
        "openai": {"base_url": fake_openai.base_url},
        "openai-compatible": {"base_url": fake_openai.base_url},
        "azure-openai": {"endpoint": fake_openai.azure_endpoint},
        "anthropic": {"base_url": fake_anthropic.base_url},
    }[kind]
    key_env = ANTHROPIC_KEY_ENV if kind == "anthropic" else OPENAI_KEY_ENV
    options = where | {"api_key_env": key_env, "read_timeout_seconds": 2.0, "connect_timeout_seconds": 1.0}
    spec = {"provider": kind, "model": "m-test", "options": options} | route
    return create_provider(build_routes({"r": spec}, "test")["r"])


def generation(text: str = "Hi there.") -> GenerationRequest:
    return GenerationRequest(
        stream_id="s1", route="r", upstream_model="m-test", messages=(ChatMessage(Role.USER, text),)
    )


async def run(p: HTTPProvider, req: GenerationRequest) -> list[Any]:
    return [event async for event in p.stream(req)]


def path_of(p: Any, req: GenerationRequest) -> str:
    return "/v1/messages" if p.kind == "anthropic" else str(p._path(req))


def fake_for(kind: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> FakeOpenAI | FakeAnthropic:
    return fake_anthropic if kind == "anthropic" else fake_openai


async def no_template(path: str) -> None:
    return None


@pytest.mark.parametrize("kind", KINDS)
async def test_a_template_sends_what_the_sdk_sends(
    kind: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    p = provider(kind, fake_openai, fake_anthropic)
    fake = fake_for(kind, fake_openai, fake_anthropic)
    req = generation()
    try:
        assert await p.sender.template(path_of(p, req)) is not None
        events = await run(p, req)
        assert isinstance(events[-1], Finished)
        # The same request sent by the SDK itself, on the same client.
        limits = p.settings.timeout(req)
        async with post_streaming(p.client, path_of(p, req), json_bytes(_body(p, req)), limits) as response:
            assert response.status_code == 200
            await response.aread()
    finally:
        await p.aclose()
    templated, sdk = fake.requests[-2], fake.requests[-1]
    assert (templated.method, templated.path, templated.query) == (sdk.method, sdk.path, sdk.query)
    assert templated.body == sdk.body
    # The read timeout is the one value that may differ: each request's own deadline.
    varying = {"x-stainless-read-timeout", "x-stainless-timeout"}
    assert {k: v for k, v in templated.headers.items() if k not in varying} == {
        k: v for k, v in sdk.headers.items() if k not in varying
    }
    assert {k for k in templated.headers if k in varying} == {k for k in sdk.headers if k in varying}
    assert "x-stainless-retry-count" in templated.headers and "user-agent" in templated.headers


def _body(p: Any, req: GenerationRequest) -> dict[str, Any]:
    if p.kind == "anthropic":
        from service.providers.anthropic import request_body

        return request_body(req, default_max_tokens=p.default_max_tokens, reasoning_mode=p.reasoning_mode)
    from service.providers.openai import request_body as openai_body

    return openai_body(req, p.max_tokens_field, breakpoints=p.breakpoints)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_changed_key_rebuilds_the_template(
    kind: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    p = provider(kind, fake_openai, fake_anthropic)
    fake = fake_for(kind, fake_openai, fake_anthropic)
    try:
        await run(p, generation())
        first = await p.sender.template(path_of(p, generation()))
        p.client.api_key = "a-rotated-key-the-fake-refuses"
        with pytest.raises(GatewayError) as caught:
            await run(p, generation())
        assert await p.sender.template(path_of(p, generation())) is not first
    finally:
        await p.aclose()
    assert caught.value.code.name == "PROVIDER_AUTH_FAILED" and caught.value.provider_http_status == 401
    sent = fake.requests[-1].headers
    assert "a-rotated-key-the-fake-refuses" in (sent.get("authorization", "") + sent.get("api-key", ""))
    assert fake.api_key not in (sent.get("authorization", "") + sent.get("api-key", ""))


STATUSES = [
    StatusReply(400, "invalid_request_error", "bad max_tokens"),
    StatusReply(401, "authentication_error"),
    StatusReply(403, "permission_error"),
    StatusReply(404, "not_found_error"),
    StatusReply(429, "rate_limit_error", headers={"retry-after": "7"}),
    StatusReply(500, "api_error"),
    StatusReply(503, "overloaded_error", headers={"retry-after-ms": "1500"}),
]


@pytest.mark.parametrize("kind", KINDS)
async def test_an_error_status_classifies_as_through_the_sdk(
    kind: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    templated = provider(kind, fake_openai, fake_anthropic)
    sdk = provider(kind, fake_openai, fake_anthropic)
    # The second provider sends every request through its SDK, as before templates.
    monkeypatch.setattr(sdk.sender, "template", no_template)
    fake = fake_for(kind, fake_openai, fake_anthropic)
    seen: list[tuple[Any, ...]] = []
    try:
        assert await templated.sender.template(path_of(templated, generation())) is not None
        for reply in STATUSES:
            for p in (templated, sdk):
                fake.enqueue(reply)
                with pytest.raises(GatewayError) as caught:
                    await run(p, generation())
                e = caught.value
                seen.append((p is sdk, reply.status, e.code, e.message, e.retry_after, e.provider_http_status))
    finally:
        await templated.aclose()
        await sdk.aclose()
    through_template = [s[1:] for s in seen if not s[0]]
    through_sdk = [s[1:] for s in seen if s[0]]
    assert through_template == through_sdk
    assert [s[0] for s in through_template] == [r.status for r in STATUSES]
    assert {s[1].name for s in through_template} >= {"PROVIDER_AUTH_FAILED", "PROVIDER_RATE_LIMITED"}


async def test_a_redirect_goes_through_the_sdk(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> None:
    p = provider("openai", fake_openai, fake_anthropic)
    fake_openai.enqueue(StatusReply(307, headers={"location": fake_openai.base_url + "/chat/completions"}))
    try:
        events = await run(p, generation())
    finally:
        await p.aclose()
    assert isinstance(events[-1], Finished)
    # The template's request got the redirect; the SDK sent the request again (the next reply is 200).
    assert [r.status for r in fake_openai.requests] == [307, 200]
    # A path that redirected once keeps the SDK's path: its body is not sent twice on every request.
    assert p.sender._templates["/chat/completions"] is None


async def test_cookies_the_provider_sets_are_kept_and_sent_as_the_sdk_would(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    p = provider("openai", fake_openai, fake_anthropic)
    fake_openai.enqueue(StatusReply(429, headers={"set-cookie": "lb=node-7; Path=/"}), StreamReply())
    try:
        with pytest.raises(GatewayError):
            await run(p, generation())
        events = await run(p, generation())
        template = p.sender._templates["/chat/completions"]
    finally:
        await p.aclose()
    assert isinstance(events[-1], Finished) and template is not None, "both went through the template"
    assert "cookie" not in fake_openai.requests[0].headers
    assert fake_openai.requests[1].headers.get("cookie") == "lb=node-7"


async def test_a_base_url_with_a_user_and_password_keeps_the_sdk_path(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    url = fake_openai.base_url.replace("http://", "http://user:secret-pass@")
    p = provider("openai-compatible", fake_openai, fake_anthropic, options={"base_url": url})
    try:
        assert await p.sender.template("/chat/completions") is None
    finally:
        await p.aclose()


async def test_a_template_shows_no_credential_in_its_repr(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    p = provider("openai", fake_openai, fake_anthropic)
    try:
        template = await p.sender.template("/chat/completions")
    finally:
        await p.aclose()
    assert template is not None and p.settings.api_key and p.settings.api_key not in repr(template)


async def test_many_first_requests_at_once_share_the_route(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    p = provider("openai", fake_openai, fake_anthropic)
    fake_openai.default = StreamReply()
    try:
        results = await asyncio.gather(*(run(p, generation(f"q{i}")) for i in range(20)))
    finally:
        await p.aclose()
    assert all(isinstance(events[-1], Finished) for events in results)
    assert len(p.sender._templates) == 1
    assert isinstance(p.sender._templates["/chat/completions"].url, httpx2.URL)


async def test_credentials_the_sdk_makes_per_request_keep_the_sdk_path(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    async def key() -> str:
        return fake_openai.api_key

    async def ad_token() -> str:
        return "an-azure-ad-token"

    made = [
        openai.AsyncOpenAI(api_key=key, base_url=fake_openai.base_url),
        openai.AsyncAzureOpenAI(
            azure_ad_token_provider=ad_token, azure_endpoint=fake_openai.azure_endpoint, api_version="2024-10-21"
        ),
    ]
    static = openai.AsyncOpenAI(api_key="k", base_url=fake_openai.base_url)
    try:
        assert [credentials_per_request(c) for c in made] == [True, True]
        assert not credentials_per_request(static)
        assert not per_request_headers(anthropic.AsyncAnthropic(api_key="k", base_url=fake_anthropic.base_url))
        # A route with such credentials (here: its trace context upstream) sends through the SDK.
        p = provider("anthropic", fake_openai, fake_anthropic, trace_upstream=True)
        try:
            assert await p.sender.template("/v1/messages") is None
            assert isinstance((await run(p, generation()))[-1], Finished)
        finally:
            await p.aclose()
    finally:
        for c in [*made, static]:
            await c.close()
