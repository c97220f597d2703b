"""Named combinations of several reward models' scores, declared at start and stated in every response.

    --combination "safe=llama2 helpful=HELPFUL safety=SAFETY [threshold=0.15]"
    --combination "mix=sum 0.7*helpful 0.3*safety"
    --combination "ens=ensemble rm1 rm2 rm3 [lambda=0.5]"
    --combination "gated=gate rm by=fmt [else=-1]"

- llama2, the rule Llama 2 trained its policy with (Touvron et al., 2023, section 3.2.2): the chosen raw score is
  the safety model's when the item is flagged safety-relevant or sigmoid(s_safety) < threshold, else the helpfulness
  model's; the reward is that score whitened with the chosen model's statistics. (The paper writes
  WHITEN(LOGIT(R_c)) because its R are sigmoid outputs; the logit of the chosen sigmoid score is the raw score.)
- sum: the weighted sum of whitened scores, sum_i w_i * whiten_i(s_i).
- ensemble: the mean and standard deviation (population, over the k models) of the whitened scores; the reward is
  the mean, or the conservative `mean - lambda * std` when lambda is given, which discounts items the models
  disagree on (uncertainty-weighted optimisation against overoptimisation, Coste et al., 2023).
- gate: the model's whitened score where the gate (a verifier, typically a format check) passes (its score above
  0.5), else `else` (default -1: a standard deviation below the mean reward, so failing the format never pays).

A verifier's statistics are mean 0 and std 1 (server/verifiers.py): its 0/1 verdict enters every combination as it
is, so `sum 1*correct 0.1*rm` is one point per right answer plus a tenth of the reward model's whitened score.

Every combination works on whitened scores, so each of its models needs statistics: checked at start.
Pure functions; the service feeds them each model's raw scores.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from .errors import StartupError
from .normalization import RewardStatistics, whiten

CombinationKind = Literal["llama2", "sum", "ensemble", "gate"]
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Combination:
    name: str
    kind: CombinationKind
    models: tuple[str, ...]  # llama2: (helpful, safety)
    weights: tuple[float, ...] = ()  # sum: one per model
    threshold: float = 0.15  # llama2: sigmoid(s_safety) below it switches to the safety score
    conservative_lambda: float | None = None  # ensemble: reward = mean - lambda * std when set
    otherwise: float = -1.0  # gate: the reward where the gate fails

    @classmethod
    def parse(cls, spec: str) -> "Combination":
        """`NAME=KIND ARGS...` as in the module's docstring; ValueError says what is wrong and how to write it."""
        name, equals, body = spec.partition("=")
        name, words = name.strip(), body.split()
        if not equals or not NAME.match(name) or not words:
            raise ValueError(f"combination {spec!r}: write NAME=KIND ARGS, e.g. \"safe=llama2 helpful=h safety=s\","
                             " \"mix=sum 0.7*h 0.3*s\", \"ens=ensemble a b c lambda=0.5\" or \"gated=gate rm by=fmt\"")
        kind, args = words[0], words[1:]
        options = dict(a.split("=", 1) for a in args if "=" in a)
        plain = [a for a in args if "=" not in a]
        try:
            if kind == "llama2":
                unknown = set(options) - {"helpful", "safety", "threshold"}
                if plain or unknown or not {"helpful", "safety"} <= set(options):
                    raise ValueError("llama2 takes helpful=MODEL safety=MODEL [threshold=0.15]")
                threshold = finite(options.get("threshold", "0.15"), "threshold")
                if not 0 < threshold < 1:
                    raise ValueError(f"threshold is compared with a sigmoid, so it lies in (0, 1); got {threshold}")
                return cls(name, "llama2", (options["helpful"], options["safety"]), threshold=threshold)
            if kind == "sum":
                if options or not plain:
                    raise ValueError("sum takes WEIGHT*MODEL terms, e.g. 0.7*helpful 0.3*safety")
                terms = [term.split("*", 1) if "*" in term else ("1", term) for term in plain]
                return cls(name, "sum", tuple(m for _, m in terms), weights=tuple(finite(w, "a weight") for w, _ in terms))
            if kind == "ensemble":
                if set(options) - {"lambda"} or len(plain) < 2:
                    raise ValueError("ensemble takes two or more MODEL names and an optional lambda=0.5")
                lam = finite(options["lambda"], "lambda") if "lambda" in options else None
                if lam is not None and lam < 0:
                    raise ValueError(f"lambda weighs a penalty, so it is at least 0; got {lam}")
                return cls(name, "ensemble", tuple(plain), conservative_lambda=lam)
            if kind == "gate":
                if set(options) - {"by", "else"} or "by" not in options or len(plain) != 1:
                    raise ValueError("gate takes one MODEL, by=VERIFIER and an optional else=-1")
                return cls(name, "gate", (plain[0], options["by"]), otherwise=finite(options.get("else", "-1"), "else"))
            raise ValueError(f"unknown kind {kind!r}; the kinds are llama2, sum, ensemble and gate")
        except ValueError as error:
            raise ValueError(f"combination {spec!r}: {error}") from None

    def check(self, statistics: dict[str, RewardStatistics | None]) -> None:
        """Every model named must be served and have statistics (whitening is part of every combination)."""
        unknown = [m for m in self.models if m not in statistics]
        if unknown:
            raise ValueError(f"combination {self.name!r} names {', '.join(unknown)}, not among the models served"
                             f" ({', '.join(statistics)})")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"combination {self.name!r} names a model twice")
        bare = [m for m in self.models if statistics[m] is None]
        if bare:
            raise ValueError(f"combination {self.name!r} whitens every score, and {', '.join(bare)} has no reward"
                             " statistics: serve a checkpoint from `rewardserve train` (it stores them), or add"
                             " `reward_statistics: {\"mean\": ..., \"std\": ...}` to its config.json")

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "models": list(self.models),
                "weights": list(self.weights) if self.kind == "sum" else None,
                "threshold": self.threshold if self.kind == "llama2" else None,
                "conservative_lambda": self.conservative_lambda if self.kind == "ensemble" else None,
                "otherwise": self.otherwise if self.kind == "gate" else None}


