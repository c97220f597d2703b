"""The checkable task that ships with the project, and prompt sets that carry their answers."""
from __future__ import annotations

import json

import pytest

from rewardserve.trainer import arithmetic
from rewardserve.trainer.prompts import load_prompts, load_references, prompt_key
from rewardserve.trainer.rl.ppo import scoring_items


def test_the_shipped_files_are_what_the_generator_writes(tmp_path):
    arithmetic.write(tmp_path)
    for name in arithmetic.files():
        assert (tmp_path / f"{name}.jsonl").read_text() == (arithmetic.ASSETS / f"{name}.jsonl").read_text()


def test_every_problem_has_its_answer_and_no_held_out_question_is_trained_on():
    train, held_out = load_prompts("builtin:arithmetic"), load_prompts("builtin:arithmetic-heldout")
    assert (len(train), len(held_out)) == (arithmetic.TRAIN, arithmetic.HELD_OUT)
    assert not set(train) & set(held_out)
    references = load_references("builtin:arithmetic") | load_references("builtin:arithmetic-heldout")
    for prompt in train + held_out:
        a, op, b = prompt.split("?")[0].removeprefix("What is ").split()
        assert references[prompt_key(prompt)] == str(int(a) + int(b) if op == "+" else int(a) - int(b))


def test_the_trainer_sends_each_prompt_s_reference_with_its_responses(tmp_path):
    rows = [{"prompt": "What is 2 + 2?", "reference": "4"}, {"prompt": "Say hi."},
            {"messages": [{"role": "user", "content": "What is 3 + 3?"}], "reference": 6}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts, references = load_prompts(str(path)), load_references(str(path))
    assert scoring_items(prompts, ["4", "hi", "6"], references) == [
        {"prompt": "What is 2 + 2?", "response": "4", "reference": "4"},
        {"prompt": "Say hi.", "response": "hi"},
        {"messages": [{"role": "user", "content": "What is 3 + 3?"}, {"role": "assistant", "content": "6"}],
         "reference": "6"}]


def test_a_prompt_with_two_references_is_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Q", "reference": "1"}\n{"prompt": "Q", "reference": "2"}\n')
    with pytest.raises(SystemExit, match="one prompt has two references"):
        load_references(str(path))
    with pytest.raises(SystemExit, match="the project's sets are builtin, builtin:arithmetic"):
        load_prompts("builtin:algebra")


def test_each_best_of_n_problem_has_one_right_answer_and_none_is_trained_on():
    rows = arithmetic.best_of_n_rows()
    trained = {row["prompt"] for row in arithmetic.chain_split()[0]}
    assert len(rows) == arithmetic.BEST_OF_PROMPTS and len({row["prompt"] for row in rows}) == len(rows)
    for row in rows:
        assert row["prompt"] not in trained and sum(row["correct"]) == 1 and len(row["responses"]) == 4
        assert len({tuple(response) for response in row["responses"]}) == 4  # four different answers
    assert {row["correct"].index(True) for row in rows} == {0, 1, 2, 3}  # the right one is anywhere
