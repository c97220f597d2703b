"""The real PPO trainer (a process) against the real reward server (another process), over HTTP and gRPC."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from ..conftest import CLI, ServerProcess, build_learning_setup

PROMPT = "Say something."


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tokenizer):
    """A tiny policy, and a reward server whose model prefers the token that policy samples most often."""
    policy, reward_model, prompts = build_learning_setup(tmp_path_factory.mktemp("ppo"), smol_tokenizer, PROMPT)
    server = ServerProcess(reward_model)
    yield policy, prompts, server
    server.stop()


def run_ppo(url: str, policy: Path, prompts: Path, out: Path, steps: int, *extra: str) -> list[dict]:
    args = [*CLI, "ppo", "--reward-url", url, "--policy", str(policy), "--prompts", str(prompts), "--out", str(out),
            "--steps", str(steps), "--lr", "3e-4", "--max-new-tokens", "16", "--batch-size", "16", "--beta", "0.01",
            *extra]
    run = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (out / "stdout.txt").write_text(run.stdout)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # 21 s; the default suite resumes a killed trainer in test_faults.py
def test_resume_continues_without_repeating_a_step(setup, tmp_path):
    policy, prompts, server = setup
    out = tmp_path / "run"
    first = run_ppo(server.grpc_url, policy, prompts, out, 2, "--save-every", "1", "--batch-size", "8")
    assert [r["step"] for r in first] == [1, 2]
    resumed = run_ppo(server.grpc_url, policy, prompts, out, 4, "--save-every", "1", "--batch-size", "8", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # each step's rollouts scored once, none twice
    assert resumed[:2] == first
    for key in ("reward_mean", "kl", "beta", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "explained_variance", "response_length", "tokens_per_s", "time/generate", "time/score_wait",
                "time/update", "score_wait_share"):
        assert key in resumed[-1], key
    assert resumed[-1]["dropped_total"] == 0
    assert (out / "policy" / "model.safetensors").is_file() and (out / "ppo.png").is_file()
    if importlib.util.find_spec("tensorboard") is not None:  # TensorBoard when installed (make test installs it)
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.parametrize("protocol, estimator", [("http", "gae"), ("grpc", "gae"), ("http", "grpo"),
                                                 ("http", "rloo")])
def test_mean_reward_rises_while_kl_stays_bounded(setup, tmp_path, protocol, estimator):
    policy, prompts, server = setup
    url = server.http_url if protocol == "http" else server.grpc_url
    groups = [] if estimator == "gae" else ["--advantage-estimator", estimator, "--samples-per-prompt", "4"]
    records = run_ppo(url, policy, prompts, tmp_path / protocol, 30, *groups)
    early = sum(r["reward_mean"] for r in records[:6]) / 6
    late = sum(r["reward_mean"] for r in records[-6:]) / 6
    assert late > early + 0.5, (early, late)
    assert max(r["kl"] for r in records) < 20


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline Weights & Biases run, read from its .wandb file: a 7-byte header (":W&B",
    magic, version), then LevelDB log records (4-byte checksum, 2-byte length, 1-byte type: full, first, middle,
    last) in 32 KiB blocks, each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, rows = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.slow  # 35 s (wandb's own start and finish); make test ran 578 s with it, too near the 10 minutes
def test_report_to_wandb_writes_an_offline_run_with_the_step_metrics(setup, tmp_path):
    policy, prompts, server = setup
    out = tmp_path / "wandb-run"
    records = run_ppo(server.http_url, policy, prompts, out, 2, "--report-to", "wandb", "--batch-size", "8")
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")  # no API key here: offline
    history = wandb_history(run_file)
    steps = [row for row in history if "ppo/reward_mean" in row]
    assert [row["_step"] for row in steps] == [1, 2]
    for row, record in zip(steps, records):  # TensorBoard's names, the JSON Lines' values
        assert row["ppo/reward_mean"] == pytest.approx(record["reward_mean"])
        assert row["ppo/kl"] == pytest.approx(record["kl"])
    assert list(run_file.parent.glob("files/media/images/ppo/plot_*.png"))  # the plot, as an image


@pytest.mark.slow  # about a minute, as the learning tests above
def test_lora_raises_the_reward_with_the_kl_bounded(setup, tmp_path):
    """The learning test's setting with rank-8 adapters (their default scale, alpha 16, and a learning rate about
    three times the full model's, as LoRA runs use; ten times ran the KL to 31): the reward rises, the KL stays
    bounded, and the run saves the adapter folder and, with --merge-lora, a plain model."""
    from transformers import AutoModelForCausalLM

    policy, prompts, server = setup
    out = tmp_path / "lora"
    records = run_ppo(server.http_url, policy, prompts, out, 30, "--lora-rank", "8", "--lr", "1e-3", "--merge-lora")
    early = sum(r["reward_mean"] for r in records[:6]) / 6
    late = sum(r["reward_mean"] for r in records[-6:]) / 6
    assert late > early + 0.5, (early, late)
    assert max(r["kl"] for r in records) < 20
    assert "LoRA adapters:" in (out / "stdout.txt").read_text()
    assert (out / "policy" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out / "policy-merged")  # plain transformers, no peft


GRPO = ["--batch-size", "8", "--generation-batch-size", "4", "--advantage-estimator", "grpo", "--samples-per-prompt",
        "4"]


def test_a_grpo_step_scores_each_group_in_one_request_and_trains_no_critic(setup, tmp_path):
    """8 rollouts a step as 2 prompts x 4 samples, sampled a group at a time: 2 requests a step, each of a whole
    group; no critic is built, the log has the group figures, GRPO's KL loss and no value metrics."""
    policy, prompts, server = setup
    before = server_requests(server)
    records = run_ppo(server.http_url, policy, prompts, tmp_path / "run", 2, *GRPO, "--kl-in", "loss",
                      "--loss-aggregation", "token-sum-norm")
    assert server_requests(server) - before == 1 + 2 * 2  # the start-up check, then one request per group
    for record in records:
        assert record["advantage_estimator"] == "grpo" and record["rollouts"] == 8 and "kl_loss" in record
        assert record["group_reward_std"] >= 0 and 0 <= record["groups_all_equal"] <= 1
        assert not {"value_loss", "vf_clipfrac", "explained_variance"} & set(record)
    assert "critic none (critic-free)" in (tmp_path / "run" / "stdout.txt").read_text()


