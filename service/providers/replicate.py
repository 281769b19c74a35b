"""Replicate: a language model run as a prediction, its output streamed by server-sent events.

One attempt is three steps, all through tokenwire's own transport (`service.providers.http1`):
1. `POST /v1/models/{owner}/{name}/predictions` (a model) or `POST /v1/predictions` with a
   `version` (a version id), with `"stream": true` and the model's input built from the
   conversation (the input's field names are options: Replicate's models each name their own);
2. `GET` of the `urls.stream` the created prediction names, an absolute URL, with
   `Accept: text/event-stream` and `Cache-Control: no-store`; its body is read raw by the shared
   read loop (`HTTPProvider`), through the decoder here (`EventDecoder`, which keeps the `id:` of
   each event: the shared SSE decoder drops ids, and blank output tokens);
3. after `done`, a bounded `GET` of `urls.get` (again every 0.1 s while the prediction has not
   settled) for its `metrics` (token counts: Replicate reports usage nowhere else), unless
   `fetch_usage = false`. Counts it does not report
   are left unknown, and the gateway then estimates them from the text and marks them estimated.

Events: `output` is text (raw, not JSON; several `data:` lines are one token with line breaks);
`logs` are the model's own prints and are skipped; `error` is the prediction failing (mapped,
retryable: Replicate's failures mid-run are its workers'); `done` ends the stream, its data `{}`
on success, `{"reason": "canceled"}` or `{"reason": "error"}` when the prediction did not
succeed: those are errors, never a finish (the SDK's iterator raises nothing for them). A `done`
with a reason we do not know finishes as OTHER with the reason kept raw. Replicate has no finish
reason beyond that: a normal end is STOP with raw reason "done", and an answer cut by its
max-tokens input cannot be told from one that ended by itself (Replicate does not say).

Every event Replicate sends carries an `id:`. One that does not (or a stream whose body ends, is
cut, or stalls before `done`) is a broken stream, never a finished one. The last id is kept, but
a cut stream is not reconnected with `Last-Event-ID`: Replicate does not document that its stream
endpoint resumes from it, and a reconnect it answered from the start would repeat tokens the
caller already has. The router owns retries (before the first delta only); one attempt is one
prediction.

Cancel: when the caller leaves, or the stream fails in any way before `done` or an `error`
event, the stream's connection is closed and `urls.cancel` is POSTed in the background (bounded by
`cancel_timeout_seconds`; the caller's cancel never waits for it), so that the prediction stops
running and billing. A caller that leaves while the prediction is being created (before its id
is known) has it cancelled as soon as the create's answer names it.

SSRF and the key: the stream, get and cancel URLs come from Replicate's answer, and the key goes
with them. Each is followed only when its origin is the API base's, or (https only) a host in
`stream_hosts`; with Replicate's own base URL, `*.replicate.com` and `*.replicate.net` are
allowed too (where it serves streams). Any other stream URL is refused as a protocol error and
the prediction cancelled; a get or cancel URL elsewhere is replaced by the API base's own path.

The `replicate` SDK (the `tokenwire[replicate]` extra, imported when a Replicate route is
configured) is used for one thing: parsing the route's model reference with its own grammar
(`ModelVersionIdentifier.parse`, the `owner/name[:version]` its `async_stream` takes). Nothing is
sent through it, for what it does (replicate 1.0.7): it sends through legacy `httpx`, so not
through tokenwire's transport and pool; its transport retries GETs (the stream's too) on 429, 503
and 504 up to 10 times, a second retry owner; its event decoder drops events before the first
id silently, raises `RuntimeError` with the error event's raw text, raises nothing for a `done`
whose reason is canceled or error, and fails on an unknown event type; and its iterator builds a
pydantic model per event. Per chunk (bench/parse_cost.py, 2000 deltas, 2 shared cores) this path
costs 3.9-4.2 us of CPU and the SDK's `async_stream` 10.3-10.6 us: under the ~20 us past which
cost alone would rule it out, so it is the transport, the retries and the event semantics above,
not the CPU, that keep it off the stream path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
import orjson

from service.config import ConfigError, RouteConfig
from service.errors import ErrorCode, GatewayError, invalid_request, register_secret, stream_truncated
from service.events import (
    EventStream,
    Finished,
    FinishReason,
    GenerationRequest,
    ProviderEvent,
    Role,
    TextDelta,
    Usage,
)
from service.providers.base import bounds, read_options, vendor_sdk
from service.providers.sse import SSEDecoder
from service.providers.upstream import (
    STATUS_CODES,
    ConnectionOptions,
    ErrorTable,
    HTTPProvider,
    HTTPSettings,
    json_or_none,
    loads,
    provider_text,
    status_error,
    token_count,
)

DEFAULT_BASE_URL = "https://api.replicate.com"
# Where Replicate serves streams when the route uses its own API (stream.replicate.com,
# streaming-api.svc.*.replicate.net): https only.
_REPLICATE_STREAM_DOMAINS = (".replicate.com", ".replicate.net")
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
# Prediction statuses that mean it did not succeed (the prediction's own word after `done`).
_FAILED_STATUSES = frozenset({"failed", "canceled", "aborted"})
# Statuses of a prediction that has not settled yet: its metrics are still to come.
_UNSETTLED_STATUSES = frozenset({"starting", "processing"})
# The first wait between two reads of an unsettled prediction, doubled each time up to the cap.
_SETTLE_POLL_SECONDS = 0.1
_SETTLE_POLL_MAX_SECONDS = 0.8

ERRORS = ErrorTable(
    statuses={
        **STATUS_CODES,
        # Payment required: the server's Replicate account cannot pay; not the caller's fault,
        # and no retry mends it.
        402: ErrorCode.PROVIDER_AUTH_FAILED,
    },
)


@dataclass(frozen=True, slots=True)
class ReplicateOptions(ConnectionOptions):
    """A Replicate route's options (`[routes.NAME.options]`)."""

    api_key_env: str = "REPLICATE_API_TOKEN"
    base_url: str = DEFAULT_BASE_URL
    # A version id to run (instead of the model's latest); also `model = "owner/name:version"`.
    version: str = ""
    # Other hosts a stream URL may point to, comma-separated: ".example.com" (https, any
    # subdomain), "stream.example.com" (https), or a whole origin ("http://10.0.0.5:8080").
    stream_hosts: str = ""
    # The model input's field names ("" leaves the value out; system_field "": the system
    # prompt goes before the prompt). Defaults: Replicate's Llama and Claude language models.
    prompt_field: str = "prompt"
    system_field: str = "system_prompt"
    max_tokens_field: str = "max_tokens"
    temperature_field: str = "temperature"
    top_p_field: str = "top_p"
    stop_field: str = "stop_sequences"
    seed_field: str = "seed"
    # Stop sequences as one comma-separated string (Llama's inputs) or as a list.
    stop_format: str = bounds("comma", choices=("comma", "list"))
    # After `done`, read the prediction's metrics for its token counts (bounded by the timeout).
    fetch_usage: bool = True
    usage_timeout_seconds: float = bounds(2.0, minimum=0.05, maximum=60.0)
    # The metrics that hold the counts: a model may record its own (cog's record_metric).
    input_tokens_metric: str = "input_token_count"
    output_tokens_metric: str = "output_token_count"
    cached_tokens_metric: str = ""
    # How long a background cancel of an abandoned prediction may take.
    cancel_timeout_seconds: float = bounds(5.0, minimum=0.1, maximum=60.0)


