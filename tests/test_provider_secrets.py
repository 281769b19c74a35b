"""No provider key in any status, chunk or log line, on any path, with the SDKs' debug logging on.

The server runs as a real process (`python -m service --log-level DEBUG`, OPENAI_LOG and
ANTHROPIC_LOG set to debug) in front of the fake providers, and every path that touches a key is
driven through it: success, the provider rejecting the key, rejecting the request, failing, and
breaking mid-stream.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fakes import FakeAnthropic, FakeOpenAI, StatusReply, StreamReply

from conftest import ROOT, collect, request
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

# Shapes no redaction pattern knows: only knowing the exact value can keep them out.
GOOD_KEY = "canary7f3a9c1e5b2d4-good"
BAD_KEY = "canary0e9d8c7b6a5f4-bad"


def route(provider: str, base_url: str, key_env: str) -> str:
    return (
        f'provider = "{provider}"\nmodel = "m"\n'
        f'options = {{ base_url = "{base_url}", api_key_env = "{key_env}", read_timeout_seconds = 2.0 }}\n'
        "max_retries = 1\nmax_retry_wait_seconds = 0.2\n"
    )


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeAnthropic]]:
    async with FakeOpenAI(api_key=GOOD_KEY) as openai_fake, FakeAnthropic(api_key=GOOD_KEY) as anthropic_fake:
        yield openai_fake, anthropic_fake


async def test_keys_appear_nowhere_even_with_sdk_debug_logging(
    fakes: tuple[FakeOpenAI, FakeAnthropic], tmp_path: Path
) -> None:
    openai_fake, anthropic_fake = fakes
    config = tmp_path / "tokenwire.toml"
    config.write_text(
        "[routes.openai]\n"
        + route("openai", openai_fake.base_url, "TW_GOOD_KEY")
        + "[routes.anthropic]\n"
        + route("anthropic", anthropic_fake.base_url, "TW_GOOD_KEY")
        + "[routes.openai-bad-key]\n"
        + route("openai", openai_fake.base_url, "TW_BAD_KEY")
        + "[routes.anthropic-bad-key]\n"
        + route("anthropic", anthropic_fake.base_url, "TW_BAD_KEY")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    env |= {"TW_GOOD_KEY": GOOD_KEY, "TW_BAD_KEY": BAD_KEY, "OPENAI_LOG": "debug", "ANTHROPIC_LOG": "debug"}
    command = [sys.executable, "-m", "service", "--config", str(config), "--listen", "127.0.0.1:0"]
    proc = await asyncio.create_subprocess_exec(
        *command, "--log-level", "DEBUG", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    log: list[str] = []
    reader = asyncio.create_task(_read_lines(proc.stderr, log))
    try:
        address = await _address(log, proc)
        outputs: list[Any] = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            for fake in fakes:
                fake.enqueue(
                    StreamReply(text=["fine"]),
                    StatusReply(400, message="bad request"),
                    StatusReply(500),
                    StatusReply(500),
                    StreamReply(text=["a", "b"], fault="error_event", fault_after=1),
                    StreamReply(text=["a", "b"], fault="reset", fault_after=1),
                )
            for model in ("openai", "anthropic"):
                for _ in range(5):
                    outputs.append(await collect(stub.Generate(request(model=model), timeout=10)))
            for model in ("openai-bad-key", "anthropic-bad-key"):
                messages, code, trailing = await collect(stub.Generate(request(model=model), timeout=10))
                assert code == grpc.StatusCode.INTERNAL
                outputs.append((messages, code, trailing))
        # Every path above was taken: success, 400, 500 after a retry, error event, reset, 401.
        codes = [str(code) for _, code, _ in outputs]
        assert codes.count("StatusCode.OK") == 2 and codes.count("StatusCode.INTERNAL") == 2
        assert codes.count("StatusCode.INVALID_ARGUMENT") == 2 and codes.count("StatusCode.UNAVAILABLE") == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()
            await reader
    text = "".join(log)
    # The SDKs' debug logging did run, so the check below had something to look at.
    assert "DEBUG openai" in text or "DEBUG httpx" in text or "DEBUG anthropic" in text, text[-2000:]
    for key in (GOOD_KEY, BAD_KEY):
        assert key not in text
        assert key not in repr(outputs)


async def _read_lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode())


async def _address(log: list[str], proc: asyncio.subprocess.Process) -> str:
    for _ in range(400):
        for line in log:
            if "listening on " in line:
                return line.split("listening on ")[1].split(";")[0]
        assert proc.returncode is None, "".join(log)
        await asyncio.sleep(0.05)
    raise AssertionError("the server did not start: " + "".join(log))