@pytest.mark.slow
def test_a_critic_free_run_resumes_from_its_checkpoint(setup, tmp_path):
    policy, prompts, server = setup
    first = run_ppo(server.http_url, policy, prompts, tmp_path / "run", 2, *GRPO, "--save-every", "1")
    resumed = run_ppo(server.http_url, policy, prompts, tmp_path / "run", 3, *GRPO, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == first


def server_requests(server) -> float:
    import httpx

    lines = httpx.get(f"{server.http_url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith('rewardserve_requests_total{outcome="ok",'))


@pytest.mark.slow  # 9 s; two ranks updating together are checked by tests/trainer/rl/test_ppo_update.py
def test_torchrun_two_ranks_on_the_cpu(setup, tmp_path):
    """Data parallel under torchrun (gloo): each rank rolls out its own prompts and calls the server itself."""
    import sys

    policy, prompts, server = setup
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "rewardserve.trainer.cli", "ppo", "--reward-url", server.http_url, "--policy", str(policy),
            "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--batch-size", "4",
            "--generation-batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "8", "--device", "cpu",
            "--gold-reward-url", server.http_url, "--gold-every", "1"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # written once, by rank 0
    assert all(r["ranks"] == 2 and r["rollouts"] == 8 for r in records)  # 4 rollouts on each of 2 ranks
    for record in records:  # the gold server is the proxy's: on the same rollouts (both ranks') they agree
        assert record["gold/reward_mean"] == pytest.approx(record["reward_mean"], abs=1e-5)


@pytest.mark.slow  # 28 s (two torchrun launches); the FSDP step itself is checked by tests/trainer/rl/test_sharding.py
def test_an_fsdp_run_resumed_from_its_sharded_checkpoint_makes_the_same_next_step(setup, tmp_path):
    """Two CPU ranks under --sharding fsdp: 3 steps straight, against 2 steps, then --resume to 3 from the sharded
    checkpoint (torch.distributed.checkpoint); step 3 is the same. Each rank says what it holds."""
    import sys

    policy, prompts, server = setup

    def fsdp_run(out: Path, steps: int, *extra: str) -> list[dict]:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "rewardserve.trainer.cli", "ppo", "--reward-url", server.http_url, "--policy", str(policy),
                "--prompts", str(prompts), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
                "--mini-batch-size", "2", "--max-new-tokens", "8", "--device", "cpu", "--lr", "3e-4",
                "--sharding", "fsdp", "--save-every", "1", *extra]
        run = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        (out / "stdout.txt").write_text(run.stdout)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = fsdp_run(tmp_path / "straight", 3)
    fsdp_run(tmp_path / "resumed", 2)
    resumed = fsdp_run(tmp_path / "resumed", 3, "--resume")
    volatile = {"tokens_per_s", "generation/tokens_per_s", "score_wait_share", "model_version", "scored_by"}
    step_3 = {key: value for key, value in straight[2].items() if key not in volatile and not key.startswith("time/")}
    assert {key: resumed[2][key] for key in step_3} == step_3
    assert (tmp_path / "resumed" / "checkpoints" / "step-3" / "shards" / ".metadata").is_file()
    said = (tmp_path / "straight" / "stdout.txt").read_text()
    assert "rank 0/2 holds (fsdp): parameters" in said and "rank 1/2 holds (fsdp)" in said
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "policy")  # gathered, a plain folder


