"""The old path of verl's reward function, kept for one release (CHANGELOG.md): verl configurations that point
`custom_reward_function.path` at this file keep working. The function now lives in
trainer/integrations/verl_reward.py; point verl there:

    python -c "import rewardserve.trainer.integrations.verl_reward as m; print(m.__file__)"
"""
from rewardserve.trainer.integrations.verl_reward import compute_score

__all__ = ["compute_score"]
