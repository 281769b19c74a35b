"""Operators' view: /metrics scraped over HTTP after a known run, a span tree, JSON log lines, and
quotas shared by two replicas over a real Redis."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import FAST, SLOW, collect, make_config, request, vendor_route
from service.__main__ import JsonLogFormatter
from service.callers import hash_key
from service.server import TokenwireServer
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

ROUTES: dict[str, dict[str, Any]] = {
    "sim": {"provider": "simulated", "model": "tokenwire-sim-1", "options": FAST},
    "down": {
        "provider": "simulated",
        "model": "m",
        "options": FAST | {"fail_after_chunks": 0},
        "max_retries": 1,
        "max_retry_wait_seconds": 2.0,
    },
    "slow": {"provider": "simulated", "model": "tokenwire-sim-1", "options": SLOW},
}
KEY = "sk-tw-" + secrets.token_urlsafe(24)
SALT = secrets.token_bytes(16)


def keys_file(tmp_path: Path, **quotas: int) -> Path:
    path = tmp_path / "keys.json"
    spec = {"name": "team-a", "hashes": [hash_key(SALT, KEY)], "routes": ["*"]} | quotas
    path.write_text(json.dumps({"salt": SALT.hex(), "keys": {"team-a": spec}}))
    return path


def samples(text: str, name: str) -> dict[str, float]:
    """Every sample of one metric, by its labels written as `a=x,b=y` (in the order given here)."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(re.escape(name) + r"(?:\{([^}]*)\})? (\S+)", line)
        if match:
            pairs = re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")
            found[",".join(f"{k}={v}" for k, v in sorted(pairs))] = float(match.group(2))
    return found


async def test_metrics_after_a_known_run(start_server: Any, tmp_path: Path) -> None:
    server = await start_server(
        ROUTES, metrics_listen="127.0.0.1:0", keys_file=str(keys_file(tmp_path)), journal="memory"
    )
    metadata = (("authorization", f"Bearer {KEY}"),)
    finishes = []
    for _ in range(3):
        messages, code, _ = await collect(server.stub.Generate(request("sim"), metadata=metadata))
        assert code == grpc.StatusCode.OK
        finishes.append(messages[-1].finish)
    _, code, _ = await collect(server.stub.Generate(request("down"), metadata=metadata))
    assert code == grpc.StatusCode.UNAVAILABLE
    _, code, _ = await collect(server.stub.Generate(request("nope"), metadata=metadata))
    assert code == grpc.StatusCode.NOT_FOUND
    url = f"http://127.0.0.1:{server.server.metrics_server.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    ended = samples(text, "tokenwire_streams_ended_total")
    assert ended["outcome=OK,provider=simulated,route=sim"] == 3
    assert ended["outcome=PROVIDER_UNAVAILABLE,provider=simulated,route=down"] == 1
    assert samples(text, "tokenwire_streams_started_total")["kind=ephemeral,provider=simulated,route=sim"] == 3
    assert samples(text, "tokenwire_requests_rejected_total") == {"code=ROUTE_NOT_FOUND": 1}
    assert samples(text, "tokenwire_provider_retries_total") == {"route=down": 1}
    assert samples(text, "tokenwire_active_streams") == {"": 0}
    output = samples(text, "gen_ai_client_token_usage_sum")
    assert output["gen_ai_token_type=output,provider=simulated,route=sim"] == sum(
        f.usage.output_tokens for f in finishes
    )
    assert samples(text, "gen_ai_server_time_to_first_token_seconds_count") == {"provider=simulated,route=sim": 3}
    assert samples(text, "tokenwire_caller_tokens_total")["caller=team-a,gen_ai_token_type=output"] == sum(
        f.usage.output_tokens for f in finishes
    )
    assert "tokenwire_output_tokens_per_second_bucket" in text
    assert "gen_ai_server_request_duration_seconds_bucket" in text
    # Bounded labels: no stream id, no key, no hash.
    for secret in (KEY, hash_key(SALT, KEY).removeprefix("hmac-sha256:"), finishes[0].provider_request_id or "\0"):
        assert secret not in text
    assert "stream_id" not in text


