"""Settings and routes: a TOML file, environment overrides, and defaults that just work.

Precedence, lowest first: built-in defaults, the config file, `TOKENWIRE_<KEY>` environment
variables for every key of `[server]`, then command-line flags.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "TOKENWIRE_"
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, key and problem."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # Address to listen on. Loopback by default; use "0.0.0.0:50051" or "[::]:50051" to serve
    # other hosts.
    listen: str = "localhost:50051"
    # Largest request message accepted, in bytes. Larger requests get INVALID_ARGUMENT.
    max_request_bytes: int = 4 * 1024 * 1024
    # Largest request metadata (headers) accepted, in bytes.
    max_metadata_bytes: int = 16 * 1024
    # Generate streams served at once; more get RESOURCE_EXHAUSTED with a retry delay.
    max_concurrent_streams: int = 1024
    # Seconds streams get to finish after SIGTERM/SIGINT before they end with an Error.
    shutdown_grace_seconds: float = 10.0
    # Longest a Generate stream may run, from request to terminal event. Past it, the stream ends
    # with DEADLINE_EXCEEDED / STREAM_DURATION_EXCEEDED and its provider stream is closed.
    max_stream_duration_seconds: float = 1800.0
    # After this many seconds without news from the provider, a started stream gets a Heartbeat
    # message, so idle-timeout proxies keep it open. 0 turns heartbeats off.
    heartbeat_interval_seconds: float = 15.0
    # Seconds between the server's keepalive pings on each connection. With the timeout below,
    # a client that vanished without closing its connection is noticed within their sum, and its
    # streams (and their provider streams) are closed.
    keepalive_time_seconds: float = 10.0
    # Seconds to wait for a keepalive ping's answer before closing the connection.
    keepalive_timeout_seconds: float = 5.0
    # Shortest interval between client keepalive pings the server accepts; a client pinging more
    # often is disconnected (GOAWAY "too_many_pings").
    keepalive_min_ping_interval_seconds: float = 5.0
    # Python logging level: DEBUG, INFO, WARNING, ERROR.
    log_level: str = "INFO"
    # Server processes sharing the listening port (SO_REUSEPORT); the kernel spreads connections
    # over them. One per core is the most that helps; limits above apply to each process.
    workers: int = 1
    # Where durable streams are journaled: "memory" (this process only; the default) or a Redis
    # URL such as "redis://127.0.0.1:6379/0" (shared by every server pointing at it).
    journal: str = "memory"
    # The longest resume window a request may ask for; longer ones are shortened to it.
    max_resume_window_seconds: float = 3600.0
    # Bounds of one durable stream in the journal. A stream that would pass one ends with a
    # terminal JOURNAL_FULL Error: nothing is dropped silently.
    journal_max_stream_messages: int = 100_000
    journal_max_stream_bytes: int = 64 * 1024 * 1024
    # Bound of the memory journal, every stream together (Redis is bounded by its maxmemory).
    journal_max_total_bytes: int = 1024 * 1024 * 1024
    # The HTTP door (OpenAI-compatible and native SSE, the page at /): HOST:PORT, loopback by
    # default; "" turns it off. Same process and event loop as gRPC.
    http_listen: str = "localhost:8080"
    # Origins allowed to call the HTTP door from a browser page of theirs (CORS), comma-separated
    # and exact ("https://app.example.com"); "" allows none but the door's own page.
    http_cors_origins: str = ""
    # A connection idle this long (seconds) is closed, and so is one whose request head has not
    # arrived whole by then (slow-loris).
    http_idle_timeout_seconds: float = 15.0
    # The longest a request body may take to arrive (seconds); slower gets 408.
    http_body_timeout_seconds: float = 10.0
    # A reader that takes nothing for this long (seconds) while a write waits on it is cut off,
    # and its ephemeral stream's provider closed.
    http_write_timeout_seconds: float = 30.0
    # Callers' API keys: a TOML or JSON file of hashed keys, their routes and quotas (see the
    # README's "Callers"). "" (the default) turns auth off: every caller is anonymous.
    keys_file: str = ""
    # How often the keys file's mtime is checked; a change is loaded without a restart (SIGHUP
    # loads it at once). 0 turns the polling off.
    keys_reload_seconds: float = 2.0
    # Where per-caller quotas are counted: "" follows the journal (this process for "memory", the
    # same Redis for a Redis journal), "memory", or a redis:// URL shared by every replica.
    quota_store: str = ""
    # What a request does while the Redis quota store cannot be reached: "open" lets it through
    # uncounted (the default: quotas share capacity fairly, keys still authenticate), "closed"
    # refuses it with UNAVAILABLE.
    quota_store_failure: str = "open"
    # Prometheus metrics at /metrics: HOST:PORT of a port of their own (loopback by default),
    # "http" to serve them on the HTTP door's port, or "" for no metrics at all.
    metrics_listen: str = "localhost:9464"
    # OpenTelemetry traces (needs the `tokenwire[otel]` extra): "off" (the default) or "on".
    tracing: str = "off"
    # Where spans go when tracing is on: an OTLP/HTTP traces endpoint such as
    # "http://127.0.0.1:4318/v1/traces"; "" keeps them in this process (for an embedded tracer).
    otlp_endpoint: str = ""
    # Log lines as "text" (the default) or "json" (one JSON object a line; one per stream with
    # its figures), redacted the same way.
    log_format: str = "text"
    # The event loop the server runs on: "uvloop" (less CPU per chunk), "asyncio" (the standard
    # library's), or "auto": uvloop where it is installed (a dependency except on Windows). The
    # slow-reader bound holds on both (README "Performance", bench/slow_reader_probe.py).
    event_loop: str = "auto"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    provider: str
    model: str
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    fallbacks: tuple[str, ...] = ()
    # Retries of this route when it fails before its first token with a retryable error.
    max_retries: int = 2
    # The longest wait before a retry; a provider asking for longer is not retried (fallbacks are
    # tried, or the caller gets the provider's retry-after).
    max_retry_wait_seconds: float = 10.0
    # Whether the caller's trace context (`traceparent`) goes to the provider with the request,
    # when tracing is on. Off by default: our trace ids are nothing a provider needs. Only the
    # anthropic provider sends it (its SDK does); see the README's "Tracing".
    trace_upstream: bool = False


@dataclass(frozen=True, slots=True)
class Price:
    """What a route's tokens cost, per million, in the operator's currency (`[prices.ROUTE]`)."""

    input: float = 0.0
    output: float = 0.0
    cache_read: float = 0.0
    cache_write: float = 0.0


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    routes: Mapping[str, RouteConfig]
    prices: Mapping[str, Price] = field(default_factory=dict)


# The built-in routes: a simulated model, plus routes that script faults so that client
# developers can test their error handling against a real server.
DEFAULT_ROUTES: dict[str, dict[str, Any]] = {
    "sim": {
        "provider": "simulated",
        "model": "tokenwire-sim-1",
        "description": "Simulated model: deterministic text at a steady pace, no API key.",
    },
    "sim-error": {
        "provider": "simulated",
        "model": "tokenwire-sim-1",
        "description": "Fails with a provider error (UNAVAILABLE) after 8 text chunks.",
        "options": {"fail_after_chunks": 8, "fail_with": "unavailable"},
    },
    "sim-down": {
        "provider": "simulated",
        "model": "tokenwire-sim-1",
        "description": "Fails before the first token (UNAVAILABLE, no messages).",
        "options": {"fail_after_chunks": 0, "fail_with": "unavailable"},
    },
    "sim-stall": {
        "provider": "simulated",
        "model": "tokenwire-sim-1",
        "description": "Goes silent after 5 chunks for 30 s, then times out (UNAVAILABLE).",
        "options": {"stall_after_chunks": 5, "stall_seconds": 30.0},
    },
    "sim-slow-start": {
        "provider": "simulated",
        "model": "tokenwire-sim-1",
        "description": "Takes 5 s to the first token, then streams normally.",
        "options": {"first_token_ms": 5000},
    },
}


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Builds the effective configuration; raises ConfigError with a precise message."""
    data: dict[str, Any] = {}
    where = "built-in defaults"
    if path is not None:
        where = str(path)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    unknown = set(data) - {"server", "routes", "prices"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected server, routes, prices")

    server_values: dict[str, Any] = dict(_table(data, "server", where))
    for name, value in _env_overrides(env or {}).items():
        server_values[name] = value
    server_values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    server = _build_server(server_values, where)

    routes = build_routes(_table(data, "routes", where) if "routes" in data else DEFAULT_ROUTES, where)
    return Config(server=server, routes=routes, prices=build_prices(_table(data, "prices", where), routes, where))


def build_prices(tables: Mapping[str, Any], routes: Mapping[str, RouteConfig], where: str) -> dict[str, Price]:
    """`[prices.ROUTE]` tables: input, output, cache_read, cache_write per million tokens."""
    prices: dict[str, Price] = {}
    names = {f.name for f in dataclasses.fields(Price)}
    for route, spec in tables.items():
        if route not in routes:
            raise ConfigError(f"{where}: [prices.{route}] names no route")
        if not isinstance(spec, dict) or set(spec) - names:
            raise ConfigError(f"{where}: [prices.{route}] takes only {sorted(names)}")
        for key, value in spec.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
                raise ConfigError(f"{where}: [prices.{route}] {key} must be a price per million tokens, >= 0")
        prices[route] = Price(**{k: float(v) for k, v in spec.items()})
    return prices


def build_routes(tables: Mapping[str, Any], where: str) -> dict[str, RouteConfig]:
    """Checks `[routes.NAME]` tables and the fallbacks between them."""
    routes = {name: _build_route(name, spec, where) for name, spec in tables.items()}
    if not routes:
        raise ConfigError(f"{where}: [routes] is empty; configure at least one route")
    for route in routes.values():
        for fallback in route.fallbacks:
            if fallback == route.name:
                raise ConfigError(f"{where}: route {route.name!r} falls back to itself")
            if route.fallbacks.count(fallback) > 1:
                raise ConfigError(f"{where}: route {route.name!r} lists fallback {fallback!r} twice")
            if fallback not in routes:
                raise ConfigError(f"{where}: route {route.name!r} falls back to unknown route {fallback!r}")
    return routes


# Variables of this prefix that are not [server] keys: the config file, and the demo client's target.
_OTHER_ENV = frozenset({ENV_PREFIX + "CONFIG", ENV_PREFIX + "TARGET", ENV_PREFIX + "WORKER"})


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """TOKENWIRE_* variables that set nothing: most likely misspelt."""
    known = {ENV_PREFIX + name.upper() for name in _SERVER_FIELDS} | _OTHER_ENV
    return sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return value


_SERVER_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
# Sane ranges for the numeric settings; gRPC takes several of them as 32-bit numbers.
_BOUNDS: dict[str, tuple[float, float]] = {
    "max_request_bytes": (1024, 512 * 1024 * 1024),
    "max_metadata_bytes": (1024, 1024 * 1024),
    "max_concurrent_streams": (1, 1_000_000),
    "shutdown_grace_seconds": (0.1, 3600),
    "max_stream_duration_seconds": (1, 7 * 86_400),
    "heartbeat_interval_seconds": (0, 3600),
    "keepalive_time_seconds": (1, 86_400),
    "keepalive_timeout_seconds": (1, 3600),
    "keepalive_min_ping_interval_seconds": (1, 86_400),
    "workers": (1, 64),
    "max_resume_window_seconds": (1, 7 * 86_400),
    "journal_max_stream_messages": (16, 100_000_000),
    "journal_max_stream_bytes": (64 * 1024, 16 * 1024 * 1024 * 1024),
    "journal_max_total_bytes": (1024 * 1024, 1024 * 1024 * 1024 * 1024),
    "http_idle_timeout_seconds": (1, 3600),
    "http_body_timeout_seconds": (1, 3600),
    "http_write_timeout_seconds": (1, 3600),
    "keys_reload_seconds": (0, 3600),
}


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _SERVER_FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None or raw == "":
            continue
        values[name] = _coerce(name, raw, f"environment variable {ENV_PREFIX + name.upper()}")
    return values


def _coerce(name: str, raw: str, where: str) -> Any:
    kind = _SERVER_FIELDS[name].type
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} is not a valid {kind}") from None
    return raw


