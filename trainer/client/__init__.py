"""The reward client: what RL, `compare`, the demo and the integrations for other trainers share to score items on
reward servers by URL (`reward_client.py`), over HTTP or gRPC (`transports.py`).

    from rewardserve.trainer.client import RewardClient
"""
from .reward_client import (AsyncRewardClient, RequestRejected, RetryPolicy, RewardClient, RewardClientError,
                            RewardTarget, RewardUnavailable, ScoreResult, UntrustedServer)

__all__ = ["AsyncRewardClient", "RequestRejected", "RetryPolicy", "RewardClient", "RewardClientError",
           "RewardTarget", "RewardUnavailable", "ScoreResult", "UntrustedServer"]
