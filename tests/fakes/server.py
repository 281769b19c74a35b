"""The HTTP/1.1 core shared by the fake providers: a small asyncio server on 127.0.0.1.

Each reply is rendered to bytes before its first byte is written (`Plan`): streaming then only writes
pre-built HTTP chunks, sleeping where the script asks. The connection keeps reading while a response
is written, so a client that leaves is noticed at once (`eof_received` / `connection_lost`), even
during a pause between frames.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import email.utils
import enum
import secrets
import socket
import ssl
import string
import struct
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, unquote

import orjson

from .replies import Reply, ResetReply, StatusReply, StreamReply

HOST = "127.0.0.1"
MAX_HEAD_BYTES = 64 * 1024
STOP_TIMEOUT = 1.0
TERMINATOR = b"0\r\n\r\n"
_REASONS = {529: "Site Overloaded"}
_ALNUM = string.ascii_letters + string.digits


@dataclass
class RecordedRequest:
    """One request as the fake received it, and what became of its response."""

    method: str
    path: str  # without the query
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased; repeated headers joined with ", "
    body: Any  # the parsed JSON body, or None (no body, or not JSON)
    received_at: float  # time.monotonic() when the whole request had arrived
    disconnected_at: float | None = None  # when the client left while the response was still being written
    completed: bool = False  # the whole reply (faults included) was written before the client left
    status: int = 0  # the HTTP status sent; 0 when none was (ResetReply)
    bytes_sent: int = 0  # response bytes written so far; writing pauses while 64 KiB wait unsent


@dataclass(frozen=True, slots=True)
class Frame:
    """One pre-rendered SSE frame. `delta`: a scripted piece (text, reasoning or tool arguments);
    `finish`: part of the vendor's end marker (finish chunk, usage, [DONE] / message_delta, message_stop)."""

    data: bytes
    delta: bool = False
    finish: bool = False


