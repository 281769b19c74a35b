"""The sync Client over grpc_testing's fake channel: statuses and trailers that a real tokenwire server never sends,
but a proxy, a mangled trailer or a broken server can (the test plays the server's side of each call by hand)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

from tokenwire.v1 import generation_pb2 as pb
from tokenwire_client import (
    Client,
    InternalServerError,
    RateLimitError,
    ResumePolicy,
    StreamIntegrityError,
    TextDelta,
    TruncatedStreamError,
    UnavailableError,
    user,
)

pytestmark = pytest.mark.timeout(20)
SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


@pytest.fixture
def in_thread() -> Iterator[Callable[[Callable[[], Any]], Future[Any]]]:
    """Runs the client's blocking side in a thread while the test plays the server."""
    pool = ThreadPoolExecutor(1)
    yield pool.submit
    # A client still blocked on the fake channel (a failed test) must not hang the session: don't wait for it.
    pool.shutdown(wait=False, cancel_futures=True)


def take(channel: Any, method: str) -> tuple[Any, Any]:
    """The next call of `method` the client made: its request and the fake RPC to answer it with."""
    _metadata, request, rpc = channel.take_unary_stream(SERVICE.methods_by_name[method])
    return request, rpc


def start(sequence: int = 1, token: str = "") -> pb.GenerateResponse:
    return pb.GenerateResponse(sequence=sequence, start=pb.Start(stream_id="s1", route="sim", resume_token=token))


