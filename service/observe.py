"""What operators see of each stream: Prometheus metrics, OpenTelemetry spans, the caller's share.

Everything here runs once per stream (at admission and at its end), never per chunk: the figures
come from the stream's Finish (usage, timing) when it ends. Labels are bounded: the route and
provider (from the config), the outcome (a closed set, see `outcome_label`), the token type, and
the caller's *name* only on the per-caller series (the keys file bounds them). Never a stream id,
a key or its hash.

Metric names follow the OpenTelemetry GenAI semantic conventions where one exists, in their
Prometheus form (`gen_ai.server.time_to_first_token` in seconds is
`gen_ai_server_time_to_first_token_seconds`); the rest are `tokenwire_*`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.callers import Caller
from service.config import Price
from service.errors import ErrorCode
from service.quotas import FREE, Lease
from tokenwire.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from service.streams import Sequencer
    from service.tracing import Tracing

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
_OUTCOMES = frozenset(
    {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "CALL_ENDED", "WRITE_TIMEOUT", "ENDED_ELSEWHERE"}
    | {code.value for code in ErrorCode}
)
_FINISH_REASONS = {v: name.removeprefix("FINISH_REASON_").lower() for name, v in pb.FinishReason.items()}
# Seconds: first tokens from a few ms (cached, local) to a minute (long reasoning).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_TPS_BUCKETS = (1, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
_TOKEN_FIELDS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cache_read", "cache_read_input_tokens"),
    ("cache_write", "cache_write_input_tokens"),
    ("reasoning", "reasoning_tokens"),
)


def outcome_label(outcome: str) -> str:
    """A stream's outcome as a bounded label: its first word if it is a known one, else OTHER."""
    word = outcome.split(" ", 1)[0]
    return word if word in _OUTCOMES else "OTHER"


class Metrics:
    """The server's Prometheus series, in a registry of its own (one per server, so tests can run many)."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self.prices = dict(prices or {})
        # The `_created` series double every counter for nothing a dashboard uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        r = self.registry = CollectorRegistry()
        rp = ["route", "provider"]
        self.started = Counter(
            "tokenwire_streams_started",
            "Generations admitted, by route and configured provider.",
            [*rp, "kind"],
            registry=r,
        )
        self.ended = Counter(
            "tokenwire_streams_ended",
            "Generations ended, by route, the provider that served them, and outcome.",
            [*rp, "outcome"],
            registry=r,
        )
        self.active = Gauge(
            "tokenwire_active_streams", "Generations in flight now (ephemeral and durable).", registry=r
        )
        self.rejected = Counter(
            "tokenwire_requests_rejected",
            "Requests refused before a generation was admitted, by error code.",
            ["code"],
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token",
            "Time from request receipt to the first delta.",
            rp,
            unit="seconds",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration",
            "Time from request receipt to the terminal event.",
            [*rp, "outcome"],
            unit="seconds",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token",
            "Time per output token after the first.",
            rp,
            unit="seconds",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.tps = Histogram(
            "tokenwire_output_tokens_per_second",
            "Output tokens per second of a finished stream, after its first.",
            rp,
            buckets=_TPS_BUCKETS,
            registry=r,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per finished stream, by type (input, output; cache_read, "
            "cache_write and reasoning are tokenwire's, counted within input and output).",
            [*rp, "gen_ai_token_type"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "tokenwire_provider_retries", "Retries of a route before its first token.", ["route"], registry=r
        )
        self.fallbacks = Counter(
            "tokenwire_provider_fallbacks",
            "Fallbacks from a route to the next before the first token.",
            ["route"],
            registry=r,
        )
        self.quota_rejections = Counter(
            "tokenwire_quota_rejections", "Requests refused by a caller's quota.", ["caller", "quota"], registry=r
        )
        self.quota_store_errors = Counter(
            "tokenwire_quota_store_errors", "Quota checks the Redis store did not answer.", registry=r
        )
        self.caller_tokens = Counter(
            "tokenwire_caller_tokens",
            "Tokens used by each caller (keys file names).",
            ["caller", "gen_ai_token_type"],
            registry=r,
        )
        self.cost = Counter(
            "tokenwire_cost",
            "Cost of the tokens used, from the config's [prices] (per million tokens).",
            ["route"],
            registry=r,
        )
        self.journal_streams = Gauge("tokenwire_journal_streams", "Durable streams held by the journal.", registry=r)
        self.journal_bytes = Gauge("tokenwire_journal_bytes", "Payload bytes held by the journal.", registry=r)
        self.keys = Gauge("tokenwire_keys", "Caller keys in force (0 with auth off).", registry=r)

    def watch_gauges(self, active: Callable[[], int], journal: Any, keys: Callable[[], int]) -> None:
        self.active.set_function(active)
        self.keys.set_function(keys)
        # The memory journal knows its size; a Redis journal's is Redis's own (its INFO).
        if hasattr(journal, "total_bytes"):
            self.journal_streams.set_function(lambda: len(journal))
            self.journal_bytes.set_function(lambda: journal.total_bytes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def stream_ended(
        self, route: str, provider: str, outcome: str, sequencer: Sequencer | None, received_at: float, caller: str
    ) -> None:
        finish = sequencer.finish if sequencer is not None else None
        outcome = outcome_label(outcome)
        self.ended.labels(route, provider, outcome).inc()
        self.duration.labels(route, provider, outcome).observe(time.monotonic() - received_at)
        if sequencer is not None and sequencer.first_delta_at is not None:
            self.ttft.labels(route, provider).observe(sequencer.first_delta_at - received_at)
        if finish is None:
            return
        usage = finish.usage
        timing = finish.timing
        if timing.output_tokens_per_second > 0:
            self.tps.labels(route, provider).observe(timing.output_tokens_per_second)
            self.tpot.labels(route, provider).observe(1 / timing.output_tokens_per_second)
        for kind, name in _TOKEN_FIELDS:
            if usage.HasField(name):  # type: ignore[arg-type]
                value = getattr(usage, name)
                self.tokens.labels(route, provider, kind).observe(value)
                if caller:
                    self.caller_tokens.labels(caller, kind).inc(value)
        price = self.prices.get(route)
        if price is not None:
            # Cached input is priced apart when the table says so; plain input is what is left of it.
            cached = usage.cache_read_input_tokens + usage.cache_write_input_tokens
            cost = (
                max(usage.input_tokens - cached, 0) * price.input
                + usage.cache_read_input_tokens * (price.cache_read or price.input)
                + usage.cache_write_input_tokens * (price.cache_write or price.input)
                + usage.output_tokens * price.output
            ) / 1e6
            self.cost.labels(route).inc(cost)


def tokens_used(sequencer: Sequencer | None) -> int:
    """What a stream is charged against its caller's token quota: input and output, as reported."""
    finish = sequencer.finish if sequencer is not None else None
    if finish is None:
        return 0
    return finish.usage.input_tokens + finish.usage.output_tokens


