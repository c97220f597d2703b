"""Faults on real processes: a server drained by SIGTERM, and a server SIGKILLed in the middle of a PPO run."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ..conftest import CLI, ServerProcess
from .test_ppo_against_server import setup  # noqa: F401  (fixture)


def test_sigterm_answers_in_flight_requests_then_exits_0(tiny_llama):
    # An idle batcher waits up to 5 s for company: a lone request sits in its queue, in flight, when SIGTERM lands.
    server = ServerProcess(tiny_llama, "--max-wait-ms", "5000")
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{server.http_url}/score",
                                json={"items": [{"prompt": "Hi", "response": "Hello"}]}, timeout=30)
        deadline = time.monotonic() + 10
        while "rewardserve_queue_depth 1.0" not in httpx.get(f"{server.http_url}/metrics").text:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        answered = in_flight.result()
    assert answered.status_code == 200 and len(answered.json()["scores"]) == 1
    try:  # a request after the signal: 503 while draining, or refused once the listener has closed
        late = httpx.post(f"{server.http_url}/score", json={"items": [{"text": "x"}]}, timeout=5).status_code
    except httpx.TransportError:
        late = "refused"
    assert late in (503, "refused")
    assert server.process.wait(60) == 0
    log = server.output()
    assert "draining" in log and "stopped after draining" in log


@pytest.mark.slow
def test_ppo_rides_out_a_killed_server_and_loses_no_rollout(setup, tmp_path):  # noqa: F811
    policy, prompts, _ = setup
    from ..conftest import free_port

    reward_model = policy.parent / "rm"
    ports = (free_port(), free_port())
    server = ServerProcess(reward_model, ports=ports)
    out = tmp_path / "ppo"
    trainer = subprocess.Popen([*CLI, "ppo", "--reward-url", f"http://127.0.0.1:{ports[0]}", "--policy", str(policy),
                                "--prompts", str(prompts), "--out", str(out), "--steps", "8", "--batch-size", "8",
                                "--max-new-tokens", "16", "--reward-retries", "12"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    time.sleep(4)  # an outage of several seconds, while the trainer keeps generating and retrying
    restarted = ServerProcess(reward_model, ports=ports)
    try:
        output, _ = trainer.communicate(timeout=600)
    finally:
        restarted.stop()
    assert trainer.returncode == 0, output[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["dropped_total"] == 0 and sum(r["rollouts"] for r in records) == 64
    assert f"reward server http://127.0.0.1:{ports[0]} answering again after a" in output


def test_a_killed_trainer_resumes_from_its_last_whole_checkpoint(setup, tmp_path):  # noqa: F811
    policy, prompts, server = setup
    out = tmp_path / "ppo"
    args = [*CLI, "ppo", "--reward-url", server.grpc_url, "--policy", str(policy), "--prompts", str(prompts),
            "--out", str(out), "--steps", "6", "--batch-size", "4", "--generation-batch-size", "4",
            "--mini-batch-size", "4", "--max-new-tokens", "8", "--save-every", "2"]
    trainer = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-2").is_dir():
        assert time.monotonic() < deadline and trainer.poll() is None, "no checkpoint was written"
        time.sleep(0.1)
    trainer.kill()
    trainer.wait()
    partial = out / "checkpoints" / "step-5.partial"  # what a crash in the middle of a save leaves behind
    partial.mkdir(exist_ok=True)
    (partial / "actor_critic.safetensors").write_bytes(b"half a file")
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-5.partial" not in resumed.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # every step once: none lost, none repeated
    assert (out / "policy" / "model.safetensors").is_file()


@pytest.mark.slow  # 13 s, most of it the batcher's 3 s wait for company
def test_a_client_that_hangs_up_costs_no_forward_pass(tiny_llama):
    # An idle batcher waits up to 3 s for company, so the request is still queued when its client goes away.
    server = ServerProcess(tiny_llama, "--max-wait-ms", "3000")

    try:
        scored_before = server.metric("rewardserve_items_total")
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.http_url}/score", json={"items": [{"text": "never scored"}] * 5}, timeout=0.5)
        deadline = time.monotonic() + 10
        while server.metric("rewardserve_cancelled_items_total") < 5:
            assert time.monotonic() < deadline, "the abandoned items were not dropped"
            time.sleep(0.1)
        assert server.metric("rewardserve_items_total") == scored_before  # none of them reached a forward pass
        assert httpx.post(f"{server.http_url}/score", json={"items": [{"text": "ok"}]}, timeout=30).status_code == 200
    finally:
        server.stop()
