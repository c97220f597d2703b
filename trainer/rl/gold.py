"""The overoptimisation monitor: the proxy reward the policy is trained on, against a gold reward it never sees.

Gao et al. (2022, "Scaling Laws for Reward Model Overoptimization") scored a policy's samples with a larger "gold"
reward model as it was optimised against a smaller proxy, and plotted both against the square root of the KL
distance from the initial policy: the proxy keeps rising while the gold rises, flattens, then falls. Every
`--gold-every` steps the same rollouts go to the gold server too; each evaluation is logged against sqrt(KL),
the policy with the best gold mean so far is kept, and with `--stop-on-gold-drop K` the run stops once the gold mean
has fallen K evaluations in a row while the proxy rose over them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class GoldEvaluation:
    step: int
    proxy: float  # the proxy reward's mean over the step's rollouts
    gold: float  # the gold reward's mean over the same rollouts
    kl: float  # mean KL(policy || reference) per sequence, in nats

    @property
    def sqrt_kl(self) -> float:
        return math.sqrt(max(self.kl, 0.0))


def evaluations_in(records: list[dict]) -> list[GoldEvaluation]:
    """The gold evaluations logged in metrics.jsonl records (the steps that had one)."""
    return [GoldEvaluation(r["step"], r["reward_mean"], r["gold/reward_mean"], r["kl"])
            for r in records if "gold/reward_mean" in r]


@dataclass(frozen=True)
class GoldVerdict:
    new_best: bool
    stop: bool
    metrics: dict


def gold_fell_while_proxy_rose(history: list[GoldEvaluation], drops: int) -> bool:
    """True when each of the last `drops` evaluations has a lower gold mean than the one before it, and the proxy
    ended those evaluations higher than it began them."""
    if drops <= 0 or len(history) < drops + 1:
        return False
    window = history[-(drops + 1):]
    gold_fell = all(later.gold < earlier.gold for earlier, later in zip(window, window[1:]))
    return gold_fell and window[-1].proxy > window[0].proxy


@dataclass
class GoldMonitor:
    every: int
    stop_on_drop: int | None = None
    history: list[GoldEvaluation] = field(default_factory=list)

    @classmethod
    def from_records(cls, every: int, stop_on_drop: int | None, records: list[dict]) -> "GoldMonitor":
        """A resumed run picks up the evaluations its metrics.jsonl already holds."""
        return cls(every, stop_on_drop, evaluations_in(records))

    @property
    def best(self) -> GoldEvaluation | None:
        return max(self.history, key=lambda e: e.gold, default=None)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def observe(self, evaluation: GoldEvaluation) -> GoldVerdict:
        previous_best = self.best
        self.history.append(evaluation)
        new_best = previous_best is None or evaluation.gold > previous_best.gold
        stop = self.stop_on_drop is not None and gold_fell_while_proxy_rose(self.history, self.stop_on_drop)
        metrics = {"gold/reward_mean": evaluation.gold, "gold/sqrt_kl": evaluation.sqrt_kl,
                   "gold/best_step": self.best.step, "gold/best_reward_mean": self.best.gold}
        return GoldVerdict(new_best, stop, metrics)


def plot_gold(history: list[GoldEvaluation], out_png: str | Path) -> Path | None:
    """Proxy and gold means against sqrt(KL), as Gao et al. plot them (two scales: the rewards' units differ)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not history:
        return None
    x = [e.sqrt_kl for e in history]
    figure, proxy_axis = plt.subplots(figsize=(5.5, 3.6))
    proxy_axis.plot(x, [e.proxy for e in history], marker=".", color="tab:blue", label="proxy")
    proxy_axis.set_xlabel("sqrt(KL from the reference), nats^0.5")
    proxy_axis.set_ylabel("proxy reward", color="tab:blue")
    gold_axis = proxy_axis.twinx()
    gold_axis.plot(x, [e.gold for e in history], marker=".", color="tab:orange", label="gold")
    gold_axis.set_ylabel("gold reward", color="tab:orange")
    best = max(history, key=lambda e: e.gold)
    gold_axis.axvline(best.sqrt_kl, color="tab:orange", alpha=0.3, linestyle="--")
    figure.suptitle(f"proxy vs gold reward (best gold at step {best.step})")
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return Path(out_png)
