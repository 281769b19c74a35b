"""The asyncio client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
import grpc.aio

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

from ._accumulate import StreamAccumulator, StreamLifecycle
from ._errors import ClientClosedError, TokenwireError, error_from_status
from ._events import Event, ModelInfo, PollBatch, Response, StreamState, TextDelta
from ._messages import MessageLike, RequestOptions, build_request
from ._resume import Durable, ResumePolicy

DEFAULT_TARGET = "localhost:50051"
# How long stopping a durable stream waits for its Cancel: bounded, and not the caller's
# deadline, since a deadline that ran out is a common reason to stop.
CANCEL_TIMEOUT = 2.0

# Generate and Resume calls alike: both answer with GenerateResponse messages.
_Call = grpc.aio.UnaryStreamCall[Any, pb.GenerateResponse]


class GenerationStream(StreamLifecycle[_Call]):
    """One streamed response.

    Use it as ``async with client.generate(...) as stream``: entering starts the call and
    leaving cancels it unless it has ended, which stops the server and the provider.
    A durable stream reconnects by itself after a break and delivers each message once;
    cancelling it, or leaving the block before its end, sends Cancel, which stops its
    generation on the server.
    Iterating (only inside the block) yields typed events; a failed call raises its
    :class:`APIStatusError` subclass where the failure is read, and a stream that breaks
    the contract raises :class:`StreamProtocolError`. ``await get_final_response()`` also
    works without the block: it reads the whole stream and cancels the call if it fails.
    """

    def __init__(
        self,
        start_call: Callable[[], _Call],
        *,
        durable: Durable[_Call] | None = None,
        accumulator: StreamAccumulator | None = None,
        send_cancel: Callable[[str, str], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        super().__init__(start_call, durable=durable, accumulator=accumulator)
        self._send_cancel = send_cancel
        self._cancelling: asyncio.Task[None] | None = None

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
        if self._cancelling is not None:
            await self._cancelling

    def cancel(self) -> None:
        """Stops the call unless it has ended; on a durable stream, sends Cancel first.

        The Cancel goes out in a task of its own, since this may be called where nothing
        can await; leaving the block (close()) waits for it.
        """
        target = self._stop_target()
        if target is not None and self._send_cancel is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing could send it
                self._cancelling = asyncio.get_running_loop().create_task(self._send_cancel(*target))
        super().cancel()

    async def _next(self) -> tuple[pb.GenerateResponse, Event | None] | None:
        """The next message and its event; None once the call ended OK."""
        self._require_entered()
        while self._readable():
            try:
                return await self._read(self._ensure_call())
            except TokenwireError as error:
                delay = self._plan_reconnect(error)
                if delay is None:
                    self._fail(error)
                    raise
                await asyncio.sleep(delay)
                self._drop_call()
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
        return None

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
    ``resume_policy`` bounds how durable streams reconnect after a break.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = None,
        headers: Sequence[tuple[str, str]] = (),
        resume_policy: ResumePolicy | None = None,
    ) -> None:
        self._target = target
        self._owns_channel = channel is None
        self._channel = channel
        self._stub_instance = None if channel is None else pb_grpc.GenerationServiceStub(channel)
        self._closed = False
        self._timeout = timeout
        self._headers = tuple(headers)
        self._resume_policy = resume_policy or ResumePolicy()

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
        """Streams a response from the route ``model``; see build_request for options.

        ``durable=True`` (or a ``resume_window`` in seconds) makes the stream survive a
        broken call: the stream resumes by itself, within ``timeout``.
        """
        return self.stream_request(build_request(model, messages, **options), timeout=timeout)

    def stream_request(self, request: pb.GenerateRequest, *, timeout: float | None = None) -> GenerationStream:
        """Streams the response to a request built by hand (durable if it asks for a resume window)."""
        timeout = self._timeout if timeout is None else timeout

        def start(call_timeout: float | None) -> _Call:
            return self._stub.Generate(request, timeout=call_timeout, metadata=self._headers)

        if not request.HasField("resume_window") or request.resume_window.ToNanoseconds() <= 0:
            return GenerationStream(lambda: start(timeout))
        return GenerationStream(
            lambda: start(timeout),
            durable=Durable(start, self._resume_call, timeout, self._resume_policy),
            send_cancel=self._quiet_cancel,
        )

    def resume(self, stream_id: str, token: str, after: int = 0, *, timeout: float | None = None) -> GenerationStream:
        """Reads a durable stream again from the cursor ``after`` (0: from its Start).

        The stream is read as one from ``generate``: it resumes by itself after a break,
        and leaving its block early cancels it. Past Start, its response has only what
        came after the cursor.
        """
        timeout = self._timeout if timeout is None else timeout

        def first(call_timeout: float | None) -> _Call:
            return self._resume_call(stream_id, token, after, call_timeout)

        return GenerationStream(
            lambda: first(timeout),
            durable=Durable(first, self._resume_call, timeout, self._resume_policy, stream_id, token),
            accumulator=StreamAccumulator(after=after, stream_id=stream_id),
            send_cancel=self._quiet_cancel,
        )

    async def poll(
        self,
        stream_id: str,
        token: str,
        after: int = 0,
        *,
        wait: float = 20.0,
        max_messages: int = 100,
        # The call's gRPC deadline, which the server sees too, not a local asyncio timeout.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PollBatch:
        """One long-poll read of a durable stream: what follows ``after``, waiting up to ``wait`` s for it.

        An empty batch is a wait that ran out. The call's deadline is ``timeout``, or else
        the wait plus the client's timeout (a deadline shorter than the wait would cut it).
        """
        request = poll_request(stream_id, token, after, wait, max_messages)
        deadline = timeout if timeout is not None else wait + (self._timeout or 10.0)
        try:
            response = await self._stub.Poll(request, timeout=deadline, metadata=self._headers)
        except grpc.aio.AioRpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "", exc.trailing_metadata()) from exc
        return poll_batch(response, after, stream_id)

    async def cancel(
        self,
        stream_id: str,
        token: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline, as in poll
    ) -> StreamState:
        """Stops a durable stream's generation (idempotent) and answers its state."""
        request = pb.CancelRequest(stream_id=stream_id, resume_token=token)
        try:
            response = await self._stub.Cancel(
                request, timeout=self._timeout if timeout is None else timeout, metadata=self._headers
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_status(exc.code(), exc.details() or "", exc.trailing_metadata()) from exc
        return StreamState.from_proto(response.state)

    def _resume_call(self, stream_id: str, token: str, after: int, timeout: float | None) -> _Call:
        request = pb.ResumeRequest(stream_id=stream_id, resume_token=token, after_sequence=after)
        return self._stub.Resume(request, timeout=timeout, metadata=self._headers)

    async def _quiet_cancel(self, stream_id: str, token: str) -> None:
        # Stopping a stream must not fail the code that stops it: the stream is over for this
        # caller either way, and an unanswered Cancel still ends in abandonment on the server.
        with contextlib.suppress(TokenwireError):
            await self.cancel(stream_id, token, timeout=CANCEL_TIMEOUT)


def poll_request(stream_id: str, token: str, after: int, wait: float, max_messages: int) -> pb.PollRequest:
    request = pb.PollRequest(stream_id=stream_id, resume_token=token, after_sequence=after, max_messages=max_messages)
    request.wait.FromNanoseconds(round(max(wait, 0.0) * 1e9))
    return request


def poll_batch(response: pb.PollResponse, after: int, stream_id: str) -> PollBatch:
    """The typed batch, its messages checked in sequence from the cursor."""
    accumulator = StreamAccumulator(after=after, stream_id=stream_id)
    events = [event for message in response.messages if (event := accumulator.feed(message)) is not None]
    return PollBatch(
        messages=list(response.messages),
        events=events,
        next_after=response.next_after_sequence,
        terminal=response.terminal,
        state=StreamState.from_proto(response.state),
    )
