"""Any streaming HTTP endpoint that answers a JSON POST with server-sent events of JSON: the flows
that flow builders export (Stack AI's `stream_exported_flow`, ...) and internal LLM services.

Nothing vendor-specific is coded here: the route's options say how the request body is built (a
small template whose strings take the conversation's `{prompt}`, `{system}`, `{conversation}`,
`{model}`; a value that is exactly `{messages}` becomes the messages as a JSON list), where the key
goes, and where in each event's JSON the text, the error, the end, the finish reason and the usage
are (RFC 6901 JSON pointers). No SDK: the request goes through tokenwire's own transport
(`service.providers.http1`) and the body through the shared read loop and its SSE decoder.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson

from service.config import ConfigError, RouteConfig
from service.errors import GatewayError, register_secret
from service.events import Finished, FinishReason, GenerationRequest, ProviderEvent, Role, TextDelta, Usage
from service.providers.base import bounds, read_options
from service.providers.upstream import (
    DEFAULT_ERRORS,
    ConnectionOptions,
    HTTPProvider,
    HTTPSettings,
    json_or_none,
    loads,
    status_error,
    stream_error,
    token_count,
    truncated,
)

# Finish reasons as such endpoints commonly name them; anything else is OTHER, the raw value kept.
FINISH_REASONS: Mapping[str, FinishReason] = {
    "stop": FinishReason.STOP,
    "end": FinishReason.STOP,
    "end_turn": FinishReason.STOP,
    "complete": FinishReason.STOP,
    "completed": FinishReason.STOP,
    "done": FinishReason.STOP,
    "eof": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "max_tokens": FinishReason.LENGTH,
    "content_filter": FinishReason.CONTENT_FILTER,
    "safety": FinishReason.CONTENT_FILTER,
    "refusal": FinishReason.REFUSAL,
}
PLACEHOLDERS = ("prompt", "system", "conversation", "model", "messages")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class SSEEndpointOptions(ConnectionOptions):
    """An `sse-endpoint` route's options, besides `body` (a table, read apart)."""

    # The endpoint's whole URL, query included.
    url: str = ""
    # The variable holding the key; empty: no key is sent.
    api_key_env: str = ""
    # The header the key goes in, and what precedes it there ("" for the bare key).
    auth_header: str = "authorization"
    auth_scheme: str = "Bearer"
    # JSON pointers into each event's JSON ("" for none; "/" is the key "" of the root).
    text_pointer: str = "/text"
    error_pointer: str = "/error"
    end_pointer: str = ""
    finish_reason_pointer: str = ""
    input_tokens_pointer: str = ""
    output_tokens_pointer: str = ""
    cached_tokens_pointer: str = ""
    # SSE event names that are the end / an error whatever their data ("" for none); `end_data`:
    # a data line that is the end (e.g. "[DONE]").
    end_event: str = ""
    error_event: str = "error"
    end_data: str = ""
    # "delta": each event's text is new text; "cumulative": each holds the whole answer so far.
    text_mode: str = bounds("delta", choices=("delta", "cumulative"))
    # Whether a body that ends cleanly (its chunked terminator) is the end: for endpoints with no
    # end marker. A clean close in the middle of an answer then looks complete.
    end_on_close: bool = False


Pointer = tuple[str, ...] | None


def compile_pointer(text: str, route: str, key: str) -> Pointer:
    """An RFC 6901 pointer as its reference tokens; None for ""."""
    if not text:
        return None
    if not text.startswith("/"):
        raise ConfigError(f"[routes.{route}] options.{key} must be a JSON pointer starting with '/', got {text!r}")
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in text[1:].split("/"))


def resolve(value: Any, pointer: Pointer) -> Any:
    """The value at `pointer` in `value`; `_MISSING` when there is none."""
    if pointer is None:
        return _MISSING
    for token in pointer:
        if isinstance(value, dict):
            value = value.get(token, _MISSING)
            if value is _MISSING:
                return value
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return _MISSING
    return value


