"""Does GRPO with the KL in the loss learn as GRPO with the KL in the reward does? Over several seeds, in the PPO
learning test's setting (tests/integration/test_ppo_against_server.py: a tiny random policy, a reward model that
counts the token the policy samples most, 30 steps, lr 3e-4, beta 0.01, 16 rollouts of 16 tokens, groups of 4).

    .venv/bin/python docs/scripts/kl_in_loss_seeds.py --seeds 0,1,2,3,4 --out runs/kl-in-loss

Prints a table (the rise of the mean reward, the last 6 steps' mean minus the first 6's, and the largest KL) and
writes OUT/summary.json. The figures in docs/rl.md come from this script.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the tests' model builders and server process

from tests.conftest import CLI, ServerProcess, build_learning_setup  # noqa: E402

SETTINGS = {"kl in the reward": [], "kl in the loss, sequence-mean": ["--kl-in", "loss", "--loss-aggregation",
                                                                      "sequence-mean"]}
GRPO = ["--advantage-estimator", "grpo", "--samples-per-prompt", "4"]
PROMPT = "Say something."


def rise(records: list[dict]) -> float:
    return sum(r["reward_mean"] for r in records[-6:]) / 6 - sum(r["reward_mean"] for r in records[:6]) / 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", default="runs/kl-in-loss")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from rewardserve.server.embedded import smollm2_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy, reward_model, prompts = build_learning_setup(out, AutoTokenizer.from_pretrained(smollm2_checkpoint()),
                                                         PROMPT)
    server = ServerProcess(reward_model)
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name, flags in SETTINGS.items():
                run = out / f"{name.replace(' ', '-').replace(',', '')}-seed{seed}"
                done = subprocess.run([*CLI, "ppo", "--reward-url", server.http_url, "--policy", str(policy),
                                       "--prompts", str(prompts), "--out", str(run), "--steps", "30", "--lr", "3e-4",
                                       "--max-new-tokens", "16", "--batch-size", "16", "--beta", "0.01",
                                       "--seed", str(seed), *GRPO, *flags], capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(done.stderr[-2000:])
                records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                results[name].append({"seed": seed, "rise": rise(records), "max_kl": max(r["kl"] for r in records)})
                print(f"{name}, seed {seed}: reward rose {results[name][-1]['rise']:+.2f}", flush=True)
    finally:
        server.stop()
    print(f"\n| setting | rise per seed ({args.seeds}) | mean | min | largest KL |\n|---|---|---|---|---|")
    for name, rows in results.items():
        rises = [r["rise"] for r in rows]
        print(f"| {name} | {', '.join(f'{x:+.2f}' for x in rises)} | {statistics.mean(rises):+.2f} |"
              f" {min(rises):+.2f} | {max(r['max_kl'] for r in rows):.2f} |")
    (out / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
