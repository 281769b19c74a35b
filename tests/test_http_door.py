"""The HTTP door against a real server on 127.0.0.1:0: the real `openai` SDK, raw HTTP, and the
native SSE stream with resume, polling and cancel."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import ClientSession, ClientTimeout
from fakes import FakeOpenAI, ResetReply, StatusReply, StreamReply, ToolCallScript
from redis_server import running_redis

from conftest import TEST_ROUTES, Recorder, Running, eventually, vendor_route

pytestmark = pytest.mark.timeout(30)

LONG = {"first_token_ms": 1, "tokens_per_second": 50, "answer_tokens": 500}
HTTP_ROUTES = TEST_ROUTES | {
    "long": {"provider": "simulated", "model": "m", "options": LONG},
    "quiet": {"provider": "simulated", "model": "m", "options": {"stall_after_chunks": 2, "stall_seconds": 0.6}},
}
USER: Any = [{"role": "user", "content": "Tell me about streaming."}]


def base_url(running: Running) -> str:
    assert running.server.http is not None
    return f"http://127.0.0.1:{running.server.http.port}"


@pytest.fixture
async def door(start_server: Callable[..., Any]) -> Running:
    running: Running = await start_server(HTTP_ROUTES, http_listen="127.0.0.1:0")
    return running


@pytest.fixture
async def sdk(door: Running) -> Any:
    client = openai.AsyncOpenAI(base_url=base_url(door) + "/v1", api_key="not-checked", max_retries=0)
    yield client
    await client.close()


async def sse(response: Any) -> list[dict[str, str]]:
    """The events of an SSE body: each a dict of its fields (comments under ':')."""
    events: list[dict[str, str]] = []
    block: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if block:
                events.append(block)
            block = {}
            continue
        field, _, value = line.partition(":")
        block[field] = block.get(field, "") + value.removeprefix(" ")
    return events


# -- the OpenAI SDK -----------------------------------------------------------------------------


async def test_sdk_streams_text_and_usage_comes_last(sdk: Any) -> None:
    stream = await sdk.chat.completions.create(
        model="sim", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("A ") and len(text) > 100
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


async def test_sdk_without_stream_gets_one_completion(sdk: Any) -> None:
    completion = await sdk.chat.completions.create(model="sim", messages=USER, max_tokens=50, temperature=0.5, seed=7)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content.startswith("A ")
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_sdk_lists_the_routes(sdk: Any) -> None:
    models = [m.id async for m in sdk.models.list()]
    assert "sim" in models and "long" in models


async def test_sdk_streams_parallel_tool_calls_keyed_by_index(
    start_server: Callable[..., Any], fake_openai: FakeOpenAI
) -> None:
    fake_openai.enqueue(
        StreamReply(
            text=(),
            tool_calls=(
                ToolCallScript("call_a", "weather", ['{"city":', '"Paris"}']),
                ToolCallScript("call_b", "time", ['{"tz":', '"CET"}']),
            ),
        )
    )
    running = await start_server({"gpt": vendor_route(fake_openai)}, http_listen="127.0.0.1:0")
    tools: Any = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("weather", "time")
    ]
    messages: Any = [
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c0", "type": "function", "function": {"name": "time", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "c0", "content": "12:00"},
    ]  # fmt: skip
    async with openai.AsyncOpenAI(base_url=base_url(running) + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt", messages=messages, tools=tools, tool_choice="auto", stream=True, stop=["\n\n"]
        )
        calls: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for delta in choice.delta.tool_calls or ():
                    call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += delta.id or ""
                    call["name"] += (delta.function.name or "") if delta.function else ""
                    call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert calls == {
        0: {"id": "call_a", "name": "weather", "arguments": '{"city":"Paris"}'},
        1: {"id": "call_b", "name": "time", "arguments": '{"tz":"CET"}'},
    }
    assert finish == "tool_calls"
    # What reached the provider: the tool call and its result, the tools, the stop sequence.
    sent = fake_openai.requests[-1].body
    assert sent["messages"][1]["tool_calls"][0]["id"] == "c0" and sent["messages"][2]["tool_call_id"] == "c0"
    assert [t["function"]["name"] for t in sent["tools"]] == ["weather", "time"] and sent["stop"] == ["\n\n"]


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("error_event", "provider_unavailable"),
        ("reset", "provider_stream_truncated"),
        ("eof", "provider_stream_truncated"),
        ("malformed", "provider_protocol_error"),
        ("stall", "provider_timeout"),
    ],
)
async def test_an_upstream_fault_mid_stream_is_an_error_never_done(
    start_server: Callable[..., Any], fake_openai: FakeOpenAI, fault: str, code: str
) -> None:
    fake_openai.enqueue(StreamReply(text=("one", " two", " three"), fault=fault, fault_after=2, stall_seconds=5))
    running = await start_server(
        {"gpt": vendor_route(fake_openai, read_timeout_seconds=0.5)}, http_listen="127.0.0.1:0"
    )
    async with (
        ClientSession() as session,
        session.post(
            base_url(running) + "/v1/chat/completions", json={"model": "gpt", "messages": USER, "stream": True}
        ) as response,
    ):
        assert response.status == 200
        events = await sse(response)
    data = [e["data"] for e in events if "data" in e]
    assert "[DONE]" not in data
    last = json.loads(data[-1])
    assert last["error"]["code"] == code, last
    assert last["error"]["last_sequence"] >= 2
    # And the SDK raises it instead of ending cleanly.
    fake_openai.enqueue(StreamReply(text=("one", " two", " three"), fault=fault, fault_after=2, stall_seconds=5))
    async with openai.AsyncOpenAI(base_url=base_url(running) + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(model="gpt", messages=USER, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


@pytest.mark.parametrize(
    ("reply", "status", "error"),
    [
        (StatusReply(429, headers={"retry-after": "30"}), 429, openai.RateLimitError),
        (StatusReply(503), 503, openai.InternalServerError),
        (StatusReply(400, message="context too long"), 400, openai.BadRequestError),
        (StatusReply(401), 500, openai.InternalServerError),
        (ResetReply(), 503, openai.InternalServerError),
    ],
)
async def test_an_upstream_failure_before_the_first_token_is_an_http_status(
    start_server: Callable[..., Any], fake_openai: FakeOpenAI, reply: Any, status: int, error: type[Exception]
) -> None:
    fake_openai.enqueue(reply)
    running = await start_server({"gpt": vendor_route(fake_openai)}, http_listen="127.0.0.1:0")
    async with openai.AsyncOpenAI(base_url=base_url(running) + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model="gpt", messages=USER, stream=True)
    assert caught.value.status_code == status  # type: ignore[attr-defined]
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "30"  # type: ignore[attr-defined]
    assert fake_openai.api_key not in str(caught.value.body)  # type: ignore[attr-defined]


async def test_simulated_fault_routes_map_to_statuses_and_events(sdk: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="no-such-route", messages=USER, stream=True)
    with pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(model="rate-limited", messages=USER)
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(model="down", messages=USER, stream=True)
    assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"]
    for route in ("error-after-3", "crash-after"):
        stream = await sdk.chat.completions.create(model=route, messages=USER, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    with pytest.raises(openai.APIStatusError) as failed:
        await sdk.chat.completions.create(model="error-after-3", messages=USER)
    assert failed.value.status_code == 503 and failed.value.body["last_sequence"] == 4  # type: ignore[index]


async def test_closing_the_sdk_stream_closes_the_provider_within_200_ms(sdk: Any, recorder: Recorder) -> None:
    stream = await sdk.chat.completions.create(model="slow", messages=USER, stream=True)
    seen = 0
    async for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            break
    closed_at = asyncio.get_running_loop().time()
    await stream.close()
    await eventually(lambda: len(recorder.closed) == 1, within=1.0)
    assert recorder.closed[0] - closed_at < 0.2 and recorder.finished == [False]


# -- requests the door refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "status", "param"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "body"),
        (b'{"model":"sim","messages":[]}', {"content-type": "text/plain"}, 415, None),
        (b'{"model":"sim","messages":[]}', {"content-type": "application/json"}, 400, "messages"),
        (b'{"model":"sim","messages":[{"role":"user","content":"x"}],"temperature":"hot"}', {}, 400, "temperature"),
        (b'{"model":"sim","messages":[{"role":"user","content":"x"}],"max_tokens":-1}', {}, 400, "max_output_tokens"),
        (b'{"model":"sim","messages":[{"role":"user","content":[{"type":"image_url"}]}]}', {}, 400, None),
        (b'{"model":"sim","messages":[{"role":"wizard","content":"x"}]}', {}, 400, "messages[0].role"),
        (b'{"model":"sim","messages":[{"role":"user","content":"x"}],"n":2}', {}, 400, "n"),
    ],
)
async def test_bad_requests_get_clear_statuses_and_never_reach_the_provider(
    door: Running, recorder: Recorder, body: bytes, headers: dict[str, str], status: int, param: str | None
) -> None:
    headers = {"content-type": "application/json"} | headers
    url = base_url(door) + "/v1/chat/completions"
    async with ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        answer = await response.json()
    assert response.status == status, answer
    assert answer["error"]["message"]
    if param is not None:
        assert answer["error"]["param"] == param
    assert recorder.requests == []


async def test_a_huge_body_is_refused_without_being_read(start_server: Callable[..., Any]) -> None:
    running = await start_server(HTTP_ROUTES, http_listen="127.0.0.1:0", max_request_bytes=64 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.http.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000000000\r\n\r\n{"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413")
    writer.close()
    # Sent without a length (chunked), it is cut off at the limit all the same.
    async with ClientSession() as session:

        async def chunks() -> Any:
            for _ in range(64):
                yield b" " * 4096

        async with session.post(
            base_url(running) + "/v1/chat/completions", data=chunks(), headers={"content-type": "application/json"}
        ) as response:
            assert response.status == 413


async def test_slow_loris_heads_and_bodies_are_cut_off(start_server: Callable[..., Any]) -> None:
    running = await start_server(
        HTTP_ROUTES, http_listen="127.0.0.1:0", http_idle_timeout_seconds=1.0, http_body_timeout_seconds=1.0
    )
    port = running.server.http.port
    loop = asyncio.get_running_loop()
    # A head that never completes: the connection is closed at the idle timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert loop.time() - started < 3
    writer.close()
    # A body that trickles: 408 at the body timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n{"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()


async def test_cors_answers_only_the_allowed_origins(start_server: Callable[..., Any]) -> None:
    running = await start_server(HTTP_ROUTES, http_listen="127.0.0.1:0", http_cors_origins="https://app.example")
    url = base_url(running) + "/v1/chat/completions"
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with ClientSession() as session:
        async with session.options(url, headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "last-event-id" in response.headers["Access-Control-Allow-Headers"]
        async with session.options(url, headers=preflight | {"Origin": "https://evil.example"}) as response:
            assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers
        async with session.get(base_url(running) + "/v1/models", headers={"Origin": "https://app.example"}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        async with session.get(
            base_url(running) + "/v1/models", headers={"Origin": "https://evil.example"}
        ) as response:
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_heartbeats_are_sse_comments_during_provider_silence(start_server: Callable[..., Any]) -> None:
    running = await start_server(HTTP_ROUTES, http_listen="127.0.0.1:0", heartbeat_interval_seconds=0.2)
    async with ClientSession() as session:
        body = {"model": "quiet", "messages": USER, "stream": True}
        async with session.post(base_url(running) + "/v1/chat/completions", json=body) as response:
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Accel-Buffering"] == "no"
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = await response.read()
    # The silence then ends as a provider read timeout would: an error event, no [DONE].
    assert b": heartbeat\n\n" in raw and b"data: [DONE]" not in raw and b'"error"' in raw


# -- the native stream ---------------------------------------------------------------------------


async def create(session: ClientSession, url: str, body: dict[str, Any], stop_after: int | None = None) -> Any:
    """Opens a native stream; reads all of it, or only `stop_after` events (then drops the connection)."""
    events: list[dict[str, str]] = []
    async with session.post(url + "/v1/streams", json=body) as response:
        assert response.status == 200, await response.text()
        block: dict[str, str] = {}
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line:
                field, _, value = line.partition(":")
                block[field] = value.removeprefix(" ")
                continue
            events.append(block)
            block = {}
            if stop_after is not None and len(events) == stop_after:
                break
    return events


async def test_native_stream_is_the_contract_in_proto3_json(door: Running) -> None:
    async with ClientSession() as session:
        events = await create(
            session, base_url(door), {"model": "sim", "messages": [{"role": "ROLE_USER", "text": "x"}]}
        )
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert events[0]["event"] == "start" and events[-1]["event"] == "finish"
    assert {e["event"] for e in events[1:-1]} == {"text_delta"}
    assert json.loads(events[1]["data"])["textDelta"]["text"]


async def test_native_durable_stream_resumes_after_a_drop_with_last_event_id(door: Running, recorder: Recorder) -> None:
    url = base_url(door)
    body = {"model": "slow", "messages": [{"role": "ROLE_USER", "text": "x"}], "resumeWindow": "30s"}
    async with ClientSession(timeout=ClientTimeout(total=20)) as session:
        whole = await create(session, url, body | {"requestId": "unbroken"})
        recorder.closed.clear()
        head = await create(session, url, body | {"requestId": "broken"}, stop_after=5)
        start = json.loads(head[0]["data"])["start"]
        token = start["resumeToken"]
        await asyncio.sleep(0.2)
        assert recorder.closed == []  # the generation goes on without its reader
        async with session.get(
            f"{url}/v1/streams/broken", params={"token": token}, headers={"Last-Event-ID": "5"}
        ) as r:
            assert r.status == 200
            tail = await sse(r)
        # At the end: nothing more, and an EventSource would stop reconnecting.
        last = tail[-1]["id"]
        async with session.get(f"{url}/v1/streams/broken", params={"token": token, "after": last}) as r:
            assert r.status == 204
        async with session.get(f"{url}/v1/streams/broken", params={"token": "wrong"}) as r:
            assert r.status == 404
        async with session.get(f"{url}/v1/streams/broken", params={"token": token, "after": "9999"}) as r:
            assert r.status == 400 and (await r.json())["error"]["status"] == "OUT_OF_RANGE"
    ids = [int(e["id"]) for e in head + tail]
    assert ids == list(range(1, len(ids) + 1))

    def text(events: list[dict[str, str]]) -> str:
        return "".join(json.loads(e["data"])["textDelta"]["text"] for e in events if e["event"] == "text_delta")

    assert text(head + tail) == text(whole)
    assert tail[-1]["event"] == "finish"


async def test_native_poll_and_cancel(door: Running, recorder: Recorder) -> None:
    url = base_url(door)
    body = {"model": "slow", "messages": [{"role": "ROLE_USER", "text": "x"}], "resumeWindow": "30s"}
    async with ClientSession(timeout=ClientTimeout(total=20)) as session:
        head = await create(session, url, body, stop_after=2)
        start = json.loads(head[0]["data"])["start"]
        stream, token = start["streamId"], start["resumeToken"]
        params = {"token": token, "after": "2", "wait": "5", "max_messages": "3"}
        async with session.get(f"{url}/v1/streams/{stream}/events", params=params) as r:
            polled = await r.json()
        assert r.status == 200 and 1 <= len(polled["messages"]) <= 3
        assert polled["messages"][0]["sequence"] == "3" and polled["terminal"] is False
        loop = asyncio.get_running_loop()
        cancelled_at = loop.time()
        async with session.post(f"{url}/v1/streams/{stream}/cancel", params={"token": token}) as r:
            state = (await r.json())["state"]
        assert state["status"] == "STREAM_STATUS_CANCELLED"
        await eventually(lambda: len(recorder.closed) == 1, within=1.0)
        assert recorder.closed[0] - cancelled_at < 0.2
        async with session.post(f"{url}/v1/streams/{stream}/cancel", params={"token": token}) as r:
            assert (await r.json())["state"]["status"] == "STREAM_STATUS_CANCELLED"
        params = {"token": token, "after": polled["nextAfterSequence"], "max_messages": "1000"}
        async with session.get(f"{url}/v1/streams/{stream}/events", params=params) as r:
            rest = await r.json()
        assert rest["terminal"] is True and rest["messages"][-1]["error"]["code"] == "ERROR_CODE_STREAM_CANCELLED"


async def test_an_ephemeral_native_reader_that_leaves_closes_the_provider(door: Running, recorder: Recorder) -> None:
    async with ClientSession() as session:
        await create(session, base_url(door), {"model": "slow", "messages": [{"role": "ROLE_USER", "text": "x"}]}, 3)
        left_at = asyncio.get_running_loop().time()
    await eventually(lambda: len(recorder.closed) == 1, within=1.0)
    assert recorder.closed[0] - left_at < 0.2
    await eventually(lambda: door.server.gateway.active_streams == 0)


async def test_a_reader_that_stops_reading_is_cut_off(start_server: Callable[..., Any], recorder: Recorder) -> None:
    running = await start_server(
        {"fast": {"provider": "recording", "model": "m", "options": {"first_token_ms": 1, "tokens_per_second": 0,
                                                                       "answer_tokens": 1_000_000}}},
        http_listen="127.0.0.1:0",
        http_write_timeout_seconds=1.0,
    )  # fmt: skip
    _, writer = await asyncio.open_connection("127.0.0.1", running.server.http.port, limit=1024)
    body = json.dumps({"model": "fast", "messages": USER, "stream": True}).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    # The writer waits on a full socket; within two write timeouts the door gives up on it.
    await eventually(lambda: len(recorder.closed) == 1, within=5.0)
    assert recorder.finished == [False]
    await eventually(lambda: running.server.gateway.active_streams == 0)
    writer.close()


# -- content beyond text through the OpenAI-compatible endpoint ---------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FIRST = "messages[0].content[0]"


async def test_sdk_sends_an_image_a_pdf_and_audio_as_parts(sdk: Any) -> None:
    png = (EXAMPLES / "screenshot.png").read_bytes()
    pdf = (EXAMPLES / "claim.pdf").read_bytes()
    pdf_url = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        {
            "type": "file",
            "file": {"filename": "claim.pdf", "file_data": pdf_url},
        },
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....WAVE").decode(), "format": "wav"}},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.jpg"}},
    ]
    completion = await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": content}])
    answer = completion.choices[0].message.content
    assert answer.startswith(
        f"I received an image (image/png, {len(png):,} bytes inline), a document titled 'claim.pdf' "
        f"(application/pdf, {len(pdf):,} bytes inline), a recording (audio/wav, 12 bytes inline), "
        "and an image (type not given, at https://example.invalid/cat.jpg). "
    )


async def test_sdk_asks_for_a_json_schema_and_gets_an_instance(sdk: Any) -> None:
    schema = json.loads((EXAMPLES / "claim.schema.json").read_text())
    completion = await sdk.chat.completions.create(
        model="sim",
        messages=USER,
        response_format={"type": "json_schema", "json_schema": {"name": "claim", "schema": schema, "strict": True}},
    )
    answer = json.loads(completion.choices[0].message.content)
    assert set(answer) == set(schema["properties"])
    completion = await sdk.chat.completions.create(model="sim", messages=USER, response_format={"type": "json_object"})
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "image_url"}], "messages[0].content[0].image_url.url"),
        ([{"type": "video_url", "video_url": {"url": "https://x"}}], "messages[0].content[0]"),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}],
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "flac"}}],
            "messages[0].content[0].input_audio.format",
        ),
    ],
)
async def test_content_parts_the_door_cannot_read_are_refused_by_name(
    door: Running, recorder: Recorder, content: Any, param: str
) -> None:
    body = {"model": "recorded", "messages": [{"role": "user", "content": content}]}
    async with (
        ClientSession() as session,
        session.post(base_url(door) + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["param"] == param
    assert recorder.requests == []


@pytest.mark.timeout(60)
async def test_a_journal_failure_under_a_resumed_stream_keeps_the_readers_cursor(
    start_server: Callable[..., Any], recorder: Recorder
) -> None:
    # The response ends with an `interrupted` event that carries no id: the reader's Last-Event-ID
    # stays at the last message it has, and a reconnect resumes there once the journal is back.
    with running_redis() as redis:
        running: Running = await start_server(HTTP_ROUTES, http_listen="127.0.0.1:0", journal=redis.url)
        url = base_url(running)
        body = {"model": "slow", "messages": [{"role": "ROLE_USER", "text": "x"}], "resumeWindow": "30s"}
        async with ClientSession(timeout=ClientTimeout(total=40)) as session:
            head = await create(session, url, body | {"requestId": "frozen-http"}, stop_after=4)
            token = json.loads(head[0]["data"])["start"]["resumeToken"]
            assert redis.process is not None
            async with session.get(
                f"{url}/v1/streams/frozen-http", params={"token": token}, headers={"Last-Event-ID": "4"}
            ) as r:
                assert r.status == 200
                first = await r.content.readuntil(b"\n\n")
                os.kill(redis.process.pid, signal.SIGSTOP)
                try:
                    rest = await asyncio.wait_for(sse(r), 20)
                finally:
                    os.kill(redis.process.pid, signal.SIGCONT)
            assert first.startswith(b"id: 5\n")
            assert rest[-1]["event"] == "interrupted" and "id" not in rest[-1]
            error = json.loads(rest[-1]["data"])["error"]
            assert error["code"] == "ERROR_CODE_JOURNAL_UNAVAILABLE" and error["retryable"] is True
            assert all(e["event"] not in ("finish", "error") for e in rest)
            last = max(int(e["id"]) for e in rest if "id" in e) if any("id" in e for e in rest) else 5
            # The reconnect, from the last id it really has, gets a contiguous rest (the producer
            # stopped while Redis was frozen, so it ends with the terminal it owed its readers).
            for _ in range(100):
                async with session.get(f"{url}/v1/streams/frozen-http", params={"token": token, "after": last}) as r:
                    if r.status == 200:
                        tail = await sse(r)
                        break
                await asyncio.sleep(0.1)
            ids = [last, *(int(e["id"]) for e in tail)]
            assert ids == list(range(last, last + len(ids)))
            assert tail[-1]["event"] in ("finish", "error")
        await running.server.stop(grace=0.5)
