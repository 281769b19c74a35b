"""Provider-derived error text, end to end: whatever control characters a provider puts in its
error type or message, none reaches the caller's status, rich status or Error event."""

from __future__ import annotations

import re
from typing import Any

import grpc
import pytest
from fakes import FakeAnthropic, FakeOpenAI, StatusReply, StreamReply

from conftest import BadRequest, ErrorInfo, Running, collect, detail, request, rich_status, vendor_route

VENDORS = ("openai", "anthropic")
# NUL, BEL, backspace, CR, a terminal colour sequence, DEL, a C1 CSI, NEL; ordinary spaces and a newline.
HOSTILE = "model\x00 not\x07 found\x08\r \x1b[31mred\x1b[0m \x7f \x9b2J \x85end\nnext line"
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def assert_clean(text: str) -> None:
    assert text, "the text was expected to carry the provider's explanation"
    assert not CONTROL.search(text), repr(text)


def assert_status_clean(code: grpc.StatusCode, details: str | None, trailing: Any) -> None:
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details is not None
    assert_clean(details)
    assert "red" in details and "next line" in details, "the readable text is kept"
    status = rich_status(trailing)
    assert_clean(status.message)
    info = detail(status, ErrorInfo)
    for value in info.metadata.values():
        assert not CONTROL.search(value), repr(value)
    bad = detail(status, BadRequest)
    for violation in bad.field_violations if bad is not None else ():
        assert not CONTROL.search(violation.description)


@pytest.fixture
async def gateway(start_server: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> Running:
    running: Running = await start_server(
        routes={"openai": vendor_route(fake_openai), "anthropic": vendor_route(fake_anthropic)}
    )
    return running


@pytest.fixture
def fakes(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> dict[str, FakeOpenAI | FakeAnthropic]:
    return {"openai": fake_openai, "anthropic": fake_anthropic}


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_provider_error_status_reaches_the_caller_without_control_characters(
    gateway: Running, fakes: dict[str, Any], vendor: str
) -> None:
    fakes[vendor].enqueue(StatusReply(400, error_type="invalid\x1b[2Jrequest\x00", message=HOSTILE))
    call = gateway.stub.Generate(request(model=vendor))
    messages, code, trailing = await collect(call)
    assert messages == []
    assert_status_clean(code, await call.details(), trailing)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_an_in_stream_error_reaches_the_caller_without_control_characters(
    gateway: Running, fakes: dict[str, Any], vendor: str
) -> None:
    fakes[vendor].enqueue(
        StreamReply(fault="error_event", fault_after=1, error_type="invalid_request_error", error_message=HOSTILE)
    )
    call = gateway.stub.Generate(request(model=vendor))
    messages, code, trailing = await collect(call)
    error = messages[-1].error
    assert_clean(error.message)
    assert "red" in error.message
    assert_status_clean(code, await call.details(), trailing)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_provider_error_type_with_control_characters_is_cleaned(
    gateway: Running, fakes: dict[str, Any], vendor: str
) -> None:
    # The type is quoted in the message whatever it is, unlike the text (only for rejections).
    fakes[vendor].enqueue(StreamReply(fault="error_event", fault_after=1, error_type="boom\x1b]0;pwned\x07\x9b"))
    call = gateway.stub.Generate(request(model=vendor))
    messages, code, _ = await collect(call)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert_clean(messages[-1].error.message)
    assert "boom" in messages[-1].error.message
    details = await call.details()
    assert details is not None
    assert_clean(details)