# --- framing -------------------------------------------------------------------------------------


class EventDecoder(SSEDecoder):
    """Server-sent events with their ids, for the shared read loop: the shared framing, with
    Replicate's block rule.

    Each event comes out as (name, data) where name is `event` + b"\\n" + `id` when the event
    carried an id (an SSE field name never holds a line end, so the split is unambiguous) and the
    bare `event` when it did not. Unlike the shared decoder it dispatches events whose data is
    blank: an output token may be a space or a line break.
    """

    __slots__ = ()

    @staticmethod
    def parse_block(block: bytes) -> tuple[bytes, bytes] | None:
        return _parse_block(block)


def _parse_block(block: bytes) -> tuple[bytes, bytes] | None:
    name = b""
    event_id = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # blank, or a ":" comment (keep-alive)
            continue
        key, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if key == b"data":
            data.append(value)
        elif key == b"event":
            name = value
        elif key == b"id" and b"\0" not in value:
            event_id = value
    if not data and not name:
        return None
    return (name + b"\n" + event_id if event_id else name), b"\n".join(data)


# --- events --------------------------------------------------------------------------------------


def _error_text(data: bytes) -> str:
    """An error event's message: `{"detail": ...}` (or `error`, `message`) JSON, or plain text."""
    try:
        body: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        return provider_text(data.decode("utf-8", "replace"))
    if isinstance(body, dict):
        for key in ("detail", "error", "message", "title"):
            if isinstance(body.get(key), str):
                return provider_text(body[key])
    return provider_text(body if isinstance(body, str) else "")


