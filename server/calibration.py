"""Start-up calibration: which forward path and batch budget are fastest for this model, on the device it runs on.

Which is fastest depends on the model, the card and the traffic (on an H200 the packed 135M forward ran 30-40% below
plain transformers in 64k-token batches, while packing pays where padding is the larger cost), so the server
measures instead of guessing. At warm-up, per model (and again after a reload):

1. the candidates: each forward path the device has for this model (`modeling.forward_paths`: packed with
   flex_attention or varlen_attn on CUDA, packed with SDPA per sequence elsewhere; padded always) at each token
   budget of `--calibration-budgets`;
2. every path first scores a few sequences as the padded forward does (within the dtype's tolerance), or it is
   dropped: a fast kernel that is wrong is never chosen;
3. budgets ascending, every path at one budget before any at the next: a synthetic batch whose lengths follow the
   traffic (workload W's by default) is planned as the batcher would plan it for that path and budget, run once to
   warm up (kernels, compilation; a path's first budget also warms each shape class a compiler specialises on),
   then timed; tokens/s and, on CUDA, the peak memory are recorded, and the check and warm-up's seconds apart
   (`compile_seconds`): a budget's expected time is extrapolated from the timed runs alone, never from a compile;
   a timed run whose layers called another kernel than the path's (a kernel that switched itself off) fails;
4. a candidate that fails is skipped with one warning (and the path's larger budgets with it); one over the memory
   cap (90% of the memory free before calibration) or out of memory stops that path's larger budgets; one that
   would not finish in the time left (`--calibration-seconds`, estimated from the path's last budget) is skipped;
5. the fastest measured candidate serves; the table goes to the log, `/info` and the metrics.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .batcher import plan
from .errors import OutOfMemory, StartupError
from .packing import strict_kernels

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (16384, 32768, 65536, 131072)
MEMORY_MARGIN = 0.9  # a candidate may use at most this share of the memory free before calibration
VERIFY_SEQUENCES = 8


def workload_w_lengths(generator: torch.Generator | None = None) -> list[int]:
    """Workload W's 512 lengths: log-normal around 500 tokens, 32 to 2048 (the bench's reference workload draws
    them first from a generator seeded 1)."""
    generator = generator or torch.Generator().manual_seed(1)
    return torch.clamp(torch.exp(0.7 * torch.randn(512, generator=generator) + math.log(500)), 32, 2048).long().tolist()


def read_lengths(path: str) -> list[int]:
    """--calibration-lengths: whitespace-separated positive integers."""
    try:
        lengths = [int(word) for word in Path(path).read_text().split()]
    except ValueError as error:
        raise StartupError(f"--calibration-lengths {path}: {error}; give whitespace-separated token counts") from None
    if not lengths or min(lengths) <= 0:
        raise StartupError(f"--calibration-lengths {path}: give at least one positive token count")
    return lengths


@dataclass
class Measurement:
    path: str
    budget: int
    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    seconds: float = 0.0  # what measuring it took (warm-up included)
    skipped: str | None = None  # why it was not measured, or not eligible
    compile_seconds: float = 0.0  # of `seconds`, the check against padded and the warm-up (compilation)

    @property
    def run_seconds(self) -> float:
        return self.seconds - self.compile_seconds


@dataclass
class Calibration:
    path: str
    budget: int
    measurements: list[Measurement]
    seconds: float
    how: str  # "measured", or why nothing was

    def table(self) -> str:
        lines = [f"{'path':<14} {'budget':>7} {'tokens/s':>10} {'peak MiB':>9} {'compile s':>9}  note"]
        for m in self.measurements:
            chosen = m.path == self.path and m.budget == self.budget
            note = "chosen" if chosen else (m.skipped or "")
            rate = f"{m.tokens_per_s:,.0f}" if m.tokens_per_s else "-"
            peak = f"{m.peak_bytes / 2**20:,.0f}" if m.peak_bytes else "-"
            lines.append(f"{m.path:<14} {m.budget:>7} {rate:>10} {peak:>9} {m.compile_seconds:>9.1f}  {note}")
        return "\n".join(lines)

    def rows(self) -> list[dict]:
        return [asdict(m) for m in self.measurements]


Measure = Callable[[str, int], Measurement]


def choose(paths: list[str], budgets: list[int], measure: Measure, seconds: float,
           memory_cap: int | None = None, clock: Callable[[], float] = time.monotonic) -> Calibration:
    """Times every (path, budget) that fits, budgets ascending and every path at one budget before the next, and
    picks the fastest. `measure(path, budget)` runs one candidate; `clock` is the time budget's clock."""
    began = clock()
    measurements: list[Measurement] = []
    stopped: dict[str, str] = {}  # path -> why its larger budgets are not tried
    last: dict[str, Measurement] = {}  # path -> its last measured budget
    overran = None  # the candidate during which the time limit passed, if one did
    for budget in sorted(budgets):
        for path in paths:
            if path in stopped:
                measurements.append(Measurement(path, budget, skipped=stopped[path]))
                continue
            left = seconds - (clock() - began)
            previous = last.get(path)
            expected = previous.run_seconds * budget / previous.budget if previous else 0.0  # a compile is not
            if left <= 0:  # repeated at the next budget: the timed runs alone scale with it
                measurements.append(Measurement(path, budget, skipped=f"the {seconds:.0f} s of calibration were"
                                                                      " spent"))
                continue
            if expected > left:
                measurements.append(Measurement(path, budget, skipped=f"would take about {expected:.1f} s, with"
                                                                      f" {left:.1f} s left"))
                continue
            try:
                started = clock()
                measured = measure(path, budget)
                if clock() - began > seconds and overran is None:  # the limit is checked between candidates only
                    overran = (f"{path} at {budget} tokens took {clock() - started:.1f} s and ended"
                               f" {clock() - began - seconds:.1f} s past the {seconds:.0f} s limit")
            except OutOfMemory:
                stopped[path] = f"out of memory at {budget}"
                measurements.append(Measurement(path, budget, skipped="out of memory"))
                continue
            except Exception as error:  # a kernel that cannot run here: skip it, serve with another
                log.warning("calibration: %s at %d tokens failed (%s: %s); skipped", path, budget,
                            type(error).__name__, error)
                stopped[path] = f"failed at {budget}"
                measurements.append(Measurement(path, budget, skipped=f"failed: {type(error).__name__}: {error}"))
                continue
            if memory_cap is not None and measured.peak_bytes is not None and measured.peak_bytes > memory_cap:
                measured.skipped = f"over the memory cap ({memory_cap / 2**20:,.0f} MiB)"
                stopped[path] = f"over the memory cap at {budget}"
            last[path] = measured
            measurements.append(measured)
    eligible = [m for m in measurements if m.tokens_per_s and not m.skipped]
    if not eligible:
        return Calibration(paths[0], min(budgets), measurements, clock() - began,
                           "nothing could be measured: the first path at the smallest budget")
    best = max(eligible, key=lambda m: m.tokens_per_s)
    how = "measured" if overran is None else f"measured; {overran}"
    return Calibration(best.path, best.budget, measurements, clock() - began, how)


