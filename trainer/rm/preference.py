"""Pure functions of the Bradley–Terry objective and its evaluation. Tensors in, tensors or floats out.

Labels: a pair lists `chosen` and `rejected`, and may carry `p_chosen`, the probability that the chosen one is
better (soft labels from an AI judge). The winner of a pair is `chosen` when p_chosen >= 0.5 or absent, else
`rejected`; accuracy, the reward gap and calibration are measured against that winner, and the log-likelihood and
Brier score against p_chosen itself (1 when absent).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    p_chosen: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Mean negative log-likelihood that the chosen response wins, over a batch of pairs (B,).

    - plain: -log sigmoid(r_w - r_l); ln 2 at equal scores.
    - margin (Llama 2): -log sigmoid(r_w - r_l - m), so pairs the annotators agreed on strongly must win by more.
    - p_chosen (soft labels from an AI judge): the expected log-likelihood under the label,
      -(p log sigmoid(d) + (1 - p) log sigmoid(-d)).
    - both: whichever response wins must win by the margin, -(p log sigmoid(d - m) + (1 - p) log sigmoid(-d - m)).
      A hard label (p = 1) is Llama 2's loss, and a coin flip (p = 0.5) is symmetric, so its optimum is d = 0, not
      d = m (subtracting m from d before the soft loss would move the optimum to logit(p) + m).
    - center_coef: + c * mean((r_w + r_l)^2), which keeps scores near zero without changing their differences.
    """
    difference = chosen - rejected  # (B,)
    margin = torch.zeros_like(difference) if margin is None else margin
    if p_chosen is None:
        loss = -F.logsigmoid(difference - margin)
    else:
        loss = -(p_chosen * F.logsigmoid(difference - margin) + (1 - p_chosen) * F.logsigmoid(-difference - margin))
    loss = loss.mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def winner_sign(chosen: torch.Tensor, p_chosen: torch.Tensor | None) -> torch.Tensor:
    """+1 where the listed chosen response is the winner (p_chosen >= 0.5, or no label), -1 where it is the
    rejected one: (B,)."""
    if p_chosen is None:
        return torch.ones_like(chosen)
    return torch.where(p_chosen.to(chosen.device) >= 0.5, 1.0, -1.0).to(chosen.dtype)


def winner_margin(chosen: torch.Tensor, rejected: torch.Tensor, p_chosen: torch.Tensor | None = None) -> torch.Tensor:
    """The winner's score minus the loser's (B,): positive where the model agrees with the label."""
    return winner_sign(chosen, p_chosen) * (chosen - rejected)


def pairwise_wins(chosen: torch.Tensor, rejected: torch.Tensor, p_chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Pairs where the labelled winner scores higher, a tie counting half, as a 0-d tensor (no host sync)."""
    difference = winner_margin(chosen, rejected, p_chosen)
    return ((difference > 0).float() + 0.5 * (difference == 0).float()).sum()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, p_chosen: torch.Tensor | None = None) -> float:
    """Share of pairs where the labelled winner scores higher; a tie counts half."""
    return pairwise_wins(chosen, rejected, p_chosen).item() / len(chosen)


def label_log_likelihood(chosen: torch.Tensor, rejected: torch.Tensor, p_chosen: torch.Tensor | None = None) -> float:
    """Mean Bradley–Terry log-likelihood of the labels, p log sigmoid(d) + (1 - p) log sigmoid(-d), in nats (0 is
    perfect for hard labels; a soft label's best is its own entropy, negated)."""
    difference = (chosen - rejected).double()
    p = torch.ones_like(difference) if p_chosen is None else p_chosen.double()
    return (p * F.logsigmoid(difference) + (1 - p) * F.logsigmoid(-difference)).mean().item()


def brier_score(chosen: torch.Tensor, rejected: torch.Tensor, p_chosen: torch.Tensor | None = None) -> float:
    """Mean squared difference between the model's P(chosen is better) = sigmoid(d) and the label's p."""
    p = torch.ones_like(chosen, dtype=torch.float64) if p_chosen is None else p_chosen.double()
    return ((torch.sigmoid((chosen - rejected).double()) - p) ** 2).mean().item()


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% (z = 1.96) Wilson score interval of an accuracy measured over n pairs.

    >>> [round(x, 4) for x in wilson_interval(0.8, 100)]
    [0.7112, 0.8666]
    """
    if n == 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    spread = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return max(0.0, centre - spread), min(1.0, centre + spread)


def reward_statistics(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) std of scores: what the server whitens with, so whitened rewards have mean 0, std 1."""
    scores = scores.double()
    return scores.mean().item(), scores.std(unbiased=False).item()


def expected_calibration_error(chosen: torch.Tensor, rejected: torch.Tensor, p_chosen: torch.Tensor | None = None,
                               bins: int = 10) -> float:
    """ECE of sigmoid(d), d the winner's score minus the loser's, read as the model's confidence in its pick
    (max(p, 1 - p)) against being right. A tie is the model's coin flip: confidence 0.5 and right half the time,
    as accuracy counts it, so perfectly calibrated."""
    difference = winner_margin(chosen, rejected, p_chosen).double()
    p = torch.sigmoid(difference)
    confidence = torch.maximum(p, 1 - p)
    correct = (difference > 0).double() + 0.5 * (difference == 0).double()
    edges = torch.linspace(0.5, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high) if low > 0.5 else (confidence >= low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.double().mean().item() * abs(confidence[in_bin].mean().item() - correct[in_bin].mean().item())
    return error


def pearson(x: list[float], y: list[float]) -> float:
    """Correlation coefficient; 0 when either side is constant."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def length_only_accuracy(chosen_lengths: list[int], rejected_lengths: list[int]) -> float:
    """Accuracy of a scorer that always prefers the longer response (ties half): the length-bias baseline."""
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_lengths, rejected_lengths)]
    return sum(wins) / len(wins)
