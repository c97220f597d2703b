"""`RewardClient` and `AsyncRewardClient`: score items on one or more reward servers, by URL.

Layered like httpx: `score(items)` -> `_with_retries` (exponential backoff with jitter, honours Retry-After,
retries connection errors, timeouts, 5xx and 503, never a 4xx) -> `_send_once` (round-robin over the URLs, so a
retry also fails over to the next server) -> the transport (HTTP or gRPC, by URL scheme).

    client = RewardClient(["http://10.0.0.5:8000", "grpc://10.0.0.6:50051"])
    result = client.score([{"prompt": "Hi", "response": "Hello!"}])
    result.rewards  # [0.73]
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from dataclasses import dataclass

from .transports import (
    RequestRejected,
    RetryableError,
    RewardClientError,
    RewardUnavailable,
    make_async_transport,
    make_transport,
)

__all__ = ["AsyncRewardClient", "RequestRejected", "RetryPolicy", "RewardClient", "RewardClientError",
           "RewardUnavailable", "RewardTarget", "ScoreResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreResult:
    scores: list[float]
    rewards: list[float]
    truncated: list[bool]
    transform: dict
    model: str
    model_version: str = ""
    components: dict | None = None  # name -> {scores, rewards, truncated, transform, model_version}
    combination: dict | None = None
    chosen: list[str] | None = None
    std: list[float] | None = None
    replica: str = ""  # the URL that answered (a load-balanced URL names its pool, not the replica behind it)

    @classmethod
    def from_response(cls, body: dict) -> "ScoreResult":
        return cls(body["scores"], body["rewards"], body["truncated"], body["transform"], body["model"],
                   body.get("model_version", ""), body.get("components"), body.get("combination"),
                   body.get("chosen"), body.get("std"), body.get("replica", ""))


@dataclass(frozen=True)
class RewardTarget:
    """Which of a server's models answers: one (`model`), several side by side (`models`), or a combination
    declared at the server's start; all None for the server's default."""

    model: str | None = None
    models: tuple[str, ...] | None = None
    combination: str | None = None

    @classmethod
    def from_names(cls, models: list[str] | None, combination: str | None) -> "RewardTarget":
        """What a `--model a[,b]` / `--combination` pair of flags asks for: one model, several, or a combination."""
        names = models or []
        return cls(model=names[0] if len(names) == 1 else None, models=tuple(names) if len(names) > 1 else None,
                   combination=combination)

    def fields(self) -> dict:
        fields = {"model": self.model, "models": list(self.models) if self.models else None,
                  "combination": self.combination}
        return {key: value for key, value in fields.items() if value}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a server's Retry-After replaces the computed delay."""

    max_attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 15.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based): base * 2^attempt, jittered to 50-100%."""
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return min(self.max_delay, self.base_delay * 2**attempt) * rng.uniform(0.5, 1.0)


def build_request(items: list[dict], transform: str | None, target: RewardTarget | None = None) -> dict:
    if not items:
        raise ValueError("score() needs at least one item")
    request = {"items": items} | (target.fields() if target else {})
    return request | {"transform": transform} if transform else request


def _split_urls(urls: str | list[str]) -> list[str]:
    if isinstance(urls, str):
        urls = urls.split(",")
    urls = [u.strip().rstrip("/") for u in urls if u.strip()]
    if not urls:
        raise ValueError("give at least one reward server URL")
    return urls


class _OutageLog:
    """Logs when the servers stop answering and, once they answer again, how long the outage lasted."""

    def __init__(self):
        self.since: float | None = None

    def failed(self, error: Exception) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("reward server not answering (%s); retrying with backoff", error)

    def recovered(self) -> None:
        if self.since is not None:
            log.warning("reward server answering again after a %.1f s outage", time.monotonic() - self.since)
            self.since = None


class _ClientCore:
    """Everything the sync and async clients share: URLs, transports, round-robin, and the retry decisions."""

    _make_transport = staticmethod(make_transport)

    def __init__(self, urls: str | list[str], timeout: float = 60.0, api_key: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), transports: list | None = None, seed: int | None = None,
                 ca_file: str | None = None):
        self.urls = _split_urls(urls) if transports is None else []
        self._transports = transports or [self._make_transport(u, timeout, api_key, ca_file) for u in self.urls]
        self._next = itertools.cycle(self._transports)
        self.retry = retry
        self._rng = random.Random(seed)
        self._outage = _OutageLog()

    def _delay_after(self, attempt: int, error: RetryableError) -> float:
        """Seconds to wait before the next attempt, or RewardUnavailable once the attempts are spent."""
        self._outage.failed(error)
        if attempt + 1 == self.retry.max_attempts:
            raise RewardUnavailable(f"no answer after {attempt + 1} attempts; last: {error}") from error
        return self.retry.delay(attempt, error.retry_after, self._rng)


class RewardClient(_ClientCore):
    def score(self, items: list[dict], transform: str | None = None, target: RewardTarget | None = None) -> ScoreResult:
        return ScoreResult.from_response(self._with_retries(build_request(items, transform, target)))

    def _with_retries(self, request: dict) -> dict:
        for attempt in range(self.retry.max_attempts):
            try:
                body = self._send_once(request)
            except RetryableError as error:
                time.sleep(self._delay_after(attempt, error))
            else:
                self._outage.recovered()
                return body
        raise AssertionError("unreachable")

    def _send_once(self, request: dict) -> dict:
        transport = next(self._next)
        return transport.send(request) | {"replica": getattr(transport, "url", "")}

    def close(self) -> None:
        for transport in self._transports:
            transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRewardClient(_ClientCore):
    _make_transport = staticmethod(make_async_transport)

    async def score(self, items: list[dict], transform: str | None = None,
                    target: RewardTarget | None = None) -> ScoreResult:
        return ScoreResult.from_response(await self._with_retries(build_request(items, transform, target)))

    async def _with_retries(self, request: dict) -> dict:
        for attempt in range(self.retry.max_attempts):
            try:
                body = await self._send_once(request)
            except RetryableError as error:
                await asyncio.sleep(self._delay_after(attempt, error))
            else:
                self._outage.recovered()
                return body
        raise AssertionError("unreachable")

    async def _send_once(self, request: dict) -> dict:
        transport = next(self._next)
        return await transport.send(request) | {"replica": getattr(transport, "url", "")}

    async def close(self) -> None:
        for transport in self._transports:
            await transport.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
