"""The core every door shares: admission, validation, routing, the relay, the journal, the log line.

A door (gRPC in `service.generation`, HTTP in `service.api.http`) turns its transport's request
into a `tokenwire.v1.GenerateRequest`, asks the gateway whether it may run, and writes out what
the gateway yields: contract messages for an ephemeral stream, journaled payloads for a durable
one. How a `GatewayError` travels (a gRPC status, an HTTP status, an error event) is the door's
business; which error it is, and when, is decided here once for both.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any

from service.callers import ANONYMOUS, Caller, KeyRing, permission_denied
from service.config import ServerConfig
from service.durable import DurableStreams, Follower
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
from service.observe import Observer, Watch, outcome_label, tokens_used
from service.quotas import MemoryQuotas, Quotas
from service.routing import Route, Router
from service.streams import Relay, Sequencer, StreamInfo
from service.supervisor import InFlight, StreamSupervisor
from service.validation import REQUEST_ID, prompt_chars, validate_request
from service.wire import capabilities
from tokenwire.v1 import generation_pb2 as pb

# The stream's closing line keeps the logger name operators (and the tests) filter on.
log = logging.getLogger("tokenwire.generation")

# The caller's clock and ours differ a little: a cancel this close to the deadline is the deadline.
_DEADLINE_SLACK_SECONDS = 0.05


class EphemeralStream:
    """One ephemeral generation: admitted, routed, relayed; it dies with the call that reads it.

    An async context manager: entering admits the stream and opens its provider (retries and
    fallback before the first token) and gives the relay's own generator of messages — Start, the
    deltas, one terminal event — with no layer of ours between it and the door's writes, which
    are the hot path; leaving closes the provider's stream and frees the slot, on every path out.
    It must be entered by the task that serves the call (the supervisor ends a stream by
    cancelling that task). A stream the server ends before its first token (shutdown, the
    duration limit) raises that GatewayError on entry instead of CancelledError; a cancel from
    anywhere else propagates as it is.
    """

    __slots__ = (
        "_carrier",
        "_create_time",
        "_gateway",
        "_generation",
        "_messages",
        "_received_at",
        "_route",
        "caller",
        "flight",
        "watch",
    )

    def __init__(
        self,
        gateway: Gateway,
        route: Route,
        generation: GenerationRequest,
        *,
        received_at: float,
        create_time: datetime,
        caller: Caller = ANONYMOUS,
        carrier: dict[str, str] | None = None,
    ) -> None:
        self._gateway = gateway
        self._route = route
        self._generation = generation
        self._received_at = received_at
        self._create_time = create_time
        self._carrier = carrier
        self._messages: AsyncGenerator[pb.GenerateResponse, None] | None = None
        self.caller = caller
        self.flight: InFlight | None = None
        self.watch: Watch | None = None

    @property
    def stream_id(self) -> str:
        return self._generation.stream_id

    @property
    def sequencer(self) -> Sequencer | None:
        relay = self.flight.relay if self.flight is not None else None
        return relay.sequencer if relay is not None else None

    @property
    def failure(self) -> GatewayError | None:
        """The error the stream ended with, after its terminal event (None after a Finish)."""
        sequencer = self.sequencer
        return sequencer.failure if sequencer is not None else None

    async def __aenter__(self) -> AsyncGenerator[pb.GenerateResponse, None]:
        gateway = self._gateway
        route = self._route
        task: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
        lease = await gateway.quotas.acquire(self.caller)
        try:
            flight = self.flight = gateway.supervisor.admit(task, self._received_at)
        except BaseException:
            lease.release()
            raise
        watch = self.watch = gateway.observer.watch(
            route.name,
            route.provider.kind,
            route.config.model,
            self.caller,
            lease,
            self._received_at,
            "ephemeral",
            self._generation.stream_id,
            self._carrier,
        )
        try:
            try:
                if watch.span is not None:
                    watch.span.opening(route.provider.kind, route.config.model, route.propagates_trace)
                opened = await gateway.router.open(route, self._generation)
            except asyncio.CancelledError:
                # Only a cancel of our own, and no other beside it, becomes the stream's error: a
                # client's cancel, its deadline or its transport's stop mean the call is gone.
                if flight.ended_by is None or not flight.interrupted or task.uncancel() > 0:
                    raise
                raise flight.ended_by from None
        except BaseException:
            gateway.supervisor.release(flight)
            lease.release()
            raise
        watch.provider = opened.route.provider.kind
        if watch.span is not None:
            watch.span.opened(opened.route.provider.kind, opened.route.config.model)
        info = StreamInfo(
            stream_id=self._generation.stream_id,
            route=self._route.name,
            provider=opened.route.provider.kind,
            upstream_model=opened.route.config.model,
            received_at=self._received_at,
            create_time=self._create_time,
            prompt_chars=prompt_chars(self._generation),
        )
        relay = flight.relay = Relay(
            Sequencer(info),
            opened.first,
            opened.events,
            heartbeat_interval=gateway.config.heartbeat_interval_seconds or None,
        )
        self._messages = relay.messages()
        return self._messages

    async def __aexit__(self, *exc_info: object) -> None:
        flight = self.flight
        assert flight is not None and flight.relay is not None
        try:
            assert self._messages is not None
            try:
                await self._messages.aclose()
            finally:
                await flight.relay.aclose()
        finally:
            self._gateway.supervisor.release(flight)
            # The caller's slot is free as soon as the stream is; its tokens count from now.
            if self.watch is not None:
                self.watch.lease.release(tokens_used(flight.relay.sequencer))


class Gateway:
    """The transport-neutral service: what a door may ask, and the one place each answer is made."""

    def __init__(
        self,
        router: Router,
        config: ServerConfig,
        journal: Journal,
        *,
        keys: KeyRing | None = None,
        quotas: Quotas | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.router = router
        self.config = config
        self.keys = keys if keys is not None else KeyRing(None)
        self.observer = observer if observer is not None else Observer(None, None)
        self.quotas = quotas if quotas is not None else MemoryQuotas(self.observer.quota_rejected)
        self.supervisor = StreamSupervisor(config)
        self.durable = DurableStreams(router, self.supervisor, journal, config)

    def authenticate(self, authorization: list[str]) -> Caller:
        """The caller the request's `authorization` value(s) name (ANONYMOUS with auth off)."""
        return self.keys.authenticate(authorization)

    def carrier(self, headers: Any) -> dict[str, str] | None:
        """The caller's trace context (`traceparent`, `tracestate`), only when tracing is on.

        `headers` is gRPC metadata (pairs) or an HTTP header mapping; names match in any case.
        """
        if self.observer.tracing is None:
            return None
        pairs = headers.items() if hasattr(headers, "items") else headers or ()
        found = {
            str(k).lower(): v
            for k, v in pairs
            if str(k).lower() in ("traceparent", "tracestate") and isinstance(v, str)
        }
        return found or None

    async def start_durable(
        self,
        request: pb.GenerateRequest,
        route: Route,
        generation: GenerationRequest,
        *,
        caller: Caller,
        carrier: dict[str, str] | None,
        window: float,
        received_at: float,
        create_time: datetime,
    ) -> Follower:
        """A durable stream for `caller` (its quota lease goes with the producer), or the one it
        already started with this request."""
        lease = await self.quotas.acquire(caller)

        def watch() -> Watch:
            return self.observer.watch(
                route.name,
                route.provider.kind,
                route.config.model,
                caller,
                lease,
                received_at,
                "durable",
                generation.stream_id,
                carrier,
            )

        try:
            return await self.durable.start(
                request,
                route,
                generation,
                window=window,
                received_at=received_at,
                create_time=create_time,
                owner=caller.id,
                watch=watch,
            )
        finally:
            # The producer took the lease over (and gives it back when it ends); an attach to a
            # stream that was already running, or a start that failed, takes nothing.
            if not self.durable.took(lease):
                lease.release()

    @property
    def active_streams(self) -> int:
        return len(self.supervisor.active)

    @property
    def idle(self) -> asyncio.Event:
        return self.supervisor.idle

    @staticmethod
    def stream_id(given: str) -> str:
        # A malformed request_id is rejected by validation, but must not name the stream meanwhile.
        return given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex

    def admissible(
        self,
        request: pb.GenerateRequest,
        *,
        caller: Caller = ANONYMOUS,
        size: int | None,
        header_bytes: int,
        stream_id: str,
        deadline: float | None,
    ) -> tuple[Route, GenerationRequest]:
        """Checks everything a provider must never see; raises GatewayError for the caller."""
        if self.supervisor.draining:
            raise shutting_down("the server is shutting down; retry")
        if header_bytes > self.config.max_metadata_bytes:
            raise invalid_request(
                "metadata",
                f"request headers are {header_bytes} bytes; this server accepts at most "
                f"{self.config.max_metadata_bytes}",
            )
        if not request.model:
            raise invalid_request("model", "is required: name a route (see ListModels)")
        route = self.router.get(request.model)
        if not caller.may_use(route.name):
            raise permission_denied(route.name)
        generation = validate_request(
            request,
            route,
            stream_id=stream_id,
            deadline=deadline,
            max_request_bytes=self.config.max_request_bytes,
            size=size,
        )
        return route, generation

    def ephemeral(
        self,
        route: Route,
        generation: GenerationRequest,
        *,
        received_at: float,
        create_time: datetime,
        caller: Caller = ANONYMOUS,
        carrier: dict[str, str] | None = None,
    ) -> EphemeralStream:
        return EphemeralStream(
            self, route, generation, received_at=received_at, create_time=create_time, caller=caller, carrier=carrier
        )

    @staticmethod
    def internal(exc: Exception, stream_id: str) -> GatewayError:
        """The error firewall: an unexpected exception is logged with its frames (never its text)
        and answered as INTERNAL with a correlation id."""
        correlation_id = new_correlation_id()
        log.error("internal error %s in stream %s: %s", correlation_id, stream_id, describe_exception(exc))
        return internal_error(correlation_id)

    @staticmethod
    def cancelled_outcome(flight: InFlight | None, deadline: float | None) -> str:
        # A transport says only "cancelled"; the caller's deadline tells the two apart.
        late = deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_SECONDS
        outcome = "DEADLINE_EXCEEDED" if late else "CANCELLED"
        if flight is not None and flight.cut and flight.ended_by is not None:
            outcome = f"{flight.ended_by.code.value} (the caller had stopped reading)"
        return outcome

    def log_outcome(
        self,
        model: str,
        labels: str,
        stream_id: str,
        outcome: str,
        sequencer: Sequencer | None,
        received_at: float,
        door: str = "",
        *,
        stream: EphemeralStream | None = None,
        caller: Caller = ANONYMOUS,
        durable: bool = False,
    ) -> None:
        """The stream's one log line; its metrics and spans end here too (once per stream).

        A durable stream's reader logs here; its producer's figures are its own (service.durable).
        """
        watch = stream.watch if stream is not None else None
        if watch is not None:
            watch.end(outcome, sequencer)
        elif outcome != "OK" and not durable:
            label = outcome_label(outcome)
            if label in ErrorCode.__members__:
                self.observer.rejected(ErrorCode(label))
        stream_log_line(
            stream_id,
            door,
            model,
            outcome,
            sequencer,
            received_at,
            labels,
            caller.name,
            "durable reader" if durable else "ephemeral",
        )

    def models(self, caller: Caller = ANONYMOUS) -> list[pb.Model]:
        return [
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
            if caller.may_use(route.name)
        ]

    def begin_drain(self) -> None:
        """New streams are refused from now on; the ones in flight go on."""
        self.supervisor.begin_drain()

    def end_streams(self) -> int:
        """Ends every generation in flight, durable ones included, with SERVER_SHUTTING_DOWN."""
        return self.supervisor.end_streams()


