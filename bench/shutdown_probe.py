"""Shutdown probe: what in-flight streams see when `python -m service` gets SIGTERM.

Starts the real server in a process of its own on 127.0.0.1, opens a short stream (finishes
within the grace period) and a long one (cannot), sends SIGTERM, and reports when each stream
ended and how, and when the process exited with which code.

    .venv/bin/python bench/shutdown_probe.py --grace 4
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

CONFIG = """
[server]
listen = "127.0.0.1:0"
shutdown_grace_seconds = {grace}

[routes.long]
provider = "simulated"
model = "m"
options = {{ first_token_ms = 1, tokens_per_second = 20, answer_tokens = 100000 }}

[routes.short]
provider = "simulated"
model = "m"
options = {{ first_token_ms = 1, tokens_per_second = 20, answer_tokens = {short_tokens} }}
"""


async def drain(call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse], since: float) -> str:
    last = None
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            last = message
    except grpc.aio.AioRpcError:
        pass
    event = last.WhichOneof("event") if isinstance(last, pb.GenerateResponse) else "nothing"
    code = await call.code()
    return f"ended {time.monotonic() - since:.3f} s after SIGTERM with {event}, status {code.name}"


async def probe(grace: float, workdir: Path) -> None:
    config = workdir / "tokenwire.toml"
    # The short stream needs about half the grace period at 20 tokens/s.
    config.write_text(CONFIG.format(grace=grace, short_tokens=max(1, int(grace * 10))))
    log = workdir / "server.log"
    with log.open("w") as err:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "--config", str(config), stderr=err
        )
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"listening on (\S+);", log.read_text())):
            if server.returncode is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + log.read_text())
            await asyncio.sleep(0.05)
        messages = [pb.Message(role=pb.ROLE_USER, text="hi")]
        async with grpc.aio.insecure_channel(found.group(1)) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            long = stub.Generate(pb.GenerateRequest(model="long", messages=messages))
            short = stub.Generate(pb.GenerateRequest(model="short", messages=messages))
            await long.read()
            await short.read()
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            short_result, long_result = await asyncio.gather(drain(short, signalled), drain(long, signalled))
            async with asyncio.timeout(grace + 10):
                code = await server.wait()
            exited = time.monotonic() - signalled
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
    print(f"grace period: {grace:g} s")
    print(f"short stream: {short_result}")
    print(f"long stream: {long_result}")
    print(f"process: exited {code}, {exited:.3f} s after SIGTERM")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grace", type=float, default=4.0, help="shutdown_grace_seconds for the probed server")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(probe(parser.parse_args().grace, Path(tmp)))
