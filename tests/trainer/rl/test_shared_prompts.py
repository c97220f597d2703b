"""PPO with each group's prompt computed once: the rollout's log-probs, reference log-probs and values, and the
update's losses and every parameter's gradient, equal the unshared (padded) ones within 1e-5 in fp32 (relative to
the largest entry where that is above 1), for Llama, Qwen2 and GPT-2 (rotary and learned positions), a group
holding two identical responses among them."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from rewardserve.trainer.rl.generation import RolloutEngine, Sampling
from rewardserve.trainer.rl.ppo import minibatch_indices
from rewardserve.trainer.rl.estimators import clipped_policy_loss, clipped_value_loss
from rewardserve.trainer.rl.rollout import ActorCritic, generate_rollout, policy_forward, share_prompts, token_statistics

from .test_policy_families import families

CPU = torch.device("cpu")
PROMPTS = ["Say something about the weather in a long and winding sentence, please.", "Count to twenty, slowly."]
GROUP = 3


def group_rollout(model: ActorCritic, reference, tokenizer):
    """Two prompts x three sampled responses, read without sharing; the group's third response is then made a copy
    of its second (identical items are computed once)."""
    engine = RolloutEngine(model.policy, tokenizer.eos_token_id, tokenizer.pad_token_id)
    prompts = [prompt for prompt in PROMPTS for _ in range(GROUP)]
    rollout, _ = generate_rollout(model, reference, engine, tokenizer, prompts, Sampling(12), 64, CPU, 4096)
    for name in ("input_ids", "attention_mask", "response_mask", "old_logprobs", "ref_logprobs", "values"):
        getattr(rollout, name)[2] = getattr(rollout, name)[1]
    return rollout


@pytest.mark.parametrize("family,critic", [("llama", "shared"), ("llama", "separate"), ("qwen2", "shared"),
                                           ("gpt2", "shared")])
def test_a_group_s_statistics_losses_and_gradients_equal_the_unshared_ones(smol_tokenizer, family, critic):
    torch.manual_seed(0)
    config = families(len(smol_tokenizer), smol_tokenizer.pad_token_id)[family]
    model = ActorCritic(AutoModelForCausalLM.from_config(config), separate_critic=critic == "separate").eval()
    nn.init.normal_(model.value_head.weight)  # values that are not all zero
    reference = copy.deepcopy(model.policy)
    nn.init.normal_(reference.get_output_embeddings().weight, std=0.5)  # a reference that differs from the policy
    rollout = group_rollout(model, reference, smol_tokenizer)
    rows, prompt_lengths = rollout.token_rows()
    width, responses = rollout.prompt_width, rollout.response_mask.shape[1]
    shared = share_prompts(rows, prompt_lengths, responses, min_shared_prefix=8)
    assert shared is not None
    # each prompt once (or more than the prompt, where a group's responses begin alike), the duplicate's own tokens
    # not at all
    saved = (GROUP - 1) * (prompt_lengths[0] + prompt_lengths[GROUP]) + len(rows[1]) - prompt_lengths[1]
    assert shared.packed.computed_tokens <= sum(map(len, rows)) - saved
    mask = rollout.response_mask.bool()

    with torch.no_grad():
        padded = token_statistics(model, reference, rollout.input_ids, rollout.attention_mask, width, 0.7, 4096, CPU, 0)
        packed = token_statistics(model, reference, rollout.input_ids, rollout.attention_mask, width, 0.7, 4096, CPU, 8)
    for name, a, b in zip(("old log-probs", "values", "reference log-probs"), padded, packed):
        assert close(a[mask], b[mask]), name
        assert a[mask].abs().max() > 0.1, name  # not trivially equal

    advantages = torch.randn(mask.shape) * mask
    returns = torch.randn(mask.shape) * mask
    old = rollout.old_logprobs + 0.3 * torch.randn(mask.shape) * mask  # some ratios fall outside the clip

    def losses_and_gradients(layout):
        model.zero_grad(set_to_none=True)
        logprobs, values, _ = policy_forward(model, rollout.input_ids, rollout.attention_mask, width, 0.7, layout)
        policy = clipped_policy_loss(logprobs, old, advantages, mask.float(), 0.2)
        value_loss, _ = clipped_value_loss(values, rollout.values, returns, mask.float(), 0.2)
        (policy.loss + value_loss).backward()
        return (torch.stack([policy.loss, value_loss, policy.clipfrac]).detach(),
                {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    unshared_losses, unshared_grads = losses_and_gradients(None)
    shared_losses, shared_grads = losses_and_gradients(shared)
    assert unshared_losses[2] > 0  # the clip is in play
    assert close(unshared_losses, shared_losses)
    assert unshared_grads.keys() == shared_grads.keys() and len(shared_grads) > 10
    for name, grad in unshared_grads.items():
        assert close(grad, shared_grads[name]), name


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within 1e-5, or 1e-5 of the largest entry where that is above 1 (fp32 sums taken in another order differ
    by a few units in the last place: 4e-6 at 30)."""
    return (a - b).abs().max().item() < 1e-5 * max(1.0, a.abs().max().item())


def test_minibatches_keep_each_group_whole_and_cover_every_rollout_once():
    torch.manual_seed(0)
    parts = minibatch_indices(12, 2, group=3)
    assert sorted(i for part in parts for i in part) == list(range(12))
    assert all(len(part) == 6 and sorted(part) == sorted({3 * (i // 3) + k for i in part for k in range(3)})
               for part in parts)
    assert [len(part) for part in minibatch_indices(10, 3)] == [4, 3, 3]  # rows, split as tensor_split does
    assert [len(part) for part in minibatch_indices(6, 4, group=3)] == [2, 2, 1, 1]  # fewer groups than parts
