"""A real redis-server for the tests and the bench: 127.0.0.1 only, a free port, no persistence.

Debian's `redis-server` (.ci/run installs it). It runs in the foreground as a child process, so
nothing outlives the test session; a missing binary is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; `stop` and `start` again keep its port (a restart)."""

    def __init__(self, *extra: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server (.ci/run does this)")
        self.binary = binary
        self.port = free_port()
        self.extra = extra
        self._dir = tempfile.TemporaryDirectory(prefix="tokenwire-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self._dir.name, "--loglevel", "warning", *self.extra]
        with Path(self._dir.name, "redis.log").open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = Path(self._dir.name, "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server did not start on port {self.port}: {text[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@contextlib.contextmanager
def running_redis(*extra: str) -> Iterator[RedisServer]:
    """A started redis-server, stopped (and its directory removed) on exit."""
    server = RedisServer(*extra)
    try:
        server.start()
        yield server
    finally:
        server.close()
