"""The provider connections' HTTP/1.1 transport (service/providers/http1.py), against real sockets.

Each test serves scripted bytes from a raw asyncio server on 127.0.0.1, so that the framing, the
connection's fate and the timing are exactly what the test says; the vendor paths through the real
SDKs are tested in test_providers.py and test_faults.py.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx2
import pytest
import trustme
from fakes.openai import FakeOpenAI

from service.providers import http1
from service.providers.upstream import body_reader

pytestmark = pytest.mark.timeout(10)

HOST = "127.0.0.1"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Raw:
    """A raw TCP server on 127.0.0.1 running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Raw:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.writers.add(writer)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, HOST, 0, ssl=self.ssl_context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()

    def url(self, path: str = "/v1/x", scheme: str = "http") -> str:
        assert self.server is not None
        return f"{scheme}://{HOST}:{self.server.sockets[0].getsockname()[1]}{path}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body) off the connection; b"" once it closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), b"".join(e + b"\r\n" for e in extra)) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=http1.Transport(max_connections=4)) as c:
        yield c


async def read_all(response: httpx2.Response) -> bytes:
    read = body_reader(response)
    parts = []
    while data := await read():
        parts.append(data)
    return b"".join(parts)


async def test_kept_alive_connection_is_reused(client: httpx2.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(ok(b"hello"))

    async with Raw(handler) as server:
        for _ in range(3):
            response = await client.post(server.url(), content=b"{}")
            assert (response.status_code, response.content) == (200, b"hello")
        assert server.connections == 1


async def test_chunked_body_arrives_whole_and_in_order(client: httpx2.AsyncClient) -> None:
    pieces = [b"data: %d\n\n" % i for i in range(200)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(chunk(piece))
            if len(piece) % 3 == 0:
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await read_request(reader)

    async with Raw(handler) as server, client.stream("POST", server.url(), content=b"{}") as response:
        assert isinstance(response.extensions[http1.BODY], http1.Body)
        assert await read_all(response) == b"".join(pieces)


async def test_idle_connection_closed_by_the_server_is_not_reused(client: httpx2.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"one"))
        # The server's idle timeout: the connection is closed between requests.

    async with Raw(handler) as server:
        assert (await client.post(server.url(), content=b"{}")).content == b"one"
        await asyncio.sleep(0.05)
        assert (await client.post(server.url(), content=b"{}")).content == b"one"
        assert server.connections == 2


async def test_connection_closed_as_it_is_reused_is_retried_once_on_a_fresh_one(client: httpx2.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"one"))
        # Closes only when the next request is already on its way: the race of a kept-alive reuse.
        await read_request(reader)

    async with Raw(handler) as server:
        assert (await client.post(server.url(), content=b"{}")).content == b"one"
        assert (await client.post(server.url(), content=b"{}")).content == b"one"
        assert server.connections == 2


async def test_fresh_connection_closed_without_an_answer_is_an_error(client: httpx2.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with Raw(handler) as server:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.post(server.url(), content=b"{}")
        assert server.connections == 1


async def test_connection_broken_mid_body_is_an_error_never_an_end(client: httpx2.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))

    async with Raw(handler) as server, client.stream("POST", server.url(), content=b"{}") as response:
        read = body_reader(response)
        assert await read() == b"data: 1\n\n"
        with pytest.raises(httpx2.RemoteProtocolError):
            await read()


async def test_body_without_length_or_chunks_ends_with_the_connection(client: httpx2.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")

    async with Raw(handler) as server:
        async with client.stream("POST", server.url(), content=b"{}") as response:
            assert await read_all(response) == b"all of it"
        assert (await client.post(server.url(), content=b"{}")).content == b"all of it"
        assert server.connections == 2


async def test_informational_response_is_skipped(client: httpx2.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"final", b"X-Final: yes"))

    async with Raw(handler) as server:
        response = await client.post(server.url(), content=b"{}")
        assert (response.status_code, response.headers.get("link"), response.headers["x-final"]) == (200, None, "yes")
        assert response.content == b"final"


