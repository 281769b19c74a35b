"""Credential-shaped text and control characters never leave in a message, a status detail or a
log line."""

from __future__ import annotations

import logging
import re

import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st

from service.__main__ import configure_logging
from service.errors import ErrorCode, GatewayError, describe_exception, redact, register_secret, sanitize
from service.wire import error_event, status_metadata

FAKE_KEY = "sk-proj-FAKE0000000000000000"  # shaped like a provider key; not a real one
# C0 (NUL, BEL, BS, CR, ESC, ...), DEL and C1 (NEL, CSI): what a terminal or a log parser acts on.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
HOSTILE = "a\x00b\x07c\x08d\re \x1b[31mred\x1b[0m\x7f\x9b2J\x85f\ng\th"


@pytest.mark.parametrize(
    "text",
    [
        f"upstream said: invalid key {FAKE_KEY}",
        "Authorization: Bearer abc.def.ghi-000000",
        "headers={'x-api-key': 'FAKE-anthropic-0000000'}",
        '{"api_key": "FAKE-0000000000"}',
        "password=hunter2hunter2",
        "Authorization:Token abcdef123456",
        "GET /v1/models?key=AIzaSyFAKE000000000000000000000&alt=sse",
        'api_key="abc defghijkl"',
    ],
)
def test_redact_removes_credentials(text: str) -> None:
    cleaned = redact(text)
    secrets = (FAKE_KEY, "abc.def.ghi-000000", "FAKE-anthropic-0000000", "FAKE-0000000000", "hunter2hunter2")
    for secret in (*secrets, "abcdef123456", "AIzaSyFAKE", "defghijkl"):
        assert secret not in cleaned
    assert "[redacted]" in cleaned


def test_plain_text_is_unchanged() -> None:
    text = "unknown route 'gpt-4o'; max_output_tokens must be from 1 to 1000000, got 0"
    assert redact(text) == text


def test_error_event_and_status_are_redacted() -> None:
    err = GatewayError(
        ErrorCode.PROVIDER_AUTH_FAILED,
        f"provider rejected key {FAKE_KEY}",
        field_violations=(("x", f"bad {FAKE_KEY}"),),
    )
    assert FAKE_KEY not in error_event(err, 3).message
    ((_, details),) = status_metadata(err, "s")
    assert FAKE_KEY.encode() not in details


def test_tracebacks_and_log_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError) as info:
        raise RuntimeError(f"boom with {FAKE_KEY}")
    described = describe_exception(info.value)
    # Type and frames, to find the bug; never the message, whatever a library put in it.
    assert "builtins.RuntimeError (message withheld)" in described
    assert "test_redact.py" in described
    assert FAKE_KEY not in described and f"boom with {FAKE_KEY[:6]}" not in described
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("INFO")
    try:
        logging.getLogger("anything").warning("request failed: Authorization: Bearer %s", FAKE_KEY)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "request failed" in err and FAKE_KEY not in err


def test_a_registered_secret_is_removed_whatever_its_shape() -> None:
    value = "plainword" + "7Q2x9Zk4"  # no credential shape: only its exact value can find it
    assert value in redact(f"upstream said: {value}")
    register_secret(value)
    assert redact(f"upstream said: {value}; again {value}") == "upstream said: [redacted]; again [redacted]"
    register_secret("short")  # too short to redact without mangling ordinary words
    assert redact("a short note") == "a short note"


def test_sanitize_escapes_control_characters_and_keeps_the_rest() -> None:
    cleaned = sanitize(HOSTILE)
    assert not CONTROL.search(cleaned)
    # Visible, so an operator can tell what the provider sent; line ends and tabs become spaces.
    assert cleaned == "a\\x00b\\x07c\\x08d\\x0de \\x1b[31mred\\x1b[0m\\x7f\\x9b2J\\x85f g h"
    assert sanitize("wörld 🌍 «ok» — fine") == "wörld 🌍 «ok» — fine"
    assert sanitize(sanitize(HOSTILE)) == sanitize(HOSTILE)


@given(st.text())
def test_sanitized_text_never_holds_a_control_character(text: str) -> None:
    assert not CONTROL.search(sanitize(text))
    assert not CONTROL.search(redact(text).replace("\n", "").replace("\t", ""))


def test_error_event_and_status_hold_no_control_characters() -> None:
    err = GatewayError(
        ErrorCode.PROVIDER_REJECTED_REQUEST,
        f"it rejected the request: {HOSTILE}",
        provider="openai\x1b[2J",
        field_violations=(("x\x00", f"bad {HOSTILE}"),),
    )
    for text in (err.message, error_event(err, 3).message, error_event(err, 3).provider):
        assert not CONTROL.search(text)
    ((_, details),) = status_metadata(err, "s\x07")
    status = status_pb2.Status.FromString(details)
    texts = [status.message]
    for packed in status.details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            texts += [info.reason, *info.metadata.keys(), *info.metadata.values()]
        elif packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            texts += [t for v in bad.field_violations for t in (v.field, v.description)]
    assert "red" in status.message and len(texts) > 5
    for text in texts:
        assert not CONTROL.search(text), repr(text)


def test_log_lines_hold_no_control_characters_but_keep_their_lines(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("INFO")
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("anything").exception("provider said: %s", HOSTILE)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "provider said: a\\x00b" in err and "Traceback" in err
    # A traceback keeps its lines: only LF and tab survive.
    assert err.count("\n") > 3
    assert not CONTROL.search(err.replace("\n", "").replace("\t", ""))
