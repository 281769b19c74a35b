"""The built-in simulated model: deterministic, readable text at a configurable pace, no API key.

It behaves like a real provider where callers can see it: it honours max output tokens (finish
LENGTH), stop sequences (STOP_SEQUENCE, never streaming any part of the matched sequence), tools
(streamed tool-call deltas, finish TOOL_CALLS) and reasoning options (reasoning deltas with a
signature), and reports usage. It accepts every kind of content part and begins its answer by
describing what it received; asked for JSON it answers with a JSON object, for a schema with an
instance of it (see `service.providers.schema_instance`), and documents that ask for citations
are cited. Route options also script faults — an error after N chunks, a
stall, a slow first token — so client developers can test their error handling for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import zlib
from typing import Any

from service.config import RouteConfig
from service.errors import ErrorCode, GatewayError
from service.events import (
    ChatMessage,
    CitationDelta,
    CitationLocation,
    EventStream,
    Finished,
    FinishReason,
    GenerationRequest,
    Part,
    PartKind,
    ReasoningDelta,
    ReasoningEffort,
    ResponseFormatType,
    Role,
    Source,
    TextDelta,
    ToolCallDelta,
    ToolChoiceMode,
    ToolSpec,
    Usage,
)
from service.providers.base import ALL_SOURCES, MIB, Capabilities, Options, PromptCaching, Provider, media
from service.providers.schema_instance import instance_of

_ANY = ("http", "https")
# Every kind of part, from every source: the simulated model reads none of it, it describes it.
CAPABILITIES = Capabilities(
    images=media(dict.fromkeys(("image/png", "image/jpeg", "image/gif", "image/webp"), ALL_SOURCES), 32 * MIB, _ANY),
    documents=media(dict.fromkeys(("application/pdf", "text/plain"), ALL_SOURCES), 32 * MIB, _ANY),
    audio=media(
        dict.fromkeys(("audio/wav", "audio/mpeg", "audio/ogg", "audio/flac", "audio/webm"), ALL_SOURCES), 32 * MIB, _ANY
    ),
    prompt_caching=PromptCaching.EXPLICIT,
    # Both vendors' lifetimes, so that a request tested here passes on either.
    cache_ttls=(300.0, 1800.0, 3600.0),
    response_formats=frozenset(ResponseFormatType),
    citations=True,
    document_context=True,
)
# Prompt tokens a media part counts for, as a vendor would bill a small one.
_MEDIA_TOKENS = {PartKind.IMAGE: 258, PartKind.DOCUMENT: 1000, PartKind.AUDIO: 150}
# JSON answers stream this many characters per delta.
_JSON_PIECE = 16
_SENTENCES = (
    "Streaming lets a reader start on the first words while the model is still writing the rest.",
    "Each chunk carries a sequence number, so a gap in the numbers means data was lost.",
    "A stream ends with exactly one finish or error, and never just stops.",
    "When a caller hangs up, the gateway closes the provider's stream and the meter stops.",
    "Usage is reported as final totals, and an unknown count is never shown as zero.",
    "Errors say whose fault they are and whether a retry is likely to help.",
    "Time to first token matters more to a person waiting than the total time does.",
    "A simulated model is handy for tests, because it answers the same way every time.",
    "Tool calls arrive in pieces, and the pieces join into one JSON object.",
    "Backpressure means a slow reader slows the upstream instead of filling memory.",
)
_THOUGHTS = (
    "The question is about streaming, so I should explain what arrives first and why.",
    "I will keep the answer short and concrete, and mention what can go wrong.",
    "A reader cares about the first words, the order of the pieces and a clear ending.",
)
_REASONING_TOKENS = {ReasoningEffort.LOW: 12, ReasoningEffort.MEDIUM: 24, ReasoningEffort.HIGH: 48}

# Scripted faults: name -> (error code, provider HTTP status, retry-after seconds).
_FAULTS: dict[str, tuple[ErrorCode, int | None, float | None]] = {
    "unavailable": (ErrorCode.PROVIDER_UNAVAILABLE, 503, None),
    "overloaded": (ErrorCode.PROVIDER_UNAVAILABLE, 529, None),
    "rate_limited": (ErrorCode.PROVIDER_RATE_LIMITED, 429, 1.0),
    "truncated": (ErrorCode.PROVIDER_STREAM_TRUNCATED, None, None),
    "bad_request": (ErrorCode.PROVIDER_REJECTED_REQUEST, 400, None),
    "auth": (ErrorCode.PROVIDER_AUTH_FAILED, 401, None),
    # An unexpected exception rather than a classified error: shows the server's error firewall.
    "internal": (ErrorCode.INTERNAL, None, None),
}


def _words(sentences: tuple[str, ...], start: int, count: int) -> list[str]:
    """Whole sentences from `start` (cycling) until at least `count` words, as streamed tokens."""
    tokens: list[str] = []
    i = start
    while len(tokens) < count:
        for word in sentences[i % len(sentences)].split(" "):
            tokens.append(word if not tokens else " " + word)
        i += 1
    return tokens


# Long texts are read this many characters at a time (see _count_tokens and _text_crc): a
# slice split into words costs about ten times its size, a few hundred KiB here.
_SLICE_CHARS = 16 * 1024


def _count_tokens(text: str, slice_chars: int = _SLICE_CHARS) -> int:
    """Whitespace-separated words, as `len(text.split())` counts them, slice by slice.

    `split()` builds a list of every word: for a prompt of a few MiB that list and its strings
    were ten times the prompt's size, the largest part of what one large request cost.
    """
    if len(text) <= slice_chars:
        return len(text.split())
    count = 0
    for start in range(0, len(text), slice_chars):
        piece = text[start : start + slice_chars]
        count += len(piece.split())
        # A word that the slice boundary cuts in two was counted once in each slice.
        if start and not piece[0].isspace() and not text[start - 1].isspace():
            count -= 1
    return count


def _text_crc(text: str, slice_chars: int = _SLICE_CHARS) -> int:
    """`zlib.crc32(text.encode())`, without the whole text's UTF-8 copy at once."""
    crc = 0
    for start in range(0, len(text), slice_chars):
        crc = zlib.crc32(text[start : start + slice_chars].encode(), crc)
    return crc


