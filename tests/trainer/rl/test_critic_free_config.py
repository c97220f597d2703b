"""The critic-free estimators' flags: sizes that split groups, and estimators that need groups, are refused in one
line each."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from rewardserve.trainer.rl.config import PPOConfig


@pytest.mark.parametrize("flags, message", [
    ({"batch_size": 12, "mini_batch_size": 6, "samples_per_prompt": 8},
     "--batch-size 12 must divide by --samples-per-prompt 8"),
    ({"batch_size": 8, "generation_batch_size": 2, "samples_per_prompt": 4},
     "--generation-batch-size 2 must divide by --samples-per-prompt 4"),
    ({"advantage_estimator": "rloo"}, "give --samples-per-prompt 2 or more"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 4, "critic": "separate"}, "leave out --critic separate"),
])
def test_refused(flags, message):
    with pytest.raises(ValidationError, match=message):
        PPOConfig(reward_url="http://x:1", batch_size=flags.pop("batch_size", 16), **flags)


def test_accepted():
    config = PPOConfig(reward_url="http://x:1", batch_size=16, advantage_estimator="rloo", samples_per_prompt=4)
    assert config.advantage_estimator == "rloo" and PPOConfig(reward_url="http://x:1").advantage_estimator == "gae"
    assert PPOConfig(reward_url="http://x:1", advantage_estimator="reinforce++").samples_per_prompt == 1


@pytest.mark.parametrize("estimator, critic, expected", [
    ("grpo", "shared", "policy"), ("gae", "shared", "policy+head"), ("gae", "separate", "policy+trunk+head")])
def test_the_optimiser_holds_a_critic_only_when_there_is_one(smol_tokenizer, tmp_path, estimator, critic, expected):
    """As the trainer builds them: a critic-free run's optimiser holds the policy's parameters and nothing else."""
    import torch
    from transformers import AutoModelForCausalLM

    from rewardserve.trainer.rl.ppo import holdings
    from rewardserve.trainer.rl.rollout import ActorCritic

    from ...conftest import build_tiny_policy

    policy = AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path / "policy", smol_tokenizer))
    model = ActorCritic(policy, critic == "separate", critic=estimator == "gae")
    optimizer = torch.optim.AdamW(model.parameters())
    held = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    sizes = {"policy": sum(p.numel() for p in policy.parameters()), "head": policy.config.hidden_size + 1,
             "trunk": sum(p.numel() for p in policy.base_model.parameters())}
    assert held == sum(sizes[part] for part in expected.split("+"))
    line = holdings(model, policy, optimizer)
    assert ("critic none (critic-free)" in line) == (estimator != "gae") and f"AdamW over {held:,} parameters" in line
