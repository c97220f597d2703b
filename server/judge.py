"""A causal LM served as a reward model: an LLM judge's expected rating (direct RLAIF).

Lee et al. (2023, "RLAIF vs. RLHF") ask an LLM for a 1-10 score and use the expected score under its token
probabilities as the reward ("d-RLAIF"), with no reward model trained in between. Served here, that is one forward
per item, batched, packed and sharing the template's prefix like any reward model's:

    item (prompt, response) -> the judge template (constitution, prompt, response, a question asking for a rating
    from 1 to 10) -> the judge's chat template, its assistant turn opened -> one forward -> the next-token
    probabilities of the ratings -> reward = the expected rating; its entropy, and the probability the judge puts
    on a rating at all, beside it as outputs.

Ratings that take two tokens ("10" is "1" then "0" in SmolLM2's tokenizer) are read from the same forward: the
item is sent with their shared first token appended, so the position before it gives P(first token) and its own
position P(second token | first). A rating that is that first token alone ("1") is "1" not followed by a
rating's second token.
"""
from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import InputTooLong, InvalidInput, NotARewardModel, StartupError
from .modeling import (RewardModel, check_own_code, decoder_attention_mask, describe_device, last_token_index,
                       quiet_transformers, resolve_device, resolve_dtype, unchanged_while_loading)
from .packing import PackedBatch, packed_hidden_states
from .schemas import ScoreItem
from .tokenization import WHOLE_TEXT_CHARS, EncodedItem, ItemEncoder, trained_max_length

log = logging.getLogger(__name__)

RATINGS = tuple(range(1, 11))
OUTPUT_NAMES = ("rating", "rating_entropy", "rating_mass")  # the reward, then how sure, then how on-topic
TEMPLATE_FIELDS = {"constitution", "prompt", "response"}
PROBE = "Rating:\n"  # a context a rating follows, to spell each rating as it is tokenized after other text


def asset(name: str) -> str:
    return (resources.files("rewardserve.server") / "assets" / name).read_text().strip()


def read_template(path: str | None) -> str:
    """The judge template (default: server/assets/judge_template.txt), checked: {response} is in it, and no
    field but {constitution}, {prompt} and {response} (literal braces are written {{ }})."""
    template = Path(path).read_text() if path else asset("judge_template.txt")
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise StartupError(f"--judge-template {path}: {error} (write literal braces as {{{{ and }}}})") from None
    formatted = [f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                 for name, spec, conversion in parsed if spec or conversion]
    if formatted:  # `{response:>99999999999}` would pad every question to a hundred billion characters
        raise StartupError(f"--judge-template {path or 'default'}: fields take no format spec or conversion, found"
                           f" {', '.join(formatted[:3])}; write them plainly, e.g. {{response}}")
    fields = {name for name, _, _ in parsed}
    unknown = fields - TEMPLATE_FIELDS
    if unknown or "response" not in fields:
        raise StartupError(f"--judge-template {path or 'default'}: it takes the fields {{constitution}}, {{prompt}}"
                           f" and {{response}} (the last one is needed); found {sorted(fields) or 'none'}")
    return template.strip()


@dataclass(frozen=True)
class RatingTokens:
    """How ratings 1..10 are spelled in the judge's tokens: each rating's first token, and its second (-1 for a
    one-token rating); the first token that the two-token ratings share is `lead` (None when all take one)."""

    first: tuple[int, ...]
    second: tuple[int, ...]
    lead: int | None

    @classmethod
    def of(cls, tokenizer) -> "RatingTokens":
        spellings = [spell(tokenizer, str(rating)) for rating in RATINGS]
        longer = [s for s in spellings if len(s) > 2]
        leads = {s[0] for s in spellings if len(s) == 2}
        if longer or len(leads) > 1 or len(set(map(tuple, spellings))) != len(spellings):
            raise StartupError(f"the judge's tokenizer spells the ratings 1 to 10 as {spellings}; a judge needs"
                               " each in one or two tokens, the two-token ones sharing their first")
        return cls(tuple(s[0] for s in spellings), tuple(s[1] if len(s) == 2 else -1 for s in spellings),
                   leads.pop() if leads else None)


