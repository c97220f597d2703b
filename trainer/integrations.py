"""Reward functions for other trainers, backed by `RewardClient`, so they score on a rewardserve server by URL.

TRL (GRPOTrainer, RLOOTrainer: `reward_funcs` takes callables):

    from rewardserve.trainer.integrations import RewardServerFunction
    trainer = GRPOTrainer(..., reward_funcs=[RewardServerFunction("http://rm:8000")])

    # one of a server's models, or a combination it declared: RewardServerFunction(url, combination="safe")

verl (`custom_reward_function.path` pointing at trainer/verl_reward.py, the file verl can load by path,
`custom_reward_function.name=compute_score`), with the server's URL in the REWARDSERVE_REWARD_URL environment
variable.

slime (`--custom-rm-path rewardserve.trainer.integrations.slime_reward --rm-url http://rm:8000`).

verl and slime read the model or combination to ask for from REWARDSERVE_REWARD_MODEL or
REWARDSERVE_REWARD_COMBINATION (the server's default when neither is set).
"""
from __future__ import annotations

import os

import asyncio

from .client import AsyncRewardClient, RewardClient, RewardTarget


def _target_from_environment() -> RewardTarget:
    return RewardTarget(model=os.environ.get("REWARDSERVE_REWARD_MODEL") or None,
                        combination=os.environ.get("REWARDSERVE_REWARD_COMBINATION") or None)


def _as_item(prompt, completion) -> dict:
    """TRL passes plain strings, or (conversational datasets) message lists for both prompt and completion."""
    if isinstance(completion, list):
        prompt_messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt or ""}]
        return {"messages": prompt_messages + completion}
    return {"prompt": prompt or "", "response": completion}


class RewardServerFunction:
    """A TRL reward function: `(prompts, completions, **kwargs) -> list[float]`, one request per call.

    `transform` picks the server's transform (raw, whiten, logsigmoid, debias); None uses the model's default.
    `model` or `combination` picks one of the server's models or combinations; None uses the server's default.
    """

    def __init__(self, urls: str | list[str], transform: str | None = None, timeout: float = 120.0,
                 api_key: str | None = None, model: str | None = None, combination: str | None = None):
        self.client = RewardClient(urls, timeout=timeout, api_key=api_key)
        self.transform = transform
        self.target = RewardTarget(model=model, combination=combination)
        self.__name__ = f"rewardserve_{combination or model}" if combination or model else "rewardserve"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        items = [_as_item(p, c) for p, c in zip(prompts, completions)]
        return self.client.score(items, self.transform, self.target).rewards


_verl_client: RewardClient | None = None


def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float:
    """verl's custom reward function: the reward of `solution_str` as the answer to extra_info["prompt"]."""
    global _verl_client
    if _verl_client is None:
        url = os.environ.get("REWARDSERVE_REWARD_URL")
        if not url:
            raise RuntimeError("set REWARDSERVE_REWARD_URL to the reward server's URL for verl's reward function")
        _verl_client = RewardClient(url, api_key=os.environ.get("REWARDSERVE_REWARD_API_KEY"))
    prompt = (extra_info or {}).get("prompt", "")
    return _verl_client.score([_as_item(prompt, solution_str)], target=_target_from_environment()).rewards[0]


_slime_clients: dict[tuple[str, int], AsyncRewardClient] = {}


async def slime_reward(args, sample, **kwargs) -> float:
    """slime's custom reward-model function `(args, sample) -> float`: the server's reward of the sample.

    The URL is `--rm-url` (args.rm_url) or REWARDSERVE_REWARD_URL. slime's prompt is either already templated text,
    scored with the response appended as given, or a message list.
    """
    url = getattr(args, "rm_url", None) or os.environ.get("REWARDSERVE_REWARD_URL")
    if not url:
        raise RuntimeError("pass --rm-url (or set REWARDSERVE_REWARD_URL) to the reward server's URL")
    key = (url, id(asyncio.get_running_loop()))  # an async client belongs to the loop that made it
    if key not in _slime_clients:
        _slime_clients[key] = AsyncRewardClient(url, api_key=os.environ.get("REWARDSERVE_REWARD_API_KEY"))
    prompt = sample.prompt
    item = ({"text": prompt + sample.response} if isinstance(prompt, str)
            else {"messages": prompt + [{"role": "assistant", "content": sample.response}]})
    return (await _slime_clients[key].score([item], target=_target_from_environment())).rewards[0]
