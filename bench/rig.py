"""The benchmark rig: what each relay path adds on top of the same fake upstream, side by side.

Paths, interleaved step by step through one upstream (bench/upstream.py):
  direct     the load generator reads the upstream's SSE itself: the baseline
  bare       bench/bare_forwarder.py, the floor of grpc.aio + Python on this machine
  tokenwire  `python -m service` with one openai-compatible route to the upstream
  http       the same server's HTTP door: OpenAI-compatible /v1/chat/completions, streamed (SSE)
  durable    the same, every stream durable (a resume window) on the memory journal
  durable-redis  the same on a Redis journal (redis-server pinned to the load core; its CPU reported)
  operated   the tokenwire path with everything an operator turns on: a keys file (every stream
             authenticated, its quotas counted in memory), /metrics, and tracing (spans made, not
             exported); `tokenwire` itself runs with all of them off, so the two side by side are
             their cost per stream and per chunk
  litellm    LiteLLM proxy (its own virtual environment, bench/.venv-litellm), when installed

The systems under test run pinned to core 0 (taskset); the upstream and the load generator to
core 1. For every step (a number of concurrent streams) and path it reports the added time to first
token and the added inter-chunk gap (p50/p99, over the direct path at the same step), CPU-seconds of
the system under test per 1,000 relayed chunks (from /proc over the measured window), its RSS, and
whether the step is valid: every stream complete, and the load core under 85% busy. It writes a
table to stdout, a JSON file and a PNG plot of added gap p99 against relayed chunks per second.

    .venv/bin/python bench/rig.py                # the full rig (make bench)
    .venv/bin/python bench/rig.py --quick        # two steps, short (make bench-quick)

Everything binds and talks to 127.0.0.1; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
SUT_CORE, LOAD_CORE = "0", "1"
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
INVALID_LOAD_BUSY = 0.85
# LiteLLM refuses to start without a strong master key: a throwaway one for this run, on loopback.
LITELLM_KEY = "sk-bench-" + secrets.token_hex(16)


def pinned(core: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else argv


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start(name: str, argv: list[str], log_dir: Path, pattern: str, env: dict[str, str] | None = None) -> Process:
    """Starts a process; it is ready when its log matches `pattern` (group 1: its address), or,
    for a pattern that is an address itself, when that address accepts connections."""
    log = log_dir / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if re.fullmatch(r"127\.0\.0\.1:\d+", pattern):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", int(pattern[10:])), timeout=1):
                return Process(name, proc, pattern, log)
        else:
            found = re.search(pattern, log.read_text(errors="replace"))
            if found:
                return Process(name, proc, found.group(1), log)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-2000:]}")


def load_core_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the load core so far."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{LOAD_CORE} "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + values[4]
            return sum(values) - idle, sum(values)
    return 0, 1


@dataclass
class Step:
    path: str
    streams: int
    starts: str
    result: dict[str, Any]
    sut_cpu: float | None
    load_busy: float
    rss_mib: float | None
    added: dict[str, float | None] = field(default_factory=dict)
    # CPU-seconds of a process the path needs beside its system under test (Redis).
    beside_cpu: float | None = None

    @property
    def chunks(self) -> int:
        return int(self.result["chunks"])

    @property
    def cpu_per_1000(self) -> float | None:
        if self.sut_cpu is None or not self.chunks:
            return None
        return float(self.sut_cpu / (self.result["chunks_per_second"] * self.result["seconds"]) * 1000)

    @property
    def beside_cpu_per_1000(self) -> float | None:
        if self.beside_cpu is None or not self.chunks:
            return None
        return float(self.beside_cpu / (self.result["chunks_per_second"] * self.result["seconds"]) * 1000)

    @property
    def valid(self) -> bool:
        return self.result["bad"] == 0 and self.result["ok"] > 0 and self.load_busy <= INVALID_LOAD_BUSY


# The resume window durable paths ask for: long enough for the run, short enough to keep the
# memory journal's retention small.
DURABLE_WINDOW_SECONDS = 5.0
DURABLE_PATHS = ("durable", "durable-redis")
RESUME_STREAMS = 25


def measure(
    path: str,
    sut: Process | None,
    target: str,
    streams: int,
    args: argparse.Namespace,
    *,
    break_after: int = 0,
    beside: Process | None = None,
    starts: str = "even",
) -> Step:
    mode = "sse" if path in ("direct", "litellm", "http") else "grpc"
    model = "bench" if path != "litellm" else "bench-model"
    command = [PY, "bench/loadgen.py", mode, target, "--streams", str(streams), "--model", model]
    command += ["--seconds", str(args.seconds), "--warmup", str(args.warmup), "--tokens", str(args.tokens)]
    command += ["--starts", starts, "--period", str(args.tokens * args.interval)]
    if path == "litellm":
        command += ["--key", LITELLM_KEY]
    if path == "operated":
        command += ["--key", BENCH_CALLER_KEY, "--grpc-key"]
    if path in DURABLE_PATHS:
        command += ["--durable", str(DURABLE_WINDOW_SECONDS), "--break-after", str(break_after)]
    argv = pinned(LOAD_CORE, command)
    loadgen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    time.sleep(args.warmup)
    cpu0 = sut.cpu_seconds() if sut else None
    beside0 = beside.cpu_seconds() if beside else None
    busy0, total0 = load_core_busy()
    time.sleep(args.seconds)
    cpu1 = sut.cpu_seconds() if sut else None
    beside1 = beside.cpu_seconds() if beside else None
    busy1, total1 = load_core_busy()
    out, err = loadgen.communicate(timeout=args.seconds + 120)
    if loadgen.returncode != 0:
        raise RuntimeError(f"load generator failed on {path}: {err.decode()[-2000:]}")
    result = json.loads(out)
    sut_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    busy = (busy1 - busy0) / max(total1 - total0, 1)
    step = Step(path, streams, starts, result, sut_cpu, busy, sut.rss_mib() if sut else None)
    if beside0 is not None and beside1 is not None:
        step.beside_cpu = beside1 - beside0
    return step


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def table(steps: list[Step]) -> str:
    lines = [
        f"{'path':<13} {'streams':>7} {'starts':>6} {'chunks/s':>9} {'+ttft p50':>10} {'+ttft p99':>10} "
        f"{'+gap p50':>9} {'+gap p99':>9} {'CPU-s/1k':>9} {'RSS MiB':>8} {'load core':>9}  valid",
    ]
    for s in steps:
        cpu = "-" if s.cpu_per_1000 is None else f"{s.cpu_per_1000:.3f}"
        rss = "-" if s.rss_mib is None else f"{s.rss_mib:.0f}"
        if s.beside_cpu_per_1000 is not None:
            cpu += f" +{s.beside_cpu_per_1000:.3f}"
        note = "yes" if s.valid else ("no: load core busy" if s.load_busy > INVALID_LOAD_BUSY else "no: streams failed")
        lines.append(
            f"{s.path:<13} {s.streams:>7} {s.starts:>6} {s.result['chunks_per_second']:>9.0f} "
            f"{ms(s.added.get('ttft_p50')):>10} {ms(s.added.get('ttft_p99')):>10} "
            f"{ms(s.added.get('gap_p50')):>9} {ms(s.added.get('gap_p99')):>9} "
            f"{cpu:>9} {rss:>8} {s.load_busy:>8.0%}  {note}"
        )
    return "\n".join(lines)


def summary(steps: list[Step], base_rss: dict[str, float]) -> dict[str, Any]:
    """Per path: CPU per 1,000 chunks, capacity, memory."""
    out: dict[str, Any] = {}
    direct_rate = {(s.streams, s.starts): s.result["chunks_per_second"] for s in steps if s.path == "direct"}
    for path in dict.fromkeys(s.path for s in steps):
        mine = [s for s in steps if s.path == path]
        # Held: a valid step, added gap p99 within 10 ms, and keeping up with the upstream (at least
        # 95% of the direct path's chunks per second: a saturated relay starts streams late).
        held = [
            s
            for s in mine
            if s.valid
            and (s.added.get("gap_p99") or 0.0) <= 0.010
            and s.result["chunks_per_second"] >= 0.95 * direct_rate.get((s.streams, s.starts), 0.0)
        ]
        cpus = [s.cpu_per_1000 for s in mine if s.valid and s.cpu_per_1000 is not None]
        cpu = min(cpus) if cpus else None
        besides = [s.beside_cpu_per_1000 for s in mine if s.valid and s.beside_cpu_per_1000 is not None]
        biggest = max(mine, key=lambda s: s.streams)
        per_1000_streams = None
        if path in base_rss and biggest.rss_mib is not None:
            per_1000_streams = (biggest.rss_mib - base_rss[path]) / biggest.streams * 1000
        out[path] = {
            "cpu_seconds_per_1000_chunks": cpu,
            "chunks_per_second_held": max((s.result["chunks_per_second"] for s in held), default=None),
            "chunks_per_second_at_70pct_of_a_core": 0.7 / cpu * 1000 if cpu else None,
            "base_rss_mib": base_rss.get(path),
            "rss_mib_per_1000_open_streams": per_1000_streams,
        }
        if besides:
            out[path]["redis_cpu_seconds_per_1000_chunks"] = min(besides)
    return out


def budget(steps: list[Step], summary: dict[str, Any]) -> list[dict[str, str]]:
    """QUALITY.md's budget, line by line: the floor's figure, tokenwire's, and met / not met.

    A line whose steps were invalid (a failed stream, or the load core over 85% busy) says
    "invalid": a saturated load side measures itself, not the relay."""
    by = {(s.path, s.streams, s.starts): s for s in steps}
    shapes = list(dict.fromkeys(s.starts for s in steps))
    rows: list[dict[str, str]] = []

    def row(figure: str, limit: str, floor: str, measured: str, verdict: str) -> None:
        rows.append({"figure": figure, "budget": limit, "floor": floor, "tokenwire": measured, "verdict": verdict})

    def delta_line(key: str, streams: int, slack: float | None, absolute: float | None, label: str) -> None:
        for shape in shapes:
            mine, floor = by.get(("tokenwire", streams, shape)), by.get(("bare", streams, shape))
            figure = f"{label} at {streams} streams, {shape} starts"
            limit = f"<= floor + {slack * 1000:g} ms" if slack is not None else f"<= {(absolute or 0) * 1000:g} ms"
            if mine is None or (slack is not None and floor is None):
                row(figure, limit, "-", "-", "not measured")
                continue
            value, base = mine.added.get(key), floor.added.get(key) if floor else None
            verdict = "invalid"
            if mine.valid and (floor is None or floor.valid) and value is not None:
                bound = (base or 0.0) + slack if slack is not None else absolute or 0.0
                verdict = "met" if value <= bound else "not met"
            row(figure, limit, ms(base) + " ms" if floor else "-", ms(value) + " ms", verdict)

    delta_line("ttft_p50", 25, 0.0005, None, "added TTFT p50")
    delta_line("ttft_p99", 100, 0.005, None, "added TTFT p99")
    delta_line("gap_p99", 100, None, 0.003, "added gap p99")

    def cpu_ratios(path: str, against: str) -> list[float] | None:
        if not any(s.path == path for s in steps) or not any(s.path == against for s in steps):
            return None
        out = []
        for s in steps:
            other = by.get((against, s.streams, s.starts))
            if s.path != path or s.streams < 50 or other is None or not (s.valid and other.valid):
                continue
            if s.cpu_per_1000 and other.cpu_per_1000:
                out.append(s.cpu_per_1000 / other.cpu_per_1000)
        return out

    def ratio_line(figure: str, path: str, against: str, limit: float, note: str = "") -> None:
        ratios = cpu_ratios(path, against)
        if ratios is None:
            row(figure, f"<= {limit:.2f}x", "-", "-", "not measured")
        elif not ratios:
            row(figure, f"<= {limit:.2f}x", "-", "no valid step from 50 streams", "invalid")
        else:
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} valid steps{note}"
            row(figure, f"<= {limit:.2f}x {against}", "1.00x", spread, "met" if max(ratios) <= limit else "not met")

    ratio_line("CPU per 1,000 chunks, every valid step from 50 streams", "tokenwire", "bare", 1.10)
    held, held_floor = (summary.get(p, {}).get("chunks_per_second_held") for p in ("tokenwire", "bare"))
    proj, proj_floor = (summary.get(p, {}).get("chunks_per_second_at_70pct_of_a_core") for p in ("tokenwire", "bare"))
    top = max((s.streams for s in steps), default=0)
    projected = ""
    if proj and proj_floor:
        projected = f"; at 70% of a core {proj:.0f} vs {proj_floor:.0f} ({proj / proj_floor:.0%})"
    if held is None or held_floor is None:
        row("chunks per second held on one core", ">= 95% of floor", str(held_floor), f"{held}{projected}", "invalid")
    else:
        note = f" (both held the top step, {top} streams: a lower bound)" if held >= 0.95 * held_floor else ""
        row(
            "chunks per second held on one core",
            ">= 95% of floor",
            f"{held_floor:.0f}",
            f"{held:.0f} ({held / held_floor:.0%}){note}{projected}",
            "met" if held >= 0.95 * held_floor and (not projected or proj >= 0.95 * proj_floor) else "not met",
        )
    mine, floor = summary.get("tokenwire", {}), summary.get("bare", {})
    base, base_floor = mine.get("base_rss_mib"), floor.get("base_rss_mib")
    if base is not None:
        row(
            "memory: base RSS (the rig's one route)",
            "<= 80 MiB",
            f"{base_floor:.0f} MiB" if base_floor else "-",
            f"{base:.0f} MiB",
            "met" if base <= 80 else "not met",
        )
    per, per_floor = mine.get("rss_mib_per_1000_open_streams"), floor.get("rss_mib_per_1000_open_streams")
    if per is not None:
        row(
            f"memory per 1,000 open streams (RSS at {top} streams over base)",
            "<= 25 MiB",
            f"{per_floor:.1f} MiB" if per_floor is not None else "-",
            f"{per:.1f} MiB",
            "met" if per <= 25 else "not met",
        )
    ratio_line("durable streams, memory journal: CPU per chunk", "durable", "tokenwire", 1.10)
    redis = summary.get("durable-redis", {}).get("redis_cpu_seconds_per_1000_chunks")
    note = f"; Redis {redis:.3f} CPU-s per 1,000 chunks beside it" if redis else ""
    ratio_line("durable streams, Redis journal: CPU per chunk", "durable-redis", "bare", 1.5, note)
    ratio_line("the HTTP/SSE door: CPU per chunk", "http", "tokenwire", 1.2)
    row("peak memory of one request", "<= 3x its size", "-", "bench/request_memory_probe.py", "not measured here")
    row("--workers 2 / 2 replicas", ">= 1.8x one", "-", "-", "not measured here")
    return rows


def budget_table(rows: list[dict[str, str]]) -> str:
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("figure", "budget", "floor", "tokenwire")}
    head = " | ".join(k.ljust(w) for k, w in widths.items()) + " | verdict"
    lines = ["QUALITY.md budget (tokenwire against the floor, bare, in this run)", head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join(r[k].ljust(w) for k, w in widths.items()) + " | " + r["verdict"])
    return "\n".join(lines)


def plot(steps: list[Step], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for path in dict.fromkeys(s.path for s in steps):
        if path == "direct":
            continue
        mine = [s for s in steps if s.path == path and s.added.get("gap_p99") is not None]
        xs = [s.result["chunks_per_second"] for s in mine]
        ys = [(s.added["gap_p99"] or 0.0) * 1000 for s in mine]
        ax.plot(xs, ys, marker="o", label=path)
        for s, x, y in zip(mine, xs, ys, strict=True):
            if not s.valid:
                ax.annotate("invalid", (x, y), fontsize=7)
    ax.axhline(3, color="grey", linestyle=":", linewidth=1)
    ax.axhline(10, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("relayed chunks per second")
    ax.set_ylabel("added inter-chunk gap p99 over direct (ms)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title("What each path adds to the same upstream (SUT on one core)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


@contextlib.contextmanager
def systems(args: argparse.Namespace, log_dir: Path) -> Iterator[dict[str, Process | None]]:
    started: list[Process] = []
    try:
        upstream = start(
            "upstream",
            pinned(
                LOAD_CORE, [PY, "bench/upstream.py", "--tokens", str(args.tokens), "--interval", str(args.interval)]
            ),
            log_dir,
            r"listening on (\S+)",
        )
        started.append(upstream)
        suts: dict[str, Process | None] = {"direct": None}
        if "bare" in args.paths:
            bare = start(
                "bare",
                pinned(
                    SUT_CORE,
                    [PY, "bench/bare_forwarder.py", "--upstream", upstream.address, "--event-loop", args.event_loop],
                ),
                log_dir,
                r"listening on (\S+)",
            )
            started.append(bare)
            suts["bare"] = bare
        journals = {"tokenwire": "memory", "durable": "memory", "http": "memory", "operated": "memory"}
        if "durable-redis" in args.paths:
            port = free_port()
            redis = start(
                "redis",
                pinned(
                    LOAD_CORE,
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                ),
                log_dir,
                f"127.0.0.1:{port}",
            )
            started.append(redis)
            suts["redis"] = redis
            journals["durable-redis"] = f"redis://127.0.0.1:{port}/0"
        for path, journal in journals.items():
            if path not in args.paths:
                continue
            config = log_dir / f"{path}.toml"
            # Only the http path serves the HTTP door (on a free port); the others turn it off.
            http_listen = "127.0.0.1:0" if path == "http" else ""
            operated = 'metrics_listen = ""\n'
            if path == "operated":
                operated = f'keys_file = "{operator_keys(log_dir)}"\nmetrics_listen = "127.0.0.1:0"\ntracing = "on"\n'
            config.write_text(
                f'[server]\nlisten = "127.0.0.1:0"\nmax_concurrent_streams = 100000\njournal = "{journal}"\n'
                f'event_loop = "{args.event_loop}"\n'
                f'http_listen = "{http_listen}"\n{operated}\n'
                '[routes.bench]\nprovider = "openai-compatible"\nmodel = "bench-model"\n'
                f'options = {{ base_url = "http://{upstream.address}/v1" }}\n'
            )
            tokenwire = start(
                path,
                pinned(SUT_CORE, [PY, "-m", "service", "--config", str(config)]),
                log_dir,
                r"HTTP door listening on (\S+) " if path == "http" else r"listening on (\S+);",
            )
            started.append(tokenwire)
            suts[path] = tokenwire
        if "litellm" in args.paths:
            config = log_dir / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench-model\n    litellm_params:\n"
                f"      model: openai/bench-model\n      api_base: http://{upstream.address}/v1\n"
                "      api_key: bench-key\n"
                f"general_settings:\n  master_key: {LITELLM_KEY}\n"
            )
            env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
            port = free_port()
            litellm = start(
                "litellm",
                pinned(
                    SUT_CORE,
                    [
                        str(LITELLM_VENV / "bin" / "litellm"),
                        "--config",
                        str(config),
                        "--port",
                        str(port),
                        "--host",
                        "127.0.0.1",
                        "--num_workers",
                        "1",
                    ],
                ),
                log_dir,
                f"127.0.0.1:{port}",
                env=env,
            )
            started.append(litellm)
            suts["litellm"] = litellm
        suts["upstream"] = upstream
        yield suts
    finally:
        for process in started:
            process.stop()


BENCH_CALLER_KEY = "sk-tw-bench-" + secrets.token_hex(16)


def operator_keys(log_dir: Path) -> Path:
    """A keys file with the bench's one caller: all routes, quotas far above the load (so every
    check runs and none refuses)."""
    from service.callers import hash_key

    salt = secrets.token_bytes(16)
    path = log_dir / "keys.toml"
    path.write_text(
        f'salt = "{salt.hex()}"\n[keys.bench]\nhashes = ["{hash_key(salt, BENCH_CALLER_KEY)}"]\nroutes = ["*"]\n'
        "max_concurrent_streams = 1000000\nrequests_per_minute = 1000000000\ntokens_per_minute = 1000000000000\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("grpcio", "protobuf", "openai", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    litellm = LITELLM_VENV / "bin" / "python"
    if litellm.exists():
        out = subprocess.run(
            [str(litellm), "-c", "from importlib.metadata import version; print(version('litellm'))"],
            capture_output=True,
            text=True,
            check=False,
        )
        found["litellm"] = out.stdout.strip()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two steps of 5 s: a smoke run (make bench-quick)")
    parser.add_argument("--paths", default="direct,bare,tokenwire,http,durable,durable-redis,litellm")
    parser.add_argument("--steps", default="25,50,100,150,200", help="concurrent streams per step")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per step and path")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the loop tokenwire and the floor both run on (tokenwire's [server] event_loop)",
    )
    parser.add_argument(
        "--starts", default="even,bursty", help="start shapes measured at every step: even, bursty (see loadgen.py)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seconds, args.warmup = "25,100", 5.0, 1.5
    args.paths = [p for p in args.paths.split(",") if p]
    args.starts = [p for p in args.starts.split(",") if p]
    if not set(args.starts) <= {"even", "bursty"}:
        parser.error("--starts takes even, bursty or both")
    if "durable-redis" in args.paths and not shutil.which("redis-server"):
        print("durable-redis: no redis-server on PATH (apt-get install redis-server); skipped", flush=True)
        args.paths.remove("durable-redis")
    if "litellm" in args.paths and not (LITELLM_VENV / "bin" / "litellm").exists():
        print(f"litellm: not installed in {LITELLM_VENV} (make bench installs it); skipped", flush=True)
        args.paths.remove("litellm")
    steps_wanted = [int(n) for n in args.steps.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    base_rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, systems(args, Path(tmp)) as suts:
        targets = {"direct": suts["upstream"].address if suts["upstream"] else ""}
        for path in args.paths:
            process = suts.get(path)
            if process is not None:
                targets[path] = process.address
                base_rss[path] = process.rss_mib()
        for streams in steps_wanted:
            for shape in args.starts:
                for path in args.paths:
                    beside = suts.get("redis") if path == "durable-redis" else None
                    step = measure(path, suts.get(path), targets[path], streams, args, beside=beside, starts=shape)
                    steps.append(step)
                    print(
                        f"{path:<13} {streams:>4} streams, {shape:<6} starts: "
                        f"{step.result['chunks_per_second']:.0f} chunks/s, {step.result['ok']} streams ok, "
                        f"{step.result['bad']} failed, load core {step.load_busy:.0%}",
                        flush=True,
                    )
        # Resume latency: durable streams whose calls are cut after 20 messages and resumed.
        resumes: dict[str, Step] = {}
        for path in (p for p in args.paths if p in DURABLE_PATHS):
            step = measure(path, suts.get(path), targets[path], RESUME_STREAMS, args, break_after=20)
            resumes[path] = step
            print(
                f"{path:<10} resume: {step.result['resumes']} resumes, p50 {ms(step.result['resume_p50'])} ms, "
                f"p99 {ms(step.result['resume_p99'])} ms, {step.result['bad']} failed",
                flush=True,
            )
    by_step = {(s.path, s.streams, s.starts): s for s in steps}
    for s in steps:
        direct = by_step.get(("direct", s.streams, s.starts))
        if direct is None or s.path == "direct":
            continue
        for key in ("ttft_p50", "ttft_p99", "gap_p50", "gap_p99"):
            a, b = s.result[key], direct.result[key]
            s.added[key] = None if a is None or b is None else a - b
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "steps": [
            {
                "path": s.path,
                "streams": s.streams,
                "starts": s.starts,
                "valid": s.valid,
                "load_core_busy": s.load_busy,
                "sut_cpu_seconds": s.sut_cpu,
                "cpu_seconds_per_1000_chunks": s.cpu_per_1000,
                "rss_mib": s.rss_mib,
                "added": s.added,
                "loadgen": s.result,
            }
            for s in steps
        ],
        "summary": summary(steps, base_rss),
        "resume": {
            path: {
                "streams": step.streams,
                "resumes": step.result["resumes"],
                "resume_p50": step.result["resume_p50"],
                "resume_p99": step.result["resume_p99"],
                "failed": step.result["bad"],
            }
            for path, step in resumes.items()
        },
    }
    name = "bench-quick" if args.quick else "bench"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    print()
    print(table(steps))
    print()
    for path, figures in report["summary"].items():
        parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()]
        print(f"{path}: " + ", ".join(parts))
    try:
        plot(steps, args.out / f"{name}.png")
        print(f"\nwrote {args.out / f'{name}.json'} and {args.out / f'{name}.png'}")
    except ImportError:
        print(f"\nwrote {args.out / f'{name}.json'} (no matplotlib: no plot)")
    for path, figures in report["resume"].items():
        print(
            f"{path} resume latency: p50 {ms(figures['resume_p50'])} ms, p99 {ms(figures['resume_p99'])} ms "
            f"over {figures['resumes']} resumes"
        )
    door = report["summary"].get("http", {}).get("cpu_seconds_per_1000_chunks")
    grpc_door = report["summary"].get("tokenwire", {}).get("cpu_seconds_per_1000_chunks")
    if door and grpc_door:
        # QUALITY.md's budget: the HTTP/SSE door costs at most 1.2x the gRPC door per chunk.
        print(f"http door CPU per chunk: {door / grpc_door:.2f}x the gRPC door's (budget 1.20x)")
    report["budget"] = budget(steps, report["summary"])
    print()
    print(budget_table(report["budget"]))
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    failed = [s for s in [*steps, *resumes.values()] if s.result["bad"]]
    for s in failed:
        print(f"FAILED: {s.path} at {s.streams} streams: {s.result['bad']} broken streams, e.g. {s.result['problems']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
