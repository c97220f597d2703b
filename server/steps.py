"""What a process reward model reads of an item, without torch (the server's settings import it at every start):
how a solution's steps are written (`StepFormat`), an item's prompt and steps, and how step scores make one reward.
The model itself is in process_rewards.py."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BeforeValidator

from .errors import InvalidInput
from .schemas import ScoreItem

StepAggregate = Literal["min", "last", "mean", "product"]
STEP_AGGREGATES = ("min", "last", "mean", "product")


def aggregate_steps(scores: list[float], how: StepAggregate) -> float:
    """One reward from a solution's step scores (probabilities that each step is right).

    min (the default): a solution is as sound as its weakest step, and the reward does not fall with the number of
    steps as a product does (which penalises long solutions for being long); `last` reads the final step alone,
    `mean` averages, `product` is the probability that every step is right if the steps were independent.

    >>> aggregate_steps([0.9, 0.5, 0.8], "min"), aggregate_steps([0.9, 0.5, 0.8], "last")
    (0.5, 0.8)
    >>> round(aggregate_steps([0.9, 0.5, 0.8], "product"), 4), round(aggregate_steps([0.9, 0.5, 0.8], "mean"), 4)
    (0.36, 0.7333)
    """
    if not scores:
        raise ValueError("no step scores to aggregate")
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "product":
        return math.prod(scores)
    raise ValueError(f"step aggregate {how!r}: one of {', '.join(STEP_AGGREGATES)}")


def unescape(separator):
    """A separator typed on a command line or in an environment variable: `\\n` and `\\t` as the characters."""
    return separator.replace("\\n", "\n").replace("\\t", "\t") if isinstance(separator, str) else separator


Separator = Annotated[str, BeforeValidator(unescape)]  # the settings' step separators (serve, train, ppo)


@dataclass(frozen=True)
class StepFormat:
    """How a solution's steps are written around the ids a PRM reads: the separator that ends (token
    classification) or joins (step tag) the steps, the tag that ends each step of a step-tag model, and the most
    steps an item may have."""

    separator: str = "\n"
    tag: str | None = None
    max_steps: int = 128

    def __post_init__(self):
        if not self.separator:
            raise ValueError("the step separator is empty; give the text that separates steps, e.g. a newline")

    def where_read(self, encoder: "StepEncoder") -> str:
        if self.tag is not None:
            return f"at the step tag {self.tag!r}, steps joined by {self.separator!r}"
        if encoder.marker_ids:
            return f"at the separator {self.separator!r} after each step"
        return f"at each step's last token (the tokenizer drops the separator {self.separator!r})"

    @property
    def marker(self) -> str:
        """The text after each step whose last token is read."""
        return self.tag if self.tag is not None else self.separator

    def split(self, response: str) -> list[str]:
        """A response's steps: its pieces between separators, blank ones (an empty line) left out.

        >>> StepFormat().split("a = 1\\n\\nb = 2\\n")
        ['a = 1', 'b = 2']
        """
        return [piece for piece in response.split(self.separator) if piece.strip()]

    def check(self, steps: list[str]) -> list[str]:
        """The steps as given, or a 422 that names the step to fix."""
        if not steps:
            raise InvalidInput("no steps to score: send `steps` (a list of strings) or a `response` with steps"
                               f" separated by {self.separator!r}")
        if len(steps) > self.max_steps:
            raise InvalidInput(f"{len(steps)} steps, over the limit of {self.max_steps} (--max-steps): send fewer"
                               " steps, or merge some")
        for index, step in enumerate(steps):
            if not step.strip():
                raise InvalidInput(f"steps[{index}] is empty; every step needs some text")
            if self.separator in step:
                raise InvalidInput(f"steps[{index}] holds the step separator {self.separator!r}, which would make it"
                                   " two steps; split it, or start the server with another --step-separator")
            if self.tag is not None and self.tag in step:
                raise InvalidInput(f"steps[{index}] holds the step tag {self.tag!r}, where the model reads a score;"
                                   " leave it out of the step")
        return steps

    def describe(self) -> dict:
        return {"separator": self.separator, "tag": self.tag, "max_steps": self.max_steps}


def steps_of(item: ScoreItem, step_format: StepFormat) -> tuple[str, list[str]]:
    """The prompt and the steps of an item: `prompt` + `steps`, `prompt` + `response` split at the separator, or a
    user turn and an assistant turn whose content is split."""
    if item.steps is not None:
        return item.prompt or "", step_format.check(list(item.steps))
    if item.response is not None:
        return item.prompt or "", step_format.check(step_format.split(item.response))
    if item.messages is not None:
        roles = [m.role for m in item.messages]
        if roles == ["user", "assistant"]:
            return item.messages[0].content, step_format.check(step_format.split(item.messages[1].content))
        raise InvalidInput(f"a process reward model scores the steps of one answer: send `messages` as a user turn"
                           f" and an assistant turn (got {', '.join(roles)}), or `prompt` + `steps`")
    raise InvalidInput("a process reward model reads steps: send `prompt` + `steps` (or `prompt` + `response` with"
                       " steps separated by the server's --step-separator); `text` and `input_ids` do not say where"
                       " the steps end")
