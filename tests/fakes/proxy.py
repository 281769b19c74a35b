"""A TCP fault-injection proxy for tests, in pure asyncio (toxiproxy is not available here).

    async with FaultProxy(target_port) as proxy:
        channel = grpc.aio.insecure_channel(proxy.address)
        proxy.latency = 0.05     # every chunk, both ways, arrives 50 ms later, in order
        proxy.blackhole()        # the path goes dead: nothing passes, nothing closes
        proxy.heal()
        proxy.reset_after(1000)  # RST once 1000 bytes have reached a client
        proxy.reset_all()        # RST every connection now

Each accepted connection gets its own connection to the target. The two directions are independent pipes; a
chunk and a half-close keep their order through the latency queue. A side is read only while the other side
can take more, so a client that stops reading soon stops the target too (except in blackhole mode, where bytes
are read only to be dropped). Resets set SO_LINGER (1, 0) before closing, so the kernel sends RST, not FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import socket
import struct
import sys
from collections import deque
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"
# Bytes a pipe may hold in its latency queue before its source is paused.
QUEUE_HIGH_WATER = 256 * 1024
# How long reset_after waits for the last allowed bytes to be acknowledged before resetting anyway.
FLUSH_TIMEOUT = 1.0
CLOSE_TIMEOUT = 1.0
_POLL = 0.001


class _Mark(enum.Enum):
    EOF = "eof"  # the source half-closed: write_eof() on the destination
    CLOSE = "close"  # the source is gone: close the link once the data queued before it is written
    RESET = "reset"  # reset_after's limit: reset the link once the data queued before it has been received


_Item = bytes | _Mark


def _set_linger_zero(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _unacknowledged(transport: asyncio.WriteTransport) -> int:
    """Bytes written but not yet acknowledged by the peer's kernel: asyncio's buffer plus, on Linux, the
    socket's send queue (SIOCOUTQ counts sent-but-unacknowledged bytes too). An RST discards both."""
    pending = transport.get_write_buffer_size()
    if sys.platform == "linux":
        import fcntl
        import termios

        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                pending += int(struct.unpack("i", raw)[0])
    return pending


