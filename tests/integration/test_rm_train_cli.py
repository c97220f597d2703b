"""`rewardserve train` as a real process on a slice of PandaLM, then the real server serving its checkpoint."""
from __future__ import annotations

import statistics
import subprocess

import httpx
import pytest

from rewardserve.server.tokenization import ItemEncoder, load_tokenizer
from rewardserve.trainer.rm.data import DataReport, encode_pairs, prompt_key, read_pairs, split_train_eval

from ..conftest import CLI, ServerProcess
from ..trainer.rm.test_train import tiny_base  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def trained(tiny_base, shared_data, tmp_path_factory):  # noqa: F811
    """`rewardserve train` on a seeded sample of 120 PandaLM pairs: (its folder, the finished run)."""
    out = tmp_path_factory.mktemp("pandalm") / "rm"
    data = shared_data / "pandalm" / "pairs.jsonl"
    run = subprocess.run([*CLI, "train", "--base", str(tiny_base), "--data", str(data), "--out", str(out),
                          "--max-pairs", "120", "--batch-size", "8", "--lr", "1e-3", "--max-length", "200"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def test_train_on_pandalm_then_serve_whitened_rewards(trained, shared_data):
    data = shared_data / "pandalm" / "pairs.jsonl"
    out, run = trained
    assert "held-out evaluation" in run.stdout and "length-only accuracy" in run.stdout

    # The training responses, exactly as the trainer kept them (same split, same length filter).
    train_pairs, held_out = split_train_eval(read_pairs([str(data)], DataReport(), limit=120, seed=0), 0.1, seed=0,
                                            group_of=prompt_key)
    # 53 of PandaLM's rows have an empty response; 10 of the 120 sampled are too long for 200 tokens
    assert ("train: --data 914 rows read: 110 used, 741 left out by --max-pairs, 63 skipped (53 empty response, 10 too"
            " long after truncation") in run.stdout
    # PandaLM asks some instructions more than once: their pairs stay on one side (whole prompts, 12 pairs)
    assert read_pairs([str(out / "heldout.jsonl")], DataReport()) == held_out and len(held_out) == 12
    encoder = ItemEncoder(load_tokenizer(str(out)), max_length=200)
    items = [{"input_ids": ids} for p in encode_pairs(train_pairs, encoder, DataReport())
             for ids in (p.chosen_ids, p.rejected_ids)]
    server = ServerProcess(out)
    try:
        info = httpx.get(f"{server.http_url}/info").json()
        assert info["default_transform"]["name"] == "whiten" and info["statistics"]["source"] == "checkpoint"
        assert info["max_length"] == 200  # the length it was trained at
        rewards = []
        for start in range(0, len(items), 64):
            reply = httpx.post(f"{server.http_url}/score", json={"items": items[start:start + 64]}, timeout=60)
            assert reply.status_code == 200, reply.text
            rewards += reply.json()["rewards"]
    finally:
        assert server.stop() == 0
    assert statistics.fmean(rewards) == pytest.approx(0.0, abs=1e-3)
    assert statistics.pstdev(rewards) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow  # 12 s; the default suite keeps `eval` in process (tests/trainer/rm/test_train.py, its cut at the
# checkpoint's trained length) and the same checkpoint trained and served above
def test_eval_warns_about_pairs_the_checkpoint_trained_on(trained, shared_data, tmp_path):
    """The held-out split is written beside the checkpoint; eval on it is quiet, eval on the training file says how
    many pairs were trained on; bad rows are counted on the terminal, not only in --report."""
    out, _ = trained
    held_out = subprocess.run([*CLI, "eval", "--model", str(out), "--data", str(out / "heldout.jsonl")],
                              capture_output=True, text=True, timeout=600, check=True).stdout
    assert "eval: --data 12 rows read:" in held_out and "training data" not in held_out
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((shared_data / "pandalm" / "pairs.jsonl").read_text() + '["not", "an", "object"]\n')
    trained_on = subprocess.run([*CLI, "eval", "--model", str(out), "--data", str(mixed), "--max-pairs", "120"],
                                capture_output=True, text=True, timeout=600, check=True).stdout
    assert "eval: warning: 108 of these 120 pairs were in this checkpoint's training data" in trained_on
    assert "915 rows read:" in trained_on and "741 left out by --max-pairs" in trained_on
    assert "1 not a JSON object (a JSON list)" in trained_on


@pytest.mark.slow  # 10 s, most of it wandb's own start and finish
def test_report_to_wandb_writes_an_offline_run_that_ends_up_in_the_checkpoint(tiny_base, shared_data,  # noqa: F811
                                                                               tmp_path):
    import json

    from .test_ppo_against_server import wandb_history

    out, data = tmp_path / "rm", shared_data / "pandalm" / "pairs.jsonl"
    run = subprocess.run([*CLI, "train", "--base", str(tiny_base), "--data", str(data), "--out", str(out),
                          "--max-pairs", "48", "--batch-size", "8", "--max-length", "200", "--log-every", "1",
                          "--report-to", "wandb"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not out.with_name("rm.work").exists()
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")  # no API key here: offline, moved into the checkpoint
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in wandb_history(run_file) if "train/loss" in row]
    assert [row["_step"] for row in steps] == [record["step"] for record in logged] and len(steps) >= 4
    for row, record in zip(steps, logged):
        assert row["train/loss"] == pytest.approx(record["loss"])
        assert row["train/accuracy"] == pytest.approx(record["accuracy"])
    assert list(run_file.parent.glob("files/media/images/train/plot_*.png"))
