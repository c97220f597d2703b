"""The reward-model jobs: `rewardserve train` and `eval` (Bradley–Terry training and evaluation on preference
pairs, `train.py`, `preference.py`, `data.py`) and `rewardserve label` (AI-labelled pairs, `labeling.py`, with the
relevance judge in `relevance.py`). It never imports `rl` (the RL loop)."""