class _Side(asyncio.Protocol):
    """One socket of a link: the accepted client connection, or the proxy's connection to the target."""

    def __init__(self, link: _Link, is_client: bool) -> None:
        self.link = link
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.reading = True  # as last set by us; a new transport starts reading
        self.write_paused = False
        self.eof = False  # the peer half-closed
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.link.side_made(self)

    def data_received(self, data: bytes) -> None:
        self.link.pipe_from(self).push(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.link.pipe_from(self).push(_Mark.EOF)
        return True  # keep the transport: the other direction may still be carrying data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link.side_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.link.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.link.update_reading()

    @property
    def live(self) -> bool:
        return self.transport is not None and not self.lost

    @property
    def writable(self) -> bool:
        return self.transport is not None and not self.lost and not self.transport.is_closing()

    def set_reading(self, want: bool) -> None:
        transport = self.transport
        # After EOF asyncio has dropped the reader; resuming would read the EOF again.
        if transport is None or self.lost or self.eof or transport.is_closing() or want == self.reading:
            return
        self.reading = want
        if want:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def abort(self, rst: bool) -> None:
        if self.transport is not None and not self.lost:
            if rst:
                _set_linger_zero(self.transport)
            self.transport.abort()


class _Pipe:
    """One direction of a link, source side to destination side, through the latency queue."""

    def __init__(self, link: _Link, src: _Side, dst: _Side) -> None:
        self.link = link
        self.src = src
        self.dst = dst
        self.downstream = not src.is_client
        self.queue: deque[tuple[float, _Item]] = deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.accepted = 0  # bytes taken for forwarding, queued or written
        self.stopped = False  # a reset is on its way: nothing more is taken
        self.ended = False  # EOF or CLOSE has been delivered

    def push(self, item: _Item) -> None:
        link = self.link
        proxy = link.proxy
        if link.done or self.stopped:
            return
        if proxy._blackholed:
            if isinstance(item, _Mark):
                link.damaged = True
            return
        if isinstance(item, bytes):
            limit = proxy._reset_limit
            if self.downstream and limit is not None and len(item) >= limit - self.accepted:
                item = item[: max(limit - self.accepted, 0)]
                self.accepted += len(item)
                if item:
                    self._enqueue(item)
                self.stop_with_reset()
                return
            self.accepted += len(item)
        self._enqueue(item)

    def stop_with_reset(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._enqueue(_Mark.RESET)

    def _enqueue(self, item: _Item) -> None:
        proxy = self.link.proxy
        if proxy._latency <= 0 and not self.queue:
            self._deliver(item)
        else:
            self.queue.append((proxy._loop.time() + proxy._latency, item))
            if isinstance(item, bytes):
                self.queued_bytes += len(item)
            if self.timer is None:
                self._arm()
        self.link.update_reading()

    def _arm(self) -> None:
        self.timer = self.link.proxy._loop.call_at(self.queue[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        now = self.link.proxy._loop.time()
        # FIFO even when the latency was lowered: a later chunk never overtakes an earlier one.
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if isinstance(item, bytes):
                self.queued_bytes -= len(item)
            self._deliver(item)
        if self.queue and not self.link.done:
            self._arm()
        self.link.update_reading()

    def _deliver(self, item: _Item) -> None:
        link = self.link
        proxy = link.proxy
        if link.done:
            return
        if proxy._blackholed:  # in flight when the path died
            if isinstance(item, _Mark):
                link.damaged = True
            return
        dst = self.dst
        if isinstance(item, bytes):
            if dst.writable and dst.transport is not None:
                dst.transport.write(item)
                if self.downstream:
                    proxy._bytes_down += len(item)
                else:
                    proxy._bytes_up += len(item)
        elif item is _Mark.EOF:
            self.ended = True
            if dst.writable and dst.transport is not None and dst.transport.can_write_eof():
                dst.transport.write_eof()
            link.finish_if_both_ended()
        elif item is _Mark.CLOSE:
            self.ended = True
            link.close()
        else:
            link.reset_when_received()

    def clear(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued_bytes = 0


class _Link:
    """One client connection and its connection to the target."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, is_client=True)
        self.target = _Side(self, is_client=False)
        self.up = _Pipe(self, self.client, self.target)
        self.down = _Pipe(self, self.target, self.client)
        self.connect_task: asyncio.Task[None] | None = None
        self.orphan = False  # accepted while blackholed: never connected through
        self.damaged = False  # a close or reset was lost in the blackhole
        self.done = False  # closed or reset by the proxy

    def pipe_from(self, side: _Side) -> _Pipe:
        return self.up if side is self.client else self.down

    # events from the sides

    def side_made(self, side: _Side) -> None:
        proxy = self.proxy
        proxy._transport_opened()
        if side is self.client:
            proxy._client_opened(self)
            if proxy._closed:
                side.abort(rst=False)
            elif proxy._blackholed:
                self.orphan = True
            else:
                # Nothing is read until there is somewhere to send it.
                side.set_reading(False)
                self.connect_task = proxy._spawn(self._connect())
                self.connect_task.add_done_callback(lambda _: self.forget_if_finished())
            return
        if self.done or proxy._closed:
            side.abort(rst=False)
            return
        limit = proxy._reset_limit
        if limit is not None and self.down.accepted >= limit:
            self.down.stop_with_reset()
        self.update_reading()

    def side_lost(self, side: _Side) -> None:
        proxy = self.proxy
        if side is self.client:
            proxy._client_closed()
        if not self.done:
            self.pipe_from(side).push(_Mark.CLOSE)
        self.forget_if_finished()
        proxy._transport_closed()

    def forget_if_finished(self) -> None:
        connecting = self.connect_task is not None and not self.connect_task.done()
        if not connecting and not self.client.live and not self.target.live:
            self.proxy._links.discard(self)

    async def _connect(self) -> None:
        proxy = self.proxy
        try:
            await proxy._loop.create_connection(lambda: self.target, proxy._target_host, proxy._target_port)
        except OSError:
            # The target refused or is unreachable: the client sees its connection reset.
            self.reset()

    # flow control

    def update_reading(self) -> None:
        for pipe in (self.up, self.down):
            pipe.src.set_reading(self._wants_read(pipe))

    def _wants_read(self, pipe: _Pipe) -> bool:
        if self.proxy._blackholed:
            return True  # read to drop: a dead path never pushes back
        if self.done or pipe.stopped or self.target.transport is None:
            return False
        return not pipe.dst.write_paused and pipe.queued_bytes < QUEUE_HIGH_WATER

    # endings

    def finish_if_both_ended(self) -> None:
        if self.up.ended and self.down.ended:
            self.close()

    def _stop(self) -> None:
        self.done = True
        if self.connect_task is not None and self.connect_task is not asyncio.current_task():
            self.connect_task.cancel()
        self.up.clear()
        self.down.clear()

    def close(self) -> None:
        """Close both sides cleanly (FIN), after what is already written to them."""
        if not self.done:
            self._stop()
            self.client.close()
            self.target.close()

    def abort(self, rst: bool) -> None:
        self._stop()
        self.client.abort(rst)
        self.target.abort(rst)

    def reset(self) -> None:
        self.abort(rst=True)

    def reset_when_received(self) -> None:
        self.proxy._spawn(self._reset_when_received())

    async def _reset_when_received(self) -> None:
        # An RST makes the kernel drop whatever it has not sent yet, so wait until the client has it all.
        # Polled: nothing signals that a socket's send queue has emptied.
        loop = self.proxy._loop
        deadline = loop.time() + FLUSH_TIMEOUT
        transport = self.client.transport
        while (  # noqa: ASYNC110
            not self.done
            and self.client.writable
            and transport is not None
            and _unacknowledged(transport) > 0
            and loop.time() < deadline
        ):
            await asyncio.sleep(_POLL)
        self.reset()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 between clients and one target, whose faults are switched at run time.

    Faults apply to data as it arrives at the proxy (and, for blackhole, to data still in the latency queue):
    - `latency`: every chunk and half-close is delivered `latency` seconds after it arrived, in order.
    - `blackhole()`: bytes, half-closes and closes from either side are dropped; connections stay open;
      new connections are accepted but never connected through.
    - `reset_all()`: RST both sides of every connection now.
    - `reset_after(n)`: RST both sides of a connection once `n` bytes have reached its client.
    - `heal()`: plain forwarding again. A connection that cannot carry on (it was never connected through, or
      one side's close was lost in the blackhole) is reset, as the peer that forgot it would answer with RST.
    """

    _loop: asyncio.AbstractEventLoop  # set by start()

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target_host = target_host
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._port = 0
        self._closed = False
        self._latency = 0.0
        self._blackholed = False
        self._reset_limit: int | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections = 0
        self._open_connections = 0
        self._open_transports = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._no_clients = asyncio.Event()
        self._no_clients.set()
        self._no_transports = asyncio.Event()
        self._no_transports.set()

    # lifecycle

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port."""
        if self._server is not None or self._closed:
            raise RuntimeError("a FaultProxy starts once")
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: _Link(self).client, HOST, 0)
        self._port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening, abort every connection and end the proxy's tasks (bounded in time)."""
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for link in list(self._links):
            link.abort(rst=False)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        # Aborted transports close their sockets in connection_lost, a loop iteration later.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_transports.wait(), CLOSE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)
        self._links.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    # faults

    @property
    def latency(self) -> float:
        """Seconds added to every chunk in each direction; applies to chunks that arrive from now on."""
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"latency must be a finite number of seconds >= 0, not {seconds!r}")
        self._latency = float(seconds)

    def blackhole(self) -> None:
        """Drop every byte in both directions from now on; open connections stay open, new ones are accepted
        but never connected through."""
        self._blackholed = True
        for link in list(self._links):
            link.update_reading()

    def reset_all(self) -> None:
        """Reset every open connection now (RST to the client and to the target)."""
        for link in list(self._links):
            link.reset()

    def reset_after(self, downstream_bytes: int) -> None:
        """Reset each connection, open or new, once it has forwarded `downstream_bytes` from target to client
        in total (those bytes are forwarded first)."""
        if downstream_bytes < 0:
            raise ValueError("downstream_bytes must not be negative")
        self._reset_limit = downstream_bytes
        for link in list(self._links):
            if not link.done and link.target.transport is not None and link.down.accepted >= downstream_bytes:
                link.down.stop_with_reset()

    def heal(self) -> None:
        """Plain forwarding (with the current latency) for data that arrives from now on."""
        was_blackholed = self._blackholed
        self._blackholed = False
        self._reset_limit = None
        for link in list(self._links):
            if was_blackholed and (link.orphan or link.damaged):
                link.reset()
            else:
                link.update_reading()

    # counters

    @property
    def connections(self) -> int:
        """Client connections accepted so far."""
        return self._connections

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return self._open_connections

    @property
    def bytes_up(self) -> int:
        """Bytes written to the target (client to target)."""
        return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes written to clients (target to client)."""
        return self._bytes_down

    async def wait_closed_connections(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until no client connection is open; TimeoutError after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._no_clients.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{self._open_connections} connections still open after {timeout} s") from None

    # bookkeeping for the links

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _client_opened(self, link: _Link) -> None:
        self._links.add(link)
        self._connections += 1
        self._open_connections += 1
        self._no_clients.clear()

    def _client_closed(self) -> None:
        self._open_connections -= 1
        if self._open_connections == 0:
            self._no_clients.set()

    def _transport_opened(self) -> None:
        self._open_transports += 1
        self._no_transports.clear()

    def _transport_closed(self) -> None:
        self._open_transports -= 1
        if self._open_transports == 0:
            self._no_transports.set()
