"""Hundreds of concurrent streams through the real adapters: every one well-formed, nothing logged
as an error, nothing left running."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from fakes import FakeAnthropic, FakeOpenAI, StreamReply

from conftest import assert_well_formed, collect, eventually, request, vendor_route
from tokenwire.v1 import generation_pb2 as pb


async def test_hundreds_of_concurrent_provider_streams_with_cancels_among_them(
    start_server: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pieces = [f" w{i}" for i in range(20)]
    for fake in (fake_openai, fake_anthropic):
        fake.default = StreamReply(text=pieces, interval=0.02)
    running = await start_server(
        routes={"openai": vendor_route(fake_openai), "anthropic": vendor_route(fake_anthropic)}
    )

    async def whole(i: int) -> None:
        route = ("openai", "anthropic")[i % 2]
        messages, code, _ = await collect(running.stub.Generate(request(model=route, request_id=f"load-{i}")))
        assert code == grpc.StatusCode.OK, (i, code)
        assert_well_formed(messages)
        assert messages[0].start.stream_id == f"load-{i}"
        assert "".join(m.text_delta.text for m in messages) == "".join(pieces)

    async def cancelled(i: int) -> None:
        call = running.stub.Generate(request(model=("openai", "anthropic")[i % 2]))
        for _ in range(1 + i % 5):
            assert isinstance(await call.read(), pb.GenerateResponse)
        call.cancel()

    await asyncio.gather(*(whole(i) for i in range(300)), *(cancelled(i) for i in range(40)))
    await eventually(lambda: running.server.generation.active_streams == 0, within=5.0)
    await eventually(lambda: fake_openai.open_connections + fake_anthropic.open_connections <= 300, within=5.0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors[:3]]
    assert len(fake_openai.requests) + len(fake_anthropic.requests) == 340
