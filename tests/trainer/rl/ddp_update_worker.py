"""Run under torchrun by test_ppo_update: rank 0 holds 4 rollouts and rank 1 holds 2 (the server could not score
the other 2), as after a partial drop. Each rank writes what it saw to OUT/rank-N.json."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewardserve.trainer.rl.config import PPOConfig
from rewardserve.trainer.rl.distributed import setup_ranks, teardown
from rewardserve.trainer.rl.generation import RolloutEngine, Sampling
from rewardserve.trainer.rl.ppo import advantages_for, ppo_update
from rewardserve.trainer.rl.estimators import masked_whiten
from rewardserve.trainer.rl.rollout import ActorCritic, generate_rollout


def main(policy_dir: str, out: str) -> None:
    ranks, device = setup_ranks("cpu")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    model = ActorCritic(policy)
    torch.manual_seed(ranks.rank)
    count = 4 if ranks.rank == 0 else 2
    engine = RolloutEngine(policy, tokenizer.eos_token_id, tokenizer.pad_token_id)
    rollout, _ = generate_rollout(model, copy.deepcopy(policy), engine, tokenizer, ["Hello there"] * count,
                                  Sampling(8), 32, device, forward_tokens=4096)
    config = PPOConfig(reward_url="http://127.0.0.1:9", batch_size=4, mini_batch_size=2, ppo_epochs=2)
    advantages, returns, _ = advantages_for(rollout, torch.arange(count, dtype=torch.float32), 0.05, config, ranks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    update = ppo_update(DistributedDataParallel(model), optimizer, rollout, advantages, returns, config, device, ranks)

    # Whitening over the ranks equals whitening the two ranks' values in one process.
    values = {0: torch.tensor([1.0, 2.0, 3.0, 4.0]), 1: torch.tensor([10.0, 20.0])}
    masks = {0: torch.tensor([1.0, 1.0, 1.0, 0.0]), 1: torch.tensor([1.0, 1.0])}
    here = masked_whiten(values[ranks.rank], masks[ranks.rank], total=ranks.sum_on_device)
    together = masked_whiten(torch.cat([values[0], values[1]]), torch.cat([masks[0], masks[1]]))
    expected = together[:4] if ranks.rank == 0 else together[4:]
    checksum = sum(p.double().sum().item() for p in model.parameters())
    report = {"rank": ranks.rank, "rollouts": count, "checksum": checksum, "approx_kl": update["approx_kl"],
              "whitening_error": float(((here - expected) * masks[ranks.rank]).abs().max())}
    Path(out, f"rank-{ranks.rank}.json").write_text(json.dumps(report))
    teardown(ranks)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
