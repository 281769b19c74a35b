"""The gRPC face of the service: Generate and ListModels, validation, and the error firewall.

Whatever happens inside, a caller gets the contract: a plain rich status before Start, a terminal
Error event mirrored by the status after it, INTERNAL with a correlation id for bugs — never
grpc's default UNKNOWN with exception text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

import grpc

from service.config import ServerConfig
from service.errors import (
    ErrorCode,
    GatewayError,
    describe_exception,
    internal_error,
    invalid_request,
    new_correlation_id,
    redact,
    shutting_down,
)
from service.events import GenerationRequest
from service.routing import OpenedStream, Route, Router
from service.streams import Relay, Sequencer, StreamInfo
from service.validation import REQUEST_ID, prompt_chars, validate_request
from service.wire import set_status
from tokenwire.v1 import generation_pb2 as pb

log = logging.getLogger("tokenwire.generation")

_M = TypeVar("_M")
Context = grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]
# Retry delay suggested to callers turned away at the concurrency limit.
OVERLOAD_RETRY_AFTER_SECONDS = 1.0
# The caller's clock and ours differ a little: a cancel this close to the deadline is the deadline.
_DEADLINE_SLACK_SECONDS = 0.05
# How long a stream past its maximum duration may sit in a write before its handler is cancelled.
_STALLED_WRITE_SECONDS = 5.0


def _metadata_size(metadata: Iterable[tuple[str, str | bytes]] | None) -> int:
    # grpc's own accounting: name and value lengths plus 32 bytes per entry (as in HPACK).
    return sum(len(key) + len(value) + 32 for key, value in metadata or ())


class Received(Generic[_M]):
    """A request as a handler receives it: the decoded message (None if undecodable) and its size.

    grpc keeps whatever the deserializer returned alive until the call ends. The handler takes
    the message out of this holder, so that once it is validated the parsed message, a whole copy
    of the request, can be freed while the stream goes on. The size is the one on the wire:
    protobuf's ByteSize() would serialize the message again to find it (two more copies).
    """

    __slots__ = ("message", "size")

    def __init__(self, message: _M | None, size: int) -> None:
        self.message = message
        self.size = size

    def take(self) -> _M | None:
        message, self.message = self.message, None
        return message


@dataclass(slots=True, eq=False)
class _InFlight:
    """One Generate stream in flight, as shutdown and the stream limits see it."""

    task: asyncio.Task[None]
    # Set once the provider's first event arrived and Start is on its way.
    relay: Relay | None = None
    # Why the server ends this stream early (shutdown, the duration limit); None while it runs.
    ended_by: GatewayError | None = None
    # The handler was cancelled to end the stream: it was still waiting for its provider's first
    # event, before anything was sent.
    interrupted: bool = False
    # The handler was cancelled because its caller stopped reading past the duration limit.
    cut: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class GenerationService:
    def __init__(self, router: Router, config: ServerConfig) -> None:
        self.router = router
        self.config = config
        # The Generate streams in flight: the concurrency limit counts these.
        self.active: dict[asyncio.Task[None], _InFlight] = {}
        # Set while no stream is in flight: what a draining shutdown waits for.
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False

    @property
    def active_streams(self) -> int:
        return len(self.active)

    async def Generate(self, received: Received[pb.GenerateRequest], context: Context) -> None:
        received_at = time.monotonic()
        create_time = datetime.now(UTC)
        request = received.take()
        # What the closing log line needs; the message itself is let go of once it is validated.
        model, labels = _log_fields(request)
        # A malformed request_id is rejected below, but must not name the stream in the meantime.
        given = request.request_id if request is not None else ""
        stream_id = given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        remaining = context.time_remaining()
        deadline = None if remaining is None else received_at + remaining
        task: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
        flight: _InFlight | None = None
        outcome = "OK"
        try:
            try:
                route, generation = self._admissible(request, received.size, context, stream_id, deadline)
                request = None
                flight = self._admit(task, received_at)
                try:
                    opened = await self.router.open(route, generation)
                    info = StreamInfo(
                        stream_id=stream_id,
                        route=route.name,
                        provider=opened.route.provider.kind,
                        upstream_model=opened.route.config.model,
                        received_at=received_at,
                        create_time=create_time,
                        prompt_chars=prompt_chars(generation),
                    )
                    await self._relay(flight, opened, info, context)
                finally:
                    self._release(flight)
            except asyncio.CancelledError:
                # Only a cancel of our own, and no other beside it, is turned into a status: a
                # client's cancel, its deadline or grpc's own stop at the end of the grace period
                # mean the call is gone, and nothing can be written to it any more.
                if flight is None or flight.ended_by is None or not flight.interrupted or task.uncancel() > 0:
                    # grpc says only "cancelled"; the caller's deadline tells the two apart.
                    late = deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_SECONDS
                    outcome = "DEADLINE_EXCEEDED" if late else "CANCELLED"
                    if flight is not None and flight.cut and flight.ended_by is not None:
                        outcome = f"{flight.ended_by.code.value} (the caller had stopped reading)"
                    raise
                # The server ended the stream while it waited for its first token: say why.
                raise flight.ended_by from None
            relay = flight.relay
            failure = relay.sequencer.failure if relay is not None else None
            if failure is not None:
                set_status(context, failure, stream_id)
                outcome = failure.code.value
        except GatewayError as err:
            set_status(context, err, stream_id)
            outcome = err.code.value
        except _CallGone as gone:
            # Nobody is left to tell; this is no bug of ours, and not worth an ERROR line.
            outcome = f"CALL_ENDED ({type(gone.__cause__).__name__} while writing)"
        except Exception as exc:
            correlation_id = new_correlation_id()
            log.error("internal error %s in stream %s: %s", correlation_id, stream_id, describe_exception(exc))
            set_status(context, internal_error(correlation_id), stream_id)
            outcome = ErrorCode.INTERNAL.value
        finally:
            relay = flight.relay if flight is not None else None
            self._log_outcome(model, labels, stream_id, outcome, relay.sequencer if relay else None, received_at)

    def _admissible(
        self, request: pb.GenerateRequest | None, size: int, context: Context, stream_id: str, deadline: float | None
    ) -> tuple[Route, GenerationRequest]:
        """Checks everything a provider must never see; raises GatewayError for the caller."""
        if self.draining:
            raise shutting_down("the server is shutting down; retry")
        if request is None:
            raise invalid_request("request", "is not a valid tokenwire.v1.GenerateRequest message")
        metadata_bytes = _metadata_size(context.invocation_metadata())
        if metadata_bytes > self.config.max_metadata_bytes:
            raise invalid_request(
                "metadata",
                f"request headers are {metadata_bytes} bytes; this server accepts at most "
                f"{self.config.max_metadata_bytes}",
            )
        if not request.model:
            raise invalid_request("model", "is required: name a route (see ListModels)")
        route = self.router.get(request.model)
        generation = validate_request(
            request,
            route,
            stream_id=stream_id,
            deadline=deadline,
            max_request_bytes=self.config.max_request_bytes,
            size=size,
        )
        return route, generation

    def _admit(self, task: asyncio.Task[None], received_at: float) -> _InFlight:
        if len(self.active) >= self.config.max_concurrent_streams:
            raise GatewayError(
                ErrorCode.SERVER_OVERLOADED,
                f"the server is at its limit of {self.config.max_concurrent_streams} concurrent streams",
                retry_after=OVERLOAD_RETRY_AFTER_SECONDS,
            )
        flight = self.active[task] = _InFlight(task)
        self.idle.clear()
        limit = self.config.max_stream_duration_seconds
        if limit:
            remaining = received_at + limit - time.monotonic()
            flight.timers.append(asyncio.get_running_loop().call_later(remaining, self._expire, flight))
        return flight

    def _release(self, flight: _InFlight) -> None:
        for timer in flight.timers:
            timer.cancel()
        self.active.pop(flight.task, None)
        if not self.active:
            self.idle.set()

    def _expire(self, flight: _InFlight) -> None:
        limit = self.config.max_stream_duration_seconds
        self._end(
            flight,
            GatewayError(
                ErrorCode.STREAM_DURATION_EXCEEDED,
                f"the stream reached this server's maximum stream duration of {limit:g} s",
            ),
        )
        if flight.relay is not None:
            # A caller that stopped reading holds the handler in a write that may never return,
            # and grpc.aio can neither cancel that write nor send a status behind it. The handler
            # is cancelled instead: the provider's stream and the slot are freed, and gRPC ends
            # the call at the caller's deadline or when its connection goes.
            flight.timers.append(
                asyncio.get_running_loop().call_later(_STALLED_WRITE_SECONDS, self._cut_stalled, flight)
            )

    def _end(self, flight: _InFlight, reason: GatewayError) -> None:
        """Ends a stream early with `reason`: a plain status before Start, a terminal Error after."""
        # A handler already being cancelled (its client hung up) is left to finish its cleanup.
        if flight.ended_by is not None or flight.task.cancelling():
            return
        flight.ended_by = reason
        if flight.relay is None:
            flight.interrupted = True
            flight.task.cancel("the server ends this stream")
        else:
            flight.relay.stop(reason)

    def _cut_stalled(self, flight: _InFlight) -> None:
        if self.active.get(flight.task) is flight and not flight.task.cancelling():
            flight.cut = True
            flight.task.cancel("the caller stopped reading a stream past its maximum duration")

    async def _relay(self, flight: _InFlight, opened: OpenedStream, info: StreamInfo, context: Context) -> None:
        """Writes the sequenced stream. The provider's stream is closed on every path out."""
        relay = flight.relay = Relay(
            Sequencer(info),
            opened.first,
            opened.events,
            heartbeat_interval=self.config.heartbeat_interval_seconds or None,
        )
        try:
            async with contextlib.aclosing(relay.messages()) as messages:
                async for message in messages:
                    await _write(context, message)
        finally:
            await relay.aclose()

    def _log_outcome(
        self,
        model: str,
        labels: str,
        stream_id: str,
        outcome: str,
        sequencer: Sequencer | None,
        received_at: float,
    ) -> None:
        finish = sequencer.finish if sequencer is not None else None
        log.info(
            "stream %s route=%r outcome=%s finish=%s messages=%d duration_ms=%.1f%s",
            stream_id,
            model,
            outcome,
            pb.FinishReason.Name(finish.reason).removeprefix("FINISH_REASON_").lower() if finish else "-",
            sequencer.sequence if sequencer is not None else 0,
            (time.monotonic() - received_at) * 1000,
            redact(labels),
        )

    async def ListModels(
        self,
        request: pb.ListModelsRequest | None,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.Model(
                    name=route.name,
                    provider=route.config.provider,
                    upstream_model=route.config.model,
                    description=route.config.description,
                    supports_tools=route.provider.supports_tools,
                    supports_reasoning=route.provider.supports_reasoning,
                    fallbacks=route.config.fallbacks,
                )
                for route in self.router.routes.values()
            ]
        )

    def begin_drain(self) -> None:
        """New streams are refused from now on; the ones in flight go on."""
        self.draining = True

    def end_streams(self) -> int:
        """Ends every stream in flight with SERVER_SHUTTING_DOWN.

        A stream still waiting for its first token gets a plain status at once; a started one
        gets a terminal Error, at once if it waits for its provider, or right after the write in
        flight returns.
        """
        for flight in list(self.active.values()):
            self._end(flight, _stream_shut_down())
        return len(self.active)


def _log_fields(request: pb.GenerateRequest | None) -> tuple[str, str]:
    """The route name and the caller's metadata labels, as the stream's log line shows them."""
    if request is None:
        return "", ""
    labels = ""
    if request.metadata:
        labels = " " + " ".join(f"{k[:64]!r}={v[:256]!r}" for k, v in sorted(request.metadata.items())[:16])
    return request.model[:128], labels


class _CallGone(Exception):
    """A write failed because the call is over: the client went away or the server stopped it."""


async def _write(context: Context, message: pb.GenerateResponse) -> None:
    try:
        await context.write(message)
    except Exception as exc:  # CancelledError is no Exception: it goes on as it is
        raise _CallGone from exc


def _stream_shut_down() -> GatewayError:
    return shutting_down("the server is shutting down and ended the stream before it finished; retry")
