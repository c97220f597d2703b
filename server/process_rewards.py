"""Process reward models (PRMs): a score for every step of a solution, not only for its end.

An item gives its steps (`steps: [...]`, or a `response` the server splits at `--step-separator`). The model reads
one position per step, where the step ends, and answers the probability that the step is right; the item's reward
is those probabilities aggregated (`--step-aggregate`). Two head kinds, as the PRMs in use are built:

- token classification (what TRL's PRMTrainer and `rewardserve train --objective prm` write):
  `AutoModelForTokenClassification` with two labels; each step is followed by the separator, the step's score is P(label 1, "right") at the
  separator's last token (one label: its sigmoid);
- step tag (Math-Shepherd): a causal LM; each step is followed by `--step-tag`, the steps joined by the separator;
  the step's score is P(good) against P(bad), the LM's logits of two token ids (`--step-token-ids GOOD,BAD`) at the
  tag's last token. The LM head runs on those two rows alone.

    token classification:  [BOS] prompt | step 1 + separator | step 2 + separator | ...     read at each separator
    step tag:              [BOS] prompt | step 1 + tag + separator | step 2 + tag | ...     read at each tag

The pieces are tokenized apart and joined as ids, as PRMTrainer builds its training rows, so each step's end is
known by construction and scoring reads the positions training labelled (`rewardserve train --objective prm`
encodes with this module). The ids travel through the batcher as any item's do (`StepIds` is a list of ids that
also knows its step ends), packed, sharing a prompt's prefix like any decoder's, and the model gathers the hidden
states at the step ends on the device: one host synchronisation per batch, as for every model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import InputTooLong, InvalidInput, NotARewardModel, StartupError
from .modeling import (RewardModel, check_own_code, decoder_attention_mask, describe_device, is_decoder_reward_model,
                       keep_head_in_fp32, quiet_transformers, resolve_device, resolve_dtype, unchanged_while_loading)
from .packing import PackedBatch, packed_hidden_states
from .schemas import ScoreItem
from .steps import StepFormat, steps_of
from .tokenization import WHOLE_TEXT_CHARS, EncodedItem, ItemEncoder

log = logging.getLogger(__name__)

HeadKind = Literal["token-classification", "step-tag"]
STEP_SEPARATOR_KEY = "reward_step_separator"  # config.json: the separator `rewardserve train --objective prm` used


class StepIds(list):
    """Token ids that also know where each step ends (offsets into themselves). They travel through the batcher
    as any item's ids do; the process reward model reads its scores at `step_ends`. Plain lists (the start-up
    calibration's synthetic batches) are read at their last token."""

    __slots__ = ("step_ends",)

    def __init__(self, ids: list[int], step_ends: tuple[int, ...]):
        super().__init__(ids)
        self.step_ends = step_ends


def step_ends_of(sequence: list[int]) -> tuple[int, ...]:
    return getattr(sequence, "step_ends", None) or (len(sequence) - 1,)


class StepEncoder(ItemEncoder):
    """Formats and tokenizes an item's steps for a process reward model (training and serving alike).

    Too long: the prompt is cut from the left (a leading BOS kept), never a step; steps that do not fit alone are
    a 413. --on-overflow error refuses any cut."""

    def __init__(self, tokenizer, max_length: int, step_format: StepFormat, on_overflow="truncate",
                 embedding_rows: int | None = None):
        super().__init__(tokenizer, max_length, on_overflow, append_eos=False, embedding_rows=embedding_rows)
        self.step_format = step_format
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.marker_ids = self._piece(step_format.marker)
        self.joiner_ids = self._piece(step_format.separator) if step_format.tag is not None else []
        if not self.marker_ids and step_format.tag is not None:
            raise StartupError(f"the step tag {step_format.tag!r} tokenizes to nothing; choose one the tokenizer"
                               " writes as a token")
        # A separator the tokenizer drops (BERT's WordPiece drops a newline) leaves each step's score on the step's
        # own last token, as PRMTrainer's rows then put its label.

    def _piece(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, item: ScoreItem) -> EncodedItem:
        prompt, steps = steps_of(item, self.step_format)
        return self.encode_steps(prompt, steps)

    def encode_steps(self, prompt: str, steps: list[str]) -> EncodedItem:
        """[BOS] prompt, then each step followed by the marker (and the separator between steps of a step-tag
        model); the step ends are the markers' last tokens."""
        if len(prompt) + sum(map(len, steps)) > WHOLE_TEXT_CHARS:
            raise InputTooLong(f"over {WHOLE_TEXT_CHARS} characters of prompt and steps: send less of it")
        prompt_ids = self._piece(prompt) if prompt else []
        solution, ends = [], []
        for index, step in enumerate(steps):
            if index and self.joiner_ids:
                solution += self.joiner_ids
            piece = self._piece(step) + self.marker_ids
            if not piece:
                raise InvalidInput(f"steps[{index}] tokenizes to nothing; every step needs some text the model reads")
            solution += piece
            ends.append(len(solution) - 1)
        room = self.max_length - len(self.bos) - len(solution)
        if room < 0:
            raise InputTooLong(f"the {len(steps)} steps take {len(solution)} tokens, over max_length"
                               f" {self.max_length} with the prompt cut away entirely; send fewer or shorter steps")
        truncated = len(prompt_ids) > room
        if truncated and self.on_overflow == "error":
            raise InputTooLong(f"{len(self.bos) + len(prompt_ids) + len(solution)} tokens, over max_length"
                               f" {self.max_length}; shorten the prompt, or let the server cut it (--on-overflow"
                               " truncate)")
        head = self.bos + prompt_ids[len(prompt_ids) - room:] if truncated else self.bos + prompt_ids
        ids = self._checked_ids(head + solution, tokenized=True)
        return EncodedItem(StepIds(ids, tuple(len(head) + end for end in ends)), truncated=truncated)

    def response_length(self, item: ScoreItem) -> int:
        _, steps = steps_of(item, self.step_format)
        return min(sum(len(self._piece(step)) for step in steps), self.max_length)


