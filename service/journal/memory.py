"""The in-process journal: the embedded default, for one server process and no setup.

Each stream's payloads are kept in a list in this process, bounded in total bytes; readers
wait on a future that every append (and the stream's end or expiry) resolves. Ended streams are
forgotten at their expiry by one timer each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.journal.base import Batch, Fenced, Journal, JournalFull, StreamRecord, StreamStatus


@dataclass(slots=True, eq=False)
class _Stream:
    # The record as created; what changes is kept in the fields below, and a record is built
    # only when somebody asks (appends are the hot path).
    created: StreamRecord
    status: StreamStatus = StreamStatus.RUNNING
    last_sequence: int = 0
    expires_at: float = 0.0
    start_failure: bytes = b""
    payloads: list[bytes] = field(default_factory=list)
    size: int = 0
    # One future per waiting reader, resolved by the next change.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    expiry: asyncio.TimerHandle | None = None
    # The record as of the last change, built on the first read after it.
    cached: StreamRecord | None = None

    @property
    def ended(self) -> bool:
        return self.status is not StreamStatus.RUNNING or bool(self.start_failure)

    def record(self) -> StreamRecord:
        if self.cached is None:
            c = self.created
            # Built field by field: dataclasses.replace costs several times as much, once a message.
            self.cached = StreamRecord(
                stream_id=c.stream_id,
                token_digest=c.token_digest,
                fingerprint=c.fingerprint,
                window=c.window,
                status=self.status,
                last_sequence=self.last_sequence,
                expires_at=self.expires_at,
                start_failure=self.start_failure,
                owner=c.owner,
            )
        return self.cached

    def notify(self) -> None:
        """Called on every change: the cached record is stale, and waiting readers wake."""
        self.cached = None
        if self.waiters:
            for waiter in self.waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self.waiters.clear()


class MemoryJournal(Journal):
    name = "memory"
    in_process = True

    def __init__(self, *, max_total_bytes: int = 512 * 1024 * 1024) -> None:
        self._streams: dict[str, _Stream] = {}
        self.max_total_bytes = max_total_bytes
        # Payload bytes held for every stream together.
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._streams)

    async def create(self, record: StreamRecord) -> StreamRecord | None:
        existing = self._live(record.stream_id)
        if existing is not None and not existing.start_failure:
            return existing.record()
        if existing is not None:
            self._forget(record.stream_id)
        stream = self._streams[record.stream_id] = _Stream(
            record, record.status, record.last_sequence, record.expires_at, record.start_failure
        )
        self._expire_at(stream, record.expires_at)
        return None

    async def append(
        self,
        stream_id: str,
        first_sequence: int,
        payloads: Sequence[bytes],
        *,
        expires_at: float,
        status: StreamStatus = StreamStatus.RUNNING,
    ) -> None:
        stream = self._live(stream_id)
        if stream is None or stream.ended or first_sequence != stream.last_sequence + 1:
            raise Fenced(f"stream {stream_id} does not continue at {first_sequence}")
        size = sum(map(len, payloads))
        if status is StreamStatus.RUNNING and self.total_bytes + size > self.max_total_bytes:
            raise JournalFull(f"the memory journal holds {self.total_bytes} bytes, its limit is {self.max_total_bytes}")
        stream.payloads.extend(payloads)
        stream.size += size
        self.total_bytes += size
        stream.last_sequence += len(payloads)
        stream.status = status
        # A running stream's expiry only moves later, and `_live` checks it on every access: its
        # timer is moved only when the stream ends, not on every append.
        stream.expires_at = expires_at
        if status is not StreamStatus.RUNNING:
            self._expire_at(stream, expires_at)
        stream.notify()

    async def fail_start(self, stream_id: str, failure: bytes, *, expires_at: float) -> None:
        stream = self._live(stream_id)
        if stream is None or stream.ended or stream.last_sequence:
            raise Fenced(f"stream {stream_id} cannot fail before Start")
        stream.start_failure = failure
        stream.expires_at = expires_at
        self._expire_at(stream, expires_at)
        stream.notify()

    async def get(self, stream_id: str) -> StreamRecord | None:
        stream = self._live(stream_id)
        return None if stream is None else stream.record()

    async def read(self, stream_id: str, after: int, limit: int) -> Batch | None:
        stream = self._live(stream_id)
        if stream is None:
            return None
        # Sequence n is payloads[n - 1]; slicing a list copies only references.
        return Batch(stream.payloads[after : after + limit], stream.record(), after + 1)

    async def wait(self, stream_id: str, after: int, within: float) -> None:
        stream = self._live(stream_id)
        if stream is None or stream.ended or stream.last_sequence > after or within <= 0:
            return
        # A future of its own per waiter, so that one reader's cancel leaves the others alone, and
        # a plain timer for the timeout: cheaper than a timeout scope around a shared future.
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        stream.waiters.append(waiter)
        timer = loop.call_later(within, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    async def aclose(self) -> None:
        for stream_id in list(self._streams):
            self._forget(stream_id)

    def _live(self, stream_id: str) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.expires_at <= time.time():
            # Its timer may not have run yet: an expired stream is gone all the same.
            self._forget(stream_id)
            return None
        return stream

    def _expire_at(self, stream: _Stream, expires_at: float) -> None:
        if stream.expiry is not None:
            stream.expiry.cancel()
        delay = max(0.0, expires_at - time.time())
        stream.expiry = asyncio.get_running_loop().call_later(delay, self._expired, stream)

    def _expired(self, stream: _Stream) -> None:
        if self._streams.get(stream.created.stream_id) is stream:
            self._forget(stream.created.stream_id)

    def _forget(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.expiry is not None:
            stream.expiry.cancel()
        self.total_bytes -= stream.size
        stream.payloads.clear()
        stream.notify()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
