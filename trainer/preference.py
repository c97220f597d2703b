"""Pure functions of the Bradley–Terry objective and its evaluation. Tensors in, tensors or floats out."""
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
    - center_coef: + c * mean((r_w + r_l)^2), which keeps scores near zero without changing their differences.
    """
    difference = chosen - rejected  # (B,)
    if margin is not None:
        difference = difference - margin
    if p_chosen is None:
        loss = -F.logsigmoid(difference)
    else:
        loss = -(p_chosen * F.logsigmoid(difference) + (1 - p_chosen) * F.logsigmoid(-difference))
    loss = loss.mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def pairwise_wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Pairs where the chosen response scores higher, a tie counting half, as a 0-d tensor (no host sync)."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores higher; a tie counts half."""
    return pairwise_wins(chosen, rejected).item() / len(chosen)


def reward_statistics(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) std of scores: what the server whitens with, so whitened rewards have mean 0, std 1."""
    scores = scores.double()
    return scores.mean().item(), scores.std(unbiased=False).item()


def expected_calibration_error(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> float:
    """ECE of sigmoid(r_w - r_l) read as the model's confidence in its pick (max(p, 1 - p) vs. being right)."""
    p = torch.sigmoid(chosen.double() - rejected.double())
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double()
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
