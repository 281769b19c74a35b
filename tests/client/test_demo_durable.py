"""The demo's durable-stream options in a subprocess: --durable, --resume [--after], --poll, Ctrl-C as Stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_demo import SUMMARY, demo

from conftest import Recorder

pytestmark = pytest.mark.timeout(60)

ANNOUNCE = re.compile(r"durable stream (\S+) \(window 60 s\); resume with: --resume (\S+) (\S+) --after N")


def answer(stdout: str) -> str:
    summary = SUMMARY.search(stdout)
    assert summary, stdout
    return stdout[: summary.start()]


def test_durable_then_resume_and_poll(live_address: str) -> None:
    first = demo("--target", live_address, "--durable", "--max-tokens", "8", "Hello")
    assert first.returncode == 0, first.stderr
    found = ANNOUNCE.search(first.stderr)
    assert found, first.stderr
    stream_id, token = found.group(2), found.group(3)
    assert found.group(1) == stream_id and token not in first.stdout  # the token goes to stderr only
    text = answer(first.stdout)

    again = demo("--target", live_address, "--resume", stream_id, token)
    assert again.returncode == 0, again.stderr
    assert answer(again.stdout) == text

    tail = demo("--target", live_address, "--resume", stream_id, token, "--after", "3")
    assert tail.returncode == 0, tail.stderr
    assert text.rstrip("\n").endswith(answer(tail.stdout).rstrip("\n")) and len(tail.stdout) < len(first.stdout)

    polled = demo("--target", live_address, "--resume", stream_id, token, "--poll")
    assert polled.returncode == 0, polled.stderr
    assert re.search(r"batch: \d+ messages · next after \d+ · finished", polled.stderr), polled.stderr
    assert polled.stdout.replace("finish: length\n", "") == text


def test_poll_needs_resume() -> None:
    out = demo("--poll")
    assert out.returncode == 2 and "--resume" in out.stderr


def test_resume_of_an_unknown_stream_is_one_line_and_exit_1(live_address: str) -> None:
    out = demo("--target", live_address, "--resume", "nope", "bad-token")
    assert out.returncode == 1 and "STREAM_NOT_FOUND" in out.stderr and "Traceback" not in out.stderr


def test_ctrl_c_on_a_durable_stream_cancels_it(live_address: str, recorder: Recorder) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenwire_client", "--target", live_address, "--model", "slow", "--durable"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    assert proc.stdout.read(1)  # the stream is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and b"cancelled" in err and b"Traceback" not in err
    # A durable generation outlives its call: only the Cancel can have stopped the provider.
    deadline = time.monotonic() + 5
    while not recorder.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.finished == [False]
    found = ANNOUNCE.search(err.decode())
    assert found, err
    resumed = demo("--target", live_address, "--resume", found.group(2), found.group(3))
    assert resumed.returncode == 1 and "STREAM_CANCELLED" in resumed.stderr
