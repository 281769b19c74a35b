"""The deployment files, checked offline: the Kubernetes manifests against their schemas
(kubernetes-validate ships them), their wiring to the server's settings, and the nginx config."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from service.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes" / "tokenwire.yaml"
sys.path.insert(0, str(ROOT / "deploy"))
from cluster import NGINX_CONF, render_nginx, require  # noqa: E402

pytestmark = pytest.mark.timeout(30)
# gRPC probes are GA since 1.27, the preStop sleep action since 1.30 (beta, on by default).
KUBERNETES = "1.30.0"


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def test_every_manifest_is_valid_for_its_schema() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"}
    for doc in docs:
        # strict: an unknown or misspelt field is an error, not silently dropped by the API server.
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validator_does_catch_a_misspelt_field() -> None:
    deployment = by_kind("Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 50051}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_the_deployment_is_wired_to_the_server_settings(tmp_path: Path) -> None:
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    (config_map,) = by_kind("ConfigMap")
    toml_text = config_map["data"]["tokenwire.toml"]
    path = tmp_path / "tokenwire.toml"
    path.write_text(toml_text)
    grace = float(env["TOKENWIRE_SHUTDOWN_GRACE_SECONDS"]["value"])
    config = load_config(path, {"TOKENWIRE_SHUTDOWN_GRACE_SECONDS": str(grace)}, {})
    assert tomllib.loads(toml_text)["server"]["shutdown_grace_seconds"] == grace == config.server.shutdown_grace_seconds
    # The kubelet's SIGKILL comes after the preStop sleep and the whole drain.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= grace + pre_stop + 2
    # Health is served on the port the server listens on, and probes use gRPC.
    port = int(config.server.listen.rsplit(":", 1)[1])
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["grpc"]["port"] == container["livenessProbe"]["grpc"]["port"] == port
    # The journal is the external Redis, from the Secret.
    assert env["TOKENWIRE_JOURNAL"]["valueFrom"]["secretKeyRef"]["name"] == by_kind("Secret")[0]["metadata"]["name"]
    # A headless Service for client-side balancing, and a budget of one pod at a time.
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    assert services["tokenwire-headless"]["spec"]["clusterIP"] == "None"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert all(s["spec"]["selector"] == selector for s in services.values())
    assert by_kind("PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"] == selector


def test_the_nginx_config_is_accepted_by_nginx(tmp_path: Path) -> None:
    (tmp_path / "temp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx(NGINX_CONF.read_text(), 50050, [(50061, False), (50062, True)], tmp_path / "temp"))
    text = conf.read_text()
    assert "server 127.0.0.1:50062 max_fails=1 fail_timeout=5s down;" in text
    nginx = require("nginx")
    check = subprocess.run(
        [
            nginx,
            "-t",
            "-c",
            str(conf),
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-g",
            f"pid {tmp_path / 'pid'};",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    # The shipped file itself (its example ports) is a valid config too.
    shipped = subprocess.run(
        [
            nginx,
            "-t",
            "-c",
            str(NGINX_CONF),
            "-p",
            str(tmp_path),
            "-e",
            str(tmp_path / "error.log"),
            "-g",
            f"pid {tmp_path / 'pid'};",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert shipped.returncode == 0, shipped.stderr