def _last_text(messages: tuple[ChatMessage, ...], role: Role) -> str:
    for message in reversed(messages):
        if message.role is role:
            return message.text or " ".join(p.text for p in message.parts if p.kind is PartKind.TEXT)
    return ""


def _media_parts(request: GenerationRequest) -> list[Part]:
    return [p for m in request.messages for p in m.parts if p.kind is not PartKind.TEXT]


def describe(parts: list[Part]) -> str:
    """What the simulated model says it received, one clause per media part, in order."""
    clauses = []
    for part in parts:
        what = {PartKind.IMAGE: "an image", PartKind.DOCUMENT: "a document"}.get(part.kind, "a recording")
        if part.title:
            what += f" titled {part.title!r}"
        source = part.source
        if source is Source.DATA:
            assert part.data is not None
            where = f"{len(part.data):,} bytes inline"
        elif source is Source.URL:
            where = f"at {part.url[:80]}"
        else:
            where = f"file {part.file_id[:80]}"
        clauses.append(f"{what} ({part.media_type or 'type not given'}, {where})")
    if len(clauses) > 1:
        clauses[-1] = "and " + clauses[-1]
    return "I received " + (", " if len(clauses) > 2 else " ").join(clauses) + ". "


def _citations(request: GenerationRequest, answer_chars: int) -> list[CitationDelta]:
    """One citation of each document that asked for them, supporting the whole answer."""
    documents = [p for p in _media_parts(request) if p.kind is PartKind.DOCUMENT]
    out = []
    for index, doc in enumerate(documents):
        if not doc.citations:
            continue
        citation = CitationDelta(0, answer_chars, "", document_index=index, document_title=doc.title)
        if doc.media_type == "text/plain" and doc.data is not None:
            quoted = doc.data[:400].decode(errors="ignore").split("\n", 1)[0][:80]
            citation.cited_text = quoted
            citation.location, citation.start_index, citation.end_index = CitationLocation.CHARACTERS, 0, len(quoted)
        else:
            citation.location, citation.start_index, citation.end_index = CitationLocation.PAGES, 1, 2
        out.append(citation)
    return out


