"""Builds the grpc.aio server: the generation service, health, reflection, limits, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api.http import HttpDoor
from service.callers import KeyRing, KeysError
from service.config import Config, ConfigError
from service.gateway import Gateway
from service.generation import GenerationService, Received, Undecodable
from service.journal import open_journal
from service.observe import METRICS_CONTENT_TYPE, Metrics, Observer
from service.quotas import open_quotas
from service.reflection import enable_reflection
from service.routing import Router
from tokenwire.v1 import generation_pb2 as pb

log = logging.getLogger("tokenwire.server")

_TOO_DEEP = Undecodable(too_deep=True)
_UNDECODABLE = Undecodable()
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
_M = TypeVar("_M", bound=Message)

# grpc's Cython layer logs to this logger; the record below is the one it writes for metadata it
# cannot decode as UTF-8 (grpc_string.pyx.pxi's `_decode`, which then decodes it as Latin-1).
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
_INVALID_ENCODING = "Invalid encoding on %s"


class CallerHeaderNoise(logging.Filter):
    """Demotes grpc's ERROR for a request header that is not UTF-8 to a one-line DEBUG record.

    Any caller can send such a header (gRPC clients refuse to; a raw HTTP/2 client need not), and
    grpc answers the call normally after logging an ERROR with a traceback for it, once when it
    dispatches the call and once more whenever the handler reads the metadata: an operator who
    alerts on ERROR could be flooded by anyone who can connect. It is the caller's mistake and
    nothing the operator can act on. Only that exact record is touched, by its message, its
    logger and its UnicodeDecodeError; every other grpc error keeps its level.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not (
            record.levelno >= logging.ERROR
            and record.msg == _INVALID_ENCODING
            and record.exc_info is not None
            and isinstance(record.exc_info[1], UnicodeDecodeError)
        ):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        record.msg = "a caller sent a request header that is not UTF-8 (grpc reads it as Latin-1): %r"
        # grpc's traceback says nothing about the caller; it would make one line many.
        record.exc_info, record.exc_text = None, None
        # The logger's level was checked against ERROR before this filter ran: check DEBUG now.
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


CALLER_HEADER_NOISE = CallerHeaderNoise()


def quiet_caller_header_noise() -> None:
    """Installs the filter on grpc's logger (once: a logger keeps one copy of a filter)."""
    logging.getLogger(GRPC_CORE_LOGGER).addFilter(CALLER_HEADER_NOISE)


def _received(decode: Callable[[bytes], _M | Undecodable]) -> Callable[[bytes], Received[_M | Undecodable]]:
    def receive(data: bytes) -> Received[_M | Undecodable]:
        return Received(decode(data), len(data))

    return receive


def _lenient(message: type[_M]) -> Callable[[bytes], _M | Undecodable]:
    """A deserializer that hands undecodable bytes to the handler as `Undecodable`.

    grpc turns a deserializer exception into a bare INTERNAL; the contract wants the caller told
    that its request was malformed (INVALID_ARGUMENT), and why where protobuf says.
    """

    def decode(data: bytes) -> _M | Undecodable:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            # upb's error for protobuf's nesting limit; the text is all it gives to tell it apart.
            return _TOO_DEEP if "MaxDepth" in str(exc) else _UNDECODABLE

    return decode


