"""The HTTP door: aiohttp's server in the gRPC server's event loop, over the same gateway.

Endpoints (JSON in, JSON or server-sent events out):
  POST /v1/chat/completions        OpenAI-compatible, streaming (SSE) or not; ephemeral
  GET  /v1/models                  the routes, OpenAI's list shape
  POST /v1/streams                 native: a GenerateRequest in proto3 JSON; the answer is SSE, one
                                   event per contract message (`id:` = sequence, `event:` = its case,
                                   data = the message in proto3 JSON). With a resume_window it is
                                   durable: the generation goes on if the connection breaks.
  GET  /v1/streams/{id}            resume a durable stream after `Last-Event-ID` (or `?after=`)
  GET  /v1/streams/{id}/events     the long-poll read: `?after=&wait=&max_messages=`, JSON
  POST /v1/streams/{id}/cancel     cancel a durable stream
  GET  /                           a page that streams an answer live (page/index.html, app.js)
The resume token travels as `?token=` (EventSource cannot set headers) or `X-Resume-Token`.

Errors before a stream starts are an HTTP status with a JSON body (service.api.http.errors);
after it started, a terminal error event. A client that goes away cancels its handler
(aiohttp's handler_cancellation), which closes an ephemeral stream's provider at once; a durable
stream's generation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from google.protobuf import json_format

from service.api.http.errors import error_body, http_status, retry_after_header
from service.api.http.openai import ChunkRenderer, Completion, chat_request, model_list
from service.callers import ANONYMOUS
from service.config import ServerConfig
from service.durable import DEFAULT_POLL_MESSAGES, MAX_POLL_MESSAGES, Follower, failure_of
from service.errors import ErrorCode, GatewayError, invalid_request
from service.gateway import EphemeralStream, Gateway, log_fields
from service.observe import METRICS_CONTENT_TYPE
from service.wire import error_event
from tokenwire.v1 import generation_pb2 as pb

log = logging.getLogger("tokenwire.http")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    # No cache and no proxy buffering anywhere on the way: every event is flushed as it is written.
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_HEARTBEAT_COMMENT = b": heartbeat\n\n"
_CORS_HEADERS = "authorization, content-type, last-event-id, x-request-id, x-resume-token"
_PAGE_FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript")}
# The page's scripts and styles are its own files: nothing inline, nothing from elsewhere.
_PAGE_POLICY = "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _HttpProblem(Exception):
    """A request the door refuses before it means anything (its size, type or timing)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": "invalid_request_error", "param": None, "code": self.code}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json")


def error_response(err: GatewayError, stream_id: str = "", last_sequence: int | None = None) -> web.Response:
    headers = retry_after_header(err)
    if err.code is ErrorCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="tokenwire"'
    return web.Response(
        status=http_status(err),
        body=orjson.dumps(error_body(err, stream_id=stream_id, last_sequence=last_sequence)),
        content_type="application/json",
        headers=headers,
    )


def _authorization(request: web.Request) -> list[str]:
    # aiohttp's headers match names in any case; every copy of the header counts.
    return request.headers.getall("Authorization", [])


def event_bytes(message: pb.GenerateResponse) -> bytes:
    """One native SSE event: `id:` the sequence, `event:` the oneof case, data the proto3 JSON."""
    case = message.WhichOneof("event") or "unknown"
    data = orjson.dumps(json_format.MessageToDict(message))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (message.sequence, case.encode(), data)


class _Writer:
    """Writes one SSE response; cuts off a reader that has taken nothing for `timeout` seconds.

    aiohttp waits for the socket to drain once its buffer passes 64 KiB, so a slow reader holds
    the writer (and, through the relay's bounded buffer, the provider) rather than growing our
    memory; a reader that takes nothing at all is disconnected here, which ends its handler the
    way a client's own disconnect does. The check runs on a timer, so a write costs two stores.
    """

    __slots__ = ("_busy", "_seen", "_started", "_timeout", "_timer", "request", "response", "stalled")

    def __init__(self, request: web.Request, response: web.StreamResponse, timeout: float) -> None:
        self.request = request
        self.response = response
        self._timeout = timeout
        self._busy = False
        self._started = 0
        self._seen = -1
        self.stalled = False
        self._timer = asyncio.get_running_loop().call_later(timeout, self._check)

    async def send(self, data: bytes) -> None:
        self._started += 1
        self._busy = True
        await self.response.write(data)
        self._busy = False

    def _check(self) -> None:
        if self._busy and self._started == self._seen:
            # The same write has waited a whole period: the reader is not reading.
            self.stalled = True
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            return
        self._seen = self._started
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._check)

    def close(self) -> None:
        self._timer.cancel()


