"""Rollouts: the policy with its value head, prompt encoding, sampling, and the per-token quantities PPO needs."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rewardserve.server.modeling import decoder_attention_mask
from rewardserve.server.packing import PackedBatch, pack, packed_attention_on, to_device

from ..prompts import encode_prompt, pad_left, response_mask_until_eos
from .generation import RolloutEngine, Sampling
from .estimators import entropy_from_logits, gather_logprobs

PROMPT_WIDTH_MULTIPLE = 16


class ActorCritic(nn.Module):
    """A causal LM (the actor) and a scalar value head, on the LM's own trunk (shared) or on a copy (separate); or
    no critic at all (the critic-free estimators), whose values are zeros that nothing trains. With LoRA the LM
    carries peft's adapters in its own modules (`adapters` is the PeftModel around it)."""

    def __init__(self, policy: nn.Module, separate_critic: bool = False, critic: bool = True, adapters=None):
        super().__init__()
        self.policy = policy
        # with LoRA, the PeftModel around `policy` (whose adapters live inside it): kept outside the module tree, so
        # the weights are not listed twice
        object.__setattr__(self, "adapters", adapters)
        self.critic_trunk = copy.deepcopy(policy.base_model) if critic and separate_critic else None
        self.value_head = nn.Linear(policy.config.hidden_size, 1) if critic else None
        if critic:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                shared: "SharedPrompts | None" = None):
        """Logits (B, R, V) that predicted the R response tokens, and values (B, R) of the states before them.

        The logits are the causal LM's own forward's (`response_logits`): what the engine sampled from and what
        the reference is read with, whatever the family does after its LM head (Gemma 2's final softcap, Granite's
        logits_scaling, Cohere's logit_scale). The value head reads the trunk's output of that same forward. With
        `shared`, that forward runs on its packed row, each group's prompt once.
        """
        trunk: dict[str, torch.Tensor] = {}

        def keep_trunk_output(_module, _args, output) -> None:  # None: the output goes on unchanged
            trunk["hidden"] = output.last_hidden_state

        capture = self.policy.base_model.register_forward_hook(keep_trunk_output)
        try:
            logits = response_logits(self.policy, input_ids, attention_mask, prompt_width, shared)  # (B, R, V)
        finally:
            capture.remove()
        hidden = trunk["hidden"]  # (B, P + R, H), or (1, N, H) packed
        if self.value_head is None:
            return logits, logits.new_zeros(logits.shape[:2], dtype=torch.float32)
        if self.critic_trunk is not None and shared is not None:
            with packed_attention_on(self.critic_trunk):
                hidden = self.critic_trunk(input_ids=shared.packed.input_ids, position_ids=shared.packed.position_ids,
                                           rewardserve_documents=shared.packed.documents).last_hidden_state
        elif self.critic_trunk is not None:
            hidden = self.critic_trunk(input_ids=input_ids, position_ids=positions_from_mask(attention_mask),
                                       attention_mask=decoder_attention_mask(self.policy.config, attention_mask)
                                       ).last_hidden_state
        before_response = hidden[0, shared.predictors] if shared is not None else \
            hidden[:, prompt_width - 1:input_ids.shape[1] - 1]  # (B, R, H)
        # fp32 like the reward head; under FSDP on CUDA the head computes in bf16 (its mixed precision) and its
        # output is made fp32
        head = self.value_head.weight.dtype
        return logits, self.value_head(before_response.to(head)).float().squeeze(-1)  # (B, R)


@dataclass
class SharedPrompts:
    """A batch's sequences packed in one row where each group's prompt is computed once (server/packing.py: a
    suffix attends to its prefix and to itself, positions going on from the prefix's, so every output is the
    padded forward's), and for each response position the row index of the token that predicts it."""

    packed: PackedBatch
    predictors: torch.Tensor  # (B, R)

    def to(self, device: torch.device) -> "SharedPrompts":
        return SharedPrompts(to_device(self.packed, device), self.predictors.to(device, non_blocking=True))


