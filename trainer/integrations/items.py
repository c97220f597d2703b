"""What the integrations share: a trainer's (prompt, completion) as a server item, and the model or combination
named in the environment."""
from __future__ import annotations

import os

from ..client import RewardTarget


def target_from_environment() -> RewardTarget:
    return RewardTarget(model=os.environ.get("REWARDSERVE_REWARD_MODEL") or None,
                        combination=os.environ.get("REWARDSERVE_REWARD_COMBINATION") or None)


def as_item(prompt, completion) -> dict:
    """TRL passes plain strings, or (conversational datasets) message lists for both prompt and completion."""
    if isinstance(completion, list):
        prompt_messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt or ""}]
        return {"messages": prompt_messages + completion}
    return {"prompt": prompt or "", "response": completion}
