"""PPO math pinned to values worked out by hand (written here), not to another implementation."""
import math

import pytest
import torch

from rewardserve.trainer.rl.estimators import (AdaptiveKLController, FixedKLController, RunningMoments, aggregate,
                                          clipped_policy_loss, clipped_value_loss, entropy_from_logits,
                                          explained_variance, gae, gather_logprobs, group_baselined_scores,
                                          kl_penalty, masked_mean, masked_whiten, per_token_rewards, returns_to_go)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_masked_mean_and_whiten_of_1_2_3_4_under_a_mask():
    x, mask = t(1, 2, 3, 4), t(1, 1, 1, 0)
    assert masked_mean(x, mask).item() == 2.0
    # mean 2, unbiased var ((1+0+1)/2) = 1 -> (x - 2) / 1
    assert masked_whiten(x, mask).tolist() == pytest.approx([-1, 0, 1, 2], abs=1e-6)
    assert masked_whiten(x, mask, shift_mean=False).tolist() == pytest.approx([1, 2, 3, 4], abs=1e-6)


def test_gae_three_steps_on_paper():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma = 1, lam = 0.5, terminal after t=2
    # delta2 = 1 - 0.7 = 0.3; delta1 = 0 + 0.7 - 0.6 = 0.1; delta0 = 0 + 0.6 - 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.5 * 0.3 = 0.25; A0 = 0.1 + 0.5 * 0.25 = 0.225
    advantages, returns = gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert advantages[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert returns[0].tolist() == pytest.approx([0.725, 0.85, 1.0])


def test_gae_with_discount_and_padding_after_the_response():
    # gamma = 0.5, lam = 1, response of 2 tokens then padding: delta1 = 2 - 1 = 1; delta0 = 0 + 0.5*1 - 1 = -0.5
    # A1 = 1; A0 = -0.5 + 0.5 * 1 = 0; the padded position gets nothing
    advantages, returns = gae(t([0, 2, 9]), t([1, 1, 9]), t([1, 1, 0]), gamma=0.5, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert returns[0].tolist() == pytest.approx([1.0, 2.0, 0.0])


def test_kl_estimators_at_known_ratios():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 with q/p = 0.5: (0.5 - 1) - log 0.5 = -0.5 + 0.693147 = 0.193147
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_penalty(logp, ref, "k9")


def test_per_token_rewards_put_the_score_at_the_last_real_token():
    kl, mask = t([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]), t([1, 1, 1], [1, 0, 0])
    rewards = per_token_rewards(t(2.0, -1.0), kl, beta=0.5, mask=mask)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, -0.1, 2 - 0.15, -1 - 0.25, 0, 0])


def test_clipped_policy_loss_on_both_sides_of_the_clip():
    mask = t([1.0])
    # ratio 1.5 > 1 + 0.2 with A = +1: clipped -> loss = -1.2, clipped counted
    high = clipped_policy_loss(t([math.log(1.5)]), t([0.0]), t([1.0]), mask, clip=0.2)
    assert high.loss.item() == pytest.approx(-1.2) and high.clipfrac.item() == 1.0
    # ratio 1.5 with A = -1: max(1.5, 1.2) = 1.5, the pessimistic unclipped term wins
    low = clipped_policy_loss(t([math.log(1.5)]), t([0.0]), t([-1.0]), mask, clip=0.2)
    assert low.loss.item() == pytest.approx(1.5) and low.clipfrac.item() == 0.0
    # approx KL (k3 of ratio): (1.5 - 1) - log 1.5 = 0.094535
    assert high.approx_kl.item() == pytest.approx(0.094535, abs=1e-6)
    # inside the clip range: plain -A r
    assert clipped_policy_loss(t([math.log(1.1)]), t([0.0]), t([2.0]), mask, 0.2).loss.item() == pytest.approx(-2.2)


def test_log_ratio_is_clamped_before_exp():
    result = clipped_policy_loss(t([1000.0]), t([0.0]), t([-1.0]), t([1.0]), 0.2)
    assert math.isfinite(result.loss.item())


def test_clipped_value_loss_by_hand():
    # V = 2, V_old = 0, R = 3, clip 0.5: unclipped (2-3)^2 = 1, clipped V 0.5 -> (0.5-3)^2 = 6.25 -> 0.5 * 6.25
    loss, clipfrac = clipped_value_loss(t([2.0]), t([0.0]), t([3.0]), t([1.0]), clip=0.5)
    assert loss.item() == pytest.approx(3.125) and clipfrac.item() == 1.0


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(beta=0.1, target=6.0, horizon=100)
    # KL 12 -> error clipped to +0.2; n = 50 -> beta * (1 + 0.2 * 0.5) = 0.11
    assert controller.update(12.0, 50) == pytest.approx(0.11)
    # KL 5.4 -> error -0.1; n = 100 -> 0.11 * 0.9 = 0.099
    assert controller.update(5.4, 100) == pytest.approx(0.099)
    assert FixedKLController(0.05).update(100.0, 100) == 0.05


def test_running_moments_merge_batches_exactly():
    moments = RunningMoments()
    moments.update(t(1, 2))
    moments.update(t(3, 4))
    assert moments.mean == pytest.approx(2.5) and moments.std == pytest.approx(math.sqrt(5 / 3))


