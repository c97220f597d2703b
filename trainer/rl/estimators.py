"""PPO for language models as small pure functions of tensors and masks: no models, no I/O.

Shapes: B rollouts, T response tokens. `mask` (B, T) is 1 on real response tokens (through EOS), 0 after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_RATIO_BOUND = 20.0  # exp(20) ~ 5e8: past it a ratio is noise, and exp would overflow in bf16


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1 (over all of them, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        variance = variance * count / (count - 1).clamp(min=1)
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total=None) -> torch.Tensor:
    """(x - mean) / std over the masked positions (unbiased variance); with shift_mean=False the mean is added back
    (scale only).

    total: sums a tensor over data-parallel ranks (the identity when alone), so that each rank whitens with the
    statistics of the whole batch, as one process holding all of it would.

    >>> masked_whiten(torch.tensor([1., 2., 3., 4.]), torch.tensor([1., 1., 1., 0.]))
    tensor([-1.,  0.,  1.,  2.])
    """
    total = total or (lambda t: t)
    count = total(mask.sum())
    mean = total((x * mask).sum()) / count.clamp(min=1)
    variance = total(((x - mean) ** 2 * mask).sum()) / (count - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    return whitened if shift_mean else whitened + mean


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under logits / temperature: (B, T, V), (B, T) -> (B, T).

    Dividing by the sampling temperature makes these the log-probabilities of the distribution that was sampled.
    """
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy (B, T) of softmax(logits / temperature)."""
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's estimators).

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, always >= 0).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        reverse = (-log_ratio).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return reverse.exp() - 1 - reverse
    raise ValueError(f"unknown KL estimator {kind!r}; use k1 or k3")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float, mask: torch.Tensor,
                      dense: torch.Tensor | None = None) -> torch.Tensor:
    """r_t = -beta * KL_t at every response token, plus the sequence's score at its last token: (B,), (B, T) -> (B, T).
    dense (B, T): rewards given per token besides (a process reward model's, at the steps' ends)."""
    rewards = -beta * kl * mask + (dense * mask if dense is not None else 0.0)
    last = (mask.sum(-1) - 1).clamp(min=0).long()  # (B,) index of each response's last real token
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def step_rewards(step_scores: list[list[float]], step_ends: list[list[int]], width: int,
                 center: float = 0.5) -> torch.Tensor:
    """Dense rewards from a process reward model: each step's score minus `center`, at the token where the step ends
    (0 elsewhere), (B, width). Centred, a step judged right is rewarded and one judged wrong costs, where raw
    probabilities (all positive) would pay for every step; steps judged right still pay, so watch the step count.

    >>> step_rewards([[0.9, 0.2], [0.7]], [[1, 3], [0]], width=4)
    tensor([[ 0.0000,  0.4000,  0.0000, -0.3000],
            [ 0.2000,  0.0000,  0.0000,  0.0000]])
    """
    rewards = torch.zeros(len(step_scores), width)
    for row, (scores, ends) in enumerate(zip(step_scores, step_ends)):
        for score, end in zip(scores, ends):
            rewards[row, end] += score - center
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over each response; returns (advantages, returns), both (B, T).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; the state after a response's
    last token is terminal (V = 0), and masked positions carry nothing.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


ESTIMATORS = ("gae", "grpo", "rloo", "reinforce++")


def group_baselined_scores(scores: torch.Tensor, group_size: int, estimator: str, scale_by_std: bool = True,
                           eps: float = 1e-6) -> torch.Tensor:
    """Critic-free sequence advantages from the scores (B,) of consecutive groups of `group_size` responses to one
    prompt each (B divisible by the group size):

    - grpo: the score minus its group's mean, divided by the group's standard deviation (unbiased, as TRL and
      DeepSeekMath compute it); scale_by_std=False is Dr. GRPO (Liu et al. 2025), which leaves the scale alone.
    - rloo: the score minus the mean of the *other* members of its group (Ahmadian et al. 2024): an unbiased
      baseline, since it does not depend on the sample it is subtracted from. Needs groups of 2 or more.
    - reinforce++: the score itself; its baseline is the batch-wide whitening of the token advantages.

    Under grpo and rloo, a group whose scores are all equal gets exactly zero advantages (never NaN, never a
    rounding step divided by eps): it teaches nothing. reinforce++ returns the scores as they are.

    >>> group_baselined_scores(torch.tensor([1., 2., 3., 6.]), 4, "rloo")
    tensor([-2.6667, -1.3333,  0.0000,  4.0000])
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    if estimator == "reinforce++":
        return scores.clone()
    # float64, and a group without spread set to exactly zero: the float32 mean of twelve equal scores can be one
    # rounding step off them, and divided by a std of 0 (+ eps) that step became an advantage of -0.57 for all
    groups = scores.double().reshape(-1, group_size)
    spread = groups.amax(-1, keepdim=True) > groups.amin(-1, keepdim=True)  # (G, 1)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 samples per prompt (a baseline from the others)")
        others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
        return torch.where(spread, groups - others, 0.0).reshape(-1).to(scores.dtype)
    if estimator == "grpo":
        centred = groups - groups.mean(-1, keepdim=True)
        if scale_by_std and group_size > 1:
            centred = centred / (groups.std(-1, keepdim=True) + eps)
        return torch.where(spread, centred, 0.0).reshape(-1).to(scores.dtype)
    raise ValueError(f"no critic-free estimator {estimator!r}; choose one of {', '.join(ESTIMATORS[1:])}")


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Each token's sum of the rewards from it to the response's end, discounted by `gamma` a step (as verl and
    OpenRLHF discount REINFORCE++'s): G_t = r_t + gamma G_{t+1}, (B, T) -> (B, T). With the sequence's (baselined)
    score at its last token and -beta KL at every token, this is the critic-free advantage.

    >>> returns_to_go(torch.tensor([[-0.1, -0.2, 1.0]]), torch.ones(1, 3))
    tensor([[0.7000, 0.8000, 1.0000]])
    >>> returns_to_go(torch.tensor([[-0.1, -0.2, 1.0]]), torch.ones(1, 3), gamma=0.5)
    tensor([[0.0500, 0.3000, 1.0000]])
    """
    rewards = rewards * mask
    if gamma == 1.0:
        return rewards.flip(-1).cumsum(-1).flip(-1) * mask
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):  # T steps of device work, no host synchronisation
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


AGGREGATIONS = ("token-mean", "sequence-mean", "token-sum-norm")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token-mean",
              max_tokens: int | None = None) -> torch.Tensor:
    """A loss over (B, T) tokens as one number:

    - token-mean: the mean over every real token of the batch (long responses weigh more);
    - sequence-mean: each response's token mean, then the mean over responses (GRPO's paper);
    - token-sum-norm: the sum over every real token divided by a constant, B x max_tokens (Dr. GRPO: no length
      normalisation that would favour long wrong answers).

    >>> mask = torch.tensor([[1., 1., 0.], [1., 0., 0.]])
    >>> aggregate(torch.tensor([[1., 1., 0.], [4., 0., 0.]]), mask, "sequence-mean")  # (1 + 4) / 2
    tensor(2.5000)
    """
    if how == "token-mean":
        return masked_mean(per_token, mask)
    if how == "sequence-mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if how == "token-sum-norm":
        return (per_token * mask).sum() / (per_token.shape[0] * (max_tokens or per_token.shape[1]))
    raise ValueError(f"unknown loss aggregation {how!r}; use one of {', '.join(AGGREGATIONS)}")


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float, aggregation: str = "token-mean",
                        max_tokens: int | None = None) -> PolicyLoss:
    """PPO's clipped surrogate: max(-A r, -A clip(r, 1 - e, 1 + e)), r = exp(log p - log p_old), aggregated over
    the tokens as `aggregation` says (see `aggregate`)."""
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # k3 of old vs new: >= 0, low variance
    return PolicyLoss(loss, clipfrac.detach(), approx_kl.detach())


def clipped_value_loss(values, old_values, returns, mask, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped within +-clip of the rollout's values."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    variance = masked_var(returns, mask).item()
    return float("nan") if variance == 0 else 1 - masked_var(returns - values, mask).item() / variance


class AdaptiveKLController:
    """Steers beta so the KL to the reference approaches `target` (Ziegler et al. 2019):
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), n = rollouts since the last update."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_rollouts: int) -> float:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + error * n_rollouts / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


class FixedKLController(AdaptiveKLController):
    def __init__(self, beta: float):
        super().__init__(beta, target=1.0, horizon=1)

    def update(self, kl: float, n_rollouts: int) -> float:
        return self.beta


class RunningMoments:
    """Running mean and std of the server's rewards across steps (Chan et al.'s parallel merge)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        batch_mean = values.double().mean().item()
        batch_m2 = ((values.double() - batch_mean) ** 2).sum().item()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def whiten(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / max(self.std, 1e-6)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
