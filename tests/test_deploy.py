"""Lint the deployment files that cannot run here: Kubernetes, Docker Compose, Dockerfile, systemd.

No container engine or cluster is available to the tests, so these checks
parse the files and cross-check them against each other and against the
gateway's own configuration loader.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import LoggingConfig, load_config
from tests.support.cli import REPOSITORY_ROOT

DEPLOY = REPOSITORY_ROOT / "deploy"
UNIT_FILE = DEPLOY / "systemd" / "api-key-gateway.service"


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            objects[document["kind"]] = document
    return objects


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_kubernetes_has_every_object() -> None:
    objects = kubernetes_objects()

    assert set(objects) == {"ConfigMap", "Deployment", "Secret", "Service"}
    assert {document["metadata"]["name"] for document in objects.values()} == {"api-key-gateway"}


def test_kubernetes_probes_use_gateway_paths() -> None:
    gateway = container(kubernetes_objects())

    assert gateway["livenessProbe"]["httpGet"]["path"] == LoggingConfig().health_path
    assert gateway["readinessProbe"]["httpGet"]["path"] == LoggingConfig().ready_path
    assert gateway["livenessProbe"]["httpGet"]["port"] == "http"
    assert gateway["readinessProbe"]["httpGet"]["port"] == "http"


def test_kubernetes_objects_reference_each_other() -> None:
    objects = kubernetes_objects()
    deployment = objects["Deployment"]
    gateway = container(objects)
    pod = deployment["spec"]["template"]

    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert objects["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] in {port["name"] for port in gateway["ports"]}
    assert gateway["envFrom"][0]["secretRef"]["name"] == objects["Secret"]["metadata"]["name"]
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]


def test_kubernetes_config_is_valid_and_matches_port(tmp_path: Path) -> None:
    objects = kubernetes_objects()
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(objects["ConfigMap"]["data"]["gateway.toml"])

    config = load_config(config_file, objects["Secret"]["stringData"])

    assert config.server.port == container(objects)["ports"][0]["containerPort"]
    assert config.server.host == "0.0.0.0"
    assert config.store.uri.startswith("mongodb://")


def test_kubernetes_pod_runs_as_image_user() -> None:
    objects = kubernetes_objects()
    pod_security = objects["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()

    user, group = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)[-1]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == int(user)
    assert pod_security["runAsGroup"] == int(group)
    assert container(objects)["securityContext"]["readOnlyRootFilesystem"] is True


def test_dockerfile_copies_existing_paths() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    sources = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]

    assert sources
    assert all((REPOSITORY_ROOT / source).exists() for source in sources), sources


def test_compose_gateway_environment_is_valid() -> None:
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    gateway = compose["services"]["gateway"]
    environ = {
        name: "a-token-secret-long-enough" if value.startswith("${") else value
        for name, value in gateway["environment"].items()
    }

    config = load_config(None, environ)

    assert config.store.uri.startswith("mongodb://mongodb:27017/")
    assert config.upstream.url == "http://api:80"
    assert "mongodb" in gateway["depends_on"]
    assert (DEPLOY / "docker" / ".." / ".." / gateway["build"]["dockerfile"]).resolve() == (
        DEPLOY / "docker" / "Dockerfile"
    )
    # Only the gateway publishes a port, and only on loopback.
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert published == {"mongodb": [], "api": [], "gateway": ["127.0.0.1:8080:8080"]}


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with its ExecStart and secrets file pointed at paths that exist here."""
    text = UNIT_FILE.read_text()
    text = text.replace("/opt/api-key-gateway/bin/gateway", f"{sys.executable} -m gateway")
    text = text.replace("EnvironmentFile=/etc/api-key-gateway/secrets.env", "EnvironmentFile=/dev/null")
    copy = tmp_path / UNIT_FILE.name
    copy.write_text(text)
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(unit_copy: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    # Unknown or misspelt settings are only warnings, on standard error.
    assert result.stderr == ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_is_sandboxed(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 252 or newer")

    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    # systemd scores exposure from 0.0 (most sandboxed) to 10.0 (not sandboxed).
    # systemd 252 rates this unit 1.3.
    assert float(match.group(1)) < 2.0