def _check_template(value: Any, route: str, where: str) -> None:
    if isinstance(value, str):
        for name in _PLACEHOLDER.findall(value):
            if name not in PLACEHOLDERS:
                raise ConfigError(
                    f"[routes.{route}] options.{where} has an unknown placeholder {{{name}}}; "
                    f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
                )
        if "{messages}" in value and value != "{messages}":
            raise ConfigError(f"[routes.{route}] options.{where}: {{messages}} must be the whole value")
    elif isinstance(value, Mapping):
        for key, inner in value.items():
            _check_template(inner, route, f"{where}.{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            _check_template(inner, route, f"{where}[{i}]")


def _inputs(request: GenerationRequest, model: str) -> dict[str, Any]:
    system: list[str] = []
    turns: list[str] = []
    messages: list[dict[str, str]] = []
    prompt = ""
    for message in request.messages:
        text = message.text or "".join(p.text for p in message.parts)
        messages.append({"role": message.role.value, "content": text})
        if message.role is Role.SYSTEM:
            system.append(text)
            continue
        turns.append(f"{message.role.value}: {text}")
        if message.role is Role.USER:
            prompt = text
    return {
        "prompt": prompt,
        "system": "\n\n".join(system),
        "conversation": "\n".join(turns),
        "model": model,
        "messages": messages,
    }


def render(template: Any, inputs: Mapping[str, Any]) -> Any:
    """The template with its placeholders filled (strings only; other values as they are)."""
    if isinstance(template, str):
        if template == "{messages}":
            return inputs["messages"]
        if "{" not in template:
            return template
        return _PLACEHOLDER.sub(
            lambda m: str(inputs[m[1]]) if m[1] in inputs and m[1] != "messages" else m[0], template
        )
    if isinstance(template, Mapping):
        return {key: render(value, inputs) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, inputs) for value in template]
    return template


class StreamParser:
    """JSON events -> text deltas and one Finished, by the route's pointers."""

    __slots__ = ("done", "emitted", "kind", "options", "out", "pointers", "raw_reason", "request_id", "usage")

    def __init__(self, kind: str, options: SSEEndpointOptions, pointers: dict[str, Pointer]) -> None:
        self.kind = kind
        self.options = options
        self.pointers = pointers
        self.out: list[ProviderEvent] = []
        self.done = False
        self.request_id = ""
        self.raw_reason: str | None = None
        self.usage: Usage | None = None
        # The answer's length so far, for cumulative text.
        self.emitted = 0

    def handle(self, name: bytes, data: bytes) -> None:
        o = self.options
        event_name = name.decode("utf-8", "replace")
        if o.end_data and data == o.end_data.encode():
            self._end("end")
            return
        if o.error_event and event_name == o.error_event:
            try:
                body: Any = orjson.loads(data)
            except orjson.JSONDecodeError:
                body = {"message": data.decode("utf-8", "replace")}
            error = resolve(body, self.pointers["error"])
            raise self._error(body if error is _MISSING else error)
        if not data.strip():
            return
        event = loads(data, self.kind)
        error = resolve(event, self.pointers["error"])
        if error is not _MISSING and error not in (None, False, "", {}):
            raise self._error(error)
        text = resolve(event, self.pointers["text"])
        if isinstance(text, str) and text:
            if o.text_mode == "cumulative":
                if len(text) < self.emitted:
                    raise ValueError("cumulative text shrank")
                text = text[self.emitted :]
                self.emitted += len(text)
            if text:
                self.out.append(TextDelta(text))
        elif text is not _MISSING and text is not None and not isinstance(text, str):
            raise TypeError("the text pointer names something that is not text")
        self._read_usage(event)
        end = resolve(event, self.pointers["end"])
        if (o.end_event and event_name == o.end_event) or (end is not _MISSING and end not in (None, False, "")):
            reason = resolve(event, self.pointers["finish"])
            if not isinstance(reason, str) or not reason:
                reason = end if isinstance(end, str) and end else "end"
            self._end(reason)

    def _read_usage(self, event: Any) -> None:
        counts = [token_count(resolve(event, self.pointers[k])) for k in ("input", "output", "cached")]
        if any(c is not None for c in counts):
            old = self.usage or Usage()
            self.usage = Usage(
                input_tokens=counts[0] if counts[0] is not None else old.input_tokens,
                output_tokens=counts[1] if counts[1] is not None else old.output_tokens,
                cache_read_input_tokens=counts[2] if counts[2] is not None else old.cache_read_input_tokens,
            )

    def _error(self, error: Any) -> GatewayError:
        body = error if isinstance(error, dict) else {"message": error if isinstance(error, str) else ""}
        return stream_error(self.kind, body, DEFAULT_ERRORS)

    def _end(self, reason: str) -> None:
        self.raw_reason = reason
        self.done = True

    def finish(self) -> Finished:
        raw = self.raw_reason
        if raw is None:
            if not self.options.end_on_close:
                raise truncated(self.kind)
            raw = "eof"
        return Finished(
            reason=FINISH_REASONS.get(raw, FinishReason.OTHER),
            raw_reason=raw,
            usage=self.usage,
            provider_request_id=self.request_id,
        )


