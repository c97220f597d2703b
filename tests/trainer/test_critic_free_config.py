"""The critic-free estimators' flags: sizes that split groups, and estimators that need groups, are refused in one
line each."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from rewardserve.trainer.config import PPOConfig


@pytest.mark.parametrize("flags, message", [
    ({"batch_size": 12, "mini_batch_size": 6, "samples_per_prompt": 8},
     "--batch-size 12 must divide by --samples-per-prompt 8"),
    ({"batch_size": 8, "generation_batch_size": 2, "samples_per_prompt": 4},
     "--generation-batch-size 2 must divide by --samples-per-prompt 4"),
    ({"advantage_estimator": "rloo"}, "give --samples-per-prompt 2 or more"),
    ({"advantage_estimator": "grpo", "samples_per_prompt": 4, "critic": "separate"}, "leave out --critic separate"),
])
def test_refused(flags, message):
    with pytest.raises(ValidationError, match=message):
        PPOConfig(reward_url="http://x:1", batch_size=flags.pop("batch_size", 16), **flags)


def test_accepted():
    config = PPOConfig(reward_url="http://x:1", batch_size=16, advantage_estimator="rloo", samples_per_prompt=4)
    assert config.advantage_estimator == "rloo" and PPOConfig(reward_url="http://x:1").advantage_estimator == "gae"
    assert PPOConfig(reward_url="http://x:1", advantage_estimator="reinforce++").samples_per_prompt == 1
