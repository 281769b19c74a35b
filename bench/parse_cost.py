"""Parse cost: CPU per chunk of each adapter's stream path, against the SDK's own stream iterator.

The bodies are the fake providers' exact bytes (fetched once from `tests/fakes` over loopback),
then replayed from memory through an in-process httpx2 transport, one SSE event per body chunk
as a provider delivers them, so that only client-side work is measured. For each vendor:

- `parse only`: the SSE decoder and the event parser over the body chunks, nothing else;
- `adapter`: the provider adapter's whole stream — SDK request building, httpx2 body iteration,
  decoding, parsing, neutral events — as tokenwire runs it;
- `SDK iterator`: the same request through the SDK's default `stream=True` iterator, which builds
  a model object per chunk (what the adapters avoid). For Bedrock: botocore's `EventStream` over the
  same bytes (its buffer, CRC checks and shape-driven parser: what aiobotocore's iterator runs per
  event, before its own async layer), so a lower bound of the SDK's cost.

Bedrock's body is AWS event-stream framing (one message per read), replayed the same way. The
generic `sse-endpoint` (seed 003's flow shape, tests/fakes/flow.py) has no SDK: its SDK column is "-".
For Gemini the SDK column is google-genai's `aio.models.generate_content_stream` over the same bytes
(httpx2 through a replaying transport: it then takes httpx2 rather than aiohttp). For watsonx it is
ibm-watsonx-ai's own chat stream loop over the same bytes (see `measure_watsonx`: a lower bound).
For Replicate the three steps (create, stream, the prediction's metrics) are replayed, and its SDK
column is replicate's `AsyncClient.async_stream` over the same bytes (legacy httpx through a
replaying transport; its default `use_file_output`).

    .venv/bin/python bench/parse_cost.py --chunks 2000 --repeat 5

Prints microseconds of CPU per chunk (median of the repeats). Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import httpx2
import openai
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fakes import FakeAnthropic, FakeOpenAI, StreamReply
from fakes.bedrock import FakeBedrock
from fakes.flow import OPTIONS as FLOW_OPTIONS
from fakes.flow import FakeFlow, flow_url
from fakes.gemini import FakeGemini
from fakes.replicate import MODEL as REPLICATE_MODEL
from fakes.replicate import FakeReplicate
from fakes.server import RequestContext
from fakes.watsonx import FakeWatsonx

from service.config import build_routes
from service.events import ChatMessage, GenerationRequest, Role
from service.providers import bedrock, create_provider, gemini, replicate, sse_endpoint, watsonx
from service.providers.anthropic import AnthropicProvider, EventParser
from service.providers.framing import EventStreamDecoder
from service.providers.openai import ChunkParser, OpenAIProvider
from service.providers.sse import SSEDecoder
from service.providers.upstream import TemplateSender

KEY = "bench-parse-cost-key"
MESSAGES: Any = [{"role": "user", "content": "Tell me about streaming."}]


async def fetch_body(vendor: str, chunks: int) -> bytes:
    """One whole streamed response, byte-exact, from the fake provider."""
    reply = StreamReply(text=[f" word{i}" for i in range(chunks)])
    fake_type = FakeOpenAI if vendor == "openai" else FakeAnthropic
    async with fake_type(api_key=KEY) as fake, httpx2.AsyncClient() as http:
        fake.enqueue(reply)
        if vendor == "openai":
            url, headers = f"{fake.base_url}/chat/completions", {"authorization": f"Bearer {KEY}"}
            body: dict[str, Any] = {"model": "m", "messages": MESSAGES, "stream": True}
            body["stream_options"] = {"include_usage": True}
        else:
            url, headers = f"{fake.base_url}/v1/messages", {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
            body = {"model": "m", "messages": MESSAGES, "max_tokens": 10_000, "stream": True}
        response = await http.post(url, json=body, headers=headers)
        response.raise_for_status()
        return response.content


def split_events(body: bytes) -> list[bytes]:
    """The body as a provider delivers it: one SSE event per read."""
    return [event + b"\n\n" for event in body.split(b"\n\n") if event]


def replaying_client(pieces: list[bytes]) -> httpx2.AsyncClient:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        await request.aread()

        async def stream() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    return httpx2.AsyncClient(transport=httpx2.MockTransport(handler))


def generation_request() -> GenerationRequest:
    return GenerationRequest(
        stream_id="bench", route="r", upstream_model="m", messages=(ChatMessage(Role.USER, "Tell me about streaming."),)
    )


def parse_loop(
    decoder: Callable[[], Any], parser: Callable[[], Any], pieces: list[bytes]
) -> Callable[[], Awaitable[int]]:
    """The decoder and the adapter's parser over `pieces`, without the read loop around them."""

    async def run() -> int:
        d, p = decoder(), parser()
        for piece in pieces:
            for name, data in d.feed(piece):
                p.handle(name, data)
                p.out.clear()
        p.finish()
        return len(pieces)

    return run


