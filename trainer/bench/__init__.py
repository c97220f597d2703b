"""`rewardserve bench`: measures serving, reward-model training and PPO on the machine it runs on (`run.py`, its
parts in `serve.py`, `train.py`, `ppo.py`, their tables in `report.py`), and the rollout engine's decode step
(`decode_overhead.py`). Empty on purpose: the CLI reads `bench.config` at every start, and importing this package
must not load the benchmark's dependencies (peft, TRL: 3.7 s)."""
