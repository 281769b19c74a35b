"""Memory per open stream: what the server holds for each stream in flight, line by line (tracemalloc).

Starts the rig's fake upstream at a slow pace (streams stay open for the whole measurement) and the
server with tracemalloc on (`serve`, below: `python -m service` that writes a snapshot on SIGUSR1).
It takes a snapshot with no stream open, opens `--streams` streams and reads each one's first
text, takes another, and prints the server's RSS growth per 1,000 streams and the source lines that
hold the most per stream (every allocation of the server process: Python's, not the C core's).

    .venv/bin/python bench/stream_memory.py --streams 1000

Everything binds 127.0.0.1; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rig import LOAD_CORE, PY, SUT_CORE, Process, pinned, start

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc


def serve(config: str, dump: str) -> int:
    """The server, with a snapshot of its traced memory written to `dump`.N on every SIGUSR1."""
    from service.__main__ import configure_logging
    from service.__main__ import serve as serve_forever
    from service.config import load_config

    tracemalloc.start(1)
    loaded = load_config(Path(config), os.environ, {})
    configure_logging(loaded.server.log_level)
    taken = 0

    def snapshot() -> None:
        nonlocal taken
        taken += 1
        tracemalloc.take_snapshot().dump(f"{dump}.{taken}")
        print(f"snapshot {taken}", flush=True)

    async def main() -> int:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, snapshot)
        return await serve_forever(loaded)

    return asyncio.run(main())


async def snap(server: Process, n: int) -> tracemalloc.Snapshot:
    server.proc.send_signal(signal.SIGUSR1)
    path = Path(f"{server.log.parent}/snap.{n}")
    for _ in range(600):
        if f"snapshot {n}" in server.log.read_text():
            return tracemalloc.Snapshot.load(str(path))
        await asyncio.sleep(0.1)
    raise RuntimeError("no snapshot")


async def measure(server: Process, streams: int, top: int) -> None:
    request = pb.GenerateRequest(model="bench", messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        # Warm up: imports, the route's client and a first connection, allocated once.
        warm = [stub.Generate(request, timeout=120) for _ in range(20)]
        for call in warm:
            await call.read()
            await call.read()
        for call in warm:
            call.cancel()
        await asyncio.sleep(1.0)
        rss0 = server.rss_mib()
        before = await snap(server, 1)
        calls: list[Any] = [stub.Generate(request, timeout=300) for _ in range(streams)]
        for call in calls:
            await call.read()  # Start
            await call.read()  # the first text
        await asyncio.sleep(1.0)
        rss1 = server.rss_mib()
        after = await snap(server, 2)
        for call in calls:
            call.cancel()
    stats = after.compare_to(before, "lineno")
    traced = sum(s.size_diff for s in stats)
    blocks = sum(s.count_diff for s in stats)
    print(f"{streams} open streams: RSS +{rss1 - rss0:.1f} MiB ({(rss1 - rss0) / streams * 1000:.1f} MiB per 1,000)")
    print(
        f"traced Python allocations: +{traced / 2**20:.1f} MiB, {traced / streams / 1024:.1f} KiB and "
        f"{blocks / streams:.0f} blocks per stream"
    )
    print(f"{'per stream':>11} {'blocks':>7}  line")
    for s in stats[:top]:
        frame = s.traceback[0]
        name = frame.filename.replace(str(Path(PY).parent.parent), ".venv").replace(os.getcwd() + "/", "")
        print(f"{s.size_diff / streams:>9.0f} B {s.count_diff / streams:>7.1f}  {name}:{frame.lineno}")


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        upstream = start(
            "upstream",
            pinned(LOAD_CORE, [PY, "bench/upstream.py", "--tokens", "200", "--interval", "1.0"]),
            log_dir,
            r"on (\S+)",
        )
        config = log_dir / "tokenwire.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\nmax_concurrent_streams = 100000\nhttp_listen = ""\n'
            f'event_loop = "{args.event_loop}"\n\n'
            '[routes.bench]\nprovider = "openai-compatible"\nmodel = "bench-model"\n'
            f'options = {{ base_url = "http://{upstream.address}/v1", max_connections = 100000 }}\n'
        )
        argv = [PY, "bench/stream_memory.py", "serve", str(config), str(log_dir / "snap")]
        server = start("tokenwire", pinned(SUT_CORE, argv), log_dir, r"on (\S+);")
        try:
            started = time.monotonic()
            asyncio.run(measure(server, args.streams, args.top))
            print(f"({time.monotonic() - started:.0f} s)")
        finally:
            server.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
