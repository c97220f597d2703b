"""slime's custom reward-model function (`--custom-rm-path rewardserve.trainer.integrations.slime_reward`)."""
from __future__ import annotations

import asyncio
import os

from ..client import AsyncRewardClient
from .items import target_from_environment
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
    label = getattr(sample, "label", None)  # the dataset's answer, for a verifier
    if label is not None:
        item["reference"] = str(label)
    return (await _slime_clients[key].score([item], target=target_from_environment())).rewards[0]
