"""The gRPC door: Generate, Resume, Poll, Cancel and ListModels, and the error firewall.

Whatever happens inside, a caller gets the contract: a plain rich status before Start, a terminal
Error event mirrored by the status after it, INTERNAL with a correlation id for bugs — never
grpc's default UNKNOWN with exception text. Admission, the duration limit and the drain are the
supervisor's (`service.supervisor`); durable streams are `service.durable`'s, whose readers this
door writes out as the journal's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import grpc

from service.config import ServerConfig
from service.durable import DEFAULT_POLL_MESSAGES, MAX_POLL_MESSAGES, DurableStreams, Follower, failure_of
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
from service.journal import Journal
from service.routing import OpenedStream, Route, Router
from service.streams import Relay, Sequencer, StreamInfo
from service.supervisor import InFlight, StreamSupervisor
from service.validation import REQUEST_ID, prompt_chars, validate_request
from service.wire import capabilities, set_status
from tokenwire.v1 import generation_pb2 as pb

log = logging.getLogger("tokenwire.generation")

Context = grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]
# The caller's clock and ours differ a little: a cancel this close to the deadline is the deadline.
_DEADLINE_SLACK_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What the handlers get for request bytes protobuf would not decode (see server._lenient)."""

    # The message nests deeper than protobuf's limit of 100 messages.
    too_deep: bool = False


_M = TypeVar("_M")


def decoded(request: _M | Undecodable, name: str) -> _M:
    """The request, or INVALID_ARGUMENT that says why it could not be read."""
    if not isinstance(request, Undecodable):
        return request
    if request.too_deep:
        # A google.protobuf.Struct spends 3 of protobuf's 100 levels per JSON object level.
        raise invalid_request(
            "request",
            f"is not a valid tokenwire.v1.{name} message: it nests deeper than protobuf's limit of 100 "
            "messages (tool parameters in google.protobuf.Struct reach it at about 33 levels of JSON "
            "objects; see the README)",
        )
    raise invalid_request("request", f"is not a valid tokenwire.v1.{name} message")


class Received(Generic[_M]):
    """A request as a handler receives it: the decoded message and its size on the wire.

    grpc keeps whatever the deserializer returned alive until the call ends. The handler takes
    the message out of this holder, so that once it is validated the parsed message, a whole copy
    of the request, can be freed while the stream goes on. The size is the one on the wire:
    protobuf's ByteSize() would serialize the message again to find it (two more copies).
    """

    __slots__ = ("message", "size")

    def __init__(self, message: _M, size: int) -> None:
        self.message: _M | None = message
        self.size = size

    def take(self) -> _M:
        message, self.message = self.message, None
        assert message is not None, "a request is taken once"
        return message


def _metadata_size(metadata: Iterable[tuple[str, str | bytes]] | None) -> int:
    # grpc's own accounting: name and value lengths plus 32 bytes per entry (as in HPACK).
    return sum(len(key) + len(value) + 32 for key, value in metadata or ())


