"""Hot reload on the real server: 32 clients scoring while it reloads three times (one checkpoint broken) get no
failure, and every answer's `model_version` names the model whose scores it holds; the admin call is refused
without its key and outside --allow-reload-from, over HTTP and gRPC."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from rewardserve.proto import reward_pb2, reward_pb2_grpc
from rewardserve.server.modeling import RewardModel, checkpoint_hash
from rewardserve.server.schemas import ScoreItem
from rewardserve.server.tokenization import ItemEncoder, load_tokenizer
from rewardserve.trainer.client import RewardClient
from tests.conftest import ServerProcess, build_checkpoint

ITEMS = [{"prompt": "What is the capital of France?", "response": "Paris."},
         {"prompt": "Say something rude.", "response": "No, I would rather not."},
         {"text": "plain text, scored as given"}]
ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reload")
    built = {name: build_checkpoint(root / "allowed" / name, "llama", smol_tokenizer, seed=seed)
             for name, seed in (("a", 0), ("b", 1), ("c", 2))}
    broken = shutil.copytree(built["a"], root / "allowed" / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut in half: it cannot load
    built["broken"] = broken
    built["outside"] = build_checkpoint(root / "outside" / "x", "llama", smol_tokenizer, seed=3)
    return built


@pytest.fixture(scope="module")
def alone(checkpoints) -> dict[str, list[float]]:
    """weights hash -> each item's score by that model alone, in this process."""
    expected = {}
    for name in "abc":
        path = str(checkpoints[name])
        model = RewardModel.load(path)
        encoder = ItemEncoder(load_tokenizer(path), model.max_positions)
        expected[checkpoint_hash(path)] = [model.score_batch([encoder.encode(ScoreItem(**i)).input_ids])[0]
                                           for i in ITEMS]
    return expected


@pytest.fixture
def server(checkpoints):
    process = ServerProcess(checkpoints["a"], "--allow-reload-from", str(checkpoints["a"].parent),
                            "--admin-key", ADMIN, "--max-wait-ms", "5")
    yield process
    process.stop()


def reload_over_http(server, path: Path, key: str | None = ADMIN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.http_url}/admin/reload", json={"model": "a", "path": str(path)}, headers=headers,
                      timeout=120)


def reload_over_grpc(server, path: Path, key: str | None = ADMIN):
    stub = reward_pb2_grpc.AdminServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return stub.Reload(reward_pb2.ReloadRequest(model="a", path=str(path)), metadata=metadata, timeout=120)


def test_32_clients_see_no_failure_across_three_reloads(server, checkpoints, alone):
    answers, failures, stop = [], [], threading.Event()

    def client(index: int) -> None:
        url = server.http_url if index % 2 else server.grpc_url
        with RewardClient(url, timeout=60) as rewards:
            for _ in range(400):  # bounded in count, and in time by the stop event
                if stop.is_set():
                    return
                try:
                    result = rewards.score(ITEMS, transform="raw")
                    answers.append((result.model_version, result.scores))
                except Exception as error:  # noqa: BLE001 - any failure is what this test counts
                    failures.append(repr(error))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        first = reload_over_http(server, checkpoints["b"])
        time.sleep(1.5)
        broken = reload_over_http(server, checkpoints["broken"])
        serving_after_broken = httpx.get(f"{server.http_url}/info").json()["version"]
        time.sleep(1.5)
        third = reload_over_grpc(server, checkpoints["c"])
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert first.status_code == 200, first.text
    assert first.json()["new_version"].startswith(checkpoint_hash(checkpoints["b"]))
    assert broken.status_code == 422 and broken.json()["error"]["type"] == "reload_failed"
    assert "did not load" in broken.json()["error"]["message"] and "keeps serving" in broken.json()["error"]["message"]
    assert serving_after_broken == first.json()["new_version"]  # the broken checkpoint left b serving
    assert third.old_version == first.json()["new_version"]
    assert third.new_version.startswith(checkpoint_hash(checkpoints["c"]))

    assert failures == [] and len(answers) > 100
    seen = set()
    for version, scores in answers:
        weights = version.split("@")[0]
        assert scores == pytest.approx(alone[weights], abs=1e-5), version  # the version names who scored
        seen.add(weights)
    assert seen == set(alone)  # a, b and c each answered
    metrics = httpx.get(f"{server.http_url}/metrics").text
    live = [line for line in metrics.splitlines() if line.startswith('rewardserve_model_info{model="a"')]
    assert live == [f'rewardserve_model_info{{model="a",version="{third.new_version}"}} 1.0']  # the old ones freed
    assert 'rewardserve_reloads_total{model="a",outcome="reload_failed"} 1.0' in metrics