class SimulatedProvider(Provider):
    kind = "simulated"
    supports_tools = True
    supports_reasoning = True

    def __init__(self, route: RouteConfig) -> None:
        super().__init__(route)
        self.capabilities = CAPABILITIES
        o = Options(route)
        self.first_token_ms = o.number("first_token_ms", 200.0, minimum=0.0, maximum=600_000.0)
        # 0 streams as fast as the reader takes it.
        self.tokens_per_second = o.number("tokens_per_second", 40.0, minimum=0.0)
        self.answer_tokens = o.number("answer_tokens", 60, minimum=1, maximum=1_000_000)
        self.fail_after_chunks = o.optional_int("fail_after_chunks", minimum=0)
        self.fail_with = o.choice("fail_with", "unavailable", tuple(_FAULTS))
        self.stall_after_chunks = o.optional_int("stall_after_chunks", minimum=0)
        self.stall_seconds = o.number("stall_seconds", 30.0, minimum=0.0, maximum=86_400.0)
        o.done()

    def stream(self, request: GenerationRequest) -> EventStream:
        return _SimulatedStream(self, request).run()


class _SimulatedStream:
    """One simulated response: paces deltas on an absolute schedule so delays do not drift."""

    def __init__(self, provider: SimulatedProvider, request: GenerationRequest) -> None:
        self.p = provider
        self.request = request
        self.chunks = 0
        self.output_tokens = 0
        self.reasoning_tokens = 0
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.next_at = loop.time() + provider.first_token_ms / 1000.0
        self.interval = 1.0 / provider.tokens_per_second if provider.tokens_per_second else 0.0

    async def _pace(self) -> None:
        """Waits for the next delta's slot, then applies the route's scripted faults."""
        delay = self.next_at - self.loop.time()
        # sleep(0) even when late: a fast stream must still yield to the loop and to cancellation.
        await asyncio.sleep(max(delay, 0.0))
        self.next_at = max(self.next_at, self.loop.time()) + self.interval
        p = self.p
        if p.stall_after_chunks is not None and self.chunks == p.stall_after_chunks:
            await asyncio.sleep(p.stall_seconds)
            raise GatewayError(
                ErrorCode.PROVIDER_TIMEOUT,
                f"simulated provider sent no data for {p.stall_seconds:g} s",
                provider=p.kind,
            )
        if p.fail_after_chunks is not None and self.chunks == p.fail_after_chunks:
            code, http_status, retry_after = _FAULTS[p.fail_with]
            if code is ErrorCode.INTERNAL:
                # Deliberately unclassified, with a credential-shaped string in its text: the
                # firewall must turn it into INTERNAL with a correlation id and leak nothing.
                raise RuntimeError("simulated crash; Authorization: Bearer sim-not-a-real-token-0000")
            when = f"after {self.chunks} chunk(s)" if self.chunks else "before the first token"
            raise GatewayError(
                code,
                f"simulated provider fault {p.fail_with!r} {when}",
                provider=p.kind,
                provider_http_status=http_status,
                retry_after=retry_after,
            )
        self.chunks += 1

    def _at_limit(self) -> bool:
        """Whether max_output_tokens is spent; reasoning and tool-call tokens count too."""
        limit = self.request.max_output_tokens
        return limit is not None and self.output_tokens >= limit

    def _finished(self, reason: FinishReason, raw: str, stop_sequence: str = "") -> Finished:
        return Finished(
            reason,
            raw,
            stop_sequence=stop_sequence,
            usage=self._usage(),
            provider_request_id="sim-" + self.request.stream_id,
            provider_model=self.request.upstream_model,
        )

    async def run(self) -> EventStream:
        request = self.request
        last_user = _last_text(request.messages, Role.USER)
        start = request.seed if request.seed is not None else _text_crc(last_user)

        effort, budget = request.reasoning_effort, request.reasoning_budget_tokens
        if effort is not None or budget is not None:
            wanted = min(budget, 64) if budget is not None else _REASONING_TOKENS[effort or ReasoningEffort.MEDIUM]
            thought = _words(_THOUGHTS, start, wanted)[:wanted]
            for token in thought:
                if self._at_limit():
                    yield self._finished(FinishReason.LENGTH, "length")
                    return
                await self._pace()
                self.output_tokens += 1
                self.reasoning_tokens += 1
                yield ReasoningDelta(token)
            yield ReasoningDelta("", hashlib.sha256("".join(thought).encode()).hexdigest()[:48])

        tool = _chosen_tool(request)
        if tool is not None:
            arguments = json.dumps(_arguments_for(tool, last_user), ensure_ascii=False)
            call_id = "call_" + hashlib.sha256(f"{start}:{tool.name}".encode()).hexdigest()[:20]
            for i in range(0, len(arguments), 16):
                if self._at_limit():
                    # Like a real model cut off mid-call: the arguments are incomplete JSON.
                    yield self._finished(FinishReason.LENGTH, "length")
                    return
                await self._pace()
                self.output_tokens += 1
                yield ToolCallDelta(0, "" if i else call_id, "" if i else tool.name, arguments[i : i + 16])
            yield self._finished(FinishReason.TOOL_CALLS, "tool_calls")
            return

        fmt = request.response_format
        media_parts = _media_parts(request)
        if fmt is not None and fmt.type is not ResponseFormatType.TEXT:
            sentence = "".join(_words(_SENTENCES, start, 1)).strip()
            if fmt.type is ResponseFormatType.JSON_SCHEMA:
                value = instance_of(fmt.schema, sentence)
            else:
                value = {"answer": sentence, **({"received": describe(media_parts).strip()} if media_parts else {})}
            answer = json.dumps(value, ensure_ascii=False)
            tokens = [answer[i : i + _JSON_PIECE] for i in range(0, len(answer), _JSON_PIECE)]
        else:
            tokens = _words(_SENTENCES, start, self.p.answer_tokens)
            if media_parts:
                # The description first, as words streamed like the rest of the answer.
                words = describe(media_parts).rstrip().split(" ")
                tokens = [words[0], *(" " + w for w in words[1:]), " " + tokens[0], *tokens[1:]]
        answer_chars = 0
        stops = request.stop_sequences
        held = ""  # text that may be the start of a stop sequence, not streamed yet
        for token in tokens:
            if self._at_limit():
                if held:
                    yield TextDelta(held)
                yield self._finished(FinishReason.LENGTH, "length")
                return
            await self._pace()
            self.output_tokens += 1
            held += token
            if stops:
                match = _first_stop(held, stops)
                if match is not None:
                    index, stop = match
                    if index:
                        yield TextDelta(held[:index])
                    yield self._finished(FinishReason.STOP_SEQUENCE, "stop_sequence", stop)
                    return
                keep = _longest_stop_prefix(held, stops)
                ready, held = held[: len(held) - keep], held[len(held) - keep :]
            else:
                ready, held = held, ""
            if ready:
                answer_chars += len(ready)
                yield TextDelta(ready)
        if held:
            answer_chars += len(held)
            yield TextDelta(held)
        if media_parts:
            for citation in _citations(request, answer_chars):
                yield citation
        yield self._finished(FinishReason.STOP, "stop")

    def _usage(self) -> Usage:
        request = self.request
        prompt = sum(
            4
            + _count_tokens(m.text)
            + sum(_count_tokens(c.arguments_json) + 2 for c in m.tool_calls)
            + sum(_count_tokens(p.text) if p.kind is PartKind.TEXT else _MEDIA_TOKENS[p.kind] for p in m.parts)
            for m in request.messages
        )
        prompt += sum(8 + len(json.dumps(t.parameters)) // 4 for t in request.tools)
        return Usage(
            input_tokens=prompt,
            output_tokens=self.output_tokens,
            cache_read_input_tokens=0,
            cache_write_input_tokens=0,
            reasoning_tokens=self.reasoning_tokens,
        )


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    found: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (found is None or index < found[0]):
            found = (index, stop)
    return found


def _longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _chosen_tool(request: GenerationRequest) -> ToolSpec | None:
    tools, choice = request.tools, request.tool_choice
    if not tools or choice.mode is ToolChoiceMode.NONE:
        return None
    if request.messages[-1].role is Role.TOOL:
        return None  # the tool answered: now the model writes text
    if choice.mode is ToolChoiceMode.NAMED:
        return next(t for t in tools if t.name == choice.name)
    if choice.mode is ToolChoiceMode.REQUIRED:
        return tools[0]
    # Automatic: call the first tool the user's last message names, so a caller can steer it.
    last_user = _last_text(request.messages, Role.USER).lower()
    return next((t for t in tools if t.name.lower() in last_user), None)


_PLACEHOLDERS: dict[str, Any] = {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}


def _arguments_for(tool: ToolSpec, last_user: str) -> dict[str, Any]:
    properties = tool.parameters.get("properties", {})
    if not isinstance(properties, dict):
        return {}
    arguments: dict[str, Any] = {}
    for name, schema in properties.items():
        kind = schema.get("type") if isinstance(schema, dict) else None
        arguments[name] = last_user[:60] if kind == "string" else _PLACEHOLDERS.get(str(kind))
    return arguments
