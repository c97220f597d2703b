"""The combinations against hand-computed values, and their parsing and start-time checks."""
import math

import pytest

from rewardserve.server.combinations import Combination, combine, llama2_choice
from rewardserve.server.normalization import RewardStatistics

STATS = {"helpful": RewardStatistics(1.0, 2.0, "checkpoint"), "safety": RewardStatistics(-1.0, 0.5, "checkpoint"),
         "third": RewardStatistics(0.0, 1.0, "checkpoint")}


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_llama2_rule_picks_the_documented_branch():
    rule = Combination.parse("safe=llama2 helpful=helpful safety=safety threshold=0.15")
    assert rule.models == ("helpful", "safety") and rule.threshold == 0.15
    # item 0: sigmoid(s_safety) = 0.10 < 0.15 -> safety; item 1: 0.20 >= 0.15 -> helpful;
    # item 2: 0.90, but flagged safety-relevant -> safety; item 3: just above the threshold -> helpful
    safety = [logit(0.10), logit(0.20), logit(0.90), logit(0.1501)]
    helpful = [3.0, 5.0, -1.0, 0.0]
    result = combine(rule, {"helpful": helpful, "safety": safety}, STATS, flagged=[False, False, True, False])
    assert result.chosen == ["safety", "helpful", "safety", "helpful"]
    assert result.scores == [safety[0], 5.0, safety[2], 0.0]
    # whitened with the chosen model's statistics: (s + 1) / 0.5 for safety, (s - 1) / 2 for helpful
    assert result.rewards == pytest.approx([(safety[0] + 1) / 0.5, 2.0, (safety[2] + 1) / 0.5, -0.5])
    assert llama2_choice(logit(0.1499), False, 0.15) and not llama2_choice(logit(0.1501), False, 0.15)


def test_weighted_sum_of_whitened_scores_by_hand():
    mix = Combination.parse("mix=sum 0.7*helpful 0.3*safety")
    result = combine(mix, {"helpful": [3.0, 1.0], "safety": [-1.0, 0.0]}, STATS, flagged=[False, False])
    # item 0: 0.7 * (3 - 1) / 2 + 0.3 * (-1 + 1) / 0.5 = 0.7; item 1: 0.7 * 0 + 0.3 * 1 / 0.5 = 0.6
    assert result.rewards == pytest.approx([0.7, 0.6]) and result.scores == result.rewards
    assert Combination.parse("even=sum helpful safety").weights == (1.0, 1.0)


def test_ensemble_mean_std_and_conservative_reward_by_hand():
    ensemble = Combination.parse("ens=ensemble helpful safety third lambda=0.5")
    # whitened: helpful (5 - 1) / 2 = 2, safety (-0.5 + 1) / 0.5 = 1, third 0 -> mean 1, std sqrt(2/3)
    result = combine(ensemble, {"helpful": [5.0], "safety": [-0.5], "third": [0.0]}, STATS, flagged=[False])
    assert result.scores == pytest.approx([1.0]) and result.std == pytest.approx([math.sqrt(2 / 3)])
    assert result.rewards == pytest.approx([1.0 - 0.5 * math.sqrt(2 / 3)])
    plain = combine(Combination.parse("e=ensemble helpful safety third"),
                    {"helpful": [5.0], "safety": [-0.5], "third": [0.0]}, STATS, flagged=[False])
    assert plain.rewards == pytest.approx([1.0]) and plain.std == pytest.approx([math.sqrt(2 / 3)])


@pytest.mark.parametrize("spec, message", [
    ("safe", "NAME=KIND"),
    ("safe=llama2 helpful=a", "helpful=MODEL safety=MODEL"),
    ("safe=llama2 helpful=a safety=b threshold=2", r"lies in \(0, 1\)"),
    ("mix=sum", "WEIGHT\\*MODEL"),
    ("mix=sum x*a", "could not convert|x"),
    ("e=ensemble a", "two or more"),
    ("e=ensemble a b lambda=-1", "at least 0"),
    ("m=median a b", "unknown kind 'median'"),
])
def test_bad_specs_say_how_to_write_them(spec, message):
    with pytest.raises(ValueError, match=message):
        Combination.parse(spec)


def test_start_checks_name_the_fix():
    rule = Combination.parse("safe=llama2 helpful=helpful safety=safety")
    with pytest.raises(ValueError, match="not among the models served"):
        rule.check({"helpful": STATS["helpful"]})
    with pytest.raises(ValueError, match="safety has no reward statistics"):
        rule.check({"helpful": STATS["helpful"], "safety": None})
    rule.check(STATS)
