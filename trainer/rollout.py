"""Rollouts: the policy with its value head, prompt encoding, sampling, and the per-token quantities PPO needs."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rewardserve.server.modeling import causal_padding_mask

from .generation import RolloutEngine, Sampling
from .ppo_math import entropy_from_logits, gather_logprobs

PROMPT_WIDTH_MULTIPLE = 16


class ActorCritic(nn.Module):
    """A causal LM (the actor) and a scalar value head, on the LM's own trunk (shared) or on a copy (separate)."""

    def __init__(self, policy: nn.Module, separate_critic: bool = False):
        super().__init__()
        self.policy = policy
        self.critic_trunk = copy.deepcopy(policy.base_model) if separate_critic else None
        hidden = policy.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int):
        """Logits (B, R, V) that predicted the R response tokens, and values (B, R) of the states before them.

        Position t predicts token t + 1, so the response's logits come from positions P - 1 .. P + R - 2; the LM head
        runs on those positions alone (the prompt's logits would cost a vocabulary-sized matmul each and go unused).
        """
        position_ids = positions_from_mask(attention_mask)
        mask = causal_padding_mask(attention_mask)  # ready-made: no padding probe on the host per forward
        hidden = self.policy.base_model(input_ids=input_ids, attention_mask=mask,
                                        position_ids=position_ids).last_hidden_state  # (B, P + R, H)
        before_response = slice(prompt_width - 1, input_ids.shape[1] - 1)
        logits = self.policy.get_output_embeddings()(hidden[:, before_response])  # (B, R, V)
        if self.critic_trunk is not None:
            hidden = self.critic_trunk(input_ids=input_ids, attention_mask=mask,
                                       position_ids=position_ids).last_hidden_state
        values = self.value_head(hidden[:, before_response].float()).squeeze(-1)  # (B, R), fp32 like the reward head
        return logits, values


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompt(tokenizer, prompt: str | list[dict], max_prompt_length: int) -> list[int]:
    """The policy's chat template with the generation prompt; long prompts lose their beginning, not their end."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns an encoding, 4.x a list
    else:
        ids = tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
    return list(ids)[-max_prompt_length:]


def pad_left(sequences: list[list[int]], pad_token_id: int, multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding for generation: every prompt ends at the same column, where sampling starts. The width is
    rounded up to `multiple_of`, so a compiled decode step sees few distinct shapes."""
    width = -(-max(len(s) for s in sequences) // multiple_of) * multiple_of
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence):] = torch.tensor(sequence)
        mask[row, width - len(sequence):] = 1
    return ids, mask


def response_mask_until_eos(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on each response's tokens up to and including its first EOS: returns (mask (B, R), reached_eos (B,))."""
    is_eos = responses == eos_token_id
    reached = is_eos.any(-1)
    first_eos = torch.where(reached, is_eos.float().argmax(-1), torch.full_like(reached, responses.shape[1], dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions[None, :] <= first_eos[:, None]).long(), reached


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
                     on_sampled: Callable[[list, list[str]], None] | None = None) -> tuple[Rollout, GenerationStats]:
    """Prompts in; sampled responses, their masks, old and reference log-probs and values out.

    `on_sampled(prompts, texts)` is called as soon as the responses are decoded, so the caller can send them to the
    reward server while the log-probs are computed here. Log-probabilities use logits / temperature for both
    models, so they are those of the distribution that was actually sampled.
    """
    began = time.perf_counter()
    prompt_ids, prompt_mask = pad_left([encode_prompt(tokenizer, p, max_prompt_length) for p in prompts],
                                       tokenizer.pad_token_id, multiple_of=PROMPT_WIDTH_MULTIPLE)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    generated = engine.generate(prompt_ids, prompt_mask, sampling)
    responses = generated.responses
    response_mask, reached_eos = response_mask_until_eos(responses, tokenizer.eos_token_id)
    host_responses, host_mask = responses.cpu(), response_mask.cpu()  # the one wait for the sampled tokens
    lengths = host_mask.sum(-1).tolist()
    stats = GenerationStats(time.perf_counter() - began, generated.decode_steps, int(sum(lengths)), generated.path)
    texts = tokenizer.batch_decode([r[:n].tolist() for r, n in zip(host_responses, lengths)], skip_special_tokens=True)
    if on_sampled is not None:
        on_sampled(list(prompts), texts)
    sequences = torch.cat([prompt_ids, responses], dim=1)  # (B, P + R)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    old_logprobs, values, ref_logprobs = token_statistics(model, reference, sequences, attention_mask,
                                                          prompt_ids.shape[1], sampling.temperature, forward_tokens)
    mask = response_mask.float()
    rollout = Rollout(sequences.cpu(), attention_mask.cpu(), host_mask, (old_logprobs * mask).cpu(),
                      (ref_logprobs * mask).cpu(), (values * mask).cpu(), reached_eos.cpu(), list(prompts), texts)
    return rollout, stats


def token_statistics(model: ActorCritic, reference: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                     prompt_width: int, temperature: float, forward_tokens: int):
    """Old log-probs, values and reference log-probs of the responses (each (B, R)), in batches of at most
    `forward_tokens` tokens (rows x width): one forward of each model per batch."""
    rows = max(1, forward_tokens // sequences.shape[1])
    old, values, ref = [], [], []
    responses = sequences[:, prompt_width:]
    for start in range(0, sequences.shape[0], rows):
        ids, mask = sequences[start:start + rows], attention_mask[start:start + rows]
        logits, value = model(ids, mask, prompt_width)
        old.append(gather_logprobs(logits, responses[start:start + rows], temperature))
        values.append(value)
        ref_logits = reference(input_ids=ids, attention_mask=causal_padding_mask(mask),
                               logits_to_keep=responses.shape[1] + 1,
                               position_ids=positions_from_mask(mask)).logits[:, :-1]  # (b, R, V)
        ref.append(gather_logprobs(ref_logits, responses[start:start + rows], temperature))
    return torch.cat(old), torch.cat(values), torch.cat(ref)


def policy_forward(model: ActorCritic, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int,
                   temperature: float):
    """New log-probs, values and entropies of a (mini)batch's responses under the current weights, with grad."""
    logits, values = model(input_ids, attention_mask, width)
    tokens = input_ids[:, width:]
    return gather_logprobs(logits, tokens, temperature), values, entropy_from_logits(logits.detach(), temperature)
