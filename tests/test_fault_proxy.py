"""The fault-injection TCP proxy (tests/fakes/proxy.py), between real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from fakes.proxy import FaultProxy

pytestmark = pytest.mark.timeout(5)

HOST = "127.0.0.1"
WAIT = 2.0
BLOCK = bytes(range(256)) * 256  # 64 KiB; a pattern, so a lost or reordered block shows


class Peer(asyncio.Protocol):
    """One end of a test connection: keeps what arrives (and when) and how the connection ended. As a
    target it may echo, or stream a large body with flow control."""

    def __init__(self, echo: bool = False, changed: asyncio.Event | None = None) -> None:
        self.echo = echo
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.arrivals: list[tuple[float, int]] = []  # (loop time, len(received) after the chunk)
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None
        self.write_paused = False
        self.sent = 0
        self._to_send = 0
        self._changed = changed if changed is not None else asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._changed.set()

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.arrivals.append((asyncio.get_running_loop().time(), len(self.received)))
        if self.echo:
            self.write(data)
        self._changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self._changed.set()
        return True  # stay open: the tests check that the other direction still works

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        self._changed.set()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._changed.set()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._changed.set()
        self._pump()

    # actions

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.sent += len(data)

    def stream(self, total: int) -> None:
        """Write `total` bytes of BLOCK pattern, as fast as the connection takes them."""
        self._to_send += total
        self._pump()

    def _pump(self) -> None:
        while self._to_send and not self.write_paused and self.transport is not None and not self.lost:
            n = min(self._to_send, len(BLOCK))
            self._to_send -= n
            self.write(BLOCK[:n])

    def reset(self) -> None:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # waiting

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"not {what} within {timeout} s (received {len(self.received)} bytes)") from None

    async def wait_bytes(self, count: int, timeout: float = WAIT) -> None:  # noqa: ASYNC109
        await self.until(lambda: len(self.received) >= count, f"{count} bytes received", timeout)

    async def wait_lost(self) -> None:
        await self.until(lambda: self.lost, "lost")

    async def wait_eof(self) -> None:
        await self.until(lambda: self.eof, "EOF received")

    def closed_by_peer(self) -> bool:
        return self.eof or self.lost

    def arrival(self, index: int) -> float:
        """When byte number `index` arrived."""
        return next(at for at, count in self.arrivals if count > index)


class Target:
    """A tiny TCP server on 127.0.0.1:0; each connection is a Peer, echoing by default."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.peers: list[Peer] = []
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(self._accept, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self) -> Peer:
        peer = Peer(echo=self.echo, changed=self._changed)
        self.peers.append(peer)
        return peer

    async def peer(self, index: int) -> Peer:
        """Connection number `index` (from 0), once it is made."""
        try:
            async with asyncio.timeout(WAIT):
                while len(self.peers) <= index or self.peers[index].transport is None:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"the target has {len(self.peers)} connections, not {index + 1}") from None
        return self.peers[index]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self.peers:
            if peer.transport is not None:
                peer.transport.abort()
        for peer in self.peers:
            if peer.transport is not None:
                await peer.wait_lost()
        await self._server.wait_closed()


async def open_client(port: int) -> Peer:
    _, peer = await asyncio.get_running_loop().create_connection(Peer, HOST, port)
    return peer


async def close_clients(clients: list[Peer]) -> None:
    for client in clients:
        if client.transport is not None:
            client.transport.abort()
    for client in clients:
        await client.wait_lost()


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    target = Target()
    await target.start()
    try:
        yield target
    finally:
        await target.close()


@pytest.fixture
async def proxy(target: Target) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(target.port) as proxy:
        yield proxy


@pytest.fixture
async def connect(proxy: FaultProxy) -> AsyncIterator[Callable[[], Awaitable[Peer]]]:
    """Opens client connections to the proxy; aborts them after the test."""
    clients: list[Peer] = []

    async def connect() -> Peer:
        client = await open_client(proxy.port)
        clients.append(client)
        return client

    yield connect
    await close_clients(clients)


