"""The provider interface: a provider-neutral request in, an async stream of neutral events out.

A provider adapter knows its vendor's wire format and error classes and nothing about gRPC.
Sequencing, the terminal-event rule, timing and usage accounting are not its business: the
sequencer (`service.streams`) does them for every provider alike.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import enum
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from service.config import ConfigError, RouteConfig
from service.errors import GatewayError, invalid_request
from service.events import (
    CacheMarker,
    EventStream,
    GenerationRequest,
    Part,
    PartKind,
    ResponseFormatType,
    Source,
)

# Breakpoints one request may carry: both vendors' limit.
MAX_CACHE_MARKERS = 4

_N = TypeVar("_N", int, float)


class PromptCaching(enum.StrEnum):
    NONE = "none"
    AUTOMATIC = "automatic"
    EXPLICIT = "explicit"


MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MediaSupport:
    """The parts of one kind (images, documents, audio) a route accepts."""

    # Media type -> the sources it may come from; empty: the route takes no such parts.
    types: Mapping[str, frozenset[Source]] = field(default_factory=dict)
    max_part_bytes: int = 0
    url_schemes: tuple[str, ...] = ()

    def sources(self, media_type: str) -> frozenset[Source]:
        """The sources accepted for `media_type`; for "" (a URL or file id that named none), any type's."""
        if media_type:
            return self.types.get(media_type, frozenset())
        return frozenset().union(*self.types.values())


def media(
    types: Mapping[str, frozenset[Source]], max_part_bytes: int, url_schemes: tuple[str, ...] = ("https",)
) -> MediaSupport:
    return MediaSupport(dict(types), max_part_bytes, url_schemes)


ALL_SOURCES = frozenset(Source)
TEXT_ONLY = frozenset({ResponseFormatType.TEXT})


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a route accepts beyond text, as ListModels tells it and validation enforces it."""

    images: MediaSupport = MediaSupport()
    documents: MediaSupport = MediaSupport()
    audio: MediaSupport = MediaSupport()
    prompt_caching: PromptCaching = PromptCaching.NONE
    # The cache lifetimes offered, in seconds, shortest first; empty: a marker's ttl is refused.
    cache_ttls: tuple[float, ...] = ()
    response_formats: frozenset[ResponseFormatType] = TEXT_ONLY
    citations: bool = False
    # Whether documents take DocumentPart.context.
    document_context: bool = False

    def cache_ttl(self, ttl: float | None) -> float | None:
        """The provider's lifetime for a marker's ttl: the shortest offered that is at least as long."""
        if ttl is None:
            return None
        return next((offered for offered in self.cache_ttls if offered >= ttl), None)

    def refusal(self, request: GenerationRequest, route: str) -> GatewayError | None:
        return refusal(self, request, route)


def refusal(caps: Capabilities, request: GenerationRequest, name: str) -> GatewayError | None:
    """Why route `name` with `caps` cannot serve the request's parts and response format; None when it can.

    The error names the part by its index, as the caller sent it.
    """
    fmt = request.response_format
    if fmt is not None and fmt.type not in caps.response_formats:
        return invalid_request(
            "response_format.type", f"route {name!r} cannot produce {fmt.type.value}; see ListModels"
        )
    markers = 0
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.parts):
            where = f"messages[{i}].parts[{j}]"
            if part.cache is not None:
                markers += 1
                refusal = _cache_refusal(part.cache, caps, name, where, markers)
                if refusal is not None:
                    return refusal
            if part.kind is PartKind.TEXT:
                continue
            refusal = _media_refusal(part, caps, name, f"{where}.{part.kind.value}")
            if refusal is not None:
                return refusal
    return None


def _cache_refusal(
    marker: CacheMarker, caps: Capabilities, route: str, where: str, markers: int
) -> GatewayError | None:
    if caps.prompt_caching is PromptCaching.NONE:
        return invalid_request(f"{where}.cache_control", f"route {route!r} has no prompt cache")
    if markers > MAX_CACHE_MARKERS:
        return invalid_request(f"{where}.cache_control", f"a request takes at most {MAX_CACHE_MARKERS} cache markers")
    if marker.ttl is not None and caps.cache_ttl(marker.ttl) is None:
        offered = ", ".join(f"{t:g} s" for t in caps.cache_ttls) or "none (its cache is automatic)"
        return invalid_request(
            f"{where}.cache_control.ttl",
            f"route {route!r} cannot keep a cache for {marker.ttl:g} s; lifetimes it offers: {offered}",
        )
    return None


def _media_refusal(part: Part, caps: Capabilities, route: str, where: str) -> GatewayError | None:
    kind = part.kind.value
    support: MediaSupport = getattr(caps, {"image": "images", "document": "documents"}.get(kind, kind))
    if not support.types:
        return invalid_request(where, f"route {route!r} does not accept {kind} parts")
    sources = support.sources(part.media_type)
    if not sources:
        accepted = ", ".join(sorted(support.types))
        return invalid_request(
            f"{where}.media_type", f"route {route!r} does not accept {part.media_type} {kind}s; it accepts {accepted}"
        )
    source = part.source
    assert source is not None
    if source not in sources:
        which = f"{part.media_type} {kind}s" if part.media_type else f"{kind}s"
        accepted = ", ".join(sorted(s.value for s in sources))
        return invalid_request(f"{where}.{source.value}", f"route {route!r} takes {which} only as {accepted}")
    if source is Source.DATA:
        assert part.data is not None
        if len(part.data) > support.max_part_bytes:
            return invalid_request(
                f"{where}.data",
                f"is {len(part.data)} bytes; route {route!r} takes at most {support.max_part_bytes} per {kind} "
                "(a URL or a file id is the way for larger media)",
            )
    elif source is Source.URL:
        scheme = part.url.partition(":")[0].lower()
        if scheme not in support.url_schemes:
            return invalid_request(
                f"{where}.url", f"route {route!r} fetches only {', '.join(support.url_schemes)} URLs, not {scheme}:"
            )
    if part.citations and not caps.citations:
        return invalid_request(f"{where}.citations", f"route {route!r} cannot cite documents")
    if part.context and not caps.document_context:
        return invalid_request(f"{where}.context", f"route {route!r} takes no document context")
    return None


class Provider(abc.ABC):
    """One configured route's provider. One instance per route, living as long as the server."""

    kind: ClassVar[str]
    supports_tools: ClassVar[bool] = False
    supports_reasoning: ClassVar[bool] = False

    def __init__(self, route: RouteConfig) -> None:
        self.route = route
        # Text only, unless the adapter says more (it may depend on the route's options).
        self.capabilities = Capabilities()

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

    def boolean(self, key: str, default: bool) -> bool:
        self._seen.add(key)
        value = self._values.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value