def adapter_loop(provider: Any, count: int) -> Callable[[], Awaitable[int]]:
    """One whole stream through the provider (its read loop, decoder and parser)."""

    async def run() -> int:
        async for _ in provider.stream(generation_request()):
            pass
        return count

    return run


async def cpu_per_chunk(run: Callable[[], Awaitable[int]], repeat: int) -> float:
    await run()  # warm up: imports, caches, first-request costs
    samples = []
    for _ in range(repeat):
        started = time.process_time()
        chunks = await run()
        samples.append((time.process_time() - started) / chunks * 1e6)
    return statistics.median(samples)


async def measure(vendor: str, chunks: int, repeat: int) -> dict[str, float]:
    pieces = split_events(await fetch_body(vendor, chunks))
    http = replaying_client(pieces)
    os.environ["BENCH_PARSE_KEY"] = KEY
    options = {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "BENCH_PARSE_KEY"}
    route = build_routes({"r": {"provider": vendor, "model": "m", "options": options}}, "bench")["r"]
    provider = create_provider(route)
    results: dict[str, float] = {}

    def parse_only() -> int:
        decoder = SSEDecoder()
        parser = ChunkParser(vendor) if vendor == "openai" else EventParser(vendor)
        for piece in pieces:
            for name, data in decoder.feed(piece):
                parser.handle(name, data)
                parser.out.clear()
        parser.finish()
        return len(pieces)

    async def parse_only_async() -> int:
        return parse_only()

    async def adapter() -> int:
        count = 0
        async for _ in provider.stream(generation_request()):
            count += 1
        return len(pieces)

    results["parse only"] = await cpu_per_chunk(parse_only_async, repeat)
    if vendor == "openai":
        assert isinstance(provider, OpenAIProvider)
        await provider.client.close()
        provider.client = openai.AsyncOpenAI(api_key=KEY, base_url="http://fake/v1", max_retries=0, http_client=http)
        sdk_openai = provider.client

        async def sdk_iterator() -> int:
            stream = await sdk_openai.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
            async for _ in stream:
                pass
            return len(pieces)

    else:
        assert isinstance(provider, AnthropicProvider)
        await provider.client.close()
        provider.client = anthropic.AsyncAnthropic(api_key=KEY, base_url="http://fake", max_retries=0, http_client=http)
        sdk_anthropic = provider.client

        async def sdk_iterator() -> int:
            stream = await sdk_anthropic.messages.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000, stream=True
            )
            async for _ in stream:
                pass
            return len(pieces)

    # The adapter sends through the replaying client as it is: a sender with no transport of its
    # own makes no request template (that would go past the client, to the route's connections).
    provider.sender = TemplateSender(provider.client, None, None, credential=lambda: None, dynamic=lambda: True)
    results["adapter"] = await cpu_per_chunk(adapter, repeat)
    results["SDK iterator"] = await cpu_per_chunk(sdk_iterator, repeat)
    await provider.aclose()
    return results


