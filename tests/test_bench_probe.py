"""The probes the README shows run and report (smoke runs: no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_probe(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cancel_probe_runs_and_leaves_nothing_behind() -> None:
    report = run_probe("cancel_probe.py", "--cycles", "40")
    assert "provider: simulated, cycles: 40, active streams after: 0" in report
    assert re.search(r"cancel -> provider stream closed: p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms", report)
    assert re.search(r"RSS after 10% of cycles: [\d.]+ MiB, at the end: [\d.]+ MiB", report)


def test_cancel_probe_through_a_vendor_adapter() -> None:
    report = run_probe("cancel_probe.py", "--cycles", "12", "--provider", "anthropic")
    assert "provider: anthropic, cycles: 12, active streams after: 0" in report


def test_shutdown_probe_runs_and_reports() -> None:
    report = run_probe("shutdown_probe.py", "--grace", "1")
    assert re.search(r"short stream: ended [\d.]+ s after SIGTERM with finish, status OK", report)
    assert re.search(r"long stream: ended [\d.]+ s after SIGTERM with error, status UNAVAILABLE", report)
    assert re.search(r"process: exited 0, [\d.]+ s after SIGTERM", report)


def test_parse_cost_probe_measures_both_vendors_and_the_sdk_iterators() -> None:
    report = run_probe("parse_cost.py", "--chunks", "200", "--repeat", "1")
    for vendor in ("openai", "anthropic"):
        assert re.search(rf"^{vendor} +[\d.]+ +[\d.]+ +[\d.]+$", report, flags=re.MULTILINE), report


def test_slow_reader_probe_runs_and_reports() -> None:
    report = run_probe("slow_reader_probe.py", "--streams", "4", "--pieces", "600")
    assert "upstream paused on 4 of 4 streams" in report
    assert "after draining: 4 of 4 streams complete" in report
    assert re.search(r"server RSS: idle [\d.]+ MiB, 4 stalled readers [\d.]+ MiB", report)


@pytest.mark.parametrize("route", ["sim", "openai"])
def test_request_memory_probe_runs_and_reports(route: str) -> None:
    report = run_probe("request_memory_probe.py", "--route", route, "--concurrent", "2", "--prompt-mib", "0.5")
    assert f"route: {route}, concurrent: 2, request: 0.50 MiB each" in report
    assert re.search(
        r"round 1: server RSS idle [\d.]+ MiB, peak \+[\d.]+ MiB \(.*\) = [\d.]+x the 1\.00 MiB sent; "
        r"streams finished: all",
        report,
    ), report
