"""Routes: a caller's route name -> the provider that serves it, and opening its stream.

A stream is "opened" when its provider produced a first event. Until then nothing has been sent
to the caller, so a failure is still a plain status (and, later, the place to retry or fall back).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service.config import RouteConfig
from service.errors import ErrorCode, GatewayError
from service.events import EventStream, GenerationRequest, ProviderEvent
from service.providers import create_provider
from service.providers.base import Provider


@dataclass(frozen=True, slots=True)
class Route:
    config: RouteConfig
    provider: Provider

    @property
    def name(self) -> str:
        return self.config.name


@dataclass(frozen=True, slots=True)
class OpenedStream:
    route: Route
    first: ProviderEvent
    events: EventStream


class Router:
    def __init__(self, routes: Mapping[str, RouteConfig]) -> None:
        self.routes = {name: Route(config, create_provider(config)) for name, config in sorted(routes.items())}

    def get(self, name: str) -> Route:
        try:
            return self.routes[name]
        except KeyError:
            raise GatewayError(
                ErrorCode.ROUTE_NOT_FOUND,
                f"unknown route {name[:128]!r}; ListModels lists the routes this server serves",
            ) from None

    async def open(self, route: Route, request: GenerationRequest) -> OpenedStream:
        """Starts the provider's stream and waits for its first event; closes it on failure."""
        events = route.provider.stream(request)
        try:
            first = await anext(events, None)
        except BaseException:
            await events.aclose()
            raise
        if first is None:
            await events.aclose()
            raise GatewayError(
                ErrorCode.PROVIDER_STREAM_TRUNCATED,
                "the provider's stream ended before its first event",
                provider=route.provider.kind,
            )
        return OpenedStream(route, first, events)

    async def aclose(self) -> None:
        for route in self.routes.values():
            await route.provider.aclose()
