"""The TypeScript client generated from protos/ alone (clients/ts), run live: `node --test` of tests/ts.

It speaks gRPC through @connectrpc/connect-node's gRPC transport, with the messages and service descriptors that
protoc-gen-es generated (`make clients`); the package resolves as `@tokenwire/client`, an npm workspace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(90)
def test_ts_client_streams_errors_resumes_and_cancels(clients_address: str) -> None:
    node = shutil.which("node")
    assert node, "node is part of the toolchain"
    assert (ROOT / "node_modules" / "@tokenwire" / "client").is_dir(), "run `make setup` (npm ci) first"
    out = subprocess.run(
        [node, "--test", "--test-reporter=tap", str(ROOT / "tests" / "ts" / "live.test.mjs")],
        cwd=ROOT,
        env=os.environ | {"TOKENWIRE_TARGET": clients_address},
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "# pass 5" in out.stdout, out.stdout