def text(sequence: int, value: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(sequence=sequence, text_delta=pb.TextDelta(text=value))


def finish(sequence: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(sequence=sequence, finish=pb.Finish(reason=pb.FINISH_REASON_STOP))


def rich(code: grpc.StatusCode, *details: Any) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=code.value[0], message="m")
    for detail in details:
        status.details.add().Pack(detail)
    return (("grpc-status-details-bin", status.SerializeToString()),)


class Reader:
    """The client's side of a Generate: the events it has read so far, for the test to wait on.

    The fake channel drops responses the client has not yet read when the test ends the call with a non-OK status
    (a real channel delivers them first), so a test waits for them to be read before it sends such a status.
    """

    def __init__(self, channel: Any, **client: Any) -> None:
        self.channel, self.client, self.events = channel, client, list[Any]()

    def __call__(self, durable: bool = False) -> tuple[Any, int]:
        with (
            Client(channel=self.channel, timeout=10, **self.client) as client,
            client.generate("sim", [user("Hi")], durable=durable) as stream,
        ):
            for event in stream:
                self.events.append(event)
            return stream.get_final_response(), stream.reconnects

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 5
        while len(self.events) < count:
            assert time.monotonic() < deadline, self.events
            time.sleep(0.005)


def test_an_ok_status_without_a_terminal_event_is_a_truncated_stream(channel: Any, in_thread: Any) -> None:
    result = in_thread(Reader(channel))
    _, rpc = take(channel, "Generate")
    rpc.send_response(start())
    rpc.send_response(text(2, "Hel"))
    rpc.terminate((), grpc.StatusCode.OK, "")
    with pytest.raises(TruncatedStreamError):
        result.result(5)


def test_a_sequence_gap_is_an_integrity_error(channel: Any, in_thread: Any) -> None:
    result = in_thread(Reader(channel))
    _, rpc = take(channel, "Generate")
    rpc.send_response(start())
    rpc.send_response(text(3, "lost one"))
    with pytest.raises(StreamIntegrityError, match="expected sequence 2, got 3"):
        result.result(5)
    rpc.cancelled()  # the client hung up on the broken stream


def test_rich_details_in_the_trailers_shape_the_error(channel: Any, in_thread: Any) -> None:
    result = in_thread(Reader(channel))
    _, rpc = take(channel, "Generate")
    info = error_details_pb2.ErrorInfo(
        reason="PROVIDER_RATE_LIMITED",
        domain="tokenwire",
        metadata={"provider": "openai", "provider_http_status": "429"},
    )
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    rpc.terminate(rich(code, info, retry), code, "provider rate limited")
    with pytest.raises(RateLimitError) as caught:
        result.result(5)
    error = caught.value
    assert error.reason == "PROVIDER_RATE_LIMITED" and error.retry_after == 2.5 and error.retryable
    assert error.provider == "openai" and error.provider_http_status == 429 and not error.truncated


def test_a_mangled_details_trailer_keeps_the_status_code(channel: Any, in_thread: Any) -> None:
    result = in_thread(Reader(channel))
    _, rpc = take(channel, "Generate")
    rpc.terminate((("grpc-status-details-bin", b"\xff\x00not a status"),), grpc.StatusCode.UNAVAILABLE, "cut")
    with pytest.raises(UnavailableError) as caught:
        result.result(5)
    assert caught.value.reason == "" and caught.value.retryable


def test_a_foreign_domains_error_info_is_not_read_as_ours(channel: Any, in_thread: Any) -> None:
    result = in_thread(Reader(channel))
    _, rpc = take(channel, "Generate")
    proxy = error_details_pb2.ErrorInfo(
        reason="QUOTA_EXCEEDED", domain="proxy.example", metadata={"retryable": "false"}
    )
    rpc.terminate(rich(grpc.StatusCode.INTERNAL, proxy), grpc.StatusCode.INTERNAL, "upstream reset")
    with pytest.raises(InternalServerError) as caught:
        result.result(5)
    assert caught.value.reason == "" and not caught.value.retryable


def test_a_bare_status_after_start_is_truncated_with_the_last_sequence_seen(channel: Any, in_thread: Any) -> None:
    # What a proxy reports when the server behind it dies mid-stream: a status, no Error event, no details.
    reader = Reader(channel)
    result = in_thread(reader)
    _, rpc = take(channel, "Generate")
    rpc.send_response(start())
    rpc.send_response(text(2, "Hel"))
    reader.wait_for(2)
    rpc.terminate((), grpc.StatusCode.INTERNAL, "RST_STREAM")
    with pytest.raises(InternalServerError) as caught:
        result.result(5)
    assert caught.value.truncated and caught.value.last_sequence == 2 and caught.value.stream_id == "s1"


def test_a_durable_stream_cut_by_a_bare_status_resumes_after_its_last_sequence(channel: Any, in_thread: Any) -> None:
    reader = Reader(channel, resume_policy=ResumePolicy(initial_backoff=0.01))
    result: Future[tuple[Any, int]] = in_thread(lambda: reader(durable=True))
    request, rpc = take(channel, "Generate")
    assert request.resume_window.seconds > 0
    rpc.send_response(start(token="t0k"))
    rpc.send_response(text(2, "Hel"))
    reader.wait_for(2)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "connection reset")
    resume, rpc = take(channel, "Resume")
    assert (resume.stream_id, resume.resume_token, resume.after_sequence) == ("s1", "t0k", 2)
    rpc.send_response(text(3, "lo"))
    rpc.send_response(finish(4))
    rpc.terminate((), grpc.StatusCode.OK, "")
    response, reconnects = result.result(5)
    assert "".join(e.text for e in reader.events if isinstance(e, TextDelta)) == response.text == "Hello"
    assert reconnects == 1


def test_list_models_maps_a_status_with_details(channel: Any, in_thread: Any) -> None:
    def list_models() -> Any:
        with Client(channel=channel, timeout=10) as client:
            return client.list_models()

    result = in_thread(list_models)
    _metadata, _request, rpc = channel.take_unary_unary(SERVICE.methods_by_name["ListModels"])
    info = error_details_pb2.ErrorInfo(reason="SERVER_OVERLOADED", domain="tokenwire")
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    rpc.terminate(pb.ListModelsResponse(), rich(code, info), code, "busy")
    with pytest.raises(RateLimitError) as caught:
        result.result(5)
    assert caught.value.reason == "SERVER_OVERLOADED"
