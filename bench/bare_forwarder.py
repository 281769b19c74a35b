"""The floor: the least a gRPC relay of an SSE stream can do in Python with grpc.aio on this machine.

For each Generate call it takes a kept-alive raw socket to the upstream, sends one pre-built HTTP
request, and copies each SSE event's text into a GenerateResponse: a Start, the deltas, a Finish.
No validation, no accounting, no error handling worth the name: tokenwire is judged against it.

    .venv/bin/python bench/bare_forwarder.py --upstream 127.0.0.1:PORT

Prints `listening on 127.0.0.1:PORT`; serves until SIGTERM/SIGINT. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

from tokenwire.v1 import generation_pb2 as pb

MARK = b'"content":"'


async def serve(upstream: str) -> None:
    host, _, port = upstream.rpartition(":")
    body = b'{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {upstream}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def generate(req: Any, context: Any) -> None:
        reader, writer = idle.pop() if idle else await asyncio.open_connection(host, int(port))
        writer.write(request)
        sequence = 1
        await context.write(pb.GenerateResponse(sequence=1, start=pb.Start(stream_id="bare")))
        buffer = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buffer += data
            end = buffer.rfind(b"\n\n")
            if end < 0:
                continue
            events, buffer = buffer[: end + 2], buffer[end + 2 :]
            at = events.find(MARK)
            while at >= 0:
                start = at + len(MARK)
                stop = events.index(b'"', start)
                if stop > start:
                    sequence += 1
                    text = events[start:stop].decode()
                    await context.write(pb.GenerateResponse(sequence=sequence, text_delta=pb.TextDelta(text=text)))
                at = events.find(MARK, stop)
            if buffer.endswith(b"0\r\n\r\n") or events.endswith(b"[DONE]\n\n"):
                break
        idle.append((reader, writer))
        sequence += 1
        await context.write(pb.GenerateResponse(sequence=sequence, finish=pb.Finish(reason=pb.FINISH_REASON_STOP)))

    handler = grpc.unary_stream_rpc_method_handler(
        generate,
        request_deserializer=pb.GenerateRequest.FromString,
        response_serializer=pb.GenerateResponse.SerializeToString,
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tokenwire.v1.GenerationService", {"Generate": handler}),)
    )
    bound = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the OpenAI-compatible upstream")
    parser.add_argument(
        "--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="as tokenwire's [server] event_loop"
    )
    args = parser.parse_args()
    # The loop tokenwire runs on (its `auto`: uvloop where installed): the floor must be measured
    # on the same stack.
    if args.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if args.event_loop == "uvloop":
                raise
        else:
            uvloop.run(serve(args.upstream))
            return
    asyncio.run(serve(args.upstream))


if __name__ == "__main__":
    main()
