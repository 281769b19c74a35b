"""The demo CLI in a subprocess, as a person runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import TEST_ROUTES, Recorder

SUMMARY = re.compile(
    r"^time to first token: [\d.]+ ms \(server: [\d.]+ ms\) · [\d.]+ tokens/s · finish: (\w+)"
    r" · usage: \d+ in / \d+ out$",
    re.MULTILINE,
)


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenwire_client", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_streams_text_then_prints_the_summary(live_address: str) -> None:
    out = demo("--target", live_address, "--max-tokens", "6", "Hello")
    assert out.returncode == 0, out.stderr
    summary = SUMMARY.search(out.stdout)
    assert summary, out.stdout
    assert summary.group(1) == "length"
    streamed = out.stdout[: summary.start()].split()
    assert len(streamed) == 6, out.stdout  # the six tokens, streamed before the summary


def test_json_prints_every_chunk(live_address: str) -> None:
    out = demo("--target", live_address, "--json", "--max-tokens", "3")
    assert out.returncode == 0, out.stderr
    chunks = [json.loads(line) for line in out.stdout.splitlines()]
    assert [int(c["sequence"]) for c in chunks] == list(range(1, len(chunks) + 1))
    assert 3 <= len(chunks) <= 5  # start, three tokens (queued ones share a chunk), finish
    assert "start" in chunks[0] and chunks[-1]["finish"]["reason"] == "FINISH_REASON_LENGTH"


def test_error_is_one_line_and_exit_1(live_address: str) -> None:
    out = demo("--target", live_address, "--model", "error-after-3")
    assert out.returncode == 1
    assert "UNAVAILABLE" in out.stderr and "retryable" in out.stderr
    assert "Traceback" not in out.stderr


def test_arguments_that_cannot_be_sent_are_a_usage_error(live_address: str) -> None:
    out = demo("--target", live_address, "--max-tokens", "3000000000")
    assert out.returncode == 2 and "cannot build the request" in out.stderr
    assert "Traceback" not in out.stderr


def test_list_models(live_address: str) -> None:
    out = demo("--target", live_address, "--list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "SERVED", "BY"], out.stdout
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(TEST_ROUTES), out.stdout  # every route, once
    served_by = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert served_by["sim"] == "simulated/tokenwire-sim-1" and served_by["error-after-3"] == "simulated/m"


def test_unreachable_server_is_a_clear_error() -> None:
    out = demo("--target", "127.0.0.1:1", "--timeout", "5")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cannot reach a tokenwire server at 127.0.0.1:1" in out.stderr


def test_ctrl_c_cancels_cleanly_and_stops_the_provider(live_address: str, recorder: Recorder) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire_client", "--target", live_address, "--model", "slow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # Python keeps SIGINT ignored when its parent ignored it (pytest run in the background, say):
        # restore the default so that the demo's KeyboardInterrupt handling is what is tested.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)  # the first streamed character: the stream is under way
    assert first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert b"cancelled" in err and b"Traceback" not in err
    deadline = time.monotonic() + 5
    while not recorder.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.finished == [False]
