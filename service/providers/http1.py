"""The provider connections: a small HTTP/1.1 client built for long streamed response bodies.

The vendor SDKs still build each route's request and raise their own errors; this is the transport
under their httpx2 client, and the one a route's request templates write their heads to
(`Transport.send_head`). It exists for what a token stream costs per chunk. httpx2's own transport
reads a body through httpcore2, h11 and anyio, with a cancel scope and a timeout set up around
every socket read, and the relay paid for it on every chunk. Here a chunk costs one
`data_received` callback into llhttp (httptools, C), and the reader wakes up once for whatever
arrived since it last looked:

- `Transport` is an `httpx2.AsyncBaseTransport` with a keep-alive connection pool per origin, at
  most `max_connections` connections open, TLS from httpx2's own default context (its CA bundle and
  `SSL_CERT_FILE`), and httpx2's exception classes, so that errors read as they always did.
- A response's body is a `Body`. Its `read()` returns every byte that arrived since the last call
  (b"" once the body is complete), waiting only when there is none. The body is held to at most
  `BODY_HIGH_WATER` bytes: past that the socket is not read, so TCP slows the provider down
  rather than our memory filling, and the socket's own receive buffer is kept small too.
- The read timeout bounds the provider's silence while somebody waits for it. It is one timer per
  connection, moved only when it fires, not set up again on every read.
- What a maintained client keeps: a pooled connection idle longer than `keepalive_expiry` seconds
  is closed (servers and load balancers drop idle ones on their own schedule, and a connection
  they dropped silently costs a failed reuse); a connection older than `max_connection_age` is not
  reused, so that a route follows its provider's DNS and load balancing instead of pinning one
  backend for the life of the process; and a host's addresses are resolved once and reused for
  `dns_ttl` seconds, looked up afresh when that expires or when none of them connects.

Only what the adapters need is here: no HTTP/2, no proxies (a route whose URL an environment proxy
applies to keeps httpx2's own transport; see `http_client`), no request body streaming (the SDKs
send JSON that is already in memory).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import httptools
import httpx2

log = logging.getLogger("tokenwire.http")

# Response body bytes held unread before the socket is no longer read.
BODY_HIGH_WATER = 64 * 1024
# The provider socket's kernel receive buffer: a caller that stops reading stops its provider
# here, instead of the kernel taking in megabytes of the answer on its behalf. Token streams
# need a few kilobytes per second; this still carries megabytes per second at any sane RTT.
SOCKET_RECEIVE_BUFFER = 256 * 1024
# Key of a response's `Body` in `httpx2.Response.extensions`.
BODY = "tokenwire.body"
# A request body larger than this is written a slice at a time, at the pace the socket takes it.
# asyncio's transport copies whatever the socket does not take at once into a buffer of its own:
# written whole, a prompt of a few MiB was copied once more there (and once more before that, to
# join it to the request's head).
WRITE_SLICE = 256 * 1024

# (scheme, host, port) of a pool's connections.
Origin = tuple[bytes, bytes, int]
# getaddrinfo's answer: (family, type, proto, canonname, sockaddr) per address.
Addresses = Sequence[tuple[int, int, int, str, tuple[Any, ...]]]
# Looks a host up: (host, port) -> addresses. The loop's getaddrinfo unless a test gives its own.
Resolver = Callable[[str, int], Awaitable[Addresses]]

# Defaults a route may change (options.keepalive_expiry_seconds, max_connection_age_seconds,
# dns_ttl_seconds). Idle expiry below the 60 s most load balancers and nginx (75 s) keep an idle
# connection; a lifetime of minutes, so a provider's DNS change is followed within one.
KEEPALIVE_EXPIRY = 30.0
MAX_CONNECTION_AGE = 300.0
DNS_TTL = 60.0


class Transport(httpx2.AsyncBaseTransport):
    """httpx2 transport: a keep-alive HTTP/1.1 connection pool; see the module's docstring."""

    def __init__(
        self,
        *,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        max_connection_age: float = MAX_CONNECTION_AGE,
        dns_ttl: float = DNS_TTL,
        resolver: Resolver | None = None,
    ) -> None:
        self._keepalive_expiry = keepalive_expiry
        self._max_connection_age = max_connection_age
        self._dns_ttl = dns_ttl
        self._resolver = resolver
        # host, port -> (when the answer expires, the addresses)
        self._addresses: dict[tuple[str, int], tuple[float, Addresses]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._max_connections = max_connections
        # Connections handed to a request and not yet released (a slot each).
        self._in_use = 0
        self._idle: dict[Origin, collections.deque[_Connection]] = {}
        self._idle_count = 0
        self._ssl_context = ssl_context
        self._closed = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._closed:
            raise httpx2.ConnectError("the client is closed", request=request)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme.decode(errors='replace')!r}")
        content = await request.aread()
        head = _request_head(request, len(content))
        return await self._exchange(origin_of(url), head, content, timeouts, request)

    async def send_head(
        self, origin: Origin, head: bytes, content: bytes, timeouts: Mapping[str, float | None]
    ) -> httpx2.Response:
        """Sends a request whose head the caller made whole (request line, headers, Content-Length,
        the blank line) and its body; the response as `handle_async_request` gives it, its body
        unread. For a route's request template (`service.providers.upstream.RequestTemplate`):
        no httpx2 request is built. The errors are httpx2's, without a request attached."""
        if self._closed:
            raise httpx2.ConnectError("the client is closed")
        return await self._exchange(origin, head, content, timeouts, None)

    async def _exchange(
        self,
        origin: Origin,
        head: bytes,
        content: bytes,
        timeouts: Mapping[str, float | None],
        request: httpx2.Request | None,
    ) -> httpx2.Response:
        if self._slots.locked():
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx2.PoolTimeout("every connection of the pool is in use", request=request) from None
        else:
            # A free slot is taken at once: no timeout (a timer scheduled and cancelled) needed.
            await self._slots.acquire()
        self._in_use += 1
        try:
            # A kept-alive connection the server closed at the very moment it was reused fails
            # before it answers anything: that request never reached the server, so it is sent
            # once more, on a fresh connection.
            while True:
                connection = self._reuse(origin)
                fresh = connection is None
                if connection is None:
                    connection = await self._connect(origin, timeouts.get("connect"), request)
                try:
                    return await connection.send(self, head, content, timeouts, request)
                except _NotAnswered:
                    if fresh:
                        raise httpx2.RemoteProtocolError(
                            "the server closed the connection without answering", request=request
                        ) from None
        except BaseException:
            self._in_use -= 1
            self._slots.release()
            raise

    def _reuse(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            connection.stop_idle_timer()
            if connection.reusable and self._fresh(connection, now):
                return connection
            connection.close()
        return None

    def _fresh(self, connection: _Connection, now: float) -> bool:
        """Young enough to carry another request, and not idle past the keep-alive expiry."""
        return (
            now - connection.created < self._max_connection_age
            and now - connection.idle_since <= self._keepalive_expiry
        )

    def _expire(self, connection: _Connection) -> None:
        """An idle connection's keep-alive expiry came: out of the pool, closed."""
        idle = self._idle.get(connection.origin)
        if idle is not None:
            try:
                idle.remove(connection)
            except ValueError:
                return  # taken for a request meanwhile
            self._idle_count -= 1
        connection.close()

    def _cached(self, host: str, port: int) -> Addresses | None:
        """The host's addresses as last looked up, until their TTL passes."""
        cached = self._addresses.get((host, port))
        if cached is None or time.monotonic() >= cached[0]:
            return None
        return cached[1]

    async def _resolve(self, host: str, port: int) -> Addresses:
        """A fresh lookup of the host's addresses, kept for `dns_ttl` seconds."""
        now = time.monotonic()
        if self._resolver is not None:
            found = await self._resolver(host, port)
        else:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not found:
            raise OSError(f"no address for {host}")
        if self._dns_ttl > 0:
            self._addresses[(host, port)] = (now + self._dns_ttl, found)
        return found

    async def _connect(
        self, origin: Origin, connect_timeout: float | None, request: httpx2.Request | None
    ) -> _Connection:
        if self._idle_count and self._idle_count + self._in_use > self._max_connections:
            self._close_one_idle()
        scheme, raw_host, port = origin
        tls = None
        if scheme == b"https":
            tls = self._ssl_context or _default_ssl_context()
        try:
            host = raw_host.decode("ascii")
            async with asyncio.timeout(connect_timeout):
                if _is_ip(host):
                    connection = await self._open(host, port, tls, host)
                elif (cached := self._cached(host, port)) is None:
                    connection = await self._open_any(await self._resolve(host, port), tls, host)
                else:
                    try:
                        connection = await self._open_any(cached, tls, host)
                    except OSError:
                        # The cached addresses may be what changed: one fresh lookup, and
                        # whatever it gives is the answer.
                        connection = await self._open_any(await self._resolve(host, port), tls, host)
        except TimeoutError:
            raise httpx2.ConnectTimeout("timed out connecting", request=request) from None
        except (OSError, ssl.SSLError, UnicodeError) as exc:
            raise httpx2.ConnectError(f"could not connect: {type(exc).__name__}", request=request) from None
        connection.origin = origin
        return connection

    async def _open(self, address: str, port: int, tls: ssl.SSLContext | None, host: str) -> _Connection:
        _, connection = await asyncio.get_running_loop().create_connection(
            _Connection, address, port, ssl=tls, server_hostname=host if tls else None
        )
        return connection

    async def _open_any(self, addresses: Addresses, tls: ssl.SSLContext | None, host: str) -> _Connection:
        """A connection to the first of `addresses` that takes one; the last failure otherwise."""
        failure: OSError | None = None
        for _family, _type, _proto, _name, sockaddr in addresses:
            try:
                return await self._open(sockaddr[0], sockaddr[1], tls, host)
            except OSError as exc:
                failure = exc
        assert failure is not None
        raise failure

    def _close_one_idle(self) -> None:
        for idle in self._idle.values():
            if idle:
                connection = idle.popleft()
                connection.stop_idle_timer()
                connection.close()
                self._idle_count -= 1
                return

    def _release(self, connection: _Connection, *, keep: bool) -> None:
        """A response is over: its connection goes back to the pool, or is closed."""
        self._in_use -= 1
        self._slots.release()
        now = time.monotonic()
        if keep and not self._closed and connection.reusable and now - connection.created < self._max_connection_age:
            connection.idle_since = now
            connection.idle_timer = connection.loop.call_later(self._keepalive_expiry, self._expire, connection)
            self._idle.setdefault(connection.origin, collections.deque()).append(connection)
            self._idle_count += 1
        else:
            connection.close()

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                connection = idle.pop()
                connection.stop_idle_timer()
                connection.close()
        self._idle_count = 0


class _NotAnswered(Exception):
    """A reused connection was closed before any of the response arrived."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; it carries one request and its response at a time."""

    def __init__(self) -> None:
        self.origin: Origin = (b"", b"", 0)
        self.transport: asyncio.Transport | None = None
        self._loop = self.loop = asyncio.get_running_loop()
        # When it was opened, when it last went back to the pool, and its keep-alive expiry there.
        self.created = self.idle_since = time.monotonic()
        self.idle_timer: asyncio.TimerHandle | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._pool: Transport | None = None
        self._request: httpx2.Request | None = None
        self._body: Body | None = None
        # The response's head: (status, headers) once it arrived.
        self._head: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._any_response = False
        # An informational (1xx) response is being read: the real one follows it.
        self._informational = False
        self._complete = False
        self._keep_alive = False
        self._lost = False
        self._failure: Exception | None = None
        # Chunks of the body not yet read, and their total size.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        # Set while the transport's write buffer is over its high-water mark.
        self._writable: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The read timeout: silence allowed while a waiter waits; one timer, moved lazily.
        self._read_timeout: float | None = None
        self._last_data = 0.0
        self._wait_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- the pool's side

    @property
    def reusable(self) -> bool:
        transport = self.transport
        return not self._lost and self._failure is None and transport is not None and not transport.is_closing()

    def stop_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def close(self) -> None:
        self._stop_timer()
        self.stop_idle_timer()
        if self.transport is not None:
            self.transport.close()

    async def send(
        self,
        pool: Transport,
        head: bytes,
        content: bytes,
        timeouts: Mapping[str, float | None],
        request: httpx2.Request | None,
    ) -> httpx2.Response:
        assert self.transport is not None
        self._pool, self._request = pool, request
        self._read_timeout = timeouts.get("read")
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._reason = [], b""
        self._any_response = self._complete = self._informational = self._keep_alive = False
        self._chunks, self._buffered = [], 0
        answered = self._head = self._loop.create_future()
        try:
            if len(content) <= WRITE_SLICE:
                self.transport.write(head + content)
            else:
                self.transport.write(head)
                await self._write_body(memoryview(content), timeouts.get("write"))
            self._last_data = self._loop.time()
            await self._wait(answered)
        except BaseException:
            self._head = None
            self.close()
            raise
        self._head = None
        status = self._parser.get_status_code()
        body = self._body = Body(self)
        return httpx2.Response(
            status,
            headers=self._headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": self._reason, BODY: body},
        )

    async def _write_body(self, body: memoryview, write_timeout: float | None) -> None:
        """Writes `body` in slices, waiting whenever the transport's buffer is full.

        Writing stops early only when the connection fails; the failure is raised after it. A
        server that answers before it has read the whole body still gets all of it, so that
        the connection stays in step for the next request.
        """
        transport = self.transport
        assert transport is not None
        for start in range(0, len(body), WRITE_SLICE):
            if transport.is_closing() or self._failure is not None:
                break
            transport.write(body[start : start + WRITE_SLICE])
            writable = self._writable
            if writable is not None:
                try:
                    async with asyncio.timeout(write_timeout):
                        await writable
                except TimeoutError:
                    raise httpx2.WriteTimeout(
                        "the server took no part of the request body within the write timeout", request=self._request
                    ) from None
        # Nobody waited for the answer while the body was written: a failure meanwhile is only
        # recorded (the connection closed before answering, say).
        if self._failure is not None:
            raise self._failure

    async def _wait(self, waiter: asyncio.Future[None]) -> None:
        """Waits for `waiter`; fails with ReadTimeout after `read_timeout` seconds of silence."""
        self._waiter = waiter
        self._wait_since = self._loop.time()
        if self._read_timeout is not None and self._timer is None:
            self._timer = self._loop.call_at(self._wait_since + self._read_timeout, self._check_silence)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_silence(self) -> None:
        self._timer = None
        timeout = self._read_timeout
        if self._waiter is None or timeout is None:
            return  # nobody waits: the timer is set again by the next wait
        silent_since = max(self._last_data, self._wait_since)
        due = silent_since + timeout
        if self._loop.time() >= due:
            self._fail(httpx2.ReadTimeout("the server sent nothing within the read timeout", request=self._request))
        else:
            self._timer = self._loop.call_at(due, self._check_silence)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(failure)
        if self.transport is not None:
            self.transport.close()

    # -- the body's side

    def take(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        while True:
            if self._chunks:
                return self.take()
            if self._complete:
                return b""
            if self._failure is not None:
                raise self._failure
            await self._wait(self._loop.create_future())

    def finished(self, *, keep: bool) -> None:
        """The response is done with: back to the pool if it was read whole, else closed."""
        pool, self._pool = self._pool, None
        self._body = None
        self._request = None
        self._stop_timer()
        self._chunks, self._buffered = [], 0
        if pool is not None:
            pool._release(self, keep=keep and self._complete and self._keep_alive)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not an isinstance check: uvloop's TCPTransport does not subclass
        # asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RECEIVE_BUFFER)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        if self._pool is None or self._complete:
            # Bytes nobody asked for (on an idle connection, or past the response's end): this
            # connection can no longer be trusted to frame the next response.
            self._lost = True
            self.close()
            return
        self._any_response = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(httpx2.RemoteProtocolError("the server's response is not valid HTTP/1.1", request=self._request))
        except httptools.HttpParserUpgrade:
            self._fail(httpx2.RemoteProtocolError("the server switched protocols", request=self._request))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost says what it meant

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._stop_timer()
        # A body writer waiting for room stops (the transport is closing); the answer, or the
        # failure below, says what happened.
        self.resume_writing()
        if self._pool is None or self._complete:
            return
        if not self._any_response:
            failure: Exception = _NotAnswered()
        elif self._head is None and self._close_delimited():
            # A body with neither a length nor chunks ends where the connection does.
            self._complete = True
            self._wake()
            return
        elif exc is None:
            failure = httpx2.RemoteProtocolError("the server closed the connection mid-response", request=self._request)
        else:
            failure = httpx2.ReadError(f"the connection broke: {type(exc).__name__}", request=self._request)
        if self._failure is None:
            self._failure = failure
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._failure)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def _close_delimited(self) -> bool:
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    # -- httptools callbacks

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._parser.get_status_code() < 200:
            self._informational = True
            self._headers, self._reason = [], b""
            return
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered >= BODY_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        # Asked now: once the message is over, llhttp has forgotten it.
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True
        self._stop_timer()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        self._wake()


class Body(httpx2.AsyncByteStream):
    """A response body as its bytes arrive: `read()` for the relay, iteration for httpx2."""

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection

    async def read(self) -> bytes:
        """Every byte that arrived since the last call, waiting for some; b"" at the body's end.

        Raises httpx2's ReadTimeout, ReadError or RemoteProtocolError.
        """
        connection = self._connection
        if connection is None:
            return b""
        return await connection.read()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finished(keep=True)


def origin_of(url: httpx2.URL) -> Origin:
    scheme = url.raw_scheme
    return (scheme, url.raw_host, url.port or (443 if scheme == b"https" else 80))


def _request_head(request: httpx2.Request, length: int) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if name.lower() not in (b"content-length", b"transfer-encoding"):
            lines.append(name + b": " + value)
    if length or request.method not in ("GET", "HEAD"):
        lines.append(b"Content-Length: %d" % length)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host.strip("[]"))
    except OSError:
        return False
    return True