def _build_server(values: Mapping[str, Any], where: str) -> ServerConfig:
    unknown = set(values) - set(_SERVER_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown [server] key(s) {sorted(unknown)}")
    checked: dict[str, Any] = {}
    for name, value in values.items():
        kind = _SERVER_FIELDS[name].type
        ok = (
            (kind == "int" and isinstance(value, int) and not isinstance(value, bool))
            or (kind == "float" and isinstance(value, int | float) and not isinstance(value, bool))
            or (kind == "str" and isinstance(value, str))
        )
        if not ok:
            raise ConfigError(f"{where}: [server] {name} must be a {kind}, got {value!r}")
        if kind in ("int", "float"):
            low, high = _BOUNDS[name]
            # Bounds first: math.isfinite overflows on integers beyond a float's range.
            if not (low <= value <= high and math.isfinite(value)):
                raise ConfigError(f"{where}: [server] {name} must be from {low:g} to {high:g}, got {value!r}")
        checked[name] = float(value) if kind == "float" else value
    server = ServerConfig(**checked)
    if server.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where}: [server] log_level must be DEBUG, INFO, WARNING or ERROR")
    if server.event_loop not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(f'{where}: [server] event_loop must be "auto", "asyncio" or "uvloop"')
    if server.journal != "memory" and not server.journal.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f'{where}: [server] journal must be "memory" or a redis:// URL')
    if not re.fullmatch(r".+:\d+", server.listen):
        raise ConfigError(f"{where}: [server] listen must be HOST:PORT, got {server.listen!r}")
    if server.http_listen and not re.fullmatch(r".+:\d+", server.http_listen):
        raise ConfigError(f'{where}: [server] http_listen must be HOST:PORT or "", got {server.http_listen!r}')
    _check_operator_settings(server, where)
    for origin in filter(None, (o.strip() for o in server.http_cors_origins.split(","))):
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"{where}: [server] http_cors_origins: {origin!r} is not an origin (scheme://host[:port])"
            )
    return server


