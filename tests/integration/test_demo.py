"""The main job end to end on tiny models: real processes, real HTTP, every stage's output checked."""
from __future__ import annotations

import json
import subprocess

import pytest

from ..conftest import CLI, build_tiny_policy
from ..trainer.rm.test_train import tiny_base  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, smol_tokenizer):
    return build_tiny_policy(tmp_path_factory.mktemp("policy"), smol_tokenizer)


def run_demo(out, policy, base, *extra):
    args = [*CLI, "demo", "--out", str(out), "--policy", str(policy), "--judge", str(policy), "--base", str(base),
            "--label-prompts", "12", "--max-new-tokens", "12", "--rm-epochs", "1", "--rm-lr", "1e-3",
            "--ppo-steps", "2", "--ppo-batch-size", "4", *extra]
    run = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_demo_runs_every_stage_then_caches_them(tiny_policy, tiny_base, tmp_path):  # noqa: F811
    out = tmp_path / "demo"
    first = run_demo(out, tiny_policy, tiny_base)
    rows = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected", "p_chosen"} <= set(r) and r["p_chosen"] >= 0.5 for r in rows)
    assert (out / "rm" / "model.safetensors").is_file() and "reward_statistics" in (out / "rm" / "config.json").read_text()
    metrics = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["dropped_total"] == 0
    assert (out / "ppo" / "ppo.png").is_file() and (out / "ppo" / "policy" / "config.json").is_file()
    assert "rewardserve ready" in (out / "server.log").read_text()  # the server really ran, as its own process
    summary = json.loads((out / "summary.json").read_text())
    labelling = summary["labelling"]  # the default judge, the embedded encoder: pointwise, so order plays no part
    assert labelling["judge_mode"] == "relevance" and labelling["rows"] == len(rows)
    assert labelling["consistency_rate"] == 1.0 and labelling["judge_position_bias_logit"] == 0.0
    assert labelling["judge_content_signal_logit"] > 0 and labelling["judge_answer_mass"] is None
    assert summary["reward_model"]["held_out_accuracy"] is not None and summary["ppo"]["steps"] == 2
    assert summary["ppo"]["reward_gain_in_rm_std"] == pytest.approx(metrics[1]["reward_mean"] - metrics[0]["reward_mean"],
                                                                    abs=1e-4)
    # held-out prompts: never labelled, never in PPO; the comparison answers each of them
    held_out = (out / "prompts" / "held_out.jsonl").read_text().splitlines()
    assert len(held_out) == 51 and not set(held_out) & set((out / "prompts" / "train.jsonl").read_text().splitlines())
    compared = [json.loads(line) for line in (out / "compare" / "comparisons.jsonl").read_text().splitlines()]
    assert [json.dumps({"prompt": row["prompt"]}) for row in compared] == held_out
    comparison = summary["held_out_comparison"]
    assert comparison["comparisons"] == 51 and set(comparison["mean_length_tokens"]) == {"a", "b"}
    assert all(-1 <= row["a_relevance"] <= 1 and -1 <= row["b_relevance"] <= 1 for row in compared)
    for name in ("win_rate_reward", "win_rate_judge", "win_rate_relevance"):
        rate_low_high = comparison[name]
        assert 0 <= rate_low_high[1] <= rate_low_high[0] <= rate_low_high[2] <= 1
    assert (out / "compare" / "win_rates.png").is_file()
    assert "== summary" in first

    second = run_demo(out, tiny_policy, tiny_base)
    assert second.count(": cached") == 4


@pytest.mark.slow  # 22 s; the hot reload itself is in test_reload.py, the pairwise judge's figures in test_labeling.py
def test_demo_refreshes_the_reward_model_without_stopping_the_server(tiny_policy, tiny_base, tmp_path):  # noqa: F811
    """With the pairwise judge (the tiny policy, asked "A or B" in both orders) labelling the refreshes too."""
    out = tmp_path / "demo"
    printed = run_demo(out, tiny_policy, tiny_base, "--ppo-steps", "4", "--refresh-every", "2",
                       "--refresh-prompts", "6", "--label-judge-mode", "pairwise")
    labelling = json.loads((out / "label_summary.json").read_text())  # a random tiny judge: a mass near 0
    assert labelling["judge_mode"] == "pairwise" and 0 <= labelling["judge_answer_mass"] <= 1
    assert 0 <= labelling["consistency_rate"] <= 1 and isinstance(labelling["judge_position_bias_logit"], float)
    assert "== refresh 1, after PPO step 2" in printed and "while the server kept serving" in printed
    refreshes = json.loads((out / "ppo" / "refreshes.json").read_text())
    assert len(refreshes) == 1 and refreshes[0]["after_step"] == 2 and refreshes[0]["new_pairs"] > 0
    assert refreshes[0]["old_version"] != refreshes[0]["new_version"]
    assert refreshes[0]["training_files"] == [str(out / "prefs.jsonl"), str(out / "refresh-1" / "prefs.jsonl")]
    assert (out / "refresh-1" / "rm" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[-1]["dropped_total"] == 0
    assert [m["model_version"] for m in metrics] == [refreshes[0]["old_version"]] * 2 + [refreshes[0]["new_version"]] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ppo"]["reward_model_changed_at_steps"] == [3] and summary["refreshes"] == refreshes
    server_log = (out / "server.log").read_text()
    assert server_log.count("rewardserve ready") == 1 and "reloaded rm" in server_log  # one server throughout
