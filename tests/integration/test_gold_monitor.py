"""The overoptimisation monitor on real processes: a proxy reward server whose model rewards a token the policy
can learn to repeat, a gold server whose model penalises that repetition; PPO over HTTP climbs the proxy, the gold
falls, and the run stops early and keeps the best-gold policy."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from ..conftest import CLI, ServerProcess, build_tiny_policy, build_token_counting_reward_model, most_frequent_sampled_token

PROMPT = "Say something."


@pytest.mark.slow  # about 35 s of PPO on 2 cores; test_ppo_against_server keeps a short gold run in `make test`
def test_the_run_stops_when_gold_falls_while_proxy_rises(tmp_path, smol_tokenizer):
    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    token = most_frequent_sampled_token(policy, smol_tokenizer, PROMPT)
    proxy = ServerProcess(build_token_counting_reward_model(tmp_path / "proxy", smol_tokenizer, token))
    gold = ServerProcess(build_token_counting_reward_model(tmp_path / "gold", smol_tokenizer, token, scale=-10.0))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    out = tmp_path / "run"
    try:
        run = subprocess.run([*CLI, "ppo", "--reward-url", proxy.http_url, "--gold-reward-url", gold.http_url,
                              "--gold-every", "2", "--stop-on-gold-drop", "2", "--policy", str(policy),
                              "--prompts", str(prompts), "--out", str(out), "--steps", "30", "--lr", "1e-3",
                              "--max-new-tokens", "16", "--batch-size", "32", "--beta", "0.01"],
                             capture_output=True, text=True, timeout=600)
    finally:
        proxy.stop()
        gold.stop()
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) < 30 and "the gold reward fell 2 evaluations in a row" in run.stderr + run.stdout
    evaluated = [r for r in records if "gold/reward_mean" in r]
    assert [r["step"] for r in evaluated] == list(range(2, len(records) + 1, 2))  # every 2 steps
    last, best_step = records[-1], records[-1]["gold/best_step"]
    assert last["reward_mean"] > evaluated[0]["reward_mean"]  # the proxy rose
    assert last["gold/reward_mean"] < last["gold/best_reward_mean"]  # the gold fell from its best
    best = json.loads((out / "best_gold" / "about.json").read_text())
    assert best["step"] == best_step and (out / "best_gold" / "model.safetensors").is_file()
    assert (out / "gold.png").is_file()
    summary = json.loads(run.stdout.split("ppo finished: ")[1].splitlines()[0])
    assert summary["stopped_on_gold_drop"] == last["step"] and summary["gold_best_step"] == best_step
    bars = [chunk for chunk in re.split(r"[\r\n]", run.stderr) if chunk.startswith("ppo:")]
    assert f"| {last['step']}/30 [" in bars[-1], bars[-1]  # the progress bar ends where the run stopped
