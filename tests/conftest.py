"""Shared fixtures: real tokenwire servers on 127.0.0.1:0 and real gRPC channels to them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from fakes import FakeAnthropic, FakeOpenAI
from google.rpc import error_details_pb2, status_pb2
from redis_server import RedisServer, running_redis

from service.config import Config, ServerConfig, build_routes, load_config
from service.events import EventStream, GenerationRequest
from service.providers import KINDS
from service.providers.simulated import SimulatedProvider
from service.server import TokenwireServer
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
# Servers the tests start as processes (`python -m service`) serve their HTTP door on a free port,
# never on the shipped default 8080, which another server on this machine may hold.
os.environ.setdefault("TOKENWIRE_HTTP_LISTEN", "127.0.0.1:0")
# And their metrics on a free port too, never on the shipped default 9464.
os.environ.setdefault("TOKENWIRE_METRICS_LISTEN", "127.0.0.1:0")
FAST = {"first_token_ms": 1, "tokens_per_second": 0}
# A pace slow enough that a test can act in the middle of a stream.
SLOW = {"first_token_ms": 1, "tokens_per_second": 50, "answer_tokens": 500}

TEST_ROUTES: dict[str, dict[str, Any]] = {
    "sim": {"provider": "simulated", "model": "tokenwire-sim-1", "options": FAST},
    "slow": {"provider": "recording", "model": "tokenwire-sim-1", "options": SLOW},
    "slow-start": {"provider": "recording", "model": "tokenwire-sim-1", "options": SLOW | {"first_token_ms": 5000}},
    "recorded": {"provider": "recording", "model": "tokenwire-sim-1", "options": FAST},
    "error-after-3": {"provider": "simulated", "model": "m", "options": FAST | {"fail_after_chunks": 3}},
    "down": {"provider": "simulated", "model": "m", "options": FAST | {"fail_after_chunks": 0}, "max_retries": 0},
    "rate-limited": {
        "provider": "simulated",
        "model": "m",
        "options": FAST | {"fail_after_chunks": 0, "fail_with": "rate_limited"},
        "max_retries": 0,
    },
    "crash-before": {
        "provider": "simulated",
        "model": "m",
        "options": FAST | {"fail_after_chunks": 0, "fail_with": "internal"},
    },
    "crash-after": {
        "provider": "simulated",
        "model": "m",
        "options": FAST | {"fail_after_chunks": 2, "fail_with": "internal"},
    },
    "stall": {"provider": "simulated", "model": "m", "options": FAST | {"stall_after_chunks": 2, "stall_seconds": 0.2}},
}


OPENAI_KEY_ENV = "TOKENWIRE_TEST_OPENAI_KEY"
ANTHROPIC_KEY_ENV = "TOKENWIRE_TEST_ANTHROPIC_KEY"


@pytest.fixture
async def fake_openai(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        monkeypatch.setenv(OPENAI_KEY_ENV, fake.api_key)
        yield fake


@pytest.fixture
async def fake_anthropic(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        monkeypatch.setenv(ANTHROPIC_KEY_ENV, fake.api_key)
        yield fake


def vendor_route(fake: FakeOpenAI | FakeAnthropic, **options: Any) -> dict[str, Any]:
    """A route on a fake provider (its key in the environment), with short timeouts and no retries."""
    openai = isinstance(fake, FakeOpenAI)
    return {
        "provider": "openai" if openai else "anthropic",
        "model": "gpt-test" if openai else "claude-test",
        "max_retries": 0,
        "options": {
            "base_url": fake.base_url,
            "api_key_env": OPENAI_KEY_ENV if openai else ANTHROPIC_KEY_ENV,
            "read_timeout_seconds": 2.0,
            "connect_timeout_seconds": 1.0,
        }
        | options,
    }


@dataclass
class Recorder:
    """What the recording provider saw: every request that reached it, and every stream it closed."""

    requests: list[GenerationRequest] = field(default_factory=list)
    closed: list[float] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)


RECORDER = Recorder()


class RecordingProvider(SimulatedProvider):
    """The simulated provider, plus a record of what reached it and when its stream was closed."""

    kind = "recording"

    def stream(self, request: GenerationRequest) -> EventStream:
        return self._recorded(request)

    async def _recorded(self, request: GenerationRequest) -> EventStream:
        RECORDER.requests.append(request)
        completed = False
        try:
            async for event in super().stream(request):
                yield event
            completed = True
        finally:
            RECORDER.closed.append(asyncio.get_running_loop().time())
            RECORDER.finished.append(completed)


@pytest.fixture(autouse=True)
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    monkeypatch.setitem(KINDS, "recording", RecordingProvider)
    RECORDER.requests.clear()
    RECORDER.closed.clear()
    RECORDER.finished.clear()
    return RECORDER


def make_config(routes: dict[str, dict[str, Any]] | None = None, **server: Any) -> Config:
    # The HTTP door only where a test asks for it (`http_listen="127.0.0.1:0"`).
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "shutdown_grace_seconds": 2.0,
        "http_listen": "",
        "metrics_listen": "",
    } | server
    return Config(
        server=dataclasses.replace(ServerConfig(), **values),
        routes=build_routes(routes if routes is not None else TEST_ROUTES, "test"),
    )


@dataclass
class Running:
    server: TokenwireServer
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.GenerationServiceAsyncStub


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Any]]:
    """Starts servers with custom settings: `running = await start_server(max_concurrent_streams=2)`."""
    started: list[Running] = []

    async def start(routes: dict[str, dict[str, Any]] | None = None, **server: Any) -> Running:
        srv = TokenwireServer(make_config(routes, **server))
        port = await srv.start()
        address = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(address)
        running = Running(srv, address, channel, pb_grpc.GenerationServiceStub(channel))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.channel.close()
        await running.server.stop(grace=0.5)


@pytest.fixture
async def running(start_server: Callable[..., Any]) -> Running:
    result: Running = await start_server()
    return result


@pytest.fixture
def stub(running: Running) -> pb_grpc.GenerationServiceAsyncStub:
    return running.stub


# The HTTP door of each server `serve_in_thread` started, by its gRPC address.
HTTP_ADDRESSES: dict[str, str] = {}


@contextlib.contextmanager
def serve_in_thread(config: Config) -> Iterator[str]:
    """A server in a thread of its own, for blocking clients: grpcurl, the demo CLI, sync stubs."""
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        srv = TokenwireServer(config)
        holder["port"] = await srv.start()
        if srv.http is not None:
            holder["http"] = f"127.0.0.1:{srv.http.port}"
        holder["stop"] = asyncio.Event()
        holder["loop"] = asyncio.get_running_loop()
        ready.set()
        await holder["stop"].wait()
        await srv.stop(grace=0.5)

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="live-server", daemon=True)
    thread.start()
    assert ready.wait(10), "server did not start"
    address = f"127.0.0.1:{holder['port']}"
    if "http" in holder:
        HTTP_ADDRESSES[address] = holder["http"]
    try:
        yield address
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(10)


@pytest.fixture(scope="session")
def live_address() -> Iterator[str]:
    """The test routes (fast, plus scripted faults) served for blocking clients."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(KINDS, "recording", RecordingProvider)
        with serve_in_thread(make_config()) as address:
            yield address


