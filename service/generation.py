"""The gRPC door: Generate, Resume, Poll, Cancel and ListModels, and the error firewall.

Whatever happens inside, a caller gets the contract: a plain rich status before Start, a terminal
Error event mirrored by the status after it, INTERNAL with a correlation id for bugs — never
grpc's default UNKNOWN with exception text. What a stream is and how it runs (admission,
validation, routing, the relay, durable streams, the log line) is the gateway's
(`service.gateway`), shared with the HTTP door; this door only reads gRPC requests and writes
gRPC messages and statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import grpc

from service.callers import ANONYMOUS
from service.durable import DEFAULT_POLL_MESSAGES, MAX_POLL_MESSAGES, Follower, failure_of
from service.errors import ErrorCode, GatewayError, invalid_request, shutting_down
from service.gateway import EphemeralStream, Gateway, log_fields
from service.wire import set_status
from tokenwire.v1 import generation_pb2 as pb

Context = grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateResponse]


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


def _authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[str]:
    # gRPC metadata names are lower case on the wire (HTTP/2); a binary value is no bearer key.
    return [value if isinstance(value, str) else "" for key, value in metadata or () if key == "authorization"]


class GenerationService:
    """The gRPC door over the gateway: its requests in, its statuses and messages out."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.durable = gateway.durable

    @property
    def active_streams(self) -> int:
        return self.gateway.active_streams

    @property
    def idle(self) -> asyncio.Event:
        return self.gateway.idle

    async def Generate(self, received: Received[pb.GenerateRequest | Undecodable], context: Context) -> None:
        received_at = time.monotonic()
        create_time = datetime.now(UTC)
        request: pb.GenerateRequest | Undecodable = received.take()
        gateway = self.gateway
        # What the closing log line needs; the message itself is let go of once it is validated.
        model, labels = log_fields(request if not isinstance(request, Undecodable) else None)
        stream_id = gateway.stream_id(request.request_id if not isinstance(request, Undecodable) else "")
        remaining = context.time_remaining()
        deadline = None if remaining is None else received_at + remaining
        stream: EphemeralStream | None = None
        outcome = "OK"
        window: float | None = None
        caller = ANONYMOUS
        durable = False
        try:
            try:
                if gateway.supervisor.draining:
                    raise shutting_down("the server is shutting down; retry")
                metadata = context.invocation_metadata()
                caller = gateway.authenticate(_authorization(metadata))
                request = decoded(request, "GenerateRequest")
                window = self.durable.window(request)
                # A durable generation is not bound by this call's deadline: it outlives the call.
                route, generation = gateway.admissible(
                    request,
                    caller=caller,
                    size=received.size,
                    header_bytes=_metadata_size(metadata),
                    stream_id=stream_id,
                    deadline=None if window else deadline,
                )
                carrier = gateway.carrier(metadata)
                if window is not None:
                    follower = await gateway.start_durable(
                        request,
                        route,
                        generation,
                        caller=caller,
                        carrier=carrier,
                        window=window,
                        received_at=received_at,
                        create_time=create_time,
                    )
                    request = _TAKEN
                    durable = True
                    outcome = await self._follow(follower, context)
                    return
                request = _TAKEN
                stream = gateway.ephemeral(
                    route, generation, received_at=received_at, create_time=create_time, caller=caller, carrier=carrier
                )
                async with stream as messages:
                    async for message in messages:
                        await _write(context, message)
            except asyncio.CancelledError:
                outcome = gateway.cancelled_outcome(stream.flight if stream is not None else None, deadline)
                if window is not None:
                    outcome += " (a durable stream's reader: the generation goes on)"
                raise
            failure = stream.failure if stream is not None else None
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
            gateway.log_outcome(
                model,
                labels,
                stream_id,
                outcome,
                stream.sequencer if stream is not None else None,
                received_at,
                stream=stream,
                caller=caller,
                durable=durable,
            )

    async def Resume(self, request: pb.ResumeRequest | Undecodable, context: Context) -> None:
        """Writes a durable stream's messages after the cursor, then its live tail."""
        stream_id = request.stream_id if not isinstance(request, Undecodable) else ""
        try:
            caller = self.gateway.authenticate(_authorization(context.invocation_metadata()))
            request = decoded(request, "ResumeRequest")
            follower = await self.durable.resume(
                request.stream_id, request.resume_token, request.after_sequence, caller.id
            )
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
            caller = self.gateway.authenticate(_authorization(context.invocation_metadata()))
            request = decoded(request, "PollRequest")
            limit = request.max_messages or DEFAULT_POLL_MESSAGES
            if limit > MAX_POLL_MESSAGES:
                raise invalid_request("max_messages", f"must be at most {MAX_POLL_MESSAGES}")
            wait = request.wait.seconds + request.wait.nanos / 1e9 if request.HasField("wait") else 0.0
            if wait < 0:
                raise invalid_request("wait", "must not be negative")
            result = await self.durable.poll(
                request.stream_id, request.resume_token, request.after_sequence, wait, limit, caller.id
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
            caller = self.gateway.authenticate(_authorization(context.invocation_metadata()))
            request = decoded(request, "CancelRequest")
            state = await self.durable.cancel(request.stream_id, request.resume_token, caller.id)
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
        set_status(context, self.gateway.internal(exc, stream_id), stream_id)
        return ErrorCode.INTERNAL.value

    async def ListModels(
        self,
        request: pb.ListModelsRequest | Undecodable,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        try:
            caller = self.gateway.authenticate(_authorization(context.invocation_metadata()))
        except GatewayError as err:
            set_status(context, err, "")
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=self.gateway.models(caller))


class _CallGone(Exception):
    """A write failed because the call is over: the client went away or the server stopped it."""


async def _write(context: grpc.aio.ServicerContext[Any, Any], message: pb.GenerateResponse | bytes) -> None:
    try:
        await context.write(message)
    except Exception as exc:  # CancelledError is no Exception: it goes on as it is
        raise _CallGone from exc


# What `Generate` holds once it has let go of the request it validated.
_TAKEN = Undecodable()


def _field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: its tag, its length as a varint, its bytes."""
    head = bytearray(((number << 3) | 2,))
    size = len(payload)
    while size > 0x7F:
        head.append((size & 0x7F) | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head) + payload
