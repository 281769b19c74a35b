"""Journal cost: what durability costs per payload, in the memory journal and in the Redis journal.

Appends N payloads of about 60 bytes (a delta message's size) to one stream, in batches of 1 and
of 8 (a flush with several messages queued), then reads them back by cursor in pages, as a
Resume replaying history does. For each journal and batch size it prints microseconds per payload
(wall clock, and this process's CPU) for append and for read and, for Redis, Redis's own CPU; a
last line writes from 50 streams at once, whose appends share the journal's round trips
(INFO cpu: used_cpu_sys + used_cpu_user, before and after) in milliseconds per 1,000 payloads.

    .venv/bin/python bench/journal_cost.py [--payloads 20000] [--url redis://127.0.0.1:6379/0]

Without --url it starts its own redis-server (127.0.0.1, a free port, no persistence), as the
tests do. Talks to 127.0.0.1 only unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import running_redis

from service.journal import Journal, StreamRecord, StreamStatus
from service.journal.memory import MemoryJournal
from service.journal.redis import RedisJournal


@dataclass(frozen=True, slots=True)
class Phase:
    wall_us: float
    cpu_us: float
    # Redis's CPU in ms per 1,000 payloads; None for the memory journal.
    redis_ms_per_1k: float | None


async def _timed(
    n: int, work: Callable[[], Awaitable[None]], redis_cpu: Callable[[], Awaitable[float]] | None
) -> Phase:
    before_redis = await redis_cpu() if redis_cpu else 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    await work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    redis_ms = (await redis_cpu() - before_redis) * 1000 / n * 1000 if redis_cpu else None
    return Phase(wall / n * 1e6, cpu / n * 1e6, redis_ms)


async def measure(
    journal: Journal,
    batch: int,
    n: int,
    read_limit: int,
    redis_cpu: Callable[[], Awaitable[float]] | None,
    streams: int = 1,
) -> tuple[Phase, Phase]:
    """`n` payloads over `streams` streams written at once (as concurrent producers write), then
    read back stream by stream."""
    window = 600.0
    ids = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(streams)]
    for stream_id in ids:
        record = StreamRecord(stream_id, b"t" * 32, b"f" * 32, window, expires_at=time.time() + window)
        assert await journal.create(record) is None
    each = n // streams
    payloads = [f"delta {i:08d} ".encode().ljust(60, b".") for i in range(each)]

    async def append_one(stream_id: str) -> None:
        expires_at = time.time() + window
        for first in range(0, each, batch):
            chunk = payloads[first : first + batch]
            last = first + len(chunk) == each
            status = StreamStatus.FINISHED if last else StreamStatus.RUNNING
            await journal.append(stream_id, first + 1, chunk, expires_at=expires_at, status=status)

    async def append_all() -> None:
        await asyncio.gather(*(append_one(stream_id) for stream_id in ids))

    async def read_all() -> None:
        for stream_id in ids:
            after, seen = 0, 0
            while True:
                got = await journal.read(stream_id, after, read_limit)
                assert got is not None
                seen += len(got.payloads)
                after = got.last
                if got.terminal:
                    break
            assert seen == each, seen

    total = each * streams
    return await _timed(total, append_all, redis_cpu), await _timed(total, read_all, redis_cpu)


@contextlib.contextmanager
def redis_url(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with running_redis() as server:
        yield server.url


def _fmt(phase: Phase) -> str:
    redis = "" if phase.redis_ms_per_1k is None else f"{phase.redis_ms_per_1k:8.2f}"
    return f"{phase.wall_us:8.2f} {phase.cpu_us:8.2f} {redis:>8}"


async def run(args: argparse.Namespace) -> None:
    with redis_url(args.url) as url:
        raw = Redis.from_url(url, protocol=3)
        prefix = f"tokenwire-bench:{uuid.uuid4().hex[:8]}:"

        async def redis_cpu() -> float:
            info = await raw.info("cpu")
            return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

        print(f"{args.payloads} payloads of 60 bytes, read back {args.read_limit} per read; redis at {url}")
        print("                              append (µs/payload)          read (µs/payload)")
        print("journal  streams batch   wall      cpu  redis ms/1k     wall      cpu  redis ms/1k")
        try:
            for name, streams, batch in (
                ("memory", 1, 1),
                ("memory", 1, 8),
                ("redis", 1, 1),
                ("redis", 1, 8),
                # Concurrent producers: their appends share round trips (the journal's own batching).
                ("redis", 50, 1),
            ):
                journal: Journal = (
                    MemoryJournal(max_total_bytes=1 << 30) if name == "memory" else RedisJournal(url, prefix=prefix)
                )
                cpu = redis_cpu if name == "redis" else None
                try:
                    append, read = await measure(journal, batch, args.payloads, args.read_limit, cpu, streams)
                finally:
                    await journal.aclose()
                print(f"{name:8} {streams:7} {batch:5} {_fmt(append)}     {_fmt(read)}")
        finally:
            keys = [key async for key in raw.scan_iter(match=f"{prefix}*")]
            if keys:
                await raw.delete(*keys)
            await raw.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payloads", type=int, default=20_000)
    parser.add_argument("--read-limit", type=int, default=256, help="payloads per read (a Resume's page)")
    parser.add_argument("--url", help="an existing Redis (default: start one on a free 127.0.0.1 port)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
