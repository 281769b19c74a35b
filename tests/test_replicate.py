"""The Replicate adapter's own checks against its fake (a real server on 127.0.0.1): the two steps
of a prediction, stream URLs on other hosts, `done` reasons that are failures, logs, ids, cancel,
usage from metrics or left to the estimate, problem-details errors, the input's field names and the
README's example. End to end it also runs in tests/test_conformance.py."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fakes.replicate import MODEL, VERSION, FakeReplicate
from fakes.replies import StatusReply, StreamReply, Usage

from conftest import collect, request
from service.config import ConfigError, build_routes
from service.errors import ErrorCode, GatewayError
from service.events import ChatMessage, Finished, FinishReason, GenerationRequest, ProviderEvent, Role, TextDelta
from service.providers.replicate import EventDecoder, ReplicateOptions, ReplicateProvider, StreamParser, build_input
from tokenwire.v1 import generation_pb2 as pb

ENV = "TOKENWIRE_TEST_REPLICATE_TOKEN"


def provider(base_url: str, model: str = MODEL, **options: Any) -> ReplicateProvider:
    table = {"base_url": base_url, "api_key_env": ENV, "read_timeout_seconds": 2.0} | options
    route = build_routes({"r": {"provider": "replicate", "model": model, "options": table}}, "test")["r"]
    return ReplicateProvider(route)


def ask(*messages: ChatMessage, **fields: Any) -> GenerationRequest:
    if not messages:
        messages = (ChatMessage(Role.USER, "Tell me about streaming."),)
    return GenerationRequest(stream_id="s-1", route="r", upstream_model=MODEL, messages=messages, **fields)


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeReplicate]:
    async with FakeReplicate() as server:
        monkeypatch.setenv(ENV, server.api_key)
        yield server


async def run(p: ReplicateProvider, req: GenerationRequest | None = None) -> tuple[list[ProviderEvent], Any]:
    """Every event of one stream, and the GatewayError that ended it (None when it finished)."""
    events: list[ProviderEvent] = []
    try:
        async for event in p.stream(req or ask()):
            events.append(event)
    except GatewayError as exc:
        return events, exc
    return events, None


def text(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# --- the two steps -------------------------------------------------------------------------------


async def test_a_prediction_is_created_then_its_stream_url_is_read(fake: FakeReplicate) -> None:
    fake.enqueue(StreamReply(text=["Hel", "lo"], usage=Usage(input_tokens=9, output_tokens=2)))
    p = provider(fake.base_url)
    req = ask(
        ChatMessage(Role.SYSTEM, "Be brief."),
        ChatMessage(Role.USER, "Hi"),
        max_output_tokens=64,
        temperature=0.2,
        top_p=0.9,
        stop_sequences=("END", "STOP"),
    )
    events, error = await run(p, req)
    await p.aclose()
    assert error is None and text(events) == "Hello"
    finished = events[-1]
    assert isinstance(finished, Finished)
    (create,) = fake.requests
    (prediction_id,) = fake.predictions
    assert (finished.reason, finished.raw_reason) == (FinishReason.STOP, "done")
    assert finished.provider_request_id == prediction_id and finished.provider_model == MODEL
    assert finished.usage is not None and (finished.usage.input_tokens, finished.usage.output_tokens) == (9, 2)
    assert (create.method, create.path) == ("POST", f"/v1/models/{MODEL}/predictions")
    assert create.headers["authorization"] == f"Bearer {fake.api_key}"
    assert create.body == {
        "input": {
            "prompt": "Hi",
            "system_prompt": "Be brief.",
            "max_tokens": 64,
            "temperature": 0.2,
            "top_p": 0.9,
            "stop_sequences": "END,STOP",
        },
        "stream": True,
    }
    (stream,) = fake.streams
    assert stream.path == f"/v1/streams/{prediction_id}"
    assert stream.headers["accept"] == "text/event-stream" and stream.headers["cache-control"] == "no-store"
    assert fake.gets == [prediction_id] and fake.cancels == []


@pytest.mark.parametrize(
    ("model", "options"),
    [
        (f"meta/llama:{VERSION}", {}),
        (VERSION, {}),
        ("meta/llama", {"version": VERSION}),
    ],
)
async def test_a_version_is_run_through_the_predictions_endpoint(
    fake: FakeReplicate, model: str, options: dict[str, Any]
) -> None:
    p = provider(fake.base_url, model, **options)
    events, error = await run(p)
    await p.aclose()
    assert error is None and text(events) == "Hello, world!"
    (create,) = fake.requests
    assert create.path == "/v1/predictions" and create.body["version"] == VERSION


async def test_a_stream_url_on_another_host_is_refused_and_the_prediction_cancelled(fake: FakeReplicate) -> None:
    fake.stream_origin = f"http://127.0.0.2:{fake.port}"
    p = provider(fake.base_url)
    events, error = await run(p)
    await p.aclose()
    assert events == [] and error is not None and error.code is ErrorCode.PROVIDER_PROTOCOL_ERROR
    assert "stream_hosts" in error.message
    assert fake.streams == []
    assert [c[0] for c in fake.cancels] == list(fake.predictions)


def test_which_hosts_a_url_may_point_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "r8_unit-test-token-0001")
    own = provider("https://api.replicate.com").origins
    assert own.allows("https://stream.replicate.com/v1/files/abc")
    assert own.allows("https://streaming-api.svc.rno2.c.replicate.net/v1/streams/abc")
    assert not own.allows("http://stream.replicate.com/v1/files/abc"), "plain http to a stream host"
    assert not own.allows("https://replicate.com.evil.example/x")
    assert not own.allows("https://user@stream.replicate.com/x")
    assert not own.allows("https://169.254.169.254/latest/meta-data")
    assert own.allows("https://STREAM.replicate.com:443/v1/files/abc")
    assert not own.allows("https://stream.replicate.com:8443/v1/files/abc"), "another port"
    assert not own.allows("https://evil.example\\x.replicate.com/x"), "hosts the parsers read apart"
    assert not own.allows("https://stream.replicate.com/v1/\tfiles"), "a URL the transport refuses"
    assert not own.allows("https://stream.replicate.com /x")
    proxy = provider("http://10.0.0.5:8080", stream_hosts="streams.internal, .cdn.example, http://10.0.0.6:81").origins
    assert proxy.allows("http://10.0.0.5:8080/v1/streams/x")
    assert not proxy.allows("http://10.0.0.5:8081/v1/streams/x")
    assert not proxy.allows("https://stream.replicate.com/v1/files/abc"), "Replicate's hosts only with its base"
    assert proxy.allows("https://streams.internal/x") and proxy.allows("https://a.cdn.example/x")
    assert proxy.allows("http://10.0.0.6:81/x") and not proxy.allows("http://streams.internal/x")


async def test_a_caller_who_leaves_during_the_create_has_the_prediction_cancelled(fake: FakeReplicate) -> None:
    fake.create_delay = 0.3
    p = provider(fake.base_url)
    task = asyncio.create_task(run(p))
    await fake.wait_requests(1)
    left_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - left_at < 0.1, "the caller waited for the create"
    assert fake.cancels == [] and len(fake.predictions) == 1, "the create had not been answered yet"
    for _ in range(200):
        if fake.cancels:
            break
        await asyncio.sleep(0.01)
    await p.aclose()
    assert [c[0] for c in fake.cancels] == list(fake.predictions) and len(fake.cancels) == 1
    assert fake.streams == [], "the stream of a prediction nobody reads was opened"


async def test_a_model_that_cannot_stream_is_rejected_and_its_prediction_cancelled(fake: FakeReplicate) -> None:
    fake.streaming = False
    p = provider(fake.base_url)
    events, error = await run(p)
    await fake.wait_requests(1)
    for _ in range(100):
        if fake.cancels:
            break
        await asyncio.sleep(0.01)
    await p.aclose()
    assert events == [] and error is not None and error.code is ErrorCode.PROVIDER_REJECTED_REQUEST
    assert len(fake.cancels) == 1


# --- events --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["canceled", "error"])
async def test_done_with_reason_canceled_or_error_is_an_error_not_a_finish(fake: FakeReplicate, reason: str) -> None:
    fake.enqueue(StreamReply(text=["partial"], finish=reason))
    p = provider(fake.base_url)
    events, error = await run(p)
    await p.aclose()
    assert [type(e) for e in events] == [TextDelta]
    assert error is not None and error.code is ErrorCode.PROVIDER_UNAVAILABLE and reason[:5] in error.message
    assert fake.cancels == [], "the prediction had already ended"


async def test_an_error_event_is_mapped_with_its_detail(fake: FakeReplicate) -> None:
    fake.enqueue(StreamReply(text=["a", "b"], fault="error_event", fault_after=1, error_message="CUDA out of memory"))
    p = provider(fake.base_url)
    events, error = await run(p)
    await p.aclose()
    assert text(events) == "a"
    assert error is not None and error.code is ErrorCode.PROVIDER_UNAVAILABLE and "CUDA out of memory" in error.message


async def test_logs_are_skipped_and_whitespace_tokens_kept(fake: FakeReplicate) -> None:
    fake.enqueue(StreamReply(text=["One", " ", "line\nnext", "\n"]))
    p = provider(fake.base_url)
    events, error = await run(p)
    await p.aclose()
    assert error is None and text(events) == "One line\nnext\n"
    assert "Loading" not in text(events)


def decode(*chunks: bytes) -> tuple[str, Any]:
    decoder, parser = EventDecoder(), StreamParser("replicate")
    try:
        for chunk in chunks:
            for name, data in decoder.feed(chunk):
                parser.handle(name, data)
        for name, data in decoder.close():
            parser.handle(name, data)
        return text(parser.out), parser.finish()
    except GatewayError as exc:
        return text(parser.out), exc


def test_the_decoder_keeps_ids_across_chunks_crlf_and_a_bom() -> None:
    body = (
        b"\xef\xbb\xbf: keep-alive\r\n\r\nevent: logs\r\nid: 1:0\r\ndata: loading\r\n\r\n"
        b"event: output\r\nid: 1:1\r\ndata: Hi\r\n\r\nevent: output\r\nid: 1:2\r\ndata: \r\n\r\n"
        b"event: done\r\nid: 1:3\r\ndata: {}\r\n\r\n"
    )
    for size in (1, 2, 5, len(body)):
        got, finished = decode(*(body[i : i + size] for i in range(0, len(body), size)))
        assert got == "Hi" and isinstance(finished, Finished) and finished.raw_reason == "done"
    decoder, parser = EventDecoder(), StreamParser("replicate")
    for name, data in decoder.feed(body):
        parser.handle(name, data)
    assert parser.last_id == b"1:3"


def test_an_event_without_an_id_or_a_stream_without_done_never_looks_finished() -> None:
    _, error = decode(b"event: output\ndata: Hi\n\nevent: done\ndata: {}\n\n")
    assert isinstance(error, GatewayError) and error.code is ErrorCode.PROVIDER_PROTOCOL_ERROR
    _, error = decode(b"event: output\nid: 1:7\ndata: Hi\n\n")
    assert isinstance(error, GatewayError) and error.code is ErrorCode.PROVIDER_STREAM_TRUNCATED
    assert "last event id 1:7" in error.message
    # A reason Replicate does not document is no success (`failed`, `aborted`, one yet to come).
    for reason in (b"failed", b"aborted", b"later"):
        got, error = decode(
            b'event: output\nid: 1\ndata: Hi\n\nevent: done\nid: 2\ndata: {"reason": "' + reason + b'"}\n\n'
        )
        assert got == "Hi" and isinstance(error, GatewayError) and error.code is ErrorCode.PROVIDER_ERROR
        assert reason.decode() in error.message
    got, finished = decode(b"event: output\nid: 1\ndata: Hi\n\nevent: done\nid: 2\ndata: {}\n\n")
    assert got == "Hi" and (finished.reason, finished.raw_reason) == (FinishReason.STOP, "done")


async def test_done_but_the_prediction_says_failed_is_an_error(fake: FakeReplicate) -> None:
    fake.final_status = "failed"
    p = provider(fake.base_url)
    events, error = await run(p)
    await p.aclose()
    assert text(events) == "Hello, world!" and not any(isinstance(e, Finished) for e in events)
    assert error is not None and "status failed" in error.message


# --- cancel --------------------------------------------------------------------------------------


async def test_leaving_closes_the_stream_and_cancels_the_prediction_at_once(fake: FakeReplicate) -> None:
    fake.enqueue(StreamReply(text=[f"t{i} " for i in range(300)], interval=0.01))
    p = provider(fake.base_url)
    stream = p.stream(ask())
    seen = 0
    async for event in stream:
        seen += isinstance(event, TextDelta)
        if seen == 3:
            break
    left_at = time.monotonic()
    await stream.aclose()
    closing = time.monotonic() - left_at
    disconnected = await fake.wait_disconnected(timeout=2.0) - left_at
    for _ in range(100):
        if fake.cancels:
            break
        await asyncio.sleep(0.005)
    await p.aclose()
    assert closing < 0.2 and disconnected < 0.2
    ((prediction_id, cancelled_at),) = fake.cancels
    assert prediction_id in fake.predictions and cancelled_at - left_at < 0.2
    assert fake.predictions[prediction_id].status == "canceled" and p.cancels.sent == 1


async def test_a_task_cancel_before_the_first_token_cancels_the_prediction(fake: FakeReplicate) -> None:
    fake.enqueue(StreamReply(first_delay=5.0))
    p = provider(fake.base_url)

    async def consume() -> None:
        async for _ in p.stream(ask()):
            pass

    task = asyncio.create_task(consume())
    await fake.wait_requests(1)
    await asyncio.sleep(0.1)
    cancelled_at = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await fake.wait_disconnected(timeout=2.0) - cancelled_at < 0.2
    for _ in range(100):
        if fake.cancels:
            break
        await asyncio.sleep(0.005)
    await p.aclose()
    assert len(fake.cancels) == 1 and fake.cancels[0][1] - cancelled_at < 0.2


async def test_a_cut_stream_cancels_the_prediction(fake: FakeReplicate) -> None:
    fake.enqueue(StreamReply(text=["a", "b", "c"], fault="reset", fault_after=1))
    p = provider(fake.base_url)
    events, error = await run(p)
    for _ in range(100):
        if fake.cancels:
            break
        await asyncio.sleep(0.01)
    await p.aclose()
    assert text(events) == "a" and error is not None and error.code is ErrorCode.PROVIDER_STREAM_TRUNCATED
    assert len(fake.cancels) == 1


# --- usage ---------------------------------------------------------------------------------------


async def test_without_metrics_usage_is_unknown_and_the_gateway_marks_it_estimated(
    fake: FakeReplicate, start_server: Any
) -> None:
    fake.enqueue(StreamReply(text=["four words of text"], usage=None))
    p = provider(fake.base_url)
    events, error = await run(p)
    await p.aclose()
    assert error is None and isinstance(events[-1], Finished) and events[-1].usage is None
    fake.enqueue(StreamReply(text=["four words of text"], usage=None))
    options = {"base_url": fake.base_url, "api_key_env": ENV}
    running = await start_server(routes={"rep": {"provider": "replicate", "model": MODEL, "options": options}})
    messages, code, _ = await collect(running.stub.Generate(request(model="rep")))
    assert code == grpc.StatusCode.OK
    usage = messages[-1].finish.usage
    assert usage.source == pb.USAGE_SOURCE_ESTIMATED and usage.output_tokens > 0 and usage.input_tokens > 0


async def test_the_prediction_is_read_again_until_it_settles(fake: FakeReplicate) -> None:
    fake.enqueue(StreamReply(usage=Usage(input_tokens=4, output_tokens=3)))
    fake.unsettled_gets = 2
    p = provider(fake.base_url)
    events, error = await run(p)
    await p.aclose()
    finished = events[-1]
    assert error is None and isinstance(finished, Finished) and finished.usage is not None
    assert (finished.usage.input_tokens, finished.usage.output_tokens) == (4, 3)
    assert len(fake.gets) == 3


async def test_fetch_usage_off_reads_no_prediction(fake: FakeReplicate) -> None:
    p = provider(fake.base_url, fetch_usage=False)
    events, error = await run(p)
    await p.aclose()
    assert error is None and isinstance(events[-1], Finished) and events[-1].usage is None
    assert fake.gets == []


async def test_a_slow_prediction_read_leaves_usage_unknown_within_its_bound(
    fake: FakeReplicate, monkeypatch: pytest.MonkeyPatch
) -> None:
    respond = fake._respond
    gets: list[float] = []

    async def slow_get(conn: Any, incoming: Any) -> bool:
        # The prediction's get answers only after 1 s: the Finish must not wait for it.
        if incoming.method == "GET" and incoming.target.startswith("/v1/predictions/"):
            gets.append(time.monotonic())
            await asyncio.sleep(1.0)
        return await respond(conn, incoming)

    monkeypatch.setattr(fake, "_respond", slow_get)
    p = provider(fake.base_url, usage_timeout_seconds=0.1)
    started = time.monotonic()
    events, error = await run(p)
    elapsed = time.monotonic() - started
    await p.aclose()
    assert error is None and isinstance(events[-1], Finished) and events[-1].usage is None
    assert len(gets) == 1 and elapsed < 0.8


# --- errors before the stream --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "http_text"),
    [
        (401, ErrorCode.PROVIDER_AUTH_FAILED, "credentials"),
        (402, ErrorCode.PROVIDER_AUTH_FAILED, "Insufficient credit"),
        (404, ErrorCode.PROVIDER_REJECTED_REQUEST, "does not know this model"),
        (422, ErrorCode.PROVIDER_REJECTED_REQUEST, "input.max_tokens: must be less than 4096"),
        (429, ErrorCode.PROVIDER_RATE_LIMITED, "Request was throttled"),
        (500, ErrorCode.PROVIDER_UNAVAILABLE, "failing"),
        (503, ErrorCode.PROVIDER_UNAVAILABLE, "failing"),
    ],
)
async def test_problem_details_errors_are_mapped(
    fake: FakeReplicate, status: int, code: ErrorCode, http_text: str
) -> None:
    fake.enqueue(
        StatusReply(status, message="- input.max_tokens: must be less than 4096", headers={"retry-after": "3"})
    )
    p = provider(fake.base_url)
    events, error = await run(p)
    await p.aclose()
    assert events == [] and error is not None and error.code is code and error.provider_http_status == status
    assert http_text in error.message
    assert fake.api_key not in error.message
    if status == 429:
        assert error.retry_after == 3.0
    assert len(fake.requests) == 1 and fake.streams == [] and fake.cancels == []


# --- the input and the options -------------------------------------------------------------------


def test_the_input_takes_the_conversation_under_the_routes_field_names() -> None:
    conversation = (
        ChatMessage(Role.SYSTEM, "Be brief."),
        ChatMessage(Role.USER, "Hi"),
        ChatMessage(Role.ASSISTANT, "Hello"),
        ChatMessage(Role.USER, "Why?"),
    )
    default = build_input(ask(*conversation), ReplicateOptions())
    assert default == {
        "prompt": "User: Hi\n\nAssistant: Hello\n\nUser: Why?\n\nAssistant:",
        "system_prompt": "Be brief.",
    }
    options = ReplicateOptions(
        system_field="", max_tokens_field="max_new_tokens", stop_format="list", temperature_field="", seed_field=""
    )
    got = build_input(
        ask(*conversation[:2], max_output_tokens=5, stop_sequences=("a", "b"), temperature=1.0, seed=3), options
    )
    assert got == {"prompt": "Be brief.\n\nHi", "max_new_tokens": 5, "stop_sequences": ["a", "b"]}


def test_options_are_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "r8_unit-test-token-0001")
    with pytest.raises(ConfigError, match="owner/name"):
        provider("https://api.replicate.com", "not a model")
    with pytest.raises(ConfigError, match="stream_hosts"):
        provider("https://api.replicate.com", stream_hosts="ftp://x")
    with pytest.raises(ConfigError, match="base_url"):
        provider("api.replicate.com")
    monkeypatch.delenv(ENV)
    with pytest.raises(ConfigError, match=ENV):
        provider("https://api.replicate.com")


def test_the_readme_example_routes_start(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```toml replicate\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_readme-test-token-0001")
    routes = build_routes(tomllib.loads(block)["routes"], "README")
    built = {name: ReplicateProvider(route) for name, route in routes.items()}
    assert {name: p.create_path for name, p in built.items()} == {
        "llama": "/v1/models/meta/meta-llama-3-70b-instruct/predictions",
        "pinned": "/v1/predictions",
    }


def test_the_sdk_is_imported_only_when_a_replicate_route_is_built() -> None:
    script = (
        "import os, sys\n"
        "from service.config import build_routes\n"
        "from service.providers import create_provider\n"
        "import service.providers.replicate\n"
        "before = 'replicate' in sys.modules\n"
        f"os.environ[{ENV!r}] = 'r8_lazy-import-token-0001'\n"
        f"table = {{'provider': 'replicate', 'model': 'a/b', 'options': {{'api_key_env': {ENV!r}}}}}\n"
        "route = build_routes({'r': table}, 't')['r']\n"
        "create_provider(route)\n"
        "print(before, 'replicate' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_a_stop_sequence_with_a_comma_is_refused_when_they_go_as_one_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "r8_unit-test-token-0001")
    options = provider("https://api.replicate.com").options
    with pytest.raises(GatewayError) as refused:
        build_input(ask(stop_sequences=("a,b",)), options)
    assert refused.value.code is ErrorCode.INVALID_REQUEST and "comma" in refused.value.message
    assert build_input(ask(stop_sequences=("a", "b")), options)["stop_sequences"] == "a,b"
    listed = provider("https://api.replicate.com", stop_format="list").options
    assert build_input(ask(stop_sequences=("a,b",)), listed)["stop_sequences"] == ["a,b"]


def test_options_that_cannot_work_are_refused_when_the_server_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "r8_unit-test-token-0001")
    with pytest.raises(ConfigError, match="prompt_field"):
        provider("https://api.replicate.com", prompt_field="")
    with pytest.raises(ConfigError, match=r"'\.cdn\.example', without \*"):
        provider("https://api.replicate.com", stream_hosts="*.cdn.example")


async def test_an_unsettled_prediction_is_read_again_less_and_less_often(fake: FakeReplicate) -> None:
    fake.unsettled_gets = 4
    fake.enqueue(StreamReply(text=["Hi"], usage=Usage(input_tokens=3, output_tokens=1)))
    p = provider(fake.base_url, usage_timeout_seconds=5.0)
    events, error = await run(p)
    await p.aclose()
    assert error is None and isinstance(events[-1], Finished) and events[-1].usage is not None
    assert len(fake.gets) == 5
    gaps = [b - a for a, b in zip(fake.get_times, fake.get_times[1:], strict=False)]
    # Each wait is at least the one it is meant to be: 0.1 s, then doubling up to 0.8 s.
    assert all(gap >= 0.095 * min(2**i, 8) for i, gap in enumerate(gaps)), gaps
