"""Durable streams in the client, without the real server: request building, error classes, the resume rule,
and transparent resume against a fake server that breaks its calls on purpose (async and sync clients)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

from tokenwire.v1 import generation_pb2 as pb
from tokenwire_client import (
    APIStatusError,
    AsyncClient,
    Client,
    CursorOutOfRangeError,
    Event,
    JournalFullError,
    JournalUnavailableError,
    NotFoundError,
    ProducerLostError,
    RateLimitError,
    ResumePolicy,
    Started,
    StreamAbandonedError,
    StreamAlreadyExistsError,
    StreamCancelledError,
    StreamNotFoundError,
    StreamStoppedError,
    TextDelta,
    TokenwireError,
    TruncatedStreamError,
    UnavailableError,
    build_request,
    error_from_status,
    user,
)
from tokenwire_client._resume import is_break

pytestmark = pytest.mark.timeout(30)

TOKEN = "t" * 32
FAST = ResumePolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


# Request building.


def test_durable_asks_for_the_default_window_and_a_request_id() -> None:
    request = build_request("sim", [user("Hi")], durable=True)
    assert request.HasField("resume_window") and request.resume_window.ToNanoseconds() == 60 * 10**9
    assert len(request.request_id) == 32 and int(request.request_id, 16) >= 0
    assert build_request("sim", [user("Hi")], durable=True).request_id != request.request_id


def test_resume_window_makes_a_request_durable_and_keeps_the_callers_id() -> None:
    request = build_request("sim", [user("Hi")], resume_window=2.5, request_id="mine")
    assert request.resume_window.ToNanoseconds() == 2_500_000_000 and request.request_id == "mine"


def test_ephemeral_requests_are_as_before() -> None:
    request = build_request("sim", [user("Hi")])
    assert not request.HasField("resume_window") and request.request_id == ""


@pytest.mark.parametrize("window", [0.5, 0.0, -1.0, float("nan"), float("inf")])
def test_a_window_below_one_second_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="resume_window"):
        build_request("sim", [user("Hi")], resume_window=window)


def test_the_token_stays_out_of_the_repr() -> None:
    start = pb.Start(stream_id="s", resume_token=TOKEN, resume_window=duration_pb2.Duration(seconds=30))
    started = Started.from_proto(1, start)
    assert started.resume_token == TOKEN and started.resume_window == 30.0 and started.durable
    assert TOKEN not in repr(started)


# Error classes.


def rich(code: grpc.StatusCode, reason: str) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=code.value[0], message="m")
    info: Message = error_details_pb2.ErrorInfo(reason=reason, domain="tokenwire")
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),)


@pytest.mark.parametrize(
    ("code", "reason", "expected", "parent"),
    [
        (grpc.StatusCode.NOT_FOUND, "STREAM_NOT_FOUND", StreamNotFoundError, NotFoundError),
        (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_OUT_OF_RANGE", CursorOutOfRangeError, APIStatusError),
        (grpc.StatusCode.ALREADY_EXISTS, "STREAM_ALREADY_EXISTS", StreamAlreadyExistsError, APIStatusError),
        (grpc.StatusCode.CANCELLED, "STREAM_CANCELLED", StreamStoppedError, StreamCancelledError),
        (grpc.StatusCode.ABORTED, "STREAM_ABANDONED", StreamAbandonedError, APIStatusError),
        (grpc.StatusCode.UNAVAILABLE, "PRODUCER_LOST", ProducerLostError, UnavailableError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "JOURNAL_FULL", JournalFullError, RateLimitError),
        (grpc.StatusCode.UNAVAILABLE, "JOURNAL_UNAVAILABLE", JournalUnavailableError, UnavailableError),
    ],
)
def test_each_durable_code_has_its_class(
    code: grpc.StatusCode, reason: str, expected: type[APIStatusError], parent: type[APIStatusError]
) -> None:
    error = error_from_status(code, "m", rich(code, reason))
    assert type(error) is expected and isinstance(error, parent) and error.reason == reason
    # The Error event names the code too, and wins.
    event = pb.Error(code=pb.ErrorCode.Value(f"ERROR_CODE_{reason}"), grpc_code=code.value[0], message="m")
    assert type(error_from_status(code, "", None, event)) is expected


def test_bare_codes_of_durable_streams() -> None:
    assert type(error_from_status(grpc.StatusCode.OUT_OF_RANGE, "", None)) is CursorOutOfRangeError
    assert type(error_from_status(grpc.StatusCode.ALREADY_EXISTS, "", None)) is StreamAlreadyExistsError
    # A NOT_FOUND without a reason stays the route's class, as before.
    assert type(error_from_status(grpc.StatusCode.NOT_FOUND, "", None)) is NotFoundError


# The resume rule.


def bare(code: grpc.StatusCode, **kwargs: object) -> APIStatusError:
    return error_from_status(code, "", None, **kwargs)  # type: ignore[arg-type]


def test_after_start_any_break_resumes_but_answers_do_not() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        assert is_break(bare(code, last_sequence=3, truncated=True), begun=True)
    assert is_break(bare(grpc.StatusCode.CANCELLED, last_sequence=3, truncated=True), begun=True)
    assert is_break(TruncatedStreamError("ended OK without a terminal event"), begun=True)
    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert not is_break(bare(code, last_sequence=3, truncated=True), begun=True)
    # A terminal Error came with the status: that is the answer.
    event = pb.Error(code=pb.ERROR_CODE_PROVIDER_UNAVAILABLE, grpc_code=14, retryable=True, last_sequence=3)
    answered = error_from_status(grpc.StatusCode.UNAVAILABLE, "", None, event, last_sequence=3, truncated=True)
    assert not is_break(answered, begun=True)
    stopped = error_from_status(grpc.StatusCode.CANCELLED, "", rich(grpc.StatusCode.CANCELLED, "STREAM_CANCELLED"))
    assert not is_break(stopped, begun=True)


def test_before_start_only_a_transport_break_retries() -> None:
    assert is_break(bare(grpc.StatusCode.UNAVAILABLE), begun=False)
    # The server's own answer before Start: it has already retried the provider itself.
    served = error_from_status(
        grpc.StatusCode.UNAVAILABLE, "", rich(grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    )
    assert not is_break(served, begun=False)
    assert not is_break(bare(grpc.StatusCode.RESOURCE_EXHAUSTED), begun=False)
    # A draining replica's refusal asks for a try elsewhere (behind a balancer, another replica).
    draining = error_from_status(
        grpc.StatusCode.UNAVAILABLE, "", rich(grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
    )
    assert is_break(draining, begun=False)
    assert not is_break(TruncatedStreamError("nothing at all"), begun=False)


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    policy = ResumePolicy(initial_backoff=0.1, max_backoff=1.0)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (5, 1.0), (9, 1.0)]:
        delays = {policy.backoff(attempt) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1
    assert policy.backoff(1, retry_after=2.0) == 2.0


# Transparent resume against a fake server.

Context = grpc.aio.ServicerContext[object, pb.GenerateResponse]


def start_message() -> pb.GenerateResponse:
    return pb.GenerateResponse(
        sequence=1,
        start=pb.Start(
            stream_id="fake",
            route="fake",
            provider="fake",
            upstream_model="fake",
            create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000),
            resume_token=TOKEN,
            resume_window=duration_pb2.Duration(seconds=60),
        ),
    )


def journal(n_texts: int) -> list[pb.GenerateResponse]:
    """Start, n text deltas ("0 1 2 ..."), Finish: the stream the fake journals."""
    texts = [pb.GenerateResponse(sequence=i + 2, text_delta=pb.TextDelta(text=f"{i} ")) for i in range(n_texts)]
    done = pb.GenerateResponse(sequence=n_texts + 2, finish=pb.Finish(reason=pb.FINISH_REASON_STOP))
    return [start_message(), *texts, done]


@dataclass
class FakeDurable:
    """Serves one journaled stream; `breaks` says after how many messages each successive call is cut."""

    script: str = "ok"
    messages: list[pb.GenerateResponse] = field(default_factory=lambda: journal(6))
    breaks: list[int] = field(default_factory=list)
    generates: list[pb.GenerateRequest] = field(default_factory=list)
    resumes: list[pb.ResumeRequest] = field(default_factory=list)
    cancels: list[pb.CancelRequest] = field(default_factory=list)
    address: str = ""

    async def generate(self, request: pb.GenerateRequest, context: Context) -> None:
        self.generates.append(request)
        if self.script == "before-start" and len(self.generates) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")  # no rich status: a proxy's
        await self._send(0, context)

    async def resume(self, request: pb.ResumeRequest, context: Context) -> None:
        self.resumes.append(request)
        if request.resume_token != TOKEN or self.script == "gone":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such stream")
        await self._send(request.after_sequence, context)

    async def cancel(self, request: pb.CancelRequest, context: Context) -> pb.CancelResponse:
        self.cancels.append(request)
        return pb.CancelResponse(state=pb.StreamState(stream_id="fake", status=pb.STREAM_STATUS_CANCELLED))

    async def _send(self, after: int, context: Context) -> None:
        cut = self.breaks.pop(0) if self.breaks else None
        for n, message in enumerate(self.messages[after:]):
            if cut is not None and n == cut:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "upstream connect error or disconnect/reset")
            await context.write(message)
            if self.script == "slow":
                await asyncio.sleep(0.05)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDurable]:
    state = FakeDurable()
    server = grpc.aio.server()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            state.generate, pb.GenerateRequest.FromString, pb.GenerateResponse.SerializeToString
        ),
        "Resume": grpc.unary_stream_rpc_method_handler(
            state.resume, pb.ResumeRequest.FromString, pb.GenerateResponse.SerializeToString
        ),
        "Cancel": grpc.unary_unary_rpc_method_handler(
            state.cancel, pb.CancelRequest.FromString, pb.CancelResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tokenwire.v1.GenerationService", handlers),))
    state.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield state
    await server.stop(grace=None)


@dataclass
class Read:
    events: list[Event]
    text: str = ""
    error: TokenwireError | None = None
    reconnects: int = 0


async def read_async(fake: FakeDurable, stop_after: int | None, resume: tuple[str, str, int] | None) -> Read:
    out = Read(events=[])
    async with AsyncClient(fake.address, timeout=10, resume_policy=FAST) as client:
        stream = client.resume(*resume) if resume else client.generate("fake", [user("Hi")], durable=True)
        async with stream:
            try:
                async for event in stream:
                    out.events.append(event)
                    if stop_after is not None and len(out.events) == stop_after:
                        break
                else:
                    out.text = (await stream.get_final_response()).text
            except TokenwireError as exc:
                out.error = exc
            out.reconnects = stream.reconnects
    return out


def read_sync(fake: FakeDurable, stop_after: int | None, resume: tuple[str, str, int] | None) -> Read:
    out = Read(events=[])
    with Client(fake.address, timeout=10, resume_policy=FAST) as client:
        stream = client.resume(*resume) if resume else client.generate("fake", [user("Hi")], durable=True)
        with stream:
            try:
                for event in stream:
                    out.events.append(event)
                    if stop_after is not None and len(out.events) == stop_after:
                        break
                else:
                    out.text = stream.get_final_response().text
            except TokenwireError as exc:
                out.error = exc
            out.reconnects = stream.reconnects
    return out


Reader = Callable[..., Awaitable[Read]]


@pytest.fixture(params=["async", "sync"])
def read(request: pytest.FixtureRequest, fake: FakeDurable) -> Reader:
    def run(stop_after: int | None = None, resume: tuple[str, str, int] | None = None) -> Awaitable[Read]:
        if request.param == "async":
            return read_async(fake, stop_after, resume)
        return asyncio.to_thread(read_sync, fake, stop_after, resume)

    return run


def sequences(events: list[Event]) -> list[int]:
    return [event.sequence for event in events]


async def test_breaks_after_start_resume_from_the_last_delivered_sequence(fake: FakeDurable, read: Reader) -> None:
    fake.breaks = [3, 2]  # the Generate is cut after 3 messages, the first Resume after 2 more
    out = await read()
    assert out.error is None, out.error
    assert sequences(out.events) == list(range(1, 9))  # each message once, sequences running on
    assert out.text == "0 1 2 3 4 5 " and out.reconnects == 2
    assert [(r.stream_id, r.resume_token, r.after_sequence) for r in fake.resumes] == [
        ("fake", TOKEN, 3),
        ("fake", TOKEN, 5),
    ]
    assert len(fake.generates) == 1 and fake.cancels == []


async def test_a_break_before_start_sends_the_same_request_again(fake: FakeDurable, read: Reader) -> None:
    fake.script = "before-start"
    out = await read()
    assert out.error is None and out.text == "0 1 2 3 4 5 "
    first, again = fake.generates
    assert first.request_id == again.request_id != "" and first == again


async def test_attempts_are_bounded(fake: FakeDurable, read: Reader) -> None:
    fake.breaks = [2, 0, 0, 0, 0]  # every Resume fails before delivering anything
    out = await read()
    assert isinstance(out.error, UnavailableError) and out.error.last_sequence == 2
    assert len(fake.resumes) == FAST.max_attempts
    assert sequences(out.events) == [1, 2]


async def test_a_resume_answering_not_found_raises_the_typed_error(fake: FakeDurable, read: Reader) -> None:
    fake.breaks = [2]
    fake.script = "gone"
    out = await read()
    assert isinstance(out.error, NotFoundError) and len(fake.resumes) == 1


async def test_a_terminal_error_is_the_answer_not_a_break(fake: FakeDurable, read: Reader) -> None:
    error = pb.Error(
        code=pb.ERROR_CODE_PROVIDER_UNAVAILABLE, grpc_code=14, retryable=True, last_sequence=2, message="down"
    )
    fake.messages = [*journal(1)[:2], pb.GenerateResponse(sequence=3, error=error)]
    out = await read()
    assert isinstance(out.error, UnavailableError) and out.error.reason == "PROVIDER_UNAVAILABLE"
    assert fake.resumes == []


async def test_resume_from_a_cursor_continues_there(fake: FakeDurable, read: Reader) -> None:
    out = await read(resume=("fake", TOKEN, 4))
    assert out.error is None and sequences(out.events) == [5, 6, 7, 8]
    assert out.text == "3 4 5 "


async def test_leaving_a_durable_stream_early_sends_cancel(fake: FakeDurable, read: Reader) -> None:
    fake.script = "slow"
    out = await read(stop_after=2)
    assert isinstance(out.events[1], TextDelta)
    assert [(c.stream_id, c.resume_token) for c in fake.cancels] == [("fake", TOKEN)]


async def test_a_finished_durable_stream_sends_no_cancel(fake: FakeDurable, read: Reader) -> None:
    out = await read()
    assert out.error is None and fake.cancels == []
