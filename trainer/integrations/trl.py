"""TRL's reward function (GRPOTrainer, RLOOTrainer: `reward_funcs` takes callables), scored by a reward server."""
from __future__ import annotations

from ..client import RewardClient, RewardTarget
from .items import as_item


class RewardServerFunction:
    """A TRL reward function: `(prompts, completions, **kwargs) -> list[float]`, one request per call.

    `transform` picks the server's transform (raw, whiten, logsigmoid, debias); None uses the model's default.
    `model` or `combination` picks one of the server's models or combinations; None uses the server's default.
    `reference_column`: the dataset column holding each prompt's right answer (TRL passes every column to a reward
    function), sent as the item's `reference` for a verifier, e.g. `RewardServerFunction(url, model="correct",
    reference_column="answer")`.
    """

    def __init__(self, urls: str | list[str], transform: str | None = None, timeout: float = 120.0,
                 api_key: str | None = None, model: str | None = None, combination: str | None = None,
                 reference_column: str | None = None):
        self.client = RewardClient(urls, timeout=timeout, api_key=api_key)
        self.transform = transform
        self.reference_column = reference_column
        self.target = RewardTarget(model=model, combination=combination)
        self.__name__ = f"rewardserve_{combination or model}" if combination or model else "rewardserve"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        items = [as_item(p, c) for p, c in zip(prompts, completions)]
        if self.reference_column is not None:
            if self.reference_column not in kwargs:
                raise KeyError(f"reference_column={self.reference_column!r} is not a column of this dataset"
                               f" (TRL passed: {', '.join(sorted(kwargs)) or 'none'})")
            items = [item | {"reference": str(answer)} for item, answer in zip(items, kwargs[self.reference_column])]
        return self.client.score(items, self.transform, self.target).rewards
