"""The client's contract checks through its real stream classes, against a fake server that breaks the contract.

A fake tokenwire.v1.GenerationService, served by grpc.aio in the test's own loop, plays a broken server; the
script it follows is chosen by the request's ``model``. Each script runs against the async client and against
the sync one (in a worker thread, so that the fake server's loop stays free). The last tests cancel streams of
the real server from another task or thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest
from google.protobuf import timestamp_pb2

from conftest import Recorder, Running, eventually
from tokenwire.v1 import generation_pb2 as pb
from tokenwire_client import (
    AsyncClient,
    Client,
    Event,
    Fault,
    Finished,
    Response,
    Started,
    StreamCancelledError,
    StreamIntegrityError,
    TextDelta,
    TokenwireError,
    TruncatedStreamError,
    UnavailableError,
    user,
)

pytestmark = pytest.mark.timeout(30)

Context = grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]

# Field 13 of GenerateResponse, length-delimited and empty: an event case added after this client was built.
UNKNOWN_CASE = b"\x6a\x00"
# How long the broken scripts keep streaming unless the client cancels them.
TAIL_MESSAGES = 100
TAIL_INTERVAL = 0.05


def start(sequence: int = 1) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        sequence=sequence,
        start=pb.Start(
            stream_id="fake-stream",
            route="fake",
            provider="fake-provider",
            upstream_model="fake-model",
            create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
        ),
    )


def text(sequence: int, piece: str = "Hello") -> pb.GenerateResponse:
    return pb.GenerateResponse(sequence=sequence, text_delta=pb.TextDelta(text=piece))


def finish(sequence: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(sequence=sequence, finish=pb.Finish(reason=pb.FINISH_REASON_STOP, raw_reason="end_turn"))


def provider_error(sequence: int, last_sequence: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        sequence=sequence,
        error=pb.Error(
            code=pb.ERROR_CODE_PROVIDER_UNAVAILABLE,
            fault=pb.FAULT_PROVIDER,
            grpc_code=grpc.StatusCode.UNAVAILABLE.value[0],
            message="the provider is unavailable",
            retryable=True,
            provider="fake-provider",
            provider_http_status=503,
            last_sequence=last_sequence,
        ),
    )


def unknown_case(sequence: int) -> pb.GenerateResponse:
    raw = pb.GenerateResponse(sequence=sequence).SerializeToString() + UNKNOWN_CASE
    message = pb.GenerateResponse.FromString(raw)
    # The scenario is only meaningful while field 13 is not an event this client knows, and protobuf keeps it.
    assert message.WhichOneof("event") is None
    assert message.SerializeToString() == raw
    return message


@dataclass
class FakeServer:
    """What the fake handler saw; threading events, so that the sync client's thread can wait on them too."""

    address: str = ""
    models: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    async def generate(self, request: pb.GenerateRequest, context: Context) -> None:
        self.models.append(request.model)
        try:
            await self._script(request.model, context)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.done.set()

    async def _script(self, model: str, context: Context) -> None:
        match model:
            case "gap":
                for message in (start(1), text(2), text(4)):
                    await context.write(message)
                await self._tail(5, context)
            case "no-start":
                await context.write(text(1))
                await self._tail(2, context)
            case "ok-without-finish":
                await context.write(start(1))
                await context.write(text(2))
            case "error-then-ok":
                for message in (start(1), text(2), provider_error(3, last_sequence=2)):
                    await context.write(message)
                # ... and an OK status, which the contract forbids after an Error.
            case "unknown-case":
                for message in (start(1), unknown_case(2), text(3), finish(4)):
                    await context.write(message)
            case _:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no script {model!r}")

    @staticmethod
    async def _tail(sequence: int, context: Context) -> None:
        """Keeps streaming, slowly, as a server that does not notice its own mistake would."""
        for n in range(sequence, sequence + TAIL_MESSAGES):
            await asyncio.sleep(TAIL_INTERVAL)
            await context.write(text(n, " more"))


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    state = FakeServer()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "tokenwire.v1.GenerationService",
                {
                    "Generate": grpc.unary_stream_rpc_method_handler(
                        state.generate,
                        request_deserializer=pb.GenerateRequest.FromString,
                        response_serializer=pb.GenerateResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    state.address = f"127.0.0.1:{port}"
    yield state
    await server.stop(grace=None)


@dataclass
class Outcome:
    """How one stream went, as its reader saw it."""

    events: list[Event]
    error: TokenwireError | None = None
    response: Response | None = None
    # Whether the handler had been cancelled once it ended, read while the stream's block was still open: only
    # the stream's own reaction to the failure can have cancelled it then, not leaving the block or the client.
    handler_cancelled: bool | None = None


async def read_async(fake: FakeServer, model: str) -> Outcome:
    outcome = Outcome(events=[])
    async with (
        asyncio.timeout(10),
        AsyncClient(fake.address, timeout=10) as client,
        client.generate(model, [user("Hi")]) as stream,
    ):
        try:
            async for event in stream:
                outcome.events.append(event)
            outcome.response = await stream.get_final_response()
        except TokenwireError as exc:
            outcome.error = exc
            await asyncio.to_thread(fake.done.wait, 1.0)
            outcome.handler_cancelled = fake.cancelled.is_set()
    return outcome


def read_sync(fake: FakeServer, model: str) -> Outcome:
    outcome = Outcome(events=[])
    with Client(fake.address, timeout=10) as client, client.generate(model, [user("Hi")]) as stream:
        try:
            for event in stream:
                outcome.events.append(event)
            outcome.response = stream.get_final_response()
        except TokenwireError as exc:
            outcome.error = exc
            fake.done.wait(1.0)
            outcome.handler_cancelled = fake.cancelled.is_set()
    return outcome


Reader = Callable[[str], Awaitable[Outcome]]


@pytest.fixture(params=["async", "sync"])
def read(request: pytest.FixtureRequest, fake: FakeServer) -> Reader:
    """Reads the fake server's script ``model`` with the async client, or with the sync one in a thread."""

    def run(model: str) -> Awaitable[Outcome]:
        if request.param == "async":
            return read_async(fake, model)
        # The client's deadline bounds the thread.
        return asyncio.to_thread(read_sync, fake, model)

    return run


def sequences(events: list[Event]) -> list[int]:
    return [event.sequence for event in events]


async def test_a_gap_raises_and_cancels_the_call(read: Reader) -> None:
    outcome = await read("gap")
    assert type(outcome.error) is StreamIntegrityError, outcome
    assert "expected sequence 3, got 4" in str(outcome.error)
    assert sequences(outcome.events) == [1, 2]  # the messages before the gap, and nothing after it
    assert outcome.handler_cancelled, "the client read on, or left it to the server, after the gap"


async def test_a_stream_without_start_raises_and_cancels_the_call(read: Reader) -> None:
    outcome = await read("no-start")
    assert type(outcome.error) is StreamIntegrityError, outcome
    assert "must be a Start event" in str(outcome.error)
    assert outcome.events == []
    assert outcome.handler_cancelled


async def test_ok_status_without_finish_is_truncation(read: Reader) -> None:
    outcome = await read("ok-without-finish")
    assert type(outcome.error) is TruncatedStreamError, outcome
    assert "after sequence 2" in str(outcome.error)
    assert outcome.error.retryable
    assert [type(e) for e in outcome.events] == [Started, TextDelta]
    assert outcome.response is None


async def test_error_event_then_ok_status_raises_the_error(read: Reader) -> None:
    # check_complete(): an OK status after an Error is a server bug, "and the Error is still what happened".
    outcome = await read("error-then-ok")
    error = outcome.error
    assert isinstance(error, UnavailableError), outcome
    assert error.code is grpc.StatusCode.UNAVAILABLE and error.message == "the provider is unavailable"
    assert error.reason == "PROVIDER_UNAVAILABLE" and error.fault is Fault.PROVIDER and error.retryable
    assert error.provider == "fake-provider" and error.provider_http_status == 503
    assert error.stream_id == "fake-stream" and error.last_sequence == 2
    assert not error.truncated  # the stream did end with a terminal event
    assert sequences(outcome.events) == [1, 2]  # the Error is raised, not yielded as an event


async def test_an_unknown_event_case_is_skipped_but_counted(read: Reader) -> None:
    outcome = await read("unknown-case")
    assert outcome.error is None, outcome.error
    assert [type(e) for e in outcome.events] == [Started, TextDelta, Finished]
    assert sequences(outcome.events) == [1, 3, 4]
    response = outcome.response
    assert response is not None and response.text == "Hello" and response.last_sequence == 4


# The real server: cancelling a stream that another task or thread is reading.


async def test_cancel_from_another_task_ends_the_reader_with_stream_cancelled(
    running: Running, recorder: Recorder
) -> None:
    client = AsyncClient(channel=running.channel)
    received: list[Event] = []
    first_text = asyncio.Event()

    async def read_all() -> None:
        async for event in stream:
            received.append(event)
            if isinstance(event, TextDelta):
                first_text.set()

    async with asyncio.timeout(10), client.generate("slow", [user("Hi")]) as stream:
        reader = asyncio.create_task(read_all())
        await first_text.wait()
        stream.cancel()
        # Not a bare CancelledError: pytest.raises would let that through and the test would error.
        with pytest.raises(StreamCancelledError) as info:
            await reader
        assert not reader.cancelled()
        # Still inside the block: cancel() itself stopped the provider, not leaving the block.
        await eventually(lambda: recorder.closed)
    assert recorder.finished == [False]
    error = info.value
    started = received[0]
    assert isinstance(started, Started)
    assert error.code is grpc.StatusCode.CANCELLED and error.stream_id == started.stream_id != ""
    assert error.last_sequence is not None and 2 <= error.last_sequence <= received[-1].sequence
    assert len(received) < 100  # the reader stopped long before the answer's 500 tokens


def wait_until(predicate: Callable[[], object], within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_sync_leaving_the_block_early_stops_the_provider(live_address: str, recorder: Recorder) -> None:
    with Client(live_address, timeout=20) as client:
        with client.generate("slow", [user("Hi")]) as stream:
            for event in stream:
                if isinstance(event, TextDelta):
                    break
        # The client and its channel are still open: leaving the stream's block is what stopped the provider.
        assert wait_until(lambda: recorder.closed), "the provider went on generating"
    assert recorder.finished == [False]


def test_sync_cancel_from_another_thread_ends_iteration(live_address: str, recorder: Recorder) -> None:
    first_text = threading.Event()
    received: list[Event] = []
    with Client(live_address, timeout=20) as client, client.generate("slow", [user("Hi")]) as stream:

        def read_all() -> None:
            for event in stream:
                received.append(event)
                if isinstance(event, TextDelta):
                    first_text.set()

        def cancel_after_first_text() -> None:
            if first_text.wait(10):
                stream.cancel()

        canceller = threading.Thread(target=cancel_after_first_text, daemon=True)
        canceller.start()
        with pytest.raises(StreamCancelledError) as info:
            read_all()
        canceller.join(5)
        assert wait_until(lambda: recorder.closed), "the provider went on generating"
    assert recorder.finished == [False]
    assert info.value.code is grpc.StatusCode.CANCELLED
    assert len(received) < 100  # iteration ended at the cancel, not at the end of the answer
