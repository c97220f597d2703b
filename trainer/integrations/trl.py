"""TRL's reward function (GRPOTrainer, RLOOTrainer: `reward_funcs` takes callables), scored by a reward server."""
from __future__ import annotations

from ..client import RewardClient, RewardTarget
from .items import as_item


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
        items = [as_item(p, c) for p, c in zip(prompts, completions)]
        return self.client.score(items, self.transform, self.target).rewards
