"""Dynamic batching: many requests in, token-budget batches through one forward worker, one future per item out.

The loop, once per cycle:
1. wait for work; then wait at most `max_wait_ms` for more, or until a budget's worth of tokens is queued;
2. move queued items into a planning window of a few budgets, one budget from each request in turn;
3. sort the window (by length for a padded forward, by tokens for a packed one, so that a group's shared prompt
   stays in one batch), cut it greedily into batches whose cost (rows x longest row padded, the tokens packed) fits
   the model's `max_batch_tokens`, and take the batch holding the oldest item (items whose client has gone are
   dropped);
4. launch that batch's forward on one dedicated thread, so the event loop keeps accepting requests meanwhile;
5. collect the previous batch and resolve its futures; a batch that runs out of device memory is split in halves
   and retried, and so is a batch whose forward fails otherwise, down to the one item that fails it, which alone
   gets the error (`UnscorableItem`). A score that is not a finite number is an error for its item, never a result.

While a forward runs, new requests queue up and join the window: under load the batches fill themselves, and at
low load an item waits at most `max_wait_ms` before its forward starts.

All the batcher knows of the model is a `ForwardEngine` (`launch(sequences)`, then `collect(pending) -> scores`) or a
plain `score_batch(sequences) -> scores` callable. A batch is launched before the previous one is collected, so on
a GPU the host pads and copies batch k + 1 while batch k runs, and waits once per batch.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from . import metrics
from .errors import Internal, NotReady, OutOfMemory, Overloaded, TooManyItems, UnscorableItem

log = logging.getLogger(__name__)

SMALL_REQUEST_ITEMS = 8  # a request of this many items or fewer may use the queue's reserve
WINDOW_BUDGETS = 8  # batches' worth of tokens planned together: less padding, against a longer wait behind them

ScoreBatch = Callable[[list[list[int]]], list[float]]


@dataclass
class _Job:
    input_ids: list[int]
    future: asyncio.Future
    engine: "ForwardEngine"
    submitted_at: float = field(default_factory=time.perf_counter)
    small: bool = False  # its request has at most SMALL_REQUEST_ITEMS items: it goes before large requests' items


def plan_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Packs item indices, shortest first, into batches whose padded cost (rows x longest) fits the budget.

    An item longer than the whole budget still runs, alone.

    >>> plan_batches([5, 1, 3, 2], max_batch_tokens=6)
    [[1, 3], [2], [0]]
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        # Sorted ascending, so the newcomer is the longest row of the batch it joins.
        if current and (len(current) + 1) * lengths[index] > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def plan_packed_batches(sequences: list[list[int]], max_batch_tokens: int) -> list[list[int]]:
    """For a padding-free forward: item indices in token order (items that share a prompt are neighbours, so a
    group of responses lands in one batch and shares its prompt there), cut into batches of at most
    `max_batch_tokens` real tokens. An item longer than the whole budget still runs, alone.

    >>> plan_packed_batches([[7, 1], [3], [7, 1, 2], [9, 9, 9, 9]], max_batch_tokens=6)
    [[1, 0, 2], [3]]
    """
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index in sorted(range(len(sequences)), key=lambda i: sequences[i]):
        if current and tokens + len(sequences[index]) > max_batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += len(sequences[index])
    if current:
        batches.append(current)
    return batches


def plan(sequences: list[list[int]], max_batch_tokens: int, packed: bool) -> list[list[int]]:
    """Batches as the engine's forward pays for them: real tokens when packed, rows x longest when padded."""
    if packed:
        return plan_packed_batches(sequences, max_batch_tokens)
    return plan_batches([len(s) for s in sequences], max_batch_tokens)


class ForwardEngine(Protocol):
    """The model as the batcher sees it: `launch` queues a batch's forward and returns at once where the device
    allows (a GPU); `collect` waits for that batch and returns its scores. An engine may also say its own
    `max_batch_tokens` (the start-up calibration's choice) and whether it `plans_packed`. An item's result is its
    score, or for a model of several outputs a list (the reward, then each output): the batcher passes it on."""

    def launch(self, sequences: list[list[int]]) -> Any: ...

    def collect(self, pending: Any) -> list[float] | list[list[float]]: ...


class _CallableForward:
    """Adapts a plain `score_batch(sequences) -> scores` callable: all its work happens in `launch`."""

    def __init__(self, score_batch: ScoreBatch):
        self.score_batch = score_batch

    def launch(self, sequences: list[list[int]]) -> list[float]:
        return self.score_batch(sequences)

    @staticmethod
    def collect(scores: list[float]) -> list[float]:
        return scores


