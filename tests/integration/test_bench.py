"""`rewardserve bench all --shapes tiny`: the real command end to end on this CPU, its JSON checked row by row."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from rewardserve.trainer.bench.common import workload_g

from ..conftest import CLI, SHARED_DATA

SERVE_ROWS = ["anchor naive b16", "anchor sorted 64k", "core", "core, sharing off", "HTTP 16x32", "gRPC 16x32",
              "HTTP 128x1", "HTTP text 16x32"]  # and, after "core", one row per calibration candidate
CANDIDATE_ROW = re.compile(r"^core (packed-sdpa|padded) (\d+)k$")
SHARED_ROWS = ["core, sharing off", "core, sharing on", "HTTP 8 clients, a group a request",
               "gRPC 8 clients, a group a request"]


# The whole command takes about a minute on 2 cores: it runs under `make test-all`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory, smollm2_dir) -> dict:
    out = tmp_path_factory.mktemp("bench")
    began = time.perf_counter()
    run = subprocess.run([*CLI, "bench", "all", "--shapes", "tiny", "--out", str(out), "--cache", str(out / "cache"),
                          "--data-dir", str(SHARED_DATA), "--budget-s", "1", "--train-pairs", "64",
                          "--advantage-estimator", "grpo", "--samples-per-prompt", "8"],  # PPO's own runs cover gae
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    result["wall_s"] = time.perf_counter() - began
    assert "## serve" in (out / "bench.md").read_text() and "## serve" in run.stdout
    assert "| 16 x 32 | grpo, 8 |" in (out / "bench.md").read_text()  # the ppo rows name their estimator and group
    return result


def test_every_serve_row_is_there_with_its_ratio_to_the_core(bench_result):
    rows = {r["row"]: r for r in bench_result["serve"][0]["rows"]}
    names = list(rows)
    assert names[:3] == SERVE_ROWS[:3] and names[-5:] == SERVE_ROWS[3:]
    candidates = [CANDIDATE_ROW.match(name) for name in names[3:-5]]
    assert all(candidates) and {match.group(1) for match in candidates} == {"packed-sdpa", "padded"}
    chosen = bench_result["serve"][0]["server_forward"]  # what the server said it serves with (pinned by conftest)
    assert chosen["forward_path"] == "packed-sdpa" and chosen["max_batch_tokens"] == 16384
    core = rows["core"]["tokens_per_s"]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["passes"] >= 2
        assert row["ratio_to_core"] == pytest.approx(row["tokens_per_s"] / core)
        # MFU = 2 x non-embedding parameters x tokens / seconds / peak; the tiny shape has 74,112 such parameters
        # (2 layers of q, k, v, o, gate, up, down and two norms, the final norm, and the one-output head)
        implied = row["mfu"] * row["seconds"] * bench_result["peak"]["flops"] / (2 * row["tokens"])
        assert implied == pytest.approx(74_112, rel=1e-6)
    for name in SERVE_ROWS[4:]:
        assert rows[name]["p50_s"] is not None and rows[name]["p99_s"] >= rows[name]["p50_s"]
    assert rows["HTTP 16x32"]["tokens"] == rows["core"]["tokens"]  # the server scored every token of W's slice


def test_train_compares_ours_with_trl_on_the_same_pairs(bench_result):
    train = bench_result["train"][0]
    assert train["ours"]["pairs_per_s"] > 0
    if "pairs_per_s" in train["trl"]:
        assert train["speedup"] == pytest.approx(train["ours"]["pairs_per_s"] / train["trl"]["pairs_per_s"])
        assert train["speedup_after_first_step"] == pytest.approx(
            train["ours"]["pairs_per_s_after_first_step"] / train["trl"]["pairs_per_s_after_first_step"])
    assert train["ours"]["accuracy"] is None  # random weights measure speed only


def test_ppo_reports_three_steps_after_the_warm_up(bench_result):
    ppo = bench_result["ppo"][0]
    assert [s["step"] for s in ppo["steps"]] == [2, 3, 4]
    assert (ppo["advantage_estimator"], ppo["samples_per_prompt"], ppo["rollouts"]) == ("grpo", 8, 16)
    for step in ppo["steps"]:
        assert 1 <= step["generation/decode_steps"] <= ppo["max_new_tokens"]
        assert step["generation/tokens_per_s"] > 0 and step["time/step"] >= step["time/generate"]


def test_the_environment_and_the_budget(bench_result):
    env = bench_result["environment"]
    assert env["torch"] and env["transformers"] and env["python"] and env["flags"]["shapes"] == ["tiny"]
    assert bench_result["wall_s"] < 180  # the command itself must stay under 2 minutes here; this adds start-up


def test_workload_g_shares_each_group_s_prompt(tmp_path):
    """`bench serve --workload G` on its first 3 groups: the core with sharing off computes every token sent, with
    it on little more than each prompt once; so does the server (HTTP and gRPC, a group a request)."""
    run = subprocess.run([*CLI, "bench", "serve", "--workload", "G", "--groups", "3", "--shapes", "tiny", "--out",
                          str(tmp_path), "--cache", str(tmp_path / "cache"), "--budget-s", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    groups = workload_g(3)
    sent = sum(len(s) for group in groups for s in group)
    prompt_once = sent - sum((len(group) - 1) * len(os.path.commonprefix(group)) for group in groups)
    assert result["workload"] == {"name": "G", "groups": 3, "sequences": 24, "tokens": sent, "complete": False}
    rows = {r["row"]: r for r in result["serve"][0]["rows"]}
    assert list(rows) == SHARED_ROWS and all(r["tokens"] == sent for r in rows.values())
    assert rows["core, sharing off"]["computed_per_sent"] == 1.0
    for name in SHARED_ROWS[1:]:  # a group the token budget splits computes its prompt once per part
        assert prompt_once / sent <= rows[name]["computed_per_sent"] < 0.5
    assert "## serve, workload G" in (tmp_path / "bench.md").read_text()
