"""From a scoring item to the token ids the model reads.

The same rules serve training (`rewardserve train` imports this module) and scoring, so a checkpoint is always
scored on exactly the sequences it was trained on:

- prompt + response: the checkpoint's chat template over a user turn and an assistant turn when it has one,
  else the two strings concatenated;
- a decoder reward model reads its score at the last token, which must be the end-of-sequence token: training
  puts it there, so scoring appends it when the text does not already end with it;
- too long: the prompt is cut from the left so that the response, and its end-of-sequence token where the score
  is read, survive. A leading special token (BOS, [CLS]) is kept.
- a text far longer than that is not tokenized whole (14 MiB would stall the server): see `_tokenize_tail` for how
  its last tokens are found, and what is guaranteed about them;
- every id must have a row in the model's embeddings, which can be fewer than the tokenizer's tokens.

Runs in a thread pool, off the event loop: fast tokenizers release the GIL.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .errors import InputTooLong, InvalidInput
from .schemas import ScoreItem

OnOverflow = Literal["truncate", "error"]
SAFE_CUT = re.compile(r"(?<=\S)\s")  # a whitespace after a non-whitespace character: a piece starts there
WHOLE_TEXT_CHARS = 1_000_000  # a text without a safe cut is tokenized whole up to this size (about 0.7 s)


@dataclass(frozen=True)
class EncodedItem:
    input_ids: list[int]
    truncated: bool
    response_length: int | None = None  # the response's own tokens, counted when a length-debiased reward needs it


# How a conversation is written for a checkpoint whose tokenizer has no chat template (BERT, DeBERTa, MiniLM reward
# models): `concat`, the turns' texts in order, the earlier ones each on a line, the last (the response) right after,
# so that a user turn and an assistant turn read exactly as `prompt` + `response` always did; `roles`, each turn as
# "Role: text", blank lines between (hh-rlhf's shape). `rewardserve train` stores its choice in the checkpoint's
# config.json (PLAIN_FORMAT_KEY) and the server reads it there, so scores are read as training wrote them.
PLAIN_FORMATS = ("concat", "roles")
PLAIN_FORMAT_KEY = "reward_plain_chat_format"


def render_plain(messages: list[dict], plain_format: str = "concat") -> str:
    """A conversation as text for a tokenizer without a chat template.

    >>> render_plain([{"role": "user", "content": "Hi? "}, {"role": "assistant", "content": "Hello."}])
    'Hi? Hello.'
    >>> render_plain([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], "roles")
    'User: Hi?\n\nAssistant: Hello.'
    """
    if plain_format == "roles":
        return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    *earlier, last = messages
    return "\n".join(m["content"] for m in earlier) + last["content"]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def trained_max_length(tokenizer) -> int | None:
    """The length the checkpoint was trained at (`rewardserve train` stores it as the tokenizer's model_max_length);
    None for tokenizers without one (they report a huge sentinel)."""
    trained = getattr(tokenizer, "model_max_length", None)
    return trained if isinstance(trained, int) and trained < 1_000_000 else None


class ItemEncoder:
    """Formats and tokenizes items for one checkpoint.

    append_eos: end every formatted text with the tokenizer's EOS token (decoder reward models read their score
    there); encoders get their [CLS] ... [SEP] from the tokenizer instead.
    """

    def __init__(self, tokenizer, max_length: int, on_overflow: OnOverflow = "truncate", append_eos: bool = True,
                 embedding_rows: int | None = None, plain_format: str = "concat"):
        """embedding_rows: ids at or above it have no embedding in the model (default: the tokenizer's size).
        plain_format: how a conversation is written for a tokenizer without a chat template (`render_plain`)."""
        if plain_format not in PLAIN_FORMATS:
            raise ValueError(f"plain chat format {plain_format!r}: one of {', '.join(PLAIN_FORMATS)}")
        self.plain_format = plain_format
        if append_eos and tokenizer.eos_token is None:
            raise ValueError("append_eos needs a tokenizer with an eos_token")
        self.tokenizer = tokenizer
        # This encoder truncates by itself (`_fit`): transformers' warning that a long text's ids "will result in
        # indexing errors" is untrue here, and it is printed on every train, eval and serve run.
        getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
        self.max_length = max_length
        self.on_overflow = on_overflow
        self.append_eos = append_eos
        self.vocab_size = min(len(tokenizer), embedding_rows or len(tokenizer))
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._special_ids = set(tokenizer.all_special_ids)
        self._special_tokens = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
        # The first window a long text is tokenized from (`_tokenize_tail`): about 8 characters a token; it doubles
        # for texts that hold fewer tokens than that.
        self.window_chars = 8 * (max_length + 16)

    # -- formatting -------------------------------------------------------------------------------------------
    def format_prompt_response(self, prompt: str, response: str) -> str:
        return self.format_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])

    def format_messages(self, messages: list[dict]) -> str:
        if not self.has_chat_template:
            return render_plain(messages, self.plain_format)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as error:  # jinja raises its own errors for conversations a template rejects
            raise InvalidInput(f"the chat template rejected these messages: {error}") from error

    def _finish(self, text: str) -> str:
        if not self.append_eos:
            return text
        # Templates end a turn with EOS then a newline; the score is read at EOS, so trailing whitespace goes.
        text = text.rstrip()
        return text if text.endswith(self.tokenizer.eos_token) else text + self.tokenizer.eos_token

    # -- tokenizing ---------------------------------------------------------------------------------------------
    def encode_prompt_response(self, prompt: str, response: str) -> EncodedItem:
        text = self.format_prompt_response(prompt, response)
        return self._encode_text(text, add_special_tokens=not self.has_chat_template)

    def encode(self, item: ScoreItem) -> EncodedItem:
        if item.input_ids is not None:
            return self._fit(self._checked_ids(item.input_ids))
        if item.text is not None:
            # Already formatted by the client: no template and no BOS of ours (encoders still need [CLS]/[SEP]).
            return self._encode_text(item.text, add_special_tokens=not self.append_eos)
        if item.messages is not None:
            text = self.format_messages([m.model_dump() for m in item.messages])
            return self._encode_text(text, add_special_tokens=not self.has_chat_template)
        return self.encode_prompt_response(item.prompt or "", item.response)

    def encode_all(self, items: list[ScoreItem], response_lengths: bool = False) -> list[EncodedItem]:
        """response_lengths: also count each response's own tokens (the length a debiased reward corrects for)."""
        encoded = []
        for index, item in enumerate(items):
            try:
                one = self.encode(item)
                if response_lengths:
                    one = EncodedItem(one.input_ids, one.truncated, self.response_length(item))
                encoded.append(one)
            except InvalidInput as error:
                raise type(error)(f"items[{index}]: {error.message}") from error
        return encoded

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def response_length(self, item: ScoreItem) -> int:
        """Tokens of the response alone (`response`, or the content of a final assistant message), at most
        max_length: no more of it can be in what the model read. A huge response costs what its tail costs."""
        if item.response is not None:
            response = item.response
        elif item.messages and item.messages[-1].role == "assistant":
            response = item.messages[-1].content
        else:
            raise InvalidInput("the length-debiased reward needs to know which part is the response: send `prompt` +"
                               " `response`, or `messages` ending with the assistant turn")
        return min(len(self._tokenize_tail(response, add_special_tokens=False)), self.max_length)

    def _encode_text(self, text: str, add_special_tokens: bool) -> EncodedItem:
        ids = self._tokenize_tail(self._finish(text), add_special_tokens)
        if not ids:
            raise InvalidInput("the text tokenizes to nothing; send some text to score")
        return self._fit(self._checked_ids(ids, tokenized=True))

    def _tokenize_tail(self, text: str, add_special_tokens: bool) -> list[int]:
        """The text's token ids: all of them, or, for a text too long to fit, at least its last max_length + 1
        (all that truncation keeps, and enough to know that it overflows), exactly as tokenizing it whole gives them.

        A 14 MiB text would hold a tokenizer thread for seconds, so a long text is tokenized from its end, cut at
        a whitespace that follows a non-whitespace character. Every tokenizer family we serve starts a new piece
        there (GPT-2 and Llama 3 byte-level BPE, SentencePiece's Metaspace, BERT's WordPiece): the tokens after
        the cut do not depend on the text before it, except for a start-of-text marker the tokenizer may add (a
        prefix space, a "▁"), which lands among the first tokens, where truncation drops it. A cut is used only
        when it yields more than max_length + 2 tokens, and when a second cut about twice as far back gives the
        same last max_length + 1 tokens (a check against tokenizers that do merge across whitespace); otherwise
        the window doubles. A text with no such cut (an unbroken run of letters, a long CJK paragraph) is
        tokenized whole, up to WHOLE_TEXT_CHARS characters; beyond that it is refused (413) rather than scored
        on tokens that might differ from the whole text's.
        """
        def tokenize(part: str) -> list[int]:
            return self.tokenizer(part, add_special_tokens=add_special_tokens)["input_ids"]

        keep = self.max_length + 1
        head = next((token for token in self._special_tokens if token and text.startswith(token)), "")
        window, previous = self.window_chars, None
        while 2 * window < len(text) - len(head):
            cut = SAFE_CUT.search(text, len(text) - window)
            ids = tokenize(head + text[cut.start():]) if cut else []
            if previous is not None and len(ids) > keep + 1 and ids[-keep:] == previous[-keep:]:
                return ids
            previous = ids if len(ids) > keep + 1 else None
            window *= 2
        if len(text) > WHOLE_TEXT_CHARS and previous is None:
            raise InputTooLong(
                f"a text of {len(text)} characters whose end has no whitespace to cut at safely (the last"
                f" {window // 2} characters); tokenizing it whole is refused over {WHOLE_TEXT_CHARS} characters:"
                " send less of it"
            )
        return tokenize(text)

    def _checked_ids(self, ids: list[int], tokenized: bool = False) -> list[int]:
        largest = max(ids)
        if largest < self.vocab_size:
            return ids
        if tokenized:  # a token the tokenizer knows and the model was never given an embedding for
            token = self.tokenizer.convert_ids_to_tokens(largest)
            raise InvalidInput(f"the text holds the token {token!r} (id {largest}), which this model has no"
                               f" embedding for (its ids stop at {self.vocab_size - 1}); leave it out")
        raise InvalidInput(f"`input_ids` holds token id {largest}, outside the vocabulary of {self.vocab_size}")

    def _fit(self, ids: list[int]) -> EncodedItem:
        """Cuts from the left down to max_length, keeping a leading special token."""
        if len(ids) <= self.max_length:
            return EncodedItem(list(ids), truncated=False)
        if self.on_overflow == "error":
            raise InputTooLong(
                f"at least {len(ids)} tokens, over max_length {self.max_length}; shorten it, or let the server cut the"
                " prompt (start it with --on-overflow truncate)"
            )
        head = ids[:1] if ids[0] in self._special_ids else []
        return EncodedItem(head + ids[len(ids) - (self.max_length - len(head)) :], truncated=True)