# -- measuring a real model -----------------------------------------------------------------------------------------
def synthetic_batch(lengths: list[int], budget: int, packed: bool, max_length: int, vocabulary: int,
                    rng: random.Random) -> list[list[int]]:
    """The fullest batch the batcher would plan at `budget` from a window of sequences whose lengths are drawn from
    `lengths` (capped at `max_length`), with random token ids."""
    window, tokens = [], 0
    while tokens < 4 * budget:
        length = min(rng.choice(lengths), max_length)
        window.append([rng.randrange(5, vocabulary) for _ in range(length)])
        tokens += length
    batches = plan(window, budget, packed)
    fullest = max(batches, key=lambda batch: sum(len(window[i]) for i in batch))
    return [window[i] for i in fullest]


def measure_model(model, lengths: list[int], timed_runs: int = 2) -> Measure:
    """`measure(path, budget)` for a `RewardModel`: its forward along `path` on a synthetic batch planned at `budget`,
    run once to warm up and `timed_runs` times timed; tokens/s over the real tokens. A path whose scores differ from
    the padded forward's (on a few short sequences), or whose timed runs called another kernel, raises."""
    verified: set[str] = set()
    cuda = model.device.type == "cuda"

    def measure(path: str, budget: int) -> Measurement:
        began = time.perf_counter()
        with model.forward_path_as(path), strict_kernels():
            if path not in verified:
                verify(model, path, random.Random(0))
                warm_shape_classes(model)  # each graph a compiled kernel needs, compiled now rather than on traffic
                verified.add(path)
            # every path at a budget plans from the same window of sequences
            batch = synthetic_batch(lengths, budget, path != "padded", model.max_length, model.embedding_rows,
                                    random.Random(budget))
            model.score_batch(batch)  # warm-up: kernels, compilation, allocations
            if cuda:
                torch.cuda.reset_peak_memory_stats(model.device)
            started = time.perf_counter()
            for _ in range(timed_runs):
                pending = model.launch(batch)
                model.collect(pending)  # waits for its scores: the time is the device's
                if pending.path != path:
                    raise RuntimeError(f"its forward ran {pending.path}, not {path} (a kernel switched itself off)")
            per_batch = (time.perf_counter() - started) / timed_runs
            peak = torch.cuda.max_memory_allocated(model.device) if cuda else None
        tokens = sum(map(len, batch))
        seconds = time.perf_counter() - began
        return Measurement(path, budget, tokens / per_batch, peak, seconds,
                           compile_seconds=seconds - timed_runs * per_batch)

    return measure