async def test_garbage_is_a_protocol_error(client: httpx2.AsyncClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await reader.read()

    async with Raw(handler) as server:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.post(server.url(), content=b"{}")


async def test_request_head_and_body_as_sent(client: httpx2.AsyncClient) -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(ok(b""))

    async with Raw(handler) as server:
        await client.post(server.url("/v1/chat?api-version=1"), json={"a": "é"}, headers={"x-test": "1"})
        authority = server.url("").split("//")[1].encode()
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat?api-version=1 HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert headers[b"host"] == authority
    assert headers[b"x-test"] == b"1"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert body == '{"a":"é"}'.encode()
    assert [line.lower().startswith(b"content-length") for line in lines].count(True) == 1


async def test_read_timeout_bounds_the_silence_while_waiting() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
        await reader.read()

    timeout = httpx2.Timeout(5.0, read=0.3)
    async with (
        Raw(handler) as server,
        httpx2.AsyncClient(transport=http1.Transport(max_connections=1)) as client,
        client.stream("POST", server.url(), content=b"{}", timeout=timeout) as response,
    ):
        read = body_reader(response)
        loop = asyncio.get_running_loop()
        # Not reading is no silence of the server's: the timeout runs only while somebody waits.
        await asyncio.sleep(0.5)
        assert await read() == b"data: 1\n\n"
        began = loop.time()
        with pytest.raises(httpx2.ReadTimeout):
            await read()
        assert 0.28 <= loop.time() - began < 1.5


async def test_a_body_nobody_reads_stops_the_socket_at_the_high_water_mark() -> None:
    # More than the kernel buffers on both sides hold (tcp_wmem's 4 MiB maximum, our small receive buffer).
    total = 16 * 1024 * 1024
    block = bytes(range(256)) * 64  # 16 KiB
    sent_when_stalled: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        sent = 0
        while sent < total:
            try:
                async with asyncio.timeout(0.3):
                    writer.write(block)
                    await writer.drain()
            except TimeoutError:
                sent_when_stalled.append(sent)
                await writer.drain()
            sent += len(block)

    async with (
        Raw(handler) as server,
        httpx2.AsyncClient(transport=http1.Transport(max_connections=1)) as client,
        client.stream("POST", server.url(), content=b"{}") as response,
    ):
        await asyncio.sleep(0.6)
        body = response.extensions[http1.BODY]
        held = body._connection._buffered
        assert held <= http1.BODY_HIGH_WATER + 256 * 1024
        data = await read_all(response)
    assert sent_when_stalled, "the server was never held back"
    assert sent_when_stalled[0] < total // 2
    assert data == block * (total // len(block))


async def test_pool_limit_waits_then_times_out_and_frees_its_slot() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(ok(b"x"))

    async with Raw(handler) as server, httpx2.AsyncClient(transport=http1.Transport(max_connections=1)) as client:
        held = await client.send(client.build_request("POST", server.url(), content=b"{}"), stream=True)
        with pytest.raises(httpx2.PoolTimeout):
            await client.post(server.url(), content=b"{}", timeout=httpx2.Timeout(5.0, pool=0.1))
        await held.aclose()
        assert (await client.post(server.url(), content=b"{}")).content == b"x"
        assert server.connections == 1


async def test_cancel_while_waiting_for_the_answer_closes_the_connection_and_frees_the_slot() -> None:
    arrived = asyncio.Event()
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()
        await reader.read()
        closed.set()

    transport = http1.Transport(max_connections=1)
    async with Raw(handler) as server, httpx2.AsyncClient(transport=transport) as client:
        task = asyncio.create_task(client.post(server.url(), content=b"{}"))
        await asyncio.wait_for(arrived.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 2)
        assert transport._in_use == 0


async def test_compressed_body_is_decoded_on_httpx2s_path(client: httpx2.AsyncClient) -> None:
    payload = b"data: compressed\n\n" * 50

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(gzip.compress(payload), b"Content-Encoding: gzip"))

    async with Raw(handler) as server, client.stream("POST", server.url(), content=b"{}") as response:
        assert await read_all(response) == payload


async def test_tls_with_a_trusted_and_an_untrusted_certificate() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server_context)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader):
            writer.write(ok(b"secret"))

    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with Raw(handler, server_context) as server:
        async with httpx2.AsyncClient(transport=http1.Transport(max_connections=2, ssl_context=trusting)) as client:
            assert (await client.post(server.url(scheme="https"), content=b"{}")).content == b"secret"
        # httpx2's default CA bundle does not know this CA.
        async with httpx2.AsyncClient(transport=http1.Transport(max_connections=2)) as client:
            with pytest.raises(httpx2.ConnectError):
                await client.post(server.url(scheme="https"), content=b"{}")


