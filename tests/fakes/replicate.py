"""A fake Replicate API: the two steps of a streamed prediction, as Replicate's HTTP API has them.

- `POST /v1/models/{owner}/{name}/predictions` (or `POST /v1/predictions` with a `version`), a
  bearer token, a JSON body `{"input": {...}, "stream": true}`: 201 with the prediction
  (`id`, `status: starting`, `urls: {get, cancel, stream}`), the stream URL absolute, with the
  port, on `stream_origin` (this fake's own origin unless a test points it elsewhere). The
  scripted reply is taken here: a status reply or a reset answers the create; a stream reply is
  kept for the stream.
- `GET` of the stream URL: server-sent events, each with an `id:` — an `event: logs` line first,
  `event: output` per text piece (raw text; a piece with line breaks as several `data:` lines),
  `event: done` with `{}` (or `{"reason": ...}` for a scripted finish other than "done"); an error
  is `event: error` with `{"detail": ...}` then `done` with reason error. The stream's connection
  is accounted to the create's record (`disconnected_at`, `completed`), so that "the provider saw
  the caller leave" reads the same as for the other fakes.
- `POST {urls.cancel}`: recorded in `cancels` (with the time it arrived); `GET {urls.get}`: the
  prediction with its `metrics` (`input_token_count`, `output_token_count`, and a model-recorded
  `cached_input_token_count` when the script has cached tokens), recorded in `gets`; for the
  first `unsettled_gets` it is still `processing`, without metrics.

Errors are problem details: `{"title", "detail", "status"}`. `requests` holds the creates only:
one attempt is one prediction.
"""

from __future__ import annotations

import re
import secrets
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .kit import Kit
from .replies import Reply, ResetReply, StreamReply
from .server import (
    FakeServer,
    Frame,
    Plan,
    RecordedRequest,
    RenderedStream,
    RequestContext,
    _Connection,
    _Incoming,
    plan_stream,
    response_head,
)

DEFAULT_API_KEY = "r8_FakeReplicateToken000000000000000001"
MODEL = "meta/meta-llama-3-8b-instruct"
VERSION = "5a6809ca6288247d06daf6365557e5e429063f32a21146b2a807c682652136b8"
_MODEL_PATH = re.compile(r"^/v1/models/(?P<owner>[^/]+)/(?P<name>[^/]+)/predictions$")
_PREDICTION_PATH = re.compile(r"^/v1/predictions/(?P<id>[a-z0-9]+)(?P<cancel>/cancel)?$")
_STREAM_PATH = re.compile(r"^/v1/streams/(?P<id>[a-z0-9]+)$")
_TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    402: "Insufficient credit",
    403: "Forbidden",
    404: "Not found",
    422: "Input validation failed",
    429: "Request was throttled",
    500: "Internal server error",
    503: "Service unavailable",
}
_LOWER = string.ascii_lowercase + string.digits


