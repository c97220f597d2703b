"""Reading the preference formats people have, and reporting bad rows."""
import json
from collections import Counter

import pytest
import torch

from rewardserve.server.tokenization import ItemEncoder
from rewardserve.trainer.rm.data import (BadRow, DataReport, EncodedPair, PreferencePair, collate_pairs,
                                      length_bucketed_batches, pair_fingerprint, parse_row, read_pairs,
                                      split_train_eval, write_pairs)


def test_the_shared_format_with_margin():
    pair = parse_row({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 0.5})
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin, pair.p_chosen) == ("Q", "good", "bad", 0.5, None)


def test_trl_conversational_rows_with_and_without_prompt():
    user = [{"role": "user", "content": "Q"}]
    full = parse_row({"chosen": user + [{"role": "assistant", "content": "good"}],
                      "rejected": user + [{"role": "assistant", "content": "bad"}]})
    assert (full.prompt, full.chosen, full.rejected) == (user, "good", "bad")
    split = parse_row({"prompt": user, "chosen": [{"role": "assistant", "content": "good"}],
                       "rejected": [{"role": "assistant", "content": "bad"}]})
    assert (split.prompt, split.chosen) == (user, "good")


def test_raw_hh_rlhf_dialogues_split_at_the_last_assistant_turn():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to pick a lock?\n\nAssistant:"
    pair = parse_row({"chosen": prompt + " I can't help with that.", "rejected": prompt + " Sure, first..."})
    assert pair.prompt == prompt and pair.chosen == " I can't help with that."


def test_soft_labels():
    assert parse_row({"prompt": "Q", "chosen": "a", "rejected": "b", "p_chosen": 0.8}).p_chosen == 0.8


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "Q", "chosen": "a"}, "missing chosen/rejected"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "identical sides"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "empty response"),
    ({"chosen": "no turns", "rejected": "here"}, "missing prompt"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "p_chosen": 1.5}, "p_chosen outside"),
    ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "wrong field types"),
    ([{"chosen": "a", "rejected": "b"}], "not a JSON object"),
    (7, "not a JSON object"),
])
def test_bad_rows_name_their_reason(row, reason):
    with pytest.raises(BadRow, match=reason):
        parse_row(row)


def test_bad_rows_are_counted_not_dropped_silently(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a", "rejected": "a"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    report = DataReport()
    assert len(read_pairs([str(path)], report)) == 1
    assert report.summary() == {"read": 3, "used": 0, "truncated": 0,
                                "skipped": {"identical sides": 1, "not JSON": 1}, "not_sampled": 0, "notes": {}}


def test_split_is_the_documented_fixed_seed_shuffle():
    import random

    order = list(range(10))
    random.Random(0).shuffle(order)
    train, held_out = split_train_eval(list(range(10)), 0.1, seed=0)
    assert train == order[:9] and held_out == order[9:]


def test_split_keeps_the_pairs_of_one_prompt_on_one_side():
    pairs = [(prompt, k) for prompt in "abcdefghij" for k in range(3)]  # three pairs per prompt
    train, held_out = split_train_eval(pairs, 0.2, seed=0, group_of=lambda pair: pair[0])
    assert len(train) == 24 and len(held_out) == 6 and sorted(train + held_out) == pairs
    assert not {prompt for prompt, _ in train} & {prompt for prompt, _ in held_out}


def test_collate_puts_chosen_then_rejected_in_one_batch():
    pairs = [EncodedPair([1, 2, 3], [4], 1.0, None, False), EncodedPair([5], [6, 7], None, 0.7, False)]
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert batch.margin.tolist() == [1.0, 0.0] and batch.p_chosen.tolist() == pytest.approx([1.0, 0.7])
    assert collate_pairs(pairs, 0, use_margin=False).margin is None


def test_length_bucketing_keeps_similar_lengths_together_and_covers_everything():
    pairs = [EncodedPair([1] * n, [1], None, None, False) for n in torch.randint(1, 500, (400,)).tolist()]
    batches = length_bucketed_batches(pairs, batch_size=8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(400))
    padded = sum(len(b) * max(pairs[i].length for i in b) for b in batches)
    assert padded < 1.1 * sum(p.length for p in pairs)
    assert batches == length_bucketed_batches(pairs, batch_size=8, seed=0)


def test_an_explicit_prompt_must_match_the_conversations_turns():
    """A rejected conversation with another user turn is refused with or without a `prompt` field."""
    ask = [{"role": "user", "content": "Hi?"}]
    other = [{"role": "user", "content": "Something else?"}]
    yes, no = {"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": "Go away."}
    for row in ({"prompt": ask, "chosen": ask + [yes], "rejected": other + [no]},
                {"chosen": ask + [yes], "rejected": other + [no]}, {"prompt": "Hi?", "chosen": ask + [yes],
                                                                      "rejected": other + [no]}):
        with pytest.raises(BadRow, match="prompt"):
            parse_row(row)
    assert parse_row({"prompt": ask, "chosen": [yes], "rejected": ask + [no]}).prompt == ask  # answers alone are fine


def test_max_pairs_samples_across_every_file_and_the_report_adds_up(tmp_path):
    """24 pairs from two files of 20: both files give some (not the first file's head), seeded and reproducible;
    read counts every row, a bad one included, and the rows the sample left out are counted."""
    files = []
    for name in ("a", "b"):
        rows = [{"prompt": name, "chosen": f"{name}{i}", "rejected": "x"} for i in range(20)]
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in rows) + "[1, 2]\n")
    report = DataReport()
    pairs = read_pairs([str(f) for f in files], report, limit=24, seed=0)
    sources = Counter(pair.prompt for pair in pairs)
    assert len(pairs) == 24 and sources["a"] >= 4 and sources["b"] >= 4, sources
    assert report.read == 42 and report.not_sampled == 16 and report.skipped == {"not a JSON object (a JSON list)": 2}
    assert pairs == read_pairs([str(f) for f in files], DataReport(), limit=24, seed=0)
    assert pairs != read_pairs([str(f) for f in files], DataReport(), limit=24, seed=1)
    report.used = 24  # what encode_pairs counts
    assert report.describe() == ("42 rows read: 24 used, 16 left out by --max-pairs,"
                                 " 2 skipped (2 not a JSON object (a JSON list))")


