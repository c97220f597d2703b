"""The trainer side of rewardserve, one folder per job: `rl/` (the RL loop against a reward server), `rm/` (reward
models: training, evaluation, labelling), `client/` (the reward client they share), `integrations/` (reward
functions for TRL, verl and slime); at this level, what every job shares (`settings`, `tracking`, `prompts`, `arithmetic`) and
the tools that compose the jobs (`cli`, `demo`, `compare`, `bench/`)."""
