"""Fallback to the next route, only before the first token."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from conftest import FAST, ErrorInfo, Recorder, assert_well_formed, collect, detail, request, rich_status
from tokenwire.v1 import generation_pb2 as pb


def sim(model: str, **options: Any) -> dict[str, Any]:
    return {"provider": "simulated", "model": model, "options": FAST | options}


ROUTES: dict[str, dict[str, Any]] = {
    "backup": {"provider": "recording", "model": "backup-model", "options": FAST},
    "down": sim("down-model", fail_after_chunks=0) | {"fallbacks": ["backup"]},
    "down-twice": sim("m", fail_after_chunks=0) | {"fallbacks": ["down-alone"]},
    "down-alone": sim("m", fail_after_chunks=0),
    "rejects": sim("m", fail_after_chunks=0, fail_with="bad_request") | {"fallbacks": ["backup"]},
    "breaks-mid-stream": sim("m", fail_after_chunks=2) | {"fallbacks": ["backup"]},
}


@pytest.fixture
async def stub(start_server: Any) -> Any:
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
    assert messages == [] and code == grpc.StatusCode.UNAVAILABLE
    assert detail(rich_status(trailing), ErrorInfo).reason == "PROVIDER_UNAVAILABLE"


async def test_list_models_shows_fallbacks(stub: Any) -> None:
    models = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    assert list(models["down"].fallbacks) == ["backup"]
