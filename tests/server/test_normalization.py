import math

import pytest

from rewardserve.server.normalization import (LengthFit, RewardStatistics, RewardTransform, fit_length, log_sigmoid,
                                              whiten)


def test_whiten_by_hand():
    assert whiten(3.0, mean=1.0, std=4.0) == 0.5
    stats = RewardStatistics(1.0, 2.0, "checkpoint")
    assert RewardTransform("whiten", stats).apply([1.0, 3.0, -1.0]) == [0.0, 1.0, -1.0]


def test_log_sigmoid_by_hand_and_without_overflow():
    assert log_sigmoid(0.0) == pytest.approx(math.log(0.5))
    assert log_sigmoid(2.0) == pytest.approx(math.log(1 / (1 + math.exp(-2.0))))
    assert log_sigmoid(-1000.0) == pytest.approx(-1000.0)
    assert log_sigmoid(1000.0) == 0.0
    assert RewardTransform("logsigmoid", beta=0.5).apply([0.0]) == [pytest.approx(0.5 * math.log(0.5))]


def test_raw_is_identity_and_whiten_needs_statistics():
    assert RewardTransform("raw").apply([1.5, -2.0]) == [1.5, -2.0]
    with pytest.raises(ValueError, match="statistics"):
        RewardTransform("whiten")
    with pytest.raises(ValueError, match="positive std"):
        RewardStatistics(0.0, 0.0, "x")


def test_describe_states_what_was_used():
    described = RewardTransform("whiten", RewardStatistics(0.5, 2.0, "server flags")).describe()
    assert described == {"name": "whiten", "statistics": {"mean": 0.5, "std": 2.0, "source": "server flags"},
                         "beta": None, "length_fit": None}


def test_length_fit_is_least_squares_by_hand():
    # scores 1, 3, 5 at lengths 10, 20, 30: slope 0.2, mean length 20
    fit = fit_length([10, 20, 30], [1.0, 3.0, 5.0])
    assert fit.slope == pytest.approx(0.2) and fit.mean_length == 20 and fit.responses == 3
    assert fit_length([7, 7], [1.0, 2.0]).slope == 0.0  # no spread in length: no trend to remove
    with pytest.raises(ValueError, match="as many lengths"):
        fit_length([1, 2], [1.0])


def test_debias_removes_the_trend_and_keeps_the_rest():
    fit = LengthFit(slope=0.2, mean_length=20, responses=3)
    transform = RewardTransform("debias", length_fit=fit)
    # 5 at length 30 -> 5 - 0.2 * 10 = 3; 1 at length 10 -> 1 + 2 = 3; at the mean length a score is unchanged
    assert transform.apply([5.0, 1.0, 4.0], lengths=[30, 10, 20]) == [pytest.approx(3.0), pytest.approx(3.0), 4.0]
    assert transform.describe()["length_fit"] == {"slope": 0.2, "mean_length": 20, "responses": 3}
    assert transform.needs_lengths
    with pytest.raises(ValueError, match="response length"):
        transform.apply([1.0])
    with pytest.raises(ValueError, match="length fit"):
        RewardTransform("debias")
