"""The synchronous client: the async client's surface over the blocking grpc API."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Protocol, Self, Unpack

import grpc

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

from ._accumulate import Cancellable, StreamLifecycle
from ._client import DEFAULT_TARGET
from ._errors import ClientClosedError, TokenwireError, TrailingMetadata, error_from_status
from ._events import Event, ModelInfo, Response, TextDelta
from ._messages import MessageLike, RequestOptions, build_request


def _trailers(error: grpc.RpcError) -> TrailingMetadata:
    # Sync grpc gives (key, value) named tuples; the stubs know only their attributes.
    return [(datum.key, datum.value) for datum in error.trailing_metadata() or ()]


class _Call(Cancellable, Protocol):
    """What this module uses of the call object a unary-stream grpc call returns."""

    def __next__(self) -> pb.GenerateResponse: ...


class SyncGenerationStream(StreamLifecycle[_Call]):
    """One streamed response; see :class:`GenerationStream` for the semantics.

    Use it as ``with client.generate(...) as stream``; leaving the block cancels the
    call unless it has ended.
    """

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

    def _next_message(self) -> pb.GenerateResponse | None:
        item = self._next()
        return None if item is None else item[0]

    def _next(self) -> tuple[pb.GenerateResponse, Event | None] | None:
        self._require_entered()
        if not self._readable():
            return None
        try:
            return self._read(self._ensure_call())
        except TokenwireError as error:
            self._fail(error)
            raise

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
    ) -> None:
        self._owns_channel = channel is None
        self._channel = grpc.insecure_channel(target) if channel is None else channel
        self._stub_instance = pb_grpc.GenerationServiceStub(self._channel)
        self._closed = False
        self._timeout = timeout
        self._headers = tuple(headers)

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
        return SyncGenerationStream(
            lambda: self._stub.Generate(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._headers,
            )
        )
