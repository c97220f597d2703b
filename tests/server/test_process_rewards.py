"""Process reward models: each step's score equals a plain transformers forward of the item alone, read at the
step's end, for both head kinds, packed and padded, batched or alone, with and without a shared prompt."""
from __future__ import annotations

import pytest
import torch

from rewardserve.server.errors import InputTooLong, InvalidInput
from rewardserve.server.process_rewards import ProcessRewardModel, StepEncoder, StepIds
from rewardserve.server.steps import StepFormat, aggregate_steps, steps_of
from rewardserve.server.schemas import ScoreItem
from tests.conftest import tiny_config

PROMPT = "Compute 12 + 7 - 5 step by step.\n"
SOLUTIONS = [["12 + 7 = 19", "19 - 5 = 14"], ["12 + 7 = 18", "18 - 5 = 13", "The answer is 13."], ["12 + 7 = 19"]]
TAG, GOOD, BAD = " ки", 28, 29  # Math-Shepherd's tag; two token ids standing for its "+" and "-"


def build_prm(out, kind: str, tokenizer, labels: int = 2, seed: int = 0):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    torch.manual_seed(seed)
    config = tiny_config("bert" if kind == "bert" else "llama", len(tokenizer), tokenizer.pad_token_id)
    config.num_labels = labels
    if kind == "causal":
        config.initializer_range = 0.5  # peaked next-token logits: P(good) away from 0.5, differences that show
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForTokenClassification.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "bert", "causal"])
def prm(request, tmp_path_factory, smol_tokenizer, minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir) if request.param == "bert" else smol_tokenizer
    path = build_prm(tmp_path_factory.mktemp(f"prm-{request.param}"), request.param, tokenizer)
    step_format = StepFormat(tag=TAG if request.param == "causal" else None)
    model = ProcessRewardModel.load_prm(str(path), (GOOD, BAD) if request.param == "causal" else None,
                                        min_shared_prefix=4)
    return request.param, path, model, StepEncoder(tokenizer, model.max_length, step_format)


def plain_forward(kind: str, path, ids: list[int], ends: tuple[int, ...]) -> torch.Tensor:
    """What transformers gives for this one item, read at its step ends: P(label 1), or P(good) against P(bad)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    loader = AutoModelForCausalLM if kind == "causal" else AutoModelForTokenClassification
    network = loader.from_pretrained(path).eval()
    with torch.no_grad():
        logits = network(input_ids=torch.tensor([ids])).logits[0, list(ends)]
    if kind == "causal":
        return logits[:, [GOOD, BAD]].softmax(-1)[:, 0]
    return logits.softmax(-1)[:, 1]


def encoded(encoder: StepEncoder) -> list[StepIds]:
    return [encoder.encode(ScoreItem(prompt=PROMPT, steps=steps)).input_ids for steps in SOLUTIONS]


@pytest.mark.parametrize("path", ["packed-sdpa", "padded"])
def test_step_scores_equal_a_plain_forward_of_each_item_alone(prm, path):
    kind, folder, model, encoder = prm
    sequences = encoded(encoder)
    with model.forward_path_as(path):
        together = model.score_batch(sequences)  # one batch: the prompt shared (decoders, packed), padding (padded)
        alone = [model.score_batch([sequence])[0] for sequence in sequences]
    for sequence, steps, batched, single in zip(sequences, SOLUTIONS, together, alone):
        expected = plain_forward(kind, folder, list(sequence), sequence.step_ends)
        assert len(batched) == len(steps)
        assert torch.allclose(torch.tensor(batched), expected, atol=1e-5), (batched, expected)
        assert torch.allclose(torch.tensor(single), expected, atol=1e-5)
    assert max(abs(a - b) for scores in together for a, b in zip(scores, scores[1:]) if len(scores) > 1) > 1e-4


def test_items_sharing_the_prompt_compute_it_once_in_a_decoder(prm):
    kind, _, model, encoder = prm
    sequences = encoded(encoder)
    with model.forward_path_as("packed-sdpa"):
        pending = model.launch(sequences)
    shared = kind != "bert"  # an encoder's prompt states depend on the steps after them: never shared
    assert (pending.computed_tokens < sum(map(len, sequences))) == shared


def test_the_step_ends_are_the_markers_last_tokens(prm, smol_tokenizer):
    kind, _, _, encoder = prm
    sequence = encoder.encode(ScoreItem(prompt=PROMPT, steps=SOLUTIONS[1])).input_ids
    if encoder.marker_ids:
        assert [sequence[end] for end in sequence.step_ends] == [encoder.marker_ids[-1]] * 3
    else:  # BERT drops the newline: read at each step's last token, "19", "13" and "."
        assert encoder.tokenizer.convert_ids_to_tokens([sequence[end] for end in sequence.step_ends]) == \
            ["18", "13", "."]
    if encoder.tokenizer.bos_token_id is not None:
        assert sequence[0] == encoder.tokenizer.bos_token_id
    # a response split at the separator is the same item as its steps
    same = encoder.encode(ScoreItem(prompt=PROMPT, response="\n".join(SOLUTIONS[1]) + "\n")).input_ids
    assert same == sequence and same.step_ends == sequence.step_ends


def test_a_long_prompt_is_cut_from_the_left_and_steps_never(prm):
    _, _, model, encoder = prm
    short = StepEncoder(encoder.tokenizer, 40, encoder.step_format)
    item = short.encode(ScoreItem(prompt="many words " * 50, steps=SOLUTIONS[0]))
    assert item.truncated and len(item.input_ids) == 40
    assert item.input_ids[-len(short.encode_steps("", SOLUTIONS[0]).input_ids) + len(short.bos):] == \
        short.encode_steps("", SOLUTIONS[0]).input_ids[len(short.bos):]
    with pytest.raises(InputTooLong, match="steps take"):
        short.encode(ScoreItem(prompt="x", steps=["a long step of many words " * 4] * 3))


@pytest.mark.parametrize("item, message", [
    (dict(prompt="p", response="\n\n"), "no steps"),
    (dict(prompt="p", steps=["one\ntwo"]), "holds the step separator"),
    (dict(prompt="p", steps=["ok", "  "]), r"steps\[1\] is empty"),
    (dict(prompt="p", steps=["s"] * 129), "129 steps, over the limit of 128"),
    (dict(text="formatted"), "do not say where the steps end"),
    (dict(messages=[{"role": "user", "content": "q"}]), "a user turn and an assistant turn"),
])
def test_bad_steps_are_refused_with_what_to_fix(item, message):
    with pytest.raises(InvalidInput, match=message):
        steps_of(ScoreItem(**item), StepFormat())


def test_a_step_holding_the_tag_is_refused():
    with pytest.raises(InvalidInput, match="holds the step tag"):
        StepFormat(tag=TAG).check(["1 + 1 = 2 ки"])


def test_aggregates():
    scores = [0.9, 0.5, 0.8]
    assert [aggregate_steps(scores, how) for how in ("min", "last")] == [0.5, 0.8]
    assert aggregate_steps(scores, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_steps(scores, "product") == pytest.approx(0.36)
    assert aggregate_steps([0.7], "product") == 0.7
