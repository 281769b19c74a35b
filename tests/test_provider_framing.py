"""Framings the SSE specification allows (or vendors may send) but the fakes do not write by
default, end to end: the real server, the real SDKs, and the fakes' frames rewritten on the way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from fakes import FakeAnthropic, FakeOpenAI, StreamReply

from conftest import Running, assert_well_formed, collect, request, vendor_route
from tokenwire.v1 import generation_pb2 as pb

VENDORS = ("openai", "anthropic")
BOM = b"\xef\xbb\xbf"
TEXT = ["Hel", "lo, ", "wörld"]


@pytest.fixture
async def gateway(start_server: Any, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> Running:
    running: Running = await start_server(
        routes={"openai": vendor_route(fake_openai), "anthropic": vendor_route(fake_anthropic)}
    )
    return running


@pytest.fixture
def fakes(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic) -> dict[str, FakeOpenAI | FakeAnthropic]:
    return {"openai": fake_openai, "anthropic": fake_anthropic}


async def generate(
    gateway: Running, fake: FakeOpenAI | FakeAnthropic, vendor: str, rewrite: Callable[[int, bytes], bytes]
) -> tuple[list[pb.GenerateResponse], grpc.StatusCode]:
    # Paced, so each frame leaves as a write of its own and the decoder sees the frames apart.
    fake.enqueue(StreamReply(text=TEXT, interval=0.01, rewrite=rewrite))
    messages, code, _ = await collect(gateway.stub.Generate(request(model=vendor)))
    assert_well_formed(messages)
    return messages, code


def text_of(messages: list[pb.GenerateResponse]) -> str:
    return "".join(m.text_delta.text for m in messages if m.HasField("text_delta"))


def assert_complete(messages: list[pb.GenerateResponse], code: grpc.StatusCode) -> None:
    last = messages[-1]
    assert last.HasField("finish"), last
    assert code == grpc.StatusCode.OK
    assert last.finish.reason == pb.FINISH_REASON_STOP
    assert text_of(messages) == "".join(TEXT)


async def test_a_leading_bom_is_stripped_and_the_first_event_kept(gateway: Running, fake_openai: FakeOpenAI) -> None:
    # The body starts with a BOM right before an event that carries text (the role-only opening
    # chunk, which carries none, is left out): losing that event loses the answer's first piece.
    def rewrite(index: int, frame: bytes) -> bytes:
        return b"" if index == 0 else BOM + frame if index == 1 else frame

    messages, code = await generate(gateway, fake_openai, "openai", rewrite)
    assert_complete(messages, code)


@pytest.mark.parametrize("vendor", VENDORS)
async def test_cr_only_line_ends_finish_cleanly(gateway: Running, fakes: dict[str, Any], vendor: str) -> None:
    # The body's very last bytes are CRs: nothing comes after them to settle whether the last
    # one was half of a CRLF, so only the end of the body can complete the last event.
    messages, code = await generate(gateway, fakes[vendor], vendor, lambda _, frame: frame.replace(b"\n", b"\r"))
    assert_complete(messages, code)


@pytest.mark.parametrize("blank", [b"data:\n\n", b"data: \n\n", b"event: ping\ndata:\n\n"])
@pytest.mark.parametrize("vendor", VENDORS)
async def test_an_event_with_empty_data_is_skipped(
    gateway: Running, fakes: dict[str, Any], vendor: str, blank: bytes
) -> None:
    def rewrite(index: int, frame: bytes) -> bytes:
        return blank + frame if index in (1, 4) else frame

    messages, code = await generate(gateway, fakes[vendor], vendor, rewrite)
    assert_complete(messages, code)


async def test_anthropic_message_stop_without_a_stop_reason_is_truncated(
    gateway: Running, fake_anthropic: FakeAnthropic
) -> None:
    # message_delta is the event that says why the answer stopped; without it the stream did not
    # finish cleanly, as an OpenAI [DONE] without a finish_reason does not.
    def rewrite(index: int, frame: bytes) -> bytes:
        return b"" if frame.startswith(b"event: message_delta") else frame

    messages, code = await generate(gateway, fake_anthropic, "anthropic", rewrite)
    assert code == grpc.StatusCode.UNAVAILABLE
    last = messages[-1]
    assert last.HasField("error"), last
    assert last.error.code == pb.ERROR_CODE_PROVIDER_STREAM_TRUNCATED
    assert last.error.retryable
