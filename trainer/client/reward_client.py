"""`RewardClient` and `AsyncRewardClient`: score items on one or more reward servers, by URL.

Layered like httpx: `score(items)` -> `_with_retries` (exponential backoff with jitter, honours Retry-After,
retries connection errors, timeouts, 5xx and 503, never a 4xx nor an untrusted certificate) -> `_Replicas.pick`
(round-robin over the URLs in rotation: one that does not answer leaves it, and the retry goes at once to the next;
a background health probe brings it back) -> the transport (HTTP or gRPC, by URL scheme).

    client = RewardClient(["http://10.0.0.5:8000", "grpc://10.0.0.6:50051"])
    result = client.score([{"prompt": "Hi", "response": "Hello!"}])
    result.rewards  # [0.73]
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass

from .transports import (
    RequestRejected,
    RetryableError,
    RewardClientError,
    RewardUnavailable,
    UntrustedServer,
    make_async_transport,
    make_transport,
    probe_for,
)

__all__ = ["AsyncRewardClient", "RequestRejected", "RetryPolicy", "RewardClient", "RewardClientError",
           "RewardUnavailable", "RewardTarget", "ScoreResult", "UntrustedServer"]

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
    outputs: dict[str, list[float]] | None = None  # a model of several outputs (a judge): name -> one per item
    checks: list[dict] | None = None  # a verifier: {verdict, answer} per item
    step_scores: list[list[float]] | None = None  # a process reward model: each item's step scores

    @classmethod
    def from_response(cls, body: dict) -> "ScoreResult":
        return cls(body["scores"], body["rewards"], body["truncated"], body["transform"], body["model"],
                   body.get("model_version", ""), body.get("components"), body.get("combination"),
                   body.get("chosen"), body.get("std"), body.get("replica", ""), body.get("outputs"),
                   body.get("checks"), body.get("step_scores"))


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


class _Replicas:
    """The reward URLs in rotation. One that does not answer at all leaves the rotation at once, so no request
    waits on it again, and a health probe in a background thread puts it back once it passes; while every URL is
    out, they are all tried, with backoff. Each URL's outage is logged once when it starts and once when it ends."""

    def __init__(self, transports: list, probes: list | None, probe_interval: float = 1.0):
        self._transports = transports
        self._probes = probes  # one `() -> bool` per transport; None: no background probe (injected transports)
        self._probe_interval = probe_interval
        self._down: dict[int, float] = {}  # transport index -> when its outage began (monotonic)
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._prober: threading.Thread | None = None  # running while some URL is out; set and cleared under the lock
        self._closed = threading.Event()

    def pick(self):
        """Round-robin over the URLs in rotation (over all of them when none is)."""
        with self._lock:
            live = [t for i, t in enumerate(self._transports) if i not in self._down] or self._transports
            return live[next(self._turn) % len(live)]

    def unreachable(self, transport, error: Exception) -> bool:
        """Takes `transport` out of the rotation; True when another URL is still in it (retry there at once)."""
        index = self._transports.index(transport)
        with self._lock:
            if index not in self._down:
                self._down[index] = time.monotonic()
                log.warning("reward server %s not answering (%s); out of the rotation until it answers its health"
                            " check", _url_of(transport), error)
            if self._probes is not None and self._prober is None and not self._closed.is_set():
                self._prober = threading.Thread(target=self._probe_until_all_back, name="reward-health-probe",
                                                daemon=True)
                self._prober.start()
            return len(self._down) < len(self._transports)

    def answered(self, transport) -> None:
        self._back(self._transports.index(transport))

    def _back(self, index: int) -> None:
        with self._lock:
            since = self._down.pop(index, None)
        if since is not None:
            log.warning("reward server %s answering again after a %.1f s outage; back in the rotation",
                        _url_of(self._transports[index]), time.monotonic() - since)

    def close(self) -> None:
        """Stops the probe (the client is closed)."""
        self._closed.set()

    def _probe_until_all_back(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                down = list(self._down)
                if not down:  # decided under the lock, so a URL that goes out now starts a new probe
                    self._prober = None
                    return
            for index in down:
                if self._probes[index]():
                    self._back(index)
            self._closed.wait(self._probe_interval)
        with self._lock:
            self._prober = None


def _url_of(transport) -> str:
    return getattr(transport, "url", repr(transport))


class _ClientCore:
    """Everything the sync and async clients share: URLs, transports, the rotation, and the retry decisions."""

    _make_transport = staticmethod(make_transport)

    def __init__(self, urls: str | list[str], timeout: float = 60.0, api_key: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), transports: list | None = None, seed: int | None = None,
                 ca_file: str | None = None, probe_interval: float = 1.0):
        self.urls = _split_urls(urls) if transports is None else []
        self._transports = transports or [self._make_transport(u, timeout, api_key, ca_file) for u in self.urls]
        probes = None if transports else [functools.partial(probe_for(u), u, ca_file) for u in self.urls]
        self._replicas = _Replicas(self._transports, probes, probe_interval)
        self.retry = retry
        self._rng = random.Random(seed)

    def _after_failure(self, attempt: int, transport, error: RetryableError) -> float:
        """Seconds to wait before the next attempt: none when another URL is in the rotation; RewardUnavailable once
        the attempts are spent."""
        another_in_rotation = error.unreachable and self._replicas.unreachable(transport, error)
        if attempt + 1 == self.retry.max_attempts:
            raise RewardUnavailable(f"no answer after {attempt + 1} attempts; last: {error}") from error
        return 0.0 if another_in_rotation else self.retry.delay(attempt, error.retry_after, self._rng)


class RewardClient(_ClientCore):
    def score(self, items: list[dict], transform: str | None = None, target: RewardTarget | None = None) -> ScoreResult:
        return ScoreResult.from_response(self._with_retries(build_request(items, transform, target)))

    def _with_retries(self, request: dict) -> dict:
        for attempt in range(self.retry.max_attempts):
            transport = self._replicas.pick()
            try:
                body = transport.send(request)
            except RetryableError as error:
                if delay := self._after_failure(attempt, transport, error):
                    time.sleep(delay)
            else:
                self._replicas.answered(transport)
                return body | {"replica": getattr(transport, "url", "")}
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._replicas.close()
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
            transport = self._replicas.pick()
            try:
                body = await transport.send(request)
            except RetryableError as error:
                if delay := self._after_failure(attempt, transport, error):
                    await asyncio.sleep(delay)
            else:
                self._replicas.answered(transport)
                return body | {"replica": getattr(transport, "url", "")}
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._replicas.close()
        for transport in self._transports:
            await transport.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