def stream_log_line(
    stream_id: str,
    door: str,
    model: str,
    outcome: str,
    sequencer: Sequencer | None,
    received_at: float,
    labels: str,
    caller: str,
    kind: str,
) -> None:
    """One line per stream: as text, and as fields for the JSON log (`log_format = "json"`)."""
    finish = sequencer.finish if sequencer is not None else None
    reason = pb.FinishReason.Name(finish.reason).removeprefix("FINISH_REASON_").lower() if finish else "-"
    messages = sequencer.sequence if sequencer is not None else 0
    duration_ms = (time.monotonic() - received_at) * 1000
    figures: dict[str, object] = {
        "stream_id": stream_id,
        "kind": kind,
        "door": door.removeprefix(" door=") or "grpc",
        "route": model,
        "outcome": outcome,
        "finish": reason,
        "messages": messages,
        "duration_ms": round(duration_ms, 1),
    }
    if caller:
        figures["caller"] = caller
    if finish is not None:
        usage, timing = finish.usage, finish.timing
        figures |= {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "usage_source": pb.UsageSource.Name(usage.source).removeprefix("USAGE_SOURCE_").lower(),
            "ttft_ms": round(timing.time_to_first_token.ToNanoseconds() / 1e6, 3),
            "output_tokens_per_second": round(timing.output_tokens_per_second, 2),
        }
    log.info(
        "stream %s%s route=%r outcome=%s finish=%s messages=%d duration_ms=%.1f%s%s",
        stream_id,
        door,
        model,
        outcome,
        reason,
        messages,
        duration_ms,
        f" caller={caller!r}" if caller else "",
        redact(labels),
        extra={"stream": figures},
    )


def log_fields(request: pb.GenerateRequest | None) -> tuple[str, str]:
    """The route name and the caller's metadata labels, as the stream's log line shows them."""
    if request is None:
        return "", ""
    labels = ""
    if request.metadata:
        labels = " " + " ".join(f"{k[:64]!r}={v[:256]!r}" for k, v in sorted(request.metadata.items())[:16])
    return request.model[:128], labels
