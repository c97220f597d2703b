"""Reward functions for other trainers, backed by `RewardClient`, so they score on a rewardserve server by URL.

TRL (GRPOTrainer, RLOOTrainer: `reward_funcs` takes callables):

    from rewardserve.trainer.integrations import RewardServerFunction
    trainer = GRPOTrainer(..., reward_funcs=[RewardServerFunction("http://rm:8000")])

    # one of a server's models, or a combination it declared: RewardServerFunction(url, combination="safe")

verl (`custom_reward_function.path` pointing at trainer/integrations/verl_reward.py, the file verl can load by path,
`custom_reward_function.name=compute_score`), with the server's URL in the REWARDSERVE_REWARD_URL environment
variable.

slime (`--custom-rm-path rewardserve.trainer.integrations.slime_reward --rm-url http://rm:8000`).

verl and slime read the model or combination to ask for from REWARDSERVE_REWARD_MODEL or
REWARDSERVE_REWARD_COMBINATION (the server's default when neither is set).
"""
from .slime import slime_reward
from .trl import RewardServerFunction
from .verl_reward import compute_score

__all__ = ["RewardServerFunction", "compute_score", "slime_reward"]