def _serialize(message: Message | bytes) -> bytes:
    """Messages are serialized; bytes (a durable stream's journaled messages) go out as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def grpc_options(config: Config) -> list[tuple[str, Any]]:
    s = config.server
    return [
        # Requests up to max_request_bytes are validated by the service (INVALID_ARGUMENT with a
        # message); grpc itself refuses anything over twice that before it is read.
        ("grpc.max_receive_message_length", 2 * s.max_request_bytes),
        ("grpc.max_send_message_length", 4 * 1024 * 1024),
        # Metadata is checked the same way; both grpc limits are set so the cut-off is exact.
        ("grpc.max_metadata_size", 2 * s.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", 2 * s.max_metadata_bytes),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_seconds * 1000)),
        # grpc core (1.7x-1.8x) closes a connection over an unanswered ping only after the ping
        # timeout (1 minute by default), whatever the keepalive timeout says: set both.
        ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(s.keepalive_min_ping_interval_seconds * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        # grpc enables SO_REUSEPORT by default, which lets a second server silently share the port:
        # only the worker processes of one server share it, on purpose.
        ("grpc.so_reuseport", 1 if s.workers > 1 else 0),
    ]


def _tracing(config: Config, provider: Any) -> Any:
    if config.server.tracing != "on" and provider is None:
        return None
    try:
        from service.tracing import Tracing
    except ImportError:
        raise ConfigError('tracing = "on" needs the OpenTelemetry SDK: pip install "tokenwire[otel]"') from None
    return Tracing(config.server.otlp_endpoint, provider)


class MetricsServer:
    """/metrics on a port of its own (`metrics_listen`), loopback by default."""

    def __init__(self, metrics: Metrics, listen: str, reuse_port: bool) -> None:
        self.metrics = metrics
        self.listen = listen
        self.reuse_port = reuse_port
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        host, _, port = self.listen.rpartition(":")
        site = web.TCPSite(self.runner, host.strip("[]"), int(port), reuse_port=self.reuse_port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class TokenwireServer:
    def __init__(self, config: Config, *, tracer_provider: Any = None) -> None:
        """`tracer_provider`: an OpenTelemetry TracerProvider of the embedder's (tests give one with
        an in-memory exporter); it turns tracing on."""
        self.config = config
        self.router = Router(config.routes)
        s = config.server
        self.journal = open_journal(s.journal, max_total_bytes=s.journal_max_total_bytes)
        try:
            self.keys = KeyRing(Path(s.keys_file) if s.keys_file else None, s.keys_reload_seconds)
        except KeysError as exc:
            raise ConfigError(f"[server] keys_file: {exc}") from None
        self.metrics = Metrics(config.prices) if s.metrics_listen else None
        observer = Observer(self.metrics, _tracing(config, tracer_provider))
        self.router.on_retry = observer.retried
        self.router.on_fallback = observer.fell_back
        self.quotas = open_quotas(
            s.quota_store,
            s.journal,
            fail_open=s.quota_store_failure == "open",
            on_rejected=observer.quota_rejected,
            on_store_error=observer.quota_store_error,
        )
        self.gateway = Gateway(self.router, s, self.journal, keys=self.keys, quotas=self.quotas, observer=observer)
        if self.metrics is not None:
            self.metrics.watch_gauges(lambda: self.gateway.active_streams, self.journal, lambda: len(self.keys))
        self.metrics_server = (
            MetricsServer(self.metrics, s.metrics_listen, s.workers > 1)
            if self.metrics is not None and s.metrics_listen != "http"
            else None
        )
        self.generation = GenerationService(self.gateway)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=grpc_options(config))
        self.port = 0
        # The HTTP door: the same gateway, in the same event loop, on a port of its own.
        self.http = HttpDoor(self.gateway, s) if s.http_listen else None

    async def start(self) -> int:
        # Here rather than in the command line's logging set-up, so that an embedded server
        # (and every test server) gets it too.
        quiet_caller_header_noise()
        g = self.generation
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                g.Generate,
                request_deserializer=_received(_lenient(pb.GenerateRequest)),
                response_serializer=_serialize,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                g.ListModels,
                request_deserializer=_lenient(pb.ListModelsRequest),
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
            "Resume": grpc.unary_stream_rpc_method_handler(
                g.Resume,
                request_deserializer=_lenient(pb.ResumeRequest),
                response_serializer=_serialize,
            ),
            "Poll": grpc.unary_unary_rpc_method_handler(
                g.Poll,
                request_deserializer=_lenient(pb.PollRequest),
                response_serializer=_serialize,
            ),
            "Cancel": grpc.unary_unary_rpc_method_handler(
                g.Cancel,
                request_deserializer=_lenient(pb.CancelRequest),
                response_serializer=pb.CancelResponse.SerializeToString,
            ),
        }
        # As generated code does: registered handlers are grpc's fast path, the generic one its
        # fallback for lookups by name.
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self.server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self.server)
        s = self.config.server
        listen = s.listen
        try:
            self.port = self.server.add_insecure_port(listen)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ConfigError(f"cannot listen on {listen}: the address is in use or not valid here")
        await self.server.start()
        # A shared journal's lease and cancel subscription, before the first stream can start.
        await self.gateway.durable.open()
        if self.http is not None:
            try:
                await self.http.start()
            except OSError:
                await self.server.stop(None)
                raise ConfigError(
                    f"cannot listen on {s.http_listen} (http_listen): the address is in use or not valid here"
                ) from None
        if self.metrics_server is not None:
            try:
                await self.metrics_server.start()
            except OSError:
                await self.server.stop(None)
                if self.http is not None:
                    await self.http.stop(0)
                raise ConfigError(
                    f"cannot listen on {s.metrics_listen} (metrics_listen): the address is in use or not valid here"
                ) from None
        self.keys.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    @property
    def address(self) -> str:
        host = self.config.server.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Drains within `grace` seconds, then stops.

        During the drain health answers NOT_SERVING and new Generate calls are refused with
        UNAVAILABLE / SERVER_SHUTTING_DOWN (retryable), while the streams in flight go on. Streams
        still open near the end of the drain get a terminal SERVER_SHUTTING_DOWN error; the last
        part of the grace period is left for those errors to reach their callers.
        """
        grace = self.config.server.shutdown_grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.gateway.begin_drain()
        margin = min(1.0, grace / 4)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace - margin):
                await self.gateway.idle.wait()
        ended = self.gateway.end_streams()
        if ended:
            log.warning("grace period nearly over: ending %d stream(s) with SERVER_SHUTTING_DOWN", ended)
        await self.server.stop(margin)
        if self.http is not None:
            await self.http.stop(margin)
        # grpc has cancelled what was left (readers that stopped reading); let those handlers
        # close their provider streams before the providers' clients are closed.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.gateway.idle.wait()
        await self.router.aclose()
        await self.journal.aclose()
        await self.keys.stop()
        await self.quotas.aclose()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        tracing = self.gateway.observer.tracing
        if tracing is not None:
            tracing.shutdown()
