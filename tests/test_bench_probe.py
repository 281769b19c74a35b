"""The probes the README shows run and report (smoke runs: no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cancel_probe_runs_and_leaves_nothing_behind() -> None:
    out = subprocess.run(
        [sys.executable, "bench/cancel_probe.py", "--cycles", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "cycles: 40, active streams after: 0" in out.stdout
    assert re.search(r"cancel -> provider stream closed: p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms", out.stdout)
    assert re.search(r"RSS after 10% of cycles: [\d.]+ MiB, at the end: [\d.]+ MiB", out.stdout)


def test_shutdown_probe_runs_and_reports() -> None:
    out = subprocess.run(
        [sys.executable, "bench/shutdown_probe.py", "--grace", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"short stream: ended [\d.]+ s after SIGTERM with finish, status OK", out.stdout)
    assert re.search(r"long stream: ended [\d.]+ s after SIGTERM with error, status UNAVAILABLE", out.stdout)
    assert re.search(r"process: exited 0, [\d.]+ s after SIGTERM", out.stdout)
