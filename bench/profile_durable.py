"""Where a durable stream's server loop spends its time: py-spy on the rig's durable server.

Runs bench/rig.py for one path (durable-redis by default) at one step, finds the tokenwire server
the rig started for it (its config file is `<path>.toml`), records it with py-spy (GIL-holding
samples only, so idle waits do not count) for a part of the measured window, and prints the
functions with the largest share of the samples, inclusive (a function and what it calls) and by
themselves.

    .venv/bin/python bench/profile_durable.py                       # durable-redis, 100 streams
    .venv/bin/python bench/profile_durable.py --path durable --streams 50

py-spy comes with the dev extra (pyproject.toml). Everything runs on loopback; the rig stops what it
started.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYSPY = Path(sys.executable).parent / "py-spy"


def server_pid(path: str, within: float) -> int:
    """The pid of the `python -m service --config .../<path>.toml` the rig started."""
    deadline = time.monotonic() + within
    suffix = f"/{path}.toml"
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"service" in argv and any(a.decode(errors="replace").endswith(suffix) for a in argv):
                return int(proc.name)
        time.sleep(0.2)
    raise RuntimeError(f"no tokenwire server for {path} appeared")


def summarize(raw: Path, top: int) -> str:
    """Shares of the samples per function, from py-spy's raw (collapsed) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        # "function (file:line)" without the line: one name per function.
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    lines = [f"{total} samples (GIL held)", "", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "by itself:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="durable-redis")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0, help="the rig's measured window")
    parser.add_argument("--record", type=float, default=12.0, help="seconds py-spy records, inside the window")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile-durable.txt")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rig = subprocess.Popen(
        [
            *(sys.executable, "bench/rig.py", "--paths", args.path, "--steps", str(args.streams), "--starts", "even"),
            *("--seconds", str(args.seconds), "--out", str(args.out.parent / "profile-rig")),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        pid = server_pid(args.path, 120)
        time.sleep(6.0)  # the server's start, the rig's warmup and the first streams
        raw = args.out.with_suffix(".raw")
        subprocess.run(
            [
                *(str(PYSPY), "record", "--pid", str(pid), "--duration", str(int(args.record)), "--rate", "200"),
                *("--gil", "--nonblocking", "--format", "raw", "--output", str(raw)),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    finally:
        rig.wait(timeout=args.seconds + 300)
    text = summarize(raw, args.top)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
