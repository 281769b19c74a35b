"""When and how a durable stream reconnects, free of I/O so the async and sync clients share it."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from ._errors import APIStatusError, TokenwireError, TruncatedStreamError

_CallT = TypeVar("_CallT")

# Statuses that are the server's answer, not a broken connection: asking again gets the same
# answer (or, for the caller's deadline, no time to hear another).
_ANSWER_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
# Reasons that say the stream itself is over or gone, whatever the code.
FINAL_REASONS = frozenset(
    {
        "STREAM_NOT_FOUND",
        "CURSOR_OUT_OF_RANGE",
        "STREAM_ALREADY_EXISTS",
        "STREAM_CANCELLED",
        "STREAM_ABANDONED",
        "PRODUCER_LOST",
        "JOURNAL_FULL",
    }
)
# The server's answers before Start that mean "not here, try again": a replica that is draining
# refused to start the stream (it created nothing), and behind a balancer the next try lands on
# another replica.
ELSEWHERE_REASONS = frozenset({"SERVER_SHUTTING_DOWN"})
# What a connection that broke looks like before any message: the transport's own codes.
_BREAK_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
)


def is_break(error: TokenwireError, *, begun: bool) -> bool:
    """Whether a durable stream's call ended by breaking, so that reading on may succeed.

    After Start, any status that came without the terminal event is a break (a reset
    connection, a proxy's INTERNAL or UNKNOWN, a CANCELLED this client did not ask for,
    an OK status cut short), unless it is an answer that asking again cannot change.
    Before Start, only a status with none of tokenwire's details is: the server's own
    answers (route not found, overloaded after its own retries...) are final, because the
    server is the one that retries before the first token; except a draining replica's refusal
    (SERVER_SHUTTING_DOWN), which asks for a try elsewhere.
    """
    if isinstance(error, TruncatedStreamError):
        return begun
    if not isinstance(error, APIStatusError) or error.reason in FINAL_REASONS:
        return False
    if begun:
        # `truncated` is False when the call carried the terminal Error: that is the answer.
        return error.truncated and error.code not in _ANSWER_CODES
    return error.code in _BREAK_CODES and (not error.reason or error.reason in ELSEWHERE_REASONS)


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    """How often and how patiently a durable stream reconnects after a break.

    ``max_attempts`` reconnections in a row that deliver nothing; one that delivers a message
    starts the count again. Waits grow from ``initial_backoff`` by doubling up to
    ``max_backoff``, with jitter, and never reach past the caller's deadline.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before reconnection ``attempt`` (1 for the first)."""
        ceiling = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
        # Jittered, so that the many clients one proxy reset cut off do not return in step.
        delay = random.uniform(ceiling / 2, ceiling)
        return max(delay, retry_after or 0.0)


@dataclass(slots=True)
class Durable(Generic[_CallT]):
    """What a durable stream needs to reopen its call.

    ``reopen(timeout)`` sends the call that began the stream again (the Generate, with the
    same request_id, or the Resume the caller asked for); ``resume(stream_id, token, after,
    timeout)`` resumes it from a cursor. ``stream_id`` and ``token`` are known from the start
    for a stream the caller resumed, and taken from Start otherwise.
    """

    reopen: Callable[[float | None], _CallT]
    resume: Callable[[str, str, int, float | None], _CallT]
    timeout: float | None
    policy: ResumePolicy
    stream_id: str = ""
    token: str = ""
