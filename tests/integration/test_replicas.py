"""Several reward URLs, one of them down: the down one leaves the rotation after its first refusal (no request waits
on it again, no backoff while another URL answers), and rejoins once a server answers there."""
from __future__ import annotations

import logging
import time

import pytest

from rewardserve.trainer.client import AsyncRewardClient, RewardClient

from ..conftest import ServerProcess, free_port

ITEM = [{"prompt": "Hi", "response": "Hello"}]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_a_dead_url_costs_no_backoff_after_its_first_refusal(running_server, scheme, caplog):
    live = running_server.http_url if scheme == "http" else running_server.grpc_url
    dead = f"{scheme}://127.0.0.1:{free_port()}"
    client = RewardClient([dead, live], timeout=10)
    with caplog.at_level(logging.WARNING, logger="rewardserve.trainer.client"):
        began = time.perf_counter()
        replicas = [client.score(ITEM).replica for _ in range(20)]
        seconds = time.perf_counter() - began
    assert set(replicas) == {live}
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith(f"reward server {dead} not answering"), warnings
    assert seconds < 10, seconds  # 20 tiny forwards; one backoff alone would be 0.125-0.25 s, each step's 1-5 s
    client.close()


def test_the_async_client_keeps_a_dead_url_out_too(running_server):
    import asyncio

    async def run() -> list[str]:
        client = AsyncRewardClient([f"http://127.0.0.1:{free_port()}", running_server.http_url], timeout=10)
        try:
            return [(await client.score(ITEM)).replica for _ in range(6)]
        finally:
            await client.close()

    assert set(asyncio.run(run())) == {running_server.http_url}


@pytest.mark.slow  # 7 s (a second server starts); the dead-URL tests above stay in the default suite
def test_a_url_whose_server_comes_up_rejoins_the_rotation(running_server, tiny_llama, caplog):
    ports = (free_port(), free_port())
    late = f"http://127.0.0.1:{ports[0]}"
    client = RewardClient([late, running_server.http_url], timeout=10, probe_interval=0.2)
    with caplog.at_level(logging.WARNING, logger="rewardserve.trainer.client"):
        assert {client.score(ITEM).replica for _ in range(4)} == {running_server.http_url}
        server = ServerProcess(tiny_llama, "--reward-mean", "0.1", "--reward-std", "2.0", ports=ports)
        try:
            deadline = time.monotonic() + 30
            while late not in {client.score(ITEM).replica for _ in range(4)} and time.monotonic() < deadline:
                time.sleep(0.1)
            assert {client.score(ITEM).replica for _ in range(4)} == {late, running_server.http_url}
        finally:
            server.stop()
    assert any(f"reward server {late} answering again after a" in record.getMessage() for record in caplog.records)
    client.close()