class HttpDoor:
    def __init__(self, gateway: Gateway, config: ServerConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.origins = frozenset(filter(None, (o.strip() for o in config.http_cors_origins.split(","))))
        # The body may be larger than the request it becomes (JSON spends more bytes than
        # protobuf); the request's own limit is checked on the GenerateRequest by validation.
        self.max_body_bytes = 2 * config.max_request_bytes
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        app.on_response_prepare.append(self._cors_headers)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/streams", self.create_stream)
        app.router.add_get("/v1/streams/{stream_id}", self.resume_stream)
        app.router.add_get("/v1/streams/{stream_id}/events", self.poll_stream)
        app.router.add_post("/v1/streams/{stream_id}/cancel", self.cancel_stream)
        app.router.add_get("/healthz", self.health)
        if config.metrics_listen == "http" and gateway.observer.metrics is not None:
            app.router.add_get("/metrics", self.metrics)
        for path in _PAGE_FILES:
            app.router.add_get(path, self.page)
        app.router.add_route("OPTIONS", "/{tail:.*}", self.preflight)
        self.app = app
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._pages = {
            path: (resources.files(__package__).joinpath("page", name).read_bytes(), kind)
            for path, (name, kind) in _PAGE_FILES.items()
        }

    @property
    def address(self) -> str:
        host = self.config.http_listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        host, _, port = self.config.http_listen.rpartition(":")
        runner = self.runner = web.AppRunner(
            self.app,
            # A client that disconnects cancels its handler: the ephemeral stream's provider is
            # closed at once, as on the gRPC door.
            handler_cancellation=True,
            access_log=None,
            # Also bounds a request head that never completes (slow-loris): aiohttp closes a
            # connection that has no request in progress when this runs out.
            keepalive_timeout=self.config.http_idle_timeout_seconds,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=self.config.workers > 1)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def stop(self, grace: float) -> None:
        """Closes the port and ends what is still open after `grace` seconds."""
        if self.runner is not None:
            self.runner._kwargs["shutdown_timeout"] = grace
            await self.runner.cleanup()

    # -- plumbing -------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own refusals (unknown path, wrong method) in the door's JSON error shape."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _HttpProblem(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason).response()

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and origin in self.origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After, X-Request-Id"
            response.headers["Vary"] = "Origin"

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is None or origin not in self.origins:
            return _HttpProblem(403, "origin_not_allowed", "this origin may not call this server").response()
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": _CORS_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )

    async def _json(self, request: web.Request) -> bytes:
        """The request body, checked for type, size and time before anything reads it as JSON."""
        if request.content_type != "application/json":
            raise _HttpProblem(415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise _HttpProblem(
                413, "request_too_large", f"the body is over this server's limit of {self.max_body_bytes} bytes"
            )
        try:
            async with asyncio.timeout(self.config.http_body_timeout_seconds):
                return await request.read()
        except TimeoutError:
            raise _HttpProblem(408, "request_timeout", "the request body did not arrive in time") from None
        except web.HTTPRequestEntityTooLarge:
            raise _HttpProblem(
                413, "request_too_large", f"the body is over this server's limit of {self.max_body_bytes} bytes"
            ) from None

    @staticmethod
    def _parse(data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise invalid_request("body", "is not valid JSON") from None

    @staticmethod
    def _header_bytes(request: web.Request) -> int:
        # Counted as gRPC counts metadata, so that one limit means the same on both doors.
        return sum(len(k) + len(v) + 32 for k, v in request.raw_headers)

    async def _sse(self, request: web.Request, stream_id: str = "") -> _Writer:
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        if stream_id:
            response.headers["X-Request-Id"] = stream_id
        await response.prepare(request)
        return _Writer(request, response, self.config.http_write_timeout_seconds)

    # -- OpenAI-compatible ----------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        try:
            caller = self.gateway.authenticate(_authorization(request))
        except GatewayError as err:
            return error_response(err)
        return web.json_response(model_list(self.gateway.models(caller)), dumps=lambda v: orjson.dumps(v).decode())

    async def metrics(self, request: web.Request) -> web.Response:
        metrics = self.gateway.observer.metrics
        assert metrics is not None
        return web.Response(body=metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        received_at = time.monotonic()
        create_time = datetime.now(UTC)
        gateway = self.gateway
        given = request.headers.get("X-Request-Id", "")
        stream_id = gateway.stream_id(given)
        model, labels = "", ""
        stream: EphemeralStream | None = None
        writer: _Writer | None = None
        outcome = "OK"
        caller = ANONYMOUS
        try:
            try:
                caller = gateway.authenticate(_authorization(request))
                chat = chat_request(self._parse(await self._json(request)), given)
                model, labels = log_fields(chat.request)
                route, generation = gateway.admissible(
                    chat.request,
                    caller=caller,
                    size=None,
                    header_bytes=self._header_bytes(request),
                    stream_id=stream_id,
                    deadline=None,
                )
                del chat.request.messages[:]  # the validated copy is what goes on
                stream = gateway.ephemeral(
                    route,
                    generation,
                    received_at=received_at,
                    create_time=create_time,
                    caller=caller,
                    carrier=gateway.carrier(request.headers),
                )
                completion_id = "chatcmpl-" + stream_id
                async with stream as messages:
                    # The first message (Start) decides between an HTTP error status and a stream.
                    first = await anext(messages)
                    if not chat.stream:
                        return await self._complete(messages, stream, Completion(completion_id, route.name), stream_id)
                    writer = await self._sse(request, stream_id)
                    renderer = ChunkRenderer(completion_id, route.name, chat.include_usage)
                    del first
                    outcome = await self._chunks(writer, messages, stream, renderer)
                    return writer.response
            except asyncio.CancelledError:
                outcome = "WRITE_TIMEOUT (the client stopped reading)" if writer and writer.stalled else "CANCELLED"
                raise
        except _HttpProblem as problem:
            outcome = problem.code.upper()
            return problem.response()
        except GatewayError as err:
            outcome = err.code.value
            return error_response(err, stream_id)
        except ConnectionError as gone:
            # The client left while a write was under way: nobody to tell, and no bug of ours.
            outcome = f"CALL_ENDED ({type(gone).__name__} while writing)"
            return writer.response if writer is not None else web.Response(status=499)
        except Exception as exc:
            internal = gateway.internal(exc, stream_id)
            outcome = internal.code.value
            if writer is None:
                return error_response(internal, stream_id)
            # The stream had started: its last event says what became of it.
            with contextlib.suppress(Exception):
                await writer.send(ChunkRenderer.error(error_body(internal, stream_id=stream_id)))
            return writer.response
        finally:
            if writer is not None:
                writer.close()
            gateway.log_outcome(
                model,
                labels,
                stream_id,
                outcome,
                stream.sequencer if stream is not None else None,
                received_at,
                door=" door=http",
                stream=stream,
                caller=caller,
            )

    async def _chunks(
        self,
        writer: _Writer,
        messages: AsyncGenerator[pb.GenerateResponse, None],
        stream: EphemeralStream,
        renderer: ChunkRenderer,
    ) -> str:
        send = writer.send
        await send(renderer.start())
        async for message in messages:
            case = message.WhichOneof("event")
            if case == "text_delta":
                await send(renderer.text(message.text_delta.text))
            elif case == "tool_call_delta":
                await send(renderer.tool_call(message.tool_call_delta))
            elif case == "reasoning_delta":
                await send(renderer.reasoning(message.reasoning_delta.text))
            elif case == "heartbeat":
                # OpenAI's format has no heartbeat: an SSE comment, which every reader skips.
                await send(_HEARTBEAT_COMMENT)
            elif case == "finish":
                await send(renderer.finish(message.finish))
            elif case == "error":
                failure = stream.failure
                assert failure is not None
                await send(
                    ChunkRenderer.error(
                        error_body(failure, stream_id=stream.stream_id, last_sequence=message.error.last_sequence)
                    )
                )
        await writer.response.write_eof()
        failure = stream.failure
        return failure.code.value if failure is not None else "OK"

    @staticmethod
    async def _complete(
        messages: AsyncIterator[pb.GenerateResponse], stream: EphemeralStream, completion: Completion, stream_id: str
    ) -> web.Response:
        async for message in messages:
            case = message.WhichOneof("event")
            if case == "finish":
                return web.Response(body=orjson.dumps(completion.body(message.finish)), content_type="application/json")
            if case == "error":
                failure = stream.failure
                assert failure is not None
                # Nothing was sent yet: the status can still say what happened.
                return error_response(failure, stream_id, message.error.last_sequence)
            completion.add(message)
        raise AssertionError("a stream ends with its terminal event")

    # -- native ---------------------------------------------------------------------------------

    async def create_stream(self, request: web.Request) -> web.StreamResponse:
        received_at = time.monotonic()
        create_time = datetime.now(UTC)
        gateway = self.gateway
        stream_id = ""
        model, labels = "", ""
        stream: EphemeralStream | None = None
        writer: _Writer | None = None
        outcome = "OK"
        caller = ANONYMOUS
        durable = False
        try:
            try:
                caller = gateway.authenticate(_authorization(request))
                data = await self._json(request)
                message = pb.GenerateRequest()
                try:
                    json_format.Parse(data, message, ignore_unknown_fields=True)
                except json_format.ParseError:
                    raise invalid_request("body", "is not a tokenwire.v1.GenerateRequest in proto3 JSON") from None
                if not message.request_id:
                    message.request_id = request.headers.get("X-Request-Id", "")
                stream_id = gateway.stream_id(message.request_id)
                model, labels = log_fields(message)
                window = gateway.durable.window(message)
                route, generation = gateway.admissible(
                    message,
                    caller=caller,
                    size=None,
                    header_bytes=self._header_bytes(request),
                    stream_id=stream_id,
                    deadline=None,
                )
                carrier = gateway.carrier(request.headers)
                if window is not None:
                    follower = await gateway.start_durable(
                        message,
                        route,
                        generation,
                        caller=caller,
                        carrier=carrier,
                        window=window,
                        received_at=received_at,
                        create_time=create_time,
                    )
                    durable = True
                    outcome, response = await self._follow(request, follower)
                    return response
                del message
                stream = gateway.ephemeral(
                    route, generation, received_at=received_at, create_time=create_time, caller=caller, carrier=carrier
                )
                async with stream as messages:
                    first = await anext(messages)
                    writer = await self._sse(request, stream_id)
                    await writer.send(event_bytes(first))
                    async for item in messages:
                        await writer.send(event_bytes(item))
                    await writer.response.write_eof()
                failure = stream.failure
                outcome = failure.code.value if failure is not None else "OK"
                return writer.response
            except asyncio.CancelledError:
                outcome = "WRITE_TIMEOUT (the client stopped reading)" if writer and writer.stalled else "CANCELLED"
                raise
        except _HttpProblem as problem:
            outcome = problem.code.upper()
            return problem.response()
        except GatewayError as err:
            outcome = err.code.value
            return error_response(err, stream_id)
        except ConnectionError as gone:
            outcome = f"CALL_ENDED ({type(gone).__name__} while writing)"
            return writer.response if writer is not None else web.Response(status=499)
        except Exception as exc:
            internal = gateway.internal(exc, stream_id)
            outcome = internal.code.value
            if writer is None:
                return error_response(internal, stream_id)
            return writer.response
        finally:
            if writer is not None:
                writer.close()
            gateway.log_outcome(
                model,
                labels,
                stream_id,
                outcome,
                stream.sequencer if stream is not None else None,
                received_at,
                door=" door=http",
                stream=stream,
                caller=caller,
                durable=durable,
            )

    async def _follow(self, request: web.Request, follower: Follower) -> tuple[str, web.StreamResponse]:
        """A durable stream's payloads after the follower's cursor, as native SSE events.

        A cursor already at the terminal event gets 204 No Content: the stream has nothing more,
        and an EventSource stops reconnecting on a 204.
        """
        writer: _Writer | None = None
        try:
            async with contextlib.aclosing(follower.batches()) as batches:
                first = await anext(batches, None)
                if first is None:
                    return "OK (nothing after the cursor)", web.Response(status=204)
                writer = await self._sse(request, follower.stream_id)
                for payload in first:
                    await writer.send(event_bytes(pb.GenerateResponse.FromString(payload)))
                async for batch in batches:
                    for payload in batch:
                        await writer.send(event_bytes(pb.GenerateResponse.FromString(payload)))
                await writer.response.write_eof()
        except asyncio.CancelledError:
            # The reader went away; the generation goes on (it is durable).
            raise
        except GatewayError as err:
            if writer is None:
                raise
            # A journal that failed under a started stream: say why this response ends, in an event
            # with no `id:` — it is no message of the stream (whose next one may still come), so the
            # reader's Last-Event-ID stays at the last message it has and its reconnect resumes there.
            body = {"error": json_format.MessageToDict(error_event(err, follower.after))}
            with contextlib.suppress(Exception):
                await writer.send(b"event: interrupted\ndata: %s\n\n" % orjson.dumps(body))
            return err.code.value, writer.response
        finally:
            if writer is not None:
                writer.close()
        failure = failure_of(follower.terminal) if follower.terminal is not None else None
        return (failure.code.value if failure is not None else "OK"), writer.response

    def _capability(self, request: web.Request) -> tuple[str, str]:
        token = request.query.get("token") or request.headers.get("X-Resume-Token") or ""
        return request.match_info["stream_id"], token

    @staticmethod
    def _cursor(value: str | None, name: str) -> int:
        if value is None or value == "":
            return 0
        if not value.isdigit() or len(value) > 20:
            raise invalid_request(name, "must be a sequence number (a non-negative integer)")
        return int(value)

    async def resume_stream(self, request: web.Request) -> web.StreamResponse:
        stream_id, token = self._capability(request)
        try:
            last = request.headers.get("Last-Event-ID")
            after = (
                self._cursor(last, "Last-Event-ID")
                if last is not None
                else self._cursor(request.query.get("after"), "after")
            )
            caller = self.gateway.authenticate(_authorization(request))
            follower = await self.gateway.durable.resume(stream_id, token, after, caller.id)
            _, response = await self._follow(request, follower)
            return response
        except GatewayError as err:
            return error_response(err, stream_id)
        except Exception as exc:
            return error_response(self.gateway.internal(exc, stream_id), stream_id)

    async def poll_stream(self, request: web.Request) -> web.Response:
        stream_id, token = self._capability(request)
        try:
            caller = self.gateway.authenticate(_authorization(request))
            after = self._cursor(request.query.get("after"), "after")
            limit = self._cursor(request.query.get("max_messages"), "max_messages") or DEFAULT_POLL_MESSAGES
            if limit > MAX_POLL_MESSAGES:
                raise invalid_request("max_messages", f"must be at most {MAX_POLL_MESSAGES}")
            try:
                wait = float(request.query.get("wait", "0"))
            except ValueError:
                raise invalid_request("wait", "must be a number of seconds") from None
            if not 0 <= wait < float("inf"):
                raise invalid_request("wait", "must not be negative")
            result = await self.gateway.durable.poll(stream_id, token, after, wait, limit, caller.id)
        except GatewayError as err:
            return error_response(err, stream_id)
        except Exception as exc:
            return error_response(self.gateway.internal(exc, stream_id), stream_id)
        answer = pb.PollResponse(
            messages=[pb.GenerateResponse.FromString(p) for p in result.payloads],
            next_after_sequence=result.next_after,
            terminal=result.terminal,
            state=result.state,
        )
        # Every field, `terminal: false` included: a poller decides on it.
        body = json_format.MessageToDict(answer, always_print_fields_with_no_presence=True)
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def cancel_stream(self, request: web.Request) -> web.Response:
        stream_id, token = self._capability(request)
        try:
            caller = self.gateway.authenticate(_authorization(request))
            state = await self.gateway.durable.cancel(stream_id, token, caller.id)
        except GatewayError as err:
            return error_response(err, stream_id)
        except Exception as exc:
            return error_response(self.gateway.internal(exc, stream_id), stream_id)
        body = json_format.MessageToDict(pb.CancelResponse(state=state))
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    # -- the rest -------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.gateway.supervisor.draining:
            return error_response(GatewayError(ErrorCode.SERVER_SHUTTING_DOWN, "the server is shutting down"))
        return web.json_response({"status": "SERVING"})

    async def page(self, request: web.Request) -> web.Response:
        body, kind = self._pages[request.path]
        return web.Response(
            body=body,
            content_type=kind,
            charset="utf-8",
            headers={"Cache-Control": "no-cache", "Content-Security-Policy": _PAGE_POLICY},
        )
