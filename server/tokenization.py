"""From a scoring item to the token ids the model reads.

The same rules serve training (`rewardserve train` imports this module) and scoring, so a checkpoint is always
scored on exactly the sequences it was trained on:

- prompt + response: the checkpoint's chat template over a user turn and an assistant turn when it has one,
  else the two strings concatenated;
- a decoder reward model reads its score at the last token, which must be the end-of-sequence token: training
  puts it there, so scoring appends it when the text does not already end with it;
- too long: the prompt is cut from the left so that the response, and its end-of-sequence token where the score
  is read, survive. A leading special token (BOS, [CLS]) is kept.

Runs in a thread pool, off the event loop: fast tokenizers release the GIL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import InputTooLong, InvalidInput
from .schemas import ScoreItem

OnOverflow = Literal["truncate", "error"]


@dataclass(frozen=True)
class EncodedItem:
    input_ids: list[int]
    truncated: bool
    response_length: int | None = None  # the response's own tokens, counted when a length-debiased reward needs it


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


class ItemEncoder:
    """Formats and tokenizes items for one checkpoint.

    append_eos: end every formatted text with the tokenizer's EOS token (decoder reward models read their score
    there); encoders get their [CLS] ... [SEP] from the tokenizer instead.
    """

    def __init__(self, tokenizer, max_length: int, on_overflow: OnOverflow = "truncate", append_eos: bool = True):
        if append_eos and tokenizer.eos_token is None:
            raise ValueError("append_eos needs a tokenizer with an eos_token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.on_overflow = on_overflow
        self.append_eos = append_eos
        self.vocab_size = len(tokenizer)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._special_ids = set(tokenizer.all_special_ids)
        self._special_tokens = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
        # No token covers more characters than the longest vocabulary entry, so a text this long holds more than
        # max_length tokens (16 to spare for the cut's ragged edge): the rest of it can only be cut away.
        longest_token = max((len(token) for token in tokenizer.get_vocab()), default=1)
        self.max_chars = (max_length + 16) * max(1, longest_token)

    # -- formatting -------------------------------------------------------------------------------------------
    def format_prompt_response(self, prompt: str, response: str) -> str:
        if not self.has_chat_template:
            return prompt + response
        return self.format_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])

    def format_messages(self, messages: list[dict]) -> str:
        if not self.has_chat_template:
            raise InvalidInput(
                "this checkpoint has no chat template, so `messages` cannot be formatted; send `prompt` + `response`"
                " or pre-formatted `text` instead"
            )
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
            return self._encode_text(text, add_special_tokens=False)
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
        """Tokens of the response alone: `response`, or the content of a final assistant message."""
        if item.response is not None:
            return self.count_tokens(item.response)
        if item.messages and item.messages[-1].role == "assistant":
            return self.count_tokens(item.messages[-1].content)
        raise InvalidInput("the length-debiased reward needs to know which part is the response: send `prompt` +"
                           " `response`, or `messages` ending with the assistant turn")

    def _encode_text(self, text: str, add_special_tokens: bool) -> EncodedItem:
        text = self._cut_to_tail(self._finish(text))
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not ids:
            raise InvalidInput("the text tokenizes to nothing; send some text to score")
        return self._fit(ids)

    def _cut_to_tail(self, text: str) -> str:
        """Keeps only the end of a text too long to fit, before tokenizing it: the same tokens survive truncation,
        and a 14 MiB text costs what its last `max_chars` characters cost. A leading special token is kept, as
        truncation keeps it."""
        if len(text) <= self.max_chars:
            return text
        if self.on_overflow == "error":
            raise InputTooLong(
                f"{len(text)} characters, so more than max_length {self.max_length} tokens; shorten it, or let the"
                " server cut the prompt (start it with --on-overflow truncate)"
            )
        head = next((token for token in self._special_tokens if token and text.startswith(token)), "")
        return head + text[len(text) - self.max_chars:]

    def _checked_ids(self, ids: list[int]) -> list[int]:
        largest = max(ids)
        if largest >= self.vocab_size:
            raise InvalidInput(f"`input_ids` holds token id {largest}, outside the vocabulary of {self.vocab_size}")
        return ids

    def _fit(self, ids: list[int]) -> EncodedItem:
        """Cuts from the left down to max_length, keeping a leading special token."""
        if len(ids) <= self.max_length:
            return EncodedItem(list(ids), truncated=False)
        if self.on_overflow == "error":
            raise InputTooLong(
                f"{len(ids)} tokens, over max_length {self.max_length}; shorten it, or let the server cut the prompt"
                " (start it with --on-overflow truncate)"
            )
        head = ids[:1] if ids[0] in self._special_ids else []
        return EncodedItem(head + ids[len(ids) - (self.max_length - len(head)) :], truncated=True)