def _check_operator_settings(server: ServerConfig, where: str) -> None:
    if server.quota_store not in ("", "memory") and not server.quota_store.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        raise ConfigError(f'{where}: [server] quota_store must be "", "memory" or a redis:// URL')
    choices = {
        "quota_store_failure": ("open", "closed"),
        "tracing": ("off", "on"),
        "log_format": ("text", "json"),
    }
    for name, allowed in choices.items():
        if getattr(server, name) not in allowed:
            raise ConfigError(f"{where}: [server] {name} must be one of {', '.join(allowed)}")
    if server.metrics_listen not in ("", "http") and not re.fullmatch(r".+:\d+", server.metrics_listen):
        raise ConfigError(f'{where}: [server] metrics_listen must be HOST:PORT, "http" or ""')


def _build_route(name: str, spec: Any, where: str) -> RouteConfig:
    if not _ROUTE_NAME.fullmatch(name):
        raise ConfigError(f"{where}: route name {name!r} must be 1-128 of letters, digits and ._:/-")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: [routes.{name}] must be a table")
    unknown = set(spec) - {
        "provider",
        "model",
        "description",
        "options",
        "fallbacks",
        "trace_upstream",
        *_ROUTE_NUMBERS,
    }
    if unknown:
        raise ConfigError(f"{where}: [routes.{name}] unknown key(s) {sorted(unknown)}")
    for key in ("provider", "model"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ConfigError(f"{where}: [routes.{name}] needs a non-empty string {key!r}")
    options = spec.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: [routes.{name}] options must be a table")
    fallbacks = spec.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
        raise ConfigError(f"{where}: [routes.{name}] fallbacks must be a list of route names")
    numbers: dict[str, Any] = {}
    for key, (kind, low, high) in _ROUTE_NUMBERS.items():
        if key not in spec:
            continue
        value = spec[key]
        accepted = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, accepted) or not low <= value <= high:
            raise ConfigError(f"{where}: [routes.{name}] {key} must be a number from {low:g} to {high:g}")
        numbers[key] = kind(value)
    trace_upstream = spec.get("trace_upstream", False)
    if not isinstance(trace_upstream, bool):
        raise ConfigError(f"{where}: [routes.{name}] trace_upstream must be true or false")
    return RouteConfig(
        name=name,
        provider=spec["provider"],
        model=spec["model"],
        description=str(spec.get("description", "")),
        options=dict(options),
        fallbacks=tuple(fallbacks),
        trace_upstream=trace_upstream,
        **numbers,
    )


# Route keys that are numbers: type and range.
_ROUTE_NUMBERS: dict[str, tuple[type, float, float]] = {
    "max_retries": (int, 0, 10),
    "max_retry_wait_seconds": (float, 0.0, 3600.0),
}
