"""The start-up calibration: the choice with a stand-in forward and clock (fastest wins, memory cap, failures, time
budget), the paths each device offers, pinned flags, and a real calibration of a tiny model on this CPU."""
from __future__ import annotations

import logging

import pytest
import torch

from rewardserve.server import calibration, modeling
from rewardserve.server.calibration import Measurement, choose
from rewardserve.server.config import ServeConfig
from rewardserve.server.errors import OutOfMemory, StartupError
from rewardserve.server.main import configure_forward
from rewardserve.server.modeling import RewardModel, forward_paths

from ..conftest import build_checkpoint


class StandIn:
    """A forward whose tokens/s, peak memory and cost in (stand-in) seconds are given per candidate."""

    def __init__(self, rates: dict, peaks: dict | None = None, fails: dict | None = None, seconds: float = 1.0):
        self.rates, self.peaks, self.fails, self.seconds = rates, peaks or {}, fails or {}, seconds
        self.now, self.calls = 0.0, []

    def clock(self) -> float:
        return self.now

    def measure(self, path: str, budget: int) -> Measurement:
        self.calls.append((path, budget))
        self.now += self.seconds * budget / 1000
        if (path, budget) in self.fails:
            raise self.fails[path, budget]
        return Measurement(path, budget, self.rates[path, budget], self.peaks.get((path, budget)),
                           self.seconds * budget / 1000)


RATES = {("packed-sdpa", 1000): 100.0, ("padded", 1000): 90.0, ("packed-sdpa", 2000): 150.0, ("padded", 2000): 170.0}


def test_the_fastest_candidate_serves_and_every_one_is_measured_budget_by_budget():
    stand_in = StandIn(RATES)
    chosen = choose(["packed-sdpa", "padded"], [2000, 1000], stand_in.measure, 60.0, clock=stand_in.clock)
    assert (chosen.path, chosen.budget, chosen.how) == ("padded", 2000, "measured")
    assert stand_in.calls == [("packed-sdpa", 1000), ("padded", 1000), ("packed-sdpa", 2000), ("padded", 2000)]
    assert "chosen" in chosen.table().splitlines()[4]


def test_a_candidate_over_the_memory_cap_is_never_chosen_nor_its_path_tried_larger():
    stand_in = StandIn(RATES | {("padded", 4000): 999.0, ("packed-sdpa", 4000): 160.0},
                       peaks={("padded", 2000): 5 * 2**20, ("padded", 1000): 2**20})
    chosen = choose(["packed-sdpa", "padded"], [1000, 2000, 4000], stand_in.measure, 60.0, memory_cap=4 * 2**20,
                    clock=stand_in.clock)
    assert (chosen.path, chosen.budget) == ("packed-sdpa", 4000)
    assert ("padded", 4000) not in stand_in.calls
    skipped = {(m.path, m.budget): m.skipped for m in chosen.measurements}
    assert skipped[("padded", 2000)].startswith("over the memory cap")
    assert skipped[("padded", 4000)] == "over the memory cap at 2000"


def test_a_failing_candidate_is_skipped_with_one_warning_and_out_of_memory_stops_its_path(caplog):
    stand_in = StandIn(RATES | {("padded", 4000): 10.0},
                       fails={("packed-flex", 1000): RuntimeError("no kernel"), ("padded", 2000): OutOfMemory("oom")})
    with caplog.at_level(logging.WARNING, logger="rewardserve.server.calibration"):
        chosen = choose(["packed-flex", "padded"], [1000, 2000, 4000], stand_in.measure, 60.0, clock=stand_in.clock)
    assert (chosen.path, chosen.budget) == ("padded", 1000)
    assert [record.message for record in caplog.records if "packed-flex" in record.message] == [
        "calibration: packed-flex at 1000 tokens failed (RuntimeError: no kernel); skipped"]
    assert stand_in.calls == [("packed-flex", 1000), ("padded", 1000), ("padded", 2000)]  # neither tried larger


def test_a_candidate_that_would_not_finish_in_the_time_left_is_skipped():
    # each measurement costs budget / 1000 stand-in seconds: 1 + 1, then 2 + 2 (now 6 of 7 s), and 4000 would take 4
    # (its timed runs scaled; a compile would not be)
    stand_in = StandIn(RATES | {("packed-sdpa", 4000): 1e6, ("padded", 4000): 1e6})
    chosen = choose(["packed-sdpa", "padded"], [1000, 2000, 4000], stand_in.measure, 7.0, clock=stand_in.clock)
    assert (chosen.path, chosen.budget) == ("padded", 2000)
    assert [m.skipped for m in chosen.measurements if m.budget == 4000] == [
        "would take about 4.0 s, with 1.0 s left"] * 2


