"""Formatting and truncation rules, on the real SmolLM2 tokenizer (chat template) and a BERT tokenizer."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rewardserve.server.errors import InputTooLong, InvalidInput
from rewardserve.server.schemas import ScoreItem
from rewardserve.server.tokenization import ItemEncoder


def test_prompt_response_uses_the_chat_template_and_ends_with_eos(smol_tokenizer):
    encoder = ItemEncoder(smol_tokenizer, max_length=512)
    item = encoder.encode(ScoreItem(prompt="What is 2+2?", response="4"))
    text = smol_tokenizer.decode(item.input_ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n4<|im_end|>")
    assert item.input_ids[-1] == smol_tokenizer.eos_token_id and not item.truncated


def test_messages_and_prompt_response_give_the_same_ids(smol_tokenizer):
    encoder = ItemEncoder(smol_tokenizer, max_length=512)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert encoder.encode(ScoreItem(messages=messages)) == encoder.encode(ScoreItem(prompt="Hi", response="Hello!"))


def test_text_is_scored_as_given_plus_eos_and_input_ids_exactly(smol_tokenizer):
    encoder = ItemEncoder(smol_tokenizer, max_length=512)
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>"
    ids = encoder.encode(ScoreItem(text=text)).input_ids
    assert ids == smol_tokenizer(text, add_special_tokens=False)["input_ids"]  # already ends in EOS: nothing added
    assert encoder.encode(ScoreItem(text="plain")).input_ids[-1] == smol_tokenizer.eos_token_id
    assert encoder.encode(ScoreItem(input_ids=[5, 6, 7])).input_ids == [5, 6, 7]


def test_overflow_cuts_the_prompt_from_the_left_and_keeps_the_response(smol_tokenizer):
    encoder = ItemEncoder(smol_tokenizer, max_length=40)
    item = encoder.encode(ScoreItem(prompt="blah " * 200, response="The final answer is 42."))
    assert item.truncated and len(item.input_ids) == 40
    assert smol_tokenizer.decode(item.input_ids).endswith("The final answer is 42.<|im_end|>")


def test_overflow_error_mode_names_the_limit_and_the_fix(smol_tokenizer):
    encoder = ItemEncoder(smol_tokenizer, max_length=40, on_overflow="error")
    with pytest.raises(InputTooLong, match=r"items\[1\]: \d+ tokens, over max_length 40.*--on-overflow truncate"):
        encoder.encode_all([ScoreItem(text="short"), ScoreItem(text="long " * 100)])


def test_out_of_vocabulary_ids_are_refused(smol_tokenizer):
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        ItemEncoder(smol_tokenizer, 64).encode(ScoreItem(input_ids=[1, len(smol_tokenizer)]))


def test_encoder_models_keep_cls_and_sep(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    encoder = ItemEncoder(tokenizer, max_length=8, append_eos=False)
    full = encoder.encode(ScoreItem(prompt="a question here ", response="and its answer"))
    assert not encoder.has_chat_template
    assert full.input_ids[0] == tokenizer.cls_token_id and full.input_ids[-1] == tokenizer.sep_token_id
    with pytest.raises(InvalidInput, match="no chat template"):
        encoder.encode(ScoreItem(messages=[{"role": "user", "content": "x"}]))


@pytest.mark.parametrize("form", ["text", "prompt_response"])
def test_a_huge_text_is_cut_before_tokenizing_into_the_same_tokens(smol_tokenizer, form):
    """The shortcut must give exactly what tokenizing everything and truncating gives."""
    encoder = ItemEncoder(smol_tokenizer, max_length=64)
    words = " ".join(f"w{i % 97}-é{i % 13}" for i in range(20000))  # far over max_chars, some multi-byte text
    assert len(words) > 2 * encoder.max_chars
    item = ScoreItem(text=words) if form == "text" else ScoreItem(prompt=words, response="The answer is 42.")
    fast = encoder.encode(item)
    encoder.max_chars = 10**9  # the slow way: no cut
    assert fast == encoder.encode(item) and fast.truncated and len(fast.input_ids) == 64


def test_a_huge_text_is_cut_the_same_way_for_an_encoder(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    encoder = ItemEncoder(tokenizer, max_length=32, append_eos=False)
    item = ScoreItem(text=" ".join(f"token{i % 50} word" for i in range(5000)))
    fast = encoder.encode(item)
    encoder.max_chars = 10**9
    slow = encoder.encode(item)
    assert fast == slow and fast.input_ids[0] == tokenizer.cls_token_id


def test_a_huge_text_with_overflow_error_is_refused_without_tokenizing(smol_tokenizer):
    encoder = ItemEncoder(smol_tokenizer, max_length=64, on_overflow="error")
    with pytest.raises(InputTooLong, match="characters, so more than max_length 64 tokens"):
        encoder.encode(ScoreItem(text="x" * (encoder.max_chars + 1)))