async def test_forwards_both_ways_and_propagates_half_close(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    client = await connect()
    server = await target.peer(0)
    assert (proxy.connections, proxy.open_connections) == (1, 1)
    assert proxy.address == f"127.0.0.1:{proxy.port}"

    payload = b"hello" + os.urandom(1 << 20)  # big enough to fill socket buffers on the way
    client.write(payload)
    await client.wait_bytes(len(payload))
    assert server.received == payload
    assert client.received == payload  # the echo, back through the proxy
    assert proxy.bytes_up == proxy.bytes_down == len(payload)

    # The client half-closes: the target sees EOF and can still send.
    assert client.transport is not None
    client.transport.write_eof()
    await server.wait_eof()
    server.write(b"still here")
    await client.wait_bytes(len(payload) + 10)
    assert client.received.endswith(b"still here")
    assert not client.eof and not server.lost

    # Then the target closes: the client sees EOF and the proxy lets go of the connection.
    assert server.transport is not None
    server.transport.close()
    await client.wait_eof()
    await proxy.wait_closed_connections(WAIT)
    assert (proxy.connections, proxy.open_connections) == (1, 0)


async def test_latency_delays_every_chunk_and_keeps_order(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    loop = asyncio.get_running_loop()
    proxy.latency = 0.2
    client = await connect()
    server = await target.peer(0)

    sent_at: list[float] = []
    for i in range(5):
        sent_at.append(loop.time())
        client.write(b"%d" % i)
        await asyncio.sleep(0.05)
    await client.wait_bytes(5)
    assert server.received == client.received == b"01234"
    for i, at in enumerate(sent_at):
        # Chunks are delayed side by side, not one after another: each takes about the latency.
        assert 0.2 <= server.arrival(i) - at < 0.45
        assert 0.4 <= client.arrival(i) - at < 0.65  # the echo crosses the proxy twice

    # Lowering the latency does not let a later chunk overtake an earlier one.
    proxy.latency = 0.3
    start = loop.time()
    client.write(b"x")
    await asyncio.sleep(0.02)
    proxy.latency = 0
    client.write(b"y")
    await server.wait_bytes(7)
    assert server.received == b"01234xy"
    assert server.arrival(5) - start >= 0.3
    assert server.arrival(6) >= server.arrival(5)


def test_latency_must_be_finite_and_not_negative() -> None:
    proxy = FaultProxy(1)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="latency"):
            proxy.latency = bad
    proxy.latency = 0.5
    assert proxy.latency == 0.5


async def test_blackhole_drops_everything_and_closes_nothing(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    client = await connect()
    server = await target.peer(0)
    client.write(b"before")
    await client.wait_bytes(6)
    forwarded = (proxy.bytes_up, proxy.bytes_down)

    proxy.blackhole()
    client.write(b"lost on the way up")
    server.write(b"lost on the way down")
    late = await connect()  # accepted, but never connected through
    await asyncio.sleep(0.5)
    assert client.received == server.received == b"before"
    assert not (client.eof or client.lost or server.eof or server.lost or late.eof or late.lost)
    assert (proxy.bytes_up, proxy.bytes_down) == forwarded
    assert len(target.peers) == 1
    assert (proxy.connections, proxy.open_connections) == (2, 2)

    # Not even a close gets through.
    assert server.transport is not None
    server.transport.close()
    await server.wait_lost()
    await asyncio.sleep(0.3)
    assert not (client.eof or client.lost)
    assert proxy.open_connections == 2

    # When the path comes back, connections whose other end is gone (or never existed) are reset.
    proxy.heal()
    await client.wait_lost()
    await late.wait_lost()
    assert isinstance(client.lost_exc, ConnectionResetError)
    assert isinstance(late.lost_exc, ConnectionResetError)
    await proxy.wait_closed_connections(WAIT)


async def test_heal_restores_forwarding(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    client = await connect()
    server = await target.peer(0)
    proxy.blackhole()
    client.write(b"dropped")
    await asyncio.sleep(0.1)  # read by the proxy, and dropped

    proxy.heal()
    client.write(b"after")
    await client.wait_bytes(5)
    assert server.received == client.received == b"after"
    assert not (client.lost or server.lost)

    fresh = await connect()
    fresh.write(b"new")
    await fresh.wait_bytes(3)
    assert fresh.received == b"new"
    assert len(target.peers) == 2


async def test_reset_all_resets_both_sides_of_every_connection(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    clients = [await connect(), await connect()]
    servers = [await target.peer(0), await target.peer(1)]
    for client in clients:
        client.write(b"hi")
        await client.wait_bytes(2)

    proxy.reset_all()
    for peer in clients + servers:
        await peer.wait_lost()
        assert isinstance(peer.lost_exc, ConnectionResetError), peer.lost_exc
    await proxy.wait_closed_connections(WAIT)

    # A one-off: new connections work.
    again = await connect()
    again.write(b"again")
    await again.wait_bytes(5)
    assert again.received == b"again"


@pytest.mark.parametrize("latency", [0.0, 0.05])
async def test_reset_after_forwards_exactly_n_bytes_then_resets(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]], latency: float
) -> None:
    proxy.latency = latency
    proxy.reset_after(1000)
    client = await connect()
    server = await target.peer(0)
    payload = bytes(i % 251 for i in range(3000))
    for i in range(0, len(payload), 300):
        server.write(payload[i : i + 300])

    await client.wait_lost()
    assert client.received == payload[:1000]
    assert isinstance(client.lost_exc, ConnectionResetError), client.lost_exc
    await server.wait_lost()
    assert isinstance(server.lost_exc, ConnectionResetError), server.lost_exc
    assert proxy.bytes_down == 1000


async def test_reset_after_waits_until_a_slow_client_has_the_bytes(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    limit = 2 * 2**20  # more than the socket buffers on the way hold while the client is not reading
    proxy.reset_after(limit)
    client = await connect()
    assert client.transport is not None
    client.transport.pause_reading()
    server = await target.peer(0)
    server.stream(2 * limit)
    await asyncio.sleep(0.3)
    assert not client.lost

    # An RST sent now would throw away what the proxy's kernel still holds for the client.
    client.transport.resume_reading()
    await client.wait_lost()
    assert client.received == (BLOCK * (limit // len(BLOCK)))
    assert isinstance(client.lost_exc, ConnectionResetError), client.lost_exc


async def test_reset_after_counts_what_an_open_connection_already_forwarded(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    first, second = await connect(), await connect()
    servers = [await target.peer(0), await target.peer(1)]
    servers[0].write(b"a" * 600)
    servers[1].write(b"b" * 600)
    await first.wait_bytes(600)
    await second.wait_bytes(600)

    proxy.reset_after(1000)
    servers[0].write(b"c" * 600)
    await first.wait_lost()
    assert first.received == b"a" * 600 + b"c" * 400
    assert isinstance(first.lost_exc, ConnectionResetError)

    # Already past the new limit: reset at once.
    proxy.reset_after(500)
    await second.wait_lost()
    assert second.received == b"b" * 600
    assert isinstance(second.lost_exc, ConnectionResetError)
    await servers[1].wait_lost()


async def test_a_reset_on_one_side_closes_the_other(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    by_target, by_client = await connect(), await connect()
    servers = [await target.peer(0), await target.peer(1)]

    servers[0].reset()
    await by_target.wait_eof()
    by_client.reset()
    await servers[1].wait_eof()
    await proxy.wait_closed_connections(WAIT)


async def test_a_client_that_stops_reading_stops_the_target(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    total = 50 * 2**20
    client = await connect()
    assert client.transport is not None
    client.transport.pause_reading()
    server = await target.peer(0)
    server.stream(total)

    await server.until(lambda: server.write_paused, "paused")
    await asyncio.sleep(0.3)  # let the buffers on the way fill up
    stalled = (server.sent, proxy.bytes_down)
    await asyncio.sleep(0.3)
    assert server.write_paused
    assert (server.sent, proxy.bytes_down) == stalled
    assert proxy.bytes_down < 16 * 2**20
    assert server.sent < total // 2

    client.transport.resume_reading()
    await client.wait_bytes(total, timeout=3)
    assert server.sent == proxy.bytes_down == len(client.received) == total
    assert client.received == BLOCK * (total // len(BLOCK))


async def test_unreachable_target_resets_the_client() -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))  # bound but not listening: connections to it are refused
        port = sock.getsockname()[1]
        async with FaultProxy(port) as proxy:
            client = await open_client(proxy.port)
            try:
                await client.wait_lost()
                assert isinstance(client.lost_exc, ConnectionResetError), client.lost_exc
                await proxy.wait_closed_connections(WAIT)
            finally:
                await close_clients([client])


async def test_wait_closed_connections_times_out_while_one_is_open(
    proxy: FaultProxy, connect: Callable[[], Awaitable[Peer]]
) -> None:
    await connect()
    with pytest.raises(TimeoutError, match="1 connections still open"):
        await proxy.wait_closed_connections(0.05)


async def test_aclose_closes_everything(
    proxy: FaultProxy, target: Target, connect: Callable[[], Awaitable[Peer]]
) -> None:
    proxy.latency = 0.5
    clients = [await connect() for _ in range(3)]
    servers = [await target.peer(i) for i in range(3)]
    clients[0].write(b"in flight")  # waits in the latency queue
    proxy.blackhole()
    clients[1].write(b"dropped")
    proxy.heal()
    proxy.reset_after(10)
    servers[2].write(b"x" * 100)  # a reset queued behind its bytes
    await asyncio.sleep(0.05)

    await proxy.aclose()
    assert proxy.open_connections == 0
    assert asyncio.all_tasks() == {asyncio.current_task()}
    for peer in clients + servers:
        await peer.until(peer.closed_by_peer, "closed")
    assert servers[0].received == b""

    await proxy.aclose()  # idempotent
    with pytest.raises(ConnectionRefusedError):
        await open_client(proxy.port)
