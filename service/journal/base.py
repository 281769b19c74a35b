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
- `wait` returns when the stream has an entry after the cursor, has ended, is gone, the
  timeout ran out, or (a shared journal) the stream's owner lost its lease; it never raises for those.

Ownership (a journal shared by replicas, see service.journal.redis): every server process that
produces durable streams holds a lease in the journal under its `replica` id, and each stream's
record names the replica producing it (`owner`). A reader anywhere that finds a running stream
whose owner holds no lease (`owner_alive` is False) may end it with the fenced terminal append;
fencing makes a producer that was only slow lose. A journal of one process (memory) has no
leases: its owner is always alive, and every producer is local.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Sequence
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
    # The replica id of the process producing the stream ("" for a journal of one process: the
    # producer is always the local one).
    owner: str = ""

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
        """The sequence of the last payload; the cursor read after when the batch is empty (the
        record may be newer than the payloads read: a reader must never skip past what it has)."""
        return self.first + len(self.payloads) - 1

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
    # Whether a read is as cheap as a look at the producer's own memory (the memory journal): a
    # journal that is not (Redis) has the producer keep an in-process tail of what it acknowledged,
    # for readers in its process (service.durable).
    in_process: bool = False

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

    # This process's replica id in a shared journal, set by `start`; "" for a journal of one process.
    replica: str = ""

    async def start(  # noqa: B027 (a journal of one process has nothing to start)
        self, on_cancel: Callable[[str], None], on_lease_lost: Callable[[], None]
    ) -> None:
        """Starts what a shared journal runs per process: the lease of this replica, and the
        subscription to cancels sent to it from other replicas (`on_cancel(stream_id)`).
        `on_lease_lost()` is called when this replica could not keep its lease: the streams it
        produces can no longer be vouched for, and other replicas may already have ended them."""

    async def owner_alive(self, owner: str) -> bool:
        """Whether the replica `owner` still holds its lease (True when it cannot be told)."""
        return True

    async def request_cancel(self, owner: str, stream_id: str) -> bool:
        """Asks the replica `owner` to cancel a stream it produces; False when no replica
        listening under that id heard it."""
        return False

    def reading(self, stream_id: str, delta: int) -> None:  # noqa: B027 (nothing to tell in one process)
        """A reader of a stream produced by another replica attached (+1), left (-1) or polled
        (0): the journal marks the stream read, so its owner does not abandon it."""

    async def read_age(self, stream_id: str) -> float | None:
        """Seconds since a reader on another replica last marked the stream read (None: never)."""
        return None

    async def aclose(self) -> None:  # noqa: B027 (a journal without resources needs no close)
        """Releases the journal's connections and timers."""
