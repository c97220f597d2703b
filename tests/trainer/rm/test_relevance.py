"""The relevance judge: the embedded sentence encoder scores answers to a question, one at a time."""
from __future__ import annotations

import math

import pytest
import torch

from rewardserve.trainer.rm import labeling


def test_a_pointwise_verdict_is_the_score_gap_over_the_temperature():
    verdicts = labeling.pointwise_verdicts(torch.tensor([0.8, 0.5, 0.2]), torch.tensor([0.6, 0.5, 0.3]), 0.1)
    assert [v.content_signal for v in verdicts] == pytest.approx([2.0, 0.0, -1.0], abs=1e-5)
    assert [v.p_first for v in verdicts] == pytest.approx([1 / (1 + math.exp(-2)), 0.5, 1 / (1 + math.exp(1))],
                                                          abs=1e-5)
    # shown in no order, so it never contradicts itself and has no position bias
    assert all(v.consistent and v.consistent_debiased and v.position_bias == 0 for v in verdicts)
    assert labeling.judge_figures(verdicts) == {"judge_position_bias_logit": 0.0, "judge_content_signal_logit": 1.0,
                                                "judge_answer_mass": None}
    rows = labeling.preference_rows(["p"] * 3, ["a", "b", "c"], ["x", "y", "z"], verdicts, "downweight")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a", "x"), ("b", "y"), ("z", "c")]


def test_the_encoder_prefers_the_answer_to_the_question(minilm_dir):
    from rewardserve.trainer.rm.relevance import RelevanceJudge

    judge = RelevanceJudge(str(minilm_dir), "cpu", batch_size=4)
    question = "How do I change a flat bicycle tyre?"
    answers = ["Take the wheel off, lever the tyre from the rim, replace the inner tube, then pump it up.",
               "Paris is the capital of France and has many museums.",
               ""]
    scores = judge.scores([question] * 3, answers)
    assert scores[0] > scores[1] + 0.2 and scores[2] == -1.0
    # padding plays no part: each score equals that answer scored alone (a batch of one, no padding)
    alone = torch.cat([judge.scores([question], [answer]) for answer in answers[:2]])
    assert scores[:2] == pytest.approx(alone, abs=1e-5)
