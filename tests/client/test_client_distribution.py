"""The client distribution (clients/pyproject.toml) installs alone into a clean virtual environment and streams.

The wheel is built from clients/ as a user's `pip install ./clients` would build it; the venv has no system site
packages, and pip installs the wheel's declared dependencies into it (from the machine's index or pip's cache).
The script then runs outside the repository, so nothing of the source tree can stand in for what the wheel lacks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "tokenwire-client",
    "grpcio",
    "protobuf",
    "googleapis-common-protos",
    "typing-extensions",
    "pip",
    "setuptools",
}
SCRIPT = """
import importlib.util, sys
from tokenwire_client import Client, user
from tokenwire.v1 import generation_pb2
# The server and its provider SDKs are not here: the client needs none of them.
assert [m for m in ("service", "openai", "anthropic", "httpx2", "redis", "rich") if importlib.util.find_spec(m)] == []
with Client(sys.argv[1], timeout=20) as client:
    response = client.generate("sim", [user("Hello from a clean venv")], max_output_tokens=5).get_final_response()
print(response.finish_reason, response.usage.output_tokens, len(response.text) > 0)
"""


def run(*args: str | Path, cwd: Path) -> str:
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.timeout(300)
def test_the_client_distribution_installs_alone_and_streams(tmp_path: Path, live_address: str) -> None:
    wheels = tmp_path / "wheels"
    # The dev venv's setuptools builds it (no build isolation), so the build itself needs no index.
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        wheels,
        ROOT / "clients",
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("tokenwire_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"tokenwire/v1/generation_pb2.py", "tokenwire/v1/generation_pb2.pyi", "tokenwire_client/py.typed"} <= set(
        names
    )
    assert not [n for n in names if n.startswith(("service/", "tests/"))]

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, cwd=tmp_path)
    installed = {
        p["name"].lower().replace("_", "-")
        for p in json.loads(run(python, "-m", "pip", "list", "--format=json", cwd=tmp_path))
    }
    assert installed <= ALLOWED, installed - ALLOWED

    assert run(python, "-c", SCRIPT, live_address, cwd=tmp_path).split() == ["length", "5", "True"]
