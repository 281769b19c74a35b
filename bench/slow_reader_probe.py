"""Slow-reader probe: what callers that stop reading cost the server, and whether they lose anything.

Starts the server as an operator runs it (`python -m service`, its own process) with a route to a
fake OpenAI-compatible vendor on loopback, opens `--streams` streams whose answers are bigger than
what flow control and socket buffers hold, reads one chunk of each and then stops reading. While
they stall it measures the server's RSS and how much of each answer the vendor managed to send;
then it reads every stream to its end and checks it: every chunk, once, in order, one Finish.

    .venv/bin/python bench/slow_reader_probe.py --streams 100
    .venv/bin/python bench/slow_reader_probe.py --streams 100 --event-loop uvloop

Bounded in count and time; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fakes import FakeOpenAI, StreamReply
from rig import Process, start

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

KEY_ENV = "SLOW_READER_PROBE_KEY"
CONFIG = """
[server]
listen = "127.0.0.1:0"
max_concurrent_streams = 10000
event_loop = "{event_loop}"
http_listen = ""

[routes.big]
provider = "openai"
model = "gpt-probe"
options = {{ base_url = "{base_url}", api_key_env = "{key_env}" }}
"""


async def probe(streams: int, pieces: int, piece_bytes: int, tmp: Path, event_loop: str) -> int:
    text = ["z" * piece_bytes] * pieces
    async with FakeOpenAI(default=StreamReply(text=text, events_per_write=8)) as fake:
        os.environ[KEY_ENV] = fake.api_key
        config = tmp / "tokenwire.toml"
        config.write_text(CONFIG.format(base_url=fake.base_url, key_env=KEY_ENV, event_loop=event_loop))
        server = start(
            "tokenwire", [sys.executable, "-m", "service", "--config", str(config)], tmp, r"listening on (\S+);"
        )
        try:
            return await run(server, fake, streams, pieces, piece_bytes)
        except grpc.aio.AioRpcError:
            print(server.log.read_text(errors="replace")[-12000:], file=sys.stderr)
            raise
        finally:
            server.stop()


async def run(server: Process, fake: FakeOpenAI, streams: int, pieces: int, size: int) -> int:
    request = pb.GenerateRequest(model="big", messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # Warm up: imports, the SDK client and its pool allocate once.
        async for _ in stub.Generate(request, timeout=60):
            pass
        fake.requests.clear()
        idle = server.rss_mib()
        calls = [stub.Generate(request, timeout=120) for _ in range(streams)]
        firsts: list[Any] = await asyncio.gather(*(call.read() for call in calls))
        # Every stream fills what it can (gRPC flow control, socket buffers), then stalls: wait
        # until no vendor has sent anything for half a second, for at most 10 s.
        await asyncio.sleep(1.0)
        for _ in range(20):
            sent = [r.bytes_sent for r in fake.requests]
            await asyncio.sleep(0.5)
            still = sum(a == b.bytes_sent for a, b in zip(sent, fake.requests, strict=True))
            if still == streams:
                break
        stalled = server.rss_mib()
        answer_mb = pieces * (size + 100) / 1e6

        async def drain(call: Any, first: pb.GenerateResponse) -> bool:
            messages = [first]
            while isinstance(message := await call.read(), pb.GenerateResponse):
                messages.append(message)
            ok = [m.sequence for m in messages] == list(range(1, len(messages) + 1))
            # Chunks that queued while the reader stalled arrive merged: count the text.
            text = sum(len(m.text_delta.text) for m in messages if m.HasField("text_delta"))
            return ok and text == pieces * size and messages[-1].HasField("finish")

        started = time.monotonic()
        complete = sum(await asyncio.gather(*(drain(c, f) for c, f in zip(calls, firsts, strict=True))))
        drained_s = time.monotonic() - started
    print(f"streams: {streams}, answer: {pieces} chunks of {size} B (~{answer_mb:.1f} MB of SSE each)")
    print(
        f"while stalled: upstream paused on {still} of {streams} streams, "
        f"vendor had sent {sum(sent) / len(sent) / 1e6:.2f} MB per stream on average"
    )
    print(
        f"server RSS: idle {idle:.1f} MiB, {streams} stalled readers {stalled:.1f} MiB "
        f"(+{stalled - idle:.1f} MiB, {(stalled - idle) * 1024 / streams:.0f} KiB per stream)"
    )
    print(f"after draining: {complete} of {streams} streams complete, in order, one Finish ({drained_s:.1f} s)")
    return 0 if complete == streams and still == streams else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--pieces", type=int, default=1500, help="text chunks per answer")
    parser.add_argument("--piece-bytes", type=int, default=8000, help="bytes of text per chunk")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio", help="the server's loop")
    args = parser.parse_args()
    print(f"server event loop: {args.event_loop}")
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(probe(args.streams, args.pieces, args.piece_bytes, Path(tmp), args.event_loop))


if __name__ == "__main__":
    sys.exit(main())
