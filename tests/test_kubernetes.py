"""docker/k8s: every overlay renders with `kubectl kustomize`, and says what docker-compose.yml, the Dockerfiles
and the code say: the images, the settings' variable names, the ports, the probe paths, the drain on SIGTERM, and
the keys of the Secret it reads. No cluster here: rendered and checked, never applied."""
from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rewardserve.server.config import ServeConfig
from rewardserve.server.main import GRPC_DRAIN_GRACE_SECONDS, SECONDS_FOR_CONNECTIONS_TO_CLOSE
from rewardserve.trainer.rl.config import PPOConfig

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
OVERLAYS = ["base"] + [f"overlays/{p.name}" for p in sorted((K8S / "overlays").iterdir())]
QUEUE_DRAIN_SECONDS = 30  # what the grace period leaves the server's queue after the rest of its drain


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed here")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def containers(docs: list[dict], kind: str) -> list[tuple[str, dict]]:
    return [(doc["metadata"]["name"], c) for doc in docs if doc["kind"] == kind
            for c in doc["spec"]["template"]["spec"]["containers"]]


def env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def env_value(container: dict, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def settings_variables(settings) -> set[str]:
    return {f"REWARDSERVE_{name.upper()}" for name in settings.model_fields}


def compose_environment(service: dict) -> set[str]:
    return set(service.get("environment", {}))


def problems(docs: list[dict], compose_file: dict) -> list[str]:
    """Every disagreement between one rendered overlay and compose, the Dockerfiles and the code."""
    found = []
    services = compose_file["services"]
    server_defaults = ServeConfig.model_fields
    dockerfile = (REPO / "docker" / "server.Dockerfile").read_text()
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    http_routes = set(re.findall(r'@app\.get\("(/[a-z]+)"', (REPO / "server" / "http_api.py").read_text()))
    readme = (REPO / "README.md").read_text()
    secret_line = re.search(r"kubectl create secret generic rewardserve-keys (.+)", readme)
    documented_keys = set(re.findall(r"--from-literal=([a-z-]+)=", secret_line.group(1))) if secret_line else set()

    for name, server in containers(docs, "Deployment"):
        if server["image"] != services["reward-server"]["image"]:
            found.append(f"{name}: image {server['image']}, compose {services['reward-server']['image']}")
        unknown = {n for n in env_names(server) if n.startswith("REWARDSERVE_")} - settings_variables(ServeConfig)
        found += [f"{name}: {n} is no setting of `rewardserve serve`" for n in sorted(unknown)]
        missing = compose_environment(services["reward-server"]) - env_names(server)
        found += [f"{name}: compose sets {n}, the manifest does not" for n in sorted(missing)]
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        for port, field in (("http", "http_port"), ("grpc", "grpc_port")):
            default = server_defaults[field].default
            if ports.get(port) != default or str(ports.get(port)) != env_value(server, f"REWARDSERVE_{field.upper()}"):
                found.append(f"{name}: {port} port {ports.get(port)}, the server's default {default}, its variable"
                             f" {env_value(server, f'REWARDSERVE_{field.upper()}')}")
            if ports.get(port) not in exposed or str(ports.get(port)) not in services["reward-server"]["expose"]:
                found.append(f"{name}: {port} port {ports.get(port)} is not what the Dockerfile and compose expose")
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            path = server[probe]["httpGet"]["path"]
            if path not in http_routes:
                found.append(f"{name}: {probe} {path} is no route of server/http_api.py")
        if server["readinessProbe"]["httpGet"]["path"] != "/ready" or "/ready" not in dockerfile:
            found.append(f"{name}: readiness is not /ready, as the Dockerfile's HEALTHCHECK")
        spec = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
        needed = pre_stop + GRPC_DRAIN_GRACE_SECONDS + SECONDS_FOR_CONNECTIONS_TO_CLOSE + QUEUE_DRAIN_SECONDS
        if spec["terminationGracePeriodSeconds"] < needed:
            found.append(f"{name}: terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} is shorter"
                         f" than the drain ({needed} s)")
    for name, trainer in containers(docs, "Job"):
        if trainer["image"] != services["trainer"]["image"]:
            found.append(f"{name}: image {trainer['image']}, compose {services['trainer']['image']}")
        unknown = {n for n in env_names(trainer) if n.startswith("REWARDSERVE_")} - settings_variables(PPOConfig)
        found += [f"{name}: {n} is no setting of `rewardserve ppo`" for n in sorted(unknown)]
        if name == "ppo":
            missing = compose_environment(services["trainer"]) - env_names(trainer)
            found += [f"{name}: compose sets {n}, the manifest does not" for n in sorted(missing)]
            metrics = {p["name"]: p["containerPort"] for p in trainer["ports"]}.get("metrics")
            if str(metrics) != env_value(trainer, "REWARDSERVE_METRICS_PORT") or str(metrics) not in \
                    services["trainer"]["expose"]:
                found.append(f"{name}: metrics port {metrics} is not the one it serves on and compose exposes")
        url = env_value(trainer, "REWARDSERVE_REWARD_URL") or next(
            (a for a in trainer.get("command", []) if a.startswith("grpc://")), "")
        host, _, port = url.removeprefix("grpc://dns:///").partition(":")
        services_here = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        if host not in services_here or int(port) not in [p["port"] for p in services_here[host]["spec"]["ports"]]:
            found.append(f"{name}: its reward URL {url} names no Service port of these manifests")
    for doc in docs:
        for key in re.findall(r"'key': '([^']+)'", str(doc)):
            if key not in documented_keys:
                found.append(f"{doc['metadata']['name']}: Secret key {key} is not in the README's `kubectl create"
                             " secret` line")
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_agrees_with_compose_and_the_code(overlay):
    docs = render(overlay)
    assert problems(docs, compose()) == []


@pytest.mark.parametrize("drift, expected", [
    (lambda docs, c: _server(docs)["ports"][0].update(containerPort=8080), "http port 8080"),
    (lambda docs, c: _server(docs)["env"].append({"name": "REWARDSERVE_MAX_BATCH", "value": "1"}),
     "REWARDSERVE_MAX_BATCH is no setting"),
    (lambda docs, c: _server(docs)["readinessProbe"]["httpGet"].update(path="/readyz"), "/readyz is no route"),
    (lambda docs, c: c["services"]["reward-server"].update(image="rewardserve-server:v2"), "compose rewardserve-server:v2"),
    (lambda docs, c: c["services"]["trainer"]["environment"].update(REWARDSERVE_KL_COEF="0.1"),
     "compose sets REWARDSERVE_KL_COEF"),
    (lambda docs, c: next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"].update(
        terminationGracePeriodSeconds=10), "shorter than the drain"),
])
def test_a_drift_is_caught(drift, expected):
    docs, compose_file = render("base"), copy.deepcopy(compose())
    drift(docs, compose_file)
    found = problems(docs, compose_file)
    assert any(expected in problem for problem in found), found


def _server(docs: list[dict]) -> dict:
    return containers(docs, "Deployment")[0][1]


def test_the_multinode_trainer_runs_the_rl_guide_s_several_nodes_command():
    (_, trainer), = containers(render("overlays/multinode-trainer"), "Job")
    readme = (REPO / "docs" / "rl.md").read_text()
    block = re.search(r"# several nodes.*?\n(torchrun .+?)\n```", readme, re.S).group(1)
    readme_argv = shlex.split(block.replace("\\\n", " "))
    assert trainer["command"] == readme_argv
