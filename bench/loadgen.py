"""The benchmark's load generator: N concurrent streams, back to back, for a fixed time; prints one JSON
object with what it saw.

Two ways to ask: `grpc` (tokenwire's Generate, or the bare forwarder: one shared channel, the cheapest
layout) and `sse` (an OpenAI-compatible HTTP endpoint: the upstream itself, or LiteLLM), read as raw
bytes over keep-alive connections. Every stream is checked: all `--tokens` chunks, and for gRPC
contiguous sequences and exactly one terminal Finish. Chunks are counted from the text (every
upstream token is `--token`), so a message that carries several merged chunks counts for all of them,
each arriving when the message did.

Starts come in two shapes (`--starts`): `even`, the workers' first streams spread over one stream's
length (`--period`), so that a new stream starts every period / streams seconds from then on; and
`bursty`, every worker's stream starts at once, they end together, and the next round starts when
the last of them has ended.

    .venv/bin/python bench/loadgen.py grpc 127.0.0.1:50051 --streams 100 --seconds 10

Talks to 127.0.0.1 only; bounded by --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    # Durable streams broken on purpose: from the Resume call to its first message.
    resumes: list[float] = field(default_factory=list)
    chunks: int = 0
    ok: int = 0
    bad: int = 0
    problems: list[str] = field(default_factory=list)
    recording: bool = False

    def stream(self, started: float, arrivals: list[float], complete: bool, problem: str = "") -> None:
        if not self.recording:
            return
        if not complete:
            self.bad += 1
            if len(self.problems) < 5:
                self.problems.append(problem)
            return
        self.ok += 1
        self.chunks += len(arrivals)
        self.ttft.append(arrivals[0] - started)
        self.gaps.extend(b - a for a, b in itertools.pairwise(arrivals))


@dataclass
class _Reading:
    """One stream as it is read, over its first call and, when it was broken, its Resume."""

    width: int
    arrivals: list[float] = field(default_factory=list)
    expected: int = 1
    finishes: int = 0
    problem: str = ""
    resume_token: str = ""

    def take(self, message: pb.GenerateResponse, now: float) -> str | None:
        """Checks and counts one message; returns its event case."""
        if message.sequence != self.expected:
            self.problem = f"sequence {message.sequence}, expected {self.expected}"
        self.expected += 1
        kind = message.WhichOneof("event")
        if kind == "text_delta":
            self.arrivals.extend([now] * (len(message.text_delta.text) // self.width))
        elif kind == "start":
            self.resume_token = message.start.resume_token
        elif kind == "finish":
            self.finishes += 1
        elif kind == "error":
            self.problem = f"error {message.error.code}"
        return kind


async def grpc_worker(
    stub: Any,
    model: str,
    tokens: int,
    token: str,
    tally: Tally,
    starts: Starts,
    durable: float,
    break_after: int,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """Streams back to back. With `durable`, each stream asks for that resume window; with
    `break_after` too, its call is cancelled after that many messages and the stream resumed."""
    while await starts.next():
        request = pb.GenerateRequest(model=model, messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
        if durable:
            request.resume_window.FromNanoseconds(int(durable * 1e9))
            request.request_id = uuid.uuid4().hex
        started = time.perf_counter()
        reading = _Reading(len(token))
        call = stub.Generate(request, timeout=60, metadata=metadata)
        try:
            async for message in call:
                kind = reading.take(message, time.perf_counter())
                if break_after and reading.expected - 1 == break_after and kind not in ("finish", "error"):
                    call.cancel()
                    break
        except grpc.aio.AioRpcError as err:
            reading.problem = f"status {err.code().name}"
        if break_after and not reading.finishes and not reading.problem:
            # Let the journal get ahead of the cursor: the latency measured is then the resume's own,
            # not the wait for the upstream's next token.
            await asyncio.sleep(0.1)
            resumed = pb.ResumeRequest(
                stream_id=request.request_id, resume_token=reading.resume_token, after_sequence=reading.expected - 1
            )
            asked = time.perf_counter()
            try:
                async for message in stub.Resume(resumed, timeout=60):
                    now = time.perf_counter()
                    if message.sequence == resumed.after_sequence + 1 and tally.recording:
                        tally.resumes.append(now - asked)
                    reading.take(message, now)
            except grpc.aio.AioRpcError as err:
                reading.problem = f"resume status {err.code().name}"
        complete = not reading.problem and reading.finishes == 1 and len(reading.arrivals) == tokens
        tally.stream(
            started,
            reading.arrivals,
            complete,
            reading.problem or f"{len(reading.arrivals)} chunks, {reading.finishes} finishes",
        )


async def sse_worker(
    host: str, port: int, model: str, tokens: int, token: str, tally: Tally, starts: Starts, path: str, key: str
) -> None:
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}, separators=(",", ":")
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    # A relay may merge deltas that queued up into one chunk: count the tokens in each content.
    pattern = re.compile(rb'"content": ?"((?:' + re.escape(token.encode()) + rb')+)"')
    width = len(token.encode())
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while await starts.next():
            started = time.perf_counter()
            writer.write(head + body)
            arrivals: list[float] = []
            ended = False
            problem = ""
            while not ended:
                data = await reader.read(65536)
                now = time.perf_counter()
                if not data:
                    problem = "connection closed"
                    break
                arrivals.extend([now] * (sum(map(len, pattern.findall(data))) // width))
                # The end of the chunked body (after the [DONE] event).
                ended = data.endswith(b"0\r\n\r\n")
            complete = ended and len(arrivals) == tokens
            tally.stream(started, arrivals, complete, problem or f"{len(arrivals)} chunks")
            if problem:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


class Starts:
    """When each worker starts its next stream; `next()` says whether it should start one at all."""

    def __init__(self, shape: str, streams: int, period: float, until: float) -> None:
        self.shape, self.streams, self.period, self.until = shape, streams, period, until
        self._arrived = 0
        self._round = asyncio.Event()
        self._go = True

    async def first(self, worker: int) -> None:
        if self.shape == "even":
            await asyncio.sleep(self.period * worker / self.streams)

    async def next(self) -> bool:
        if self.shape != "bursty":
            return time.perf_counter() < self.until
        # A round starts when every worker has arrived; the last to arrive decides for them all,
        # so no worker waits for one that has stopped.
        self._arrived += 1
        this_round = self._round
        if self._arrived == self.streams:
            self._go = time.perf_counter() < self.until
            self._arrived = 0
            self._round = asyncio.Event()
            this_round.set()
        else:
            await this_round.wait()
        return self._go


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(int(len(values) * q), len(values) - 1)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tally = Tally()
    loop_start = time.perf_counter()
    until = loop_start + args.warmup + args.seconds
    host, _, port = args.target.rpartition(":")
    channel = None
    starts = Starts(args.starts, args.streams, args.period or args.tokens * 0.02, until)
    if args.mode == "grpc":
        channel = grpc.aio.insecure_channel(args.target)
        stub = pb_grpc.GenerationServiceStub(channel)
        workers = [
            grpc_worker(
                stub,
                args.model,
                args.tokens,
                args.token,
                tally,
                starts,
                args.durable,
                args.break_after,
                (("authorization", f"Bearer {args.key}"),) if args.grpc_key else (),
            )
            for _ in range(args.streams)
        ]
    else:
        workers = [
            sse_worker(host, int(port), args.model, args.tokens, args.token, tally, starts, args.path, args.key)
            for _ in range(args.streams)
        ]

    async def started(worker: int, work: Any) -> None:
        await starts.first(worker)
        await work

    tasks = [asyncio.ensure_future(started(n, w)) for n, w in enumerate(workers)]
    await asyncio.sleep(args.warmup)
    tally.recording = True
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    measured_from = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - measured_from
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if channel is not None:
        await channel.close()
    return {
        "streams": args.streams,
        "starts": args.starts,
        "seconds": elapsed,
        "ok": tally.ok,
        "bad": tally.bad,
        "problems": tally.problems,
        "chunks": tally.chunks,
        "chunks_per_second": tally.chunks / elapsed if elapsed else 0.0,
        "ttft_p50": percentile(tally.ttft, 0.5),
        "ttft_p99": percentile(tally.ttft, 0.99),
        "gap_p50": percentile(tally.gaps, 0.5),
        "gap_p99": percentile(tally.gaps, 0.99),
        "resumes": len(tally.resumes),
        "resume_p50": percentile(tally.resumes, 0.5),
        "resume_p99": percentile(tally.resumes, 0.99),
        "loadgen_cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("grpc", "sse"))
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--path", default="/v1/chat/completions", help="sse: the endpoint's path")
    parser.add_argument("--key", default="bench-key", help="sse: the bearer key to send")
    parser.add_argument("--grpc-key", action="store_true", help="grpc: send --key as authorization metadata")
    parser.add_argument("--streams", type=int, default=10, help="concurrent streams")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds run before measuring")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token", default="tok ")
    parser.add_argument("--durable", type=float, default=0.0, help="grpc: ask for this resume window (seconds)")
    parser.add_argument(
        "--break-after", type=int, default=0, help="grpc, with --durable: cancel each call after N messages, resume"
    )
    parser.add_argument("--starts", choices=("even", "bursty"), default="even", help="the start shape")
    parser.add_argument(
        "--period", type=float, default=0.0, help="even: seconds one stream lasts (default: tokens x 20 ms)"
    )
    args = parser.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
