"""The judge's figures by hand: its position bias and content signal, in logits, and its mass on the answers."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from rewardserve.trainer.rm import labeling


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


def test_debiased_consistency_takes_the_mean_bias_off_each_order(monkeypatch):
    """Biases 2.0, 2.4 and 1.6 (mean 2.0): pair 1 (s = 0.4, bias at the mean) agrees with itself once the mean is
    off; pair 2 (s = 0.3 < |2.4 - 2.0|) does not; pair 3 (s = -0.5 > |1.6 - 2.0|) does. Raw, none agrees."""
    s, b = torch.tensor([0.4, 0.3, -0.5]), torch.tensor([2.0, 2.4, 1.6])
    answers = iter([(torch.sigmoid(s + b), torch.ones(3)), (torch.sigmoid(-s + b), torch.ones(3))])
    monkeypatch.setattr(labeling, "p_first_wins", lambda *args: next(answers))
    verdicts = labeling.judge_both_orders(None, None, ["q"] * 3, ["x", "y", "z"], ["y", "z", "x"], "", 3, "cpu")
    assert [v.consistent for v in verdicts] == [False, False, False]
    assert [v.consistent_debiased for v in verdicts] == [True, False, True]


def test_rows_soft_hard_and_what_an_inconsistent_verdict_does():
    sure = labeling.Verdict(p_first=0.3, consistent=False, consistent_debiased=True)
    unsure = labeling.Verdict(p_first=0.7, consistent=False, consistent_debiased=False)
    prompts, first, second = ["p", "q"], ["a", "b"], ["c", "d"]
    soft = labeling.preference_rows(prompts, first, second, [sure, unsure], "downweight")
    assert [(r["chosen"], r["rejected"], r["p_chosen"]) for r in soft] == [("c", "a", 0.7), ("b", "d", 0.6)]
    hard = labeling.preference_rows(prompts, first, second, [sure, unsure], "drop", labels="hard")
    assert [(r["chosen"], r["rejected"], r["p_chosen"]) for r in hard] == [("c", "a", 1.0)]


def test_the_shared_prefix_is_computed_once_and_changes_nothing(tmp_path, smol_tokenizer):
    """answer_logits reuses the cache of the prefix all sequences share; each sequence's logits equal its own
    unpadded, unshared forward."""
    from transformers import AutoModelForCausalLM

    from ...conftest import build_tiny_policy

    model = AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path, smol_tokenizer)).eval()
    prefix = [5, 17, 900, 42, 7, 311]
    sequences = [prefix + own for own in ([8, 9], [1000, 2, 3, 4, 5], [77], [6, 6, 6, 6])]
    assert labeling.shared_prefix_length(sequences) == 6 and labeling.shared_prefix_length([[1, 2], [1, 2]]) == 1
    prefix_forwards = []
    original = model.forward

    @functools.wraps(original)  # the signature tells answer_logits how this transformers names the cache
    def counting(*args, **kwargs):
        prefix_forwards.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    model.forward = counting
    letters, mass = labeling.answer_logits(model, sequences, [10, 20], smol_tokenizer.pad_token_id, 3, "cpu")
    assert prefix_forwards[0] == (1, 6) and [shape[1] for shape in prefix_forwards[1:]] == [5, 4]  # no prefix again
    with torch.no_grad():
        expected = torch.stack([original(input_ids=torch.tensor([s])).logits[0, -1] for s in sequences])
    assert torch.allclose(letters, expected[:, [10, 20]], atol=1e-4)
    assert torch.allclose(mass, expected.softmax(-1)[:, [10, 20]].sum(-1), atol=1e-5)


def test_rating_mode_labels_each_pair_by_the_gap_of_the_judges_expected_ratings(tmp_path, smol_tokenizer, smollm2_dir):
    """`rewardserve label --judge-mode rating`: the server's judge rates each sampled response once; a row's chosen
    response is the higher-rated one and p_chosen is sigmoid(gap / rating_temperature)."""
    import json

    from rewardserve.trainer.rm.config import LabelConfig

    from ...conftest import build_tiny_policy

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Name a fruit.", "What is 2 + 2?")))
    config = LabelConfig(prompts=str(prompts), out=str(tmp_path / "prefs.jsonl"), judge_mode="rating",
                         policy=str(build_tiny_policy(tmp_path / "policy", smol_tokenizer)), judge=str(smollm2_dir),
                         responses_per_prompt=2, max_new_tokens=8, rating_temperature=0.5, device="cpu")
    summary = labeling.main(config)
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert summary["judge_mode"] == "rating" and summary["pairs_judged"] == 2 and rows
    rate = labeling.rating_judge(str(smollm2_dir), labeling.load_constitution("builtin"), "cpu")
    for row in rows:
        chosen, rejected = rate([row["prompt"]] * 2, [row["chosen"], row["rejected"]]).tolist()
        assert chosen >= rejected
        assert row["p_chosen"] == pytest.approx(1 / (1 + math.exp(-(chosen - rejected) / 0.5)), abs=1e-4)
