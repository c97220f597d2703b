"""Dense rewards from a process reward model (`rewardserve ppo --reward-granularity step`).

A sampled response is split into steps at the separator the server splits at (`StepFormat.split`, the server's own
code), sent to the server as `steps`, and each step's score lands on the response token where that step's text
ends: the first token whose decoded prefix reaches the step's last character. The outcome reward, if a model gives
one, stays on the last token (`per_token_rewards`).
"""
from __future__ import annotations

import bisect
import dataclasses

import torch

from rewardserve.server.steps import StepFormat

from ..client import RewardClient, RewardTarget, ScoreResult
from ..prompts import prompt_key
from .estimators import step_rewards
from .rollout import Rollout


def step_char_ends(text: str, step_format: StepFormat) -> list[int]:
    """Where each step of `text` ends (the index after its last character), its steps as `StepFormat.split` finds
    them.

    >>> step_char_ends("a = 1\\n\\nb = 2\\n", StepFormat())
    [5, 12]
    """
    ends, start = [], 0
    for piece in text.split(step_format.separator):
        if piece.strip():
            ends.append(start + len(piece))
        start += len(piece) + len(step_format.separator)
    return ends


def step_end_tokens(tokenizer, response_ids: list[int], text: str, step_format: StepFormat) -> list[int]:
    """The response token on which each step of `text` (its decoding) ends: the first whose decoded prefix reaches
    the step's last character, found by bisection (a few decodes a step, not one per token)."""
    def reached(k: int) -> int:
        return len(tokenizer.decode(response_ids[:k + 1], skip_special_tokens=True))

    last = len(response_ids) - 1
    return [min(bisect.bisect_left(range(last), end, key=reached), last) for end in step_char_ends(text, step_format)]


def score_steps(client: RewardClient, prompts: list, texts: list[str], step_format: StepFormat, step_model: str,
                outcome_model: str | None = None, outcome_items: list[dict] | None = None) -> ScoreResult:
    """Each response's step scores (none for a response without a step: an empty one), and the outcome model's
    rewards over `outcome_items` where there is one (else 0), as one `ScoreResult` whose `step_scores` has an entry
    per response."""
    steps = [step_format.split(text) for text in texts]
    stepped = [i for i, response_steps in enumerate(steps) if response_steps]
    step_scores: list[list[float]] = [[] for _ in texts]
    prm = None
    if stepped:
        items = [step_item(prompts[i], steps[i]) for i in stepped]
        prm = client.score(items, target=RewardTarget(model=step_model))
        for i, scores in zip(stepped, prm.step_scores):
            step_scores[i] = scores
    if outcome_model is not None:
        outcome = client.score(outcome_items, target=RewardTarget(model=outcome_model))
        return dataclasses.replace(outcome, step_scores=step_scores)
    zeros = [0.0] * len(texts)
    return ScoreResult(zeros, zeros, [False] * len(texts), {"name": "none"}, step_model,
                       prm.model_version if prm else "", replica=prm.replica if prm else "", step_scores=step_scores)


def dense_step_rewards(tokenizer, rollout: Rollout, step_scores: list[list[float]],
                       step_format: StepFormat) -> torch.Tensor:
    """(B, R): each step's centred score on the response token where the step ends (`step_rewards`)."""
    responses = rollout.input_ids[:, rollout.prompt_width:]
    lengths = rollout.response_mask.sum(-1).tolist()
    ends = [step_end_tokens(tokenizer, row[:n].tolist(), text, step_format)
            for row, n, text in zip(responses, lengths, rollout.responses)]
    return step_rewards(step_scores, ends, rollout.response_mask.shape[1])


def step_item(prompt: str | list[dict], steps: list[str]) -> dict:
    if isinstance(prompt, str):
        return {"prompt": prompt, "steps": steps}
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return {"prompt": prompt[0]["content"], "steps": steps}
    raise ValueError(f"--reward-granularity step takes prompts that are text or one user turn; got {prompt_key(prompt)}")