def test_logprobs_entropy_and_explained_variance():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]], dtype=torch.float64))
    assert gather_logprobs(logits, torch.tensor([[0]])).item() == pytest.approx(math.log(0.5))
    assert entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2))
    # temperature 2 flattens: softmax(log p / 2) ∝ sqrt(p) = [0.7071, 0.5, 0.5] / 1.7071
    assert gather_logprobs(logits, torch.tensor([[0]]), temperature=2.0).item() == pytest.approx(
        math.log(0.70710678 / 1.70710678), abs=1e-6)
    returns, mask = t([1, 2, 3]), t([1, 1, 1])
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(t([2, 2, 2]), returns, mask) == pytest.approx(0.0)


# -- critic-free estimators: a group of 4 answers to one prompt, scores 1, 2, 3, 6 --------------------------------
GROUP = torch.tensor([1.0, 2.0, 3.0, 6.0])


def test_rloo_subtracts_the_mean_of_the_others_by_hand():
    # baselines: (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3])
    assert torch.allclose(group_baselined_scores(GROUP, 4, "rloo"), expected)


def test_grpo_centres_and_scales_by_the_group_s_std_by_hand():
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # deviations from the mean 3: -2, -1, 0, 3 (unbiased)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / std
    assert torch.allclose(group_baselined_scores(GROUP, 4, "grpo"), expected, atol=1e-5)
    dr_grpo = group_baselined_scores(GROUP, 4, "grpo", scale_by_std=False)  # Dr. GRPO: centred only
    assert torch.equal(dr_grpo, torch.tensor([-2.0, -1.0, 0.0, 3.0]))


def test_groups_are_consecutive_and_independent():
    two_groups = torch.cat([GROUP, GROUP + 100])
    for estimator in ("grpo", "rloo"):
        advantages = group_baselined_scores(two_groups, 4, estimator)
        assert torch.allclose(advantages[:4], advantages[4:], atol=1e-5)  # a shift of a group's scores is baselined


def test_all_equal_rewards_give_zero_advantages_and_no_nan():
    for estimator in ("grpo", "rloo"):
        advantages = group_baselined_scores(torch.full((8,), 0.7), 4, estimator)
        assert torch.equal(advantages, torch.zeros(8)), estimator


def test_reinforce_plus_plus_keeps_the_score_for_the_batch_whitening():
    assert torch.equal(group_baselined_scores(GROUP, 1, "reinforce++"), GROUP)


def test_estimator_misuse_is_refused_clearly():
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_baselined_scores(GROUP, 3, "grpo")
    with pytest.raises(ValueError, match="rloo needs at least 2"):
        group_baselined_scores(GROUP, 1, "rloo")
    with pytest.raises(ValueError, match="no critic-free estimator 'ppo'"):
        group_baselined_scores(GROUP, 4, "ppo")


def test_returns_to_go_by_hand():
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 0.0], [0.5, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    expected = torch.tensor([[0.7, 0.8, 1.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    assert torch.allclose(returns_to_go(rewards, mask), expected)


def test_loss_aggregations_by_hand():
    """Two responses of 2 and 1 tokens, losses (1, 1) and (4): token-mean (1+1+4)/3, sequence-mean (1 + 4)/2,
    token-sum-norm (1+1+4) / (2 responses x 4 tokens of budget)."""
    losses = torch.tensor([[1.0, 1.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(losses, mask, "token-mean").item() == pytest.approx(2.0)
    assert aggregate(losses, mask, "sequence-mean").item() == pytest.approx(2.5)
    assert aggregate(losses, mask, "token-sum-norm", max_tokens=4).item() == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(losses, mask, "median")


def test_a_group_of_equal_scores_gets_exactly_zero_advantages():
    """float32 means of equal scores can be one rounding step off them; divided by a std of 0 (+ eps) that step
    was an advantage of up to -0.57 for the whole group. Groups of identical answers are common once a policy
    sharpens."""
    values = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 20 - 10
    equal = values.repeat_interleave(12)  # 500 groups of 12 equal float32 scores
    for estimator in ("grpo", "rloo"):
        assert torch.equal(group_baselined_scores(equal, 12, estimator), torch.zeros_like(equal)), estimator
    assert torch.equal(group_baselined_scores(equal, 12, "grpo", scale_by_std=False), torch.zeros_like(equal))
    mixed = torch.cat([torch.full((4,), 0.1), GROUP])  # a flat group beside one with spread: only it is zero
    assert torch.equal(group_baselined_scores(mixed, 4, "grpo")[:4], torch.zeros(4))
    assert group_baselined_scores(mixed, 4, "grpo").dtype == torch.float32


def test_returns_to_go_discount_by_gamma_by_hand():
    # G_2 = 1.0; G_1 = -0.2 + 0.5 * 1.0 = 0.3; G_0 = -0.1 + 0.5 * 0.3 = 0.05; a masked step adds nothing
    rewards, mask = torch.tensor([[-0.1, -0.2, 1.0, 7.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(returns_to_go(rewards, mask, gamma=0.5), torch.tensor([[0.05, 0.3, 1.0, 0.0]]))
    assert torch.allclose(returns_to_go(rewards, mask), torch.tensor([[0.7, 0.8, 1.0, 0.0]]))
