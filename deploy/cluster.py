"""A tokenwire cluster on loopback: Redis, N replicas sharing it as their journal, nginx in front.

    python deploy/cluster.py up [--replicas 3] [--dir .cluster]   # `make cluster`
    python deploy/cluster.py down [--dir .cluster]                 # `make cluster-down`
    python deploy/cluster.py watch --dir .cluster                  # run by `up`: see below

`up` starts redis-server (no persistence), the replicas (`python -m service` with the shipped
config/tokenwire.toml, TOKENWIRE_JOURNAL set to the Redis URL, each on its own port), nginx with
deploy/nginx/tokenwire.conf (its replica list rewritten to those ports), and the health watcher,
waits until a call through nginx is answered, prints the addresses and returns; everything keeps
running, in process groups of its own, until `down` (SIGTERM: the replicas drain). Logs and pids
are in the directory. Everything binds 127.0.0.1.

`watch` is how a draining replica leaves nginx (open-source nginx has no active health checks):
it polls every replica's gRPC health and marks the NOT_SERVING ones `down` in the nginx config,
then reloads nginx (SIGHUP; old workers finish the streams they carry). A replica that does not
answer at all is left to nginx's passive removal (max_fails / fail_timeout), and the watcher
never marks every replica down.

The tests (tests/test_cluster.py) drive the same `Cluster` class.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "tokenwire.conf"
DEFAULT_CONFIG = ROOT / "config" / "tokenwire.toml"
HOST = "127.0.0.1"
# `make cluster`'s fixed ports: nginx, then the replicas, then Redis.
NGINX_PORT = 50050
FIRST_REPLICA_PORT = 50061
REDIS_PORT = 6390

_INSTALL = {
    "redis-server": "apt-get install -y redis-server   (Debian/Ubuntu; macOS: brew install redis)",
    "nginx": "apt-get install -y nginx   (Debian/Ubuntu; macOS: brew install nginx)",
}
# The id a replica logs at start, and the one it takes when its lease lapsed.
_REPLICA_ID = re.compile(rb"replica ([0-9a-f]{32}): durable streams|replica id is now ([0-9a-f]{32})")


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        raise ClusterError(f"{binary} is not installed; install it with: {_INSTALL[binary]}")
    return path


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _spawn(args: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # A process group of its own: stopped as a whole, and not by a Ctrl-C meant for `make`.
        return subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            cwd=ROOT,
        )


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as gone: a child of ours is reaped here; another's (`up` exited, and a
    # container's pid 1 may never reap) is only read from /proc.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # Gone since kill(0), or no /proc at all (macOS), where kill(0) is all there is to ask.
        return not Path("/proc/self").exists()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop_pid(pid: int, sig: signal.Signals, timeout: float) -> None:
    _signal_group(pid, sig)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except (FileNotFoundError, ValueError):
        return set()


def render_nginx(template: str, listen_port: int, replicas: Sequence[tuple[int, bool]], temp: Path) -> str:
    """The shipped nginx config with this cluster's replicas (port, down) and listen port."""
    lines = "\n".join(
        f"        server {HOST}:{port} max_fails=1 fail_timeout=5s{' down' if down else ''};" for port, down in replicas
    )
    text, n = re.subn(
        r"(# BEGIN replicas\n).*?(\n\s*# END replicas)", lambda m: m.group(1) + lines + m.group(2), template, flags=re.S
    )
    text, m = re.subn(r"listen 127\.0\.0\.1:\d+ http2;", f"listen {HOST}:{listen_port} http2;", text)
    paths = "\n".join(
        f"    {name}_temp_path {temp / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text, k = re.subn(r"    # CLUSTER-ONLY.*\n", paths + "\n", text)
    if (n, m, k) != (1, 1, 1):
        raise ClusterError(f"{NGINX_CONF} lost its markers (replicas {n}, listen {m}, cluster-only {k})")
    return text


@dataclass
class Replica:
    index: int
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def replica_id(self, timeout: float = 10.0) -> str:
        """The replica id it logged at start (its lease in Redis)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _REPLICA_ID.findall(self.log.read_bytes()) if self.log.exists() else []
            if found:
                return str((found[-1][0] or found[-1][1]).decode())
            time.sleep(0.05)
        raise ClusterError(f"replica {self.index} logged no replica id (see {self.log})")

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return _alive(self.pid)


@dataclass
class Cluster:
    """Redis, replicas and nginx on loopback; ports 0 pick free ones."""

    directory: Path
    replicas: int = 3
    config: Path = DEFAULT_CONFIG
    env: Mapping[str, str] = field(default_factory=dict)
    nginx_port: int = 0
    redis_port: int = 0
    first_replica_port: int = 0
    watch_interval: float = 0.5
    members: list[Replica] = field(default_factory=list)
    procs: dict[str, int] = field(default_factory=dict)
    # The processes this object started (reaped when stopped); `down` from another process has pids only.
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _child(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        old = self.children.get(name)
        if old is not None and old.poll() is None:
            raise ClusterError(f"{name} is still running")
        self.children[name], self.procs[name] = proc, proc.pid

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def nginx_address(self) -> str:
        return f"{HOST}:{self.nginx_port}"

    def start(self, timeout: float = 30.0) -> None:
        redis_server, nginx = require("redis-server"), require("nginx")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "temp").mkdir(exist_ok=True)
        self.redis_port = self.redis_port or free_port()
        self.nginx_port = self.nginx_port or free_port()
        ports = [self.first_replica_port + i if self.first_replica_port else free_port() for i in range(self.replicas)]
        for port in (self.redis_port, self.nginx_port, *ports):
            if _answers(port):
                raise ClusterError(f"port {port} is in use (is a cluster up already? `make cluster-down`)")
        try:
            self._start_redis(redis_server)
            for i, port in enumerate(ports):
                self.members.append(Replica(i, port, self.directory / f"replica-{i}.log"))
                self.start_replica(i)
            self.write_nginx_conf([False] * self.replicas)
            self._start_nginx(nginx)
            self._start_watcher()
            self._save()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_redis(self, binary: str) -> None:
        args = [binary, "--port", str(self.redis_port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.directory), "--loglevel", "warning"]
        self._child("redis", _spawn(args, self.directory / "redis.log"))
        self._wait_port(self.redis_port, "redis-server", self.directory / "redis.log", 10)

    def restart_redis(self, down_for: float = 0.0) -> None:
        """Stops Redis (its data goes: no persistence) and starts it again on the same port."""
        _stop_pid(self.procs["redis"], signal.SIGTERM, 5)
        if "redis" in self.children:
            self.children["redis"].wait(5)
        time.sleep(down_for)
        self._start_redis(require("redis-server"))
        self._save()

    def start_replica(self, index: int) -> Replica:
        member = self.members[index]
        env = {
            # Each replica's /metrics on a free port of its own (its log line says which).
            "TOKENWIRE_METRICS_LISTEN": "127.0.0.1:0",
            **os.environ,
            "TOKENWIRE_LISTEN": member.address,
            "TOKENWIRE_JOURNAL": self.redis_url,
            **self.env,
        }
        env.pop("TOKENWIRE_WORKER", None)
        proc = _spawn([sys.executable, "-m", "service", "--config", str(self.config)], member.log, env)
        member.proc, member.pid = proc, proc.pid
        self._child(f"replica-{index}", proc)
        return member

    def write_nginx_conf(self, down: Sequence[bool]) -> None:
        text = render_nginx(
            NGINX_CONF.read_text(),
            self.nginx_port,
            [(m.port, d) for m, d in zip(self.members, down, strict=True)],
            self.directory / "temp",
        )
        conf = self.directory / "nginx.conf"
        conf.with_suffix(".tmp").write_text(text)
        conf.with_suffix(".tmp").replace(conf)

    def _nginx_args(self, binary: str) -> list[str]:
        d = self.directory
        return [binary, "-c", str(d / "nginx.conf"), "-p", str(d), "-g", f"daemon off; pid {d / 'nginx.pid'};"]

    def _start_nginx(self, binary: str) -> None:
        check = subprocess.run(
            [*self._nginx_args(binary), "-t", "-e", str(self.directory / "nginx-error.log")],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if check.returncode:
            raise ClusterError(f"nginx -t failed: {check.stderr.decode(errors='replace')}")
        args = [*self._nginx_args(binary), "-e", str(self.directory / "nginx-error.log")]
        self._child("nginx", _spawn(args, self.directory / "nginx.log"))
        self._wait_port(self.nginx_port, "nginx", self.directory / "nginx-error.log", 10)

    def reload_nginx(self, timeout: float = 5.0) -> None:
        """Reloads nginx's config and returns once its new workers run (the old ones then stop
        taking connections, and finish the streams they carry)."""
        master = self.procs["nginx"]
        before = _children(master)
        os.kill(master, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while not (_children(master) - before) and time.monotonic() < deadline:
            time.sleep(0.02)
        # The old workers close their listening sockets when the master tells them to quit.
        time.sleep(0.2)

    def _start_watcher(self) -> None:
        args = [sys.executable, str(Path(__file__)), "watch", "--dir", str(self.directory)]
        args += ["--interval", str(self.watch_interval)]
        self._child("watcher", _spawn(args, self.directory / "watcher.log"))

    def _save(self) -> None:
        state = {
            "procs": self.procs,
            "nginx_port": self.nginx_port,
            "redis_port": self.redis_port,
            "replicas": [m.port for m in self.members],
        }
        (self.directory / "cluster.json").write_text(json.dumps(state, indent=2))

    def _wait_port(self, port: int, what: str, log: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _answers(port):
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise ClusterError(f"{what} did not listen on {HOST}:{port} within {timeout:g} s: {tail}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every replica's health is SERVING and a call through nginx is answered."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            self.wait_serving(member, max(deadline - time.monotonic(), 0.1))
        while _health(self.nginx_address) != "SERVING":
            if time.monotonic() > deadline:
                raise ClusterError(f"nginx on {self.nginx_address} does not pass calls on (see {self.directory})")
            time.sleep(0.1)

    def wait_serving(self, member: Replica, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _health(member.address) != "SERVING":
            if not member.running():
                raise ClusterError(f"replica {member.index} exited: {member.log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise ClusterError(f"replica {member.index} on {member.address} is not SERVING (see {member.log})")
            time.sleep(0.05)

    def stop(self) -> None:
        """Watcher and nginx first (no new calls), then the replicas drain (SIGTERM), then Redis."""
        order = ["watcher", "nginx"] + [k for k in self.procs if k.startswith("replica-")] + ["redis"]
        for name in order:
            pid = self.procs.pop(name, None)
            if pid:
                _stop_pid(pid, signal.SIGQUIT if name == "nginx" else signal.SIGTERM, 15)
            child = self.children.pop(name, None)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(5)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "cluster.json").unlink()

    @classmethod
    def load(cls, directory: Path) -> Cluster:
        state = json.loads((directory / "cluster.json").read_text())
        cluster = cls(directory, replicas=len(state["replicas"]))
        cluster.procs = {k: int(v) for k, v in state["procs"].items()}
        cluster.nginx_port, cluster.redis_port = state["nginx_port"], state["redis_port"]
        cluster.members = [
            Replica(i, port, directory / f"replica-{i}.log", pid=cluster.procs.get(f"replica-{i}", 0))
            for i, port in enumerate(state["replicas"])
        ]
        return cluster


def _health(address: str, timeout: float = 0.5) -> str:
    """gRPC health of the server at `address`: SERVING, NOT_SERVING, or "" when it does not answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return ""
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def watch(directory: Path, interval: float) -> None:
    """Marks NOT_SERVING replicas `down` in nginx's config and reloads it; runs until SIGTERM."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cluster = Cluster.load(directory)
    channels = [grpc.insecure_channel(m.address) for m in cluster.members]
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    down = [False] * len(stubs)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        now = list(down)
        for i, stub in enumerate(stubs):
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=min(interval, 0.5))
            except grpc.RpcError:
                continue  # not answering: nginx's passive removal takes care of it
            now[i] = reply.status != health_pb2.HealthCheckResponse.SERVING
        if now != down and not all(now):
            cluster.write_nginx_conf(now)
            cluster.reload_nginx()
            names = [m.address for m, d in zip(cluster.members, now, strict=True) if d]
            print(f"{time.strftime('%H:%M:%S')} nginx reloaded; down: {', '.join(names) or 'none'}", flush=True)
            down = now
        time.sleep(interval)
    for channel in channels:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/cluster.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "watch"))
    parser.add_argument("--dir", type=Path, default=ROOT / ".cluster", help="logs, pids and configs (default .cluster)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the replicas' config file")
    parser.add_argument("--interval", type=float, default=0.5, help="watch: seconds between health polls")
    parser.add_argument("--free-ports", action="store_true", help=f"up: free ports instead of {NGINX_PORT} etc.")
    args = parser.parse_args(argv)
    try:
        if args.command == "watch":
            watch(args.dir, args.interval)
            return 0
        if args.command == "down":
            if not (args.dir / "cluster.json").exists():
                print(f"no cluster in {args.dir}")
                return 0
            Cluster.load(args.dir).stop()
            print("cluster stopped")
            return 0
        cluster = Cluster(
            args.dir,
            replicas=args.replicas,
            config=args.config,
            nginx_port=0 if args.free_ports else NGINX_PORT,
            redis_port=0 if args.free_ports else REDIS_PORT,
            first_replica_port=0 if args.free_ports else FIRST_REPLICA_PORT,
            watch_interval=args.interval,
        )
        cluster.start()
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    print(f"redis     {cluster.redis_url}")
    for member in cluster.members:
        print(f"replica   {member.address}   (replica id {member.replica_id()}, log {member.log})")
    print(f"nginx     {cluster.nginx_address}   (gRPC, grpc_pass over the replicas)")
    print(f"try:      .venv/bin/python -m tokenwire_client --target {cluster.nginx_address} --durable")
    print("stop:     make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
