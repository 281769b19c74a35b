"""The Go client generated from protos/ alone (clients/go), run live: `go test` of tests/go against a real server.

Built as the README tells a Go team to, with Debian's Go toolchain and gRPC in GOPATH mode (module mode cannot
resolve Debian's sources offline): the repository is linked into a GOPATH of the test's own at the import path
that buf.gen.yaml's managed mode gives the generated package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMPORT_ROOT = "github.com/tokenwire/tokenwire"


def go_env(gopath: Path) -> dict[str, str]:
    """GOPATH mode over a GOPATH holding this repository at its import path, then Debian's Go sources."""
    link = gopath / "src" / IMPORT_ROOT
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT, target_is_directory=True)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "go-build"
    return os.environ | {
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}{os.pathsep}/usr/share/gocode",
        "GOFLAGS": "",
        # The build cache outlives the test: the first build of Debian's grpc takes a while, later ones do not.
        "GOCACHE": os.environ.get("GOCACHE", str(cache)),
    }


@pytest.fixture(scope="module")
def gopath(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("go"), "Debian's golang-go is part of the toolchain (.ci/run installs it)"
    return tmp_path_factory.mktemp("gopath")


def go(gopath: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["go", *args], cwd=cwd, env=go_env(gopath) | env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.timeout(320)
def test_go_client_streams_errors_resumes_and_cancels(gopath: Path, clients_address: str) -> None:
    pkg = gopath / "src" / IMPORT_ROOT / "tests" / "go"
    out = go(gopath, "test", "-count=1", "-v", ".", cwd=pkg, TOKENWIRE_TARGET=clients_address)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in (
        "TestStreamReadsToItsFinish",
        "TestRejectedStartIsAStatusWithRichDetails",
        "TestFailureAfterStartIsAnErrorEventThenTheStatus",
        "TestBrokenDurableStreamResumesFromItsLastSequence",
        "TestCancelStopsADurableStream",
    ):
        assert f"--- PASS: {name}" in out.stdout, out.stdout
