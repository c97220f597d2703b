"""A reward model built to reward length (trained on pairs where the longer response always wins) loses its length
trend under the server's debiased transform, on fresh responses; `rewardserve train` and `eval` report both."""
from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest

from rewardserve.server.normalization import fit_length
from rewardserve.trainer.rm.config import EvalConfig, RMTrainConfig
from rewardserve.trainer.rm.train import evaluate_checkpoint, main as train
from tests.conftest import ServerProcess, build_tiny_policy

# slow (40 s: it trains a reward model, then serves and evaluates it); the default suite keeps debias's maths
# (tests/server/test_normalization.py) and --transform debias's start-up checks (test_startup_errors.py)
pytestmark = pytest.mark.slow

WORDS = "the a river stone light quiet over under green small city road".split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def longer_wins(rng: random.Random, count: int) -> list[str]:
    rows = []
    for _ in range(count):
        a, b = rng.sample(range(2, 41), 2)
        rows.append(json.dumps({"prompt": words(rng, 5), "chosen": words(rng, max(a, b)),
                                "rejected": words(rng, min(a, b))}))
    return rows


@pytest.fixture(scope="module")
def length_model(tmp_path_factory, smol_tokenizer) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("length")
    base = build_tiny_policy(root / "base", smol_tokenizer)
    (root / "pairs.jsonl").write_text("\n".join(longer_wins(random.Random(0), 800)) + "\n")
    report = train(RMTrainConfig(base=str(base), data=[str(root / "pairs.jsonl")], out=str(root / "rm"), epochs=3,
                                 lr=3e-3, batch_size=16, max_length=256))
    return root / "rm", report


def test_training_stores_the_fit_and_reports_the_debiased_reward(length_model):
    folder, report = length_model
    fit = json.loads((folder / "config.json").read_text())["reward_length_fit"]
    assert fit["slope"] > 0.1 and fit["responses"] == 2 * 720  # 90% of 800 pairs, both sides
    bias = report["length_bias"]
    assert bias["raw"]["agrees_with_length"] > 0.85  # it learnt to prefer length ...
    assert abs(bias["debiased"]["agrees_with_length"] - 0.5) < 0.15  # ... which the debiased reward no longer does
    assert abs(bias["debiased"]["length_slope"]) < 0.1 * bias["raw"]["length_slope"]


def test_debiased_rewards_have_no_length_trend_on_fresh_responses(length_model, smol_tokenizer):
    folder, _ = length_model
    rng = random.Random(1)  # responses the model never saw
    items = [{"prompt": words(rng, 5), "response": words(rng, rng.randint(2, 40))} for _ in range(600)]
    lengths = [len(smol_tokenizer(item["response"], add_special_tokens=False)["input_ids"]) for item in items]
    server = ServerProcess(folder, "--max-items-per-request", "1024", "--transform", "debias")  # the default too
    try:
        default = httpx.post(f"{server.http_url}/score", json={"items": items[:5]}, timeout=60).json()
        raw = httpx.post(f"{server.http_url}/score", json={"items": items, "transform": "raw"}, timeout=120).json()
        debiased = httpx.post(f"{server.http_url}/score", json={"items": items, "transform": "debias"},
                              timeout=120).json()
        refused = httpx.post(f"{server.http_url}/score", json={"items": [{"text": "no response here"}],
                                                                "transform": "debias"}, timeout=30)
    finally:
        server.stop()
    raw_slope, debiased_slope = fit_length(lengths, raw["scores"]).slope, fit_length(lengths, debiased["rewards"]).slope
    assert raw_slope > 0.1
    assert abs(debiased_slope) < 0.05 * raw_slope, (raw_slope, debiased_slope)  # within 5% of zero
    assert debiased["transform"]["name"] == "debias" and debiased["transform"]["length_fit"]["slope"] > 0
    assert refused.status_code == 422 and "send `prompt` + `response`" in refused.json()["error"]["message"]
    # five items alone and the same five among 600: equal to float rounding (the CPU's matmuls block by batch size)
    assert default["transform"]["name"] == "debias"
    assert default["rewards"] == pytest.approx(debiased["rewards"][:5], abs=1e-5)


def test_eval_reports_raw_and_debiased_length_preference(length_model, tmp_path):
    folder, _ = length_model
    (tmp_path / "fresh.jsonl").write_text("\n".join(longer_wins(random.Random(2), 200)) + "\n")
    report = evaluate_checkpoint(EvalConfig(model=str(folder), data=[str(tmp_path / "fresh.jsonl")], max_length=256))
    bias = report["length_bias"]
    assert bias["raw"]["agrees_with_length"] > 0.85 and bias["debiased"]["agrees_with_length"] < 0.65
    assert bias["length_fit"]["slope"] > 0.1
