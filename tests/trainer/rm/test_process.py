"""Process reward model training: the rows it reads, the ProcessBench measures by hand, and a real run whose
checkpoint the server scores exactly as training evaluated it."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from rewardserve.server.process_rewards import ProcessRewardModel, StepEncoder
from rewardserve.server.schemas import ScoreItem
from rewardserve.server.steps import StepFormat
from rewardserve.trainer import arithmetic
from rewardserve.trainer.rm.data import BadRow
from rewardserve.trainer.rm.process import earliest_error_f1, parse_stepwise_row, predicted_first_error
from tests.conftest import CLI


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "completions": "one", "labels": [True]}, "completions not a list"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, "a label count unlike"),
    ({"prompt": "p", "completions": ["a"], "labels": [1]}, "labels not a list of booleans"),
    ({"prompt": 3, "completions": ["a"], "labels": [True]}, "prompt not a string"),
])
def test_malformed_stepwise_rows_say_what_is_wrong(row, message):
    with pytest.raises(BadRow, match=message):
        parse_stepwise_row(row)


def test_first_error_and_earliest_error_f1_by_hand():
    assert parse_stepwise_row({"prompt": "p", "completions": ["a", "b", "c"], "labels": [True, False, False]}
                              ).first_error == 1
    assert predicted_first_error([0.9, 0.6, 0.3, 0.1]) == 2 and predicted_first_error([0.5, 0.7]) == -1
    # two solutions with an error (at 1 and 0), two without: found at 1 (right), said 2 for 0 (wrong), said none
    # for both correct ones (right, right) -> 1/2 and 2/2, F1 = 2 * 0.5 * 1 / 1.5
    scores = earliest_error_f1([1, 2, -1, -1], [1, 0, -1, -1])
    assert scores == {"erroneous_accuracy": 0.5, "correct_accuracy": 1.0, "f1": 0.6667, "erroneous": 2, "correct": 2}
    assert earliest_error_f1([-1, -1], [0, -1])["f1"] == 0.0  # "never an error" finds none


def test_every_shipped_chain_is_labelled_where_its_arithmetic_first_goes_wrong():
    for row in arithmetic.chain_split()[0] + arithmetic.chain_split()[1]:
        previous, wrong_at = int(row["prompt"].split()[1]), None
        for index, step in enumerate(row["completions"]):
            if step.startswith("The answer is"):
                said = int(step.removeprefix("The answer is ").rstrip("."))
                wrong = said != previous
            else:
                left, op, right, _, result = step.split()
                true = int(left) + int(right) if op == "+" else int(left) - int(right)
                wrong = int(left) != previous or int(result) != true
                previous = int(result)
            if wrong and wrong_at is None:
                wrong_at = index
        assert wrong_at == row["first_error"]
        assert row["labels"] == [wrong_at is None or i < wrong_at for i in range(len(row["labels"]))]


def test_a_trained_process_reward_model_is_served_as_it_was_evaluated(tmp_path, minilm_dir):
    """A real run on chains whose wrong steps say so (learnable in seconds): the held-out report finds the first
    errors, and the server's model, reading the checkpoint, judges the held-out steps exactly as the report did."""
    rows = [json.loads(line) for line in (arithmetic.ASSETS / "arithmetic-steps-train.jsonl").read_text().splitlines()]
    rows = [row | {"completions": [step + ("" if right else " (oops)")
                                   for step, right in zip(row["completions"], row["labels"])]} for row in rows[:250]]
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held-out.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows[:200]))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows[200:]))
    out = tmp_path / "prm"
    run = subprocess.run([*CLI, "train", "--objective", "prm", "--base", str(minilm_dir), "--data", str(train),
                          "--eval-data", str(held_out), "--out", str(out), "--epochs", "1", "--lr", "5e-5",
                          "--max-length", "64"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "eval_report.json").read_text())
    assert report["step_accuracy"] > 0.95 and report["earliest_error"]["f1"] > 0.9, report
    assert report["baselines"]["always_the_last_step"]["f1"] == 0.0
    assert "earliest-error F1" in run.stdout
    assert json.loads((out / "config.json").read_text())["reward_step_separator"] == "\n"

    from transformers import AutoTokenizer

    model = ProcessRewardModel.load_prm(str(out))
    encoder = StepEncoder(AutoTokenizer.from_pretrained(out), 64, StepFormat())
    sequences = [encoder.encode(ScoreItem(prompt=row["prompt"], steps=row["completions"])).input_ids
                 for row in rows[200:]]
    served = model.score_batch(sequences)
    judged = [(p >= 0.5) == label for row, scores in zip(rows[200:], served) for p, label in zip(scores, row["labels"])]
    assert round(sum(judged) / len(judged), 4) == report["step_accuracy"]
    assert all(torch.tensor(scores).isfinite().all() for scores in served)
