"""Fallback to the next route, only before the first token."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conftest import FAST, ErrorInfo, Recorder, assert_well_formed, collect, detail, eventually, request, rich_status
from service.providers import KINDS
from service.providers.simulated import SimulatedProvider
from tokenwire.v1 import generation_pb2 as pb


def sim(model: str, **options: Any) -> dict[str, Any]:
    # No retries: these tests are about fallback (retries have tests of their own).
    return {"provider": "simulated", "model": model, "options": FAST | options, "max_retries": 0}


class NoToolsProvider(SimulatedProvider):
    kind = "no-tools"
    supports_tools = False


ROUTES: dict[str, dict[str, Any]] = {
    "backup": {"provider": "recording", "model": "backup-model", "options": FAST},
    "no-tools": {"provider": "no-tools", "model": "no-tools-model", "options": FAST},
    "slow-backup": {"provider": "recording", "model": "slow-model", "options": FAST | {"first_token_ms": 5000}},
    "down-no-tools-first": sim("m", fail_after_chunks=0) | {"fallbacks": ["no-tools", "backup"]},
    "down-slow-backup": sim("m", fail_after_chunks=0) | {"fallbacks": ["slow-backup", "backup"]},
    "bad-key": sim("m", fail_after_chunks=0, fail_with="auth") | {"fallbacks": ["backup"]},
    "down": sim("down-model", fail_after_chunks=0) | {"fallbacks": ["backup"]},
    "down-twice": sim("m", fail_after_chunks=0) | {"fallbacks": ["down-alone"]},
    "down-alone": sim("m", fail_after_chunks=0, fail_with="rate_limited"),
    "rejects": sim("m", fail_after_chunks=0, fail_with="bad_request") | {"fallbacks": ["backup"]},
    "breaks-mid-stream": sim("m", fail_after_chunks=2) | {"fallbacks": ["backup"]},
}


@pytest.fixture
async def stub(start_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(KINDS, "no-tools", NoToolsProvider)
    running = await start_server(routes=ROUTES)
    return running.stub


async def test_failure_before_first_token_falls_back_and_start_names_who_served(stub: Any, recorder: Recorder) -> None:
    messages, code, _ = await collect(stub.Generate(request(model="down")))
    assert code == grpc.StatusCode.OK
    assert_well_formed(messages)
    start = messages[0].start
    assert (start.route, start.provider, start.upstream_model) == ("down", "recording", "backup-model")
    assert [r.upstream_model for r in recorder.requests] == ["backup-model"]


async def test_no_fallback_after_the_first_token(stub: Any, recorder: Recorder) -> None:
    messages, code, _ = await collect(stub.Generate(request(model="breaks-mid-stream")))
    assert_well_formed(messages)
    assert messages[-1].error.code == pb.ERROR_CODE_PROVIDER_UNAVAILABLE
    assert code == grpc.StatusCode.UNAVAILABLE
    assert recorder.requests == []


async def test_no_fallback_for_errors_a_retry_cannot_fix(stub: Any, recorder: Recorder) -> None:
    messages, code, trailing = await collect(stub.Generate(request(model="rejects")))
    assert messages == [] and code == grpc.StatusCode.INVALID_ARGUMENT
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_REJECTED_REQUEST"
    assert recorder.requests == []


async def test_when_every_route_fails_the_last_error_is_the_status(stub: Any) -> None:
    messages, code, trailing = await collect(stub.Generate(request(model="down-twice")))
    # The fallback's error (rate limited), not the first route's (unavailable).
    assert messages == [] and code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_RATE_LIMITED"


async def test_a_bad_provider_key_falls_back(stub: Any) -> None:
    messages, code, _ = await collect(stub.Generate(request(model="bad-key")))
    assert code == grpc.StatusCode.OK and messages[0].start.upstream_model == "backup-model"


async def test_fallbacks_that_cannot_serve_the_request_are_skipped(stub: Any) -> None:
    tools = [pb.Tool(name="t")]
    messages, code, _ = await collect(stub.Generate(request(model="down-no-tools-first", tools=tools)))
    assert code == grpc.StatusCode.OK and messages[0].start.upstream_model == "backup-model"
    # Without tools, the first fallback serves.
    messages, _, _ = await collect(stub.Generate(request(model="down-no-tools-first")))
    assert messages[0].start.upstream_model == "no-tools-model"


async def test_a_deadline_during_fallback_ends_the_call_and_the_fallbacks_stream(stub: Any, recorder: Recorder) -> None:
    messages, code, _ = await collect(stub.Generate(request(model="down-slow-backup"), timeout=0.5))
    assert messages == [] and code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The slow fallback was tried, the one after it never: the deadline had passed.
    await eventually(lambda: recorder.closed)
    assert [r.upstream_model for r in recorder.requests] == ["slow-model"]


async def test_list_models_shows_fallbacks(stub: Any) -> None:
    models = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert list(models["down"].fallbacks) == ["backup"]
