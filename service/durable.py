"""Durable streams: generations that outlive the call that started them, read back by cursor.

A durable stream's generation (provider -> relay -> sequencer) runs in a producer task of its
own, supervised like any generation (admission, the duration limit, the drain), and writes every
message to the journal as the exact bytes any reader will get. Every door's reads (the first
call, Resume, the poll read) are readers of the journal by cursor, so a resumed message is the
same message, byte for byte. Nothing here knows gRPC: a door turns `GatewayError` into its
statuses and writes the payloads it is given.

Ephemeral streams never come here and pay nothing for it.

Replicas sharing a journal (Redis): the stream's record names its producer's replica (`owner`).
- A reader on any replica that finds a running stream whose owner lost its lease ends it with one
  terminal PRODUCER_LOST Error (UNAVAILABLE, retryable), written with the fenced append at the
  next sequence, so of two such readers, or a producer that was only slow, exactly one writes it.
- Cancel on a replica that does not produce the stream asks the owner through the journal (one
  subscription per replica): the owner ends the stream through its supervisor, which closes the
  upstream and journals STREAM_CANCELLED. If the owner does not end it within CANCEL_HANDOFF_SECONDS
  (or is not listening, or is gone), the canceller writes the fenced terminal itself; a producer
  still running loses at its next append and closes its upstream then.
- A reader on another replica keeps a stream alive: the journal marks it read (`last_read`), and the
  owner's abandonment check asks how long ago that was before it abandons the stream.
- A replica that could not keep its lease ends the streams it produces with PRODUCER_LOST: it can no
  longer vouch for them, and others may already have ended them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from google.protobuf import timestamp_pb2

from service.config import ServerConfig
from service.errors import (
    ErrorCode,
    GatewayError,
    describe_exception,
    internal_error,
    invalid_request,
    new_correlation_id,
)
from service.events import GenerationRequest
from service.journal import (
    Batch,
    Fenced,
    Journal,
    JournalError,
    JournalFull,
    JournalUnavailable,
    StreamRecord,
    StreamStatus,
)
from service.observe import Watch
from service.quotas import Lease
from service.routing import Route, Router
from service.streams import Relay, Sequencer, StreamInfo
from service.supervisor import InFlight, StreamSupervisor
from service.validation import prompt_chars
from service.wire import error_event
from tokenwire.v1 import generation_pb2 as pb

log = logging.getLogger("tokenwire.durable")

# A window shorter than this leaves a reader no time to come back.
MIN_WINDOW_SECONDS = 1.0
# The longest a poll read waits, whatever it asks for.
MAX_POLL_WAIT_SECONDS = 30.0
MAX_POLL_MESSAGES = 1000
DEFAULT_POLL_MESSAGES = 100
# How many payloads a follower reads at once; and how long it waits on the journal before it
# looks again (a journal's wait may also return early).
_READ_BATCH = 256
_WAIT_SLICE_SECONDS = 5.0
# Reads in a row that find an ended record ahead of its payloads before the journal is taken for
# broken (each such read is a race with the terminal write, and the next read settles it).
_READS_BEHIND = 3
# Bytes of randomness in a resume token (the contract asks for at least 128 bits).
_TOKEN_BYTES = 24
# How long a producer that lost its journal keeps trying to journal the stream's terminal Error.
_UNREACHABLE_RETRY_SECONDS = 30.0
# A failed start is kept this long, so that a caller attached to it learns why.
_FAILED_START_TTL_SECONDS = 30.0
# How long a Cancel sent to another replica's stream waits for that owner to end it before it
# writes the terminal itself (the owner's own end is ~1-2 round trips to Redis).
CANCEL_HANDOFF_SECONDS = 1.0
# A reader on another replica marks the stream read once a second (the Redis journal's
# TOUCH_SECONDS): abandonment gives such readers this much more than the window.
_REMOTE_READ_SLACK_SECONDS = 2.0
# The producer's in-process tail (journals that are not in process, see `_Tail`): at most this many
# of its last acknowledged messages, and about this many bytes (never fewer than one message).
TAIL_MAX_MESSAGES = 64
TAIL_MAX_BYTES = 64 * 1024

_STATUSES = {
    StreamStatus.RUNNING: pb.STREAM_STATUS_RUNNING,
    StreamStatus.FINISHED: pb.STREAM_STATUS_FINISHED,
    StreamStatus.FAILED: pb.STREAM_STATUS_FAILED,
    StreamStatus.CANCELLED: pb.STREAM_STATUS_CANCELLED,
}
_CODES = {f"ERROR_CODE_{code.value}": code for code in ErrorCode}


def digest(value: bytes | str) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def owned_digest(owner: str, value: bytes | str) -> bytes:
    """A token's (or request's) digest bound to the caller that owns the stream: another caller's
    id gives another digest, so its Resume, Poll or Cancel finds nothing (the same NOT_FOUND as a
    wrong token), and its start with the same request_id is another request. The key id only,
    never the key; without auth (owner "") the digest is the plain one."""
    if not owner:
        return digest(value)
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(b"caller:" + owner.encode() + b"\x00" + data).digest()


def not_found() -> GatewayError:
    # Unknown, expired and a wrong token look the same: a token cannot be probed for.
    return GatewayError(ErrorCode.STREAM_NOT_FOUND, "no durable stream with this id and resume token")


def producer_lost() -> GatewayError:
    return GatewayError(
        ErrorCode.PRODUCER_LOST,
        "the replica producing this stream stopped (its lease in the journal lapsed) before the answer was "
        "complete; retry",
    )


def stream_cancelled() -> GatewayError:
    return GatewayError(ErrorCode.STREAM_CANCELLED, "the stream was cancelled by a Cancel call")


def journal_unavailable() -> GatewayError:
    return GatewayError(ErrorCode.JOURNAL_UNAVAILABLE, "the stream journal cannot be reached; retry")


def stream_state(record: StreamRecord) -> pb.StreamState:
    expire_time = timestamp_pb2.Timestamp()
    expire_time.FromDatetime(datetime.fromtimestamp(record.expires_at, UTC))
    return pb.StreamState(
        stream_id=record.stream_id,
        status=_STATUSES[record.status],
        last_sequence=record.last_sequence,
        expire_time=expire_time,
    )


def failure_of(payload: bytes) -> GatewayError | None:
    """The error a terminal payload carries (None for a Finish), for a status that mirrors it."""
    message = pb.GenerateResponse.FromString(payload)
    if message.WhichOneof("event") != "error":
        return None
    error = message.error
    return GatewayError(
        _CODES.get(pb.ErrorCode.Name(error.code), ErrorCode.INTERNAL),
        error.message,
        retry_after=error.retry_after.ToNanoseconds() / 1e9 if error.HasField("retry_after") else None,
        provider=error.provider,
        provider_http_status=error.provider_http_status if error.HasField("provider_http_status") else None,
        correlation_id=error.correlation_id,
    )


def _encode_failure(err: GatewayError) -> bytes:
    return orjson.dumps(
        {
            "code": err.code.value,
            "message": err.message,
            "retry_after": err.retry_after,
            "provider": err.provider,
            "provider_http_status": err.provider_http_status,
            "correlation_id": err.correlation_id,
        }
    )


def _decode_failure(data: bytes) -> GatewayError:
    fields = orjson.loads(data)
    return GatewayError(
        ErrorCode(fields["code"]),
        fields["message"],
        retry_after=fields["retry_after"],
        provider=fields["provider"],
        provider_http_status=fields["provider_http_status"],
        correlation_id=fields["correlation_id"],
    )


def _terminal_payload(sequence: int, err: GatewayError) -> bytes:
    return pb.GenerateResponse(sequence=sequence, error=error_event(err, sequence - 1)).SerializeToString()


def _status_of(err: GatewayError) -> StreamStatus:
    return StreamStatus.CANCELLED if err.code is ErrorCode.STREAM_CANCELLED else StreamStatus.FAILED


class _Tail:
    """The last messages a producer appended and the journal acknowledged, for readers in its process.

    A reader in the producing process whose cursor is within the tail reads here and waits on the
    tail, instead of reading its stream back from a journal that is not in process (Redis). Only
    acknowledged appends are pushed, in order, so a message served here is the journal's message:
    the same bytes at the same sequence as Resume gives anywhere, and none a failed write could take
    back. Bounded by TAIL_MAX_MESSAGES and TAIL_MAX_BYTES, dropped from the front; a reader behind
    it reads the journal. Closed when the producer stops pushing (it ended, was fenced, lost its
    journal): its readers then go on from the journal, which has whatever was written after it.
    """

    __slots__ = ("_head", "_held", "_waiters", "closed", "first", "last", "size", "terminal")

    def __init__(self) -> None:
        # _held[_head:] are the messages held; the ones before _head were dropped.
        self._held: list[bytes] = []
        self._head = 0
        # The sequence of the first message held, and of the last one pushed (0: none yet).
        self.first = 1
        self.last = 0
        self.size = 0
        self.terminal = False
        self.closed = False
        self._waiters: list[asyncio.Future[bool]] = []

    def __len__(self) -> int:
        return len(self._held) - self._head

    def push(self, sequence: int, payload: bytes, *, terminal: bool = False, hold: bool = True) -> None:
        """An acknowledged append of one message at `sequence`. With `hold` False (no reader in
        this process) nothing is kept: a reader that comes later reads the journal, then the
        tail once it has caught up."""
        if self.closed:
            return
        if sequence != self.last + 1:
            # Not the next one (never expected): the journal, not the tail, says what follows.
            self.close()
            return
        if not hold:
            if len(self):
                self._held, self._head, self.size = [], 0, 0
            self.first = self.last = sequence
            self.first += 1
            if terminal:
                self.terminal = self.closed = True
            self._wake(True)
            return
        held = self._held
        held.append(payload)
        self.last = sequence
        self.size += len(payload)
        while len(held) - self._head > TAIL_MAX_MESSAGES or (self.size > TAIL_MAX_BYTES and len(held) - self._head > 1):
            self.size -= len(held[self._head])
            held[self._head] = b""
            self._head += 1
            self.first += 1
        if self._head >= 64 and self._head * 2 >= len(held):
            del held[: self._head]
            self._head = 0
        if terminal:
            self.terminal = self.closed = True
        self._wake(True)

    def covers(self, after: int) -> bool:
        """Whether the messages after this cursor are here (or are the next ones to come)."""
        return self.first - 1 <= after <= self.last

    def after(self, after: int, limit: int) -> list[bytes]:
        start = self._head + after + 1 - self.first
        return self._held[start : start + limit]

    def close(self) -> None:
        self.closed = True
        self._wake(True)

    def release(self) -> None:
        self.close()
        self._held = []
        self._head = 0
        self.first, self.size = self.last + 1, 0

    async def wait(self, after: int, within: float) -> bool:
        """Waits for a message after `after` or the close; False when `within` ran out first."""
        if self.closed or self.last > after:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(within, _settle_wait, waiter, False)
        try:
            return await waiter
        finally:
            timer.cancel()
            if self._waiters:  # timed out or cancelled: still listed (a wake empties the list)
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _wake(self, value: bool) -> None:
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                _settle_wait(waiter, value)


def _settle_wait(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


@dataclass(slots=True, eq=False)
class _Producer:
    """A durable generation running in this process, and the readers attached to it here."""

    stream_id: str
    window: float
    flight: InFlight | None = None
    readers: int = 0
    # Wakes when no reader has been attached (nor polled) for a whole window.
    abandon_timer: asyncio.TimerHandle | None = None
    # The check of readers on other replicas, once the timer ran out.
    abandon_check: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Its metrics, spans and its caller's quota lease (None for a producer started without one).
    watch: Watch | None = None
    # What it appended and the journal acknowledged, for readers here (None with a journal in
    # process, whose reads cost no more; dropped once it ended and its readers here left).
    tail: _Tail | None = None


@dataclass(frozen=True, slots=True)
class PollResult:
    payloads: Sequence[bytes]
    next_after: int
    terminal: bool
    state: pb.StreamState


class Follower:
    """One reader of a durable stream, by cursor: the payloads after it, to the terminal one.

    After iterating, `terminal` holds the terminal payload (None if the stream vanished), so
    that a door can make its status mirror it.
    """

    def __init__(self, streams: DurableStreams, stream_id: str, after: int) -> None:
        self._streams = streams
        self.stream_id = stream_id
        self.after = after
        self.terminal: bytes | None = None

    async def batches(self) -> AsyncGenerator[Sequence[bytes], None]:
        streams = self._streams
        journal = streams.journal
        producer = streams.attach(self.stream_id)
        behind = 0
        try:
            while True:
                tail = producer.tail if producer is not None else None
                # Only a look at the journal, then back to the tail.
                glance = False
                # (A reader the journal found behind the record reads the journal until it is not.)
                if tail is not None and not behind and tail.covers(self.after):
                    payloads = tail.after(self.after, _READ_BATCH)
                    if payloads:
                        self.after += len(payloads)
                        if tail.terminal and self.after == tail.last:
                            self.terminal = payloads[-1]
                            yield payloads
                            return
                        yield payloads
                        continue
                    if not tail.closed:
                        if await tail.wait(self.after, _WAIT_SLICE_SECONDS):
                            continue
                        # A whole slice without a message (heartbeats off): the journal says
                        # whether the stream was ended elsewhere meanwhile.
                        glance = True
                    # Closed without its terminal: the journal has what came after.
                # DurableStreams.read, inlined: a coroutine less per batch.
                try:
                    found = await journal.read(self.stream_id, self.after, _READ_BATCH)
                except JournalError:
                    raise journal_unavailable() from None
                if found is None:
                    raise not_found()
                batch = found
                record = batch.record
                if record.start_failure:
                    raise _decode_failure(record.start_failure)
                if batch.payloads:
                    behind = 0
                    self.after = batch.last
                    if batch.terminal:
                        self.terminal = batch.payloads[-1]
                        yield batch.payloads
                        return
                    yield batch.payloads
                    if self.after < record.last_sequence or glance:
                        continue
                    # Everything journaled when the batch was read has been sent: wait for more
                    # (a wait returns at once if more came meanwhile) rather than read for nothing.
                elif record.ended and self.after < record.last_sequence:
                    # The record was read after the payloads and is newer (the terminal landed in
                    # between): read again rather than end without it.
                    behind += 1
                    if behind > _READS_BEHIND:
                        raise journal_unavailable()
                    continue
                elif record.ended:
                    # The cursor is at the terminal message: nothing more to send, but the
                    # status still mirrors it.
                    last = await streams.read(self.stream_id, record.last_sequence - 1, 1)
                    self.terminal = last.payloads[-1] if last.payloads else None
                    return
                if streams.reapable(record) and await streams.reap(record):
                    continue  # its producer is gone: the terminal Error is journaled, read it
                if not glance and tail is not None and not tail.closed and tail.covers(self.after):
                    continue  # back to the tail (a reader that was behind it has caught up)
                # After a whole slice of silence on the tail, the journal's wait: it also wakes for
                # a terminal another replica writes (a fenced Cancel, a reap), which the tail never
                # sees. The next message the producer appends brings the reader back to the tail.
                try:
                    await journal.wait(self.stream_id, self.after, _WAIT_SLICE_SECONDS)
                except JournalError:
                    raise journal_unavailable() from None
        finally:
            streams.detach(self.stream_id, producer)


class DurableStreams:
    def __init__(self, router: Router, supervisor: StreamSupervisor, journal: Journal, config: ServerConfig) -> None:
        self.router = router
        self.supervisor = supervisor
        self.journal = journal
        self.config = config
        self.producers: dict[str, _Producer] = {}

    async def open(self) -> None:
        """Starts the journal's per-process part (a shared journal's lease and cancel subscription)."""
        await self.journal.start(self._cancel_requested, self._lease_lost)
        if self.journal.replica:
            log.info("replica %s: durable streams in the %s journal", self.journal.replica, self.journal.name)

    def _cancel_requested(self, stream_id: str) -> None:
        """A Cancel that reached another replica, for a stream this one produces."""
        producer = self.producers.get(stream_id)
        if producer is not None and producer.flight is not None:
            self.supervisor.end(producer.flight, stream_cancelled())

    def _lease_lost(self) -> None:
        """This replica could not keep its lease: it ends the durable streams it produces."""
        if self.producers:
            log.warning("lease lost: ending %d durable stream(s) with PRODUCER_LOST", len(self.producers))
        for producer in list(self.producers.values()):
            if producer.flight is not None:
                self.supervisor.end(producer.flight, producer_lost())

    def reapable(self, record: StreamRecord) -> bool:
        """Whether `reap` may have to end the stream: a running one produced by another replica
        (False lets a reader skip the call, once a message)."""
        return not (record.ended or not record.owner or record.stream_id in self.producers)

    async def reap(self, record: StreamRecord) -> bool:
        """Ends a running stream whose producer lost its lease with a terminal PRODUCER_LOST Error;
        True when the stream is ended now (by this call or by a writer that beat it)."""
        if not self.reapable(record):
            return False
        if await self.journal.owner_alive(record.owner):
            return False
        log.warning("stream %s: its producer (replica %s) lost its lease; ending it", record.stream_id, record.owner)
        try:
            await self._append_terminal(record, producer_lost())
        except Fenced:
            pass  # someone else ended it first, or the producer wrote on: the next read says which
        except JournalError:
            raise journal_unavailable() from None
        return True

    def window(self, request: pb.GenerateRequest) -> float | None:
        """The resume window a request gets; None for an ephemeral request."""
        if not request.HasField("resume_window"):
            return None
        asked = request.resume_window.seconds + request.resume_window.nanos / 1e9
        if asked == 0:
            return None
        if asked < MIN_WINDOW_SECONDS:
            raise invalid_request("resume_window", f"must be at least {MIN_WINDOW_SECONDS:g} s, or unset")
        return float(min(asked, self.config.max_resume_window_seconds))

    async def start(
        self,
        request: pb.GenerateRequest,
        route: Route,
        generation: GenerationRequest,
        *,
        window: float,
        received_at: float,
        create_time: datetime,
        owner: str = "",
        watch: Callable[[], Watch] | None = None,
    ) -> Follower:
        """Starts the durable stream the request asks for, or attaches to it when it exists
        (the same request_id and the same request, from the same caller); returns a follower
        from its first message. `watch` makes the producer's Watch when one is started."""
        stream_id = generation.stream_id
        fingerprint = owned_digest(owner, request.SerializeToString(deterministic=True))
        self.supervisor.check_open()
        # Hex: safe in a shell, a URL and a command line (a token may not start with "-").
        token = secrets.token_hex(_TOKEN_BYTES)
        record = StreamRecord(
            stream_id=stream_id,
            token_digest=owned_digest(owner, token),
            fingerprint=fingerprint,
            window=window,
            expires_at=self._running_expiry(window),
            owner=self.journal.replica,
        )
        try:
            existing = await self.journal.create(record)
        except JournalError:
            raise journal_unavailable() from None
        if existing is not None:
            if not hmac.compare_digest(existing.fingerprint, fingerprint):
                raise GatewayError(
                    ErrorCode.STREAM_ALREADY_EXISTS,
                    "a durable stream with this request_id exists and was started by a different request",
                )
            return Follower(self, stream_id, 0)
        producer = self.producers[stream_id] = _Producer(stream_id, window)
        if not self.journal.in_process:
            producer.tail = _Tail()
        info = StreamInfo(
            stream_id=stream_id,
            route=route.name,
            provider="",
            upstream_model="",
            received_at=received_at,
            create_time=create_time,
            prompt_chars=prompt_chars(generation),
            resume_token=token,
            resume_window=window,
        )
        task = asyncio.get_running_loop().create_task(
            self._produce(producer, route, generation, info), name=f"durable producer {stream_id}"
        )
        try:
            producer.flight = self.supervisor.admit(task, received_at)
            # Its writes go to the journal, whose calls have timeouts of their own, never to a
            # reader: a producer is never cut the way a writer stuck behind a stalled caller is
            # (a cut one would leave its stream running with nobody to end it).
            producer.flight.cuttable = False
            producer.watch = watch() if watch is not None else None
        except GatewayError as err:
            # The task never ran, so its own cleanup never will: undo what it would have.
            task.cancel()
            if self.producers.get(stream_id) is producer:
                del self.producers[stream_id]
            with contextlib.suppress(JournalError):
                await self.journal.fail_start(stream_id, _encode_failure(err), expires_at=time.time() + 1)
            raise
        return Follower(self, stream_id, 0)

    def took(self, lease: Lease) -> bool:
        """Whether a producer holds this quota lease (it gives it back when the stream ends)."""
        return any(p.watch is not None and p.watch.lease is lease for p in self.producers.values())

    async def resume(self, stream_id: str, token: str, after: int, owner: str = "") -> Follower:
        record = await self._authorized(stream_id, token, owner)
        if after > record.last_sequence:
            raise GatewayError(
                ErrorCode.CURSOR_OUT_OF_RANGE,
                f"after_sequence {after} is past the stream's last journaled message ({record.last_sequence})",
            )
        return Follower(self, stream_id, after)

    async def poll(
        self, stream_id: str, token: str, after: int, wait: float, limit: int, owner: str = ""
    ) -> PollResult:
        record = await self._authorized(stream_id, token, owner)
        if after > record.last_sequence:
            raise GatewayError(
                ErrorCode.CURSOR_OUT_OF_RANGE,
                f"after_sequence {after} is past the stream's last journaled message ({record.last_sequence})",
            )
        producer = self.attach(stream_id)
        try:
            batch = await self.read(stream_id, after, limit)
            if not batch.payloads and await self.reap(batch.record):
                batch = await self.read(stream_id, after, limit)
            if not batch.payloads and not batch.record.ended and wait > 0:
                try:
                    await self.journal.wait(stream_id, after, min(wait, MAX_POLL_WAIT_SECONDS))
                except JournalError:
                    raise journal_unavailable() from None
                batch = await self.read(stream_id, after, limit)
                if not batch.payloads and await self.reap(batch.record):
                    batch = await self.read(stream_id, after, limit)
        finally:
            self.detach(stream_id, producer)
        return PollResult(batch.payloads, batch.last, batch.terminal, stream_state(batch.record))

    async def cancel(self, stream_id: str, token: str, owner: str = "") -> pb.StreamState:
        record = await self._authorized(stream_id, token, owner)
        if record.ended:
            return stream_state(record)
        cancelled = stream_cancelled()
        producer = self.producers.get(stream_id)
        if producer is not None and producer.flight is not None:
            self.supervisor.end(producer.flight, cancelled)
            # The producer journals the terminal Error as soon as no write is in flight.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await producer.done.wait()
            latest = await self._record_or_none(stream_id)
            if latest is not None and not latest.ended:
                # The producer did not get its terminal out (stuck in a journal write, or gone):
                # the fenced write here ends the stream for every reader all the same.
                with contextlib.suppress(Fenced, JournalError):
                    await self._append_terminal(latest, cancelled)
                if producer.tail is not None:
                    producer.tail.close()  # its readers here read that terminal from the journal
        elif not await self.reap(record):
            # Another replica produces it: asked through the journal, its supervisor closes the
            # upstream and journals STREAM_CANCELLED. One that does not answer in time (or is not
            # listening) is fenced out: the terminal written here wins the race with it.
            record = await self._handed_off(record) if record.owner else record
            if not record.ended:
                with contextlib.suppress(Fenced):
                    await self._append_terminal(record, cancelled)
        after = await self.journal.get(stream_id)
        return stream_state(after if after is not None else record)

    async def _handed_off(self, record: StreamRecord) -> StreamRecord:
        """Asks the stream's owner to cancel it; the record once it ended, or as it is after
        CANCEL_HANDOFF_SECONDS."""
        stream_id = record.stream_id
        try:
            heard = await self.journal.request_cancel(record.owner, stream_id)
        except JournalError:
            raise journal_unavailable() from None
        if not heard:
            return record
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CANCEL_HANDOFF_SECONDS
        while (left := give_up - loop.time()) > 0:
            try:
                await self.journal.wait(stream_id, record.last_sequence, left)
                latest = await self.journal.get(stream_id)
            except JournalError:
                raise journal_unavailable() from None
            if latest is None or latest.ended:
                return latest or record
            record = latest
        return record

    async def read(self, stream_id: str, after: int, limit: int) -> Batch:
        try:
            batch = await self.journal.read(stream_id, after, limit)
        except JournalError:
            raise journal_unavailable() from None
        if batch is None:
            raise not_found()
        return batch

    def attach(self, stream_id: str) -> _Producer | None:
        producer = self.producers.get(stream_id)
        if producer is not None:
            producer.readers += 1
            if producer.abandon_timer is not None:
                producer.abandon_timer.cancel()
                producer.abandon_timer = None
        else:
            # Produced elsewhere (or ended): the journal tells its owner it is read.
            self.journal.reading(stream_id, +1)
        return producer

    def detach(self, stream_id: str, producer: _Producer | None) -> None:
        if producer is None:
            self.journal.reading(stream_id, -1)
            return
        producer.readers -= 1
        if producer.readers == 0:
            if not producer.done.is_set():
                self._arm_abandon(producer, producer.window)
            elif producer.tail is not None:
                producer.tail.release()  # its last reader here left: the tail goes
                producer.tail = None

    def _arm_abandon(self, producer: _Producer, delay: float) -> None:
        # One timer per producer: one armed while a check was out must not fire on its own later.
        if producer.abandon_timer is not None:
            producer.abandon_timer.cancel()
        producer.abandon_timer = asyncio.get_running_loop().call_later(delay, self._abandon, producer)

    def _abandon(self, producer: _Producer) -> None:
        producer.abandon_timer = None
        if producer.readers == 0 and producer.flight is not None and not producer.done.is_set():
            producer.abandon_check = asyncio.get_running_loop().create_task(self._abandon_unless_read(producer))

    async def _abandon_unless_read(self, producer: _Producer) -> None:
        """Abandons the stream unless a reader on another replica marked it read within the window."""
        try:
            age = await self.journal.read_age(producer.stream_id)
        except JournalError:
            age = None  # cannot be told: the window without a reader here has run out
        if producer.readers or producer.flight is None or producer.done.is_set():
            return
        if producer.abandon_timer is not None:
            # A reader came and went while the journal answered: its leaving started a new window.
            return
        if age is not None and age < producer.window + _REMOTE_READ_SLACK_SECONDS:
            self._arm_abandon(producer, max(producer.window - age, 0.2))
            return
        self.supervisor.end(
            producer.flight,
            GatewayError(
                ErrorCode.STREAM_ABANDONED,
                f"no reader came back to the stream within its resume window of {producer.window:g} s",
            ),
        )

    async def _authorized(self, stream_id: str, token: str, owner: str) -> StreamRecord:
        if not stream_id or not token:
            raise not_found()
        try:
            record = await self.journal.get(stream_id)
        except JournalError:
            raise journal_unavailable() from None
        if (
            record is None
            or record.start_failure
            or not hmac.compare_digest(record.token_digest, owned_digest(owner, token))
        ):
            raise not_found()
        return record

    def _running_expiry(self, window: float) -> float:
        # A running stream's producer ends it long before this; the expiry only guards against a
        # producer that died without a word.
        return time.time() + window + self.config.max_stream_duration_seconds

    async def _append_terminal(self, record: StreamRecord, err: GatewayError) -> None:
        sequence = record.last_sequence + 1
        await self.journal.append(
            record.stream_id,
            sequence,
            [_terminal_payload(sequence, err)],
            expires_at=time.time() + record.window,
            status=_status_of(err),
        )

    async def _produce(
        self, producer: _Producer, route: Route, generation: GenerationRequest, info: StreamInfo
    ) -> None:
        stream_id = producer.stream_id
        outcome = "OK"
        sequencer: Sequencer | None = None
        started = time.monotonic()
        # The reader that started the stream attaches right after this task is created: until
        # then, and whenever no reader is attached, the abandonment clock runs.
        self.detach(stream_id, self.attach(stream_id))
        try:
            # `start` admitted this task before it first ran.
            flight = producer.flight
            assert flight is not None
            spans = producer.watch.span if producer.watch is not None else None
            try:
                if spans is not None:
                    spans.opening(route.provider.kind, route.config.model, route.propagates_trace)
                opened = await self.router.open(route, generation)
            except asyncio.CancelledError:
                # Ended by the server (shutdown, duration, a cancel) before the first token.
                failure = flight.ended_by or GatewayError(ErrorCode.SERVER_SHUTTING_DOWN, "the stream was stopped")
                outcome = failure.code.value
                await self._fail_start(stream_id, failure)
                return
            except GatewayError as err:
                outcome = err.code.value
                await self._fail_start(stream_id, err)
                return
            info = dataclasses.replace(
                info, provider=opened.route.provider.kind, upstream_model=opened.route.config.model
            )
            if producer.watch is not None:
                producer.watch.provider = opened.route.provider.kind
                if spans is not None:
                    spans.opened(opened.route.provider.kind, opened.route.config.model)
            sequencer = Sequencer(info)
            relay = flight.relay = Relay(
                sequencer,
                opened.first,
                opened.events,
                heartbeat_interval=self.config.heartbeat_interval_seconds or None,
            )
            outcome = await self._journal_stream(producer, relay)
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        except Exception as exc:
            correlation_id = new_correlation_id()
            log.error("internal error %s in durable stream %s: %s", correlation_id, stream_id, describe_exception(exc))
            outcome = ErrorCode.INTERNAL.value
            record = await self._record_or_none(stream_id)
            if record is not None and not record.ended:
                with contextlib.suppress(JournalError):
                    if record.last_sequence:
                        await self._append_terminal(record, internal_error(correlation_id))
                    else:
                        await self._fail_start(stream_id, internal_error(correlation_id))
        finally:
            if producer.abandon_timer is not None:
                producer.abandon_timer.cancel()
            if producer.tail is not None:
                # Its readers here go on from the journal past what it holds; it goes with the last.
                producer.tail.close()
                if not producer.readers:
                    producer.tail.release()
                    producer.tail = None
            producer.done.set()
            if self.producers.get(stream_id) is producer:
                del self.producers[stream_id]
            if producer.flight is not None:
                self.supervisor.release(producer.flight)
            watch = producer.watch
            if watch is not None:
                watch.end(outcome, sequencer)
            log.info(
                "stream %s durable route=%r outcome=%s messages=%d duration_ms=%.1f%s",
                stream_id,
                info.route[:128],
                outcome,
                sequencer.sequence if sequencer is not None else 0,
                (time.monotonic() - started) * 1000,
                f" caller={watch.caller.name!r}" if watch is not None and watch.caller.name else "",
                extra={"stream": _figures(stream_id, info.route[:128], outcome, sequencer, started, watch)},
            )

    async def _journal_stream(self, producer: _Producer, relay: Relay) -> str:
        """Writes the relay's messages to the journal until the terminal one; returns the outcome.

        Deltas that queue while a journal write is in flight are merged by the relay into one
        message, so a slow journal gets fewer, larger writes rather than a round trip per token.
        A message the journal has no room for is replaced by a terminal JOURNAL_FULL Error in its
        place: nothing is silently dropped, and the sequence stays contiguous.
        """
        stream_id = producer.stream_id
        limits = self.config
        tail = producer.tail
        count = 0
        size = 0
        try:
            async with contextlib.aclosing(relay.messages()) as messages:
                async for message in messages:
                    event = message.WhichOneof("event")
                    terminal = event in ("finish", "error")
                    payload = message.SerializeToString()
                    status = StreamStatus.RUNNING
                    if terminal:
                        status = StreamStatus.FINISHED if event == "finish" else _status_of(_failure(relay))
                    elif (
                        count + 2 > limits.journal_max_stream_messages
                        or size + len(payload) > limits.journal_max_stream_bytes
                    ):
                        return await self._full(producer, message.sequence, "per stream")
                    try:
                        await self.journal.append(
                            stream_id,
                            message.sequence,
                            (payload,),
                            expires_at=time.time() + producer.window
                            if terminal
                            else self._running_expiry(producer.window),
                            status=status,
                        )
                    except JournalFull:
                        return await self._full(producer, message.sequence, "in total")
                    # Acknowledged: readers here may have it now, and not before.
                    if tail is not None:
                        tail.push(message.sequence, payload, terminal=terminal, hold=producer.readers > 0)
                    count += 1
                    size += len(payload)
                    if terminal:
                        failure = relay.sequencer.failure
                        return failure.code.value if failure is not None else "OK"
        except Fenced:
            # Someone else ended the stream (a Cancel whose producer was not found, a lost lease).
            return "ENDED_ELSEWHERE"
        except JournalUnavailable as e:
            if tail is not None:
                # The write may yet land, or not: readers here read on from the journal.
                tail.close()
            log.warning("stream %s: the journal could not be reached, ending the stream: %s", stream_id, e)
            await relay.aclose()
            await self._end_unreachable(stream_id)
            return ErrorCode.JOURNAL_UNAVAILABLE.value
        finally:
            await relay.aclose()
        return "CANCELLED"

    async def _end_unreachable(self, stream_id: str) -> None:
        """Journals a terminal JOURNAL_UNAVAILABLE once the journal answers again, for a while.

        The write that failed may still land (a stalled Redis runs what it was sent when it wakes),
        so the terminal goes after whatever the journal holds then; without it, a reader that comes
        back would wait for a producer that gave up.
        """
        err = GatewayError(
            ErrorCode.JOURNAL_UNAVAILABLE,
            "the stream journal could not be reached, so the stream ended before its answer did; retry",
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _UNREACHABLE_RETRY_SECONDS
        pause = 0.1
        while loop.time() < give_up:
            try:
                record = await self.journal.get(stream_id)
                if record is None or record.ended:
                    return
                await self._append_terminal(record, err)
                return
            except (JournalUnavailable, Fenced):
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _full(self, producer: _Producer, sequence: int, which: str) -> str:
        err = GatewayError(
            ErrorCode.JOURNAL_FULL,
            f"the stream journal is full ({which}); the stream ended before its answer did",
        )
        payload = _terminal_payload(sequence, err)
        with contextlib.suppress(JournalError):
            await self.journal.append(
                producer.stream_id,
                sequence,
                [payload],
                expires_at=time.time() + producer.window,
                status=StreamStatus.FAILED,
            )
            if producer.tail is not None:
                producer.tail.push(sequence, payload, terminal=True, hold=producer.readers > 0)
        return err.code.value

    async def _fail_start(self, stream_id: str, err: GatewayError) -> None:
        with contextlib.suppress(JournalError):
            await self.journal.fail_start(
                stream_id, _encode_failure(err), expires_at=time.time() + _FAILED_START_TTL_SECONDS
            )

    async def _record_or_none(self, stream_id: str) -> StreamRecord | None:
        try:
            return await self.journal.get(stream_id)
        except JournalError:
            return None


def _figures(
    stream_id: str, route: str, outcome: str, sequencer: Sequencer | None, started: float, watch: Watch | None
) -> dict[str, object]:
    """The producer's line as fields, for the JSON log."""
    figures: dict[str, object] = {
        "stream_id": stream_id,
        "kind": "durable",
        "route": route,
        "outcome": outcome,
        "messages": sequencer.sequence if sequencer is not None else 0,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }
    if watch is not None and watch.caller.name:
        figures["caller"] = watch.caller.name
    finish = sequencer.finish if sequencer is not None else None
    if finish is not None:
        figures |= {
            "input_tokens": finish.usage.input_tokens,
            "output_tokens": finish.usage.output_tokens,
            "ttft_ms": round(finish.timing.time_to_first_token.ToNanoseconds() / 1e6, 3),
            "output_tokens_per_second": round(finish.timing.output_tokens_per_second, 2),
        }
    return figures


def _failure(relay: Relay) -> GatewayError:
    failure = relay.sequencer.failure
    assert failure is not None
    return failure
