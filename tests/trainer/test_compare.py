"""The win rate's arithmetic: outcomes, ties, and the bootstrap interval over prompts."""
from __future__ import annotations

import pytest
import torch

from rewardserve.trainer.compare import answer, outcome, win_rate
from rewardserve.trainer.config import CompareConfig

from ..conftest import build_tiny_policy


def test_outcomes_count_a_tie_as_half():
    assert [outcome(2.0, 1.0), outcome(1.0, 1.0), outcome(0.5, 1.0)] == [1.0, 0.5, 0.0]


def test_known_scores_give_the_known_win_rate():
    a = [0.0, 1.0, 2.0, 3.0]
    b = [1.0, 1.0, 1.0, 1.0]  # wins, ties, loses, loses
    rate = win_rate([outcome(y, x) for x, y in zip(a, b)], [0, 1, 2, 3])
    assert rate.rate == pytest.approx(1.5 / 4) and (rate.wins, rate.ties, rate.losses) == (1, 1, 2)


def test_the_interval_is_the_bootstrap_of_the_prompts():
    always = win_rate([1.0] * 20, list(range(20)))
    assert (always.rate, always.low, always.high) == (1.0, 1.0, 1.0)
    # 200 prompts, half won: the interval is about 0.5 +- 1.96 sqrt(0.25 / 200) = 0.5 +- 0.069
    half = win_rate([1.0, 0.0] * 100, list(range(200)), seed=1)
    assert half.rate == 0.5 and 0.41 < half.low < 0.46 and 0.54 < half.high < 0.59


def test_a_prompt_s_samples_are_resampled_together():
    """Four samples per prompt that always agree carry one prompt's worth of evidence, not four: the interval is
    as wide as with one sample per prompt."""
    per_prompt = [1.0, 0.0] * 50
    one = win_rate(per_prompt, list(range(100)), seed=2)
    four = win_rate([o for o in per_prompt for _ in range(4)], [p for p in range(100) for _ in range(4)], seed=2)
    assert four.high - four.low == pytest.approx(one.high - one.low, abs=0.02)
    independent = win_rate([o for o in per_prompt for _ in range(4)], list(range(400)), seed=2)
    assert independent.high - independent.low < 0.7 * (four.high - four.low)


def test_identical_answers_are_counted_apart_from_ties(capsys):
    from rewardserve.trainer.compare import print_summary

    rate = {"rate": 0.5, "low": 0.4, "high": 0.6, "wins": 1, "ties": 2, "losses": 1}
    print_summary({"a": "A", "b": "B", "prompts": 4, "comparisons": 4, "reward": rate, "identical_answers": 2,
                   "mean_reward": {"a": 0.0, "b": 0.0}, "mean_length_tokens": {"a": 3.0, "b": 3.0}})
    printed = capsys.readouterr().out
    assert "identical answers (each a tie)" in printed and "2 of 4" in printed
    assert "note: 2 comparisons are of identical answers" in printed


def test_one_policy_answers_alike_with_the_paired_seed_and_apart_with_independent_samples(tmp_path, smol_tokenizer):
    """Issue 45: A and B sampled with one seed give near-identical policies identical answers (paired sampling, the
    default); --independent-samples samples B with the next seed."""
    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    prompts = [f"Tell me about {word}." for word in ("cats", "rain", "tea", "maps")]

    def answers(**flags):
        config = CompareConfig(policy_a=str(policy), policy_b=str(policy), reward_url="http://127.0.0.1:1",
                               max_new_tokens=8, samples=2, **flags)
        a, _ = answer(str(policy), prompts, config, torch.device("cpu"), config.seed)
        b, _ = answer(str(policy), prompts, config, torch.device("cpu"), config.seed + config.independent_samples)
        return sum(x == y for x, y in zip(a, b))

    assert answers() == 8
    assert answers(independent_samples=True) < 4


def test_best_of_n_picks_the_highest_reward_and_counts_right_picks():
    from rewardserve.trainer.best_of_n import pick, summary

    assert pick([0.2, 0.9, 0.9, 0.1]) == 1  # the first of equals
    rows = [{"correct": [False, True], "best_index": 1}, {"correct": [True, False, False, False], "best_index": 2}]
    assert summary(rows) == {"problems": 2, "picked_right": 0.5, "picked_right_interval": [0.0945, 0.9055],
                             "chance": 0.375, "first_response_right": 0.5}
    assert summary([{"best_index": 0}]) == {"problems": 1}
