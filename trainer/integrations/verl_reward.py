"""verl's custom reward function, in a file verl can load by path.

verl imports `custom_reward_function.path` with `importlib.util.spec_from_file_location`, as a module outside any
package, where relative imports fail; this file therefore imports absolutely. Its path on your machine (an
editable install keeps it in the source tree, not under site-packages):

    python -c "import rewardserve.trainer.integrations.verl_reward as m; print(m.__file__)"

    custom_reward_function:
      path: <that path>
      name: compute_score
    # and in the workers' environment: REWARDSERVE_REWARD_URL=http://<server>:8000

`compute_score(data_source, solution_str, ground_truth, extra_info)` scores `solution_str` as the answer to
`extra_info["prompt"]`, with `ground_truth` as the item's `reference` (what a verifier checks against), on the
server's default model (REWARDSERVE_REWARD_MODEL or REWARDSERVE_REWARD_COMBINATION
pick another; REWARDSERVE_REWARD_API_KEY is sent when set).
"""
from __future__ import annotations

import os

from rewardserve.trainer.client import RewardClient
from rewardserve.trainer.integrations.items import as_item, target_from_environment


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
    item = as_item(prompt, solution_str) | ({} if ground_truth is None else {"reference": str(ground_truth)})
    return _verl_client.score([item], target=target_from_environment()).rewards[0]
