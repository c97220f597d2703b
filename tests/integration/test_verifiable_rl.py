"""RL with verifiable rewards end to end: a server serving only the `math` verifier, `rewardserve ppo` running GRPO
on the shipped arithmetic task against it by URL, then `rewardserve compare` on the held-out problems."""
from __future__ import annotations

import json
import subprocess

import pytest

from ..conftest import CLI, ServerProcess


@pytest.mark.slow  # about 5 minutes on 2 cores: 20 GRPO steps of SmolLM2-135M, then 2 x 64 held-out answers
def test_grpo_against_a_verifier_raises_held_out_accuracy(smollm2_dir, tmp_path):
    server = ServerProcess(None, "--verifier", "correct=math:lenient")
    try:
        ppo = subprocess.run(
            [*CLI, "ppo", "--reward-url", server.http_url, "--reward-model", "correct", "--policy", "smollm2",
             "--prompts", "builtin:arithmetic", "--advantage-estimator", "grpo", "--samples-per-prompt", "4",
             "--batch-size", "16", "--mini-batch-size", "16", "--ppo-epochs", "1", "--steps", "20", "--lr", "2e-5",
             "--beta", "0", "--max-new-tokens", "20", "--missing-eos-penalty", "none", "--out", str(tmp_path / "ppo"),
             "--device", "cpu"], capture_output=True, text=True, timeout=1200)
        assert ppo.returncode == 0, ppo.stderr[-3000:]
        compare = subprocess.run(
            [*CLI, "compare", "--policy-a", "smollm2", "--policy-b", str(tmp_path / "ppo" / "policy"),
             "--prompts", "builtin:arithmetic-heldout", "--reward-url", server.http_url, "--reward-model", "correct",
             "--greedy", "--max-new-tokens", "24", "--out", str(tmp_path / "compare"), "--device", "cpu"],
            capture_output=True, text=True, timeout=1200)
        assert compare.returncode == 0, compare.stderr[-3000:]
    finally:
        server.stop()
    steps = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    quarter = len(steps) // 4
    first, last = (sum(s["reward_mean"] for s in part) / quarter for part in (steps[:quarter], steps[-quarter:]))
    assert last > first + 0.15, (first, last)  # the share of right answers in the training batches
    accuracy = json.loads((tmp_path / "compare" / "summary.json").read_text())["verifier_accuracy"]
    assert accuracy["b"]["rate"] > accuracy["a"]["rate"] + 0.08, accuracy  # held out, greedy
    assert "right answers (verifier), B" in compare.stdout