# The routes the Go and TypeScript clients' live tests use: fast, scripted faults, and one deterministic answer paced
# so that a call can be broken in the middle of it (200 tokens at 400/s).
CLIENT_ROUTES: dict[str, dict[str, Any]] = {
    name: TEST_ROUTES[name] for name in ("sim", "rate-limited", "error-after-3")
}
CLIENT_ROUTES |= {
    "paced": {"provider": "simulated", "model": "m", "options": FAST | {"tokens_per_second": 400, "answer_tokens": 200}}
}


@pytest.fixture(scope="session")
def clients_address() -> Iterator[str]:
    """CLIENT_ROUTES served for the other languages' clients, which run as subprocesses."""
    with serve_in_thread(make_config(CLIENT_ROUTES)) as address:
        yield address


@pytest.fixture(scope="session")
def default_address() -> Iterator[str]:
    """The shipped configuration, as `make run` serves it: what the README's recipes talk to."""
    config = load_config(
        ROOT / "config" / "tokenwire.toml",
        overrides={"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
    )
    with serve_in_thread(config) as address:
        yield address


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (tests keep apart by key prefix); fails if not installed."""
    with running_redis() as server:
        yield server


# The Go client's import path (buf.gen.yaml's go_package_prefix, without clients/go).
GO_IMPORT_ROOT = "github.com/tokenwire/tokenwire"


def go_env(gopath: Path) -> dict[str, str]:
    """Go in GOPATH mode over a GOPATH holding this repository at its import path, then Debian's Go sources.

    Module mode cannot resolve Debian's sources offline; GOPATH mode is what the README tells a Go team to use.
    """
    link = gopath / "src" / GO_IMPORT_ROOT
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT, target_is_directory=True)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "go-build"
    return dict(os.environ) | {
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}{os.pathsep}/usr/share/gocode",
        "GOFLAGS": "",
        # The build cache outlives the test: the first build of Debian's grpc takes a while, later ones do not.
        "GOCACHE": os.environ.get("GOCACHE", str(cache)),
    }


async def eventually(predicate: Callable[[], object], within: float = 2.0) -> None:
    """Waits until `predicate()` is true; fails the test if it is not within `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def request(model: str = "sim", text: str = "Tell me about streaming.", **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, messages=[pb.Message(role=pb.ROLE_USER, text=text)], **fields)


async def collect(call: Any) -> tuple[list[pb.GenerateResponse], grpc.StatusCode, Any]:
    """Reads a whole Generate call: its messages, its status code and its trailing metadata."""
    messages: list[pb.GenerateResponse] = []
    try:
        async for m in call:
            messages.append(m)
    except grpc.aio.AioRpcError:
        pass
    return messages, await call.code(), await call.trailing_metadata()


async def read_to_end(
    call: Any, messages: list[pb.GenerateResponse] | None = None
) -> tuple[list[pb.GenerateResponse], grpc.StatusCode, Any]:
    """Like `collect`, for a call already read with read(): grpc forbids mixing read() and iteration."""
    messages = [] if messages is None else messages
    with contextlib.suppress(grpc.aio.AioRpcError):
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
    return messages, await call.code(), await call.trailing_metadata()


def rich_status(trailing: Any) -> status_pb2.Status:
    for key, value in trailing or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no rich status in trailing metadata")


def detail(status: status_pb2.Status, kind: type[Any]) -> Any:
    for any_ in status.details:
        if any_.Is(kind.DESCRIPTOR):
            out = kind()
            any_.Unpack(out)
            return out
    return None


def assert_well_formed(messages: list[pb.GenerateResponse]) -> None:
    """The contract's stream invariants: Start at 1, no gaps, exactly one terminal event, last."""
    assert messages, "no messages"
    assert [m.sequence for m in messages] == list(range(1, len(messages) + 1))
    assert messages[0].WhichOneof("event") == "start"
    kinds = [m.WhichOneof("event") for m in messages]
    assert sum(k in ("finish", "error") for k in kinds) == 1
    assert kinds[-1] in ("finish", "error")


ErrorInfo = error_details_pb2.ErrorInfo
RetryInfo = error_details_pb2.RetryInfo
BadRequest = error_details_pb2.BadRequest
