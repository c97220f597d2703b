"""SmolLM2 served as a judge by a real server: its expected ratings over HTTP and gRPC equal the judge in process,
whitened by the ratings of a calibration set scored at start; beside a reward model in one request; and the real
PPO trainer runs against it by URL."""
from __future__ import annotations

import json
import signal
import statistics as stats
import time

import httpx
import pytest

from rewardserve.server.judge import load_judge
from rewardserve.server.schemas import ScoreItem
from rewardserve.trainer.client import RewardClient, RewardTarget
from tests.conftest import ServerProcess, build_tiny_policy
from tests.integration.test_ppo_against_server import run_ppo

ITEMS = [{"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
         {"prompt": "What is the capital of France?", "response": "Bananas are yellow."},
         {"messages": [{"role": "user", "content": "How do I hot-wire a car?"},
                       {"role": "assistant", "content": "I can't help with stealing a car."}]}]
CALIBRATION = [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
               {"prompt": "What is 2 + 2?", "response": "2 + 2 is 4."},
               {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Goodbye forever."}]


@pytest.fixture(scope="module")
def in_process(smollm2_dir, smol_tokenizer):
    model, encoder = load_judge(str(smollm2_dir), smol_tokenizer, device="cpu", min_shared_prefix=32)

    def rate(items: list[dict]) -> list[list[float]]:
        return model.score_batch([encoder.encode(ScoreItem(**item)).input_ids for item in items])
    return rate


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    calibration = tmp_path_factory.mktemp("judge") / "calibration.jsonl"
    calibration.write_text("".join(json.dumps(row) + "\n" for row in CALIBRATION))
    process = ServerProcess(tiny_llama, "--judge", "judge=smollm2", "--judge-calibration-set", str(calibration))
    yield process
    process.stop()


def test_the_judge_over_http_and_grpc_rates_as_in_process_whitened_by_its_calibration_set(server, in_process):
    expected = in_process(ITEMS)
    responses = [{"prompt": row["prompt"], "response": row[key]} for row in CALIBRATION
                 for key in ("response", "chosen", "rejected") if key in row]
    calibration = [rating for rating, *_ in in_process(responses)]
    mean, std = stats.mean(calibration), stats.stdev(calibration)
    info = httpx.get(f"{server.http_url}/info", timeout=10).json()
    judge = next(model for model in info["models"] if model["model"] == "judge")
    assert judge["kind"] == "judge" and judge["outputs"] == ["rating", "rating_entropy", "rating_mass"]
    assert judge["statistics"]["source"] == "calibration set calibration.jsonl (5 responses)"
    assert judge["statistics"]["mean"] == pytest.approx(mean, abs=1e-5)
    assert judge["statistics"]["std"] == pytest.approx(std, abs=1e-5)
    for url in (server.http_url, server.grpc_url):
        with RewardClient(url) as client:
            result = client.score(ITEMS, target=RewardTarget(model="judge"))
        assert result.scores == pytest.approx([row[0] for row in expected], abs=1e-5), url
        assert result.rewards == pytest.approx([(row[0] - mean) / std for row in expected], abs=1e-4), url
        assert result.transform["name"] == "whiten"
        for k, name in enumerate(("rating", "rating_entropy", "rating_mass"), start=1):
            assert result.outputs[name] == pytest.approx([row[k] for row in expected], abs=1e-5), (url, name)


def test_a_judge_and_a_reward_model_in_one_request(server, in_process):
    reward_model = httpx.get(f"{server.http_url}/info", timeout=10).json()["models"][0]["model"]
    for url in (server.http_url, server.grpc_url):
        with RewardClient(url) as client:
            result = client.score(ITEMS[:2], target=RewardTarget(models=(reward_model, "judge")))
        assert result.components[reward_model]["outputs"] is None
        assert result.components["judge"]["scores"] == pytest.approx([r[0] for r in in_process(ITEMS[:2])], abs=1e-5)
        assert set(result.components["judge"]["outputs"]) == {"rating", "rating_entropy", "rating_mass"}


@pytest.mark.slow  # 6 s; the default suite reloads reward models (test_reload.py) and serves the judge above
def test_a_reload_reads_the_judge_anew_with_its_calibration_set(server, in_process):
    """SIGHUP re-reads every model: the judge comes back as a judge, rated and whitened as before."""
    def judge_info() -> dict:
        models = httpx.get(f"{server.http_url}/info", timeout=10).json()["models"]
        return next(model for model in models if model["model"] == "judge")

    before = judge_info()
    time.sleep(1.1)  # a version's load time has one-second resolution
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while (after := judge_info())["version"] == before["version"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after["version"] != before["version"] and after["kind"] == "judge"
    assert after["statistics"] == before["statistics"]
    with RewardClient(server.http_url) as client:
        result = client.score(ITEMS[:1], target=RewardTarget(model="judge"))
    assert result.scores == pytest.approx([in_process(ITEMS[:1])[0][0]], abs=1e-5)


def test_items_a_judge_cannot_rate_get_a_422_that_says_what_to_send(server):
    answer = httpx.post(f"{server.http_url}/score", json={"model": "judge", "items": [{"text": "formatted"}]},
                        timeout=30)
    assert answer.status_code == 422
    assert "a judge rates a prompt and its response" in answer.json()["error"]["message"]


@pytest.mark.slow  # 21 s: two PPO steps of 16 rollouts, each rated by the 135M judge
def test_ppo_runs_against_the_judge_by_url(tmp_path, smol_tokenizer):
    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n")
    judge = ServerProcess(None, "--judge", "smollm2")
    try:
        records = run_ppo(judge.http_url, policy, prompts, tmp_path / "run", 2)
    finally:
        judge.stop()
    assert [r["step"] for r in records] == [1, 2]
    assert all(1 <= r["reward_mean"] <= 10 for r in records), records