def _failed(kind: str, why: str) -> GatewayError:
    return GatewayError(ErrorCode.PROVIDER_UNAVAILABLE, f"the prediction {why}", provider=kind)


class StreamParser:
    """Replicate's events -> text deltas and one Finished."""

    __slots__ = ("done", "kind", "last_id", "out", "prediction_id", "raw_reason", "request_id", "terminal")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.out: list[ProviderEvent] = []
        self.done = False
        self.request_id = ""
        self.prediction_id = ""
        self.raw_reason: str | None = None
        self.last_id = b""
        # The prediction ended at Replicate (done or an error event): nothing to cancel.
        self.terminal = False

    def handle(self, name: bytes, data: bytes) -> None:
        event, marked, event_id = name.partition(b"\n")
        if not marked:
            raise GatewayError(
                ErrorCode.PROVIDER_PROTOCOL_ERROR,
                "the provider sent an event without an id (every Replicate event carries one)",
                provider=self.kind,
            )
        self.last_id = event_id
        if event == b"output":
            if data:
                self.out.append(TextDelta(data.decode("utf-8")))
        elif event == b"done":
            self.terminal = True
            body = loads(data, self.kind) if data.strip() else {}
            reason = body.get("reason")
            if reason == "canceled":
                raise _failed(self.kind, "was canceled at the provider before it completed")
            if reason == "error":
                raise _failed(self.kind, "failed at the provider (its stream ended with reason error)")
            if reason:
                # Only a done without a reason is a success; a reason Replicate has not
                # documented may be another way of failing, and a stream never looks finished
                # unless it is.
                raise GatewayError(
                    ErrorCode.PROVIDER_ERROR,
                    f"the prediction's stream ended with reason {provider_text(str(reason), 64)!r}, not a success",
                    provider=self.kind,
                )
            self.raw_reason = "done"
            self.done = True
        elif event == b"error":
            self.terminal = True
            text = _error_text(data)
            raise GatewayError(
                ErrorCode.PROVIDER_UNAVAILABLE,
                "the provider sent an error event in its stream: the prediction failed"
                + (f" ({text})" if text else ""),
                provider=self.kind,
            )
        # `logs` are the model's own prints; other event types carry nothing the contract relays.

    def finish(self) -> Finished:
        raw = self.raw_reason
        if raw is None:
            last = self.last_id.decode("utf-8", "replace")[:64] or "none"
            raise stream_truncated(
                self.kind, f"the provider's stream ended before its done event (last event id {last})"
            )
        return Finished(
            reason=FinishReason.STOP,
            raw_reason=raw,
            provider_request_id=self.prediction_id,
        )


# --- the request ---------------------------------------------------------------------------------


_SPEAKERS = {Role.USER: "User", Role.ASSISTANT: "Assistant", Role.TOOL: "Tool"}


