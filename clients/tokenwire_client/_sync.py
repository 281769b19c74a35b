"""The synchronous client: the async client's surface over the blocking grpc API."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Protocol, Self, Unpack, cast

import grpc

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

from ._accumulate import Cancellable, StreamAccumulator, StreamLifecycle
from ._client import CANCEL_TIMEOUT, DEFAULT_TARGET, poll_batch, poll_request
from ._errors import ClientClosedError, TokenwireError, TrailingMetadata, error_from_status
from ._events import Event, ModelInfo, PollBatch, Response, StreamState, TextDelta
from ._messages import MessageLike, RequestOptions, build_request
from ._resume import Durable, ResumePolicy


def _trailers(error: grpc.RpcError) -> TrailingMetadata:
    # Sync grpc's own calls give (key, value) named tuples, but its API promises only (key, value) pairs, and plain
    # tuples do come (grpc_testing's channel, interceptors): unpack pairs rather than read `.key`.
    # The stubs type them as _Metadatum, which they do not declare a tuple; at run time both kinds unpack.
    pairs = cast("Iterable[tuple[str, str | bytes]]", error.trailing_metadata() or ())
    return [(key, value) for key, value in pairs]


class _Call(Cancellable, Protocol):
    """What this module uses of the call object a unary-stream grpc call returns."""

    def __next__(self) -> pb.GenerateResponse: ...


class SyncGenerationStream(StreamLifecycle[_Call]):
    """One streamed response; see :class:`GenerationStream` for the semantics.

    Use it as ``with client.generate(...) as stream``; leaving the block cancels the
    call unless it has ended (and, on a durable stream, sends Cancel).
    """

    def __init__(
        self,
        start_call: Callable[[], _Call],
        *,
        durable: Durable[_Call] | None = None,
        accumulator: StreamAccumulator | None = None,
        send_cancel: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(start_call, durable=durable, accumulator=accumulator)
        self._send_cancel = send_cancel

    def __enter__(self) -> Self:
        self._enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def text_stream(self) -> Iterator[str]:
        return (event.text for event in self if isinstance(event, TextDelta))

    def __iter__(self) -> Self:
        self._require_entered()
        return self

    def __next__(self) -> Event:
        while (item := self._next()) is not None:
            if item[1] is not None:
                return item[1]
        raise StopIteration

    @property
    def raw_messages(self) -> Iterator[pb.GenerateResponse]:
        return iter(self._next_message, None)

    def get_final_response(self) -> Response:
        if not self._entered:
            with self:
                return self.get_final_response()
        for _ in self:
            pass
        return self._accumulator.response()

    def get_final_text(self) -> str:
        return self.get_final_response().text

    def close(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        """Stops the call unless it has ended; on a durable stream, sends Cancel first (blocking, bounded)."""
        target = self._stop_target()
        if target is not None and self._send_cancel is not None:
            self._send_cancel(*target)
        super().cancel()

    def _next_message(self) -> pb.GenerateResponse | None:
        item = self._next()
        return None if item is None else item[0]

    def _next(self) -> tuple[pb.GenerateResponse, Event | None] | None:
        self._require_entered()
        while self._readable():
            try:
                return self._read(self._ensure_call())
            except TokenwireError as error:
                delay = self._plan_reconnect(error)
                if delay is None:
                    self._fail(error)
                    raise
                time.sleep(delay)
                self._drop_call()
        return None

    def _read(self, call: _Call) -> tuple[pb.GenerateResponse, Event | None] | None:
        try:
            message = next(call)
        except StopIteration:
            self._ended = True
            self._accumulator.check_complete()
            return None
        except grpc.RpcError as exc:
            # A read cut short by cancel() from another thread reports the cancellation.
            if self._failure is not None:
                raise self._failure from None
            raise self._accumulator.status_error(exc.code(), exc.details() or "", _trailers(exc)) from exc
        return message, self._accumulator.feed(message)


class Client:
    """A blocking tokenwire client; see :class:`AsyncClient` for the arguments."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = None,
        headers: Sequence[tuple[str, str]] = (),
        resume_policy: ResumePolicy | None = None,
    ) -> None:
        self._owns_channel = channel is None
        self._channel = grpc.insecure_channel(target) if channel is None else channel
        self._stub_instance = pb_grpc.GenerationServiceStub(self._channel)
        self._closed = False
        self._timeout = timeout
        self._headers = tuple(headers)
        self._resume_policy = resume_policy or ResumePolicy()

    @property
    def _stub(self) -> pb_grpc.GenerationServiceStub:
        if self._closed:
            raise ClientClosedError("this client is closed")
        return self._stub_instance

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        if self._owns_channel:
            self._channel.close()

    def list_models(self) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=self._timeout, metadata=self._headers)
        except grpc.RpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "", _trailers(exc)) from exc
        return [ModelInfo.from_proto(model) for model in response.models]

    def generate(
        self,
        model: str,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> SyncGenerationStream:
        return self.stream_request(build_request(model, messages, **options), timeout=timeout)

    def stream_request(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> SyncGenerationStream:
        timeout = self._timeout if timeout is None else timeout

        def start(call_timeout: float | None) -> _Call:
            return self._stub.Generate(request, timeout=call_timeout, metadata=self._headers)

        if not request.HasField("resume_window") or request.resume_window.ToNanoseconds() <= 0:
            return SyncGenerationStream(lambda: start(timeout))
        return SyncGenerationStream(
            lambda: start(timeout),
            durable=Durable(start, self._resume_call, timeout, self._resume_policy),
            send_cancel=self._quiet_cancel,
        )

    def resume(
        self, stream_id: str, token: str, after: int = 0, *, timeout: float | None = None
    ) -> SyncGenerationStream:
        """Reads a durable stream again from the cursor ``after``; see AsyncClient.resume."""
        timeout = self._timeout if timeout is None else timeout

        def first(call_timeout: float | None) -> _Call:
            return self._resume_call(stream_id, token, after, call_timeout)

        return SyncGenerationStream(
            lambda: first(timeout),
            durable=Durable(first, self._resume_call, timeout, self._resume_policy, stream_id, token),
            accumulator=StreamAccumulator(after=after, stream_id=stream_id),
            send_cancel=self._quiet_cancel,
        )

    def poll(
        self,
        stream_id: str,
        token: str,
        after: int = 0,
        *,
        wait: float = 20.0,
        max_messages: int = 100,
        timeout: float | None = None,
    ) -> PollBatch:
        """One long-poll read; see AsyncClient.poll."""
        request = poll_request(stream_id, token, after, wait, max_messages)
        deadline = timeout if timeout is not None else wait + (self._timeout or 10.0)
        try:
            response = self._stub.Poll(request, timeout=deadline, metadata=self._headers)
        except grpc.RpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "", _trailers(exc)) from exc
        return poll_batch(response, after, stream_id)

    def cancel(self, stream_id: str, token: str, *, timeout: float | None = None) -> StreamState:
        """Stops a durable stream's generation (idempotent) and answers its state."""
        request = pb.CancelRequest(stream_id=stream_id, resume_token=token)
        try:
            response = self._stub.Cancel(
                request, timeout=self._timeout if timeout is None else timeout, metadata=self._headers
            )
        except grpc.RpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "", _trailers(exc)) from exc
        return StreamState.from_proto(response.state)

    def _resume_call(self, stream_id: str, token: str, after: int, timeout: float | None) -> _Call:
        request = pb.ResumeRequest(stream_id=stream_id, resume_token=token, after_sequence=after)
        return self._stub.Resume(request, timeout=timeout, metadata=self._headers)

    def _quiet_cancel(self, stream_id: str, token: str) -> None:
        # See AsyncClient._quiet_cancel.
        with contextlib.suppress(TokenwireError):
            self.cancel(stream_id, token, timeout=CANCEL_TIMEOUT)
