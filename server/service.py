"""The protocol-independent scoring core. HTTP and gRPC both call `ScoringService.score`; neither sees a model.

score(request): check the limits that depend on configuration -> find the model(s) the request names -> tokenize
with each model's tokenizer in a thread pool -> submit to the one batcher, each model's items to its engine (a
verifier's to its checker pool) -> await one future per item -> apply each model's transform, and the combination
if one was named -> assemble the response.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from . import metrics
from .batcher import Batcher
from .combinations import combine
from .admission import MemoryTrimmer, TokenizingBudget
from .errors import (Forbidden, Internal, InvalidInput, NotReady, Overloaded, RateLimited, RewardServeError,
                     TooManyItems, TransformUnavailable, Unauthorized, UnscorableItem)
from .normalization import RewardTransform
from .steps import aggregate_steps
from .rate_limit import RateLimiter
from .registry import ModelRegistry, ServedModel, Target
from .reloading import Reloader
from .schemas import (CheckOut, CombinationOut, ComponentScores, ReloadRequest, ReloadResponse, ScoreItem, ScoreRequest,
                      ScoreResponse, ServerInfo, TransformChoice, TransformOut)
from .tokenization import WHOLE_TEXT_CHARS, EncodedItem
from .verifiers import Check, CheckFailed

log = logging.getLogger(__name__)


class ScoringService:
    def __init__(
        self,
        registry: ModelRegistry | None,
        batcher: Batcher,
        beta: float = 1.0,
        max_items_per_request: int = 1024,
        api_key: str | None = None,
        tokenizer_threads: int = 2,
        rate_limit: float = 0.0,
        reloader: Reloader | None = None,
        admin_key: str | None = None,
        max_inflight_characters: int = 16_000_000,
        step_separator: str = "\n",
    ):
        """step_separator: what joins an item's `steps` into the response that models other than a process reward
        model (and verifiers) read."""
        self.registry = registry
        self.reloader = reloader
        self._admin_key = admin_key.encode() if admin_key else None
        self.batcher = batcher
        self.beta = beta
        self.max_items_per_request = max_items_per_request
        self.step_separator = step_separator
        self._api_key = api_key.encode() if api_key else None
        self._tokenizer_pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="rewardserve-tokenize")
        # small requests tokenize on a thread of their own, never queued behind a large request's tokenizing
        self._quick_pool = ThreadPoolExecutor(1, thread_name_prefix="rewardserve-tokenize-quick")
        self._budget = TokenizingBudget(max_inflight_characters)
        self._overloaded_until = 0.0  # while a refusal is this recent, large bodies are refused before parsing
        self._trimmer = MemoryTrimmer()
        self._rate_limiter = RateLimiter(rate_limit) if rate_limit > 0 else None
        self._ready = False
        self._draining = False

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start_serving(self, registry: ModelRegistry, reloader: Reloader | None) -> None:
        """The models are loaded and warm: from now on requests are scored (the ports opened before, answering
        503 / UNAVAILABLE meanwhile, as readiness probes and load balancers expect)."""
        self.registry, self.reloader = registry, reloader
        self._ready = True

    def start_draining(self) -> None:
        self._draining = True

    def is_ready(self) -> bool:
        return self._ready and not self._draining

    def info(self) -> ServerInfo:
        registry = self.registry
        if registry is None:
            raise NotReady("the server is loading its models; /info answers once /ready does")
        return ServerInfo(**registry.default_model().live_info().model_dump(), default=registry.default,
                          models=[model.live_info() for model in registry.models()],
                          combinations=[CombinationOut(**c.describe()) for c in registry.combinations.values()])

    @property
    def default_is_combination(self) -> bool:
        return self.registry is not None and self.registry.default in self.registry.combinations

    def check_api_key(self, presented: str | None) -> None:
        """Constant-time comparison, so response timing does not leak how much of a guessed key was right."""
        if self._api_key is None:
            return
        if presented is None or not hmac.compare_digest(presented.encode(), self._api_key):
            raise Unauthorized("missing or wrong API key: send `Authorization: Bearer <key>`")

    def check_admin_key(self, presented: str | None) -> None:
        if self._admin_key is None or self.reloader is None:
            raise Forbidden("reload is off: start the server with --allow-reload-from DIR and --admin-key KEY")
        if presented is None or not hmac.compare_digest(presented.encode(), self._admin_key):
            raise Unauthorized("missing or wrong admin key: send `Authorization: Bearer <admin key>`")

    async def reload(self, request: ReloadRequest, admin_key: str | None, protocol: str) -> ReloadResponse:
        """Replaces one model by a checkpoint (or re-reads its own) without stopping; see server/reloading.py."""
        try:
            if self.registry is None:
                raise NotReady("the server is loading its models; reload once /ready answers 200")
            self.check_admin_key(admin_key)
            name = request.model or self.registry.names[0]
            outcome = await self.reloader.reload(name, request.path)
        except RewardServeError as error:
            self.record_error(error, protocol)
            raise
        return ReloadResponse(**asdict(outcome))

    def admit(self, client: str, protocol: str) -> None:
        """Per-client rate limit (--rate-limit requests/s); raises RateLimited with the wait before the next one."""
        if self._rate_limiter is None:
            return
        wait = self._rate_limiter.wait_time(client)
        if wait > 0:
            error = RateLimited(f"more than {self._rate_limiter.rate:g} requests/s from {client}; slow down",
                                retry_after=wait)
            self.record_error(error, protocol)
            raise error

    def transform_for(self, model: ServedModel, name: TransformChoice | None) -> RewardTransform:
        if name is None:
            return model.default_transform
        if name == "whiten" and model.statistics is None:
            raise TransformUnavailable(
                f"whitened rewards need reward statistics, and model {model.name!r} has none; ask for `raw`, or"
                " start the server with --reward-mean and --reward-std"
            )
        if name == "debias" and model.length_fit is None:
            raise TransformUnavailable(
                f"the length-debiased reward needs the checkpoint's length fit, and model {model.name!r} has none;"
                " checkpoints from `rewardserve train` store it (`reward_length_fit` in config.json)"
            )
        return RewardTransform(name, model.statistics if name == "whiten" else None, self.beta,
                               model.length_fit if name == "debias" else None)

    # -- scoring --------------------------------------------------------------------------------------------------
    async def score(self, request: ScoreRequest, request_id: str | None = None, protocol: str = "python",
                    client: str | None = None) -> ScoreResponse:
        """protocol: the adapter's (`http`, `grpc`), a label of the request and item counters. client: who sent it
        (an address and port: one connection), whose share of the in-flight characters it draws on."""
        request_id = request_id or uuid.uuid4().hex[:12]
        started = time.perf_counter()
        characters = request_characters(request)
        try:
            with self._admitted(client or protocol, characters):
                response = await self._score(request, protocol, characters)
        except RewardServeError as error:
            self.record_error(error, protocol)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.exception("request %s failed", request_id)
            internal = Internal(f"unexpected error (request id {request_id}); the server logged it")
            self.record_error(internal, protocol)
            raise internal from error
        metrics.REQUEST_LATENCY.observe(time.perf_counter() - started)
        metrics.REQUESTS.labels("ok", protocol).inc()
        return response

    @contextlib.contextmanager
    def _admitted(self, client: str, characters: int):
        """Holds the request's characters in the budget while it is tokenized, queued and scored; a request that
        does not fit is answered 503 at once, before any of that work."""
        if not self._budget.try_admit(client, characters):
            retry_after = self.batcher.retry_after()
            self._overloaded_until = time.monotonic() + retry_after
            raise Overloaded(f"the server holds {self._budget.admitted:,} characters of requests in flight (limit"
                             f" {self._budget.capacity:,}, --max-inflight-characters); this request's"
                             f" {characters:,} do not fit: retry after the indicated delay", retry_after=retry_after)
        metrics.INFLIGHT_CHARACTERS.set(self._budget.admitted)
        try:
            yield
        finally:
            self._budget.release(client, characters)
            metrics.INFLIGHT_CHARACTERS.set(self._budget.admitted)

    async def _score(self, request: ScoreRequest, protocol: str, characters: int = 0) -> ScoreResponse:
        if not self.is_ready():
            raise NotReady("the server is not ready (loading the model or shutting down); retry shortly")
        if len(request.items) > self.max_items_per_request:
            raise TooManyItems(
                f"{len(request.items)} items in one request, over the limit of {self.max_items_per_request};"
                " split the request"
            )
        target = self.registry.target(request)  # read once: a reload meanwhile does not touch this request
        if target.combination is not None and request.transform is not None:
            raise InvalidInput(f"combination {target.name!r} whitens each model's score itself; leave out `transform`")
        transforms = [self.transform_for(model, "whiten" if target.combination else request.transform)
                      for model in target.models]
        request = with_steps_joined(request, self.step_separator)
        forwarded = [(model, transform) for model, transform in zip(target.models, transforms) if not model.verifier]
        checked = [model for model in target.models if model.verifier]
        answers = [checked_answers(request.items, model) for model in checked]  # 422 before any work
        pool = self._quick_pool if characters <= QUICK_CHARACTERS else self._tokenizer_pool
        encoded = await asyncio.gather(*(self._tokenize(model, request, transform.needs_lengths, pool)
                                         for model, transform in forwarded))
        forward_futures = self.batcher.submit_group([([item.input_ids for item in items], model.engine)
                                                     for (model, _), items in zip(forwarded, encoded)])
        request_key = object()  # the checker pool takes one check of each waiting request in turn
        check_futures = [model.checker.check(model.verifier, pairs, request_key)
                         for model, pairs in zip(checked, answers)]
        results = await self._scores_of(forward_futures + check_futures)
        metrics.TRUNCATED.inc(sum(item.truncated for items in encoded for item in items))
        for model in target.models:
            metrics.MODEL_ITEMS.labels(model.name, model.version, protocol).inc(len(request.items))
        parts = {model.name: (items, scores) for (model, _), items, scores in zip(forwarded, encoded, results)}
        parts |= {model.name: checks for model, checks in zip(checked, results[len(forwarded):])}
        components = [self._checked(parts[model.name], transform, model) if model.verifier else
                      self._component(*parts[model.name], transform, model)
                      for model, transform in zip(target.models, transforms)]
        return self._response(target, request, components)

    @staticmethod
    async def _scores_of(futures: list[list[asyncio.Future]]) -> list[list]:
        """Each model's scores (a verifier's `Check`s), once every item's future is done; the first item that failed
        fails the request, named by its index. Whatever is still queued is cancelled if the request fails or its
        client goes."""
        flat = [future for model_futures in futures for future in model_futures]
        try:
            await asyncio.wait(flat, return_when=asyncio.FIRST_EXCEPTION)
            failed = [(index, future.exception()) for index, future in enumerate(flat)
                      if future.done() and not future.cancelled() and future.exception() is not None]
            if failed:
                index, error = failed[0]
                if isinstance(error, UnscorableItem):
                    raise UnscorableItem(f"items[{index % len(futures[0])}]: {error.message}") from None
                if isinstance(error, CheckFailed):  # the checker raised on this item: its error, not the server's
                    raise UnscorableItem(f"items[{index % len(futures[0])}]: the answer checker failed on it:"
                                         f" {error}") from None
                raise error
        finally:
            for future in flat:
                future.cancel()  # a no-op for the done ones: spares the forward passes of the rest
        return [[future.result() for future in model_futures] for model_futures in futures]

    @staticmethod
    def _component(items: list[EncodedItem], results: list, transform: RewardTransform,
                   model: ServedModel) -> ComponentScores:
        """results: a score per item, or for a model of several outputs [reward, *outputs] per item."""
        outputs, step_scores = None, None
        scores = results
        if model.step_aggregate:
            scores, step_scores = [aggregate_steps(steps, model.step_aggregate) for steps in results], results
        elif model.output_names:
            scores = [row[0] for row in results]
            outputs = {name: [row[1 + k] for row in results] for k, name in enumerate(model.output_names)}
        lengths = [item.response_length for item in items] if transform.needs_lengths else None
        return ComponentScores(scores=scores, rewards=transform.apply(scores, lengths),
                               truncated=[item.truncated for item in items],
                               transform=TransformOut(**transform.describe()), model_version=model.version,
                               outputs=outputs, step_scores=step_scores)

    @staticmethod
    def _checked(checks: list[Check], transform: RewardTransform, model: ServedModel) -> ComponentScores:
        """A verifier's part: the checks' scores, and what each check found."""
        for check in checks:
            metrics.VERIFIER_CHECKS.labels(model.name, check.verdict).inc()
        scores = [check.score for check in checks]
        outputs = {"correct": [float(c.verdict == "correct") for c in checks],
                   "answer_found": [float(c.verdict in ("correct", "wrong")) for c in checks],
                   "timed_out": [float(c.verdict == "timeout") for c in checks]}
        return ComponentScores(scores=scores, rewards=transform.apply(scores), truncated=[False] * len(checks),
                               transform=TransformOut(**transform.describe()), model_version=model.version,
                               outputs=outputs, checks=[CheckOut(verdict=c.verdict, answer=c.answer) for c in checks])

    @staticmethod
    def _response(target: Target, request: ScoreRequest, components: list[ComponentScores]) -> ScoreResponse:
        first = components[0]
        if target.kind == "model":
            return ScoreResponse(model=target.name, scores=first.scores, rewards=first.rewards,
                                 truncated=first.truncated, transform=first.transform, model_version=first.model_version,
                                 outputs=first.outputs, checks=first.checks, step_scores=first.step_scores)
        by_name = {model.name: part for model, part in zip(target.models, components)}
        versions = ",".join(f"{name}={part.model_version}" for name, part in by_name.items())
        truncated = [any(flags) for flags in zip(*(part.truncated for part in components))]
        if target.kind == "models":
            return ScoreResponse(model=target.name, scores=first.scores, rewards=first.rewards, truncated=truncated,
                                 transform=first.transform, model_version=versions, components=by_name,
                                 outputs=first.outputs, checks=first.checks, step_scores=first.step_scores)
        combination = target.combination
        combined = combine(combination, {name: part.scores for name, part in by_name.items()},
                           {model.name: model.statistics for model in target.models},
                           flagged=[bool(item.safety) for item in request.items])
        return ScoreResponse(model=combination.name, scores=combined.scores, rewards=combined.rewards,
                             truncated=truncated, transform=TransformOut(name="whiten"), model_version=versions,
                             components=by_name, combination=CombinationOut(**combination.describe()),
                             chosen=combined.chosen, std=combined.std)

    async def _tokenize(self, model: ServedModel, request: ScoreRequest, response_lengths: bool,
                        pool: ThreadPoolExecutor) -> list[EncodedItem]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(pool, model.encoder.encode_all, request.items, response_lengths)
        metrics.TOKENIZE_LATENCY.observe(time.perf_counter() - started)
        return encoded

    def refuse_before_parsing(self, size: int) -> None:
        """An adapter's body of `size` bytes, before it is parsed: while the server has just refused a request for
        want of room, a body larger than a small request is refused at once (a flood's bodies would otherwise each
        be parsed, on the event loop every client shares, only to be refused)."""
        if size > self._budget.capacity // 64 and time.monotonic() < self._overloaded_until:
            metrics.INFLIGHT_CHARACTERS.set(self._budget.admitted)
            raise Overloaded(f"the server is refusing requests for want of room (--max-inflight-characters"
                             f" {self._budget.capacity:,}); a {size:,}-byte request is refused before it is read:"
                             " retry after the indicated delay",
                             retry_after=max(1.0, self._overloaded_until - time.monotonic()))

    def after_request(self, size: int) -> None:
        """An adapter's request of `size` bytes is answered: after a large one, freed memory goes back to the
        system (off the event loop)."""
        if self._trimmer.due(size):
            asyncio.get_running_loop().run_in_executor(None, self._trimmer.trim)

    @staticmethod
    def record_error(error: RewardServeError, protocol: str) -> None:
        metrics.ERRORS.labels(error.kind).inc()
        metrics.REQUESTS.labels(error.kind, protocol).inc()

    def close(self) -> None:
        self._tokenizer_pool.shutdown(wait=False)
        self._quick_pool.shutdown(wait=False)


QUICK_CHARACTERS = 32_768  # a request this small tokenizes on the quick thread (milliseconds of work)


def request_characters(request: ScoreRequest) -> int:
    """What a request asks the tokenizer to read: its characters, each text counted up to what tokenizing reads of
    it (a longer one is cut to its tail first: tokenization.WHOLE_TEXT_CHARS), a token id as one."""
    def read(text: str | None) -> int:
        return min(len(text), WHOLE_TEXT_CHARS) if text else 0

    total = 0
    for item in request.items:
        total += read(item.prompt) + read(item.response) + read(item.text) + len(item.input_ids or ())
        total += len(item.reference or "") + sum(map(len, item.steps or ()))
        if item.messages:
            total += sum(read(message.content) for message in item.messages)
    return total


def with_steps_joined(request: ScoreRequest, separator: str) -> ScoreRequest:
    """Items given as `steps` also carry them joined into a `response`: what reward models, judges and verifiers
    read (a process reward model reads the steps themselves)."""
    if not any(item.steps is not None for item in request.items):
        return request
    items = [item.model_copy(update={"response": separator.join(item.steps)}) if item.steps is not None else item
             for item in request.items]
    return request.model_copy(update={"items": items})


def checked_answers(items: list[ScoreItem], model: ServedModel) -> list[tuple[str, str | None]]:
    """(the text a verifier checks, the item's reference) of each item: the response, the last (assistant) message,
    or the whole text; an item it cannot check is a 422 that names it and says what to send."""
    spec, pairs = model.verifier, []
    for index, item in enumerate(items):
        where = f"items[{index}]: verifier {model.name!r} ({spec.describe()})"
        if item.input_ids is not None:
            raise InvalidInput(f"{where} reads text: send `prompt` + `response`, `messages` or `text`, not"
                               " `input_ids`")
        if item.messages is not None and item.messages[-1].role != "assistant":
            raise InvalidInput(f"{where} checks the last message, the answer, and this one is a"
                               f" {item.messages[-1].role} message: end `messages` with the assistant's turn")
        if spec.needs_reference and item.reference is None:
            raise InvalidInput(f"{where} checks the answer against the item's `reference`, and this item has none:"
                               " send `reference` (the right answer)")
        text = item.response if item.response is not None else \
            item.messages[-1].content if item.messages is not None else item.text
        pairs.append((text, item.reference))
    return pairs
