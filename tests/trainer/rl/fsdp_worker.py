"""Run under torchrun by test_sharding: one PPO step under --sharding ddp and then under fsdp, from the same policy,
seeds and data, on every rank (with LoRA adapters of the rank given, or none); then the fsdp policy saved and, as a
plain folder, read back. Each rank writes what it saw to OUT/rank-N.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from rewardserve.trainer.rl.config import PPOConfig
from rewardserve.trainer.rl.distributed import setup_ranks, teardown
from rewardserve.trainer.rl.generation import Sampling
from rewardserve.trainer.rl.ppo import advantages_for, build_models, ppo_update, save_policy
from rewardserve.trainer.prompts import encode_prompt, pad_left
from rewardserve.trainer.rl.rollout import generate_rollout, response_logits
from rewardserve.trainer.rl.sharding import full_policy_state, gathered, held_bytes, shard

PROMPTS = ["Hello there", "Say something.", "Count to ten.", "Hi"]


def one_step(policy_dir: str, sharding: str, lora_rank: int, ranks, device):
    config = PPOConfig(reward_url=["http://127.0.0.1:9"], policy=policy_dir, batch_size=4, mini_batch_size=2,
                       ppo_epochs=2, lr=1e-3, sharding=sharding, max_approx_kl=1e9, lora_rank=lora_rank)
    torch.manual_seed(config.seed)  # as `ppo.main` does: LoRA's random A alike on every rank and in both runs
    tokenizer, model, reference, engine = build_models(config, device)
    if sharding == "fsdp":
        shard(model, reference, device)
    trainable = DistributedDataParallel(model) if sharding == "ddp" else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, fused=True)
    held = held_bytes(model, reference, optimizer)
    torch.manual_seed(100 + ranks.rank)
    with gathered(model, reference):
        rollout, _ = generate_rollout(model, reference, engine, tokenizer, PROMPTS[ranks.rank * 2:][:3 - ranks.rank],
                                      Sampling(6 + 4 * ranks.rank), 32, device, forward_tokens=4096)
    scores = torch.arange(len(rollout.responses), dtype=torch.float32) + ranks.rank
    advantages, returns, _ = advantages_for(rollout, scores, 0.05, config, ranks)
    torch.manual_seed(0)
    update = ppo_update(trainable, optimizer, rollout, advantages, returns, config, device, ranks)
    return tokenizer, model, held, update, rollout


def main(policy_dir: str, out: str, lora_rank: int) -> None:
    ranks, device = setup_ranks("cpu")
    report = {"rank": ranks.rank}
    states = {}
    for sharding in ("ddp", "fsdp"):
        tokenizer, model, held, update, rollout = one_step(policy_dir, sharding, lora_rank, ranks, device)
        states[sharding] = full_policy_state(model)
        report[sharding] = {"held": held, "update": update, "old_logprobs": rollout.old_logprobs.sum().item(),
                            "rollouts": len(rollout.responses)}
    if ranks.is_main:
        report["weights_gap"] = max((states["ddp"][k] - states["fsdp"][k]).abs().max().item() for k in states["ddp"])
        save_policy(Path(out) / "policy", model, tokenizer, state=states["fsdp"])
    ids, mask = pad_left([encode_prompt(tokenizer, p, 32) for p in PROMPTS], tokenizer.pad_token_id)
    with torch.no_grad(), gathered(model):
        sharded = response_logits(model.policy, ids, mask, prompt_width=4)
    ranks.barrier()
    if ranks.is_main and not lora_rank:  # LoRA saves the adapter folder (tests/trainer/rl/test_lora.py reads one)
        plain = AutoModelForCausalLM.from_pretrained(Path(out) / "policy").eval()
        with torch.no_grad():
            report["saved_gap"] = (response_logits(plain, ids, mask, prompt_width=4) - sharded).abs().max().item()
    Path(out, f"rank-{ranks.rank}.json").write_text(json.dumps(report))
    teardown(ranks)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
