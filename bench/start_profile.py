"""Where tokenwire's event loop spends its time, under both start shapes (py-spy).

Starts the rig's fake upstream and `python -m service` (pinned as the rig pins them), drives
`--streams` streams through bench/loadgen.py with even and then bursty starts, and samples the
server with py-spy for `--seconds` each. Every sample is put in the first bucket whose frames it
matches (BUCKETS, most specific first); the table gives each bucket's share of the busy samples.
The buckets above "stream start: total" are the work done before a stream's first upstream byte.

    .venv/bin/python bench/start_profile.py --streams 100 --seconds 8
    .venv/bin/python bench/start_profile.py --raw bench/results/profile   # keep py-spy's raw stacks

Everything binds 127.0.0.1; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rig import LOAD_CORE, PY, ROOT, SUT_CORE, pinned, start

# (bucket, substrings of a frame any of which puts a sample in it); the first bucket that matches wins.
START_BUCKETS = [
    ("start: request validation", ("validation.py", "admissible (")),
    ("start: SDK request building (openai, httpx2 client)", ("openai/", "httpx2/")),
    (
        "start: transport request send (http1)",
        ("handle_async_request (", "_connect (", "send (service/providers/http1"),
    ),
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


def bucket(stack: str) -> str:
    frames = stack.split(";")
    for name, marks in START_BUCKETS + RUN_BUCKETS:
        if any(mark in frame for frame in frames for mark in marks):
            return name
    return "other"


def profile(pid: int, seconds: float, out: Path) -> collections.Counter[str]:
    subprocess.run(
        [
            *(str(Path(PY).parent / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds))),
            *("--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"),
        ],
        check=True,
        capture_output=True,
    )
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
    args = parser.parse_args()
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
    names = [name for name, _ in START_BUCKETS] + ["stream start: total"] + [name for name, _ in RUN_BUCKETS]
    names.append("other")
    shapes = list(results)
    print(f"py-spy, {args.streams} streams, server on {args.event_loop}; share of the loop's busy samples")
    print(f"{'bucket':<52}" + "".join(f"{s:>10}" for s in shapes))
    for name in names:
        cells = []
        for shape in shapes:
            counts = results[shape]
            total = sum(counts.values()) or 1
            n = sum(counts[b] for b, _ in START_BUCKETS) if name == "stream start: total" else counts[name]
            cells.append(f"{n / total:>10.1%}")
        print(f"{name:<52}" + "".join(cells))
    print("samples:" + "".join(f" {s} {sum(results[s].values())}" for s in shapes))
    return 0


if __name__ == "__main__":
    if not shutil.which(str(Path(PY).parent / "py-spy")):
        sys.exit("needs py-spy (a dev dependency)")
    sys.exit(main())