def bedrock_pieces(chunks: int) -> list[bytes]:
    """The fake's exact event-stream messages, one per read."""
    reply = StreamReply(text=[f" word{i}" for i in range(chunks)])
    rendered = FakeBedrock()._render_stream(reply, RequestContext({}, {}, "bench"))
    return [frame.data for frame in rendered.frames]


async def measure_bedrock(chunks: int, repeat: int) -> dict[str, float]:
    import botocore.eventstream
    import botocore.parsers
    import botocore.session

    pieces = bedrock_pieces(chunks)
    os.environ["BENCH_PARSE_KEY"] = KEY
    options = {"region": "us-east-1", "auth": "api-key", "api_key_env": "BENCH_PARSE_KEY"}
    route = build_routes({"r": {"provider": "bedrock", "model": "m", "options": options}}, "bench")["r"]
    provider = create_provider(route)
    assert isinstance(provider, bedrock.BedrockProvider)
    await provider.client.aclose()
    provider.client = replaying_client(pieces)
    results: dict[str, float] = {}

    parse_only = parse_loop(EventStreamDecoder, lambda: bedrock.StreamParser("bedrock"), pieces)
    adapter = adapter_loop(provider, len(pieces))

    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    shape = model.operation_model("ConverseStream").output_shape.members["stream"]

    class Raw:
        def stream(self) -> Any:
            return iter(pieces)

    async def sdk_iterator() -> int:
        stream = botocore.eventstream.EventStream(
            Raw(), shape, botocore.parsers.EventStreamJSONParser(), "ConverseStream"
        )
        for _ in stream:
            pass
        return len(pieces)

    results["parse only"] = await cpu_per_chunk(parse_only, repeat)
    results["adapter"] = await cpu_per_chunk(adapter, repeat)
    results["SDK iterator"] = await cpu_per_chunk(sdk_iterator, repeat)
    await provider.aclose()
    return results


async def measure_flow(chunks: int, repeat: int) -> dict[str, float]:
    reply = StreamReply(text=[f" word{i}" for i in range(chunks)])
    pieces = [frame.data for frame in FakeFlow()._render_stream(reply, RequestContext({}, {}, "bench")).frames]
    os.environ[str(FLOW_OPTIONS["api_key_env"])] = KEY
    options = FLOW_OPTIONS | {"url": flow_url("http://127.0.0.1:9")}
    route = build_routes({"r": {"provider": "sse-endpoint", "model": "m", "options": options}}, "bench")["r"]
    provider = create_provider(route)
    assert isinstance(provider, sse_endpoint.SSEEndpointProvider)
    await provider.client.aclose()
    provider.client = replaying_client(pieces)

    parse_only = parse_loop(
        SSEDecoder, lambda: sse_endpoint.StreamParser(provider.kind, provider.options, provider.pointers), pieces
    )
    adapter = adapter_loop(provider, len(pieces))

    results = {"parse only": await cpu_per_chunk(parse_only, repeat), "adapter": await cpu_per_chunk(adapter, repeat)}
    await provider.aclose()
    return results | {"SDK iterator": float("nan")}


