"""A team in another language generates its client from protos/ alone: here, Node's grpc-js."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "node" / "generate.mjs"


def run_node(address: str, model: str) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node, "node is part of the toolchain (make setup installs the npm packages)"
    out = subprocess.run([node, str(SCRIPT), address, model], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module", autouse=True)
def node_packages() -> None:
    assert (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make setup` (npm install) first"


def test_node_client_streams_from_the_proto_alone(live_address: str) -> None:
    lines = run_node(live_address, "sim")
    chunks, status = lines[:-1], lines[-1]
    assert status == {"status": "OK"}
    assert [int(c["sequence"]) for c in chunks] == list(range(1, len(chunks) + 1))
    assert chunks[0]["event"] == "start" and chunks[0]["start"]["provider"] == "simulated"
    assert {c["event"] for c in chunks[1:-1]} == {"text_delta"}  # five tokens, some maybe merged
    finish = chunks[-1]["finish"]
    assert finish["reason"] == "FINISH_REASON_LENGTH" and finish["usage"]["output_tokens"] == "5"


def test_node_client_sees_the_error_event_and_status(live_address: str) -> None:
    lines = run_node(live_address, "error-after-3")
    chunks, status = lines[:-1], lines[-1]
    assert chunks[-1]["event"] == "error"
    assert chunks[-1]["error"]["code"] == "ERROR_CODE_PROVIDER_UNAVAILABLE"
    assert status["status"] == "UNAVAILABLE"