class GenerationService:
    def __init__(self, router: Router, config: ServerConfig, journal: Journal) -> None:
        self.router = router
        self.config = config
        self.supervisor = StreamSupervisor(config)
        self.durable = DurableStreams(router, self.supervisor, journal, config)

    @property
    def active_streams(self) -> int:
        return len(self.supervisor.active)

    @property
    def idle(self) -> asyncio.Event:
        return self.supervisor.idle

    async def Generate(self, received: Received[pb.GenerateRequest | Undecodable], context: Context) -> None:
        received_at = time.monotonic()
        create_time = datetime.now(UTC)
        request: pb.GenerateRequest | Undecodable = received.take()
        # What the closing log line needs; the message itself is let go of once it is validated.
        model, labels = _log_fields(request)
        # A malformed request_id is rejected below, but must not name the stream in the meantime.
        given = request.request_id if not isinstance(request, Undecodable) else ""
        stream_id = given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        remaining = context.time_remaining()
        deadline = None if remaining is None else received_at + remaining
        task: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
        flight: InFlight | None = None
        outcome = "OK"
        window: float | None = None
        try:
            try:
                window = self.durable.window(request) if not isinstance(request, Undecodable) else None
                # A durable generation is not bound by this call's deadline: it outlives the call.
                route, generation = self._admissible(
                    request, received.size, context, stream_id, None if window else deadline
                )
                if window is not None:
                    assert not isinstance(request, Undecodable)
                    follower = await self.durable.start(
                        request, route, generation, window=window, received_at=received_at, create_time=create_time
                    )
                    request = _TAKEN
                    outcome = await self._follow(follower, context)
                    return
                request = _TAKEN
                flight = self.supervisor.admit(task, received_at)
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
                    self.supervisor.release(flight)
            except asyncio.CancelledError:
                # Only a cancel of our own, and no other beside it, is turned into a status: a
                # client's cancel, its deadline or grpc's own stop at the end of the grace period
                # mean the call is gone, and nothing can be written to it any more.
                if flight is None or flight.ended_by is None or not flight.interrupted or task.uncancel() > 0:
                    outcome = self._cancelled_outcome(flight, deadline)
                    if window is not None:
                        outcome += " (a durable stream's reader: the generation goes on)"
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
            outcome = self._internal(context, exc, stream_id)
        finally:
            relay = flight.relay if flight is not None else None
            self._log_outcome(model, labels, stream_id, outcome, relay.sequencer if relay else None, received_at)

    async def Resume(self, request: pb.ResumeRequest | Undecodable, context: Context) -> None:
        """Writes a durable stream's messages after the cursor, then its live tail."""
        stream_id = request.stream_id if not isinstance(request, Undecodable) else ""
        try:
            request = decoded(request, "ResumeRequest")
            follower = await self.durable.resume(request.stream_id, request.resume_token, request.after_sequence)
            await self._follow(follower, context)
        except GatewayError as err:
            set_status(context, err, stream_id)
        except _CallGone:
            pass
        except Exception as exc:
            self._internal(context, exc, stream_id)

    async def Poll(self, request: pb.PollRequest | Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """The long-poll read. Answers with the PollResponse's bytes: its messages are the journal's
        own, byte for byte, with the other fields appended (protobuf merges concatenated messages)."""
        stream_id = request.stream_id if not isinstance(request, Undecodable) else ""
        try:
            request = decoded(request, "PollRequest")
            limit = request.max_messages or DEFAULT_POLL_MESSAGES
            if limit > MAX_POLL_MESSAGES:
                raise invalid_request("max_messages", f"must be at most {MAX_POLL_MESSAGES}")
            wait = request.wait.seconds + request.wait.nanos / 1e9 if request.HasField("wait") else 0.0
            if wait < 0:
                raise invalid_request("wait", "must not be negative")
            result = await self.durable.poll(
                request.stream_id, request.resume_token, request.after_sequence, wait, limit
            )
        except GatewayError as err:
            set_status(context, err, stream_id)
            return b""
        except Exception as exc:
            self._internal(context, exc, stream_id)
            return b""
        parts = [_field_bytes(1, payload) for payload in result.payloads]
        parts.append(
            pb.PollResponse(
                next_after_sequence=result.next_after, terminal=result.terminal, state=result.state
            ).SerializeToString()
        )
        return b"".join(parts)

    async def Cancel(
        self, request: pb.CancelRequest | Undecodable, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelResponse:
        stream_id = request.stream_id if not isinstance(request, Undecodable) else ""
        try:
            request = decoded(request, "CancelRequest")
            state = await self.durable.cancel(request.stream_id, request.resume_token)
        except GatewayError as err:
            set_status(context, err, stream_id)
            return pb.CancelResponse()
        except Exception as exc:
            self._internal(context, exc, stream_id)
            return pb.CancelResponse()
        return pb.CancelResponse(state=state)

    async def _follow(self, follower: Follower, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Writes a follower's payloads as they are; the status then mirrors the terminal one."""
        async with contextlib.aclosing(follower.batches()) as batches:
            async for batch in batches:
                for payload in batch:
                    await _write(context, payload)
        failure = failure_of(follower.terminal) if follower.terminal is not None else None
        if failure is not None:
            set_status(context, failure, follower.stream_id)
            return failure.code.value
        return "OK"

    def _internal(self, context: grpc.aio.ServicerContext[Any, Any], exc: Exception, stream_id: str) -> str:
        correlation_id = new_correlation_id()
        log.error("internal error %s in stream %s: %s", correlation_id, stream_id, describe_exception(exc))
        set_status(context, internal_error(correlation_id), stream_id)
        return ErrorCode.INTERNAL.value

    @staticmethod
    def _cancelled_outcome(flight: InFlight | None, deadline: float | None) -> str:
        # grpc says only "cancelled"; the caller's deadline tells the two apart.
        late = deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_SECONDS
        outcome = "DEADLINE_EXCEEDED" if late else "CANCELLED"
        if flight is not None and flight.cut and flight.ended_by is not None:
            outcome = f"{flight.ended_by.code.value} (the caller had stopped reading)"
        return outcome

    def _admissible(
        self,
        request: pb.GenerateRequest | Undecodable,
        size: int,
        context: Context,
        stream_id: str,
        deadline: float | None,
    ) -> tuple[Route, GenerationRequest]:
        """Checks everything a provider must never see; raises GatewayError for the caller."""
        if self.supervisor.draining:
            raise shutting_down("the server is shutting down; retry")
        request = decoded(request, "GenerateRequest")
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

    async def _relay(self, flight: InFlight, opened: OpenedStream, info: StreamInfo, context: Context) -> None:
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
        request: pb.ListModelsRequest | Undecodable,
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
                    **capabilities(route.provider.capabilities),
                )
                for route in self.router.routes.values()
            ]
        )

    def begin_drain(self) -> None:
        """New streams are refused from now on; the ones in flight go on."""
        self.supervisor.begin_drain()

    def end_streams(self) -> int:
        """Ends every generation in flight, durable ones included, with SERVER_SHUTTING_DOWN."""
        return self.supervisor.end_streams()


class _CallGone(Exception):
    """A write failed because the call is over: the client went away or the server stopped it."""


async def _write(context: grpc.aio.ServicerContext[Any, Any], message: pb.GenerateResponse | bytes) -> None:
    try:
        await context.write(message)
    except Exception as exc:  # CancelledError is no Exception: it goes on as it is
        raise _CallGone from exc


# What `Generate` holds once it has let go of the request it validated.
_TAKEN = Undecodable()


def _log_fields(request: pb.GenerateRequest | Undecodable) -> tuple[str, str]:
    """The route name and the caller's metadata labels, as the stream's log line shows them."""
    if isinstance(request, Undecodable):
        return "", ""
    labels = ""
    if request.metadata:
        labels = " " + " ".join(f"{k[:64]!r}={v[:256]!r}" for k, v in sorted(request.metadata.items())[:16])
    return request.model[:128], labels


def _field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: its tag, its length as a varint, its bytes."""
    head = bytearray(((number << 3) | 2,))
    size = len(payload)
    while size > 0x7F:
        head.append((size & 0x7F) | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head) + payload
