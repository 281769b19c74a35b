"""Configuration: defaults that just work, the documented file, environment overrides, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.config import DEFAULT_ROUTES, ConfigError, load_config, unknown_env
from service.providers import create_provider

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_serve_simulated_routes_on_loopback() -> None:
    config = load_config()
    assert config.server.listen == "localhost:50051"
    assert set(config.routes) == set(DEFAULT_ROUTES)
    assert all(create_provider(route) for route in config.routes.values())


def test_shipped_config_file_documents_the_defaults() -> None:
    assert load_config(ROOT / "config" / "tokenwire.toml") == load_config()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nmax_concurrent_streams = 5\n[routes.a]\nprovider = "simulated"\nmodel = "m"\n')
    config = load_config(path, {"TOKENWIRE_MAX_CONCURRENT_STREAMS": "7", "TOKENWIRE_LISTEN": "127.0.0.1:6000"})
    assert config.server.max_concurrent_streams == 7
    assert config.server.listen == "127.0.0.1:6000"
    assert list(config.routes) == ["a"]
    flags = load_config(path, {"TOKENWIRE_LISTEN": "127.0.0.1:6000"}, {"listen": "127.0.0.1:7000"})
    assert flags.server.listen == "127.0.0.1:7000"


TWO_ROUTES = """
[routes.a]
provider = 'simulated'
model = 'm'
fallbacks = []
[routes.b]
provider = 'simulated'
model = 'm'
"""


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[server]\nlisten = 5\n", {}, "listen must be a str"),
        ("[server]\nbogus = 1\n", {}, "unknown [server] key(s) ['bogus']"),
        ("[server]\nmax_concurrent_streams = 0\n", {}, "must be from 1 to 1e+06, got 0"),
        ("", {"TOKENWIRE_MAX_REQUEST_BYTES": "3000000000"}, "max_request_bytes must be from"),
        ("", {"TOKENWIRE_KEEPALIVE_TIME_SECONDS": "nan"}, "keepalive_time_seconds must be from"),
        ("", {"TOKENWIRE_SHUTDOWN_GRACE_SECONDS": "inf"}, "shutdown_grace_seconds must be from"),
        ("", {"TOKENWIRE_MAX_CONCURRENT_STREAMS": "9" * 400}, "max_concurrent_streams must be from"),
        (
            TWO_ROUTES.replace("fallbacks = []", "fallbacks = ['b', 'b']"),
            {},
            "twice",
        ),
        ("", {"TOKENWIRE_MAX_CONCURRENT_STREAMS": "many"}, "is not a valid int"),
        ("[routes.a]\nprovider = 'simulated'\n", {}, "needs a non-empty string 'model'"),
        ("[routes.a]\nprovider = 'simulated'\nmodel = 'm'\nfallbacks = ['b']\n", {}, "unknown route 'b'"),
        ("[routes]\n", {}, "[routes] is empty"),
        ("[routes.a]\nprovider = 'simulated'\nmodel = 'm'\nfallbacks = ['a']\n", {}, "falls back to itself"),
        ("not toml [", {}, "not valid TOML"),
    ],
)
def test_bad_config_is_a_precise_error(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"provider": "nope", "model": "m"}, "unknown provider 'nope'; known:"),
        ({"provider": "simulated", "model": "m", "options": {"speed": 1}}, "unknown option(s) ['speed']"),
        ({"provider": "simulated", "model": "m", "options": {"tokens_per_second": -1}}, "must be from 0.0"),
        ({"provider": "simulated", "model": "m", "options": {"fail_with": "boom"}}, "must be one of"),
    ],
)
def test_bad_route_options_are_rejected_at_startup(route: dict[str, object], message: str) -> None:
    from service.config import build_routes

    with pytest.raises(ConfigError) as info:
        create_provider(build_routes({"r": route}, "test")["r"])
    assert message in str(info.value)


def test_misspelt_environment_variables_are_reported() -> None:
    env = {"TOKENWIRE_MAX_STREAMS": "5", "TOKENWIRE_LISTEN": "x:1", "TOKENWIRE_TARGET": "y:2", "HOME": "/"}
    assert unknown_env(env) == ["TOKENWIRE_MAX_STREAMS"]


def test_help_documents_flags_and_environment() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    for word in ("--config", "--listen", "--log-level", "TOKENWIRE_LISTEN", "max_concurrent_streams"):
        assert word in out.stdout


def test_bad_config_file_exits_2_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nlisten = 'nowhere'\n")
    out = subprocess.run(
        [sys.executable, "-m", "service", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "configuration error" in out.stderr and "HOST:PORT" in out.stderr