def warm_shape_classes(model) -> None:
    """Scores one batch of each shape class a compiled kernel specialises on, so that traffic compiles nothing:
    a row within one attention block and one of several (compilers specialise a dimension of size 1), each also
    with a shared prefix where the model shares (its mask is another function)."""
    rows = model.embedding_rows

    def tokens(start: int, count: int) -> list[int]:
        return [(start + i) % rows for i in range(count)]

    model.score_batch([tokens(3, 40), tokens(5, 30)])  # 70 tokens: one block
    if not (model.min_shared_prefix and model.plans_packed):
        return
    for prefix_length, suffix in ((model.min_shared_prefix, 4), (model.min_shared_prefix + 200, 40)):
        prefix = tokens(7, prefix_length)
        model.score_batch([prefix + tokens(11 + k, suffix + 5 * k) for k in range(3)])


def verify(model, path: str, rng: random.Random) -> None:
    """Raises unless `path` scores a few sequences as the padded forward does (1e-4 in fp32; half precision's
    rounding allows 2e-2 of the scores' scale)."""
    if path == "padded":
        return
    sequences = [[rng.randrange(5, model.embedding_rows) for _ in range(rng.randrange(8, min(256, model.max_length)))]
                 for _ in range(VERIFY_SEQUENCES)]
    scores = torch.tensor(model.score_batch(sequences))
    with model.forward_path_as("padded"):
        reference = torch.tensor(model.score_batch(sequences))
    tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2 * max(1.0, reference.abs().max().item())
    gap = (scores - reference).abs().max().item()
    if not gap <= tolerance:  # NaN fails too
        raise RuntimeError(f"its scores differ from the padded forward's by {gap:.3g} (tolerance {tolerance:.3g})")


def memory_cap(device: torch.device) -> int | None:
    """What a candidate may use: 90% of the device memory free now (None on the CPU, where it is not measured)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(MEMORY_MARGIN * (free + torch.cuda.memory_allocated(device)))
