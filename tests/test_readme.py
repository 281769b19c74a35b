"""Every command the README shows, run as written (with the live server's address)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from conftest import HTTP_ADDRESSES, go_env

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = str(Path(sys.executable).parent)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def commands(prefix: str) -> list[str]:
    lines = [line.split("  #")[0].strip() for block in blocks("sh") for line in block.splitlines()]
    return [line for line in lines if line.startswith(prefix)]


def shell_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: the venv's tools first, and no make of ours around it."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}
    return env | {"PATH": BIN + os.pathsep + os.environ["PATH"]} | extra


def run(command: str, address: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = shell_env(TOKENWIRE_TARGET=address)
    result: subprocess.CompletedProcess[str] = subprocess.run(
        command.replace("localhost:50051", address),
        shell=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )
    return result


def test_readme_shows_the_two_commands() -> None:
    assert commands("make run") and commands("make test")


@pytest.mark.parametrize("command", commands("grpcurl "))
def test_grpcurl_recipe(default_address: str, command: str) -> None:
    out = run(command, default_address)
    if "no-such-route" in command:
        assert out.returncode != 0 and "Code: NotFound" in out.stderr
    elif "sim-error" in command:
        assert out.returncode != 0 and "Code: Unavailable" in out.stderr
        assert '"error"' in out.stdout and "ERROR_CODE_PROVIDER_UNAVAILABLE" in out.stdout
    else:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
    if '"parts"' in command:
        answer = streamed_text(out.stdout)
        if "JSON_SCHEMA" in command:
            assert set(json.loads(answer)) == {"claim_id", "cause", "amount_eur"}
        else:
            assert answer.startswith("I received an image (image/png, 70 bytes inline).")


def streamed_text(stdout: str) -> str:
    """The answer in grpcurl's output: its chunks' text deltas, joined."""
    decoder, chunks, at = json.JSONDecoder(), [], 0
    while at < len(stdout.rstrip()):
        chunk, end = decoder.raw_decode(stdout, at)
        chunks.append(chunk)
        at = end + len(stdout[end:]) - len(stdout[end:].lstrip())
    return "".join(c["textDelta"]["text"] for c in chunks if "textDelta" in c)


@pytest.mark.parametrize("command", commands("npx buf curl "))
def test_buf_curl_recipe(default_address: str, command: str) -> None:
    out = run(command.replace("http://localhost:50051", f"http://{default_address}"), default_address)
    if "no-such-route" in command:
        assert out.returncode == 40 and '"code": "not_found"' in out.stderr and "google.rpc.ErrorInfo" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        if "Generate" in command:
            assert '"finish"' in out.stdout


@pytest.mark.parametrize("command", commands("make demo"))
def test_demo_recipe(default_address: str, command: str) -> None:
    out = run(command, default_address)
    if "sim-error" in command:
        # The demo exits 1 on an error; make reports that as its own failure.
        assert out.returncode != 0 and "UNAVAILABLE" in out.stderr and "Traceback" not in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
    if "--json-schema" in command:
        assert "parsed JSON: {" in out.stdout
    elif "--image" in command:
        assert "I received an image" in out.stdout


def test_python_example(default_address: str) -> None:
    (example,) = [block for block in blocks("python") if "localhost:50051" in block]
    out = subprocess.run(
        [sys.executable, "-c", example.replace("localhost:50051", default_address)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "length after 20 tokens" in out.stdout


@pytest.mark.parametrize("example", blocks("py"))
def test_beyond_text_python_example(default_address: str, example: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", example.replace("localhost:50051", default_address)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    described, claim, cited = out.stdout.strip().splitlines()
    assert described.startswith("I received an image (image/png, 70 bytes inline).")
    assert claim.startswith("{'claim_id': ") and claim.endswith(" tokenwire-sim-1")
    assert cited == "['Water damage is covered.']"


@pytest.mark.timeout(320)
@pytest.mark.parametrize("route", ["sim", "no-such-route"])
def test_go_example(default_address: str, route: str, tmp_path: Path) -> None:
    (example,) = blocks("go")
    main = tmp_path / "src" / "example" / "main.go"
    main.parent.mkdir(parents=True)
    main.write_text(example.replace("localhost:50051", default_address).replace('"sim"', f'"{route}"'))
    out = subprocess.run(
        ["go", "run", "."],
        cwd=main.parent,
        env=go_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if route == "sim":
        assert out.returncode == 0, out.stderr
        assert out.stdout.rstrip().endswith("FINISH_REASON_LENGTH after 20 tokens"), out.stdout
    else:
        assert out.returncode == 1 and "NotFound: unknown route 'no-such-route'" in out.stderr, out.stderr
        assert "ROUTE_NOT_FOUND" in out.stderr  # the ErrorInfo detail


@pytest.mark.parametrize("route", ["sim", "no-such-route"])
def test_typescript_example(default_address: str, route: str) -> None:
    (example,) = blocks("js")
    code = example.replace("localhost:50051", default_address).replace('"sim"', f'"{route}"')
    # Run from the repository, as a file in it would be: @tokenwire/client resolves through node_modules.
    out = subprocess.run(
        ["node", "--input-type=module", "-e", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if route == "sim":
        assert out.returncode == 0, out.stderr
        assert out.stdout.rstrip().endswith("LENGTH after 20 tokens"), out.stdout
    else:
        assert out.returncode == 1, out.stderr
        assert out.stderr.strip() == (
            "NotFound: unknown route 'no-such-route'; ListModels lists the routes this server serves (ROUTE_NOT_FOUND)"
        )


# Stand-ins for the keys the README's provider recipe exports: the server checks they are set.
PROVIDER_KEYS = dict.fromkeys(("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "ANTHROPIC_API_KEY"), "readme-test-key-0")


def test_the_provider_example_file_holds_the_readmes_routes() -> None:
    (block,) = blocks("toml")
    example = tomllib.loads((ROOT / "config" / "providers.example.toml").read_text())
    assert tomllib.loads(block)["routes"].items() <= example["routes"].items()


@pytest.mark.parametrize(
    "command", [*commands("make run"), *commands("TOKENWIRE_LISTEN="), *commands("python -m service --config")]
)
def test_server_recipes_serve_until_sigterm(command: str, tmp_path: Path) -> None:
    # Port 0 instead of a fixed port, so a test never fights another server for it.
    command = re.sub(r"(127\.0\.0\.1|localhost):\d+", "127.0.0.1:0", command)
    if command.startswith("make run"):
        command += " ARGS='--listen 127.0.0.1:0'"
    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            command,
            shell=True,
            cwd=ROOT,
            stderr=err,
            env=shell_env(**PROVIDER_KEYS),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "limits:" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal that runs it
        proc.wait(20)
    # The shell around it dies of the signal; the server itself drains and stops cleanly.
    assert log.read_text().rstrip().endswith("INFO tokenwire: stopped"), log.read_text()
    # The settings the recipe gives in the environment are the ones in force.
    for name, value in re.findall(r"TOKENWIRE_([A-Z_]+)=(\S+)", command):
        if name != "LISTEN":
            assert f"{name.lower()}={value}" in log.read_text()


@pytest.mark.parametrize("command", commands("python -m service --help"))
def test_help_recipe(command: str, default_address: str) -> None:
    out = run(command, default_address)
    assert out.returncode == 0 and "TOKENWIRE_" in out.stdout


@pytest.mark.parametrize("script", blocks("bash"))
def test_durable_stream_recipes(default_address: str, script: str, tmp_path: Path) -> None:
    # Run as a whole, as a user pastes it: each line uses what the ones before it set.
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace("localhost:50051", default_address)],
        cwd=tmp_path,
        env=shell_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    if "Cancel" in script:
        # The resumed part ends with the Finish, the poll shows two chunks after 3, and Cancel on
        # the finished stream says so.
        assert '"finish"' in out.stdout and '"sequence": "4"' in out.stdout and '"sequence": "5"' in out.stdout
        assert "STREAM_STATUS_FINISHED" in out.stdout
    else:
        assert out.stdout.strip().splitlines()[-1].startswith("batch up to ")


# -- the HTTP door ("HTTP and browsers") ---------------------------------------------------------


def http_run(command: str, grpc_address: str) -> subprocess.CompletedProcess[str]:
    return run(command.replace("localhost:8080", HTTP_ADDRESSES[grpc_address]), grpc_address)


@pytest.mark.parametrize("command", commands("curl "))
def test_curl_recipe(default_address: str, command: str) -> None:
    out = http_run(command, default_address)
    assert out.returncode == 0, out.stderr
    if '"stream": true' in command:
        events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
        if "sim-error" in command:
            assert '"error"' in events[-1] and "data: [DONE]" not in events
        else:
            assert events[-1] == "data: [DONE]" and '"usage"' in events[-2]
    else:
        assert json.loads(out.stdout)


def test_durable_curl_recipe_resumes_with_last_event_id(default_address: str) -> None:
    (script,) = blocks("shell")
    out = http_run(script, default_address)
    assert out.returncode == 0, out.stderr
    ids = [int(line[4:]) for line in out.stdout.splitlines() if line.startswith("id: ")]
    # The first read stops after four events; the resume goes on from five to the finish.
    assert ids[:4] == [1, 2, 3, 4] and ids[4:] == list(range(5, len(ids) + 1)) and len(ids) > 10
    assert "event: finish" in out.stdout
    # The poll after the end, and a cancel of a finished stream that changes nothing.
    tail = out.stdout.splitlines()[-2:]
    assert json.loads(tail[0])["messages"][0]["sequence"] == "5"
    assert json.loads(tail[1])["state"]["status"] == "STREAM_STATUS_FINISHED"


def test_openai_sdk_example(default_address: str) -> None:
    (example,) = [block for block in blocks("python") if "localhost:8080" in block]
    out = subprocess.run(
        [sys.executable, "-c", example.replace("localhost:8080", HTTP_ADDRESSES[default_address])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("tokens") and len(out.stdout) > 100
