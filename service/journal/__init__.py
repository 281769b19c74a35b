"""Journals of durable streams: one interface (`base`), in memory (`memory`) and in Redis (`redis`)."""

from __future__ import annotations

from service.journal.base import (
    Batch,
    Fenced,
    Journal,
    JournalError,
    JournalFull,
    JournalUnavailable,
    StreamRecord,
    StreamStatus,
)

__all__ = [
    "Batch",
    "Fenced",
    "Journal",
    "JournalError",
    "JournalFull",
    "JournalUnavailable",
    "StreamRecord",
    "StreamStatus",
    "open_journal",
]


def open_journal(url: str, *, max_total_bytes: int) -> Journal:
    """The journal a `journal` setting names: "memory", or a redis:// / rediss:// / unix:// URL.

    Redis is imported only when a Redis journal is configured.
    """
    if url == "memory":
        from service.journal.memory import MemoryJournal

        return MemoryJournal(max_total_bytes=max_total_bytes)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from service.journal.redis import RedisJournal

        return RedisJournal(url)
    raise ValueError(f"journal must be 'memory' or a redis:// URL, got {url.split('://')[0]!r}")
