"""Base memory: the RSS of an idle server by the providers its routes use.

Each vendor SDK is an optional extra imported only when a route uses it, so a server's base memory
depends on what it is configured for. This starts `python -m service` once per configuration —
the simulated model alone, each provider kind with the simulated route, and every kind at once —
waits until it listens, lets it settle, and prints its RSS and the growth over the simulated-only
server. No request is sent: the routes point at 127.0.0.1:9, where nothing listens, with
credentials that are placeholders (nothing is contacted at start).

    .venv/bin/python bench/base_memory.py [--json bench/results/base-memory.json]

Everything binds 127.0.0.1; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rig import PY, start

NOWHERE = "http://127.0.0.1:9"
# Placeholder credentials, one variable per provider that reads one at start.
ENV = {
    "OPENAI_API_KEY": "placeholder-openai",
    "AZURE_OPENAI_API_KEY": "placeholder-azure",
    "ANTHROPIC_API_KEY": "placeholder-anthropic",
    "AWS_ACCESS_KEY_ID": "AKIAPLACEHOLDER00000",
    "AWS_SECRET_ACCESS_KEY": "placeholder-aws-secret",
    "AWS_REGION": "us-east-1",
    "GEMINI_API_KEY": "placeholder-gemini",
    "FLOW_KEY": "placeholder-flow",
    "WATSONX_APIKEY": "placeholder-watsonx",
    "REPLICATE_API_TOKEN": "placeholder-replicate",
}
# One route per provider kind, as TOML.
ROUTES: dict[str, str] = {
    "openai": f'provider = "openai"\nmodel = "gpt-4o-mini"\noptions = {{ base_url = "{NOWHERE}/v1" }}\n',
    "azure-openai": (f'provider = "azure-openai"\nmodel = "gpt-4o-mini"\noptions = {{ endpoint = "{NOWHERE}" }}\n'),
    "anthropic": f'provider = "anthropic"\nmodel = "claude-sonnet-4-5"\noptions = {{ base_url = "{NOWHERE}" }}\n',
    "bedrock": (
        'provider = "bedrock"\nmodel = "anthropic.claude-3-haiku-20240307-v1:0"\n'
        f'options = {{ region = "us-east-1", endpoint_url = "{NOWHERE}" }}\n'
    ),
    "gemini": f'provider = "gemini"\nmodel = "gemini-2.5-flash"\noptions = {{ base_url = "{NOWHERE}" }}\n',
    "sse-endpoint": (
        'provider = "sse-endpoint"\nmodel = "flow"\n'
        f'options = {{ url = "{NOWHERE}/flow", api_key_env = "FLOW_KEY", text_pointer = "/chunk", '
        'end_event = "end" }\n'
    ),
    "watsonx": (
        'provider = "watsonx"\nmodel = "ibm/granite-3-8b-instruct"\n'
        'options = { url = "https://127.0.0.1:9", iam_url = "https://127.0.0.1:9", '
        'project_id = "placeholder-project" }\n'
    ),
    "replicate": (
        f'provider = "replicate"\nmodel = "meta/meta-llama-3-8b-instruct"\noptions = {{ base_url = "{NOWHERE}" }}\n'
    ),
}


def config_text(kinds: list[str]) -> str:
    text = '[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = ""\nhttp_listen = ""\n\n'
    text += '[routes.sim]\nprovider = "simulated"\nmodel = "sim-1"\n\n'
    return text + "".join(f"[routes.{kind}]\n{ROUTES[kind]}\n" for kind in kinds)


def measure(name: str, kinds: list[str], work: Path, settle: float) -> dict[str, Any]:
    config = work / f"{name}.toml"
    config.write_text(config_text(kinds))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_"))} | ENV
    process = start(name, [PY, "-m", "service", "--config", str(config)], work, r"listening on (\S+);", env=env)
    try:
        time.sleep(settle)
        return {"routes": ["simulated", *kinds], "rss_mib": round(process.rss_mib(), 1)}
    finally:
        process.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait after start before reading RSS")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--kinds", default=",".join(ROUTES), help="provider kinds to measure, comma-separated")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(ROUTES)
    if unknown:
        parser.error(f"unknown kind(s) {sorted(unknown)}; known: {', '.join(ROUTES)}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tokenwire-base-memory-") as tmp:
        work = Path(tmp)
        plans: list[tuple[str, list[str]]] = [("simulated", [])]
        plans += [(kind, [kind]) for kind in kinds]
        plans.append(("every-provider", kinds))
        for name, kinds in plans:
            results[name] = measure(name, kinds, work, args.settle)
    base = results["simulated"]["rss_mib"]
    print(f"{'configuration':<16} {'RSS MiB':>8} {'over simulated':>15}")
    for name, result in results.items():
        result["over_simulated_mib"] = round(result["rss_mib"] - base, 1)
        print(f"{name:<16} {result['rss_mib']:>8.1f} {result['over_simulated_mib']:>+15.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
