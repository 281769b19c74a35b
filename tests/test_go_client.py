"""The Go client generated from protos/ alone (clients/go), run live: `go test` of tests/go against a real server.

Built as the README tells a Go team to, with Debian's Go toolchain and gRPC in GOPATH mode (module mode cannot
resolve Debian's sources offline): the repository is linked into a GOPATH of the test's own at the import path
that buf.gen.yaml's managed mode gives the generated package.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import GO_IMPORT_ROOT, go_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gopath(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("go"), "Debian's golang-go is part of the toolchain (.ci/run installs it)"
    return tmp_path_factory.mktemp("gopath")


@pytest.mark.timeout(320)
def test_go_client_streams_errors_resumes_and_cancels(gopath: Path, clients_address: str) -> None:
    pkg = gopath / "src" / GO_IMPORT_ROOT / "tests" / "go"
    out = subprocess.run(
        ["go", "test", "-count=1", "-v", "."],
        cwd=pkg,
        env=go_env(gopath) | {"TOKENWIRE_TARGET": clients_address},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in (
        "TestStreamReadsToItsFinish",
        "TestRejectedStartIsAStatusWithRichDetails",
        "TestFailureAfterStartIsAnErrorEventThenTheStatus",
        "TestBrokenDurableStreamResumesFromItsLastSequence",
        "TestCancelStopsADurableStream",
    ):
        assert f"--- PASS: {name}" in out.stdout, out.stdout