def share_prompts(rows: list[list[int]], prompt_lengths: list[int], response_width: int,
                  min_shared_prefix: int) -> SharedPrompts | None:
    """The packed layout of a batch, given each sequence's real tokens (prompt then response, `Rollout.token_rows`),
    where prompts of `min_shared_prefix` (> 0) tokens or more are shared; None when none is (one response per
    prompt): the padded forward then runs as ever. Host work alone, no tensor read."""
    packed = pack(rows, min_shared_prefix=min_shared_prefix)
    if packed.computed_tokens == sum(map(len, rows)):
        return None
    # response token j is predicted by the token before it; past a response's end the mask zeroes the outputs
    before = torch.tensor(prompt_lengths)[:, None] - 1 + torch.arange(response_width)  # (B, R)
    last = torch.tensor([len(row) - 1 for row in rows])[:, None]
    return SharedPrompts(packed, packed.token_index(torch.minimum(before, last)))


def response_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    prompt_width: int, shared: SharedPrompts | None = None) -> torch.Tensor:
    """The logits (B, R, V) that predicted the R tokens after `prompt_width`, from the causal LM's own forward.

    Position t predicts token t + 1, so the response's logits come from positions P - 1 .. P + R - 2; the LM head
    runs on those positions alone (`logits_to_keep`: the prompt's logits would cost a vocabulary-sized matmul each
    and go unused). The old, reference and new log-probs all come from here, and the engine samples from the same
    forward, so the ratio and the KL compare one distribution with itself at step 0. With `shared`, the forward
    reads the packed row and the LM head its predicting positions.
    """
    if shared is not None:
        packed = shared.packed
        with packed_attention_on(model):
            logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                           rewardserve_documents=packed.documents, logits_to_keep=shared.predictors.flatten()).logits
        return logits.view(*shared.predictors.shape, -1)
    response_width = input_ids.shape[1] - prompt_width
    return model(input_ids=input_ids, attention_mask=decoder_attention_mask(model.config, attention_mask),
                 position_ids=positions_from_mask(attention_mask), logits_to_keep=response_width + 1
                 ).logits[:, :-1]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update needs; all tensors on the CPU."""

    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, then the response
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R)
    old_logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    reached_eos: torch.Tensor  # (B,)
    prompts: list
    responses: list[str]

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def token_rows(self) -> tuple[list[list[int]], list[int]]:
        """Each sequence's real tokens (its prompt without the padding, then its response up to its end), and its
        prompt's length: what `share_prompts` lays out."""
        return token_rows(self.input_ids, self.attention_mask, self.prompt_width)

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every per-sequence tensor, moved to the device in one go."""
        return {name: getattr(self, name).to(device) for name in ("input_ids", "attention_mask", "response_mask",
                                                                  "old_logprobs", "ref_logprobs", "values")}

    @staticmethod
    def concat(parts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """Joins chunks whose prompt and response widths differ, re-padding prompts left and responses right."""
        prompt_width = max(p.prompt_width for p in parts)
        response_width = max(p.response_mask.shape[1] for p in parts)
        fields = {name: [] for name in ("input_ids", "attention_mask", "response_mask", "old_logprobs",
                                        "ref_logprobs", "values", "reached_eos")}
        for part in parts:
            left, right = prompt_width - part.prompt_width, response_width - part.response_mask.shape[1]
            pad = nn.functional.pad
            fields["input_ids"].append(pad(part.input_ids, (left, right), value=pad_token_id))
            fields["attention_mask"].append(pad(part.attention_mask, (left, right)))
            for name in ("response_mask", "old_logprobs", "ref_logprobs", "values"):
                fields[name].append(pad(getattr(part, name), (0, right)))
            fields["reached_eos"].append(part.reached_eos)
        return Rollout(**{k: torch.cat(v) for k, v in fields.items()},
                       prompts=[p for part in parts for p in part.prompts],
                       responses=[r for part in parts for r in part.responses])


@dataclass
class GenerationStats:
    seconds: float  # sampling alone, until the tokens are on the host
    decode_steps: int  # forward passes of the policy while sampling
    tokens: int  # response tokens, up to and including EOS
    path: str  # the decode path that ran (see generation.RolloutEngine)


@torch.no_grad()
def generate_rollout(model: ActorCritic, reference: nn.Module, engine: RolloutEngine, tokenizer, prompts: list,
                     sampling: Sampling, max_prompt_length: int, device: torch.device, forward_tokens: int,
                     on_sampled: Callable[[list, list[str]], None] | None = None,
                     min_shared_prefix: int = 0) -> tuple[Rollout, GenerationStats]:
    """Prompts in; sampled responses, their masks, old and reference log-probs and values out.

    `on_sampled(prompts, texts)` is called as soon as the responses are decoded, so the caller can send them to the
    reward server while the log-probs are computed here. Log-probabilities use logits / temperature for both
    models, so they are those of the distribution that was actually sampled. Responses whose prompts share
    `min_shared_prefix` tokens or more (a group) are read with their prompt computed once.
    """
    began = time.perf_counter()
    host_prompts, host_prompt_mask = pad_left([encode_prompt(tokenizer, p, max_prompt_length) for p in prompts],
                                              tokenizer.pad_token_id, multiple_of=PROMPT_WIDTH_MULTIPLE)
    prompt_ids, prompt_mask = host_prompts.to(device), host_prompt_mask.to(device)
    generated = engine.generate(prompt_ids, prompt_mask, sampling)
    responses = generated.responses
    response_mask, reached_eos = response_mask_until_eos(responses, engine.eos_token_ids)
    host_responses, host_mask = responses.cpu(), response_mask.cpu()  # the one wait for the sampled tokens
    lengths = host_mask.sum(-1).tolist()
    stats = GenerationStats(time.perf_counter() - began, generated.decode_steps, int(sum(lengths)), generated.path)
    texts = tokenizer.batch_decode([r[:n].tolist() for r, n in zip(host_responses, lengths)], skip_special_tokens=True)
    if on_sampled is not None:
        on_sampled(list(prompts), texts)
    sequences = torch.cat([host_prompts, host_responses], dim=1)  # (B, P + R)
    attention_mask = torch.cat([host_prompt_mask, host_mask], dim=1)
    old_logprobs, values, ref_logprobs = token_statistics(model, reference, sequences, attention_mask,
                                                          host_prompts.shape[1], sampling.temperature, forward_tokens,
                                                          device, min_shared_prefix)
    mask = response_mask.float()
    rollout = Rollout(sequences, attention_mask, host_mask, (old_logprobs * mask).cpu(), (ref_logprobs * mask).cpu(),
                      (values * mask).cpu(), reached_eos.cpu(), list(prompts), texts)
    return rollout, stats


def token_statistics(model: ActorCritic, reference: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                     prompt_width: int, temperature: float, forward_tokens: int, device: torch.device,
                     min_shared_prefix: int = 0):
    """Old log-probs, values and reference log-probs of the responses (each (B, R), on the device) from host
    sequences, in batches of at most `forward_tokens` tokens (rows x width): one forward of each model per batch,
    each group's prompt computed once where prompts are shared."""
    rows = max(1, forward_tokens // sequences.shape[1])
    old, values, ref = [], [], []
    tokens, prompt_lengths = token_rows(sequences, attention_mask, prompt_width) if min_shared_prefix else ([], [])
    for start in range(0, sequences.shape[0], rows):
        ids, mask = sequences[start:start + rows], attention_mask[start:start + rows]
        shared = share_prompts(tokens[start:start + rows], prompt_lengths[start:start + rows],
                               sequences.shape[1] - prompt_width, min_shared_prefix) if min_shared_prefix else None
        shared = shared.to(device) if shared is not None else None
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        responses = ids[:, prompt_width:]
        logits, value = model(ids, mask, prompt_width, shared)
        old.append(gather_logprobs(logits, responses, temperature))
        values.append(value)
        ref_logits = response_logits(reference, ids, mask, prompt_width, shared)  # (b, R, V)
        ref.append(gather_logprobs(ref_logits, responses, temperature))
    return torch.cat(old), torch.cat(values), torch.cat(ref)


def token_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
               ) -> tuple[list[list[int]], list[int]]:
    """Host tensors (B, P + R) -> each row's real tokens, and its prompt's length."""
    return ([ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)],
            attention_mask[:, :prompt_width].sum(-1).tolist())


def policy_forward(model: ActorCritic, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int,
                   temperature: float, shared: SharedPrompts | None = None):
    """New log-probs, values and entropies of a (mini)batch's responses under the current weights, with grad."""
    logits, values = model(input_ids, attention_mask, width, shared)
    tokens = input_ids[:, width:]
    return gather_logprobs(logits, tokens, temperature), values, entropy_from_logits(logits.detach(), temperature)
