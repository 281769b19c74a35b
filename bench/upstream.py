"""The benchmark's fake upstream: an OpenAI-compatible chat completions endpoint on loopback that
streams pre-rendered SSE bytes at a fixed pace.

It must cost far less than what it measures, so nothing is built per event: every frame of the
answer is rendered once at start, a stream is a chain of timer callbacks writing those bytes (no
task, no JSON), and requests are read just enough to find their end. Tokens are `--token` (four
characters by default), so a client can count chunks from text alone, even when a relay merged
several into one message.

    .venv/bin/python bench/upstream.py --tokens 64 --interval 0.02

Prints `listening on 127.0.0.1:PORT` and serves until SIGTERM/SIGINT. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Script:
    """What every response is: pre-rendered HTTP bytes and the pace to send them at."""

    head: bytes
    chunks: tuple[bytes, ...]  # one HTTP chunk per write (events_per_write frames each)
    tail: bytes
    first_delay: float
    interval: float  # between writes


def render(tokens: int, token: str, events_per_write: int, interval: float, first_delay: float) -> Script:
    def frame(payload: dict[str, object]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "bench-model"}
    opening = frame(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    delta = frame(base | {"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
    finish = frame(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    usage = frame(
        base | {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10}}
    )

    def http_chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    frames = [delta] * tokens
    writes = [b"".join(frames[i : i + events_per_write]) for i in range(0, tokens, events_per_write)]
    writes[0] = opening + writes[0]
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
    )
    tail = http_chunk(finish + usage + b"data: [DONE]\n\n") + b"0\r\n\r\n"
    return Script(head, tuple(http_chunk(w) for w in writes), tail, first_delay, interval * events_per_write)


class Connection(asyncio.Protocol):
    def __init__(self, script: Script) -> None:
        self.script = script
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.streaming = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            self._start()

    def _start(self) -> None:
        assert self.transport is not None
        self.streaming = True
        self.transport.write(self.script.head)
        start = self.loop.time() + self.script.first_delay
        self.timer = self.loop.call_at(start, self._write, 0, start)

    def _write(self, index: int, start: float) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        chunks = self.script.chunks
        transport.write(chunks[index])
        index += 1
        if index < len(chunks):
            # On an absolute schedule, so that late timers do not add up.
            self.timer = self.loop.call_at(start + index * self.script.interval, self._write, index, start)
            return
        transport.write(self.script.tail)
        self.streaming = False
        self.timer = None
        if self.buffer:
            self.data_received(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


async def serve(args: argparse.Namespace) -> None:
    script = render(args.tokens, args.token, args.events_per_write, args.interval, args.first_delay)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(script), "127.0.0.1", args.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=64, help="text chunks per response")
    parser.add_argument("--token", default="tok ", help="the text of every chunk")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--first-delay", type=float, default=0.0, help="seconds before the first chunk")
    parser.add_argument("--events-per-write", type=int, default=1)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(args))
    except ImportError:
        asyncio.run(serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
