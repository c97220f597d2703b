"""The monitoring profile against real processes: a live server (scored over HTTP and gRPC, one bad request) and a
live PPO trainer with --metrics-port. Every metric the Grafana dashboard queries, and every label it groups by, is
one they export; a real Prometheus (Debian's package, where the machine has it) scrapes both with the jobs of
docker/monitoring/prometheus.yml."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rewardserve.trainer.client import RewardClient
from tests.conftest import CLI, REPO, ServerProcess, build_tiny_policy, free_port

MONITORING = REPO / "docker" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "rewardserve.json"
METRIC = re.compile(r"\brewardserve_[a-z_]+\b")
GROUPED_BY = re.compile(r"\bby \(([^)]*)\)")
SELECTOR = re.compile(r"(rewardserve_[a-z_]+)\{([^}]*)\}")


def queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def exported(text: str) -> dict[str, set[str]]:
    """Each sample name of a /metrics page (histograms' _bucket, _sum, _count included) -> its label names."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def wait_for(check, seconds: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {seconds} s")


def get(url: str) -> str | None:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return None


def prometheus_config(server_port: int, trainer_port: int) -> dict:
    """docker/monitoring/prometheus.yml with each job's DNS discovery of a compose service swapped for the loopback
    address of the process the test started."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    ports = {"reward-server": server_port, "trainer": trainer_port}
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    return config


@pytest.fixture(scope="module")
def live(tiny_llama, smol_tokenizer, tmp_path_factory):
    """What a live server's and a live trainer's /metrics say, and what a real Prometheus scraped of them (None
    where no Prometheus is installed)."""
    root = tmp_path_factory.mktemp("monitoring")
    server = ServerProcess(tiny_llama, "--allow-reload-from", str(tiny_llama.parent), "--admin-key", "admin")
    trainer_port, prometheus_port = free_port(), free_port()
    prometheus = None
    if shutil.which("prometheus"):
        (root / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(server.http_port, trainer_port)))
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say something."}) + "\n")
    policy = build_tiny_policy(root / "policy", smol_tokenizer)
    trainer = subprocess.Popen(
        [*CLI, "ppo", "--reward-url", server.grpc_url, "--policy", str(policy), "--prompts", str(prompts), "--out",
         str(root / "run"), "--steps", "20", "--batch-size", "4", "--mini-batch-size", "4", "--max-new-tokens", "8",
         "--metrics-port", str(trainer_port)],
        stdout=(root / "trainer.log").open("w"), stderr=subprocess.STDOUT)
    try:
        with RewardClient(server.http_url) as client:
            client.score([{"prompt": "Hi", "response": "Hello!"}])
        httpx.post(f"{server.http_url}/score", json={"items": []}, timeout=10)  # a 422: an error series
        reload = httpx.post(f"{server.http_url}/admin/reload", json={}, headers={"Authorization": "Bearer admin"},
                            timeout=120)  # the reload series
        assert reload.status_code == 200, reload.text
        trainer_text = wait_for(lambda: (t := get(f"http://127.0.0.1:{trainer_port}/metrics")) and
                                "rewardserve_trainer_step " in t and t, 180, "the trainer's first step", trainer,
                                root / "trainer.log")
        scraped = None
        if prometheus is not None:
            def series(query: str) -> list:
                answer = get(f"http://127.0.0.1:{prometheus_port}/api/v1/query?query={query}")
                return json.loads(answer)["data"]["result"] if answer and answer.startswith("{") else []
            wanted = {"trainer": "rewardserve_trainer_reward_mean",
                      "grpc_items": 'rewardserve_model_items_total{protocol="grpc"}'}
            scraped = {name: wait_for(lambda q=q: series(q), 60, f"Prometheus: {q}") for name, q in wanted.items()}
        yield exported(get(f"{server.http_url}/metrics")), exported(trainer_text), scraped
    finally:
        for process in (trainer, prometheus):
            if process is not None:
                process.kill()
                process.wait()
        server.stop()


@pytest.mark.slow  # 15 s with its live server and trainer; the default suite reads /metrics in test_http_and_grpc.py
def test_every_dashboard_query_names_metrics_and_labels_a_live_server_or_trainer_exports(live):
    server, trainer, _ = live
    everything = server | trainer
    named = {name for expr in queries() for name in METRIC.findall(expr)}
    assert named and len(queries()) >= 20
    for expr in queries():
        metrics = METRIC.findall(expr)
        for name in metrics:
            # histogram_quantile reads NAME_bucket; every other query a sample name as exported
            assert name in everything, f"{name} (in {expr!r}) is exported by neither the server nor the trainer"
        for group in GROUPED_BY.findall(expr):
            wanted = {label.strip() for label in group.split(",")} - {"le", "instance"}  # added by Prometheus
            assert any(wanted <= everything[name] for name in metrics), f"by ({group}) in {expr!r}"
        for name, selector in SELECTOR.findall(expr):
            assert {part.split("=")[0].strip() for part in selector.split(",")} <= everything[name], expr
    run_panels = {name for name in named if name.startswith("rewardserve_trainer_")}
    assert {"rewardserve_trainer_reward_mean", "rewardserve_trainer_kl", "rewardserve_trainer_beta",
            "rewardserve_trainer_score_wait_share"} <= run_panels


@pytest.mark.slow  # shares the live processes above
def test_a_real_prometheus_scrapes_the_server_and_the_trainer(live):
    _, _, scraped = live
    if scraped is None:
        pytest.skip("no prometheus binary here (make venv installs Debian's package where it can)")
    (trainer,) = scraped["trainer"]
    assert trainer["metric"]["job"] == "trainer"
    assert {series["metric"]["job"] for series in scraped["grpc_items"]} == {"reward-server"}
    assert sum(float(series["value"][1]) for series in scraped["grpc_items"]) > 0


def test_the_prometheus_config_is_valid_as_written():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool here (Debian's prometheus package has it)")
    check = subprocess.run([promtool, "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
