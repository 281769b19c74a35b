"""Copies of a large request that are gone: each test fails if the copy it names comes back.

tracemalloc sees Python's allocations (str, bytes, lists), not protobuf's own arena: each test
measures the Python-side peak of one step against the prompt's size. The whole server's peak is
what bench/request_memory_probe.py measures.
"""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEST_ROUTES, make_config
from service.events import ChatMessage, GenerationRequest, Role
from service.providers.simulated import SimulatedProvider, _count_tokens, _SimulatedStream, _text_crc
from service.routing import Router
from service.validation import validate_request
from tokenwire.v1 import generation_pb2 as pb

PROMPT_BYTES = 2 * 1024 * 1024
PROMPT = ("the quick brown fox jumps over a lazy dog " * (PROMPT_BYTES // 42 + 1))[:PROMPT_BYTES]


def peak_bytes(step: Callable[[], object]) -> int:
    """The most Python memory `step` held at once beyond what was held before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = step()
        peak = tracemalloc.get_traced_memory()[1] - before
        del result
    finally:
        tracemalloc.stop()
    return peak


@pytest.fixture
def router() -> Router:
    return Router(make_config({"sim": TEST_ROUTES["sim"]}).routes)


def test_validation_makes_one_copy_of_the_prompt(router: Router) -> None:
    # The text is read out of the parsed message once (each read is a new copy), and the size
    # comes from the wire: ByteSize() serializes the whole message again.
    message = pb.GenerateRequest(model="sim", messages=[pb.Message(role=pb.ROLE_USER, text=PROMPT)])
    size = message.ByteSize()
    route = router.get("sim")

    def validate() -> GenerationRequest:
        return validate_request(message, route, stream_id="s", deadline=None, max_request_bytes=8 * 2**20, size=size)

    assert validate().messages[0].text == PROMPT
    assert peak_bytes(validate) < 1.2 * PROMPT_BYTES


async def test_the_simulated_usage_does_not_split_the_prompt_into_words(router: Router) -> None:
    request = GenerationRequest(
        stream_id="s",
        route="sim",
        upstream_model="m",
        messages=(ChatMessage(role=Role.USER, text=PROMPT),),
    )
    provider = router.get("sim").provider
    assert isinstance(provider, SimulatedProvider)
    stream = _SimulatedStream(provider, request)
    stream._usage()  # once first: whatever it allocates for good is not what is measured
    # A list of every word was ten times the prompt; now one slice at a time is split.
    assert peak_bytes(stream._usage) < 0.2 * PROMPT_BYTES
    assert peak_bytes(lambda: _text_crc(PROMPT)) < 0.2 * PROMPT_BYTES


@given(st.text(alphabet=st.sampled_from(" \t\n\u3000\u00a0ab\u00e9\U0001f600"), max_size=60), st.integers(1, 8))
def test_sliced_counts_and_checksums_match_the_whole_text(text: str, slice_chars: int) -> None:
    assert _count_tokens(text, slice_chars) == len(text.split())
    assert _text_crc(text, slice_chars) == zlib.crc32(text.encode())