def spell(tokenizer, text: str) -> list[int]:
    """`text`'s tokens as they follow other text (PROBE), which is how the judge's answer follows its prompt."""
    base = tokenizer.encode(PROBE, add_special_tokens=False)
    full = tokenizer.encode(PROBE + text, add_special_tokens=False)
    return full[len(base):] if full[:len(base)] == base else tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class RatingIndex:
    """RatingTokens as device tensors, built once at load: the forward then copies nothing from the host."""

    first: torch.Tensor  # (R,) each rating's first token
    second: torch.Tensor  # (R,) its second token, 0 for one-token ratings (masked by `two_tokens`)
    two_tokens: torch.Tensor  # (R,) bool
    is_lead: torch.Tensor  # (R,) bool: the rating that is the lead token alone ("1")
    ratings: torch.Tensor  # (R,) fp32: 1..10
    lead: int | None

    @classmethod
    def of(cls, tokens: RatingTokens, device: torch.device) -> "RatingIndex":
        first, second = torch.tensor(tokens.first), torch.tensor(tokens.second)
        lead = -1 if tokens.lead is None else tokens.lead
        return cls(first.to(device), second.clamp(min=0).to(device), (second >= 0).to(device),
                   (first == lead).to(device), torch.tensor(RATINGS, dtype=torch.float32, device=device), tokens.lead)


def rating_outputs(first_logits: torch.Tensor, second_logits: torch.Tensor | None, index: RatingIndex
                   ) -> torch.Tensor:
    """The judge's outputs per item, (B, 3): the expected rating, the entropy of the rating distribution (nats) and
    the probability its next token is a rating at all. first_logits (B, V): the logits at the answer's first token;
    second_logits (B, V): after the lead token (None when every rating is one token)."""
    probability = first_logits.float().softmax(-1)[:, index.first]  # (B, R): P(a rating's first token)
    if index.lead is not None:
        after_lead = second_logits.float().softmax(-1)[:, index.second]  # (B, R): P(second | lead)
        goes_on = (after_lead * index.two_tokens).sum(-1, keepdim=True)  # (B, 1): the lead starts a longer rating
        stops = torch.where(index.is_lead, 1 - goes_on, 1.0)  # "1" alone: the lead, then no "0"
        probability = probability * torch.where(index.two_tokens, after_lead, stops)
    mass = probability.sum(-1)  # (B,)
    distribution = probability / mass[:, None].clamp(min=torch.finfo(torch.float32).tiny)
    expected = distribution @ index.ratings
    entropy = -(distribution * distribution.clamp(min=1e-30).log()).sum(-1)
    return torch.stack([expected, entropy, mass], dim=-1)


@dataclass
class JudgeModel(RewardModel):
    """A causal LM whose reward is its expected rating; everything else (batching, packing, sharing the template's
    prefix, calibration, reload) is the reward model's."""

    rating_tokens: RatingTokens | None = None
    rating_index: RatingIndex | None = None  # the same on the device
    answer_back: torch.Tensor | None = None  # (A,) on the device: where the logits are read, back from the end

    @classmethod
    def load_judge(cls, path: str, tokenizer, dtype: str = "auto", device: str = "auto",
                   max_length: int | None = None, min_shared_prefix: int = 0,
                   trust_remote_code: bool = False) -> "JudgeModel":
        from transformers import AutoConfig, AutoModelForCausalLM

        check_own_code(path, trust_remote_code, "judge")  # never served silently with the standard class
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        architectures = ", ".join(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code
                                                             ).architectures or [])
        if "ForCausalLM" not in architectures:
            raise NotARewardModel(f"--judge {path} is a {architectures or 'model of no named architecture'}; a judge"
                                  " is a causal LM (an instruction-tuned one, to follow the rating question)")
        log.info("loading judge %s on %s", path, describe_device(target, torch_dtype))
        with unchanged_while_loading(path), quiet_transformers():
            network = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True,
                                                           trust_remote_code=trust_remote_code)
        model = cls.from_network(network.to(target).eval(), path, target, torch_dtype, max_length, min_shared_prefix,
                                 may_pack=True)
        model.rating_tokens = RatingTokens.of(tokenizer)
        model.rating_index = RatingIndex.of(model.rating_tokens, target)
        # the answer's first token, and the position after the lead token where one is appended
        model.answer_back = torch.tensor((2, 1) if model.rating_tokens.lead is not None else (1,), device=target)
        model.output_names, model.objective_formula = OUTPUT_NAMES, "rating"
        model.objective = torch.tensor([1.0, 0.0, 0.0], device=target)
        return model

    @property
    def is_decoder(self) -> bool:
        return True

    def packed_outputs(self, batch: PackedBatch, sequences=None) -> torch.Tensor:
        hidden = packed_hidden_states(self.network, batch)  # (N, H)
        rows = batch.token_index(batch.lengths[:, None] - self.answer_back)  # (B, A): through a shared prefix
        return self._rate(hidden[rows])

    def padded_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sequences=None) -> torch.Tensor:
        mask = decoder_attention_mask(self.network.config, attention_mask)
        hidden = self.network.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        columns = (last_token_index(attention_mask)[:, None] + 1 - self.answer_back).clamp(min=0)  # (B, A)
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        return self._rate(hidden[rows, columns])

    def _rate(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, A, H) at the answer positions -> (B, 3); the LM head runs on those positions alone."""
        logits = self.network.get_output_embeddings()(hidden)  # (B, A, V)
        second = logits[:, 1] if logits.shape[1] > 1 else None
        return rating_outputs(logits[:, 0], second, self.rating_index)


def load_judge(path: str, tokenizer, template: str | None = None, constitution: str | None = None,
               dtype: str = "auto", device: str = "auto", max_length: int | None = None, min_shared_prefix: int = 0,
               trust_remote_code: bool = False) -> tuple["JudgeModel", "JudgeEncoder"]:
    """The judge and the encoder that formats its questions. template: a template file (default: the built-in);
    constitution: its text (default: server/assets/constitution.txt); max_length: default, the tokenizer's."""
    model = JudgeModel.load_judge(path, tokenizer, dtype, device, max_length or trained_max_length(tokenizer),
                                  min_shared_prefix, trust_remote_code)
    encoder = JudgeEncoder(tokenizer, model.max_length, read_template(template),
                           constitution or asset("constitution.txt"), model.rating_tokens, model.embedding_rows)
    return model, encoder


