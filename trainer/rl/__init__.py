"""`rewardserve ppo`: the RL loop against a reward server by URL (PPO, GRPO, RLOO, REINFORCE++), and what only it
uses: rollouts and their generation engine, the estimators and losses, the gold monitor, sharding, LoRA, the
process group, and the step gauges for Prometheus. It never imports `rm` (reward-model training)."""