def step_index(sequences: list[list[int]], pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Which sequence each step belongs to and where it ends in it: two (S,) tensors, built on the host (pinned on
    a GPU machine, so their copy is asynchronous)."""
    owners = torch.tensor([i for i, sequence in enumerate(sequences) for _ in step_ends_of(sequence)], dtype=torch.long)
    ends = torch.tensor([end for sequence in sequences for end in step_ends_of(sequence)], dtype=torch.long)
    return (owners.pin_memory(), ends.pin_memory()) if pin_memory else (owners, ends)


def step_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(S, L) logits -> (S,) P(right): column 1 of two (PRMTrainer's label 1 is "right"; a step-tag head's rows
    are ordered BAD, GOOD to match), or the sigmoid of one."""
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=-1)[:, 1]


@dataclass
class ProcessRewardModel(RewardModel):
    """A PRM, ready to score batches: the batch's forward as any reward model's, then the head at each step end.
    Each item's result is its step scores (a list); the service aggregates them."""

    head_kind: HeadKind = "token-classification"
    token_rows: torch.Tensor | None = None  # step tag: (2, H) fp32 rows of the LM head, BAD then GOOD
    token_bias: torch.Tensor | None = None  # (2,) their bias, where the LM head has one
    step_token_ids: tuple[int, int] | None = None  # (GOOD, BAD)

    @classmethod
    def load_prm(cls, path: str, step_token_ids: tuple[int, int] | None = None, dtype: str = "auto",
                 device: str = "auto", max_length: int | None = None, min_shared_prefix: int = 0,
                 trust_remote_code: bool = False) -> "ProcessRewardModel":
        """A token-classification checkpoint, or a causal LM read through `step_token_ids` (GOOD, BAD)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        check_own_code(path, trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        architectures = ", ".join(config.architectures or [])
        if "ForTokenClassification" in architectures:
            if step_token_ids is not None:
                raise StartupError(f"--prm {path} is a token-classification model ({architectures}): its head gives"
                                   " the step scores; leave out --step-token-ids and --step-tag")
            if config.num_labels not in (1, 2):
                raise NotARewardModel(f"--prm {path} has {config.num_labels} labels; a process reward model's head"
                                      " has two (wrong, right) or one")
            loader, kind = AutoModelForTokenClassification, "token-classification"
        elif "ForCausalLM" in architectures:
            if step_token_ids is None:
                raise StartupError(f"--prm {path} is a causal LM ({architectures}): say where it is read with"
                                   " --step-tag TEXT and --step-token-ids GOOD,BAD (Math-Shepherd: the tag ' ки',"
                                   " the ids of '+' and '-')")
            loader, kind = AutoModelForCausalLM, "step-tag"
        else:
            raise NotARewardModel(f"--prm {path} is a {architectures or 'model of no named architecture'}; a process"
                                  " reward model is a token-classification model (what TRL's PRMTrainer and"
                                  " `rewardserve train --objective prm` write) or a causal LM read at a step tag")
        log.info("loading process reward model %s (%s) on %s", path, kind, describe_device(target, torch_dtype))
        with unchanged_while_loading(path), quiet_transformers():
            network, loading = loader.from_pretrained(path, dtype=torch_dtype, use_safetensors=True,
                                                      trust_remote_code=trust_remote_code, output_loading_info=True)
        if kind == "token-classification":
            if any(key.split(".")[0] in ("score", "classifier") for key in loading["missing_keys"]):
                raise NotARewardModel(f"--prm {path} has no trained token-classification head (its score/classifier"
                                      " weights are missing); train one with `rewardserve train --objective prm`")
            keep_head_in_fp32(network)
        network = network.to(target).eval()
        model = cls.from_network(network, path, target, torch_dtype, max_length, min_shared_prefix,
                                 may_pack=not getattr(config, "auto_map", None))  # it checks the attention itself
        model.head_kind = kind
        if kind == "step-tag":
            model.use_step_tokens(step_token_ids)
            if model.packs and min_shared_prefix > 0:  # a causal LM: its prefixes' states are their own
                model.min_shared_prefix = min_shared_prefix
        return model

    def use_step_tokens(self, step_token_ids: tuple[int, int]) -> None:
        head = self.network.get_output_embeddings()
        rows = head.weight.shape[0]
        if not all(0 <= token < rows for token in step_token_ids) or step_token_ids[0] == step_token_ids[1]:
            raise StartupError(f"--step-token-ids {step_token_ids}: two different ids below the LM head's {rows}")
        good, bad = step_token_ids
        self.step_token_ids = step_token_ids
        # ordered (BAD, GOOD) so that `step_probabilities` reads P(good) as it reads label 1
        self.token_rows = head.weight.detach()[[bad, good]].float()  # (2, H)
        bias = getattr(head, "bias", None)
        self.token_bias = bias.detach()[[bad, good]].float() if bias is not None else None

    @property
    def is_decoder(self) -> bool:
        """Whether a prefix's states are its own (a causal LM or a decoder's token classifier): then items sharing a
        prompt compute it once."""
        return self.head_kind == "step-tag" or is_decoder_reward_model(self.network)

    def output_count(self) -> int:
        return 1

    # -- the forward: the trunk as for any model, the head at the step ends ------------------------------------
    def launch(self, sequences: list[list[int]]):
        pending = super().launch(sequences)
        pending.split = [len(step_ends_of(sequence)) for sequence in sequences]
        return pending

    @staticmethod
    def collect(pending) -> list[list[float]]:
        """Each item's step scores, cut from the batch's flat (S,) scores."""
        flat = RewardModel.collect(pending)
        cuts, start = [], 0
        for count in pending.split:
            cuts.append(flat[start:start + count])
            start += count
        return cuts

    def packed_outputs(self, batch: PackedBatch, sequences: list[list[int]] | None = None) -> torch.Tensor:
        return self.step_scores(packed_step_states(self.network, batch, *self._step_index(sequences),
                                                   decoder=self.is_decoder))

    def padded_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       sequences: list[list[int]] | None = None) -> torch.Tensor:
        return self.step_scores(padded_step_states(self.network, input_ids, attention_mask,
                                                   *self._step_index(sequences), decoder=self.is_decoder))

    def _step_index(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pinned = self.device.type == "cuda"
        return tuple(t.to(self.device, non_blocking=pinned) for t in step_index(sequences, pin_memory=pinned))

    def step_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, H) hidden states at the step ends -> (S,) fp32 probabilities that each step is right."""
        if self.head_kind == "token-classification":
            return step_probabilities(head_module(self.network)(hidden.float()).float())
        logits = hidden.float() @ self.token_rows.T  # (S, 2): BAD, GOOD
        if self.token_bias is not None:
            logits = logits + self.token_bias
        cap = getattr(self.network.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2 caps its logits; the two compared here are capped as its LM head's would be
            logits = torch.tanh(logits / cap) * cap
        return step_probabilities(logits)

    def read_out(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def describe_head(self) -> str:
        if self.head_kind == "step-tag":
            return f"step tag, P(token {self.step_token_ids[0]}) against P(token {self.step_token_ids[1]})"
        labels = self.network.config.num_labels
        return "token classification, " + ("P(label 1) of 2" if labels == 2 else "sigmoid of its one label")


def packed_step_states(network: nn.Module, batch: PackedBatch, owners: torch.Tensor, ends: torch.Tensor,
                       decoder: bool) -> torch.Tensor:
    """(S, H): the trunk's last hidden state at each step end of a packed batch (serving and training)."""
    return packed_hidden_states(network, batch, decoder)[batch.flat_token_index(owners, ends)]


def padded_step_states(network: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       owners: torch.Tensor, ends: torch.Tensor, decoder: bool) -> torch.Tensor:
    """(S, H) the same from right-padded rows, for architectures that do not pack."""
    mask = decoder_attention_mask(network.config, attention_mask) if decoder else attention_mask
    return network.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state[owners, ends]


def head_module(network: nn.Module) -> nn.Module:
    """A token classifier's head: `score` on decoders, `classifier` on BERT-style encoders."""
    return network.score if is_decoder_reward_model(network) else network.classifier
