"""tokenwire-demo: stream one answer from a tokenwire server into the terminal.

The last line of a successful run is a summary in a stable format, for scripts to parse:

    time to first token: 123.4 ms (server: 98.7 ms) · 38.2 tokens/s · finish: stop · usage: 12 in / 40 out

(on one line): the first time is what this client saw from sending the request to the first
delta, the server's from receiving it. Numbers that are unknown read "n/a", unknown token counts "?", and
"(estimated)" follows the usage when the server estimated it. Exit status: 0 on success,
1 on an error, 2 on a usage error, 130 when interrupted; with --json, the gRPC status code.

Durable streams: ``--durable`` asks for one and prints its id and resume token to stderr at
Start (the token is the user's own capability: anyone holding it can read or stop the
stream); ``--resume ID TOKEN [--after N]`` reads it again from a cursor, and with ``--poll``
reads it by long polling, a line per batch on stderr. Ctrl-C on a durable stream sends
Cancel, which stops the generation on the server too.

Beyond text: ``--image PATH`` and ``--document PATH`` (repeatable) send files with the prompt;
``--json-schema FILE`` asks for JSON matching the schema in FILE, and after the answer prints
"parsed JSON: ..." (or fails with exit status 1 when the answer does not parse); citations are
listed after the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToJson
from rich.console import Console

from tokenwire.v1 import generation_pb2 as pb

from ._client import DEFAULT_TARGET, AsyncClient, GenerationStream
from ._errors import APIStatusError, TokenwireError
from ._events import (
    Event,
    Finished,
    ReasoningDelta,
    Response,
    Started,
    TextDelta,
    ToolCallDelta,
    UsageSource,
)
from ._messages import build_request, document, image, json_schema, system, user

DEFAULT_PROMPT = "Explain in a few sentences why streaming LLM responses matters."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire-demo",
        description="Stream one answer from a tokenwire server.",
    )
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the user message (default: %(default)r)")
    parser.add_argument(
        "--target",
        default=os.environ.get("TOKENWIRE_TARGET", DEFAULT_TARGET),
        help="server address (default: $TOKENWIRE_TARGET or %(default)s)",
    )
    parser.add_argument("--model", default="sim", help="route name (default: %(default)s)")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max-tokens", type=int, help="most output tokens")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 to 2")
    parser.add_argument("--stop", action="append", default=[], help="a stop sequence (repeatable)")
    parser.add_argument("--timeout", type=float, help="deadline of the call, seconds")
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="send an image file with the prompt (repeatable)"
    )
    parser.add_argument(
        "--document", action="append", default=[], metavar="PATH", help="send a PDF or text file (repeatable)"
    )
    parser.add_argument("--cite", action="store_true", help="with --document: ask the model to cite the documents")
    parser.add_argument(
        "--json-schema", metavar="FILE", help="ask for JSON matching the JSON Schema in FILE; prints it parsed"
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help="ask for a durable stream: prints its id and resume token to stderr at Start",
    )
    parser.add_argument(
        "--resume", nargs=2, metavar=("ID", "TOKEN"), help="read a durable stream again instead of asking"
    )
    parser.add_argument("--after", type=int, default=0, help="with --resume: the last sequence already read")
    parser.add_argument("--poll", action="store_true", help="with --resume: read by long polling, batch by batch")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print the raw messages as JSON lines")
    mode.add_argument("--list", action="store_true", help="list the server's models")
    return parser


class _Screen:
    """Writes to the terminal, knowing whether stdout is at the start of a line."""

    def __init__(self) -> None:
        # Streamed pieces must reach the terminal as they are: no wrapping, no markup.
        self.out = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)
        self._at_line_start = True

    def write(self, text: str, style: str = "") -> None:
        if not text:
            return
        self.out.print(text, style=style, end="")
        self.out.file.flush()
        self._at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        if not self._at_line_start:
            self.write("\n")

    def error(self, message: str) -> None:
        self.end_line()
        self.err.print(message, style="red")


def _milliseconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def summary_line(
    response: Response,
    *,
    time_to_first_token: float | None,
    tokens_per_second: float | None,
) -> str:
    """The summary of a run; ``time_to_first_token`` as the client measured it."""
    usage = response.usage

    def count(tokens: int | None) -> str:
        return "?" if tokens is None else str(tokens)

    estimated = " (estimated)" if usage.source is UsageSource.ESTIMATED else ""
    rate = "n/a" if tokens_per_second is None else f"{tokens_per_second:.1f}"
    server = _milliseconds(response.timing.time_to_first_token)
    return " · ".join(
        [
            f"time to first token: {_milliseconds(time_to_first_token)} (server: {server})",
            f"{rate} tokens/s",
            f"finish: {response.finish_reason}",
            f"usage: {count(usage.input_tokens)} in / {count(usage.output_tokens)} out{estimated}",
        ]
    )


def _describe(error: TokenwireError, target: str) -> str:
    if not isinstance(error, APIStatusError):
        return f"error: {error}"
    if error.code is grpc.StatusCode.UNAVAILABLE and not error.reason and error.last_sequence is None:
        # No tokenwire server answered at all: gRPC's own text says little to a person.
        return f"error: cannot reach a tokenwire server at {target} (is `make run` going?) · retryable"
    if not error.retryable:
        retry = "not retryable"
    elif error.retry_after is None:
        retry = "retryable"
    else:
        retry = f"retryable after {error.retry_after:g} s"
    return f"error: {error} · {retry}"


async def _list_models(client: AsyncClient, screen: _Screen) -> int:
    # Plain aligned columns: descriptions stay on one line, in a terminal or a pipe alike.
    rows = [("MODEL", "SERVED BY", "FEATURES", "DESCRIPTION")]
    for model in await client.list_models():
        flags = (("tools", model.supports_tools), ("reasoning", model.supports_reasoning))
        features = [name for name, on in flags if on]
        for kind, support in (("images", model.images), ("documents", model.documents), ("audio", model.audio)):
            if support is not None and support.media_types:
                features.append(kind)
        if "json_schema" in model.response_formats:
            features.append("json-schema")
        if model.supports_citations:
            features.append("citations")
        fallbacks = f" (falls back to {', '.join(model.fallbacks)})" if model.fallbacks else ""
        rows.append(
            (
                model.name,
                f"{model.provider}/{model.upstream_model}",
                ",".join(features) or "-",
                model.description + fallbacks,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        screen.out.print("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[3]]))
    return 0


def _announce(started: Started, screen: _Screen) -> None:
    """Tells the user how to come back to a durable stream: on stderr, so stdout stays the answer."""
    if not started.durable:
        return
    window = "n/a" if started.resume_window is None else f"{started.resume_window:g} s"
    screen.err.print(
        f"durable stream {started.stream_id} (window {window}); resume with: "
        f"--resume {started.stream_id} {started.resume_token} --after N",
        style="dim",
    )


async def _print_json(stream: GenerationStream, screen: _Screen, target: str) -> int:
    async with stream:
        try:
            async for message in stream.raw_messages:
                line = MessageToJson(message, indent=None, preserving_proto_field_name=False)
                print(line, flush=True)
        except APIStatusError as error:
            screen.error(_describe(error, target))
            code: int = error.code.value[0]
            return code
    return 0


async def _stream_text(stream: GenerationStream, screen: _Screen, *, parse_json: bool = False) -> int:
    started_at = time.perf_counter()
    first_delta_at: float | None = None
    previous: Event | None = None
    async with stream:
        async for event in stream:
            if isinstance(event, Started):
                _announce(event, screen)
            if not isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta):
                continue
            if first_delta_at is None:
                first_delta_at = time.perf_counter()
            # Reasoning, answer and each tool call get lines of their own.
            if previous is not None and type(event) is not type(previous):
                screen.end_line()
            previous = event
            match event:
                case TextDelta():
                    screen.write(event.text)
                case ReasoningDelta(redacted_data=data) if data:
                    screen.write("[redacted reasoning]", style="dim")
                case ReasoningDelta():
                    screen.write(event.text, style="dim")
                case ToolCallDelta():
                    if event.name:
                        screen.end_line()
                        screen.write(f"[tool call {event.name}] ", style="cyan")
                    screen.write(event.arguments_delta, style="cyan")
        response = await stream.get_final_response()
        ended_at = time.perf_counter()
    screen.end_line()
    for n, citation in enumerate(response.citations, 1):
        where = f"{citation.location} {citation.start_index}-{citation.end_index}"
        quoted = f": {citation.cited_text[:60]!r}" if citation.cited_text else ""
        screen.out.print(f"[{n}] document {citation.document_index} ({where}){quoted}", style="dim")
    if parse_json:
        # ResponseParseError, a TokenwireError, ends the run with status 1.
        screen.out.print("parsed JSON: " + json.dumps(response.parsed(), ensure_ascii=False), style="dim")
    rate = response.timing.output_tokens_per_second
    output_tokens = response.usage.output_tokens
    if rate is None and output_tokens and first_delta_at is not None:
        elapsed = ended_at - first_delta_at
        rate = output_tokens / elapsed if elapsed > 0 else None
    summary = summary_line(
        response,
        time_to_first_token=(None if first_delta_at is None else first_delta_at - started_at),
        tokens_per_second=rate,
    )
    screen.out.print(summary, style="dim")
    return 0


async def _run(args: argparse.Namespace, screen: _Screen) -> int:
    async with AsyncClient(args.target, timeout=args.timeout) as client:
        if args.list:
            return await _list_models(client, screen)
        if args.resume:
            stream_id, token = args.resume
            if args.poll:
                return await _poll(client, stream_id, token, args.after, screen)
            resumed = client.resume(stream_id, token, args.after)
            if args.json:
                return await _print_json(resumed, screen, args.target)
            return await _stream_text(resumed, screen)
        messages = [system(args.system)] if args.system else []
        try:
            parts = [image(path) for path in args.image]
            parts += [document(path, title=Path(path).name, citations=args.cite) for path in args.document]
            schema = None
            if args.json_schema:
                schema = json_schema(
                    Path(args.json_schema).stem.replace(".", "_")[:64] or "answer", _schema(args.json_schema)
                )
            request = build_request(
                args.model,
                [*messages, user(args.prompt, *parts) if parts else user(args.prompt)],
                max_output_tokens=args.max_tokens,
                temperature=args.temperature,
                stop_sequences=args.stop,
                durable=args.durable,
                response_format=schema,
            )
        except OSError as exc:
            raise _UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None
        except (ValueError, UnicodeError) as exc:
            # Out-of-range numbers, or text that is not valid Unicode, cannot even be encoded.
            raise _UsageError(f"cannot build the request: {exc}") from None
        stream = client.stream_request(request)
        if args.json:
            return await _print_json(stream, screen, args.target)
        return await _stream_text(stream, screen, parse_json=schema is not None)


def _schema(path: str) -> dict[str, object]:
    try:
        schema = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise _UsageError(f"{path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise _UsageError(f"{path} holds no JSON Schema object")
    return schema


async def _poll(client: AsyncClient, stream_id: str, token: str, after: int, screen: _Screen) -> int:
    """Long-polls the stream to its terminal event: its text on stdout, a line per batch on stderr."""
    while True:
        batch = await client.poll(stream_id, token, after)
        for event in batch.events:
            if isinstance(event, TextDelta):
                screen.write(event.text)
        screen.end_line()
        screen.err.print(
            f"batch: {len(batch.messages)} messages · next after {batch.next_after} · {batch.state.status}",
            style="dim",
        )
        after = batch.next_after
        if not batch.terminal:
            continue
        error = batch.error
        if error is not None:
            screen.error(f"error: {pb.ErrorCode.Name(error.code).removeprefix('ERROR_CODE_')}: {error.message}")
            return 1
        finish = next((event for event in batch.events if isinstance(event, Finished)), None)
        screen.out.print(f"finish: {finish.reason if finish else 'unknown'}", style="dim")
        return 0


class _UsageError(Exception):
    """The command line asks for something that cannot be sent."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.poll and not args.resume:
        parser.error("--poll reads a durable stream: give it --resume ID TOKEN")
    if args.durable and args.resume:
        parser.error("--durable starts a stream; --resume reads one that exists")
    screen = _Screen()
    try:
        return asyncio.run(_run(args, screen))
    except _UsageError as error:
        screen.error(f"error: {error}")
        return 2
    except TokenwireError as error:
        screen.error(_describe(error, args.target))
        return 1
    except KeyboardInterrupt:
        # asyncio.run has cancelled the task, and leaving the stream's block cancelled
        # the call (a durable stream's with Cancel): the server and the provider stop too.
        screen.end_line()
        screen.err.print("cancelled")
        return 130
