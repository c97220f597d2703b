"""Hand-computed values for the Bradley–Terry objective and its evaluation."""
import math

import pytest
import torch

from rewardserve.trainer.rm.preference import (bradley_terry_loss, brier_score, expected_calibration_error,
                                            label_log_likelihood, length_only_accuracy, pairwise_accuracy,
                                            pairwise_wins, pearson, reward_statistics)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_equal_scores_cost_ln2():
    assert bradley_terry_loss(t(0.3, -1.0), t(0.3, -1.0)).item() == pytest.approx(math.log(2))


def test_plain_loss_by_hand():
    # d = 1: -log(1/(1+e^-1)) = log(1 + e^-1) = 0.31326; d = -2: log(1 + e^2) = 2.12693
    assert bradley_terry_loss(t(1.0, 0.0), t(0.0, 2.0)).item() == pytest.approx((0.313262 + 2.126928) / 2, abs=1e-6)


def test_margin_is_subtracted_inside_the_sigmoid():
    # d = 2, m = 1 -> log(1 + e^-1) = 0.313262
    assert bradley_terry_loss(t(2.0), t(0.0), margin=t(1.0)).item() == pytest.approx(0.313262, abs=1e-6)


def test_soft_labels_are_the_expected_log_likelihood():
    # d = 1, p = 0.75: 0.75 * log(1 + e^-1) + 0.25 * log(1 + e^1) = 0.75 * 0.313262 + 0.25 * 1.313262
    value = bradley_terry_loss(t(1.0), t(0.0), p_chosen=t(0.75)).item()
    assert value == pytest.approx(0.75 * 0.313262 + 0.25 * 1.313262, abs=1e-6)
    # p = 0.5 makes the pair uninformative: the loss is symmetric in d
    assert bradley_terry_loss(t(1.0), t(0.0), p_chosen=t(0.5)).item() == pytest.approx(
        bradley_terry_loss(t(0.0), t(1.0), p_chosen=t(0.5)).item())


def test_centering_penalises_the_sum():
    # d = 0 -> ln 2; (1 + 1)^2 = 4, times 0.01
    assert bradley_terry_loss(t(1.0), t(1.0), center_coef=0.01).item() == pytest.approx(math.log(2) + 0.04)


def test_accuracy_statistics_and_length_baseline():
    assert pairwise_accuracy(t(1, 2, 3, 0), t(0, 3, 3, -1)) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert reward_statistics(t(1, 2, 3, 4)) == pytest.approx((2.5, math.sqrt(1.25)))
    assert length_only_accuracy([10, 5, 7], [3, 9, 7]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0) and pearson([1, 1], [2, 3]) == 0.0


def test_calibration_error_by_hand():
    # d = 0 -> p = .5 -> confidence .5, and a tie is right half the time (as accuracy counts it): ECE 0.
    # d = ln 3 -> p = .75, right: ECE .25
    assert expected_calibration_error(t(0.0), t(0.0)) == pytest.approx(0.0)
    assert expected_calibration_error(t(*[0.0] * 100), t(*[0.0] * 100)) == pytest.approx(0.0)
    assert pairwise_accuracy(t(*[0.0] * 100), t(*[0.0] * 100)) == pytest.approx(0.5)
    assert expected_calibration_error(t(math.log(3)), t(0.0)) == pytest.approx(0.25)


def test_a_soft_label_names_the_winner_for_every_metric():
    """(c, r, p 1) and (r, c, p 0) are the same preference: the same accuracy, gap, calibration, likelihood."""
    chosen, rejected, one = t(2.0, 1.0, -1.0), t(0.0, 1.5, 0.0), t(1.0, 1.0, 1.0)
    as_listed = (pairwise_accuracy(chosen, rejected, one), expected_calibration_error(chosen, rejected, one),
                 label_log_likelihood(chosen, rejected, one), brier_score(chosen, rejected, one))
    swapped = (pairwise_accuracy(rejected, chosen, 1 - one), expected_calibration_error(rejected, chosen, 1 - one),
               label_log_likelihood(rejected, chosen, 1 - one), brier_score(rejected, chosen, 1 - one))
    assert as_listed == pytest.approx(swapped)
    assert as_listed[0] == pytest.approx(1 / 3)
    assert pairwise_wins(rejected, chosen, 1 - one).item() == pairwise_wins(chosen, rejected).item() == 1.0


def test_log_likelihood_and_brier_score_by_hand():
    # d = ln 3: sigmoid .75. Label p = .75: .75 ln .75 + .25 ln .25 = -0.5623; Brier 0. Label 1: ln .75, (.25)^2
    d, zero = t(math.log(3)), t(0.0)
    assert label_log_likelihood(d, zero, t(0.75)) == pytest.approx(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert brier_score(d, zero, t(0.75)) == pytest.approx(0.0, abs=1e-12)
    assert label_log_likelihood(d, zero) == pytest.approx(math.log(0.75)) and brier_score(d, zero) == pytest.approx(1 / 16)


def test_a_margin_with_a_coin_flip_label_keeps_the_optimum_at_zero():
    """Whichever side wins must win by the margin: at p = 0.5 the loss is symmetric in d, so its gradient at d = 0
    is zero (subtracting m before the soft loss put the optimum at d = m = 1)."""
    d = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(d, t(0.0), margin=t(1.0), p_chosen=t(0.5)).backward()
    assert d.grad.item() == pytest.approx(0.0, abs=1e-12)
    # a hard label is Llama 2's loss: -log sigmoid(d - m)
    assert bradley_terry_loss(t(2.0), t(0.0), margin=t(1.0), p_chosen=t(1.0)).item() == pytest.approx(0.313262, abs=1e-6)


def test_the_wilson_interval_by_hand():
    from rewardserve.trainer.rm.preference import wilson_interval

    # 80 of 100: centre (0.8 + 1.96^2/200) / (1 + 1.96^2/100) = 0.7889; half-width 0.0777
    low, high = wilson_interval(0.8, 100)
    assert (round(low, 4), round(high, 4)) == (0.7112, 0.8666)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_the_report_says_when_its_accuracy_cannot_be_told_from_a_coin_or_length():
    from rewardserve.trainer.rm.train import report_context

    report = {"pairs": 20, "accuracy": 0.6, "accuracy_interval": [0.387, 0.781], "length_only_accuracy": 0.55,
              "length_bias": {"raw": {"agrees_with_length": 0.378}, "debiased": {"agrees_with_length": 0.791}}}
    notes = report_context(report)
    assert len(notes) == 3 and "includes 0.5" in notes[0] and "length-only baseline (0.550)" in notes[1]
    assert "0.378 -> 0.791" in notes[2] and "measures length" in notes[2]
    clear = report | {"accuracy_interval": [0.81, 0.9], "length_bias": {"raw": {"agrees_with_length": 0.6},
                                                                       "debiased": {"agrees_with_length": 0.55}}}
    assert report_context(clear) == []