_SSL_CONTEXT: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    """httpx2's default verifying context (its CA bundle, SSL_CERT_FILE / SSL_CERT_DIR), made once."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = httpx2.create_ssl_context()
    return _SSL_CONTEXT


def proxied(url: str) -> bool:
    """Whether an environment proxy (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY; NO_PROXY) applies to `url`."""
    proxies = urllib.request.getproxies_environment()
    parsed = httpx2.URL(url)
    if not (proxies.get(parsed.scheme) or proxies.get("all")):
        return False
    # The same NO_PROXY rules urllib applies; the function is real but missing from the type stubs.
    return not urllib.request.proxy_bypass_environment(parsed.host, proxies)  # type: ignore[attr-defined]


def http_client(
    client_class: type[httpx2.AsyncClient],
    base_url: str,
    max_connections: int,
    *,
    keepalive_expiry: float = KEEPALIVE_EXPIRY,
    max_connection_age: float = MAX_CONNECTION_AGE,
    dns_ttl: float = DNS_TTL,
    transport: Transport | None = None,
    ssl_context: ssl.SSLContext | None = None,
    also: tuple[str, ...] = (),
) -> httpx2.AsyncClient:
    """The httpx2 client a route's SDK sends through: on this module's transport (`transport`, or
    a new one), unless an environment proxy applies to the route's URL or to one of the others it
    reaches (`also`), which httpx2's own transport then goes through (deciding per host, NO_PROXY
    included). `ssl_context`: the TLS trust to verify with, on either transport (default: the
    system's)."""
    limits = httpx2.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=keepalive_expiry
    )
    if transport is None:
        if any(proxied(url) for url in (base_url, *also)):
            log.info("an environment proxy applies to %s: its requests go through httpx2's transport", base_url)
            if ssl_context is not None:
                return client_class(limits=limits, verify=ssl_context)
            return client_class(limits=limits)
        transport = Transport(
            max_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
            max_connection_age=max_connection_age,
            dns_ttl=dns_ttl,
            ssl_context=ssl_context,
        )
    return client_class(limits=limits, transport=transport)