def finite(text: str, what: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number; got {text}")
    return value


@dataclass(frozen=True)
class Combined:
    """One combination's answer for a batch of items, as parallel lists."""

    scores: list[float]  # llama2: the chosen raw score; sum: the weighted sum; ensemble: the mean
    rewards: list[float]  # llama2: the chosen score whitened; sum: as scores; ensemble: mean or mean - lambda * std
    chosen: list[str] | None = None  # llama2: which model's score each item got
    std: list[float] | None = None  # ensemble: the models' disagreement on each item


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def llama2_choice(safety_score: float, flagged: bool, threshold: float) -> bool:
    """True when the safety model's score is the one to use."""
    return flagged or sigmoid(safety_score) < threshold


def weighted_sum(whitened: list[list[float]], weights: tuple[float, ...]) -> list[float]:
    """whitened[m][i]: model m's whitened score of item i."""
    return [sum(w * column[i] for w, column in zip(weights, whitened)) for i in range(len(whitened[0]))]


def mean_and_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def combine(combination: Combination, raw: dict[str, list[float]], statistics: dict[str, RewardStatistics],
            flagged: list[bool]) -> Combined:
    """raw[model]: that model's raw scores, item by item; flagged: each item's `safety` flag."""
    def whitened(model: str) -> list[float]:
        stats = statistics[model]
        return [whiten(s, stats.mean, stats.std) for s in raw[model]]

    if combination.kind == "llama2":
        helpful, safety = combination.models
        use_safety = [llama2_choice(s, f, combination.threshold) for s, f in zip(raw[safety], flagged)]
        chosen = [safety if u else helpful for u in use_safety]
        scores = [raw[model][i] for i, model in enumerate(chosen)]
        rewards = [whiten(s, statistics[m].mean, statistics[m].std) for s, m in zip(scores, chosen)]
        return Combined(scores, rewards, chosen=chosen)
    if combination.kind == "gate":
        model, gate = combination.models
        passes = [g > 0.5 for g in raw[gate]]
        rewards = [w if ok else combination.otherwise for w, ok in zip(whitened(model), passes)]
        return Combined(list(raw[model]), rewards)
    columns = [whitened(m) for m in combination.models]
    if combination.kind == "sum":
        total = weighted_sum(columns, combination.weights)
        return Combined(total, total)
    moments = [mean_and_std([column[i] for column in columns]) for i in range(len(columns[0]))]
    means, stds = [m for m, _ in moments], [s for _, s in moments]
    lam = combination.conservative_lambda
    rewards = means if lam is None else [m - lam * s for m, s in moments]
    return Combined(means, rewards, std=stds)


# -- one model's several outputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """How the reward is made of a model's named outputs: one of them (`name`), or a weighted sum (`weights`)."""

    name: str | None = None
    weights: dict[str, float] | None = None

    def vector(self, names: list[str], model: str) -> tuple[list[float], str]:
        """The weight of each output, and the formula as /info shows it; a StartupError names what to fix."""
        if self.weights:
            unknown = sorted(set(self.weights) - set(names))
            if unknown:
                raise StartupError(f"--objective-weights names {', '.join(unknown)}, not outputs of model {model!r}"
                                   f" (its outputs: {', '.join(names)})")
            return [self.weights.get(n, 0.0) for n in names], " + ".join(f"{w:g}*{n}" for n, w in self.weights.items())
        if self.name:
            if self.name not in names:
                raise StartupError(f"--objective {self.name} is not an output of model {model!r} (its outputs:"
                                   f" {', '.join(names)})")
            return [float(n == self.name) for n in names], self.name
        raise StartupError(f"model {model!r} has {len(names)} outputs ({', '.join(names)}); choose its reward with"
                           f" --objective NAME or --objective-weights {names[0]}=0.5,{names[-1]}=0.5")
