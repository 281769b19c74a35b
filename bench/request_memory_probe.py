"""Request memory probe: how much server memory one large request costs at its peak.

Starts the server as an operator runs it (`python -m service`, its own process) with a simulated
route and an openai route to a fake vendor on loopback, warms it up with a small request, then
sends `--concurrent` requests at once, each with a prompt of `--prompt-mib` MiB, and reads each
stream to its end. Meanwhile it samples the server's resident memory (VmRSS, polled, and VmHWM,
the kernel's own peak, reset just before the requests where the kernel allows it) and prints the
peak increase over the idle baseline in MiB and as a multiple of the bytes the requests carried.

    .venv/bin/python bench/request_memory_probe.py --route sim
    .venv/bin/python bench/request_memory_probe.py --route openai --concurrent 8

`--rounds N` repeats the measurement on the same server (each round against its own baseline):
the first round is what a fresh server pays; later ones show what stays reserved. Extra
environment for the server (MALLOC_ARENA_MAX=2, say) is passed with `--env NAME=VALUE`.
Bounded in count and time; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fakes import FakeOpenAI, StreamReply
from rig import Process, start

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

MIB = 1024 * 1024
KEY_ENV = "REQUEST_MEMORY_PROBE_KEY"
CONFIG = """
[server]
listen = "127.0.0.1:0"

[routes.sim]
provider = "simulated"
model = "probe-sim"
options = {{ first_token_ms = 0, tokens_per_second = 0, answer_tokens = 20 }}

[routes.openai]
provider = "openai"
model = "gpt-probe"
max_retries = 0
options = {{ base_url = "{base_url}", api_key_env = "{key_env}" }}
"""
# Prose rather than one repeated letter: word counts and tokenizer-like work see real words.
_LINE = "the quick brown fox jumps over a lazy dog while streaming tokens arrive one by one"


def prompt(size: int, text: str) -> str:
    """About `size` bytes of UTF-8 text; `unicode` mixes in two- and three-byte characters."""
    line = _LINE + (".\n" if text == "ascii" else " café naïve 日本語 über.\n")
    encoded = len(line.encode())
    return line * (size // encoded) + "x" * (size % encoded if text == "ascii" else 0)


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux 4.0+: "5" in clear_refs); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def rss_sampler(pid: int) -> Iterator[list[int]]:
    """Polls VmRSS (KiB) every millisecond in a thread while the block runs; yields the samples."""
    samples: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                samples.append(vm_kib(pid, "VmRSS"))
            stop.wait(0.001)

    thread = threading.Thread(target=poll, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(5)


async def one_round(
    server: Process, stub: pb_grpc.GenerationServiceAsyncStub, requests: list[pb.GenerateRequest]
) -> tuple[float, float, float, bool, int]:
    """(idle MiB, peak increase MiB by polling, by VmHWM or -1, every stream finished, bytes sent)."""
    pid = server.proc.pid
    await asyncio.sleep(0.3)  # let the previous round's memory go back where it goes
    idle = vm_kib(pid, "VmRSS")
    hwm = reset_peak(pid)

    async def call(request: pb.GenerateRequest) -> bool:
        messages = [m async for m in stub.Generate(request, timeout=120)]
        return bool(messages) and messages[-1].HasField("finish")

    with rss_sampler(pid) as samples:
        finished = all(await asyncio.gather(*(call(r) for r in requests)))
        await asyncio.sleep(0.05)  # a last sample after the streams ended
    peak_hwm = (vm_kib(pid, "VmHWM") - idle) / 1024 if hwm else -1.0
    peak_poll = (max(samples, default=idle) - idle) / 1024
    sent = sum(r.ByteSize() for r in requests)
    return idle / 1024, peak_poll, peak_hwm, finished, sent


async def probe(args: argparse.Namespace, tmp: Path) -> int:
    async with FakeOpenAI(default=StreamReply(text=["Hello", " there", "!"])) as fake:
        config = tmp / "tokenwire.toml"
        config.write_text(CONFIG.format(base_url=fake.base_url, key_env=KEY_ENV))
        env = {**os.environ, KEY_ENV: fake.api_key, **dict(e.split("=", 1) for e in args.env)}
        argv = [sys.executable, "-m", "service", "--config", str(config)]
        server = start("tokenwire", argv, tmp, r"listening on (\S+);", env)
        try:
            async with grpc.aio.insecure_channel(
                server.address, options=[("grpc.max_send_message_length", 64 * MIB)]
            ) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                small = pb.GenerateRequest(model=args.route, messages=[pb.Message(role=pb.ROLE_USER, text="hi")])
                # Warm up: imports, the SDK client and its connection pool allocate once.
                async for _ in stub.Generate(small, timeout=60):
                    pass
                text = prompt(int(args.prompt_mib * MIB), args.text)
                requests = [
                    pb.GenerateRequest(model=args.route, messages=[pb.Message(role=pb.ROLE_USER, text=text)])
                    for _ in range(args.concurrent)
                ]
                size = requests[0].ByteSize()
                print(
                    f"route: {args.route}, concurrent: {args.concurrent}, request: {size / MIB:.2f} MiB each "
                    f"({args.text} text), rounds: {args.rounds}"
                )
                ok = True
                for n in range(1, args.rounds + 1):
                    idle, poll, hwm, finished, sent = await one_round(server, stub, requests)
                    fake.requests.clear()
                    peak = max(poll, hwm)
                    seen = f"VmHWM +{hwm:.1f}, polled VmRSS +{poll:.1f}" if hwm >= 0 else f"polled VmRSS +{poll:.1f}"
                    print(
                        f"round {n}: server RSS idle {idle:.1f} MiB, peak +{peak:.1f} MiB ({seen}) = "
                        f"{peak * MIB / sent:.2f}x the {sent / MIB:.2f} MiB sent; "
                        f"streams finished: {'all' if finished else 'NOT ALL'}"
                    )
                    ok = ok and finished
                return 0 if ok else 1
        finally:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", choices=("sim", "openai"), default="sim")
    parser.add_argument("--concurrent", type=int, default=1, help="large requests sent at once")
    parser.add_argument("--prompt-mib", type=float, default=3.9, help="prompt size in MiB (UTF-8)")
    parser.add_argument("--text", choices=("ascii", "unicode"), default="ascii")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="server environment")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(probe(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