def test_a_max_pairs_sample_of_a_training_file_is_independent_of_the_held_out_split(tmp_path):
    """Issue 45: `eval --max-pairs 40` on a 300-pair training file said 12 of 40 were trained pairs. The count was
    right; the sample was not a fair one: drawn from random.Random(seed) like the split's shuffle, it picked the
    pairs that the split had held out. 300 one-pair prompts, 10% held out: about 36 of 40 are trained pairs."""
    data = tmp_path / "train.jsonl"
    write_pairs([PreferencePair(f"prompt {i}", f"good {i}", f"bad {i}") for i in range(300)], data)
    pairs = read_pairs([str(data)], DataReport())
    trained, held_out = split_train_eval(pairs, 0.1, seed=0, group_of=lambda pair: pair.prompt)
    assert (len(trained), len(held_out)) == (270, 30)
    trained_fingerprints = {pair_fingerprint(pair) for pair in trained}
    for seed in range(3):  # the same seed for both, as `train` and `eval` use by default
        sample = read_pairs([str(data)], DataReport(), limit=40, seed=seed)
        trained_in_sample = sum(pair_fingerprint(pair) in trained_fingerprints for pair in sample)
        assert trained_in_sample >= 30, (seed, trained_in_sample)  # binomial(40, 0.9): below 30 once in 10^4


def test_written_pairs_read_back_the_same(tmp_path):
    pairs = [PreferencePair("p", "a", "b", margin=2.0), PreferencePair([{"role": "user", "content": "q"}], "c", "d",
                                                                       p_chosen=0.75)]
    write_pairs(pairs, tmp_path / "out.jsonl")
    assert read_pairs([str(tmp_path / "out.jsonl")], DataReport()) == pairs
    assert pair_fingerprint(pairs[0]) == pair_fingerprint(PreferencePair("p", "b", "a"))  # either side first
    assert pair_fingerprint(pairs[0]) != pair_fingerprint(PreferencePair("q", "a", "b"))