class JudgeEncoder(ItemEncoder):
    """Formats an item as the judge's question: the template filled with the constitution, the prompt and the
    response, as the user's turn of the judge's chat template with the assistant's turn opened, then the lead token
    of two-token ratings. An item is never cut (it would lose its instructions): too long is 413."""

    def __init__(self, tokenizer, max_length: int, template: str, constitution: str, rating_tokens: RatingTokens,
                 embedding_rows: int | None = None):
        super().__init__(tokenizer, max_length, "error", append_eos=False, embedding_rows=embedding_rows)
        self.template, self.constitution = template, constitution
        self.suffix = [] if rating_tokens.lead is None else [rating_tokens.lead]

    def question(self, prompt: str, response: str) -> str:
        filled = self.template.format(constitution=self.constitution, prompt=prompt, response=response)
        if not self.has_chat_template:
            return filled + "\n"
        return self.tokenizer.apply_chat_template([{"role": "user", "content": filled}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, item: ScoreItem) -> EncodedItem:
        prompt, response = prompt_and_response(item)
        text = self.question(prompt, response)
        if len(text) > WHOLE_TEXT_CHARS:
            raise InputTooLong(f"{len(text)} characters for the judge, over {WHOLE_TEXT_CHARS}: send less of it")
        ids = self.tokenizer(text, add_special_tokens=not self.has_chat_template)["input_ids"] + self.suffix
        if len(ids) > self.max_length:
            raise InputTooLong(f"the judge's question for this item is {len(ids)} tokens, over its max_length"
                               f" {self.max_length}; a judge never cuts an item (it would cut its instructions):"
                               " send a shorter prompt or response")
        return EncodedItem(self._checked_ids(ids, tokenized=True), truncated=False)


def prompt_and_response(item: ScoreItem) -> tuple[str, str]:
    """The prompt and the response a judge rates: `prompt` + `response`, or a chat whose last turn is the
    assistant's (the turns before it, one a line, are the prompt)."""
    if item.response is not None:
        return item.prompt or "", item.response
    if item.messages is not None:
        *before, last = item.messages
        if last.role != "assistant":
            raise InvalidInput(f"a judge rates the assistant's last turn, and this chat ends with a {last.role!r}"
                               " turn; end `messages` with the assistant's response")
        if len(before) == 1 and before[0].role == "user":
            return before[0].content, last.content
        return "\n".join(f"{m.role}: {m.content}" for m in before), last.content
    raise InvalidInput("a judge rates a prompt and its response: send `prompt` + `response`, or `messages` ending"
                       " with the assistant's turn (`text` and `input_ids` come formatted for a reward model)")
