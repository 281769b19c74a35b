"""OpenTelemetry traces (the `tokenwire[otel]` extra): imported only when `tracing = "on"`.

Each generation gets a SERVER span, `chat {route}`, joined to the caller's trace when the request
carries `traceparent` (gRPC metadata or an HTTP header), and a CLIENT child span for the provider
call, `chat {upstream model}`, from the first request to the provider to the end of its stream
(retries and fallbacks included). Attributes follow the GenAI semantic conventions
(`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.response.model`,
`gen_ai.usage.input_tokens`, ...). No prompt or answer text, no caller key: the caller's *name*
from the keys file, the stream id, and figures only.

The trace context goes upstream only from a route with `trace_upstream = "on"` (anthropic routes:
the SDK sends `traceparent` itself): a provider is another company, and our trace ids are
nobody's business there unless the operator says so.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import __version__
from service.callers import Caller

if TYPE_CHECKING:
    from service.streams import Sequencer

_PROPAGATOR = TraceContextTextMapPropagator()
_FINISH_REASONS: dict[int, str] = {}


def _finish_reasons() -> dict[int, str]:
    if not _FINISH_REASONS:
        from tokenwire.v1 import generation_pb2 as pb

        _FINISH_REASONS.update({v: n.removeprefix("FINISH_REASON_").lower() for n, v in pb.FinishReason.items()})
    return _FINISH_REASONS


def _ns(monotonic: float) -> int:
    """A time.monotonic() instant as the epoch nanoseconds a span wants."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class StreamSpans:
    """The two spans of one generation."""

    __slots__ = ("_token", "provider_span", "server_span", "tracer")

    def __init__(self, tracer: trace.Tracer, server_span: trace.Span) -> None:
        self.tracer = tracer
        self.server_span = server_span
        self.provider_span: trace.Span | None = None
        self._token: object | None = None

    def opening(self, provider: str, upstream_model: str, propagate: bool) -> None:
        """The provider call begins; with `propagate`, its span is current while it is opened."""
        parent = trace.set_span_in_context(self.server_span)
        span = self.provider_span = self.tracer.start_span(
            f"chat {upstream_model}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": upstream_model,
            },
        )
        if propagate:
            self._token = otel_context.attach(trace.set_span_in_context(span))

    def opened(self, provider: str, upstream_model: str) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        span = self.provider_span
        if span is not None:
            # A fallback may have served it: the provider that did.
            span.set_attribute("gen_ai.provider.name", provider)
            span.set_attribute("gen_ai.request.model", upstream_model)
            span.add_event("first_event")
        self.server_span.set_attribute("gen_ai.provider.name", provider)

    def end(self, outcome: str, sequencer: Sequencer | None) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None
        attributes: dict[str, Any] = {"tokenwire.outcome": outcome}
        finish = sequencer.finish if sequencer is not None else None
        if sequencer is not None:
            attributes["tokenwire.messages"] = sequencer.sequence
            if sequencer.first_delta_at is not None:
                attributes["tokenwire.time_to_first_token_ms"] = round(
                    (sequencer.first_delta_at - sequencer.info.received_at) * 1000, 3
                )
        if finish is not None:
            usage = finish.usage
            attributes["gen_ai.response.finish_reasons"] = (_finish_reasons().get(finish.reason, "other"),)
            attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
            if usage.HasField("cache_read_input_tokens"):
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_input_tokens
            if usage.HasField("cache_write_input_tokens"):
                attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_input_tokens
            if usage.HasField("reasoning_tokens"):
                attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            if finish.provider_model:
                attributes["gen_ai.response.model"] = finish.provider_model
            if finish.provider_request_id:
                attributes["gen_ai.response.id"] = finish.provider_request_id
        failed = outcome != "OK"
        for span in (self.provider_span, self.server_span):
            if span is None:
                continue
            span.set_attributes(attributes)
            if failed:
                span.set_attribute("error.type", outcome)
                span.set_status(Status(StatusCode.ERROR, outcome))
            span.end()


class Tracing:
    """The tracer provider (the caller's, or one exporting by OTLP/HTTP) and the spans it makes."""

    def __init__(self, otlp_endpoint: str = "", provider: TracerProvider | None = None) -> None:
        if provider is None:
            provider = TracerProvider(resource=Resource.create({"service.name": "tokenwire"}))
            if otlp_endpoint:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                processor: SpanProcessor = BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint))
                provider.add_span_processor(processor)
        self.provider = provider
        self.tracer = provider.get_tracer("tokenwire", __version__)

    def stream(
        self,
        route: str,
        provider: str,
        upstream_model: str,
        caller: Caller,
        received_at: float,
        kind: str,
        stream_id: str,
        carrier: Mapping[str, str] | None,
    ) -> StreamSpans:
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": route,
            "gen_ai.provider.name": provider,
            "tokenwire.route": route,
            "tokenwire.upstream_model": upstream_model,
            "tokenwire.stream_id": stream_id,
            "tokenwire.kind": kind,
        }
        if caller.name:
            attributes["tokenwire.caller"] = caller.name
        span = self.tracer.start_span(
            f"chat {route}", context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=_ns(received_at)
        )
        return StreamSpans(self.tracer, span)

    def shutdown(self) -> None:
        self.provider.shutdown()
