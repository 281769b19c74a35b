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
from ._errors import TokenwireError, error_from_status
from ._events import Event, ModelInfo, Response, TextDelta
from ._messages import MessageLike, RequestOptions, build_request

DEFAULT_TARGET = "localhost:50051"

_Call = grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse]


class GenerationStream(StreamLifecycle[_Call]):
    """One streamed response.

    Use it as ``async with client.generate(...) as stream``: entering starts the call and
    leaving cancels it unless it has ended, which stops the server and the provider.
    Iterating yields typed events; a failed call raises its :class:`APIStatusError`
    subclass where the failure is read, and a stream that breaks the contract raises
    :class:`StreamProtocolError`.
    """

    async def __aenter__(self) -> Self:
        self._ensure_call()
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
        async for _ in self:
            pass
        return self._accumulator.response()

    async def get_final_text(self) -> str:
        return (await self.get_final_response()).text

    async def close(self) -> None:
        self.cancel()

    async def _next(self) -> tuple[pb.GenerateResponse, Event | None] | None:
        """The next message and its event; None once the call ended OK."""
        if not self._readable():
            return None
        try:
            return await self._read(self._ensure_call())
        except TokenwireError as error:
            self._fail(error)
            raise
        except asyncio.CancelledError:
            # grpc.aio ends a read with CancelledError when the call was cancelled
            # locally; if this task was not itself cancelled, that was cancel().
            task = asyncio.current_task()
            if self._failure is not None and task is not None and not task.cancelling():
                raise self._failure from None
            raise

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

    ``timeout`` is the default deadline of every call, in seconds; ``metadata`` is sent
    with every call. A channel passed in stays open when the client closes.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._owns_channel = channel is None
        self._channel = grpc.aio.insecure_channel(target) if channel is None else channel
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = tuple(metadata)

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
        if self._owns_channel:
            await self._channel.close()

    async def list_models(self) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout, metadata=self._metadata
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
                metadata=self._metadata,
            )
        )
