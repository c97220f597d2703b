"""Dense step rewards: where each step's reward lands (by hand), and how GAE and REINFORCE++ take them."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rewardserve.server.steps import StepFormat
from rewardserve.trainer.rl.config import PPOConfig
from rewardserve.trainer.rl.estimators import per_token_rewards, step_rewards
from rewardserve.trainer.rl.ppo import advantages_for
from rewardserve.trainer.rl.rollout import Rollout
from rewardserve.trainer.rl.step_rewards import dense_step_rewards, step_char_ends, step_end_tokens


def test_each_step_reward_lands_on_its_last_token_and_the_outcome_on_the_last():
    dense = step_rewards([[0.9, 0.2], [0.7]], [[1, 3], [0]], width=5)
    assert torch.allclose(dense, torch.tensor([[0, 0.4, 0, -0.3, 0], [0.2, 0, 0, 0, 0]]))
    mask = torch.tensor([[1., 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    kl = torch.full((2, 5), 0.5)
    rewards = per_token_rewards(torch.tensor([1.0, -2.0]), kl, 0.1, mask, dense)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.35, -0.05, -0.35, 0.95],  # outcome 1.0 on token 4
                                                 [0.15, -2.05, 0, 0, 0]]))  # step at 0, outcome -2 on token 1


def test_step_ends_are_found_in_the_decoded_response(smol_tokenizer):
    text = "12 + 7 = 19\n19 - 5 = 14\n\nThe answer is 14."
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"] + [smol_tokenizer.eos_token_id]
    assert step_char_ends(text, StepFormat()) == [11, 23, 42]
    ends = step_end_tokens(smol_tokenizer, ids, text, StepFormat())
    decoded = [smol_tokenizer.decode(ids[:end + 1], skip_special_tokens=True) for end in ends]
    assert decoded == ["12 + 7 = 19", "12 + 7 = 19\n19 - 5 = 14", text]  # each ends exactly where its step does
    assert ends[-1] == len(ids) - 2  # the last step's text ends before EOS, which takes the outcome


def rollout_of(tokenizer, texts: list[str], width: int) -> Rollout:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt = [[7, 8], [7, 8]]
    ids = torch.tensor([p + r + [0] * (width - len(r)) for p, r in zip(prompt, rows)])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    zeros = torch.zeros(len(texts), width)
    return Rollout(ids, torch.cat([torch.ones(2, 2, dtype=torch.long), response_mask], 1), response_mask, zeros,
                   zeros, zeros, torch.tensor([True, True]), ["p", "p"], texts)


def test_gae_and_reinforce_pp_take_the_step_rewards(smol_tokenizer):
    texts = ["1 + 1 = 2\nThe answer is 2.", "5 - 3 = 1"]
    rollout = rollout_of(smol_tokenizer, texts, 20)
    dense = dense_step_rewards(smol_tokenizer, rollout, [[0.9, 0.8], [0.1]], StepFormat())
    ends = [step_end_tokens(smol_tokenizer, rollout.input_ids[i, 2:].tolist()[:int(rollout.response_mask[i].sum())],
                            texts[i], StepFormat()) for i in range(2)]
    assert [[round(dense[i, e].item(), 4) for e in ends[i]] for i in range(2)] == [[0.4, 0.3], [-0.4]]
    assert dense.abs().sum().item() == pytest.approx(1.1)
    config = PPOConfig(reward_url=["http://x"], policy="p", prompts="p", out="o", reward_granularity="step",
                       step_reward_model="steps", gamma=1.0, lam=1.0, whiten_rewards=False)
    scores = torch.tensor([1.0, 0.0])
    _, returns, _ = advantages_for(rollout, scores, 0.0, config, dense=dense)  # values 0: returns = reward-to-go
    first_end, second_end = ends[0]
    assert returns[0, 0].item() == pytest.approx(0.4 + 0.3 + 1.0)
    assert returns[0, first_end + 1].item() == pytest.approx(0.3 + 1.0)  # after step 1: what is still to come
    assert returns[0, second_end].item() == pytest.approx(0.3 + 1.0)  # the last step ends on the last token
    assert returns[1, 0].item() == pytest.approx(-0.4)
    critic_free = config.model_copy(update={"advantage_estimator": "reinforce++"})
    advantages, _, _ = advantages_for(rollout, scores, 0.0, critic_free, dense=dense)
    plain, _, _ = advantages_for(rollout, scores, 0.0, critic_free)
    assert not torch.allclose(advantages, plain)  # the steps change what each token is credited with


@pytest.mark.parametrize("flags, message", [
    ({"reward_granularity": "step"}, "needs --step-reward-model"),
    ({"step_reward_model": "s"}, "add --reward-granularity step"),
    ({"reward_granularity": "step", "step_reward_model": "s", "advantage_estimator": "grpo", "samples_per_prompt": 4},
     "use gae or reinforce++"),
    ({"reward_granularity": "step", "step_reward_model": "s", "reward_combination": "mix"}, "a combination"),
])
def test_step_reward_settings_are_checked(flags, message):
    with pytest.raises(ValidationError, match=message):
        PPOConfig(reward_url=["http://x"], policy="p", prompts="p", out="o", **flags)