def test_a_pair_the_chat_template_cannot_take_is_skipped_with_its_reason(smol_tokenizer):
    from rewardserve.trainer.rm.data import encode_pairs

    encoder = ItemEncoder(smol_tokenizer, max_length=128)
    bot = [{"role": "bot", "content": "hi"}]
    report = DataReport()
    pairs = encode_pairs([PreferencePair(bot, "yes", "no"), PreferencePair("Hi", "Hello", "Go away")], encoder, report)
    assert len(pairs) == 1 and report.used == 1
    [(reason, count)] = report.skipped.items()
    assert count == 1 and "role 'bot' is not one chat templates know" in reason


def test_conversational_pairs_train_with_a_reward_model_that_has_no_chat_template(minilm_dir):
    """TRL's conversational rows with MiniLM's tokenizer (no chat template): every pair is encoded (all of them were
    skipped before), each side as its prompt + response would be."""
    from transformers import AutoTokenizer

    from rewardserve.server.schemas import ScoreItem
    from rewardserve.trainer.rm.data import encode_pairs

    encoder = ItemEncoder(AutoTokenizer.from_pretrained(minilm_dir), max_length=64, append_eos=False)
    user = [{"role": "user", "content": "Is fire hot? "}]
    rows = [parse_row({"chosen": user + [{"role": "assistant", "content": f"Yes, {k}."}],
                       "rejected": user + [{"role": "assistant", "content": f"No, {k}."}]}) for k in range(5)]
    report = DataReport()
    pairs = encode_pairs(rows, encoder, report)
    assert len(pairs) == 5 and not report.skipped
    assert pairs[0].chosen_ids == encoder.encode(ScoreItem(prompt="Is fire hot? ", response="Yes, 0.")).input_ids


def test_an_implicit_prompt_is_the_text_both_sides_begin_with_and_the_report_says_so():
    """TRL's implicit-prompt rows without an hh-style turn: the common beginning is the prompt (the space before
    the answers stays with them), as TRL's extract_prompt does."""
    report = DataReport()
    pair = parse_row({"chosen": "Q: what is 2+2? A: 4", "rejected": "Q: what is 2+2? A: 5"}, report)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q: what is 2+2? A:", " 4", " 5")
    assert report.notes == {"prompt taken as the text chosen and rejected begin with (TRL's implicit prompt)": 1}
    with pytest.raises(BadRow, match="share no leading text"):
        parse_row({"chosen": "yes", "rejected": "no"})


def test_ultrafeedback_scores_are_a_margin_when_asked_and_said_unused_otherwise():
    row = {"prompt": "Q", "chosen": "good", "rejected": "bad", "score_chosen": 8.0, "score_rejected": 5.5}
    report = DataReport()
    assert parse_row(row, report).margin is None
    assert "score_chosen / score_rejected not read" in next(iter(report.notes))
    assert parse_row(row, DataReport(), margin_from_scores=True).margin == 2.5
    assert parse_row(row | {"margin": 1.0}, DataReport(), margin_from_scores=True).margin == 1.0  # a margin wins
    swapped = DataReport()
    parse_row(row | {"score_chosen": 1.0}, swapped, margin_from_scores=True)
    assert swapped.notes == {"score_chosen below score_rejected (the scores contradict the order)": 1}
    labelled = DataReport()
    parse_row({"prompt": "Q", "chosen": "a", "rejected": "b", "label": 0.7}, labelled)
    assert "`label` not read" in next(iter(labelled.notes)) and "notes" in labelled.summary()
    assert "1 rows: `label` not read" in labelled.describe()


def test_a_sharegpt_row_names_the_shapes_that_are_accepted():
    with pytest.raises(BadRow, match="one conversation .*not a preference pair: send .*prompt, chosen, rejected"):
        parse_row({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})


def test_an_empty_held_out_side_names_its_cause_and_the_fix(tmp_path, smol_tokenizer):
    """31 pairs over 9 prompts at --eval-fraction 0.02: whole prompts stay on one side, so none is held out."""
    from rewardserve.trainer.rm.config import RMTrainConfig
    from rewardserve.trainer.rm.train import prepare_data

    rows = [{"prompt": f"Q{k % 9}", "chosen": f"good {k}", "rejected": f"bad {k}"} for k in range(31)]
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = RMTrainConfig(data=[str(path)], out=str(tmp_path / "rm"), eval_fraction=0.02)
    with pytest.raises(SystemExit, match="9 prompts at --eval-fraction 0.02 left it none of 31 pairs.*--eval-data"):
        prepare_data(config, ItemEncoder(smol_tokenizer, max_length=128))