def event(name: str, event_id: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {name}\nid: {event_id}\n{lines}\n".encode()


@dataclass
class Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    reply: StreamReply
    create: RecordedRequest
    status: str = "starting"


class FakeReplicate(FakeServer):
    """Point a `replicate` route's `base_url` at `fake.base_url`."""

    request_id_header = "x-request-id"

    def __init__(self, api_key: str = DEFAULT_API_KEY, *, default: Reply | None = None) -> None:
        super().__init__(api_key, default=default)
        self.predictions: dict[str, Prediction] = {}
        # (prediction id, time.monotonic() when it arrived)
        self.cancels: list[tuple[str, float]] = []
        self.gets: list[str] = []
        # time.monotonic() of each GET of a prediction
        self.get_times: list[float] = []
        self.streams: list[RecordedRequest] = []
        # Where stream URLs point; None: this fake's origin.
        self.stream_origin: str | None = None
        # The status a GET of a prediction reports once its stream was served; None: succeeded.
        self.final_status: str | None = None
        # Whether the create answers with a stream URL (a model that cannot stream has none).
        self.streaming = True
        # How many GETs of a prediction still see it processing (no metrics) after its stream.
        self.unsettled_gets = 0
        # Seconds the create takes before it answers (the prediction exists once it has).
        self.create_delay = 0.0

    @property
    def base_url(self) -> str:
        return self.origin

    def _route(self, method: str, path: str) -> dict[str, str] | None:
        if method != "POST":
            return None
        if path == "/v1/predictions":
            return {}
        match = _MODEL_PATH.match(path)
        return {"model": f"{match['owner']}/{match['name']}"} if match else None

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.api_key}"

    def _new_request_id(self) -> str:
        return "".join(secrets.choice(_LOWER) for _ in range(26))

    def _unauthorized_message(self) -> str:
        return "You did not pass a valid authentication token"

    def _not_found_message(self, method: str, path: str) -> str:
        return "The requested resource could not be found."

    def _error_body(self, status: int, error_type: str, message: str, request_id: str) -> bytes:
        title = error_type or _TITLES.get(status, "Internal server error" if status >= 500 else "Bad request")
        return orjson.dumps({"title": title, "detail": message, "status": status})

    def _rejection(self, body: dict[str, Any], headers: Mapping[str, str]) -> str | None:
        values = body.get("input")
        if not isinstance(values, dict):
            return "- input: Invalid type. Expected: object"
        if not isinstance(values.get("prompt"), str) or not values["prompt"]:
            return "- input.prompt: prompt is required"
        if "version" in body and not isinstance(body["version"], str):
            return "- version: Invalid type. Expected: string"
        return None

    def _refusal(
        self, params: Mapping[str, str], body: dict[str, Any], headers: Mapping[str, str]
    ) -> tuple[int, str] | None:
        # Replicate refuses an input it cannot validate with 422.
        if "model" not in params and not isinstance(body.get("version"), str):
            return 422, "- version: version is required"
        problem = self._rejection(body, headers)
        return None if problem is None else (422, problem)

    def _plan(self, incoming: _Incoming, path: str, body: Any, keep_alive: bool) -> Plan | ResetReply:
        """The create: the base's checks and script, then a 201 with the prediction."""
        admitted = self._admit(incoming, path, body, keep_alive)
        if not isinstance(admitted, tuple):
            return admitted
        params, body, reply = admitted
        prediction = Prediction(
            id=self._new_request_id(),
            model=params.get("model", MODEL),
            version=body.get("version") or VERSION,
            input=body["input"],
            reply=reply,
            create=self.requests[-1],
        )
        self.predictions[prediction.id] = prediction
        payload = self._prediction_json(prediction, streaming=self.streaming and body.get("stream") is True)
        # The prediction exists from here on, whether or not its creator is there for the answer.
        return self._json_plan(201, orjson.dumps(payload), prediction.id, keep_alive, delay=self.create_delay)

    def _prediction_json(self, p: Prediction, *, streaming: bool = True) -> dict[str, Any]:
        own = f"{self.origin}/v1/predictions/{p.id}"
        urls = {"get": own, "cancel": f"{own}/cancel", "web": f"https://replicate.com/p/{p.id}"}
        if streaming:
            urls["stream"] = f"{self.stream_origin or self.origin}/v1/streams/{p.id}"
        value: dict[str, Any] = {
            "id": p.id,
            "model": p.model,
            "version": p.version,
            "input": p.input,
            "logs": "",
            "output": None,
            "data_removed": False,
            "error": None,
            "status": p.status,
            "created_at": "2026-12-02T00:00:00.000Z",
            "urls": urls,
        }
        if p.status in ("succeeded", "failed", "canceled"):
            metrics: dict[str, Any] = {"predict_time": 0.25}
            u = p.reply.usage
            if u is not None and p.status == "succeeded":
                metrics |= {"input_token_count": u.input_tokens, "output_token_count": u.output_tokens}
                if u.cache_read_tokens is not None:
                    metrics["cached_input_token_count"] = u.cache_read_tokens
            value["metrics"] = metrics
            value["output"] = list(p.reply.text)
        return value

    async def _respond(self, conn: _Connection, incoming: _Incoming) -> bool:
        """The stream, get and cancel URLs; the creates go through the base (and `_plan`)."""
        path = incoming.target.partition("?")[0]
        stream = _STREAM_PATH.match(path)
        prediction = _PREDICTION_PATH.match(path)
        if stream is None and prediction is None:
            return await super()._respond(conn, incoming)
        keep_alive = "close" not in incoming.headers.get("connection", "").lower()
        record = RecordedRequest(incoming.method, path, {}, incoming.headers, None, incoming.received_at)
        found = self.predictions.get((stream or prediction)["id"])  # type: ignore[index]
        if found is None or not self._authorized(incoming.headers):
            status = 404 if found is None else 401
            message = self._not_found_message("", path) if found is None else self._unauthorized_message()
            record.status = status
            return await self._execute(conn, record, self._error_plan(status, "", message, keep_alive))
        if stream is not None and incoming.method == "GET":
            self.streams.append(record)
            return await self._stream(conn, found, keep_alive)
        if prediction is not None and prediction["cancel"] and incoming.method == "POST":
            self.cancels.append((found.id, time.monotonic()))
            self._notify()
            if found.status in ("starting", "processing"):
                found.status = "canceled"
        elif prediction is not None and not prediction["cancel"] and incoming.method == "GET":
            self.gets.append(found.id)
            self.get_times.append(time.monotonic())
            if self.unsettled_gets > 0 and found.status == "succeeded":
                self.unsettled_gets -= 1
                body = orjson.dumps(self._prediction_json(found) | {"status": "processing", "metrics": {}})
                return await self._execute(conn, record, self._json_plan(200, body, found.id, keep_alive))
        else:
            return await self._execute(conn, record, self._error_plan(405, "", "Method not allowed", keep_alive))
        body = orjson.dumps(self._prediction_json(found))
        return await self._execute(conn, record, self._json_plan(200, body, found.id, keep_alive))

    async def _stream(self, conn: _Connection, p: Prediction, keep_alive: bool) -> bool:
        reply = p.reply
        headers = self._headers(p.id, self.stream_content_type, keep_alive)
        headers += [("transfer-encoding", "chunked"), ("cache-control", "no-store")]
        ctx = RequestContext({"input": p.input}, {"model": p.model}, p.id)
        plan = plan_stream(200, response_head(200, headers), reply, self._render_stream(reply, ctx))
        p.status = "processing"
        record = p.create
        record.completed = False
        ok = await self._execute(conn, record, plan)
        if record.completed and p.status == "processing":
            p.status = self.final_status or "succeeded"
        return ok and keep_alive

    def _render_stream(self, reply: StreamReply, ctx: RequestContext) -> RenderedStream:
        base = int(time.time())
        counter = iter(range(1_000_000))

        def next_id() -> str:
            return f"{base}:{next(counter)}"

        frames = [Frame(event("logs", next_id(), "Loading pipeline components..."))]
        frames += [Frame(event("output", next_id(), piece), True) for piece in reply.text]
        finish = reply.finish
        done = "{}" if finish in (None, "done") else orjson.dumps({"reason": finish}).decode()
        frames.append(Frame(event("done", next_id(), done), finish=True))
        error = orjson.dumps({"detail": reply.error_message}).decode()
        error_frame = event("error", next_id(), error) + event("done", next_id(), '{"reason": "error"}')
        return RenderedStream(frames=frames, error_frame=error_frame, malformed_frame=b"event: output\ndata: x\n\n")

    def _render_message(self, reply: StreamReply, ctx: RequestContext) -> bytes:
        raise AssertionError("predictions are created by _plan")


KEY_ENV = "TOKENWIRE_CONFORMANCE_REPLICATE_TOKEN"

KIT = Kit(
    name="replicate",
    provider="replicate",
    model=MODEL,
    fake=FakeReplicate,
    # Stock models report no cached tokens; the kit's model records them as a metric of its own.
    options=lambda base_url: {
        "base_url": base_url,
        "api_key_env": KEY_ENV,
        "cached_tokens_metric": "cached_input_token_count",
    },
    env=lambda fake: {KEY_ENV: fake.api_key},
    bad_env=lambda fake: {KEY_ENV: "LEAKCANARY-wrong-replicate-token"},
    secrets=lambda fake: [fake.api_key, "LEAKCANARY"],
    finish_reasons={"done": "STOP"},
    text_finish="done",
    # A done event's reason only ever says how a prediction failed (canceled, error).
    unknown_reason_finishes=False,
    tools=False,
    unset=("REPLICATE_API_TOKEN",),
)
