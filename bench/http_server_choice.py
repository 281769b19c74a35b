"""Which HTTP server for the door: aiohttp's vs uvicorn (httptools) with a bare ASGI app.

Each server streams SSE events of pre-built bytes (one write per event, as the door does) to many
concurrent readers; the figure is the server's CPU time per event, from /proc, with the server
pinned to core 0 and the readers to core 1 where there are two cores.

    .venv/bin/python bench/http_server_choice.py            # both, printed side by side
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

EVENT = (
    b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
)
TICK = os.sysconf("SC_CLK_TCK")


def serve_aiohttp(port: int, events: int, pause: float) -> None:
    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for _ in range(events):
            await response.write(EVENT)
            await asyncio.sleep(pause)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", stream)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_uvicorn(port: int, events: int, pause: float) -> None:
    import uvicorn

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        for _ in range(events):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})  # type: ignore[operator]
            await asyncio.sleep(pause)
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    uvicorn.run(app, host="127.0.0.1", port=port, loop="asyncio", http="httptools", log_level="error", lifespan="off")


async def load(port: int, streams: int, seconds: float) -> int:
    received = 0
    until = time.monotonic() + seconds

    async def reader() -> None:
        nonlocal received
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < until:
            w.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            while True:
                data = await r.read(65536)
                received += data.count(b"data: ")
                if not data or data.endswith(b"0\r\n\r\n"):
                    break
        w.close()

    await asyncio.gather(*(reader() for _ in range(streams)))
    return received


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(name: str, streams: int, seconds: float) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    proc = subprocess.Popen([*pin, sys.executable, __file__, "--serve", name, "--port", str(port)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        if pin:
            os.sched_setaffinity(0, {1})
        before = cpu(proc.pid)
        events = asyncio.run(load(port, streams, seconds))
        used = cpu(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(10)
    per_event = used / events * 1e6
    print(f"{name:<8} {streams} streams: {events} events in {seconds:g} s, server CPU {used:.2f} s", end="")
    print(f" = {per_event:.1f} µs/event")
    return per_event


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=("aiohttp", "uvicorn"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    if args.serve == "aiohttp":
        serve_aiohttp(args.port, 64, 0.02)
    elif args.serve == "uvicorn":
        serve_uvicorn(args.port, 64, 0.02)
    else:
        for name in ("aiohttp", "uvicorn", "aiohttp", "uvicorn"):
            measure(name, args.streams, args.seconds)


if __name__ == "__main__":
    main()
