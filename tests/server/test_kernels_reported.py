"""What ran is what is reported, and a GPU's failure modes leave nothing behind: flex_attention compiled once (no
recompile after the warm-up), a kernel that fails is one warning and the path that ran instead everywhere, the
calibration never times a kernel that switched itself off nor extrapolates a compile, and an out-of-memory batch
frees the failed attempt before its halves run. flex runs here through dynamo with a counting backend: the same
guards (and so the same recompiles) as inductor on a GPU, without code generation."""
from __future__ import annotations

import asyncio
import gc
import logging
import random
import weakref

import pytest
import torch

from rewardserve.server import metrics, packing
from rewardserve.server.batcher import Batcher
from rewardserve.server.calibration import Measurement, choose, measure_model, workload_w_lengths
from rewardserve.server.modeling import RewardModel

from ..conftest import build_checkpoint


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """flex_attention as the CUDA path runs it (compiled, a block mask), on this CPU; returns the compile log."""
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(len(example_inputs))
        return graph.forward

    torch._dynamo.reset()
    monkeypatch.setattr(packing, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setattr(packing, "FLEX_COMPILE_BACKEND", counting_backend)
    monkeypatch.setattr(packing, "_flex", None)
    yield compiles
    torch._dynamo.reset()


@pytest.fixture
def llama(tmp_path, smol_tokenizer) -> RewardModel:
    return RewardModel.load(str(build_checkpoint(tmp_path / "llama", "llama", smol_tokenizer)))


def counter(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()


def test_flex_compiles_at_the_warm_up_and_never_again_over_varied_batches(llama, flex_on_cpu):
    """The calibration's warm-up (the check against padded, a shared-prefix batch, a budget's batch) compiles
    every graph the traffic needs; 20 batches of other lengths, some sharing a prompt, compile nothing more."""
    llama.min_shared_prefix = 16
    measured = measure_model(llama, workload_w_lengths())("packed-flex", 2048)
    warmed = len(flex_on_cpu)
    assert warmed >= 1 and measured.compile_seconds > 0 and measured.tokens_per_s > 0
    rng = random.Random(5)
    with llama.forward_path_as("packed-flex"):
        for _ in range(20):
            sequences = [[rng.randrange(5, 1000) for _ in range(rng.randrange(3, 250))]
                         for _ in range(rng.randrange(1, 12))]
            if rng.random() < 0.5:
                prompt = [rng.randrange(5, 1000) for _ in range(rng.randrange(16, 60))]
                sequences += [prompt + [rng.randrange(5, 1000) for _ in range(rng.randrange(1, 40))]
                              for _ in range(4)]
            llama.score_batch(sequences)
    assert len(flex_on_cpu) == warmed  # no recompile after the warm-up
    assert llama.forwards_by_path["packed-flex"] >= 20 and "packed-sdpa" not in llama.forwards_by_path


def test_a_kernel_that_fails_while_serving_is_one_warning_and_reported_as_what_ran(llama, monkeypatch, caplog):
    """flex fails to compile (no C compiler, as in an image without one): the batch is scored by SDPA per
    document, the model says packed-sdpa from then on (/info and gRPC Info read it), and the metrics count the
    forwards by the path that ran and the fallback."""
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no working C compiler found")

    monkeypatch.setattr(packing, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setattr(packing, "FLEX_COMPILE_BACKEND", broken_backend)
    monkeypatch.setattr(packing, "_flex", None)
    torch._dynamo.reset()
    llama.forward_path, llama.name = "packed-flex", "fallback-llama"
    sequences = [[5, 6, 7, 8] * 10, [9, 10, 11] * 7]
    with llama.forward_path_as("packed-sdpa"):
        reference = llama.score_batch(sequences)
    fallbacks_before = counter(metrics.FALLBACKS, model="fallback-llama", forward="packed-sdpa")

    async def scenario():
        batcher = Batcher(llama, max_batch_tokens=4096, max_wait_ms=1, max_queue_items=100)
        batcher.start()
        first = await asyncio.gather(*batcher.submit(sequences))
        second = await asyncio.gather(*batcher.submit(sequences))
        await batcher.drain_and_stop()
        return first, second

    with caplog.at_level(logging.WARNING):
        first, second = asyncio.run(asyncio.wait_for(scenario(), 30))
    torch._dynamo.reset()
    assert first == pytest.approx(reference, abs=1e-5) and second == pytest.approx(reference, abs=1e-5)
    assert llama.forward_path == "packed-sdpa" and packing.flex_disabled()
    assert llama.forwards_by_path == {"packed-sdpa": 3}  # the reference's forward, then the two served
    assert counter(metrics.FALLBACKS, model="fallback-llama", forward="packed-sdpa") == fallbacks_before + 1
    assert counter(metrics.FORWARDS, model="fallback-llama", forward="packed-sdpa") >= 2
    served = [s for m in metrics.FORWARD_CONFIG.collect() for s in m.samples if s.labels["model"] == "fallback-llama"]
    assert [s.labels["forward"] for s in served] == ["packed-sdpa"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("flex_attention failed" in w for w in warnings) == 1
    assert sum("reported as packed-sdpa" in w for w in warnings) == 1


def test_the_calibration_never_times_a_kernel_that_switched_itself_off(llama, monkeypatch):
    """flex switched off earlier in the process: its candidate fails (its layers called SDPA), rather than being
    timed and reported as packed-flex."""
    monkeypatch.setattr(packing, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setattr(packing, "_flex", False)
    chosen = choose(["packed-flex", "padded"], [1024], measure_model(llama, workload_w_lengths()), 60.0)
    flex = next(m for m in chosen.measurements if m.path == "packed-flex")
    assert flex.tokens_per_s is None and "ran packed-sdpa, not packed-flex" in flex.skipped
    assert chosen.path == "padded"


def test_a_compile_is_kept_apart_and_never_extrapolated_to_the_next_budget():
    """A 15 s compile at the first budget: the next budget's expected time scales the timed runs alone (0.2 s),
    so it is measured within a 20 s calibration, rather than skipped as 'would not finish'."""
    now = [0.0]

    def measure(path: str, budget: int) -> Measurement:
        compile_seconds = 15.0 if budget == 1000 else 0.0
        now[0] += compile_seconds + 0.1 * budget / 1000
        return Measurement(path, budget, float(budget), None, compile_seconds + 0.1 * budget / 1000,
                           compile_seconds=compile_seconds)

    chosen = choose(["packed-flex"], [1000, 2000, 4000], measure, 20.0, clock=lambda: now[0])
    assert [m.skipped for m in chosen.measurements] == [None, None, None]
    assert (chosen.path, chosen.budget) == ("packed-flex", 4000)
    assert "compile s" in chosen.table() and "15.0" in chosen.table()


def test_an_out_of_memory_batch_frees_the_failed_attempt_before_its_halves_run(llama, monkeypatch):
    """The forward's frames (its activations) are gone before the retry, with the garbage collector off: nothing
    holds them, neither the exception's traceback nor a reference cycle."""
    alive_at_retry = []
    activations: list[weakref.ref] = []
    real = llama.padded_outputs

    def deep_forward(input_ids, attention_mask):
        hidden = torch.ones(input_ids.shape[0], 1 << 20)  # what a layer would still hold when memory ran out
        activations.append(weakref.ref(hidden))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def padded_outputs(input_ids, attention_mask, sequences=None):
        if input_ids.shape[0] > 1:
            deep_forward(input_ids, attention_mask)
        alive_at_retry.append(any(ref() is not None for ref in activations))
        return real(input_ids, attention_mask)

    monkeypatch.setattr(llama, "padded_outputs", padded_outputs)
    llama.forward_path = "padded"

    async def scenario():
        batcher = Batcher(llama, max_batch_tokens=4096, max_wait_ms=1, max_queue_items=100)
        batcher.start()
        scores = await asyncio.gather(*batcher.submit([[5, 6, 7], [8, 9]]))
        await batcher.drain_and_stop()
        return scores

    gc.disable()
    try:
        scores = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        gc.enable()
    assert len(scores) == 2 and activations and alive_at_retry == [False, False]


def test_a_strict_kernel_failure_leaves_no_cycle_holding_its_tensors(monkeypatch):
    """In calibration a failing kernel raises; the exception must not keep the query alive through a cycle (an
    error re-raised from a helper's frame that names it is one) until a garbage collection."""
    def failing_kernel(query, key, value, block_mask, scale):
        raise RuntimeError("no working C compiler found")

    monkeypatch.setattr(packing, "FLEX_DEVICES", {"cpu"})
    monkeypatch.setattr(packing, "_flex", failing_kernel)
    documents = packing.pack([[5] * 40, [6] * 30], kernel="flex").documents
    query = torch.randn(1, 2, 70, 8)
    held = weakref.ref(query)
    gc.disable()
    try:
        with packing.strict_kernels():
            with pytest.raises(Exception, match="C compiler"):
                packing.packed_attention(torch.nn.Module(), query, query.clone(), query.clone(), None,
                                         rewardserve_documents=documents)
        del query
        assert held() is None
    finally:
        gc.enable()
    assert not packing.flex_disabled()  # calibration's failure does not switch the kernel off for serving
