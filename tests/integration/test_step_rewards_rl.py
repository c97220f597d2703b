"""The real trainer with dense step rewards from a real server's process reward model: it checks the server splits
at its separator before the policy loads, says so, and trains with the step scores (logged), with or without an
outcome model beside them."""
from __future__ import annotations

import json
import subprocess

import pytest

from ..conftest import CLI, ServerProcess, build_checkpoint, build_tiny_policy
from ..server.test_process_rewards import build_prm


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("step-rl")
    policy = build_tiny_policy(root / "policy", smol_tokenizer)
    rm = build_checkpoint(root / "rm", "llama", smol_tokenizer)
    config = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps(config | {"reward_statistics": {"mean": 0.0, "std": 1.0}}))
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Compute 3 + 4 step by step.\n"}) + "\n")
    server = ServerProcess(rm, "--prm", f"steps={build_prm(root / 'prm', 'llama', smol_tokenizer, seed=5)}",
                           "--step-separator", " ")
    yield policy, prompts, server
    server.stop()


def run(server, policy, prompts, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "ppo", "--reward-url", server.http_url, "--policy", str(policy), "--prompts",
                           str(prompts), "--out", str(out), "--steps", "2", "--max-new-tokens", "12", "--batch-size",
                           "8", "--reward-granularity", "step", "--step-reward-model", "steps", *extra],
                          capture_output=True, text=True, timeout=600)


# with an outcome model: slow (8 s); the default suite keeps the steps-alone run, and the outcome's place on the last
# token is checked by hand in tests/trainer/rl/test_step_rewards.py
@pytest.mark.parametrize("outcome", [[], pytest.param(["--reward-model", "rm"], marks=pytest.mark.slow)],
                         ids=["steps-alone", "with-an-outcome"])
def test_a_run_with_step_rewards(setup, tmp_path, outcome):
    policy, prompts, server = setup
    done = run(server, policy, prompts, tmp_path / "run", "--step-separator", " ", *outcome)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "each response split into steps at ' ' (the server's separator, checked)" in done.stdout + done.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(0 < r["step_score_mean"] < 1 and r["steps_per_response"] > 1 for r in records)
    if not outcome:
        assert all(r["reward_mean"] == 0 for r in records)  # no outcome model: the steps are the whole reward


def test_a_separator_unlike_the_server_s_stops_the_run_before_the_policy_loads(setup, tmp_path):
    policy, prompts, server = setup
    done = run(server, policy, prompts, tmp_path / "run")  # the trainer's newline against the server's space
    assert done.returncode != 0
    assert "the server does not split steps at --step-separator '\\n'" in done.stderr
