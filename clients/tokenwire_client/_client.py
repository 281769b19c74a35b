"""The asyncio client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Self, Unpack

import grpc
import grpc.aio

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

from ._accumulate import StreamLifecycle
from ._errors import ClientClosedError, TokenwireError, error_from_status
from ._events import Event, ModelInfo, Response, TextDelta
from ._messages import MessageLike, RequestOptions, build_request

DEFAULT_TARGET = "localhost:50051"

_Call = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]


class GenerationStream(StreamLifecycle[_Call]):
    """One streamed response.

    Use it as ``async with client.generate(...) as stream``: entering starts the call and
    leaving cancels it unless it has ended, which stops the server and the provider.
    Iterating (only inside the block) yields typed events; a failed call raises its
    :class:`APIStatusError` subclass where the failure is read, and a stream that breaks
    the contract raises :class:`StreamProtocolError`. ``await get_final_response()`` also
    works without the block: it reads the whole stream and cancels the call if it fails.
    """

    async def __aenter__(self) -> Self:
        self._enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def text_stream(self) -> AsyncIterator[str]:
        """The answer text pieces only, from where the stream is now."""
        return self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        async for event in self:
            if isinstance(event, TextDelta):
                yield event.text

    def __aiter__(self) -> Self:
        self._require_entered()
        return self

    async def __anext__(self) -> Event:
        while (item := await self._next()) is not None:
            if item[1] is not None:
                return item[1]
        raise StopAsyncIteration

    @property
    def raw_messages(self) -> AsyncIterator[pb.GenerateResponse]:
        """The wire messages themselves, still checked against the contract."""
        return self._raw_messages()

    async def _raw_messages(self) -> AsyncIterator[pb.GenerateResponse]:
        while (item := await self._next()) is not None:
            yield item[0]

    async def get_final_response(self) -> Response:
        """Reads the rest of the stream and returns the whole response."""
        if not self._entered:
            async with self:
                return await self.get_final_response()
        async for _ in self:
            pass
        return self._accumulator.response()

    async def get_final_text(self) -> str:
        return (await self.get_final_response()).text

    async def close(self) -> None:
        self.cancel()

    async def _next(self) -> tuple[pb.GenerateResponse, Event | None] | None:
        """The next message and its event; None once the call ended OK."""
        self._require_entered()
        if not self._readable():
            return None
        try:
            return await self._read(self._ensure_call())
        except TokenwireError as error:
            self._fail(error)
            raise
        except asyncio.CancelledError:
            # grpc.aio ends a read with CancelledError when the call was cancelled locally:
            # by cancel(), or by the client's channel closing. Unless this task itself is
            # being cancelled, that is the stream's failure, not the task's.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            if self._failure is None:
                self._failure = self._accumulator.status_error(
                    grpc.StatusCode.CANCELLED, "the call was cancelled (was the client closed?)", None
                )
                self._ended = True
            raise self._failure from None

    async def _read(self, call: _Call) -> tuple[pb.GenerateResponse, Event | None] | None:
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._accumulator.status_error(exc.code(), exc.details() or "", exc.trailing_metadata()) from exc
        if not isinstance(message, pb.GenerateResponse):
            # End of stream: grpc.aio raises instead of returning it unless the status is OK.
            self._ended = True
            self._accumulator.check_complete()
            return None
        return message, self._accumulator.feed(message)


class AsyncClient:
    """A tokenwire client for asyncio.

    ``timeout`` is the default deadline of every call, in seconds; ``headers`` are gRPC
    metadata sent with every call (not the request's ``metadata`` labels). A channel
    passed in stays open when the client closes. The client's own channel is created on
    first use, in the event loop that uses it, so a client may be built outside one.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._target = target
        self._owns_channel = channel is None
        self._channel = channel
        self._stub_instance = None if channel is None else pb_grpc.GenerationServiceStub(channel)
        self._closed = False
        self._timeout = timeout
        self._headers = tuple(headers)

    @property
    def _stub(self) -> pb_grpc.GenerationServiceAsyncStub:
        if self._closed:
            raise ClientClosedError("this client is closed")
        if self._stub_instance is None:
            self._channel = grpc.aio.insecure_channel(self._target)
            self._stub_instance = pb_grpc.GenerationServiceStub(self._channel)
        return self._stub_instance

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._owns_channel and self._channel is not None:
            await self._channel.close()

    async def list_models(self) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout, metadata=self._headers
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "", exc.trailing_metadata()) from exc
        return [ModelInfo.from_proto(model) for model in response.models]

    def generate(
        self,
        model: str,
        messages: Iterable[MessageLike],
        *,
        timeout: float | None = None,
        **options: Unpack[RequestOptions],
    ) -> GenerationStream:
        """Streams a response from the route ``model``; see build_request for options."""
        return self.stream_request(build_request(model, messages, **options), timeout=timeout)

    def stream_request(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> GenerationStream:
        """Streams the response to a request built by hand."""
        return GenerationStream(
            lambda: self._stub.Generate(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._headers,
            )
        )