async def test_span_tree_joined_to_the_callers_trace(start_server: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = TokenwireServer(make_config(ROUTES), tracer_provider=provider)
    port = await server.start()
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GenerationServiceStub(channel)
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = "00f067aa0ba902b7"
        messages, code, _ = await collect(
            stub.Generate(
                request("sim", text="secret prompt words"), metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),)
            )
        )
        assert code == grpc.StatusCode.OK
        await channel.close()
    finally:
        await server.stop(grace=0.2)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"chat sim", "chat tokenwire-sim-1"}
    root, child = spans["chat sim"], spans["chat tokenwire-sim-1"]
    assert root.attributes is not None and child.attributes is not None
    assert root.start_time and root.end_time and child.start_time and child.end_time
    assert f"{root.context.trace_id:032x}" == trace_id
    assert root.parent is not None and f"{root.parent.span_id:016x}" == parent
    assert child.parent is not None and child.parent.span_id == root.context.span_id
    assert root.kind.name == "SERVER" and child.kind.name == "CLIENT"
    usage = messages[-1].finish.usage
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.request.model"] == "sim"
    assert root.attributes["gen_ai.provider.name"] == "simulated"
    assert root.attributes["gen_ai.usage.output_tokens"] == usage.output_tokens
    assert root.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert child.attributes["gen_ai.request.model"] == "tokenwire-sim-1"
    assert child.start_time >= root.start_time and child.end_time <= root.end_time + 1
    # No prompt or answer text.
    answer = "".join(m.text_delta.text for m in messages if m.HasField("text_delta"))
    for span in spans.values():
        text = json.dumps(dict(span.attributes or {})) + json.dumps([dict(e.attributes or {}) for e in span.events])
        assert "secret prompt" not in text and answer[:20] not in text


async def test_json_log_lines_are_redacted_with_sdk_debug_logging(
    start_server: Any, fake_openai: Any, tmp_path: Path
) -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    levels = {name: logging.getLogger(name).level for name in ("", "openai", "httpx2", "httpcore2")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        routes = {"vendor": vendor_route(fake_openai)}
        server = await start_server(routes, keys_file=str(keys_file(tmp_path)))
        metadata = (("authorization", f"Bearer {KEY}"),)
        messages, code, _ = await collect(server.stub.Generate(request("vendor"), metadata=metadata))
        assert code == grpc.StatusCode.OK
        await collect(server.stub.Generate(request("vendor"), metadata=(("authorization", f"Bearer {KEY}x"),)))
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    streams = [line["stream"] for line in lines if "stream" in line and line["stream"].get("outcome") == "OK"]
    assert len(streams) == 1
    figures = streams[0]
    assert figures["caller"] == "team-a" and figures["route"] == "vendor"
    assert figures["output_tokens"] == messages[-1].finish.usage.output_tokens
    text = buffer.getvalue()
    for secret in (KEY, fake_openai.api_key, hash_key(SALT, KEY).removeprefix("hmac-sha256:")):
        assert secret not in text


async def test_quotas_are_shared_by_two_replicas_over_redis(
    start_server: Any, redis_server: Any, tmp_path: Path
) -> None:
    path = keys_file(tmp_path, max_concurrent_streams=1, requests_per_minute=4)
    prefix = {"journal": redis_server.url, "keys_file": str(path)}
    a = await start_server(ROUTES, **prefix)
    b = await start_server(ROUTES, **prefix)
    await a.server.quotas._redis.flushdb()
    metadata = (("authorization", f"Bearer {KEY}"),)
    minute = int(time.time() // 60)
    held = a.stub.Generate(request("slow"), metadata=metadata)
    assert (await held.read()).HasField("start")
    # The one slot is taken on A: B refuses the same caller.
    _, code, _ = await collect(b.stub.Generate(request("sim"), metadata=metadata))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    held.cancel()
    for server in (a, b):
        await server.server.gateway.idle.wait()

    # Released through Redis (a task of its own): B gets the slot.
    for _ in range(100):
        _, code, _ = await collect(b.stub.Generate(request("sim"), metadata=metadata))
        if code == grpc.StatusCode.OK:
            break
        await asyncio.sleep(0.02)
    assert code == grpc.StatusCode.OK
    # Requests per minute across both: one on A and one on B so far (refusals take nothing), so
    # two of the next five pass, wherever they land (unless the minute turned meanwhile).
    passed = 0
    for server in (a, b, a, b, a):
        _, code, _ = await collect(server.stub.Generate(request("sim"), metadata=metadata))
        passed += code == grpc.StatusCode.OK
    if int(time.time() // 60) == minute:
        assert passed == 2
