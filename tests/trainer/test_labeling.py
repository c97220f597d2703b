"""The judge's figures by hand: its position bias and content signal, in logits, and its mass on the answers."""
from __future__ import annotations

import math

import pytest
import torch

from rewardserve.trainer import labeling


def test_bias_and_signal_are_recovered_from_the_two_orders(monkeypatch):
    """A judge with content signal s = 0.4 (the first is better) and a bias b = 2.0 towards the letter A answers
    P(A) = sigmoid(s + b) with the first shown as A, and P(A) = sigmoid(-s + b) with the second shown as A."""
    s, b = torch.tensor([0.4, -0.2]), torch.tensor([2.0, 2.0])
    answers = iter([(torch.sigmoid(s + b), torch.tensor([0.3, 0.5])), (torch.sigmoid(-s + b), torch.tensor([0.5, 0.7]))])
    monkeypatch.setattr(labeling, "p_first_wins", lambda *args: next(answers))
    verdicts = labeling.judge_both_orders(None, None, ["q", "q"], ["x", "y"], ["y", "x"], "", 2, "cpu")
    assert [v.position_bias for v in verdicts] == pytest.approx([2.0, 2.0], abs=1e-5)
    assert [v.content_signal for v in verdicts] == pytest.approx([0.4, -0.2], abs=1e-5)
    assert [v.p_first for v in verdicts] == pytest.approx([1 / (1 + math.exp(-0.4)), 1 / (1 + math.exp(0.2))], abs=1e-5)
    assert not any(v.consistent for v in verdicts)  # the bias makes both orders pick A
    assert labeling.judge_figures(verdicts) == pytest.approx(
        {"judge_position_bias_logit": 2.0, "judge_content_signal_logit": 0.3, "judge_answer_mass": 0.5}, abs=1e-4)
