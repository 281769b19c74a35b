"""The stream supervisor: admission, the duration limit and the drain, for every generation.

Transport-neutral: a generation is a task, whether it is an ephemeral Generate handler that
writes to its caller or a durable stream's producer that writes to the journal. The concurrency
limit counts generations, never the readers attached to them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from service.config import ServerConfig
from service.errors import ErrorCode, GatewayError, shutting_down
from service.streams import Relay

# Retry delay suggested to callers turned away at the concurrency limit.
OVERLOAD_RETRY_AFTER_SECONDS = 1.0
# How long a stream past its maximum duration may sit in a write before its task is cancelled.
_STALLED_WRITE_SECONDS = 5.0


@dataclass(slots=True, eq=False)
class InFlight:
    """One generation in flight, as shutdown and the stream limits see it."""

    task: asyncio.Task[None]
    # Set once the provider's first event arrived and Start is on its way.
    relay: Relay | None = None
    # Why the server ends this stream early (shutdown, the duration limit, a cancel); None while
    # it runs.
    ended_by: GatewayError | None = None
    # The task was cancelled to end the stream: it was still waiting for its provider's first
    # event, before anything was sent.
    interrupted: bool = False
    # The task was cancelled because its writer stalled past the duration limit.
    cut: bool = False
    # Whether a writer stuck past the duration limit may be cancelled (see `_expire`).
    cuttable: bool = True
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class StreamSupervisor:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # The generations in flight: the concurrency limit counts these.
        self.active: dict[asyncio.Task[None], InFlight] = {}
        # Set while no generation is in flight: what a draining shutdown waits for.
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False

    def check_open(self) -> None:
        """Raises the status for a stream that cannot start now (draining, or at the limit)."""
        if self.draining:
            raise shutting_down("the server is shutting down; retry")
        if len(self.active) >= self.config.max_concurrent_streams:
            raise GatewayError(
                ErrorCode.SERVER_OVERLOADED,
                f"the server is at its limit of {self.config.max_concurrent_streams} concurrent streams",
                retry_after=OVERLOAD_RETRY_AFTER_SECONDS,
            )

    def admit(self, task: asyncio.Task[None], received_at: float) -> InFlight:
        self.check_open()
        flight = self.active[task] = InFlight(task)
        self.idle.clear()
        limit = self.config.max_stream_duration_seconds
        if limit:
            remaining = received_at + limit - time.monotonic()
            flight.timers.append(asyncio.get_running_loop().call_later(remaining, self._expire, flight))
        return flight

    def release(self, flight: InFlight) -> None:
        for timer in flight.timers:
            timer.cancel()
        self.active.pop(flight.task, None)
        if not self.active:
            self.idle.set()

    def end(self, flight: InFlight, reason: GatewayError) -> None:
        """Ends a stream early with `reason`: a plain status before Start, a terminal Error after."""
        # A task already being cancelled (its client hung up) is left to finish its cleanup.
        if flight.ended_by is not None or flight.task.cancelling():
            return
        flight.ended_by = reason
        if flight.relay is None:
            flight.interrupted = True
            flight.task.cancel("the server ends this stream")
        else:
            flight.relay.stop(reason)

    def _expire(self, flight: InFlight) -> None:
        limit = self.config.max_stream_duration_seconds
        self.end(
            flight,
            GatewayError(
                ErrorCode.STREAM_DURATION_EXCEEDED,
                f"the stream reached this server's maximum stream duration of {limit:g} s",
            ),
        )
        if flight.relay is not None and flight.cuttable:
            # A caller that stopped reading holds an ephemeral handler in a write that may never
            # return, and grpc.aio can neither cancel that write nor send a status behind it. The
            # task is cancelled instead: the provider's stream and the slot are freed, and gRPC
            # ends the call at the caller's deadline or when its connection goes.
            flight.timers.append(
                asyncio.get_running_loop().call_later(_STALLED_WRITE_SECONDS, self._cut_stalled, flight)
            )

    def _cut_stalled(self, flight: InFlight) -> None:
        if self.active.get(flight.task) is flight and not flight.task.cancelling():
            flight.cut = True
            flight.task.cancel("the caller stopped reading a stream past its maximum duration")

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
            self.end(flight, stream_shut_down())
        return len(self.active)


def stream_shut_down() -> GatewayError:
    return shutting_down("the server is shutting down and ended the stream before it finished; retry")
