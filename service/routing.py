"""Routes: a caller's route name -> the provider that serves it, and opening its stream.

A stream is "opened" when its provider produced a first event. Until then nothing has been sent
to the caller, so a failure is still a plain status, and the place to fall back to another route.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from service.config import RouteConfig
from service.errors import ErrorCode, Fault, GatewayError, stream_truncated
from service.events import EventStream, GenerationRequest, ProviderEvent
from service.providers import create_provider
from service.providers.base import Provider

log = logging.getLogger("tokenwire.routing")

_BACKOFF_BASE_SECONDS = 0.25
_BACKOFF_CAP_SECONDS = 4.0
# A retry needs some time before the deadline to be worth starting.
_DEADLINE_MARGIN_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class Route:
    config: RouteConfig
    provider: Provider

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def propagates_trace(self) -> bool:
        """Whether the caller's trace context may go upstream (the route's `trace_upstream`)."""
        return self.config.trace_upstream


@dataclass(frozen=True, slots=True)
class OpenedStream:
    route: Route
    first: ProviderEvent
    events: EventStream


def _can_serve(route: Route, request: GenerationRequest) -> bool:
    """Whether a fallback route supports what the request asks for."""
    wants_reasoning = request.reasoning_effort is not None or request.reasoning_budget_tokens is not None
    if request.tools and not route.provider.supports_tools:
        return False
    if wants_reasoning and not route.provider.supports_reasoning:
        return False
    if request.response_format is None and not any(m.parts for m in request.messages):
        return True
    return route.provider.capabilities.refusal(request, route.name) is None


def _expired(request: GenerationRequest) -> bool:
    return request.deadline is not None and time.monotonic() >= request.deadline


def _retry_delay(route: RouteConfig, err: GatewayError, attempt: int, request: GenerationRequest) -> float | None:
    """How long to wait before retrying `route`, or None when it must not be retried.

    Only provider trouble that may pass is retried; the provider's retry-after wins over our
    backoff; a wait longer than the route allows, or one that would reach the caller's deadline
    with no time left to stream, means no retry: the caller gets the error and its retry-after.
    """
    if attempt >= route.max_retries or err.code.fault is not Fault.PROVIDER or not err.retryable:
        return None
    if err.retry_after is not None:
        delay = err.retry_after
    else:
        # Exponential backoff with jitter, so that many streams failing at once spread out.
        delay = min(_BACKOFF_BASE_SECONDS * 2**attempt, _BACKOFF_CAP_SECONDS) * random.uniform(0.5, 1.0)
    if delay > route.max_retry_wait_seconds:
        return None
    if request.deadline is not None and time.monotonic() + delay + _DEADLINE_MARGIN_SECONDS >= request.deadline:
        return None
    return delay


def _worth_falling_back(err: GatewayError) -> bool:
    """Provider trouble another provider may not have: outages, limits, and a bad provider key.

    A request the provider rejected (HTTP 400) would be rejected again, and the caller's own
    errors and the server's are no provider's fault.
    """
    return err.code.fault is Fault.PROVIDER and (err.retryable or err.code is ErrorCode.PROVIDER_AUTH_FAILED)


class Router:
    def __init__(self, routes: Mapping[str, RouteConfig]) -> None:
        self.routes = {name: Route(config, create_provider(config)) for name, config in sorted(routes.items())}
        # Told of each retry and fallback, by the route that failed (the metrics).
        self.on_retry: Callable[[str], None] | None = None
        self.on_fallback: Callable[[str], None] | None = None

    def get(self, name: str) -> Route:
        try:
            return self.routes[name]
        except KeyError:
            raise GatewayError(
                ErrorCode.ROUTE_NOT_FOUND,
                f"unknown route {name[:128]!r}; ListModels lists the routes this server serves",
            ) from None

    async def open(self, route: Route, request: GenerationRequest) -> OpenedStream:
        """Starts the route's stream and waits for its first event.

        Until then nothing has reached the caller, so nothing can be replayed: a retryable failure
        is retried on the same route (backing off, honouring the provider's retry-after, never
        past the caller's deadline), and then the route's fallbacks are tried in order. After the
        first event there is no retry and no fallback. Fallbacks of fallbacks are not followed.
        """
        usable = [route]
        for name in route.config.fallbacks:
            fallback = self.routes[name]
            if _can_serve(fallback, request):
                usable.append(fallback)
            else:
                log.info("stream %s: fallback %r skipped: it cannot serve this request", request.stream_id, name)
        for candidate, next_candidate in itertools.pairwise(usable):
            try:
                return await self._open_with_retries(candidate, request)
            except GatewayError as err:
                if _expired(request) or not _worth_falling_back(err):
                    raise
                if self.on_fallback is not None:
                    self.on_fallback(candidate.name)
                log.warning(
                    "stream %s: route %r failed before its first token (%s); falling back to %r",
                    request.stream_id,
                    candidate.name,
                    err.code.value,
                    next_candidate.name,
                )
        return await self._open_with_retries(usable[-1], request)

    async def _open_with_retries(self, route: Route, request: GenerationRequest) -> OpenedStream:
        attempt = 0
        while True:
            try:
                return await self._open(route, request)
            except GatewayError as err:
                delay = _retry_delay(route.config, err, attempt, request)
                if delay is None:
                    raise
                attempt += 1
                if self.on_retry is not None:
                    self.on_retry(route.name)
                log.warning(
                    "stream %s: route %r failed before its first token (%s%s); retry %d of %d in %.2f s",
                    request.stream_id,
                    route.name,
                    err.code.value,
                    f", HTTP {err.provider_http_status}" if err.provider_http_status else "",
                    attempt,
                    route.config.max_retries,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _open(self, route: Route, request: GenerationRequest) -> OpenedStream:
        # Validation named the primary route's model already: a copy only for a fallback's.
        if request.upstream_model != route.config.model:
            request = dataclasses.replace(request, upstream_model=route.config.model)
        events = route.provider.stream(request)
        try:
            first = await anext(events, None)
        except BaseException:
            await events.aclose()
            raise
        if first is None:
            await events.aclose()
            raise stream_truncated(route.provider.kind, "the provider's stream ended before its first event")
        return OpenedStream(route, first, events)

    async def aclose(self) -> None:
        for route in self.routes.values():
            await route.provider.aclose()