@dataclass
class _InFlight:
    jobs: list[_Job]
    engine: ForwardEngine
    pending: Any
    started: float


def score_in_batches(forward: ForwardEngine, sequences: list[list[int]], max_batch_tokens: int | None = None
                     ) -> list[float]:
    """What the forward worker does with a queue holding `sequences`, without the server around it: token-budget
    batches, each launched before the previous one is collected. The in-process ceiling the server is measured
    against (`rewardserve bench serve`)."""
    scores: list[float] = [0.0] * len(sequences)

    def deliver(batch: list[int], pending: Any) -> None:
        for index, score in zip(batch, forward.collect(pending)):
            scores[index] = score

    in_flight = None
    budget = max_batch_tokens or forward.max_batch_tokens
    for batch in plan(sequences, budget, getattr(forward, "plans_packed", False)):
        pending = forward.launch([sequences[i] for i in batch])
        if in_flight is not None:
            deliver(*in_flight)
        in_flight = (batch, pending)
    if in_flight is not None:
        deliver(*in_flight)
    return scores


class Batcher:
    def __init__(self, forward: ForwardEngine | ScoreBatch | None, max_batch_tokens: int, max_wait_ms: float,
                 max_queue_items: int):
        """forward: the engine of submits that name none; None when every submit names its own (a server of
        several, reloadable models: the batcher then holds no model beyond the items queued for it)."""
        self._forward = forward if forward is None or hasattr(forward, "launch") else _CallableForward(forward)
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000
        self.max_queue_items = max_queue_items
        # a queue filled by large requests still takes small ones (a client's few items), up to this many more
        self.reserve = max_queue_items // 16
        self._units: deque[deque[_Job]] = deque()  # one per submit() call, served round-robin
        self._window: list[_Job] = []  # taken from the units, planned together, not launched yet
        self._queued_items = 0
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardserve-forward")
        self._loop_task: asyncio.Task | None = None
        self._in_flight: _InFlight | None = None
        self._draining = False
        self._recent_batch_seconds = 0.05  # running estimate, for Retry-After

    # -- public -------------------------------------------------------------------------------------------------
    def budget_of(self, engine: ForwardEngine) -> int:
        """An engine's own budget where it has one (calibrated per model), else the batcher's."""
        return getattr(engine, "max_batch_tokens", None) or self.max_batch_tokens

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="rewardserve-batcher")

    def submit(self, sequences: list[list[int]], engine: ForwardEngine | None = None) -> list[asyncio.Future]:
        """Queues the sequences as one unit for `engine` (the batcher's own by default) and returns a future per
        sequence (its score)."""
        return self.submit_group([(sequences, engine)])[0]

    def submit_group(self, parts: list[tuple[list[list[int]], ForwardEngine | None]]) -> list[list[asyncio.Future]]:
        """Queues every part (sequences for one engine) of one request, or none of them: a request scored by several
        models is admitted whole, so no model's items are computed for a request that was then refused. Returns
        each part's futures.

        A request larger than the whole queue can never be admitted: TooManyItems (413), not Overloaded (503).
        """
        if self._draining:
            raise NotReady("the server is shutting down; send this request to another replica or retry shortly")
        needed = sum(len(sequences) for sequences, _ in parts)
        if needed > self.max_queue_items:
            per_model = f" ({len(parts)} models x {needed // len(parts)} items)" if len(parts) > 1 else ""
            raise TooManyItems(
                f"this request needs {needed} places in the scoring queue{per_model}, and the queue holds"
                f" {self.max_queue_items} (--max-queue-items): split the request"
            )
        room = self.max_queue_items + (self.reserve if needed <= SMALL_REQUEST_ITEMS else 0)
        if self._queued_items + needed > room:
            raise Overloaded(
                f"the scoring queue is full ({self._queued_items} items waiting, limit {self.max_queue_items});"
                " retry after the indicated delay",
                retry_after=self._retry_after(),
            )
        engines = [engine if engine is not None else self._forward for _, engine in parts]
        if any(engine is None for engine in engines):
            raise ValueError("this batcher has no engine of its own: name the engine of each submit")
        loop = asyncio.get_running_loop()
        futures = []
        for (sequences, _), engine in zip(parts, engines):
            small = needed <= SMALL_REQUEST_ITEMS
            unit = deque(_Job(ids, loop.create_future(), engine, small=small) for ids in sequences)
            self._units.append(unit)
            self._queued_items += len(unit)
            self._queued_tokens += sum(len(ids) for ids in sequences)
            futures.append([job.future for job in unit])
        metrics.QUEUE_DEPTH.set(self._queued_items)
        self._arrived.set()
        return futures

    async def drain_and_stop(self) -> None:
        """Refuses new work, finishes what is queued, then stops the loop and the worker thread."""
        self._draining = True
        self._arrived.set()
        if self._loop_task is not None:
            await self._loop_task
        self._worker.shutdown(wait=True)

    # -- the loop -----------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not self._units and not self._window:
                await self._finish_in_flight()  # nothing to overlap it with: deliver the last batch now
                if self._draining:
                    return
                await self._arrived.wait()
                self._arrived.clear()
                continue
            if self._in_flight is None:  # with a batch on the device, launch what is queued now, behind it
                await self._wait_for_fuller_batch()
            self._fill_window()
            batch = self._next_batch()
            if batch:
                await self._launch(batch)

    async def _wait_for_fuller_batch(self) -> None:
        deadline = time.perf_counter() + self.max_wait
        while self._queued_tokens < self.max_batch_tokens and not self._draining:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return
            self._arrived.clear()

    def _fill_window(self) -> None:
        """Moves queued items into the planning window until it holds WINDOW_BUDGETS budgets of tokens, at most one
        budget from each request in turn, so that a request of many long items cannot keep the small ones queued
        behind it out of the window."""
        tokens = sum(len(job.input_ids) for job in self._window)
        while self._units and tokens < WINDOW_BUDGETS * self.max_batch_tokens:
            unit = self._units.popleft()
            share = 0
            while unit and share < self.max_batch_tokens:
                job = unit.popleft()
                self._window.append(job)
                share += len(job.input_ids)
            tokens += share
            if unit:
                self._units.append(unit)

    def _next_batch(self) -> list[_Job]:
        """Plans the whole window into length-sorted budget batches and takes the one holding the item that has been
        in the window longest.

        Planning several budgets of items at once sorts them far better than planning each intake apart (padding
        over workload W: 1.13x the real tokens instead of 1.24x). Items enter the window in turn across requests,
        and the first to enter goes first, so no item waits behind more than a window's worth of batches.
        """
        gone = [job for job in self._window if job.future.cancelled()]
        if gone:
            metrics.CANCELLED.inc(len(gone))
            self._leave_queue(gone)
        if not self._window:
            return []
        # the item longest in the window goes next (its model, its batch), a small request's before a large one's:
        # a client's one item does not wait behind the window's worth of batches another client's flood filled
        first = next((job for job in self._window if job.small), self._window[0])
        engine = first.engine
        candidates = [job for job in self._window if job.engine is engine]
        batches = plan([job.input_ids for job in candidates], self.budget_of(engine),
                       getattr(engine, "plans_packed", False))
        seed = next(i for i, job in enumerate(candidates) if job is first)
        chosen = next(batch for batch in batches if seed in batch)  # the batch holding that item
        jobs = [candidates[i] for i in chosen]
        self._leave_queue(jobs)
        return jobs

    def _leave_queue(self, jobs: list[_Job]) -> None:
        leaving = {id(job) for job in jobs}
        self._window = [job for job in self._window if id(job) not in leaving]
        self._queued_items -= len(jobs)
        self._queued_tokens -= sum(len(job.input_ids) for job in jobs)
        metrics.QUEUE_DEPTH.set(self._queued_items)

    async def _launch(self, jobs: list[_Job]) -> None:
        """Starts this batch's forward, then delivers the previous batch's scores while this one runs."""
        live = [job for job in jobs if not job.future.cancelled()]
        metrics.CANCELLED.inc(len(jobs) - len(live))
        if not live:
            return
        started = time.perf_counter()
        for job in live:
            metrics.QUEUE_LATENCY.observe(started - job.submitted_at)
        loop = asyncio.get_running_loop()
        engine = live[0].engine
        out_of_memory = False
        try:
            pending = await loop.run_in_executor(self._worker, engine.launch, [j.input_ids for j in live])
        except OutOfMemory:
            out_of_memory = True  # split after the except clause, once the failed attempt's exception is gone
        except Exception as error:  # the batch, or one item of it, broke the forward: find which, fail it alone
            await self._finish_in_flight()
            await self._isolate(live, error)
            return
        if out_of_memory:
            await self._finish_in_flight()
            await self._split_after_oom(live)
            return
        await self._finish_in_flight()
        self._in_flight = _InFlight(live, engine, pending, started)

    async def _finish_in_flight(self) -> None:
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self._worker, flight.engine.collect,
                                                                      flight.pending)
        except Exception as error:  # on a GPU a forward's failure can surface when its result is read
            await self._isolate(flight.jobs, error)
            return
        self._record_batch([job.input_ids for job in flight.jobs], time.perf_counter() - flight.started,
                           getattr(flight.engine, "name", "model"), getattr(flight.pending, "computed_tokens", None))
        self._record_path(flight.engine, flight.pending)
        for job, score in zip(flight.jobs, scores):
            if job.future.done():
                continue
            if all(map(math.isfinite, score if isinstance(score, list) else [score])):
                job.future.set_result(score)
            else:
                metrics.UNSCORABLE.inc()
                job.future.set_exception(UnscorableItem(
                    f"the model's score for this item is {score}, not a finite number; the item is not scored"
                    " (a model that gives non-finite scores for every item needs replacing)"))

    async def _isolate(self, jobs: list[_Job], error: Exception) -> None:
        """Runs the halves of a failed batch apart, down to single items: only the items that fail alone get the
        error, so one client's bad item cannot fail the others' requests."""
        if len(jobs) == 1:
            log.warning("forward pass failed for one item of %d tokens", len(jobs[0].input_ids), exc_info=error)
            metrics.UNSCORABLE.inc()
            self._fail(jobs, UnscorableItem(f"the forward pass fails on this item ({type(error).__name__}: {error});"
                                            " the item is not scored"))
            return
        log.warning("forward pass failed for a batch of %d items (%s: %s); retrying its halves apart", len(jobs),
                    type(error).__name__, error)
        middle = len(jobs) // 2
        for half in (jobs[:middle], jobs[middle:]):
            await self._launch(half)
            await self._finish_in_flight()

    async def _split_after_oom(self, jobs: list[_Job]) -> None:
        if len(jobs) == 1:
            self._fail(jobs, Internal(
                f"one item of {len(jobs[0].input_ids)} tokens does not fit in device memory; lower --max-length"
            ))
            return
        metrics.OOM_SPLITS.inc()
        log.warning("out of memory on a batch of %d items; splitting it in two", len(jobs))
        release = getattr(jobs[0].engine, "release_memory", None)
        if release is not None:
            await asyncio.get_running_loop().run_in_executor(self._worker, release)
        middle = len(jobs) // 2
        await self._launch(jobs[:middle])
        await self._finish_in_flight()
        await self._launch(jobs[middle:])

    @staticmethod
    def _fail(jobs: list[_Job], error: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    @staticmethod
    def _record_path(engine, pending) -> None:
        """The path that ran (the kernels the forward's layers called), and a fallback if its kernel failed."""
        path = getattr(pending, "path", "")
        if not path:
            return
        name = getattr(engine, "name", "model")
        metrics.FORWARDS.labels(name, path).inc()
        if getattr(pending, "fell_back", False):
            metrics.FALLBACKS.labels(name, path).inc()
            metrics.serving_path(name, engine.forward_path, engine.max_batch_tokens)

    def _record_batch(self, sequences: list[list[int]], seconds: float, model: str = "model",
                      computed: int | None = None) -> None:
        """computed: the tokens the engine says its forward ran (None: it does not say; the padded count)."""
        real = sum(len(s) for s in sequences)
        padded = len(sequences) * max(len(s) for s in sequences)
        metrics.MODEL_TOKENS.labels(model).inc(real)
        metrics.COMPUTED_TOKENS.labels(model).inc(padded if computed is None else computed)
        metrics.BATCH_SIZE.observe(len(sequences))
        metrics.BATCH_TOKENS.observe(padded)
        metrics.TOKENS.inc(real)
        metrics.PADDED_TOKENS.inc(padded)
        metrics.ITEMS.inc(len(sequences))
        metrics.FORWARD_LATENCY.observe(seconds)
        self._recent_batch_seconds = 0.9 * self._recent_batch_seconds + 0.1 * seconds

    def retry_after(self) -> float:
        return self._retry_after()

    def _retry_after(self) -> float:
        """Seconds until roughly the current queue has drained, at the recent batch rate (at least 1 s)."""
        batches_queued = max(1, self._queued_tokens // max(1, self.max_batch_tokens))
        return max(1.0, round(batches_queued * self._recent_batch_seconds, 1))