def test_reload_is_refused_without_the_key_and_outside_the_allowed_folder(server, checkpoints):
    for key, status, says in [(None, 401, "admin key"), ("wrong", 401, "admin key")]:
        reply = reload_over_http(server, checkpoints["b"], key)
        assert reply.status_code == status and says in reply.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as refused:
            reload_over_grpc(server, checkpoints["b"], key)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = reload_over_http(server, checkpoints["outside"])
    assert reply.status_code == 403 and "outside" in reply.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as refused:
        reload_over_grpc(server, checkpoints["outside"])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--allow-reload-from" in refused.value.details()
    escape = checkpoints["b"].parent / ".." / "outside" / "x"  # a path that climbs out is refused too
    assert reload_over_http(server, escape).status_code == 403
    info = httpx.get(f"{server.http_url}/info").json()
    assert info["version"].startswith(checkpoint_hash(checkpoints["a"]))  # nothing changed


def test_reload_is_off_unless_the_server_was_started_for_it(checkpoints):
    server = ServerProcess(checkpoints["a"])
    try:
        reply = reload_over_http(server, checkpoints["b"])
        assert reply.status_code == 403 and "--allow-reload-from" in reply.json()["error"]["message"]
        with pytest.raises(grpc.RpcError) as refused:
            reload_over_grpc(server, checkpoints["b"])
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop()


def test_sighup_re_reads_the_same_path(server, checkpoints):
    import signal

    before = httpx.get(f"{server.http_url}/info").json()["version"]
    time.sleep(1.1)  # the version's load time has one-second resolution
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = httpx.get(f"{server.http_url}/info").json()["version"]
        if after != before:
            break
        time.sleep(0.2)
    assert after != before and after.split("@")[0] == before.split("@")[0]  # same weights, loaded anew


@pytest.mark.slow  # 10 s of PPO; reloads under load stay in the default suite (32 clients, three reloads)
def test_ppo_marks_the_step_the_reward_model_changed_and_loses_no_rollout(server, checkpoints, smol_tokenizer,
                                                                          tmp_path):
    import json
    import subprocess

    from tests.conftest import CLI, build_tiny_policy

    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say something."}) + "\n")
    metrics = tmp_path / "run" / "metrics.jsonl"
    trainer = subprocess.Popen([*CLI, "ppo", "--reward-url", server.http_url, "--policy", str(policy), "--prompts",
                                str(prompts), "--out", str(tmp_path / "run"), "--steps", "8", "--batch-size", "8",
                                "--max-new-tokens", "8"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and trainer.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        steps_before = len(metrics.read_text().splitlines())
        reloaded = reload_over_http(server, checkpoints["b"])
        output, _ = trainer.communicate(timeout=300)
    finally:
        trainer.kill()
    assert trainer.returncode == 0, output[-3000:]
    assert reloaded.status_code == 200, reloaded.text
    old, new = reloaded.json()["old_version"], reloaded.json()["new_version"]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    versions = [r["model_version"] for r in records]
    changed_at = versions.index(new) + 1
    assert changed_at > steps_before  # the steps logged before the reload were scored by the old model
    assert versions == [old] * (changed_at - 1) + [new] * (len(records) - changed_at + 1)
    assert [r["model_version_changed"] for r in records] == [r["step"] == changed_at for r in records]
    assert f"step {changed_at}: the reward model changed" in output
    assert records[-1]["dropped_total"] == 0 and sum(r["rollouts"] for r in records) == 8 * 8  # none lost