class SSEEndpointProvider(HTTPProvider):
    """A streaming JSON-over-SSE endpoint described by its route's options; the route's `model` is
    only a name (it fills `{model}` in the body)."""

    kind = "sse-endpoint"
    request_id_header = "x-request-id"

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        template = route.options.get("body", {"prompt": "{prompt}"})
        if not isinstance(template, Mapping):
            raise ConfigError(f"[routes.{route.name}] options.body must be a table (the request body's template)")
        _check_template(template, route.name, "body")
        self.template = dict(template)
        rest = {k: v for k, v in route.options.items() if k != "body"}
        self.options = o = read_options(SSEEndpointOptions, dataclasses.replace(route, options=rest))
        if not o.url.startswith(("http://", "https://")):
            raise ConfigError(f"[routes.{route.name}] options.url (an http:// or https:// URL) is required")
        key = ""
        if o.api_key_env:
            key = os.environ.get(o.api_key_env, "")
            if not key:
                raise ConfigError(
                    f"[routes.{route.name}] environment variable {o.api_key_env} is not set; it holds the "
                    "endpoint's key (options.api_key_env)"
                )
            register_secret(key)
        self.headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if key:
            self.headers[o.auth_header.lower()] = f"{o.auth_scheme} {key}" if o.auth_scheme else key
        self.pointers = {
            "text": compile_pointer(o.text_pointer, route.name, "text_pointer"),
            "error": compile_pointer(o.error_pointer, route.name, "error_pointer"),
            "end": compile_pointer(o.end_pointer, route.name, "end_pointer"),
            "finish": compile_pointer(o.finish_reason_pointer, route.name, "finish_reason_pointer"),
            "input": compile_pointer(o.input_tokens_pointer, route.name, "input_tokens_pointer"),
            "output": compile_pointer(o.output_tokens_pointer, route.name, "output_tokens_pointer"),
            "cached": compile_pointer(o.cached_tokens_pointer, route.name, "cached_tokens_pointer"),
        }
        if self.pointers["text"] is None:
            raise ConfigError(f"[routes.{route.name}] options.text_pointer is required")
        if not (o.end_pointer or o.end_event or o.end_data or o.end_on_close):
            raise ConfigError(
                f"[routes.{route.name}] the endpoint's end is not described: set options.end_pointer, "
                "end_event or end_data (or end_on_close = true for an endpoint that has no end marker)"
            )
        parts = urllib.parse.urlsplit(o.url)
        origin = f"{parts.scheme}://{parts.netloc}"
        self.settings = HTTPSettings.of(o, origin, key)
        self.client = self.settings.http_client(httpx2.AsyncClient)

    def request_body(self, request: GenerationRequest) -> bytes:
        body: bytes = orjson.dumps(render(self.template, _inputs(request, self.route.model)))
        return body

    def _parser(self, request: GenerationRequest) -> StreamParser:
        return StreamParser(self.kind, self.options, self.pointers)

    def _send(self, request: GenerationRequest) -> AbstractAsyncContextManager[httpx2.Response]:
        return self._post(request)

    @asynccontextmanager
    async def _post(self, request: GenerationRequest) -> AsyncIterator[httpx2.Response]:
        sent = self.client.build_request(
            "POST",
            self.options.url,
            content=self.request_body(request),
            headers=self.headers,
            timeout=self.settings.timeout(request),
        )
        response = await self.client.send(sent, stream=True)
        try:
            if response.status_code != 200:
                body = json_or_none(await response.aread())
                raise status_error(self.kind, response.status_code, response.headers, body, DEFAULT_ERRORS)
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
