"""Load on a real server: a bounded soak with 64 concurrent clients, and backpressure the client rides out."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from rewardserve.trainer.client import RetryPolicy, RewardClient

from ..conftest import ServerProcess

WORDS = "the reward model scores each answer to every question with care and speed".split()


def item_pool(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 40))),
             "response": " ".join(rng.choices(WORDS, k=rng.randint(1, 120)))} for _ in range(count)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def errors_of_kind(server, kind: str) -> float:
    lines = httpx.get(f"{server.http_url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(f'rewardserve_errors_total{{kind="{kind}"}}'))


@pytest.mark.slow
def test_soak_64_clients_mixed_batches(tiny_llama):
    """64 clients, batches of 1-32 items of mixed lengths, bounded to 90 s: every score equals the item's score
    when sent alone, no errors, and the server's memory does not keep growing."""
    server = ServerProcess(tiny_llama, "--max-queue-items", "8192")
    pool = item_pool(256)
    try:
        with RewardClient(server.http_url) as alone:
            expected = [alone.score([item]).scores[0] for item in pool]
        rss_before = rss_mb(server.process.pid)
        deadline = time.monotonic() + 90

        def client(index: int):
            rng = random.Random(index)
            latencies, mismatches = [], 0
            url = server.http_url if index % 2 else server.grpc_url
            with RewardClient(url, retry=RetryPolicy(max_attempts=1)) as reward:
                for _ in range(15):
                    if time.monotonic() > deadline:
                        break
                    picks = [rng.randrange(len(pool)) for _ in range(rng.randint(1, 32))]
                    began = time.perf_counter()
                    scores = reward.score([pool[i] for i in picks]).scores
                    latencies.append(time.perf_counter() - began)
                    mismatches += sum(abs(s - expected[i]) > 1e-4 for s, i in zip(scores, picks))
            return latencies, mismatches

        with ThreadPoolExecutor(64) as threads:
            results = list(threads.map(client, range(64)))
        latencies = sorted(t for lat, _ in results for t in lat)
        growth = rss_mb(server.process.pid) - rss_before
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        print(f"\nsoak: {len(latencies)} requests, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms,"
              f" RSS growth {growth:.1f} MB")
        assert len(latencies) >= 64 * 5
        assert sum(m for _, m in results) == 0
        assert errors_of_kind(server, "internal") == 0
        assert growth < 300, f"RSS grew by {growth:.0f} MB"
    finally:
        assert server.stop() == 0


@pytest.mark.slow  # 18 s; the full queue's Overloaded (503 + Retry-After) is unit-tested in test_batcher.py
def test_backpressure_gives_503_with_retry_after_and_the_client_rides_it_out(tiny_llama):
    server = ServerProcess(tiny_llama, "--max-queue-items", "16", "--max-wait-ms", "50")
    pool = item_pool(16, seed=1)
    try:
        with ThreadPoolExecutor(32) as threads:
            raw = list(threads.map(lambda _: httpx.post(f"{server.http_url}/score", json={"items": pool}, timeout=60),
                                   range(32)))
        refused = [r for r in raw if r.status_code == 503]
        assert refused and all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        assert {r.status_code for r in raw} <= {200, 503}

        def patient(_):
            with RewardClient(server.http_url, retry=RetryPolicy(max_attempts=30, max_delay=2)) as reward:
                return len(reward.score(pool).scores)

        with ThreadPoolExecutor(32) as threads:
            assert list(threads.map(patient, range(32))) == [16] * 32
        assert errors_of_kind(server, "overloaded") >= len(refused)
    finally:
        server.stop()
