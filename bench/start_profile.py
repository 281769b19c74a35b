"""Where tokenwire's event loop spends its time, under both start shapes (py-spy).

Starts the rig's fake upstream and `python -m service` (pinned as the rig pins them), drives
`--streams` streams through bench/loadgen.py with even and then bursty starts, and samples the
server with py-spy for `--seconds` each. Every sample is put in the first bucket whose frames it
matches (BUCKETS, most specific first); the table gives each bucket's share of the busy samples.
The buckets above "stream start: total" are the work done before a stream's first upstream byte.

    .venv/bin/python bench/start_profile.py --streams 100 --seconds 8
    .venv/bin/python bench/start_profile.py --raw bench/results/profile   # keep py-spy's raw stacks
    .venv/bin/python bench/start_profile.py --from-raw bench/results/profile   # count kept stacks again
    .venv/bin/python bench/start_profile.py --send-cost 2000   # CPU per upstream request: template vs SDK

`--send-cost N` measures one thing without py-spy or the server: the CPU this process spends on
each of N upstream requests of an openai-compatible route, until the response's head and then to
the end of its (one-token) body, through the route's request template and through the SDK
(`post_streaming`), alternated twice. A CPU time of one process, so less at the mercy of a shared
machine than a latency.

Everything binds 127.0.0.1; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rig import LOAD_CORE, PY, ROOT, SUT_CORE, pinned, start

# (bucket, substrings of a frame any of which puts a sample in it); the first bucket that matches wins.
START_BUCKETS = [
    ("start: request validation", ("validation.py", "admissible (")),
    (
        "start: transport request send (http1)",
        ("handle_async_request (", "_connect (", "send (service/providers/http1"),
    ),
    # The route's request template: the head rendered and handed to the transport, no SDK.
    ("start: request template (upstream, http1 send_head)", ("TemplateSender._send (", "send_head (", "render (")),
    ("start: SDK request building (openai, anthropic, httpx2)", ("openai/", "anthropic/", "httpx2/")),
    (
        "start: provider adapter, routing",
        ("service/providers/openai.py", "service/providers/upstream.py", "routing.py"),
    ),
    ("start: Start message", ("start_message (",)),
    ("start: stream setup (gateway, relay)", ("__aenter__ (service/gateway", "ephemeral (", "stream_id (")),
]
RUN_BUCKETS = [
    ("relay: grpc write", ("_write (service/generation.py", "cygrpc", "_cython")),
    ("relay: reading the provider (body, SSE, parse)", ("_read (service/streams.py", "data_received (", "sse.py")),
    ("relay: sequencer and merging", ("service/streams.py",)),
    ("closing log line", ("log_outcome (", "logging/")),
    ("grpc handler, other", ("service/generation.py",)),
    ("event loop, other", ("asyncio/", "uvloop")),
]


# A sample is in a stream's start when one of these frames is on its stack: admission and
# validation, the gateway entering the stream (routing, the provider's open up to its first event),
# the Start message. Without this the start buckets also took the read loop (HTTPProvider._stream
# is on the stack for a stream's whole life).
START_ROOTS = ("admissible (", "validation.py", "__aenter__ (service/gateway", "ephemeral (", "start_message (")


def bucket(stack: str) -> str:
    frames = stack.split(";")
    starting = any(root in frame for frame in frames for root in START_ROOTS)
    for name, marks in (START_BUCKETS if starting else []) + RUN_BUCKETS:
        if any(mark in frame for frame in frames for mark in marks):
            return name
    return "start: other" if starting else "other"


def profile(pid: int, seconds: float, out: Path) -> collections.Counter[str]:
    subprocess.run(
        [
            *(str(Path(PY).parent / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds))),
            *("--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"),
        ],
        check=True,
        capture_output=True,
    )
    return buckets(out)


def buckets(out: Path) -> collections.Counter[str]:
    """py-spy's raw stacks (one `frame;frame;... count` a line) counted per bucket."""
    counts: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[bucket(stack)] += int(n)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--starts", default="even,bursty")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here (a directory)")
    parser.add_argument("--from-raw", type=Path, help="only count the raw stacks a run kept there (--raw)")
    parser.add_argument("--send-cost", type=int, metavar="N", help="only measure N requests' CPU (see above)")
    args = parser.parse_args()
    if args.send_cost:
        asyncio.run(send_cost(args.send_cost))
        return 0
    if args.from_raw is not None:
        kept = {shape: buckets(args.from_raw / f"profile-{shape}.txt") for shape in args.starts.split(",")}
        report(kept, f"{args.from_raw}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        upstream = start(
            "upstream", pinned(LOAD_CORE, [PY, "bench/upstream.py", "--tokens", str(args.tokens)]), log_dir, r"on (\S+)"
        )
        config = log_dir / "tokenwire.toml"
        config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\nmax_concurrent_streams = 100000\nhttp_listen = ""\n'
            # No metrics port: a fixed one may be taken by another server on this machine.
            'metrics_listen = ""\n'
            f'event_loop = "{args.event_loop}"\n\n'
            '[routes.bench]\nprovider = "openai-compatible"\nmodel = "bench-model"\n'
            f'options = {{ base_url = "http://{upstream.address}/v1" }}\n'
        )
        server = start(
            "tokenwire", pinned(SUT_CORE, [PY, "-m", "service", "--config", str(config)]), log_dir, r"on (\S+);"
        )
        results: dict[str, collections.Counter[str]] = {}
        try:
            for shape in args.starts.split(","):
                load = subprocess.Popen(
                    pinned(
                        LOAD_CORE,
                        [
                            *(PY, "bench/loadgen.py", "grpc", server.address, "--streams", str(args.streams)),
                            *("--seconds", str(args.seconds + 2), "--warmup", "1", "--starts", shape),
                        ],
                    ),
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                )
                time.sleep(2)
                raw = (args.raw or log_dir) / f"profile-{shape}.txt"
                raw.parent.mkdir(parents=True, exist_ok=True)
                results[shape] = profile(server.proc.pid, args.seconds, raw)
                load.communicate(timeout=args.seconds + 60)
        finally:
            server.stop()
            upstream.stop()
    report(results, f"{args.streams} streams, server on {args.event_loop}")
    return 0


