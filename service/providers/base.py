"""The provider interface: a provider-neutral request in, an async stream of neutral events out.

A provider adapter knows its vendor's wire format and error classes and nothing about gRPC.
Sequencing, the terminal-event rule, timing and usage accounting are not its business: the
sequencer (`service.streams`) does them for every provider alike.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from service.config import ConfigError, RouteConfig
from service.events import EventStream, GenerationRequest

_N = TypeVar("_N", int, float)


class Provider(abc.ABC):
    """One configured route's provider. One instance per route, living as long as the server."""

    kind: ClassVar[str]
    supports_tools: ClassVar[bool] = False
    supports_reasoning: ClassVar[bool] = False

    def __init__(self, route: RouteConfig) -> None:
        self.route = route

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> EventStream:
        """Streams one response.

        Contract for implementations:
        - yield deltas, then exactly one `Finished` built from the vendor's own end marker, then
          stop; a vendor stream that ends without its marker must raise, not finish;
        - raise `GatewayError` for every failure they can classify, with a sanitized message;
        - close the upstream connection in `finally`: the consumer calls `aclose()` on the
          iterator when the caller cancels, and `CancelledError` must propagate.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Releases long-lived resources (HTTP clients) at server shutdown."""


class Options:
    """Reads a route's `options` table with types and bounds, and rejects unknown keys."""

    def __init__(self, route: RouteConfig) -> None:
        self._route = route
        self._values: Mapping[str, Any] = route.options
        self._seen: set[str] = set()

    def _fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"[routes.{self._route.name}] options.{key} {problem}")

    def number(self, key: str, default: _N, *, minimum: _N, maximum: _N | None = None) -> _N:
        self._seen.add(key)
        value = self._values.get(key, default)
        kind = type(default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"must be a number, got {value!r}")
        if kind is int and not isinstance(value, int):
            raise self._fail(key, f"must be a whole number, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum}" + (f" to {maximum}" if maximum is not None else "")
            raise self._fail(key, f"must be {bound}, got {value!r}")
        return kind(value)

    def optional_int(self, key: str, *, minimum: int) -> int | None:
        if key not in self._values:
            self._seen.add(key)
            return None
        return self.number(key, minimum, minimum=minimum)

    def string(self, key: str, default: str = "") -> str:
        self._seen.add(key)
        value = self._values.get(key, default)
        if not isinstance(value, str):
            raise self._fail(key, f"must be a string, got {value!r}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        self._seen.add(key)
        value = self._values.get(key, default)
        if value not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return str(value)

    def done(self) -> None:
        unknown = set(self._values) - self._seen
        if unknown:
            raise ConfigError(
                f"[routes.{self._route.name}] unknown option(s) {sorted(unknown)} "
                f"for provider {self._route.provider!r}; known: {sorted(self._seen)}"
            )