_O = TypeVar("_O")


def bounds(
    default: Any, *, minimum: float | None = None, maximum: float | None = None, choices: tuple[str, ...] = ()
) -> Any:
    """A typed option's field: its default, and the bounds or choices `read_options` checks."""
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum, "choices": choices})


def read_options(cls: type[_O], route: RouteConfig) -> _O:
    """A route's `options` table as the dataclass `cls`, checked once when the server starts.

    Each field is an option of its name; its annotation (str, bool, int, float) is the type the
    value must have, and `bounds` gives its range or choices. An unknown key is refused, naming the
    ones `cls` knows.
    """
    options = Options(route)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind, meta = hints[f.name], f.metadata
        default: Any = f.default
        if meta.get("choices"):
            values[f.name] = options.choice(f.name, default, meta["choices"])
        elif kind is bool:
            values[f.name] = options.boolean(f.name, default)
        elif kind is str:
            values[f.name] = options.string(f.name, default)
        elif kind in (int, float):
            minimum = meta.get("minimum")
            values[f.name] = options.number(
                f.name, kind(default), minimum=kind(minimum if minimum is not None else 0), maximum=meta.get("maximum")
            )
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: options take str, bool, int or float, not {kind}")
    options.done()
    return cls(**values)


@contextlib.contextmanager
def vendor_sdk(route: RouteConfig, sdk: str, extra: str) -> Iterator[None]:
    """Around the import of a vendor SDK that is an optional extra: when it is not installed, the
    server does not start, and says which extra to install."""
    try:
        yield
    except ImportError:
        raise ConfigError(
            f"[routes.{route.name}] provider {route.provider!r} needs the {sdk}: pip install 'tokenwire[{extra}]'"
        ) from None