async def test_environment_proxy_keeps_httpx2s_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(ok(b"via proxy"))

    async with Raw(proxy) as server:
        monkeypatch.setenv("HTTP_PROXY", server.url(""))
        monkeypatch.setenv("NO_PROXY", "bypassed.example")
        assert http1.proxied("http://provider.example/v1")
        assert not http1.proxied("http://bypassed.example/v1")
        async with http1.http_client(httpx2.AsyncClient, "http://provider.example/v1", 4) as client:
            response = await client.post("http://provider.example/v1/chat", content=b"{}")
        assert response.content == b"via proxy"
        assert seen[0].startswith(b"POST http://provider.example/v1/chat HTTP/1.1")
        monkeypatch.delenv("HTTP_PROXY")
        assert not http1.proxied("http://provider.example/v1")


async def test_vendor_streams_reuse_one_connection(fake_openai: FakeOpenAI) -> None:
    from openai import DefaultAsyncHttpxClient

    async with http1.http_client(DefaultAsyncHttpxClient, fake_openai.base_url, 4) as client:
        for _ in range(3):
            async with client.stream(
                "POST",
                fake_openai.base_url + "/chat/completions",
                json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                headers={"authorization": f"Bearer {fake_openai.api_key}"},
            ) as response:
                assert response.status_code == 200
                assert (await read_all(response)).endswith(b"data: [DONE]\n\n")
    assert fake_openai.connections_opened == 1