async def send_cost(n: int) -> None:
    sys.path.insert(0, str(ROOT))  # this checkout's service package, whatever is installed
    from service.config import build_routes
    from service.events import ChatMessage, GenerationRequest, Role
    from service.providers import create_provider

    with tempfile.TemporaryDirectory() as tmp:
        argv = [PY, "bench/upstream.py", "--tokens", "1", "--interval", "0"]
        upstream = start("upstream", pinned(LOAD_CORE, argv), Path(tmp), r"on (\S+)")
        try:
            options = {"base_url": f"http://{upstream.address}/v1"}
            spec = {"provider": "openai-compatible", "model": "bench-model", "options": options}
            route = build_routes({"r": spec}, "bench")["r"]
            request = GenerationRequest(
                stream_id="s", route="r", upstream_model="bench-model", messages=(ChatMessage(Role.USER, "Hi."),)
            )
            figures: dict[str, list[tuple[float, float]]] = {}
            for path in ("sdk", "template", "sdk", "template"):
                provider: Any = create_provider(route)
                if path == "sdk":
                    provider.sender.template = _no_template
                for _ in range(50):  # warm up: the connection, the template, the SDK's caches
                    async with provider._send(request) as response:
                        await response.aread()
                head = 0.0
                began = time.process_time()
                for _ in range(n):
                    sent = time.process_time()
                    async with provider._send(request) as response:
                        head += time.process_time() - sent
                        await response.aread()
                whole = time.process_time() - began
                figures.setdefault(path, []).append((head / n * 1e6, whole / n * 1e6))
                await provider.aclose()
        finally:
            upstream.stop()
    print(f"CPU per upstream request, {n} requests, openai-compatible route (two rounds each)")
    for path, rounds in figures.items():
        heads = ", ".join(f"{h:.0f}" for h, _ in rounds)
        wholes = ", ".join(f"{w:.0f}" for _, w in rounds)
        print(f"  {path:<9} to the response head: {heads} us; whole request, body read and closed: {wholes} us")


async def _no_template(path: str) -> None:
    """A sender's `template` that never has one: every request goes through the SDK."""
    return None


def report(results: dict[str, collections.Counter[str]], about: str) -> None:
    names = [name for name, _ in START_BUCKETS] + ["start: other", "stream start: total"]
    names += [name for name, _ in RUN_BUCKETS]
    names.append("other")
    shapes = list(results)
    print(f"py-spy, {about}; share of the loop's busy samples")
    print(f"{'bucket':<58}" + "".join(f"{s:>10}" for s in shapes))
    for name in names:
        cells = []
        for shape in shapes:
            counts = results[shape]
            total = sum(counts.values()) or 1
            starts = [b for b, _ in START_BUCKETS] + ["start: other"]
            n = sum(counts[b] for b in starts) if name == "stream start: total" else counts[name]
            cells.append(f"{n / total:>10.1%}")
        print(f"{name:<58}" + "".join(cells))
    print("samples:" + "".join(f" {s} {sum(results[s].values())}" for s in shapes))


if __name__ == "__main__":
    if not shutil.which(str(Path(PY).parent / "py-spy")):
        sys.exit("needs py-spy (a dev dependency)")
    sys.exit(main())