async def measure_gemini(chunks: int, repeat: int) -> dict[str, float]:
    from google import genai
    from google.genai import types

    reply = StreamReply(text=[f" word{i}" for i in range(chunks)])
    context = RequestContext({}, {"model": "m"}, "bench")
    pieces = [frame.data for frame in FakeGemini()._render_stream(reply, context).frames]
    os.environ["BENCH_PARSE_KEY"] = KEY
    options = {"base_url": "http://127.0.0.1:9", "api_key_env": "BENCH_PARSE_KEY"}
    route = build_routes({"r": {"provider": "gemini", "model": "m", "options": options}}, "bench")["r"]
    provider = create_provider(route)
    assert isinstance(provider, gemini.GeminiProvider)
    await provider.client.aclose()
    provider.client = replaying_client(pieces)

    parse_only = parse_loop(SSEDecoder, lambda: gemini.StreamParser("gemini"), pieces)
    adapter = adapter_loop(provider, len(pieces))

    http_options = types.HttpOptions(
        base_url="http://127.0.0.1:9",
        api_version="v1beta",
        httpx_async_client=replaying_client(pieces),
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    sdk = genai.Client(api_key=KEY, http_options=http_options)

    async def sdk_iterator() -> int:
        async for _ in await sdk.aio.models.generate_content_stream(model="m", contents="Tell me about streaming."):
            pass
        return len(pieces)

    results = {
        "parse only": await cpu_per_chunk(parse_only, repeat),
        "adapter": await cpu_per_chunk(adapter, repeat),
        "SDK iterator": await cpu_per_chunk(sdk_iterator, repeat),
    }
    await provider.aclose()
    return results


async def measure_watsonx(chunks: int, repeat: int) -> dict[str, float]:
    """watsonx: the adapter over the fake's exact frames, and the SDK's own chat stream loop
    (`_agenerate_chat_stream_with_url`: legacy httpx's `aiter_lines`, then `json.loads` per data
    line) over the same bytes. The SDK loop runs on a model object built without its `APIClient`
    (whose construction makes network calls) and without its rate-limit/retry wrapper around
    `httpx.AsyncClient.stream`: a lower bound of the SDK's cost."""
    import httpx
    from ibm_watsonx_ai.foundation_models.inference.fm_model_inference import FMModelInference

    reply = StreamReply(text=[f" word{i}" for i in range(chunks)])
    context = RequestContext({"model_id": "m"}, {}, "bench")
    pieces = [frame.data for frame in FakeWatsonx()._render_stream(reply, context).frames]
    os.environ["BENCH_PARSE_KEY"] = KEY
    options = {"url": "https://127.0.0.1:9", "project_id": "p", "auth": "token", "token_env": "BENCH_PARSE_KEY"}
    route = build_routes({"r": {"provider": "watsonx", "model": "m", "options": options}}, "bench")["r"]
    provider = create_provider(route)
    assert isinstance(provider, watsonx.WatsonxProvider)
    await provider.client.aclose()
    provider.client = replaying_client(pieces)

    parse_only = parse_loop(SSEDecoder, lambda: watsonx.ChatStreamParser("watsonx"), pieces)
    adapter = adapter_loop(provider, len(pieces))

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()

        async def stream() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())

    legacy = httpx.AsyncClient(transport=httpx.MockTransport(handler))

    async def headers() -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    model: Any = FMModelInference.__new__(FMModelInference)
    model.model_id, model.params = "m", None
    model._client = SimpleNamespace(
        default_project_id="p",
        default_space_id=None,
        _aget_headers=headers,
        _params=lambda **_: {"version": "2025-02-11"},
    )
    model._async_stream_with_retry = legacy.stream

    async def sdk_iterator() -> int:
        async for _ in model._agenerate_chat_stream_with_url(
            messages=MESSAGES, params=None, chat_stream_url="https://127.0.0.1:9/ml/v1/text/chat_stream"
        ):
            pass
        return len(pieces)

    results = {
        "parse only": await cpu_per_chunk(parse_only, repeat),
        "adapter": await cpu_per_chunk(adapter, repeat),
        "SDK iterator": await cpu_per_chunk(sdk_iterator, repeat),
    }
    await legacy.aclose()
    await provider.aclose()
    return results


_REPLICATE_BASE = "http://127.0.0.1:9"