async def test_a_large_body_arrives_whole_and_the_connection_is_reused(client: httpx2.AsyncClient) -> None:
    # Several write slices, read slowly: the writer must wait for room, not copy the rest.
    body = bytes(range(256)) * (3 * http1.WRITE_SLICE // 256 + 7)
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request := await read_request_slowly(reader):
            received.append(request)
            writer.write(ok(b"done"))

    async with Raw(handler) as server:
        for _ in range(2):
            response = await client.post(server.url(), content=body)
            assert response.status_code == 200 and response.content == b"done"
        assert server.connections == 1
    assert len(received) == 2 and all(r.endswith(b"\r\n\r\n" + body) for r in received)


async def read_request_slowly(reader: asyncio.StreamReader) -> bytes:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    lengths = (line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    length = int(next(lengths))
    parts = []
    while length:
        part = await reader.read(min(length, 64 * 1024))
        assert part, "the client closed mid-body"
        parts.append(part)
        length -= len(part)
        await asyncio.sleep(0.001)
    return head + b"".join(parts)


async def test_the_write_buffer_stays_small_while_a_large_body_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server reads nothing for a while: once the kernel's socket buffers are full, the
    # client's transport must hold about one slice of the body, not all the rest of it.
    body = b"x" * (64 * http1.WRITE_SLICE)
    transports: list[asyncio.Transport] = []
    made = http1._Connection.connection_made

    def record(self: http1._Connection, transport: asyncio.BaseTransport) -> None:
        made(self, transport)
        assert isinstance(transport, asyncio.Transport)
        transports.append(transport)

    monkeypatch.setattr(http1._Connection, "connection_made", record)
    reading = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reading.wait()
        assert await read_request(reader)
        writer.write(ok(b"done"))

    async with Raw(handler) as server, httpx2.AsyncClient(transport=http1.Transport(max_connections=1)) as c:
        post = asyncio.create_task(c.post(server.url(), content=body))
        buffered = []
        for _ in range(50):
            await asyncio.sleep(0.01)
            buffered += [t.get_write_buffer_size() for t in transports]
        reading.set()
        response = await post
    assert response.content == b"done"
    assert buffered and 0 < max(buffered) <= 2 * http1.WRITE_SLICE, max(buffered)


def served_twice_or_more() -> tuple[Handler, list[asyncio.Event]]:
    """A handler answering every request on its connection; one event per connection, set when
    the client closed it."""
    closed: list[asyncio.Event] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gone = asyncio.Event()
        closed.append(gone)
        while await read_request(reader):
            writer.write(ok(b"hi"))
        gone.set()

    return handler, closed


async def test_a_connection_idle_past_the_keepalive_expiry_is_closed_not_reused() -> None:
    handler, closed = served_twice_or_more()
    transport = http1.Transport(max_connections=4, keepalive_expiry=0.15)
    async with Raw(handler) as server, httpx2.AsyncClient(transport=transport) as client:
        await client.post(server.url(), content=b"{}")
        await asyncio.sleep(0.05)
        await client.post(server.url(), content=b"{}")
        assert server.connections == 1  # idle less than the expiry: reused
        # Past the expiry the pool closes it by itself, with no request to notice.
        await asyncio.wait_for(closed[0].wait(), 1.0)
        await client.post(server.url(), content=b"{}")
        assert server.connections == 2


async def test_a_connection_older_than_its_lifetime_is_not_reused() -> None:
    handler, closed = served_twice_or_more()
    transport = http1.Transport(max_connections=4, max_connection_age=0.2)
    async with Raw(handler) as server, httpx2.AsyncClient(transport=transport) as client:
        for _ in range(3):
            await client.post(server.url(), content=b"{}")
        assert server.connections == 1
        await asyncio.sleep(0.25)
        # Old enough: the next request closes it and opens a fresh one, which is then reused.
        await client.post(server.url(), content=b"{}")
        await client.post(server.url(), content=b"{}")
        assert server.connections == 2
        await asyncio.wait_for(closed[0].wait(), 1.0)


class Lookups:
    """A resolver hook: answers `provider.test` with the addresses in `answers`, counts calls."""

    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)
        self.calls = 0

    async def __call__(self, host: str, port: int) -> http1.Addresses:
        assert host == "provider.test"
        self.calls += 1
        at = self.ports[min(self.calls, len(self.ports)) - 1]
        return [(2, 1, 6, "", (HOST, at))]  # AF_INET, SOCK_STREAM, TCP


async def test_dns_is_resolved_once_per_host_and_again_after_its_ttl() -> None:
    handler, _ = served_twice_or_more()
    async with Raw(handler) as server:
        port = server.url().split(":")[2].split("/")[0]
        url = f"http://provider.test:{port}/v1/x"
        lookups = Lookups(int(port))
        # No reuse at all (every request a new connection), so every request connects.
        transport = http1.Transport(max_connections=4, max_connection_age=0, dns_ttl=0.2, resolver=lookups)
        async with httpx2.AsyncClient(transport=transport) as client:
            for _ in range(3):
                assert (await client.post(url, content=b"{}")).content == b"hi"
            assert (server.connections, lookups.calls) == (3, 1)
            await asyncio.sleep(0.25)
            await client.post(url, content=b"{}")
            assert (server.connections, lookups.calls) == (4, 2)


async def test_a_cached_address_that_refuses_is_looked_up_afresh() -> None:
    handler, _ = served_twice_or_more()
    async with Raw(handler) as old, Raw(handler) as new:
        old_port, new_port = (int(s.url().split(":")[2].split("/")[0]) for s in (old, new))
        lookups = Lookups(old_port, new_port)
        transport = http1.Transport(max_connections=4, max_connection_age=0, resolver=lookups)
        async with httpx2.AsyncClient(transport=transport) as client:
            url = f"http://provider.test:{old_port}/v1/x"
            await client.post(url, content=b"{}")
            # The provider moved: the old address refuses connections now.
            await old.__aexit__(None, None, None)
            assert old.server is not None
            await old.server.wait_closed()
            assert (await client.post(url, content=b"{}")).content == b"hi"
            assert (old.connections, new.connections, lookups.calls) == (1, 1, 2)
            # The fresh answer is cached in turn.
            await client.post(url, content=b"{}")
            assert (new.connections, lookups.calls) == (2, 2)


async def test_a_failed_fresh_lookup_is_a_connect_error() -> None:
    async def nothing(host: str, port: int) -> http1.Addresses:
        raise OSError("no such host")

    transport = http1.Transport(max_connections=4, resolver=nothing)
    async with httpx2.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx2.ConnectError):
            await client.post("http://provider.test:1/v1/x", content=b"{}")