@dataclass(frozen=True, slots=True)
class RenderedStream:
    """A stream reply in a vendor's format: the normal frames, plus the frames that faults insert."""

    frames: Sequence[Frame]
    error_frame: bytes
    malformed_frame: bytes


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a renderer may use from the request."""

    body: dict[str, Any]
    params: Mapping[str, str]  # from the route, e.g. an Azure deployment
    request_id: str


class Ending(enum.Enum):
    KEEP = "keep"  # the response ended cleanly; the connection may serve another request
    CLOSE = "close"  # close the connection (FIN) after the last write
    RESET = "reset"  # reset the connection (RST) after the last write has left


@dataclass(frozen=True, slots=True)
class Plan:
    """A response as writes: (seconds to wait first, bytes); then how the connection ends."""

    status: int
    steps: tuple[tuple[float, bytes], ...]
    ending: Ending = Ending.KEEP


def random_id(length: int) -> str:
    """Letters and digits, as in the vendors' ids."""
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def response_head(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = _REASONS.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def merge_headers(base: Sequence[tuple[str, str]], extra: Mapping[str, str]) -> list[tuple[str, str]]:
    """`base` with the names in `extra` replaced (case-insensitively) by `extra`'s values."""
    replaced = {name.lower() for name in extra}
    return [(n, v) for n, v in base if n.lower() not in replaced] + list(extra.items())


def fault_position(frames: Sequence[Frame], after: int) -> int:
    """Where a fault goes: before the first delta (after=0), right after delta number `after`, or, when
    the stream has no more than `after` deltas, right before the end marker."""
    deltas = [i for i, frame in enumerate(frames) if frame.delta]
    if after < len(deltas):
        return deltas[after - 1] + 1 if after > 0 else deltas[0]
    return next((i for i, frame in enumerate(frames) if frame.finish), len(frames))


def plan_stream(status: int, head: bytes, reply: StreamReply, rendered: RenderedStream) -> Plan:
    """The writes of a stream reply: frames grouped `events_per_write` to an HTTP chunk, with the
    script's pacing and fault. All bytes are built here, none while streaming."""
    frames = list(rendered.frames)
    if reply.rewrite is not None:
        rewrite = reply.rewrite
        frames = [Frame(data, f.delta, f.finish) for i, f in enumerate(frames) if (data := rewrite(i, f.data))]
    ending = Ending.KEEP
    terminator = TERMINATOR
    truncated: Frame | None = None
    fault = reply.fault
    if fault is not None:
        pos = fault_position(frames, reply.fault_after)
        if fault == "malformed":
            frames.insert(pos, Frame(rendered.malformed_frame))
        elif fault == "error_event":
            frames = [*frames[:pos], Frame(rendered.error_frame)]
        elif fault == "eof":
            frames = frames[:pos]
        else:
            terminator = b""
            if fault == "truncated_chunk":
                truncated = frames[pos] if pos < len(frames) else Frame(rendered.error_frame)
                ending = Ending.CLOSE
            else:
                ending = Ending.RESET
            frames = frames[:pos]

    steps: list[tuple[float, bytes]] = []
    pending: list[bytes] = []
    delay = max(reply.first_delay, 0.0)
    interval = max(reply.interval, 0.0)
    seen_delta = False
    for frame in frames:
        if frame.delta:
            if seen_delta:
                delay += interval
            seen_delta = True
        pending.append(frame.data)
        if len(pending) >= reply.events_per_write:
            steps.append((delay, http_chunk(b"".join(pending))))
            pending.clear()
            delay = 0.0
    if pending:
        steps.append((delay, http_chunk(b"".join(pending))))
        delay = 0.0
    if truncated is not None:
        if truncated.delta and seen_delta:
            delay += interval
        whole = http_chunk(truncated.data)
        # The size line and a part of the data: the body ends inside this chunk.
        cut = whole.index(b"\r\n") + 2 + max(len(truncated.data) // 2, 1)
        steps.append((delay, whole[:cut]))
    elif fault == "stall":
        steps.append((max(reply.stall_seconds, 0.0), b""))

    if steps and steps[0][0] <= 0:
        steps[0] = (0.0, head + steps[0][1])
    else:
        steps.insert(0, (0.0, head))
    if terminator:
        last_delay, last = steps[-1]
        steps[-1] = (last_delay, last + terminator)
    return Plan(status, tuple(steps), ending)


class _BadRequest(Exception):
    pass


class _Connection(asyncio.Protocol):
    """One client connection: buffers what arrives, notices when the client goes, and lets the
    handler task wait for data, for the write buffer to drain, or for a pause to pass."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.gone = False
        self.write_paused = False
        self.active: RecordedRequest | None = None
        self.task: asyncio.Task[None] | None = None
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._sleep_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)
        self.task = self.loop.create_task(self.server._serve(self))
        self.server._tasks.add(self.task)
        self.task.add_done_callback(self.server._tasks.discard)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        _wake(self._data_waiter)

    def eof_received(self) -> bool:
        self._mark_gone()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_gone()
        self.server._connections.discard(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        _wake(self._drain_waiter)

    def _mark_gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        record = self.active
        if record is not None and record.disconnected_at is None:
            record.disconnected_at = time.monotonic()
            self.server._notify()
        for waiter in (self._data_waiter, self._drain_waiter, self._sleep_waiter):
            _wake(waiter)

    # for the handler task

    async def wait_data(self) -> None:
        self._data_waiter = self.loop.create_future()
        try:
            await self._data_waiter
        finally:
            self._data_waiter = None

    async def drain(self) -> bool:
        """Wait while the transport's buffer is over its high-water mark. False: the client left."""
        while self.write_paused and not self.gone:
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        return not self.gone

    async def pause(self, seconds: float) -> bool:
        """Sleep, but wake at once when the client leaves. False: the client left."""
        if self.gone:
            return False
        waiter = self._sleep_waiter = self.loop.create_future()
        handle = self.loop.call_later(seconds, _wake, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._sleep_waiter = None
        return not self.gone

    async def flush(self) -> bool:
        """Wait until everything written has been handed to the kernel. False: the client left."""
        assert self.transport is not None
        while not self.gone and self.transport.get_write_buffer_size() > 0:
            await self.pause(0.001)
        return not self.gone

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        """Close cleanly (FIN) once the written bytes are sent; not a disconnect by the client."""
        self.active = None
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Reset the connection: SO_LINGER (1, 0), then close, so the kernel sends RST."""
        self.active = None
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    async def read_request(self) -> _Incoming | None:
        """The next request, or None when the client closed the connection first."""
        buf = self.buffer
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise _BadRequest("request head too large")
            if self.gone:
                return None
            await self.wait_data()
        lines = bytes(buf[:end]).decode("latin-1").lstrip("\r\n").split("\r\n")
        del buf[: end + 4]
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            raise _BadRequest("bad request line") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest("bad header line")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                raise _BadRequest("bad content-length") from None
            body = await self._read_exact(length)
        if body is None:
            return None
        return _Incoming(method.upper(), target, version.strip(), headers, body, time.monotonic())

    async def _read_exact(self, n: int) -> bytes | None:
        buf = self.buffer
        while len(buf) < n:
            if self.gone:
                return None
            await self.wait_data()
        data = bytes(buf[:n])
        del buf[:n]
        return data

    async def _read_line(self) -> bytes | None:
        buf = self.buffer
        while (end := buf.find(b"\r\n")) < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise _BadRequest("chunk line too long")
            if self.gone:
                return None
            await self.wait_data()
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line

    async def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        while True:
            line = await self._read_line()
            if line is None:
                return None
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:
                while (trailer := await self._read_line()) != b"":
                    if trailer is None:
                        return None
                return b"".join(parts)
            data = await self._read_exact(size + 2)
            if data is None:
                return None
            parts.append(data[:-2])


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


@dataclass(frozen=True, slots=True)
class _Incoming:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes
    received_at: float


class FakeServer(abc.ABC):
    """A fake provider: an HTTP/1.1 server on 127.0.0.1 that answers each request with the next
    enqueued reply (or `default`) in its vendor's wire format, and records every request."""

    request_id_header: ClassVar[str] = "x-request-id"
    stream_content_type: ClassVar[str] = "text/event-stream; charset=utf-8"
    # A TLS context to serve with (https://), or None for plain HTTP.
    ssl_context: ssl.SSLContext | None = None

    def __init__(self, api_key: str, *, default: Reply | None = None) -> None:
        self.api_key = api_key
        self.default: Reply = default if default is not None else StreamReply()
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # exceptions raised while serving (bugs in the fake)
        self.rejections: list[str] = []  # bodies refused with a 400 for their shape (see _rejection)
        self.connections_opened = 0
        self._queue: deque[Reply] = deque()
        self._server: asyncio.Server | None = None
        self._port = 0
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    # lifecycle

    async def start(self) -> Self:
        if self._server is not None:
            return self
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), HOST, 0, backlog=1024, ssl=self.ssl_context)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening, abort every connection and end the handler tasks (bounded in time)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.active = None
            if conn.transport is not None:
                conn.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), STOP_TIMEOUT)
        await asyncio.sleep(0)  # let the aborted transports run connection_lost and close their sockets

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the fake is not started")
        return self._port

    @property
    def open_connections(self) -> int:
        """Client connections open right now (kept-alive ones included)."""
        return len(self._connections)

    @property
    def origin(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{HOST}:{self.port}"

    @property
    @abc.abstractmethod
    def base_url(self) -> str: ...

    # scripting

    def enqueue(self, *replies: Reply) -> None:
        """Replies served in order, one per request that reaches the endpoint; then `default`."""
        for reply in replies:
            if not isinstance(reply, StreamReply | StatusReply | ResetReply):
                raise TypeError(f"not a reply: {reply!r}")
        self._queue.extend(replies)

    @property
    def pending(self) -> int:
        """How many enqueued replies are not served yet."""
        return len(self._queue)

    async def wait_disconnected(self, index: int = -1, timeout: float = 2.0) -> float:  # noqa: ASYNC109
        """Wait until request `index` has `disconnected_at`, and return it. TimeoutError after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(IndexError):
                at = self.requests[index].disconnected_at
                if at is not None:
                    return at
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"request {index} was not disconnected within {timeout} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_requests(self, count: int, timeout: float = 2.0) -> list[RecordedRequest]:  # noqa: ASYNC109
        """Wait until at least `count` requests were recorded. TimeoutError after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.requests) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{len(self.requests)} requests, not {count}, within {timeout} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.requests

    def _notify(self) -> None:
        self._changed.set()

    # vendor specifics

    @abc.abstractmethod
    def _route(self, method: str, path: str) -> dict[str, str] | None:
        """The route's parameters when (method, path) is an endpoint of the vendor, else None."""

    @abc.abstractmethod
    def _authorized(self, headers: Mapping[str, str]) -> bool: ...

    @abc.abstractmethod
    def _new_request_id(self) -> str: ...

    @abc.abstractmethod
    def _error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        """The vendor's JSON error body; an empty `error_type` means the natural one for `status`."""

    @abc.abstractmethod
    def _unauthorized_message(self) -> str: ...

    @abc.abstractmethod
    def _not_found_message(self, method: str, path: str) -> str: ...

    def _rejection(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        """Why the vendor would refuse this body with a 400 (a shape it does not take), or None."""
        return None

    def _streams(self, params: Mapping[str, str], body: dict[str, Any]) -> bool:
        """Whether the request asks for a streamed answer (a `"stream": true` body unless the vendor's
        endpoint says so)."""
        return body.get("stream") is True

    @abc.abstractmethod
    def _render_stream(self, reply: StreamReply, ctx: RequestContext) -> RenderedStream: ...

    @abc.abstractmethod
    def _render_message(self, reply: StreamReply, ctx: RequestContext) -> bytes:
        """The non-streaming JSON body for a request without `"stream": true`."""

    # serving

    def _headers(self, request_id: str, content_type: str, keep_alive: bool) -> list[tuple[str, str]]:
        return [
            ("date", email.utils.formatdate(usegmt=True)),
            ("content-type", content_type),
            ("connection", "keep-alive" if keep_alive else "close"),
            (self.request_id_header, request_id),
        ]

    def _json_plan(
        self,
        status: int,
        body: bytes,
        request_id: str,
        keep_alive: bool,
        extra: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> Plan:
        headers = self._headers(request_id, "application/json", keep_alive)
        headers.append(("content-length", str(len(body))))
        if extra:
            headers = merge_headers(headers, extra)
        head = response_head(status, headers)
        if delay > 0:
            return Plan(status, ((0.0, head), (delay, body)))
        return Plan(status, ((0.0, head + body),))

    def _error_plan(self, status: int, error_type: str, message: str, keep_alive: bool, **kw: Any) -> Plan:
        request_id = self._new_request_id()
        body = self._error_body(status, error_type, message, request_id)
        return self._json_plan(status, body, request_id, keep_alive, **kw)

    def _refusal(
        self, params: Mapping[str, str], body: dict[str, Any], headers: Mapping[str, str]
    ) -> tuple[int, str] | None:
        """The status and message the vendor refuses this request with, before any script runs."""
        problem = self._rejection(body, headers)
        return None if problem is None else (400, problem)

    def _admit(
        self, incoming: _Incoming, path: str, body: Any, keep_alive: bool
    ) -> tuple[dict[str, str], dict[str, Any], StreamReply] | Plan | ResetReply:
        """The vendor's checks (route, key, body, `_refusal`), then the script's next reply: the
        request's route params, its body and that reply, or the plan that answers it instead."""
        params = self._route(incoming.method, path)
        if params is None:
            return self._error_plan(404, "", self._not_found_message(incoming.method, path), keep_alive)
        if not self._authorized(incoming.headers):
            return self._error_plan(401, "", self._unauthorized_message(), keep_alive)
        if not isinstance(body, dict):
            return self._error_plan(400, "", "The request body is not a JSON object.", keep_alive)
        refused = self._refusal(params, body, incoming.headers)
        if refused is not None:
            self.rejections.append(refused[1])
            return self._error_plan(refused[0], "", refused[1], keep_alive)
        reply = self._queue.popleft() if self._queue else self.default
        if isinstance(reply, ResetReply):
            return reply
        if isinstance(reply, StatusReply):
            return self._error_plan(reply.status, reply.error_type, reply.message, keep_alive, extra=reply.headers)
        return params, body, reply

    def _plan(self, incoming: _Incoming, path: str, body: Any, keep_alive: bool) -> Plan | ResetReply:
        admitted = self._admit(incoming, path, body, keep_alive)
        if not isinstance(admitted, tuple):
            return admitted
        params, body, reply = admitted
        request_id = self._new_request_id()
        ctx = RequestContext(body, params, request_id)
        if self._streams(params, body):
            headers = self._headers(request_id, self.stream_content_type, keep_alive)
            headers += [("transfer-encoding", "chunked"), ("cache-control", "no-cache")]
            return plan_stream(200, response_head(200, headers), reply, self._render_stream(reply, ctx))
        return self._json_plan(200, self._render_message(reply, ctx), request_id, keep_alive, delay=reply.first_delay)

    async def _serve(self, conn: _Connection) -> None:
        self.connections_opened += 1
        try:
            while True:
                try:
                    incoming = await conn.read_request()
                except _BadRequest as exc:
                    msg = str(exc).encode()
                    conn.write(response_head(400, [("content-length", str(len(msg))), ("connection", "close")]) + msg)
                    conn.close()
                    return
                if incoming is None:
                    conn.close()
                    return
                if not await self._respond(conn, incoming):
                    conn.close()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.errors.append(exc)
            conn.reset()

    async def _respond(self, conn: _Connection, incoming: _Incoming) -> bool:
        """Answer one request; True when the connection can serve another."""
        target, _, query = incoming.target.partition("?")
        path = unquote(target)
        try:
            body: Any = orjson.loads(incoming.body) if incoming.body else None
        except orjson.JSONDecodeError:
            body = None
        record = RecordedRequest(
            method=incoming.method,
            path=path,
            query=dict(parse_qsl(query, keep_blank_values=True)),
            headers=incoming.headers,
            body=body,
            received_at=incoming.received_at,
        )
        self.requests.append(record)
        self._notify()
        connection = incoming.headers.get("connection", "").lower()
        keep_alive = incoming.version == "HTTP/1.1" and "close" not in connection
        plan = self._plan(incoming, path, body, keep_alive)
        if isinstance(plan, ResetReply):
            conn.reset()
            return False
        record.status = plan.status
        return await self._execute(conn, record, plan) and keep_alive

    async def _execute(self, conn: _Connection, record: RecordedRequest, plan: Plan) -> bool:
        conn.active = record
        try:
            for delay, data in plan.steps:
                if delay > 0 and not await conn.pause(delay):
                    return False
                if conn.gone:
                    return False
                if data:
                    conn.write(data)
                    record.bytes_sent += len(data)
                    if conn.write_paused and not await conn.drain():
                        return False
            if plan.ending is Ending.RESET:
                if not await conn.flush():
                    return False
                record.completed = True
                conn.reset()
                return False
            record.completed = True
            if plan.ending is Ending.CLOSE:
                conn.close()
                return False
            return True
        finally:
            conn.active = None
