"""Prompt sets, and plain answers from a causal LM: what RL, labelling and `compare` share.

A prompt is text or a list of chat messages; `encode_prompt` puts it in the policy's chat template, `pad_left`
lines a batch up for generation, and `response_mask_until_eos` keeps each answer up to its end-of-turn token.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn


BUILTIN_SETS = {"builtin": "prompts.jsonl", "builtin:arithmetic": "arithmetic-train.jsonl",
                "builtin:arithmetic-heldout": "arithmetic-heldout.jsonl",
                "builtin:arithmetic-steps": "arithmetic-steps-train.jsonl",
                "builtin:arithmetic-steps-heldout": "arithmetic-steps-heldout.jsonl",
                "builtin:arithmetic-steps-best-of-4": "arithmetic-steps-best-of-4.jsonl"}


def prompt_rows(spec: str) -> list[dict]:
    """The rows of a JSON Lines file, or of one of the project's sets (`builtin`: open questions;
    `builtin:arithmetic` and `builtin:arithmetic-heldout`: checkable sums, with references;
    `builtin:arithmetic-steps[-heldout]`: worked chains with a planted first error, for process reward models;
    `builtin:arithmetic-steps-best-of-4`: problems with four worked answers, one right)."""
    return [json.loads(line) for line in set_text(spec).splitlines() if line.strip()]


def set_text(spec: str) -> str:
    """The text of a JSON Lines file, or of one of the project's sets (BUILTIN_SETS)."""
    if spec in BUILTIN_SETS:
        return (resources.files("rewardserve.trainer") / "assets" / BUILTIN_SETS[spec]).read_text()
    if spec.startswith("builtin"):
        raise SystemExit(f"{spec}: the project's sets are {', '.join(BUILTIN_SETS)}")
    return Path(spec).read_text()


def load_prompts(spec: str) -> list:
    """Prompts ({"prompt"} or {"messages"} rows), from a file or one of the project's sets."""
    prompts = [row.get("messages") or row.get("prompt") for row in prompt_rows(spec)]
    if not prompts or any(not p for p in prompts):
        raise SystemExit(f"{spec}: every line needs a non-empty `prompt` or `messages`")
    return prompts


def prompt_key(prompt: str | list[dict]) -> str:
    return json.dumps(prompt)


def load_references(spec: str) -> dict[str, str]:
    """Each prompt's `reference`, the right answer a verifier checks against, by `prompt_key`; {} when no row has
    one. A prompt given twice with two references is refused (its reward would depend on which row was drawn)."""
    references: dict[str, str] = {}
    for row in prompt_rows(spec):
        if row.get("reference") is None:
            continue
        key, reference = prompt_key(row.get("messages") or row.get("prompt")), str(row["reference"])
        if references.setdefault(key, reference) != reference:
            raise SystemExit(f"{spec}: one prompt has two references ({references[key]!r} and {reference!r})")
    return references


def prompt_text(prompt: str | list[dict]) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float | None,
                       batch_size: int, device, end_ids: int | list[int] | None = None) -> tuple[list[str], list[int]]:
    """One response per prompt, in batches (left-padded), cut at the first end id (default: the tokenizer's EOS):
    sampled at `temperature`, or greedy when it is None. Returns the texts and their lengths in tokens."""
    end_ids = tokenizer.eos_token_id if end_ids is None else end_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "top_k": 0,
                                                                 "temperature": temperature}
    responses, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_left([encode_prompt(tokenizer, p, 512) for p in prompts[start:start + batch_size]], pad)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=end_ids, **sampling)
        generated = out[:, ids.shape[1]:].cpu()
        kept = response_mask_until_eos(generated, end_ids)[0].sum(-1)
        responses += [tokenizer.decode(g[:n], skip_special_tokens=True).strip() for g, n in zip(generated, kept)]
        lengths += kept.tolist()
    return responses, lengths


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


def end_of_turn_ids(policy: nn.Module, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and each id of the generation config's
    `eos_token_id` (Llama 3 and Qwen2.5 instruct models end a turn with a token other than the tokenizer's EOS)."""
    configured = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def response_mask_until_eos(responses: torch.Tensor, eos_token_ids: int | list[int]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on each response's tokens up to and including its first end-of-turn token: returns (mask (B, R),
    reached_eos (B,))."""
    ends = torch.as_tensor(eos_token_ids, device=responses.device).reshape(-1)
    is_eos = torch.isin(responses, ends)
    reached = is_eos.any(-1)
    first_eos = torch.where(reached, is_eos.float().argmax(-1), torch.full_like(reached, responses.shape[1], dtype=torch.long))
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions[None, :] <= first_eos[:, None]).long(), reached
