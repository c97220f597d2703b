"""Reward transforms: pure functions from raw scores to the rewards a trainer consumes.

- raw: the model's score s, unchanged.
- whiten: (s - mean) / std, with statistics stored in the checkpoint or given at start. Whitening makes rewards
  from different reward models comparable and keeps PPO's value targets near unit scale.
- logsigmoid: beta * log(sigmoid(s)), the Bradley–Terry log-probability that the response beats a baseline at 0.
- debias: s - slope * (length - mean_length), the score without its linear trend in response length (tokens),
  fitted by least squares over the training responses and stored with the statistics. A reward model that absorbed
  the labellers' taste for long answers teaches the policy to pad; this takes the trend out and keeps the rest.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

TransformName = Literal["raw", "whiten", "logsigmoid", "debias"]


@dataclass(frozen=True)
class RewardStatistics:
    """Mean and std of a reward model's scores, and where they came from (for the response to say)."""

    mean: float
    std: float
    source: str

    def __post_init__(self):
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"reward statistics need a finite mean and a positive std, got {self.mean}, {self.std}")


@dataclass(frozen=True)
class LengthFit:
    """The least-squares line of score on response length (tokens): score ~ intercept + slope * length."""

    slope: float
    mean_length: float
    responses: int  # how many responses it was fitted on

    def __post_init__(self):
        if not (math.isfinite(self.slope) and math.isfinite(self.mean_length)):
            raise ValueError(f"a length fit needs a finite slope and mean length, got {self.slope}, {self.mean_length}")


def fit_length(lengths: list[int], scores: list[float]) -> LengthFit:
    """Least squares: slope = cov(length, score) / var(length); 0 when every length is the same."""
    n = len(lengths)
    if n == 0 or n != len(scores):
        raise ValueError(f"a length fit needs as many lengths as scores, and some: got {n} and {len(scores)}")
    mean_length, mean_score = sum(lengths) / n, sum(scores) / n
    covariance = sum((x - mean_length) * (y - mean_score) for x, y in zip(lengths, scores))
    variance = sum((x - mean_length) ** 2 for x in lengths)
    return LengthFit(covariance / variance if variance > 0 else 0.0, mean_length, n)


def debias(score: float, length: int, fit: LengthFit) -> float:
    return score - fit.slope * (length - fit.mean_length)


def whiten(score: float, mean: float, std: float) -> float:
    return (score - mean) / std


def log_sigmoid(x: float) -> float:
    """log(sigmoid(x)) without overflow: -log1p(exp(-x)) for x >= 0, x - log1p(exp(x)) below."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@dataclass(frozen=True)
class RewardTransform:
    """Which transform turns scores into rewards, with everything it used, so a response can state it."""

    name: TransformName
    statistics: RewardStatistics | None = None
    beta: float = 1.0
    length_fit: LengthFit | None = None

    def __post_init__(self):
        if self.name == "whiten" and self.statistics is None:
            raise ValueError("whitening needs reward statistics (mean and std); none were given")
        if self.name == "debias" and self.length_fit is None:
            raise ValueError("the debiased transform needs a length fit (slope and mean length); none was given")

    @property
    def needs_lengths(self) -> bool:
        return self.name == "debias"

    def apply(self, scores: list[float], lengths: list[int] | None = None) -> list[float]:
        """`lengths`: each item's response length in tokens, needed by `debias` alone."""
        if self.name == "raw":
            return list(scores)
        if self.name == "whiten":
            return [whiten(s, self.statistics.mean, self.statistics.std) for s in scores]
        if self.name == "debias":
            if lengths is None or len(lengths) != len(scores):
                raise ValueError("the debiased transform needs each item's response length")
            return [debias(s, n, self.length_fit) for s, n in zip(scores, lengths)]
        return [self.beta * log_sigmoid(s) for s in scores]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "statistics": asdict(self.statistics) if self.statistics and self.name == "whiten" else None,
            "beta": self.beta if self.name == "logsigmoid" else None,
            "length_fit": asdict(self.length_fit) if self.name == "debias" else None,
        }
