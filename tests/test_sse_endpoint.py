"""The `sse-endpoint` adapter's own checks: its options, the body template, JSON pointers, cumulative
text, named end and error events, and a body without an end marker. (End to end, against seed 003's
flow shape, it runs in tests/test_conformance.py.)"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest
from fakes.flow import FakeFlow, flow_url

from service.config import ConfigError, build_routes
from service.errors import ErrorCode, GatewayError
from service.events import ChatMessage, FinishReason, GenerationRequest, Role, TextDelta
from service.providers.sse_endpoint import SSEEndpointProvider, compile_pointer, resolve

URL = "http://127.0.0.1:9/flow"


def provider(**options: Any) -> SSEEndpointProvider:
    table = {"url": URL, "end_pointer": "/done"} | options
    route = build_routes({"r": {"provider": "sse-endpoint", "model": "flow-1", "options": table}}, "test")["r"]
    p = SSEEndpointProvider(route)
    return p


def conversation() -> GenerationRequest:
    return GenerationRequest(
        stream_id="s-1",
        route="r",
        upstream_model="flow-1",
        messages=(
            ChatMessage(Role.SYSTEM, "Be brief."),
            ChatMessage(Role.USER, "Hi"),
            ChatMessage(Role.ASSISTANT, "Hello"),
            ChatMessage(Role.USER, 'What is "SSE"?'),
        ),
    )


def feed(p: SSEEndpointProvider, events: list[tuple[bytes, bytes]]) -> tuple[str, Any]:
    parser = p._parser(conversation())
    for name, data in events:
        parser.handle(name, data)
        if parser.done:
            break
    text = "".join(e.text for e in parser.out if isinstance(e, TextDelta))
    return text, parser.finish()


def test_the_body_template_takes_the_conversation() -> None:
    template = {
        "in-0": "{prompt}",
        "in-1": "{system} / {model}",
        "history": "{conversation}",
        "messages": "{messages}",
        "nested": {"list": ["{prompt}", 3, True]},
        "literal": "no {braces} here are kept",
    }
    with pytest.raises(ConfigError, match="unknown placeholder"):
        provider(body=template)
    del template["literal"]
    body = orjson.loads(provider(body=template).request_body(conversation()))
    assert body["in-0"] == 'What is "SSE"?'
    assert body["in-1"] == "Be brief. / flow-1"
    assert body["history"] == 'user: Hi\nassistant: Hello\nuser: What is "SSE"?'
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["nested"] == {"list": ['What is "SSE"?', 3, True]}


def test_options_are_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="url"):
        provider(url="ftp://x")
    with pytest.raises(ConfigError, match="JSON pointer"):
        provider(text_pointer="outputs.out-0")
    with pytest.raises(ConfigError, match="end is not described"):
        provider(end_pointer="")
    with pytest.raises(ConfigError, match="FLOW_KEY_UNSET"):
        provider(api_key_env="FLOW_KEY_UNSET")
    with pytest.raises(ConfigError, match="unknown option"):
        provider(text_path="/x")
    monkeypatch.setenv("FLOW_KEY", "k-123")
    assert provider(api_key_env="FLOW_KEY").headers["authorization"] == "Bearer k-123"
    bare = provider(api_key_env="FLOW_KEY", auth_header="X-Api-Key", auth_scheme="")
    assert bare.headers["x-api-key"] == "k-123"


def test_json_pointers_follow_rfc_6901() -> None:
    doc = {"a/b": {"m~n": [10, {"": "empty"}]}}
    assert resolve(doc, compile_pointer("/a~1b/m~0n/0", "r", "k")) == 10
    assert resolve(doc, compile_pointer("/a~1b/m~0n/1/", "r", "k")) == "empty"
    assert resolve(doc, compile_pointer("/a~1b/m~0n/7", "r", "k")) is resolve(doc, compile_pointer("/x", "r", "k"))


def test_cumulative_text_is_sent_as_deltas() -> None:
    p = provider(text_mode="cumulative", text_pointer="/outputs/out-0")
    events = [(b"", b'{"outputs": {"out-0": "%s"}}' % t) for t in (b"He", b"Hell", b"Hello")]
    text, finish = feed(p, [*events, (b"", b'{"done": "complete"}')])
    assert text == "Hello" and (finish.reason, finish.raw_reason) == (FinishReason.STOP, "complete")
    with pytest.raises(ValueError, match="shrank"):
        feed(p, [(b"", b'{"outputs": {"out-0": "Hello"}}'), (b"", b'{"outputs": {"out-0": "He"}}')])


def test_named_end_and_error_events_and_a_done_line() -> None:
    p = provider(end_pointer="", end_event="end", finish_reason_pointer="/why")
    text, finish = feed(p, [(b"", b'{"text": "a"}'), (b"end", b'{"why": "length"}')])
    assert text == "a" and finish.reason is FinishReason.LENGTH
    with pytest.raises(GatewayError) as caught:
        feed(p, [(b"", b'{"text": "a"}'), (b"error", b"the flow failed")])
    assert caught.value.code is ErrorCode.PROVIDER_ERROR
    with pytest.raises(GatewayError) as caught:
        feed(p, [(b"", b'{"error": {"type": "rate_limit_error", "message": "slow down"}}')])
    assert caught.value.code is ErrorCode.PROVIDER_RATE_LIMITED
    done = provider(end_pointer="", end_data="[DONE]")
    assert feed(done, [(b"", b'{"text": "x"}'), (b"", b"[DONE]")])[1].raw_reason == "end"


def test_no_end_marker_is_truncated_unless_the_route_says_the_close_is_the_end() -> None:
    with pytest.raises(GatewayError) as caught:
        feed(provider(), [(b"", b'{"text": "a"}')])
    assert caught.value.code is ErrorCode.PROVIDER_STREAM_TRUNCATED
    text, finish = feed(provider(end_pointer="", end_on_close=True), [(b"", b'{"text": "a"}')])
    assert text == "a" and finish.raw_reason == "eof"


async def test_the_request_reaches_the_flow_as_seed_003_shows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    async with FakeFlow() as fake:
        monkeypatch.setenv("FLOW_KEY", fake.api_key)
        p = provider(
            url=flow_url(fake.origin),
            api_key_env="FLOW_KEY",
            body={"in-0": "{prompt}", "user_id": "u-1"},
            text_pointer="/outputs/out-0",
        )
        try:
            events = [e async for e in p.stream(conversation())]
        finally:
            await p.aclose()
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello, world!"
        sent = fake.requests[0]
        assert sent.query == {"flow_id": "65f1c0ffee", "org": "org-fake"}
        assert sent.body == {"in-0": 'What is "SSE"?', "user_id": "u-1"}
        assert sent.headers["accept"] == "text/event-stream"


def test_the_readme_example_route_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```toml sse-endpoint\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("STACK_AI_PUBLIC_KEY", "k")
    routes = build_routes(tomllib.loads(block)["routes"], "README")
    p = SSEEndpointProvider(routes["support-flow"])
    assert p.options.url.startswith("https://www.stack-inference.com/stream_exported_flow?")
    assert orjson.loads(p.request_body(conversation())) == {"in-0": 'What is "SSE"?', "user_id": "tokenwire"}
