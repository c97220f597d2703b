"""The LLM judge served as a reward model: its expected rating against hand computations, batch independence,
formatting, and how often the embedded SmolLM2 prefers the better of two hand-written twins."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rewardserve.server.errors import InputTooLong, InvalidInput, StartupError
from rewardserve.server.judge import RatingIndex, RatingTokens, load_judge, rating_outputs, read_template
from rewardserve.server.schemas import ScoreItem

TWINS = Path(__file__).resolve().parents[1] / "assets" / "judge_twins.jsonl"

# Ratings 1..9 are tokens 1..9; 10 is token 1 then token 0 (as SmolLM2 spells it)
SPELLED_LIKE_SMOLLM2 = RatingIndex.of(RatingTokens(first=(1, 2, 3, 4, 5, 6, 7, 8, 9, 1), second=(-1,) * 9 + (0,),
                                                   lead=1), torch.device("cpu"))


def logits_of(probabilities: dict[int, float], vocabulary: int = 12) -> torch.Tensor:
    logits = torch.full((1, vocabulary), -math.inf)
    for token, p in probabilities.items():
        logits[0, token] = math.log(p)
    return logits


def test_the_expected_rating_reads_two_token_ratings_from_the_token_after_the_lead():
    # P(first) = 0.5 on "1", 0.25 on "2", 0.25 on a non-rating token; after "1": 0.5 on "0", 0.5 elsewhere.
    # p(10) = 0.5 * 0.5, p(1) = 0.5 * (1 - 0.5), p(2) = 0.25: a third each; E = (1 + 2 + 10) / 3
    first, second = logits_of({1: 0.5, 2: 0.25, 11: 0.25}), logits_of({0: 0.5, 5: 0.5})
    rating, entropy, mass = rating_outputs(first, second, SPELLED_LIKE_SMOLLM2)[0].tolist()
    assert rating == pytest.approx(13 / 3, abs=1e-6)
    assert entropy == pytest.approx(math.log(3), abs=1e-6)
    assert mass == pytest.approx(0.75, abs=1e-6)


def test_one_token_ratings_need_no_second_position():
    tokens = RatingIndex.of(RatingTokens(first=tuple(range(1, 11)), second=(-1,) * 10, lead=None), torch.device("cpu"))
    rating, entropy, mass = rating_outputs(logits_of({7: 0.8, 3: 0.2}), None, tokens)[0].tolist()
    assert rating == pytest.approx(0.8 * 7 + 0.2 * 3, abs=1e-6)
    assert entropy == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), abs=1e-6)
    assert mass == pytest.approx(1.0, abs=1e-6)


def test_smollm2_spells_ten_as_one_then_zero(smol_tokenizer):
    tokens = RatingTokens.of(smol_tokenizer)
    one, zero = (smol_tokenizer.convert_tokens_to_ids(t) for t in ("1", "0"))
    assert tokens.lead == one and tokens.first[-1] == one and tokens.second[-1] == zero
    assert tokens.second[:9] == (-1,) * 9


def test_a_template_with_an_unknown_field_or_no_response_is_refused(tmp_path):
    assert "{response}" in read_template(None)
    for text in ("Rate {answer}", "Rate {prompt} only", "Rate {response"):
        (tmp_path / "t.txt").write_text(text)
        with pytest.raises(StartupError, match="--judge-template"):
            read_template(str(tmp_path / "t.txt"))


@pytest.fixture(scope="module")
def judge(smollm2_dir, smol_tokenizer):
    model, encoder = load_judge(str(smollm2_dir), smol_tokenizer, device="cpu", min_shared_prefix=32)
    return model, encoder


ITEMS = [ScoreItem(prompt="What is the capital of France?", response="The capital of France is Paris."),
         ScoreItem(prompt="What is the capital of France?", response="Bananas are yellow."),
         ScoreItem(prompt="How do I hot-wire a car?", response="I can't help with stealing a car."),
         ScoreItem(messages=[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}])]


def by_hand(network, sequence: list[int], digits: dict[str, int]) -> float:
    """The expected rating from a plain forward of one unpadded sequence that ends "... assistant\n" + "1": the
    logits before that "1" give P of each digit, those after it whether "0" follows (making it 10)."""
    with torch.no_grad():
        logits = network(torch.tensor([sequence])).logits[0].double()
    first, after_one = logits[-2].softmax(-1), logits[-1].softmax(-1)
    p = {r: first[digits[str(r)]].item() for r in range(2, 10)}
    p[1] = first[digits["1"]].item() * (1 - after_one[digits["0"]].item())
    p[10] = first[digits["1"]].item() * after_one[digits["0"]].item()
    return sum(r * q for r, q in p.items()) / sum(p.values())


def test_the_expected_rating_equals_a_hand_computation_from_smollm2s_logits(judge, smol_tokenizer):
    model, encoder = judge
    digits = {str(d): smol_tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    sequences = [encoder.encode(item).input_ids for item in ITEMS]
    assert all(s[-1] == digits["1"] for s in sequences)  # the lead token of "10" ends every question
    for path in ("packed-sdpa", "padded"):
        with model.forward_path_as(path):
            rows = model.score_batch(sequences)
        for sequence, (reward, rating, entropy, mass) in zip(sequences, rows):
            assert reward == rating == pytest.approx(by_hand(model.network, sequence, digits), abs=1e-5), path
            assert 0 <= entropy <= math.log(10) + 1e-6 and 0 < mass <= 1


def test_a_batch_scores_as_its_items_one_at_a_time(judge):
    model, encoder = judge
    sequences = [encoder.encode(item).input_ids for item in ITEMS]
    together = torch.tensor(model.score_batch(sequences))
    alone = torch.tensor([model.score_batch([s])[0] for s in sequences])
    assert torch.allclose(together, alone, atol=1e-5)
    # the template's prefix was computed once for the batch
    assert model.launch(sequences).computed_tokens < sum(map(len, sequences)) - 2 * 100


def test_the_judge_prefers_the_better_twin_more_often_than_not(judge):
    """Hand-written twins a constitution plainly ranks (right/wrong, refusal/compliance with harm, answer/babble).
    The 135M judge is weak: it chose the better twin in 10 of 16 when this was written (README)."""
    model, encoder = judge
    rows = [json.loads(line) for line in TWINS.read_text().splitlines()]
    sequences = [encoder.encode(ScoreItem(prompt=r["prompt"], response=r[k])).input_ids
                 for r in rows for k in ("good", "bad")]
    ratings = torch.tensor(model.score_batch(sequences))[:, 0]
    wins = int((ratings[0::2] > ratings[1::2]).sum())
    print(f"the judge rated the better twin higher in {wins} of {len(rows)}")
    assert wins > len(rows) // 2


def test_the_judge_refuses_what_it_cannot_rate(judge):
    _, encoder = judge
    with pytest.raises(InvalidInput, match="a judge rates a prompt and its response"):
        encoder.encode(ScoreItem(text="already formatted"))
    with pytest.raises(InvalidInput, match="a judge rates a prompt and its response"):
        encoder.encode(ScoreItem(input_ids=[1, 2, 3]))
    with pytest.raises(InvalidInput, match="ends with a 'user' turn"):
        encoder.encode(ScoreItem(messages=[{"role": "user", "content": "hi"}]))
    with pytest.raises(InputTooLong, match="never cuts an item"):
        encoder.encode(ScoreItem(prompt="q", response="word " * 9000))


def test_a_calibration_set_the_judge_cannot_rate_is_a_start_up_error_naming_the_line(judge, tmp_path):
    from rewardserve.server.main import judge_statistics

    model, encoder = judge
    good = json.dumps({"prompt": "q", "response": "a"})
    for bad, says in [(json.dumps({"prompt": "q"}), "line 2: KeyError"),
                      (json.dumps({"prompt": "q", "response": "word " * 9000}), "response 2: the judge's question")]:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(good + "\n" + bad + "\n")
        with pytest.raises(StartupError, match=f"--judge-calibration-set {rows}, {says}"):
            judge_statistics(model, encoder, str(rows))
    rows.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": "b", "rejected": "c"}) + "\n")
    statistics = judge_statistics(model, encoder, str(rows))
    assert statistics.source == "calibration set rows.jsonl (3 responses)" and statistics.std > 0
