"""Command line: `python -m service` loads the configuration and serves until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from service import __version__
from service.config import ENV_PREFIX, Config, ConfigError, ServerConfig, load_config, unknown_env
from service.errors import redact
from service.server import TokenwireServer

log = logging.getLogger("tokenwire")

_EPILOG = f"""\
configuration: a TOML file (--config, or ${ENV_PREFIX}CONFIG) with [server] settings and
[routes.NAME] tables; without one, built-in simulated routes are served. Every [server] key can
be overridden with an environment variable {ENV_PREFIX}<KEY>, e.g. {ENV_PREFIX}LISTEN=0.0.0.0:50051
or {ENV_PREFIX}MAX_CONCURRENT_STREAMS=200. Command-line flags win over both.
[server] keys: {", ".join(ServerConfig.__dataclass_fields__)}.
"""


class _RedactingFormatter(logging.Formatter):
    """Last line of defence: no credential-shaped text leaves in a log line, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


class JsonLogFormatter(JsonFormatter):
    """One JSON object a line: time, level, logger, message, a stream's figures under "stream".

    Every string in it is redacted as the text lines are, before it is serialized, so the line
    stays valid JSON (redacting the serialized line could cut into its quoting).
    """

    def __init__(self, worker: str = "") -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )
        self.worker = worker

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        if self.worker:
            log_data["worker"] = self.worker
        return {k: _redacted(v) for k, v in log_data.items()}


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    worker = os.environ.get(ENV_PREFIX + "WORKER")
    where = f" worker {worker}" if worker else ""
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter(worker or ""))
    else:
        handler.setFormatter(_RedactingFormatter(f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library warnings (an SDK's deprecation notice) go through the same redacting handler.
    logging.captureWarnings(True)
    # The HTTP client logs a line per upstream request at INFO; the stream's own line says more.
    quiet = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in ("httpx2", "httpcore2", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(quiet)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="tokenwire: a gRPC gateway that streams LLM responses (tokenwire.v1).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help=f"TOML configuration file (default: ${ENV_PREFIX}CONFIG)")
    parser.add_argument("--listen", help="HOST:PORT to listen on (default: localhost:50051; port 0 picks one)")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    parser.add_argument("--workers", type=int, help="server processes sharing the port with SO_REUSEPORT (default 1)")
    parser.add_argument("--version", action="version", version=f"tokenwire {__version__}")
    return parser.parse_args(argv)


async def serve(config: Config) -> int:
    server = TokenwireServer(config)
    await server.start()
    s = config.server
    log.info("tokenwire %s listening on %s; routes: %s", __version__, server.address, ", ".join(config.routes))
    if server.http is not None:
        log.info("HTTP door listening on %s (OpenAI-compatible /v1, native SSE, the page at /)", server.http.address)
    log.info(
        "limits: max_concurrent_streams=%d max_request_bytes=%d max_metadata_bytes=%d "
        "shutdown_grace_seconds=%g keepalive_time_seconds=%g",
        s.max_concurrent_streams,
        s.max_request_bytes,
        s.max_metadata_bytes,
        s.shutdown_grace_seconds,
        s.keepalive_time_seconds,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP reloads the keys file at once (it is also reloaded when it changes).
    loop.add_signal_handler(signal.SIGHUP, server.keys.reload)
    if server.keys.enabled:
        log.info("auth on: %d caller key(s) from %s", len(server.keys), s.keys_file)
    if server.metrics_server is not None:
        log.info("metrics at http://%s:%d/metrics", s.metrics_listen.rsplit(":", 1)[0], server.metrics_server.port)
    await stop.wait()
    log.info("shutting down: draining for up to %g s", config.server.shutdown_grace_seconds)
    await server.stop()
    log.info("stopped")
    return 0


def supervise(config: Config, argv: list[str]) -> int:
    """Runs `workers` server processes on one port (SO_REUSEPORT) and passes signals on to them.

    Each worker is this command again, on the port resolved here (port 0 becomes one free port
    for all). The supervisor exits when they all have, with the worst exit code (a worker killed
    by signal N counts as 128 + N); a worker that fails stops the others.
    """
    host, _, port = config.server.listen.rpartition(":")
    # Port 0: one free port for all, held (bound with SO_REUSEPORT, never listening) for as long
    # as the workers run, so nothing else can take it between the choice and their binding.
    reserved: socket.socket | None = None
    if port == "0":
        reserved = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((host.strip("[]"), 0))
        port = str(reserved.getsockname()[1])
    try:
        return _run_workers(config, argv, f"{host}:{port}")
    finally:
        if reserved is not None:
            reserved.close()


def _run_workers(config: Config, argv: list[str], listen: str) -> int:
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def hang_up() -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGHUP)

    def stop(signum: int) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    # Installed before the first worker starts, so that no signal can leave a worker orphaned.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop(signum) if signum != signal.SIGHUP else hang_up())
    try:
        for n in range(1, config.server.workers + 1):
            if stopping:
                break
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service", *argv, "--listen", listen],
                    env={**os.environ, ENV_PREFIX + "WORKER": str(n)},
                )
            )
        log.info("supervising %d workers on %s (SO_REUSEPORT)", len(workers), listen)
        while any(worker.poll() is None for worker in workers):
            if not stopping and any(worker.returncode for worker in workers):
                stop(signal.SIGTERM)  # once: a worker failed, the rest drain and stop
            time.sleep(0.1)
    except BaseException:
        stop(signal.SIGTERM)
        raise
    codes = [worker.returncode for worker in workers]
    return max((128 - code if code < 0 else code for code in codes), default=0)


def run(main: Coroutine[Any, Any, int], event_loop: str) -> int:
    """Runs the server on the configured loop. uvloop was once refused because a stalled caller
    made the server take in the provider's whole answer; the provider socket is bounded now
    (service/providers/http1.py), and bench/slow_reader_probe.py measures the bound on both."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise ConfigError('[server] event_loop = "uvloop" but uvloop is not installed') from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.config or (Path(os.environ[ENV_PREFIX + "CONFIG"]) if os.environ.get(ENV_PREFIX + "CONFIG") else None)
    try:
        overrides = {"listen": args.listen, "log_level": args.log_level, "workers": args.workers}
        config = load_config(path, os.environ, overrides)
        configure_logging(config.server.log_level, config.server.log_format)
        for name in unknown_env(os.environ):
            log.warning("ignoring environment variable %s: no such setting (see --help)", name)
        if config.server.workers > 1 and not os.environ.get(ENV_PREFIX + "WORKER"):
            return supervise(config, sys.argv[1:] if argv is None else argv)
        return run(serve(config), config.server.event_loop)
    except ConfigError as exc:
        print(f"tokenwire: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
