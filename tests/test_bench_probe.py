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


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_slow_reader_probe_on_either_event_loop(loop: str) -> None:
    report = run_probe("slow_reader_probe.py", "--streams", "3", "--pieces", "600", "--event-loop", loop)
    assert f"server event loop: {loop}" in report
    assert "upstream paused on 3 of 3 streams" in report
    assert "after draining: 3 of 3 streams complete" in report


def test_stream_memory_probe_reports_per_stream_figures() -> None:
    report = run_probe("stream_memory.py", "--streams", "30", "--top", "5")
    assert re.search(r"^30 open streams: RSS \+[\d.-]+ MiB", report, flags=re.MULTILINE), report
    assert re.search(r"traced Python allocations: \+[\d.-]+ MiB, [\d.-]+ KiB and \d+ blocks per stream", report)


def test_http_client_choice_compares_both_clients() -> None:
    report = run_probe("http_client_choice.py", "--steps", "5", "--seconds", "1", "--warmup", "0.5")
    assert re.search(r"^http1 +5 +even ", report, flags=re.MULTILINE), report
    assert re.search(r"aiohttp at 5 streams, even starts: [\d.]+x http1's CPU per chunk", report), report


@pytest.mark.parametrize("shape", ["even", "bursty"])
def test_loadgen_start_shapes_complete_every_stream(shape: str) -> None:
    # The direct path: the load generator reads the rig's upstream itself.
    with subprocess.Popen(
        [sys.executable, "bench/upstream.py", "--tokens", "8"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as upstream:
        try:
            assert upstream.stdout is not None
            address = upstream.stdout.readline().split("listening on ")[1].strip()
            report = run_probe(
                *("loadgen.py", "sse", address, "--streams", "6", "--seconds", "1", "--warmup", "0.2"),
                *("--tokens", "8", "--starts", shape),
            )
        finally:
            upstream.terminate()
            upstream.wait(10)
    assert f'"starts": "{shape}"' in report and '"bad": 0' in report, report


def test_base_memory_reports_each_configuration() -> None:
    report = run_probe("base_memory.py", "--kinds", "openai,sse-endpoint", "--settle", "0.3")
    rows = dict(re.findall(r"^(\S+)\s+([\d.]+)\s+[+-][\d.]+$", report, flags=re.MULTILINE))
    assert set(rows) == {"simulated", "openai", "sse-endpoint", "every-provider"}, report
    # The openai SDK is imported only by the server that has an openai route.
    assert float(rows["openai"]) > float(rows["simulated"]) + 5, report