def test_each_device_offers_the_paths_it_has(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(modeling, "varlen_available", lambda device: device.type == "cuda")
    assert forward_paths(cuda, packs=True) == ["packed-flex", "packed-varlen", "padded"]
    monkeypatch.setattr(modeling, "varlen_available", lambda device: False)  # torch before 2.10
    assert forward_paths(cuda, packs=True) == ["packed-flex", "padded"]
    assert forward_paths(cpu, packs=True) == ["packed-sdpa", "padded"]
    assert forward_paths(cuda, packs=False) == forward_paths(cpu, packs=False) == ["padded"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer):
    return RewardModel.load(str(build_checkpoint(tmp_path_factory.mktemp("llama"), "llama", smol_tokenizer)))


def serve_config(**settings) -> ServeConfig:
    return ServeConfig(model=["tiny"], **settings)


def test_pinned_flags_skip_calibration_and_a_path_the_device_lacks_is_refused(tiny, monkeypatch):
    monkeypatch.setattr(calibration, "measure_model", lambda *a: pytest.fail("nothing is measured when pinned"))
    chosen = configure_forward(tiny, serve_config(forward_path="padded", max_batch_tokens=8192))
    assert (chosen.path, chosen.budget, tiny.forward_path, tiny.max_batch_tokens) == ("padded", 8192, "padded", 8192)
    assert chosen.how.startswith("pinned")
    with pytest.raises(StartupError, match="--forward-path packed-flex is not available .* packed-sdpa, padded"):
        configure_forward(tiny, serve_config(forward_path="packed-flex", max_batch_tokens=8192))


def test_the_cpu_calibration_runs_for_real_within_its_budget(tiny):
    chosen = configure_forward(tiny, serve_config(forward_path="auto", max_batch_tokens="auto",
                                                  calibration_budgets="1024,4096", calibration_seconds=20))
    measured = {(m.path, m.budget) for m in chosen.measurements if m.tokens_per_s}
    assert measured == {("packed-sdpa", 1024), ("padded", 1024), ("packed-sdpa", 4096), ("padded", 4096)}
    assert chosen.seconds < 20 and chosen.how == "measured"
    fastest = max(chosen.measurements, key=lambda m: m.tokens_per_s)
    assert (tiny.forward_path, tiny.max_batch_tokens) == (fastest.path, fastest.budget)


def test_a_kernel_whose_scores_differ_from_the_padded_forward_is_never_chosen(tiny, monkeypatch):
    wrong = modeling.packed_outputs
    monkeypatch.setattr(modeling, "packed_outputs", lambda network, batch: wrong(network, batch) + 0.01)
    chosen = configure_forward(tiny, serve_config(forward_path="auto", max_batch_tokens=1024))
    assert chosen.path == "padded"
    (packed,) = [m for m in chosen.measurements if m.path == "packed-sdpa"]
    assert packed.skipped.startswith("failed: RuntimeError: its scores differ from the padded forward's")


def test_calibration_lengths_come_from_a_file_and_a_bad_one_is_refused_in_one_line(tmp_path, tiny):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("40 60\n80\n")
    assert calibration.read_lengths(str(lengths)) == [40, 60, 80]
    chosen = configure_forward(tiny, serve_config(forward_path="auto", max_batch_tokens=1024,
                                                  calibration_lengths=str(lengths)))
    assert chosen.how == "measured"
    lengths.write_text("40 sixty")
    with pytest.raises(StartupError, match="--calibration-lengths .*whitespace-separated token counts"):
        calibration.read_lengths(str(lengths))


def test_a_candidate_that_runs_past_the_time_limit_is_named():
    """The limit is checked between candidates: one that overruns it is measured, and the calibration says which
    and by how much (a log line read 'would not finish in the -6.1 s left')."""
    stand_in = StandIn(RATES, seconds=4.0)  # 4 s a 1000-token candidate: the second ends at 8 s of a 6 s limit
    chosen = choose(["packed-sdpa", "padded"], [1000, 2000], stand_in.measure, 6.0, clock=stand_in.clock)
    assert chosen.how == "measured; padded at 1000 tokens took 4.0 s and ended 2.0 s past the 6 s limit"
    assert [m.skipped for m in chosen.measurements if m.budget == 2000] == ["the 6 s of calibration were spent"] * 2
