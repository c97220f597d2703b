"""The retry policy against a scripted transport: no network, no sleeping for real."""
from __future__ import annotations

import asyncio
import random

import pytest

from rewardserve.trainer.client import reward_client as client_module
from rewardserve.trainer.client import (AsyncRewardClient, RequestRejected, RetryPolicy, RewardClient,
                                        RewardUnavailable)
from rewardserve.trainer.client.transports import RetryableError

OK = {"scores": [1.0], "rewards": [0.5], "truncated": [False], "transform": {"name": "raw"}, "model": "m"}


class ScriptedTransport:
    def __init__(self, name, outcomes):
        self.name, self.outcomes, self.requests = name, list(outcomes), []

    def send(self, request):
        self.requests.append(request)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


class AsyncScripted(ScriptedTransport):
    async def send(self, request):
        return ScriptedTransport.send(self, request)


@pytest.fixture
def sleeps(monkeypatch):
    slept = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    return slept


def test_503_then_200_is_retried_and_honours_retry_after(sleeps):
    transport = ScriptedTransport("a", [RetryableError("HTTP 503: queue full", retry_after=3.0), OK])
    result = RewardClient("x", transports=[transport]).score([{"text": "t"}])
    assert result.rewards == [0.5] and len(transport.requests) == 2
    assert sleeps == [3.0]


def test_4xx_is_never_retried(sleeps):
    transport = ScriptedTransport("a", [RequestRejected("HTTP 422", "invalid_input", "bad"), OK])
    with pytest.raises(RequestRejected, match="invalid_input"):
        RewardClient("x", transports=[transport]).score([{"text": "t"}])
    assert len(transport.requests) == 1 and sleeps == []


def test_backoff_grows_exponentially_with_jitter_then_gives_up(sleeps):
    failures = [RetryableError("refused")] * 4
    policy = RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=100)
    with pytest.raises(RewardUnavailable, match="no answer after 4 attempts"):
        RewardClient("x", transports=[ScriptedTransport("a", failures)], retry=policy, seed=0).score([{"text": "t"}])
    assert len(sleeps) == 3
    for attempt, slept in enumerate(sleeps):
        assert 0.5 * 2**attempt <= slept <= 2**attempt


def test_delay_is_capped():
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0)
    assert policy.delay(10, None, random.Random(0)) <= 5.0
    assert policy.delay(0, 60.0, random.Random(0)) == 5.0


def test_round_robin_spreads_requests_and_fails_over(sleeps):
    a = ScriptedTransport("a", [OK, RetryableError("down"), OK])
    b = ScriptedTransport("b", [OK, OK])
    client = RewardClient("x", transports=[a, b])
    for _ in range(3):
        client.score([{"text": "t"}])
    assert len(a.requests) == 2 and len(b.requests) == 2  # a, b, a (fails) -> b


def test_an_unreachable_url_leaves_the_rotation_and_the_retry_goes_at_once(sleeps):
    a = ScriptedTransport("a", [RetryableError("refused", unreachable=True)])
    b = ScriptedTransport("b", [OK] * 5)
    client = RewardClient("x", transports=[a, b])
    for _ in range(5):
        client.score([{"text": "t"}])
    assert len(a.requests) == 1 and len(b.requests) == 5 and sleeps == []  # no backoff, a never asked again


def test_with_every_url_out_all_are_tried_with_backoff(sleeps):
    a = ScriptedTransport("a", [RetryableError("refused", unreachable=True)] * 2 + [OK])
    b = ScriptedTransport("b", [RetryableError("refused", unreachable=True)] * 2)
    client = RewardClient("x", transports=[a, b], seed=0)
    assert client.score([{"text": "t"}]).rewards == [0.5]
    assert len(a.requests) == 3 and len(b.requests) == 2
    assert len(sleeps) == 3 and sleeps[0] > 0  # once b failed too (a was already out), every failure backs off


def test_the_health_probe_brings_a_url_back(caplog):
    import threading
    import time

    from rewardserve.trainer.client.reward_client import _Replicas

    up = threading.Event()
    a, b = object(), object()
    replicas = _Replicas([a, b], [up.is_set, lambda: True], probe_interval=0.01)
    with caplog.at_level("WARNING"):
        assert replicas.unreachable(a, RuntimeError("refused")) is True
        assert {replicas.pick() for _ in range(4)} == {b}
        up.set()
        deadline = time.monotonic() + 10
        while {replicas.pick() for _ in range(4)} != {a, b} and time.monotonic() < deadline:
            time.sleep(0.01)
    assert {replicas.pick() for _ in range(4)} == {a, b}
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2 and "not answering (refused); out of the rotation" in messages[0]
    assert "answering again after a" in messages[1] and "back in the rotation" in messages[1]


def test_async_client_shares_the_policy(monkeypatch):
    slept = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(client_module.asyncio, "sleep", fake_sleep)
    transport = AsyncScripted("a", [RetryableError("503", retry_after=2.0), OK])
    result = asyncio.run(AsyncRewardClient("x", transports=[transport]).score([{"text": "t"}]))
    assert result.scores == [1.0] and slept == [2.0]


def test_bad_urls_are_refused_clearly():
    with pytest.raises(ValueError, match="http://, https://, grpc:// or grpcs://"):
        RewardClient("ftp://host:1")
    with pytest.raises(ValueError, match="at least one"):
        RewardClient(" , ")


def test_grpc_targets_keep_the_resolver_syntax():
    from rewardserve.trainer.client.transports import _grpc_target

    assert _grpc_target("grpc://127.0.0.1:50051") == ("127.0.0.1:50051", False)
    assert _grpc_target("grpcs://dns:///reward-server:50051") == ("dns:///reward-server:50051", True)
