"""The server as an operator runs it: `python -m service` in a process of its own, and SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fakes import FakeOpenAI, StreamReply
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ErrorInfo, assert_well_formed, detail, read_to_end, request, rich_status, vendor_route
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

CONFIG = """
[server]
listen = "127.0.0.1:0"
shutdown_grace_seconds = {grace}

[routes.short]
provider = "simulated"
model = "m"
options = {{ first_token_ms = 1, tokens_per_second = 50, answer_tokens = 20 }}

[routes.long]
provider = "simulated"
model = "m"
options = {{ first_token_ms = 1, tokens_per_second = 20, answer_tokens = 2000 }}
"""


class ServerProcess:
    def __init__(self, tmp_path: Path, grace: float) -> None:
        path = tmp_path / "tokenwire.toml"
        path.write_text(CONFIG.format(grace=grace))
        self.log = tmp_path / "server.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--config", str(path)],
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.address = self._wait_for_address()

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = re.search(r"listening on (\S+);", self.log.read_text())
            if found:
                return found.group(1)
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError("server did not report its address: " + self.log.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


async def read_rest(call: Any, into: list[pb.GenerateResponse] | None = None) -> list[pb.GenerateResponse]:
    """Reads a call started with read() to its end (grpc forbids mixing read() and iteration)."""
    messages = [] if into is None else into
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path, grace=2.0)
    yield server
    server.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_server_exits_0_on_signal(server_process: ServerProcess, sig: signal.Signals) -> None:
    server_process.proc.send_signal(sig)
    assert server_process.proc.wait(10) == 0
    assert "stopped" in server_process.log.read_text()


async def test_sigterm_drains_short_streams_and_ends_long_ones_with_shutting_down(
    server_process: ServerProcess,
) -> None:
    async with grpc.aio.insecure_channel(server_process.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        short = stub.Generate(request(model="short"))
        long = stub.Generate(request(model="long"))
        short_first = await short.read()
        long_first = await long.read()
        assert isinstance(short_first, pb.GenerateResponse) and isinstance(long_first, pb.GenerateResponse)

        signalled_at = time.monotonic()
        server_process.proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            reply = await health.Check(health_pb2.HealthCheckRequest())
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        # Health is still answered during the drain, so balancers see the server leave.
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        # New streams are refused with a status that says why and that a retry (elsewhere) helps.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(request(model="short")).read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (info.value.details() or "")

        short_rest = await read_rest(short)
        assert await short.code() == grpc.StatusCode.OK
        assert_well_formed([short_first, *short_rest])
        assert short_rest[-1].WhichOneof("event") == "finish"

        long_rest: list[pb.GenerateResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read_rest(long, long_rest)
        ended_after = time.monotonic() - signalled_at
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_well_formed([long_first, *long_rest])
    error = long_rest[-1].error
    assert error.code == pb.ERROR_CODE_SERVER_SHUTTING_DOWN and error.retryable
    assert error.last_sequence == long_rest[-1].sequence - 1
    assert ended_after < 2.0  # before the grace period is over
    assert server_process.proc.wait(10) == 0


def test_whole_streams_survive_being_read_by_a_sync_client(server_process: ServerProcess) -> None:
    with grpc.insecure_channel(server_process.address) as channel:
        messages = list(pb_grpc.GenerationServiceStub(channel).Generate(request(model="short"), timeout=10))
    assert_well_formed(messages)


def status_mirrors_terminal(messages: list[pb.GenerateResponse], code: grpc.StatusCode) -> bool:
    last = messages[-1]
    if last.WhichOneof("event") == "finish":
        return code == grpc.StatusCode.OK
    return code.value[0] == last.error.grpc_code and last.error.code == pb.ERROR_CODE_SERVER_SHUTTING_DOWN


async def test_shutdown_ends_every_stream_with_one_terminal_event_even_for_slow_readers(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flood = {"first_token_ms": 1, "tokens_per_second": 0, "answer_tokens": 100_000}
    paced = {"first_token_ms": 1, "tokens_per_second": 5, "answer_tokens": 1000}
    running = await start_server(
        routes={
            "flood": {"provider": "simulated", "model": "m", "options": flood},
            "paced": {"provider": "recording", "model": "m", "options": paced},
        }
    )
    # A 1 KiB flow-control window fills at once, so handlers writing to these readers sit in
    # the middle of a write when the shutdown comes.
    tiny_window = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 1024),
    ]
    channels = [grpc.aio.insecure_channel(running.address, options=tiny_window) for _ in range(8)]
    stubs = [pb_grpc.GenerationServiceStub(ch) for ch in channels]
    # Readers that have not read yet: some handlers are blocked writing a delta, some the Finish.
    unread = [stubs[i].Generate(request(model="flood", seed=1, max_output_tokens=57 + i)) for i in range(6)]
    # A reader that keeps reading, slowly, through the shutdown.
    slow = stubs[6].Generate(request(model="flood"))
    # A reader that never reads again: grpc cuts it at the end of the grace period.
    stalled = stubs[7].Generate(request(model="flood"))
    # Handlers waiting for their provider; the client of the second one hangs up mid-drain.
    waiting = running.stub.Generate(request(model="paced"))
    hangs_up = running.stub.Generate(request(model="paced"))

    async def read_slowly(call: Any) -> tuple[list[pb.GenerateResponse], grpc.StatusCode]:
        messages: list[pb.GenerateResponse] = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for message in call:
                messages.append(message)
                await asyncio.sleep(0.005)
        return messages, await call.code()

    slow_reading = asyncio.create_task(read_slowly(slow))
    waiting_first = await waiting.read()
    assert isinstance(waiting_first, pb.GenerateResponse)
    await hangs_up.read()
    await asyncio.sleep(0.5)  # the unread streams fill their windows

    stopping = asyncio.create_task(running.server.stop(grace=2.0))
    await asyncio.sleep(0.3)
    hangs_up.cancel()
    await asyncio.sleep(1.3)  # past the point where the server ends what is still open

    async def read(call: Any) -> tuple[list[pb.GenerateResponse], grpc.StatusCode]:
        messages: list[pb.GenerateResponse] = []
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for message in call:
                messages.append(message)
        return messages, await call.code()

    try:
        results = await asyncio.gather(*(read(call) for call in unread))
        slow_messages, slow_code = await slow_reading
        waiting_rest, waiting_code = await read_rest_with_code(waiting)
        await stopping
        stalled_messages, stalled_code = await read(stalled)
    finally:
        for channel in channels:
            await channel.close()

    for messages, code in [*results, (slow_messages, slow_code), ([waiting_first, *waiting_rest], waiting_code)]:
        assert_well_formed(messages)
        assert status_mirrors_terminal(messages, code), (messages[-1], code)
    assert slow_messages[-1].error.code == pb.ERROR_CODE_SERVER_SHUTTING_DOWN
    assert waiting_rest[-1].error.code == pb.ERROR_CODE_SERVER_SHUTTING_DOWN
    # A reader that stopped reading cannot be told anything: grpc ends its call when the grace
    # period is over, and it sees a stream without a terminal event, as documented.
    assert stalled_messages[-1].WhichOneof("event") == "text_delta"
    assert stalled_code == grpc.StatusCode.UNAVAILABLE
    assert running.server.generation.active_streams == 0
    assert "internal error" not in caplog.text
    outcomes = re.findall(r"route='(\w+)' outcome=(\w+)", caplog.text)
    assert ("paced", "CANCELLED") in outcomes  # the client that hung up mid-drain


async def read_rest_with_code(call: Any) -> tuple[list[pb.GenerateResponse], grpc.StatusCode]:
    messages: list[pb.GenerateResponse] = []
    with contextlib.suppress(grpc.aio.AioRpcError):
        await read_rest(call, messages)
    return messages, await call.code()


async def test_shutdown_closes_the_provider_streams_it_ends(start_server: Any, fake_openai: FakeOpenAI) -> None:
    fake_openai.enqueue(
        StreamReply(text=[f" t{i}" for i in range(5000)], interval=0.01),  # streaming when the drain ends
        StreamReply(first_delay=30.0),  # still waiting for its first token
    )
    running = await start_server(routes={"r": vendor_route(fake_openai)})
    streaming = running.stub.Generate(request(model="r"))
    first = await streaming.read()
    waiting = running.stub.Generate(request(model="r"))
    await fake_openai.wait_requests(2)
    stopping_at = time.monotonic()
    await running.server.stop(grace=1.0)
    stopped_after = time.monotonic() - stopping_at
    for record in fake_openai.requests:
        assert record.disconnected_at is not None
        assert record.disconnected_at - stopping_at < 1.0  # within the grace period
    assert stopped_after < 1.5
    messages, code, _ = await read_to_end(streaming, [first])
    assert_well_formed(messages)
    assert messages[-1].error.code == pb.ERROR_CODE_SERVER_SHUTTING_DOWN
    assert code == grpc.StatusCode.UNAVAILABLE
    nothing, code, trailing = await read_to_end(waiting)
    assert nothing == []
    assert code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "SERVER_SHUTTING_DOWN"


def start_workers(tmp_path: Path, workers: int) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "tokenwire.toml"
    config.write_text(CONFIG.format(grace=2.0))
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--config", str(config), "--workers", str(workers)],
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return proc, log


async def test_workers_share_the_port_and_all_serve(tmp_path: Path) -> None:
    proc, log = start_workers(tmp_path, 2)
    try:
        deadline = time.monotonic() + 20
        while len(re.findall(r"worker \d INFO tokenwire: tokenwire \S+ listening on (\S+);", log.read_text())) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        addresses = set(re.findall(r"listening on (\S+);", log.read_text()))
        assert len(addresses) == 1  # one port, two processes
        (address,) = addresses

        # Separate connections: the kernel spreads them over the workers.
        async def one() -> None:
            async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                messages = [m async for m in pb_grpc.GenerationServiceStub(channel).Generate(request(model="short"))]
            assert_well_formed(messages)

        await asyncio.gather(*(one() for _ in range(16)))
        await asyncio.sleep(0.2)
        served_by = set(re.findall(r"worker (\d) INFO tokenwire.generation: stream", log.read_text()))
        assert served_by == {"1", "2"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert len(re.findall(r"worker \d INFO tokenwire: stopped", log.read_text())) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
