"""Cancel probe: how fast a caller's cancel closes the provider's stream, and whether memory grows.

Runs a real server in this process over a real loopback channel, with the simulated provider
wrapped to record when its stream is closed. Each cycle opens a stream, reads a few chunks (or
none: cancel before the first token), cancels, and waits for the provider's stream to close.

    .venv/bin/python bench/cancel_probe.py --cycles 2000
    .venv/bin/python bench/cancel_probe.py --cycles 400 --provider openai

With `--provider openai` or `anthropic` the route is the real adapter and SDK in front of a fake
vendor on loopback (tests/fakes), and the latency runs to the moment that HTTP server sees its
connection close. Prints the cancel-to-close latency (p50/p99/max), the process RSS (server and
client together) after the first 10% of cycles and at the end, and the least-squares slope of RSS
over the cycles in between. Bounded in count and time; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fakes import FakeAnthropic, FakeOpenAI, StreamReply

from service.config import Config, ServerConfig, build_routes
from service.events import EventStream, GenerationRequest
from service.providers import KINDS
from service.providers.simulated import SimulatedProvider
from service.server import TokenwireServer
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

PROBE_KEY = "cancel-probe-key-0001"


class Probe:
    """What the provider side saw of the current cycle."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.closed_at = 0.0


PROBE = Probe()


class ProbedProvider(SimulatedProvider):
    kind = "probed"

    def stream(self, request: GenerationRequest) -> EventStream:
        return self._probed(request)

    async def _probed(self, request: GenerationRequest) -> EventStream:
        PROBE.started.set()
        try:
            async for event in super().stream(request):
                yield event
        finally:
            PROBE.closed_at = time.perf_counter()
            PROBE.closed.set()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main(cycles: int, provider: str) -> None:
    KINDS["probed"] = ProbedProvider
    streaming = {"first_token_ms": 1, "tokens_per_second": 200, "answer_tokens": 10_000}
    waiting = streaming | {"first_token_ms": 60_000}  # cancelled before its first token
    routes = {
        "streaming": {"provider": "probed", "model": "m", "options": streaming},
        "waiting": {"provider": "probed", "model": "m", "options": waiting},
    }
    fake: FakeOpenAI | FakeAnthropic | None = None
    if provider != "simulated":
        # A fake vendor on loopback behind the real adapter and SDK: the latency is measured
        # from the cancel to the moment the provider's HTTP server sees the connection close.
        fake = await (
            FakeOpenAI(api_key=PROBE_KEY) if provider == "openai" else FakeAnthropic(api_key=PROBE_KEY)
        ).start()
        os.environ["CANCEL_PROBE_KEY"] = PROBE_KEY
        options = {"base_url": fake.base_url, "api_key_env": "CANCEL_PROBE_KEY"}
        routes = {name: {"provider": provider, "model": "m", "options": options} for name in routes}
    config = Config(dataclasses.replace(ServerConfig(), listen="127.0.0.1:0"), build_routes(routes, "probe"))
    server = TokenwireServer(config)
    port = await server.start()
    latencies: list[float] = []
    messages = [pb.Message(role=pb.ROLE_USER, text="hi")]
    # (cycle, RSS) samples after the first 10% of cycles, when the caches have warmed up.
    rss: list[tuple[int, float]] = []
    every = max(cycles // 50, 1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        started = time.monotonic()
        for cycle in range(cycles):
            PROBE.started.clear()
            PROBE.closed.clear()
            chunks = cycle % 4  # 0: cancel before the first token; 1-3: after some chunks
            if fake is not None:
                fake.enqueue(
                    StreamReply(text=[f" t{i}" for i in range(10_000)], interval=0.005)
                    if chunks
                    else StreamReply(first_delay=60.0)
                )
            call = stub.Generate(pb.GenerateRequest(model="streaming" if chunks else "waiting", messages=messages))
            async with asyncio.timeout(10):
                for _ in range(chunks):
                    await call.read()
                if fake is None:
                    await PROBE.started.wait()  # the provider has the request
                    cancelled_at = time.perf_counter()
                    call.cancel()
                    await PROBE.closed.wait()
                    latencies.append(PROBE.closed_at - cancelled_at)
                else:
                    await fake.wait_requests(1)
                    cancelled_at = time.monotonic()
                    call.cancel()
                    latencies.append(await fake.wait_disconnected(0, timeout=5.0) - cancelled_at)
                    # The fake's record of requests is the probe's, not the server's, memory.
                    fake.requests.clear()
            if (cycle >= cycles // 10 and cycle % every == 0) or cycle == cycles - 1:
                rss.append((cycle, rss_mib()))
            if time.monotonic() - started > 300:
                break
    await server.stop(grace=1.0)
    if fake is not None:
        await fake.stop()
    latencies.sort()
    n = len(latencies)
    print(f"provider: {provider}, cycles: {n}, active streams after: {server.generation.active_streams}")
    print(
        "cancel -> provider stream closed: "
        f"p50 {statistics.median(latencies) * 1000:.2f} ms, p99 {latencies[int(n * 0.99) - 1] * 1000:.2f} ms, "
        f"max {latencies[-1] * 1000:.2f} ms"
    )
    print(f"RSS after 10% of cycles: {rss[0][1]:.1f} MiB, at the end: {rss[-1][1]:.1f} MiB")
    if len(rss) >= 3:
        slope = statistics.linear_regression([c for c, _ in rss], [m for _, m in rss]).slope
        print(f"RSS slope over the last 90% of cycles: {slope * 1024 * 1000:+.1f} KiB per 1000 cycles")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument(
        "--provider",
        choices=("simulated", "openai", "anthropic"),
        default="simulated",
        help="simulated: the built-in model; openai/anthropic: the adapter and SDK against a fake vendor",
    )
    args = parser.parse_args()
    asyncio.run(main(args.cycles, args.provider))
