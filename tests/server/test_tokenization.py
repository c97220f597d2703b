"""Formatting and truncation rules, on the real SmolLM2 tokenizer (chat template) and a BERT tokenizer."""
from __future__ import annotations

import time

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
    with pytest.raises(InputTooLong, match=r"items\[1\]: at least \d+ tokens, over max_length 40.*--on-overflow truncate"):
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


def test_conversations_are_written_plainly_without_a_chat_template(minilm_dir):
    """A tokenizer without a chat template (BERT, MiniLM): a user and an assistant turn give exactly the ids of
    prompt + response (concat, the default), [CLS] and [SEP] included; roles writes each turn as "Role: text"."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    turns = [{"role": "user", "content": "Is the sky blue? "}, {"role": "assistant", "content": "Yes, by day."}]
    concat = ItemEncoder(tokenizer, max_length=64, append_eos=False)
    as_messages = concat.encode(ScoreItem(messages=turns)).input_ids
    assert as_messages == concat.encode(ScoreItem(prompt=turns[0]["content"], response=turns[1]["content"])).input_ids
    assert as_messages[0] == tokenizer.cls_token_id and as_messages[-1] == tokenizer.sep_token_id
    roles = ItemEncoder(tokenizer, max_length=64, append_eos=False, plain_format="roles")
    assert roles.format_messages(turns) == "User: Is the sky blue? \n\nAssistant: Yes, by day."
    assert roles.encode(ScoreItem(prompt="Is the sky blue? ", response="Yes, by day.")).input_ids == \
        roles.encode(ScoreItem(messages=turns)).input_ids
    with pytest.raises(ValueError, match="one of concat, roles"):
        ItemEncoder(tokenizer, max_length=64, append_eos=False, plain_format="markdown")


def whole(encoder: ItemEncoder, item: ScoreItem):
    """The slow way: tokenize everything, then truncate."""
    window, encoder.window_chars = encoder.window_chars, 10**12
    try:
        return encoder.encode(item)
    finally:
        encoder.window_chars = window


@pytest.mark.parametrize("form", ["text", "prompt_response"])
def test_a_huge_text_is_tokenized_from_its_end_into_the_same_tokens(smol_tokenizer, form):
    """The shortcut must give exactly what tokenizing everything and truncating gives."""
    encoder = ItemEncoder(smol_tokenizer, max_length=64)
    words = " ".join(f"w{i % 97}-é{i % 13}" for i in range(20000))  # far over the window, some multi-byte text
    assert len(words) > 8 * encoder.window_chars
    item = ScoreItem(text=words) if form == "text" else ScoreItem(prompt=words, response="The answer is 42.")
    fast = encoder.encode(item)
    assert fast == whole(encoder, item) and fast.truncated and len(fast.input_ids) == 64


def test_a_huge_text_is_cut_the_same_way_for_an_encoder(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    encoder = ItemEncoder(tokenizer, max_length=32, append_eos=False)
    item = ScoreItem(text=" ".join(f"token{i % 50} word" for i in range(5000)))
    fast = encoder.encode(item)
    assert fast == whole(encoder, item) and fast.input_ids[0] == tokenizer.cls_token_id


@pytest.mark.parametrize("run", ["a", "ab", "é", "1", " a", "a\n"])
def test_long_runs_give_the_tokens_of_the_whole_text(smol_tokenizer, run):
    """20,000 repeated characters: byte-level BPE merges across a run of letters, so a cut inside it changes the
    tokens (a character cut gave ids differing in 1 to 3 positions); a run with no safe cut is tokenized whole."""
    encoder = ItemEncoder(smol_tokenizer, max_length=64)
    item = ScoreItem(text=run * (20000 // len(run)))
    assert encoder.encode(item) == whole(encoder, item)


def test_whitespace_a_tokenizer_drops_does_not_cut_the_prompt_away(minilm_dir):
    """MiniLM drops whitespace: a prompt, 2,000 spaces and a response are a dozen tokens, all of which fit."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    encoder = ItemEncoder(tokenizer, max_length=64, append_eos=False)
    item = ScoreItem(prompt="What is the capital of France?" + " " * 2000, response=" Paris is its capital.")
    encoded = encoder.encode(item)
    assert encoded == whole(encoder, item) and not encoded.truncated
    assert tokenizer.decode(encoded.input_ids, skip_special_tokens=True).startswith("what is the capital")
    strict = ItemEncoder(tokenizer, max_length=64, on_overflow="error", append_eos=False)
    assert len(strict.encode(ScoreItem(text="hello" + " " * 5000 + "world")).input_ids) == 4  # no 413 for 4 tokens


def test_a_huge_text_with_overflow_error_is_refused_from_its_end(smol_tokenizer):
    encoder = ItemEncoder(smol_tokenizer, max_length=64, on_overflow="error")
    with pytest.raises(InputTooLong, match=r"at least \d+ tokens, over max_length 64"):
        encoder.encode(ScoreItem(text="x " * 2_000_000))


def test_a_huge_run_without_a_safe_cut_is_refused_not_guessed(smol_tokenizer):
    encoder = ItemEncoder(smol_tokenizer, max_length=64)
    with pytest.raises(InputTooLong, match="no whitespace to cut at safely"):
        encoder.encode(ScoreItem(text="x" * 2_000_000))


def test_ids_past_the_model_embeddings_are_refused_by_name(smol_tokenizer):
    """A tokenizer with a token its model has no embedding for: the item is refused, naming the token."""
    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    tokenizer.add_tokens(["<|reward|>"])
    encoder = ItemEncoder(tokenizer, max_length=64, embedding_rows=len(tokenizer) - 1)
    with pytest.raises(InvalidInput, match=r"the token '<\|reward\|>' \(id 49152\), which this model has no embedding"):
        encoder.encode(ScoreItem(text="x <|reward|>"))
    with pytest.raises(InvalidInput, match="token id 49152, outside the vocabulary of 49152"):
        encoder.encode(ScoreItem(input_ids=[5, 49152]))
    assert encoder.encode(ScoreItem(input_ids=[5, 49151])).input_ids == [5, 49151]


def test_a_response_length_costs_what_its_tail_costs(smol_tokenizer):
    """The debiased reward counts the response's tokens: at most max_length, from the end of a huge response."""
    encoder = ItemEncoder(smol_tokenizer, max_length=64)
    huge = ScoreItem(prompt="Q", response="word " * 2_000_000)
    started = time.perf_counter()
    assert encoder.response_length(huge) == 64
    assert time.perf_counter() - started < 0.5
    assert encoder.response_length(ScoreItem(prompt="Q", response="one two three")) == 3


def test_no_untrue_indexing_warning_for_texts_the_encoder_truncates(smol_tokenizer, caplog):
    """transformers warns that ids longer than model_max_length "will result in indexing errors"; this encoder cuts
    them itself, so the warning is silenced where it tokenizes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path, model_max_length=32)
    with caplog.at_level("WARNING"):
        encoded = ItemEncoder(tokenizer, max_length=32).encode(ScoreItem(text="word " * 100))
    assert len(encoded.input_ids) == 32 and encoded.truncated
    assert not any("indexing errors" in record.getMessage() for record in caplog.records)
