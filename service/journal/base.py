"""The journal: where durable streams' messages live, so that any reader can read them by cursor.

A journal stores, per stream, a small record (its token's digest, the fingerprint of the request
that started it, its window, status and last sequence) and its messages as the exact bytes that
were first delivered, numbered from 1. It knows nothing of providers or of gRPC; the producer
(`service.durable`) writes, and every door reads.

Guarantees every journal gives, and the shared test suite (tests/test_journal.py) checks:
- `create` is atomic: of two creates with one stream id, one wins and the other gets the
  winner's record back (idempotent starts rest on this).
- `append` is fenced: it only extends a running stream at exactly its next sequence, so a second
  writer, or a write after the terminal event, is refused with `Fenced`; the terminal entry is
  written once.
- A stream whose terminal entry is written is kept until its `expires_at`, then forgotten.
- `wait` returns when the stream has an entry after the cursor, has ended, is gone, or the
  timeout ran out; it never raises for those.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass


class StreamStatus(enum.StrEnum):
    """Mirrors tokenwire.v1.StreamStatus."""

    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class StreamRecord:
    stream_id: str
    # SHA-256 of the resume token: the token itself is never stored.
    token_digest: bytes
    # SHA-256 of the request that started the stream, for idempotent starts.
    fingerprint: bytes
    # The resume window granted, in seconds.
    window: float
    status: StreamStatus = StreamStatus.RUNNING
    # The sequence of the last journaled message; 0 before Start.
    last_sequence: int = 0
    # Wall-clock time (time.time()) after which the journal may forget the stream.
    expires_at: float = 0.0
    # Set when the generation failed before Start: the error, encoded by the producer. Such a
    # record holds no messages, and a new create with its id replaces it.
    start_failure: bytes = b""

    @property
    def ended(self) -> bool:
        return self.status is not StreamStatus.RUNNING or bool(self.start_failure)


@dataclass(frozen=True, slots=True)
class Batch:
    """What a read found: payloads after the cursor, and the record as it was then."""

    payloads: Sequence[bytes]
    record: StreamRecord

    @property
    def terminal(self) -> bool:
        """Whether the batch ends with the stream's terminal message."""
        record = self.record
        return record.status is not StreamStatus.RUNNING and bool(self.payloads) and self.last == record.last_sequence

    @property
    def last(self) -> int:
        """The sequence of the last payload (of the record when the batch is empty)."""
        return self.first + len(self.payloads) - 1 if self.payloads else self.record.last_sequence

    # The sequence of the first payload.
    first: int = 0


class JournalError(Exception):
    """A journal operation failed; subclasses say how."""


class Fenced(JournalError):
    """The append does not extend the running stream at its next sequence: someone else wrote,
    the stream ended, or it is gone."""


class JournalFull(JournalError):
    """The journal has no room for the append (its total bound, or the server's memory)."""


class JournalUnavailable(JournalError):
    """The journal's store cannot be reached (for example, Redis is down)."""


class Journal(abc.ABC):
    """One interface over the in-memory and the Redis journals."""

    # A short name for logs and ListModels-style answers ("memory", "redis").
    name: str

    @abc.abstractmethod
    async def create(self, record: StreamRecord) -> StreamRecord | None:
        """Registers a new running stream with no messages. Returns None when it did, or the
        existing record when a stream with this id exists (unless that one failed before Start:
        it is replaced)."""

    @abc.abstractmethod
    async def append(
        self,
        stream_id: str,
        first_sequence: int,
        payloads: Sequence[bytes],
        *,
        expires_at: float,
        status: StreamStatus = StreamStatus.RUNNING,
    ) -> None:
        """Appends `payloads`, numbered from `first_sequence`, which must be the stream's next
        sequence. A `status` other than RUNNING ends the stream: its last payload is the terminal
        message. `expires_at` becomes the stream's expiry. Raises Fenced, JournalFull or
        JournalUnavailable; a terminal append is never refused for room."""

    @abc.abstractmethod
    async def fail_start(self, stream_id: str, failure: bytes, *, expires_at: float) -> None:
        """Marks a stream that has no messages as failed before Start, with its encoded error."""

    @abc.abstractmethod
    async def get(self, stream_id: str) -> StreamRecord | None:
        """The stream's record; None for an unknown or expired stream."""

    @abc.abstractmethod
    async def read(self, stream_id: str, after: int, limit: int) -> Batch | None:
        """Up to `limit` payloads with sequences above `after`, oldest first; None for an unknown
        or expired stream."""

    @abc.abstractmethod
    async def wait(self, stream_id: str, after: int, within: float) -> None:
        """Returns once the stream has a payload after `after`, has ended or is gone, or after
        `within` seconds."""

    async def aclose(self) -> None:  # noqa: B027 (a journal without resources needs no close)
        """Releases the journal's connections and timers."""
