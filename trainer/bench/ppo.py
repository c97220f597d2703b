"""`rewardserve bench ppo`: `rewardserve ppo` with a policy of the shape against the real server (its own process)
serving a reward model of the same shape: 64 rollouts x 128 new tokens a step (the reference; smaller on a CPU),
one warm-up step, then 3 timed steps, each reported as the trainer logs it (generation tokens/s, decode steps,
decode path, and the time split). `--advantage-estimator` and `--samples-per-prompt` measure the critic-free
estimators with groups (a group is scored in one request)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..rl.config import PPOConfig
from ..rl.ppo import main as run_ppo
from .common import ServerProcess
from .models import BenchModels

WARMUP_STEPS, TIMED_STEPS = 1, 3
FIELDS = ("generation/tokens_per_s", "generation/decode_steps", "generation/tokens", "generation/path", "time/generate",
          "time/score_wait", "time/update", "time/step")


def run(models: BenchModels, device: torch.device, rollouts: int, new_tokens: int, progress, estimator: str = "gae",
        samples_per_prompt: int = 1, sharding: str = "ddp") -> dict:
    with ServerProcess(str(models.reward), "--device", str(device)) as server, \
            tempfile.TemporaryDirectory(prefix="rewardserve-bench-ppo-") as tmp:
        progress(f"ppo {models.name}: {WARMUP_STEPS} warm-up + {TIMED_STEPS} steps of {rollouts} x {new_tokens},"
                 f" {estimator}, groups of {samples_per_prompt}, {sharding}")
        config = PPOConfig(reward_url=[server.http_url], policy=str(models.policy), out=str(Path(tmp) / "ppo"),
                           steps=WARMUP_STEPS + TIMED_STEPS, batch_size=rollouts, max_new_tokens=new_tokens,
                           advantage_estimator=estimator, samples_per_prompt=samples_per_prompt,
                           device=str(device), save_every=10_000, sharding=sharding)
        run_ppo(config)
        records = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": r["step"], **{k: r.get(k) for k in FIELDS}} for r in records[WARMUP_STEPS:]]
    best = max(steps, key=lambda s: s["generation/tokens_per_s"] or 0)
    return {"model": models.name, "rollouts": rollouts, "max_new_tokens": new_tokens,
            "advantage_estimator": estimator, "samples_per_prompt": samples_per_prompt, "sharding": sharding,
            "steps": steps,
            "best_generation_tokens_per_s": best["generation/tokens_per_s"],
            "best_step_seconds": min(s["time/step"] for s in steps)}
