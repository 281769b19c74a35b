"""Provider adapters. Adding a provider means one module here and one line in `KINDS`."""

from __future__ import annotations

from service.config import ConfigError, RouteConfig
from service.providers.base import Provider
from service.providers.simulated import SimulatedProvider

KINDS: dict[str, type[Provider]] = {
    SimulatedProvider.kind: SimulatedProvider,
}


def create_provider(route: RouteConfig) -> Provider:
    try:
        kind = KINDS[route.provider]
    except KeyError:
        raise ConfigError(
            f"[routes.{route.name}] unknown provider {route.provider!r}; known: {', '.join(sorted(KINDS))}"
        ) from None
    return kind(route)
