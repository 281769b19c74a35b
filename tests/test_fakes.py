"""The fake providers, driven through the real `openai` and `anthropic` SDKs."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anthropic
import openai
import pytest
from fakes import FakeAnthropic, FakeOpenAI, ResetReply, StatusReply, StreamReply, ToolCallScript, Usage

pytestmark = pytest.mark.timeout(10)

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def openai_client(fake: FakeOpenAI, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=fake.api_key, base_url=fake.base_url, max_retries=0, **kw)


def anthropic_client(fake: FakeAnthropic, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=fake.api_key, base_url=fake.base_url, max_retries=0, **kw)


async def test_openai_text_stream_with_usage_over_one_connection() -> None:
    usage = Usage(input_tokens=20, output_tokens=5, cache_read_tokens=8, reasoning_tokens=2)
    async with FakeOpenAI() as fake, openai_client(fake) as client:
        fake.enqueue(StreamReply(text=["Hel", "lo", "!"], usage=usage, events_per_write=2))
        # The enqueued reply, then the default one, with the default Usage().
        for expected, total, output in (("Hello!", 25, 5), ("Hello, world!", 19, 7)):
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            text, finish, last = "", None, None
            async for chunk in stream:
                last = chunk
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finish = choice.finish_reason or finish
            assert text == expected and finish == "stop"
            assert last is not None and last.choices == [] and last.usage is not None
            assert (last.usage.total_tokens, last.usage.completion_tokens) == (total, output)

        first = fake.requests[0]
        assert (first.method, first.path, first.body["model"]) == ("POST", "/v1/chat/completions", "gpt-4o-mini")
        assert first.headers["authorization"] == f"Bearer {fake.api_key}"
        assert first.completed and first.disconnected_at is None and first.status == 200
        assert fake.connections_opened == 1 and not fake.errors

        # Without include_usage: no usage chunk; a non-streaming request gets one JSON body.
        fake.enqueue(StreamReply(text=["a"], usage=usage), StreamReply(text=["b", "c"], usage=usage))
        chunks = [c async for c in await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)]
        assert [c.usage for c in chunks] == [None] * 3 and all(c.choices for c in chunks)
        completion = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert completion.choices[0].message.content == "bc" and completion.usage is not None
        assert completion.usage.prompt_tokens_details is not None
        assert completion.usage.prompt_tokens_details.cached_tokens == 8


async def test_openai_reasoning_and_parallel_tool_calls() -> None:
    calls = [
        ToolCallScript("call_1", "get_weather", ['{"city"', ': "Paris"}']),
        ToolCallScript("call_2", "get_time", ["{}"]),
    ]
    async with FakeOpenAI() as fake, openai_client(fake) as client:
        fake.enqueue(StreamReply(reasoning=["Let me ", "think."], text=["Checking."], tool_calls=calls))
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        reasoning, text, finish = "", "", None
        tools: dict[int, dict[str, str]] = {}
        async for chunk in stream:
            assert chunk.model == "gpt-4o" and chunk.object == "chat.completion.chunk"
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            text += delta.content or ""
            for call in delta.tool_calls or []:
                entry = tools.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert (reasoning, text, finish) == ("Let me think.", "Checking.", "tool_calls")
        assert tools == {
            0: {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            1: {"id": "call_2", "name": "get_time", "arguments": "{}"},
        }


async def test_anthropic_text_stream_with_usage() -> None:
    usage = Usage(input_tokens=30, output_tokens=9, cache_read_tokens=4, cache_write_tokens=6)
    async with FakeAnthropic() as fake, anthropic_client(fake) as client:
        fake.enqueue(StreamReply(text=["Bon", "jour"], usage=usage, stop_sequence="END", finish="stop_sequence"))
        stream = await client.messages.create(model="claude-x", max_tokens=64, messages=MESSAGES, stream=True)
        kinds, text, final = [], "", None
        async for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
            elif event.type == "message_start":
                assert event.message.model == "claude-x" and event.message.usage.input_tokens == 30
            elif event.type == "message_delta":
                final = event
        assert text == "Bonjour"
        # The SDK drops `ping` events.
        assert kinds == ["message_start", "content_block_start"] + ["content_block_delta"] * 2 + [
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        assert final is not None and final.usage.output_tokens == 9 and final.usage.cache_read_input_tokens == 4
        assert (final.delta.stop_reason, final.delta.stop_sequence) == ("stop_sequence", "END")
        request = fake.requests[0]
        # This SDK version sends the key as a bearer token; the fake takes `x-api-key` too.
        assert request.path == "/v1/messages" and request.headers["authorization"] == f"Bearer {fake.api_key}"
        assert request.completed and not fake.errors


async def test_anthropic_stream_helper_thinking_and_tool_use() -> None:
    reply = StreamReply(
        reasoning=["Hmm", "..."],
        signature="sig-xyz",
        text=["Let me look."],
        tool_calls=[ToolCallScript("toolu_1", "lookup", ['{"q": ', '"cats", "n": 2}'])],
        usage=Usage(input_tokens=5, output_tokens=40, reasoning_tokens=12),
        interval=0.001,
    )
    async with FakeAnthropic() as fake, anthropic_client(fake) as client:
        fake.enqueue(reply)
        async with client.messages.stream(model="claude-x", max_tokens=64, messages=MESSAGES) as stream:
            message = await stream.get_final_message()
        thinking, text, tool = message.content
        assert thinking.type == "thinking" and (thinking.thinking, thinking.signature) == ("Hmm...", "sig-xyz")
        assert text.type == "text" and text.text == "Let me look."
        assert tool.type == "tool_use" and (tool.id, tool.name, tool.input) == (
            "toolu_1",
            "lookup",
            {"q": "cats", "n": 2},
        )
        assert message.stop_reason == "tool_use"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 40)


async def test_rate_limit_carries_retry_after() -> None:
    async with FakeOpenAI() as oa, FakeAnthropic() as an, openai_client(oa) as oc, anthropic_client(an) as ac:
        oa.enqueue(StatusReply(429, headers={"retry-after": "0.2"}))
        with pytest.raises(openai.RateLimitError) as caught:
            await oc.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert caught.value.response.headers["retry-after"] == "0.2"
        assert caught.value.code == "rate_limit_exceeded" and caught.value.type == "requests"

        an.enqueue(StatusReply(429, headers={"retry-after-ms": "150"}), StatusReply(529))
        with pytest.raises(anthropic.RateLimitError) as caught_an:
            await ac.messages.create(model="m", max_tokens=8, messages=MESSAGES, stream=True)
        assert caught_an.value.response.headers["retry-after-ms"] == "150"
        assert caught_an.value.body == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": "simulated error"},
            "request_id": caught_an.value.response.headers["request-id"],
        }
        with pytest.raises(anthropic.OverloadedError):
            await ac.messages.create(model="m", max_tokens=8, messages=MESSAGES)


async def test_wrong_key_is_rejected_without_echoing_it() -> None:
    wrong = "sk-wrong-key-do-not-echo-42"
    async with FakeOpenAI() as oa, FakeAnthropic() as an:
        oa.enqueue(StreamReply(text=["never served"]))
        async with openai.AsyncOpenAI(api_key=wrong, base_url=oa.base_url, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert caught.value.code == "invalid_api_key"
        assert wrong not in str(caught.value) and wrong not in caught.value.response.text
        assert oa.pending == 1  # a rejected request takes no reply from the queue

        async with anthropic.AsyncAnthropic(api_key=wrong, base_url=an.base_url, max_retries=0) as client_an:
            with pytest.raises(anthropic.AuthenticationError) as caught_an:
                await client_an.messages.create(model="m", max_tokens=8, messages=MESSAGES, stream=True)
            with pytest.raises(anthropic.NotFoundError):
                await client_an.models.list()
        assert wrong not in str(caught_an.value) and wrong not in caught_an.value.response.text
        assert caught_an.value.type == "authentication_error"


async def test_client_that_leaves_is_noticed_promptly() -> None:
    async with FakeOpenAI() as fake, openai_client(fake) as client:
        fake.enqueue(StreamReply(text=["tok "] * 1000, interval=0.02))
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        closed = time.monotonic()
        await stream.close()
        at = await fake.wait_disconnected(timeout=0.2)
        assert at - closed < 0.2
        assert not fake.requests[-1].completed


async def test_azure_deployment_route() -> None:
    async with FakeOpenAI() as fake:
        async with openai.AsyncAzureOpenAI(
            api_key=fake.api_key, azure_endpoint=fake.azure_endpoint, api_version="2024-10-21", max_retries=0
        ) as client:
            stream = await client.chat.completions.create(model="my-deploy", messages=MESSAGES, stream=True)
            chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello, world!"
        assert {c.model for c in chunks} == {"my-deploy"}
        request = fake.requests[0]
        assert request.path == "/openai/deployments/my-deploy/chat/completions"
        assert request.query == {"api-version": "2024-10-21"} and request.headers["api-key"] == fake.api_key


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (StreamReply(fault="error_event", fault_after=1), openai.APIError),
        (StreamReply(fault="reset", fault_after=1), openai.APIConnectionError),
        (StreamReply(fault="truncated_chunk", fault_after=1), openai.APIConnectionError),
        (StreamReply(fault="malformed", fault_after=1), ValueError),
        (StreamReply(fault="stall", fault_after=1, stall_seconds=5), openai.APITimeoutError),
        (StreamReply(fault="eof", fault_after=1), None),
        (ResetReply(), openai.APIConnectionError),
    ],
    ids=["error_event", "reset", "truncated_chunk", "malformed", "stall", "eof", "reset_reply"],
)
async def test_openai_faults_reach_the_sdk(reply: StreamReply | ResetReply, error: type[Exception] | None) -> None:
    async with FakeOpenAI() as fake, openai_client(fake, timeout=0.2) as client:
        fake.enqueue(reply)
        text = ""

        async def consume() -> None:
            nonlocal text
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            async for chunk in stream:
                text += "".join(choice.delta.content or "" for choice in chunk.choices)

        if error is None:
            await consume()
        else:
            with pytest.raises(error):
                await consume()
        if isinstance(reply, StreamReply):
            assert text == "Hello"  # the delta before the fault arrived
        assert not fake.errors


async def raw_exchange(port: int, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[str, list[bytes]]:
    """One request with `connection: close`: the response head, and the HTTP chunks of its body as sent."""
    payload = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "connection: close", f"content-length: {len(payload)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write("\r\n".join([*lines, "", ""]).encode() + payload)
        data = await reader.read(-1)  # the fake closes the connection after the response
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, rest = data.partition(b"\r\n\r\n")
    chunks: list[bytes] = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return head.decode().lower(), chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


async def test_wire_format_as_sent() -> None:
    async with FakeOpenAI() as oa, FakeAnthropic() as an:
        oa.enqueue(StreamReply(text=["a", "b"], events_per_write=2))
        body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
        head, chunks = await raw_exchange(
            oa.port, "/v1/chat/completions", body, {"authorization": "Bearer " + oa.api_key}
        )
        assert head.startswith("http/1.1 200 ok\r\n") and "\r\ntransfer-encoding: chunked" in head
        assert "\r\ncontent-type: text/event-stream; charset=utf-8" in head and "\r\nx-request-id: req_" in head
        assert [chunk.count(b"data: ") for chunk in chunks] == [2, 2, 2]  # role+a, b+finish, usage+[DONE]
        frames = b"".join(chunks).split(b"\n\n")
        assert frames[-2:] == [b"data: [DONE]", b""]
        objects = [json.loads(frame.removeprefix(b"data: ")) for frame in frames[:-2]]
        assert [o["choices"][0]["delta"] if o["choices"] else o["usage"]["total_tokens"] for o in objects] == [
            {"role": "assistant", "content": "", "refusal": None},
            {"content": "a"},
            {"content": "b"},
            {},
            19,
        ]
        assert [o["usage"] for o in objects[:-1]] == [None] * 4 and objects[3]["choices"][0]["finish_reason"] == "stop"

        head, chunks = await raw_exchange(
            an.port, "/v1/messages", {"model": "c", "max_tokens": 9, "messages": MESSAGES, "stream": True},
            {"x-api-key": an.api_key, "anthropic-version": "2023-06-01"},
        )  # fmt: skip
        assert "\r\nrequest-id: req_" in head and "\r\ntransfer-encoding: chunked" in head
        names = []
        for chunk in chunks:  # one frame a chunk, and every frame names its event
            event_line, data_line, end = chunk.split(b"\n", 2)
            name = event_line.removeprefix(b"event: ").decode()
            assert json.loads(data_line.removeprefix(b"data: "))["type"] == name and end == b"\n"
            names.append(name)
        assert names == ["message_start", "ping", "content_block_start"] + ["content_block_delta"] * 3 + [
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
