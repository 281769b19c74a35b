"""Which HTTP client under the SDKs: tokenwire's own transport (service/providers/http1.py) vs the
SDKs' aiohttp-backed client (`openai.DefaultAioHttpClient`, the `openai[aiohttp]` extra).

Two tokenwire servers, identical but for the client their route's SDK sends through, relay the same
fake upstream (bench/upstream.py) on the rig's layout: servers pinned to core 0, upstream and load
generator to core 1, steps interleaved. Per step it prints each server's CPU-seconds per 1,000
relayed chunks and added time to first token over the direct path, and the aiohttp one's ratio.

    .venv/bin/python bench/http_client_choice.py                    # 25 and 100 streams, even starts
    .venv/bin/python bench/http_client_choice.py --steps 25,50,100 --starts even,bursty

`serve-aiohttp` (used by the above) is `python -m service` with every route's client replaced by
the SDK's aiohttp one. Everything binds 127.0.0.1; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rig import LOAD_CORE, PY, SUT_CORE, Process, Step, measure, ms, pinned, start


def serve_aiohttp(argv: list[str]) -> int:
    import httpx2
    import openai

    from service.__main__ import main
    from service.providers import http1

    def aiohttp_client(client_class: Any, base_url: str, max_connections: int, **_: Any) -> httpx2.AsyncClient:
        limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        client: httpx2.AsyncClient = openai.DefaultAioHttpClient(limits=limits)
        return client

    http1.http_client = aiohttp_client
    return main(argv)


def main() -> int:
    if sys.argv[1:2] == ["serve-aiohttp"]:
        return serve_aiohttp(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="25,100")
    parser.add_argument("--starts", default="even")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("needs aiohttp: .venv/bin/pip install 'openai[aiohttp]'", file=sys.stderr)
        return 2
    started: list[Process] = []
    steps: list[Step] = []
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        try:
            upstream = start(
                "upstream",
                pinned(
                    LOAD_CORE, [PY, "bench/upstream.py", "--tokens", str(args.tokens), "--interval", str(args.interval)]
                ),
                log_dir,
                r"listening on (\S+)",
            )
            started.append(upstream)
            config = log_dir / "tokenwire.toml"
            config.write_text(
                f'[server]\nlisten = "127.0.0.1:0"\nmax_concurrent_streams = 100000\nhttp_listen = ""\n'
                f'event_loop = "{args.event_loop}"\n\n'
                '[routes.bench]\nprovider = "openai-compatible"\nmodel = "bench-model"\n'
                f'options = {{ base_url = "http://{upstream.address}/v1" }}\n'
            )
            servers = {
                "http1": [PY, "-m", "service", "--config", str(config)],
                "aiohttp": [PY, "bench/http_client_choice.py", "serve-aiohttp", "--config", str(config)],
            }
            suts: dict[str, Process] = {}
            for name, argv in servers.items():
                suts[name] = start(name, pinned(SUT_CORE, argv), log_dir, r"listening on (\S+);")
                started.append(suts[name])
            for streams in [int(n) for n in args.steps.split(",")]:
                for shape in args.starts.split(","):
                    direct = measure("direct", None, upstream.address, streams, args, starts=shape)
                    for name, sut in suts.items():
                        step = measure(name, sut, sut.address, streams, args, starts=shape)
                        step.added = {
                            k: (step.result[k] - direct.result[k])
                            if step.result[k] is not None and direct.result[k] is not None
                            else None
                            for k in ("ttft_p50", "ttft_p99")
                        }
                        steps.append(step)
        finally:
            for process in started:
                process.stop()
    print(
        f"{'client':<8} {'streams':>7} {'starts':>6} {'CPU-s/1k':>9} {'+ttft p50':>10} {'+ttft p99':>10} "
        f"{'load core':>9}  valid"
    )
    for s in steps:
        cpu = "-" if s.cpu_per_1000 is None else f"{s.cpu_per_1000:.3f}"
        print(
            f"{s.path:<8} {s.streams:>7} {s.starts:>6} {cpu:>9} {ms(s.added['ttft_p50']):>10} "
            f"{ms(s.added['ttft_p99']):>10} {s.load_busy:>9.0%}  {'yes' if s.valid else 'no'}"
        )
    by = {(s.path, s.streams, s.starts): s for s in steps}
    for s in steps:
        mine = by.get(("http1", s.streams, s.starts))
        if s.path != "aiohttp" or mine is None or not (s.cpu_per_1000 and mine.cpu_per_1000):
            continue
        theirs, ours = s.added["ttft_p50"], mine.added["ttft_p50"]
        extra = f", {(theirs - ours) * 1000:+.2f} ms TTFT p50" if theirs is not None and ours is not None else ""
        note = "" if s.valid and mine.valid else " (invalid step)"
        print(
            f"aiohttp at {s.streams} streams, {s.starts} starts: {s.cpu_per_1000 / mine.cpu_per_1000:.2f}x "
            f"http1's CPU per chunk{extra}{note}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