def replicate_answer(method: str, path: str, pieces: list[bytes]) -> tuple[int, dict[str, str], Any]:
    """What Replicate answers at each of a streamed prediction's three steps, from memory."""
    own = f"{_REPLICATE_BASE}/v1/predictions/bench"
    if method == "POST":
        urls = {"get": own, "cancel": f"{own}/cancel", "stream": f"{_REPLICATE_BASE}/v1/streams/bench"}
        prediction = {"id": "bench", "model": REPLICATE_MODEL, "version": "v", "status": "starting", "urls": urls}
        return 201, {"content-type": "application/json"}, orjson.dumps(prediction)
    if path.startswith("/v1/streams/"):
        return 200, {"content-type": "text/event-stream"}, pieces
    metrics = {"input_token_count": 6, "output_token_count": len(pieces)}
    body = {"id": "bench", "model": REPLICATE_MODEL, "status": "succeeded", "metrics": metrics}
    return 200, {"content-type": "application/json"}, orjson.dumps(body)


async def measure_replicate(chunks: int, repeat: int) -> dict[str, float]:
    import httpx
    from replicate.client import Client

    reply = StreamReply(text=[f" word{i}" for i in range(chunks)])
    context = RequestContext({}, {"model": REPLICATE_MODEL}, "bench")
    pieces = [frame.data for frame in FakeReplicate()._render_stream(reply, context).frames]
    os.environ["BENCH_PARSE_KEY"] = KEY
    options = {"base_url": _REPLICATE_BASE, "api_key_env": "BENCH_PARSE_KEY"}
    route = build_routes({"r": {"provider": "replicate", "model": REPLICATE_MODEL, "options": options}}, "bench")["r"]
    provider = create_provider(route)
    assert isinstance(provider, replicate.ReplicateProvider)

    async def replay() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async def ours(request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        status, headers, body = replicate_answer(request.method, request.url.path, pieces)
        return httpx2.Response(status, headers=headers, content=replay() if body is pieces else body)

    async def theirs(request: httpx.Request) -> httpx.Response:
        await request.aread()
        status, headers, body = replicate_answer(request.method, request.url.path, pieces)
        return httpx.Response(status, headers=headers, content=replay() if body is pieces else body)

    await provider.client.aclose()
    provider.client = httpx2.AsyncClient(transport=httpx2.MockTransport(ours))

    parse_only = parse_loop(replicate.EventDecoder, lambda: replicate.StreamParser("replicate"), pieces)
    adapter = adapter_loop(provider, len(pieces))

    sdk = Client(api_token=KEY, base_url=_REPLICATE_BASE, transport=httpx.MockTransport(theirs))

    async def sdk_iterator() -> int:
        async for _ in await sdk.async_stream(REPLICATE_MODEL, input={"prompt": "Tell me about streaming."}):
            pass
        return len(pieces)

    results = {
        "parse only": await cpu_per_chunk(parse_only, repeat),
        "adapter": await cpu_per_chunk(adapter, repeat),
        "SDK iterator": await cpu_per_chunk(sdk_iterator, repeat),
    }
    await provider.aclose()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=2000, help="text deltas per response (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="measured responses per path (default 5)")
    args = parser.parse_args()
    print(f"CPU per chunk, µs (median of {args.repeat} responses of {args.chunks} text deltas)")
    print(f"{'vendor':<12} {'parse only':>9} {'adapter':>9} {'SDK iterator':>13}")
    for vendor in ("openai", "anthropic", "bedrock", "gemini", "watsonx", "sse-endpoint", "replicate"):
        if vendor == "bedrock":
            r = await measure_bedrock(args.chunks, args.repeat)
        elif vendor == "replicate":
            r = await measure_replicate(args.chunks, args.repeat)
        elif vendor == "gemini":
            r = await measure_gemini(args.chunks, args.repeat)
        elif vendor == "watsonx":
            r = await measure_watsonx(args.chunks, args.repeat)
        elif vendor == "sse-endpoint":
            r = await measure_flow(args.chunks, args.repeat)
        else:
            r = await measure(vendor, args.chunks, args.repeat)
        sdk = "-" if r["SDK iterator"] != r["SDK iterator"] else f"{r['SDK iterator']:.1f}"
        print(f"{vendor:<12} {r['parse only']:>9.1f} {r['adapter']:>9.1f} {sdk:>13}")


if __name__ == "__main__":
    asyncio.run(main())