def build_input(request: GenerationRequest, o: ReplicateOptions) -> dict[str, Any]:
    """The prediction's `input`: the prompt (the last user turn alone, or the conversation as a
    transcript ending in "Assistant:"), the system prompt, and the options the caller set."""
    system: list[str] = []
    turns: list[tuple[Role, str]] = []
    for message in request.messages:
        text = message.text or "".join(p.text for p in message.parts)
        if message.role is Role.SYSTEM:
            system.append(text)
        else:
            turns.append((message.role, text))
    if len(turns) == 1 and turns[0][0] is Role.USER:
        prompt = turns[0][1]
    else:
        prompt = "\n\n".join(f"{_SPEAKERS[role]}: {text}" for role, text in turns) + "\n\nAssistant:"
    values: dict[str, Any] = {}
    system_text = "\n\n".join(system)
    if system_text and not o.system_field:
        prompt = f"{system_text}\n\n{prompt}"
    values[o.prompt_field] = prompt
    if system_text and o.system_field:
        values[o.system_field] = system_text
    optional: list[tuple[str, Any]] = [
        (o.max_tokens_field, request.max_output_tokens),
        (o.temperature_field, request.temperature),
        (o.top_p_field, request.top_p),
        (o.seed_field, request.seed),
    ]
    if request.stop_sequences and o.stop_field:
        stops = list(request.stop_sequences)
        if o.stop_format == "comma" and any("," in stop for stop in stops):
            # One comma-separated string cannot hold a comma: it would be two other sequences.
            raise invalid_request(
                "stop_sequences",
                "this route passes stop sequences as one comma-separated string; a sequence cannot contain a comma",
            )
        optional.append((o.stop_field, ",".join(stops) if o.stop_format == "comma" else stops))
    for name, value in optional:
        if name and value is not None:
            values[name] = value
    return values


def _problem(body: object) -> tuple[str, dict[str, str] | None]:
    """Replicate's problem-details error body ({"title", "detail", "status"}) as the (type,
    {"message"}) the shared error builder reads."""
    if not isinstance(body, dict):
        return "", None
    title, detail = body.get("title"), body.get("detail")
    message = detail if isinstance(detail, str) else title if isinstance(title, str) else ""
    return provider_text(title, 64) if isinstance(title, str) else "", {"message": message}


@dataclass(frozen=True, slots=True)
class _Origins:
    """Where URLs from Replicate's answers may point (see the module's SSRF note)."""

    exact: frozenset[tuple[str, str, int]]
    https_hosts: frozenset[str]
    https_suffixes: tuple[str, ...]

    def allows(self, url: str) -> bool:
        # What urlsplit and the transport could read as two different hosts: never followed.
        if any(c in url for c in "\\ ") or not url.isprintable():
            return False
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        if scheme not in ("http", "https") or not host or parts.username is not None:
            return False
        port = port or (443 if scheme == "https" else 80)
        if (scheme, host, port) in self.exact:
            return True
        if scheme != "https" or port != 443:
            return False
        return host in self.https_hosts or host.endswith(self.https_suffixes)