@pytest.mark.slow  # 14 s; the rotation over replicas is in test_replicas.py
def test_two_replicas_of_one_checkpoint_are_one_reward_model(setup, tmp_path):
    """Two servers of one checkpoint (loaded at different times, so their versions differ after the `@`): the
    trainer sees one model, never a change, and logs which replica scored how many rollouts."""
    policy, prompts, server = setup
    replica = ServerProcess(Path(server.args[server.args.index("--model") + 1]))
    try:
        urls = f"{server.http_url},{replica.http_url}"
        records = run_ppo(urls, policy, prompts, tmp_path / "replicas", 2, "--batch-size", "8",
                          "--generation-batch-size", "4")
    finally:
        replica.stop()
    assert not any(r["model_version_changed"] for r in records)
    expected = {server.http_url: "4", replica.http_url: "4"}  # round-robin: one chunk of 4 each
    assert all(dict(part.rsplit("=", 1) for part in r["scored_by"].split(",")) == expected for r in records)


@pytest.mark.slow  # 9 s; the default suite runs the gold monitor to its stop (test_gold_monitor.py)
def test_best_gold_keeps_the_policy_that_sampled_the_judged_rollouts(setup, tmp_path):
    """One step, judged on gold: the rollouts were sampled by the initial policy, so best_gold holds its weights,
    not those of the update that followed."""
    from safetensors.torch import load_file

    policy, prompts, server = setup
    out = tmp_path / "gold"
    run_ppo(server.http_url, policy, prompts, out, 1, "--gold-reward-url", server.http_url, "--gold-every", "1")
    initial, best, final = (load_file(str(folder / "model.safetensors"))
                            for folder in (policy, out / "best_gold", out / "policy"))
    assert all(torch.equal(initial[name], best[name]) for name in initial)
    assert not all(torch.equal(initial[name], final[name]) for name in initial)  # the update did change it