class Watch:
    """One generation from admission to its end: its quota lease, its spans, its figures.

    `end` runs once, whichever path ends the stream; the lease goes back with the tokens used.
    """

    __slots__ = ("_ended", "caller", "kind", "lease", "metrics", "provider", "received_at", "route", "span")

    def __init__(
        self,
        metrics: Metrics | None,
        span: Any,
        route: str,
        provider: str,
        caller: Caller,
        lease: Lease,
        received_at: float,
        kind: str,
    ) -> None:
        self.metrics = metrics
        self.span = span
        self.route = route
        self.provider = provider
        self.caller = caller
        self.lease = lease
        self.received_at = received_at
        self.kind = kind
        self._ended = False
        if metrics is not None:
            metrics.started.labels(route, provider, kind).inc()

    def end(self, outcome: str, sequencer: Sequencer | None, provider: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if provider:
            self.provider = provider
        self.lease.release(tokens_used(sequencer) if self.lease is not FREE else 0)
        if self.metrics is not None:
            self.metrics.stream_ended(self.route, self.provider, outcome, sequencer, self.received_at, self.caller.name)
        if self.span is not None:
            self.span.end(outcome_label(outcome), sequencer)


def finish_reason(finish: pb.Finish) -> str:
    return _FINISH_REASONS.get(finish.reason, "other")


class Observer:
    """The gateway's metrics and tracing: either may be off (None), and then costs nothing."""

    def __init__(self, metrics: Metrics | None, tracing: Tracing | None) -> None:
        self.metrics = metrics
        self.tracing = tracing

    def watch(
        self,
        route: str,
        provider: str,
        upstream_model: str,
        caller: Caller,
        lease: Lease,
        received_at: float,
        kind: str,
        stream_id: str,
        carrier: Mapping[str, str] | None,
    ) -> Watch:
        span = None
        if self.tracing is not None:
            span = self.tracing.stream(route, provider, upstream_model, caller, received_at, kind, stream_id, carrier)
        return Watch(self.metrics, span, route, provider, caller, lease, received_at, kind)

    def rejected(self, code: ErrorCode) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(code.value).inc()

    def quota_rejected(self, caller: Caller, which: str) -> None:
        if self.metrics is not None:
            self.metrics.quota_rejections.labels(caller.name, which).inc()

    def quota_store_error(self) -> None:
        if self.metrics is not None:
            self.metrics.quota_store_errors.inc()

    def retried(self, route: str) -> None:
        if self.metrics is not None:
            self.metrics.retries.labels(route).inc()

    def fell_back(self, route: str) -> None:
        if self.metrics is not None:
            self.metrics.fallbacks.labels(route).inc()