def _origin_key(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _origins(o: ReplicateOptions, route: str) -> _Origins:
    exact = {_origin_key(o.base_url)}
    hosts: set[str] = set()
    suffixes: list[str] = []
    if o.base_url.rstrip("/") == DEFAULT_BASE_URL:
        suffixes += _REPLICATE_STREAM_DOMAINS
    for entry in (e.strip().lower() for e in o.stream_hosts.split(",")):
        if not entry:
            continue
        if "://" in entry:
            if not entry.startswith(("http://", "https://")):
                raise ConfigError(f"[routes.{route}] options.stream_hosts: {entry!r} is not an http(s) origin")
            exact.add(_origin_key(entry))
        elif "*" in entry:
            raise ConfigError(
                f"[routes.{route}] options.stream_hosts: {entry!r}: write a domain and its subdomains as "
                f"{'.' + entry.lstrip('*.')!r}, without *"
            )
        elif entry.startswith("."):
            suffixes.append(entry)
        elif "/" in entry or ":" in entry:
            raise ConfigError(f"[routes.{route}] options.stream_hosts: {entry!r} is not a host name or an origin")
        else:
            hosts.add(entry)
    return _Origins(frozenset(exact), frozenset(hosts), tuple(suffixes))


@dataclass(slots=True)
class _Attempt:
    """One attempt's prediction: what its create answered, and its parser."""

    parser: StreamParser
    get_url: str = ""
    cancel_url: str = ""
    model: str = ""


@dataclass(slots=True)
class _Cancels:
    """The background cancels still running (held so they are not collected mid-flight)."""

    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    sent: int = 0


class ReplicateProvider(HTTPProvider):
    """A language model on Replicate; the route's `model` is `owner/name`, `owner/name:version`,
    or a bare version id."""

    kind = "replicate"
    errors = ERRORS
    request_id_header = "x-request-id"

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.options = o = read_options(ReplicateOptions, route)
        with vendor_sdk(route, "replicate SDK", "replicate"):
            from replicate.identifier import ModelVersionIdentifier
        if not o.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"[routes.{route.name}] options.base_url must be an http:// or https:// URL")
        if not o.prompt_field:
            raise ConfigError(
                f"[routes.{route.name}] options.prompt_field names the input the prompt goes in: it cannot be empty"
            )
        self.base = o.base_url.rstrip("/")
        model = route.model
        version = o.version
        if _VERSION_ID.match(model):
            version = version or model
            self.create_path = "/v1/predictions"
        else:
            try:
                owner, name, in_model = ModelVersionIdentifier.parse(model)
            except ValueError:
                raise ConfigError(
                    f"[routes.{route.name}] model must be owner/name, owner/name:version or a version id; got {model!r}"
                ) from None
            version = version or in_model or ""
            quote = urllib.parse.quote
            self.create_path = (
                "/v1/predictions"
                if version
                else f"/v1/models/{quote(owner, safe='')}/{quote(name, safe='')}/predictions"
            )
        self.version = version
        key = os.environ.get(o.api_key_env, "")
        if not key:
            raise ConfigError(
                f"[routes.{route.name}] environment variable {o.api_key_env} is not set; it holds the "
                "Replicate API token (change the variable's name with options.api_key_env)"
            )
        register_secret(key)
        self.headers = {
            "authorization": f"Bearer {key}",
            "content-type": "application/json",
            "accept": "application/json",
        }
        self.origins = _origins(o, route.name)
        self.settings = HTTPSettings.of(o, self.base, key)
        self.client = self.settings.http_client(httpx2.AsyncClient)
        self._attempts: dict[int, _Attempt] = {}
        self.cancels = _Cancels()

    # The shared read loop asks for the parser and the response separately; both belong to the
    # attempt `_stream` opened for this request (keyed by the request object, alive throughout).

    def _parser(self, request: GenerationRequest) -> StreamParser:
        return self._attempts[id(request)].parser

    def _framing(self) -> EventDecoder:
        return EventDecoder()

    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        return self._run(request, self._attempts[id(request)])

    async def _stream(self, request: GenerationRequest) -> EventStream:
        key = id(request)
        if key in self._attempts:
            raise RuntimeError("one request object streamed twice at once")
        attempt = self._attempts[key] = _Attempt(StreamParser(self.kind))
        try:
            async with contextlib.aclosing(super()._stream(request)) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        event = await self._settle(event, attempt, request)
                    yield event
        finally:
            del self._attempts[key]

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"input": build_input(request, self.options), "stream": True}
        if self.version:
            body["version"] = self.version
        return body

    @asynccontextmanager
    async def _run(self, request: GenerationRequest, attempt: _Attempt) -> AsyncIterator[httpx2.Response]:
        timeout = self.settings.timeout(request)
        stream_url = await self._create(request, attempt, timeout)
        response: httpx2.Response | None = None
        try:
            if not self.origins.allows(stream_url):
                raise GatewayError(
                    ErrorCode.PROVIDER_PROTOCOL_ERROR,
                    "the provider's stream URL is on a host this route does not allow (options.stream_hosts)",
                    provider=self.kind,
                )
            headers = self.headers | {"accept": "text/event-stream", "cache-control": "no-store"}
            del headers["content-type"]
            try:
                sent = self.client.build_request("GET", stream_url, headers=headers, timeout=timeout)
            except httpx2.InvalidURL:
                raise GatewayError(
                    ErrorCode.PROVIDER_PROTOCOL_ERROR,
                    "the provider's stream URL is not a valid URL",
                    provider=self.kind,
                ) from None
            response = await self.client.send(sent, stream=True)
            if response.status_code != 200:
                raw = await response.aread()
                raise self._status_error(response, raw)
            yield response
        except BaseException:
            # The caller left, or the stream failed short of its end: stop the prediction.
            if not attempt.parser.terminal:
                self._cancel_later(attempt)
            raise
        finally:
            if response is not None:
                await response.aclose()

    async def _create(self, request: GenerationRequest, attempt: _Attempt, limits: httpx2.Timeout) -> str:
        """Creates the prediction; returns its stream URL.

        The create runs in a task of its own: a caller who leaves while Replicate is still
        creating the prediction does not wait for it, but the prediction it creates is cancelled
        as soon as its answer names it (bounded by `cancel_timeout_seconds`).
        """
        body = orjson.dumps(self.request_body(request))
        sent = self.client.build_request(
            "POST", self.base + self.create_path, content=body, headers=self.headers, timeout=limits
        )
        creating = asyncio.get_running_loop().create_task(self._post(sent))
        try:
            response, raw = await asyncio.shield(creating)
        except asyncio.CancelledError:
            self._track(self._cancel_once_created(creating))
            raise
        if response.status_code not in (200, 201):
            raise self._status_error(response, raw)
        prediction = loads(raw, self.kind)
        prediction_id = prediction.get("id")
        urls = prediction.get("urls")
        if not isinstance(prediction_id, str) or not prediction_id or not isinstance(urls, dict):
            raise GatewayError(
                ErrorCode.PROVIDER_PROTOCOL_ERROR, "the provider's prediction has no id or urls", provider=self.kind
            )
        attempt.parser.prediction_id = prediction_id
        own = f"{self.base}/v1/predictions/{urllib.parse.quote(prediction_id, safe='')}"
        attempt.get_url = self._allowed(urls.get("get")) or own
        attempt.cancel_url = self._allowed(urls.get("cancel")) or f"{own}/cancel"
        model = prediction.get("model")
        attempt.model = model if isinstance(model, str) else ""
        stream = urls.get("stream")
        if not isinstance(stream, str) or not stream:
            # Created, but it will not stream (a model that does not support it): stop it.
            self._cancel_later(attempt)
            raise GatewayError(
                ErrorCode.PROVIDER_REJECTED_REQUEST,
                "the provider's model does not support streaming (its prediction has no stream URL)",
                provider=self.kind,
            )
        return stream

    async def _post(self, sent: httpx2.Request) -> tuple[httpx2.Response, bytes]:
        response = await self.client.send(sent, stream=True)
        try:
            return response, await response.aread()
        finally:
            await response.aclose()

    async def _cancel_once_created(self, creating: asyncio.Task[tuple[httpx2.Response, bytes]]) -> None:
        """Cancels the prediction a create whose caller has left goes on to make."""
        try:
            # As long as the create itself may take: a prediction it makes must not be left running.
            o = self.options
            async with asyncio.timeout(o.connect_timeout_seconds + o.read_timeout_seconds):
                response, raw = await creating
        except Exception:  # no prediction to cancel: the create failed or timed out
            creating.cancel()
            return
        if response.status_code not in (200, 201):
            return
        prediction = json_or_none(raw)
        prediction_id = prediction.get("id") if isinstance(prediction, dict) else None
        if not isinstance(prediction_id, str) or not prediction_id:
            return
        urls = prediction.get("urls")
        own = f"{self.base}/v1/predictions/{urllib.parse.quote(prediction_id, safe='')}"
        url = self._allowed(urls.get("cancel")) if isinstance(urls, dict) else ""
        await self._cancel(url or f"{own}/cancel")

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.cancels.tasks.add(task)
        task.add_done_callback(self.cancels.tasks.discard)

    def _allowed(self, url: object) -> str:
        return url if isinstance(url, str) and self.origins.allows(url) else ""

    def _status_error(self, response: httpx2.Response, raw: bytes) -> GatewayError:
        kind, problem = _problem(json_or_none(raw))
        return status_error(self.kind, response.status_code, response.headers, problem, ERRORS, kind=kind)

    async def _settle(self, finished: Finished, attempt: _Attempt, request: GenerationRequest) -> Finished:
        """The Finish with the prediction's token counts, when it reports them."""
        if not self.options.fetch_usage:
            return finished
        prediction = await self._read_prediction(attempt, request)
        if prediction is None:
            return finished
        status = prediction.get("status")
        if status in _FAILED_STATUSES:
            # Its stream said done, the prediction says otherwise: it is not an answer.
            raise _failed(self.kind, f"ended with status {status} at the provider")
        o = self.options
        metrics = prediction.get("metrics")
        usage = None
        if isinstance(metrics, dict):
            counts = [
                token_count(metrics.get(name)) if name else None
                for name in (o.input_tokens_metric, o.output_tokens_metric, o.cached_tokens_metric)
            ]
            if counts[0] is not None and counts[1] is not None:
                usage = Usage(input_tokens=counts[0], output_tokens=counts[1], cache_read_input_tokens=counts[2])
        model = prediction.get("model")
        return dataclasses.replace(
            finished, usage=usage, provider_model=model if isinstance(model, str) else attempt.model
        )

    async def _read_prediction(self, attempt: _Attempt, request: GenerationRequest) -> Mapping[str, Any] | None:
        """The prediction once it has settled (its metrics come with its final status), read
        again while it is still starting or processing (after 0.1 s, doubling up to 0.8 s); None when it cannot be read
        within `usage_timeout_seconds` (and the caller's deadline)."""
        limit = self.options.usage_timeout_seconds
        if request.deadline is not None:
            limit = min(limit, request.deadline - time.monotonic())
        if limit <= 0:
            return None
        headers = {k: v for k, v in self.headers.items() if k != "content-type"}
        latest: dict[str, Any] | None = None
        pause = _SETTLE_POLL_SECONDS
        try:
            async with asyncio.timeout(limit):
                while True:
                    response = await self.client.get(attempt.get_url, headers=headers, timeout=limit)
                    if response.status_code != 200:
                        return latest
                    value = orjson.loads(response.content)
                    if not isinstance(value, dict):
                        return latest
                    latest = value
                    if value.get("status") not in _UNSETTLED_STATUSES:
                        return latest
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _SETTLE_POLL_MAX_SECONDS)
        except (TimeoutError, httpx2.HTTPError, httpx2.InvalidURL, orjson.JSONDecodeError):
            return latest

    def _cancel_later(self, attempt: _Attempt) -> None:
        if not attempt.cancel_url:
            return
        attempt.parser.terminal = True  # one cancel per prediction
        self._track(self._cancel(attempt.cancel_url))

    async def _cancel(self, url: str) -> None:
        limit = self.options.cancel_timeout_seconds
        headers = {k: v for k, v in self.headers.items() if k != "content-type"}
        try:
            async with asyncio.timeout(limit):
                response = await self.client.post(url, headers=headers, timeout=limit)
            self.cancels.sent += response.status_code < 400
        except (TimeoutError, httpx2.HTTPError, httpx2.InvalidURL):
            # Best effort: the prediction then runs to its own end (Replicate bounds it).
            pass

    async def aclose(self) -> None:
        pending = list(self.cancels.tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=1.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.client.aclose()
