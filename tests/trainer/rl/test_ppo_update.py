"""The PPO update reads the device once per epoch, not once per minibatch, and still learns and skips safely."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from rewardserve.trainer.rl.config import PPOConfig
from rewardserve.trainer.rl.generation import RolloutEngine, Sampling
from rewardserve.trainer.rl.ppo import ppo_update
from rewardserve.trainer.rl.rollout import ActorCritic, generate_rollout

from ...conftest import build_tiny_policy
from ..rm.test_train import SYNCS


def rollout_of(policy, tokenizer, count: int):
    engine = RolloutEngine(policy, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = ActorCritic(policy)
    rollout, _ = generate_rollout(model, copy.deepcopy(policy), engine, tokenizer, ["Hello there"] * count,
                                  Sampling(8), 32, torch.device("cpu"), forward_tokens=4096)
    return model, rollout


def count_syncs(monkeypatch, run) -> int:
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _o=original, **k: (calls.append(_n), _o(self, *a, **k))[1])
    try:
        run()
    finally:
        monkeypatch.undo()
    return len(calls)


def test_host_reads_do_not_grow_with_the_number_of_minibatches(tmp_path, smol_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path / "policy", smol_tokenizer))
    model, rollout = rollout_of(policy, smol_tokenizer, 8)
    advantages = torch.randn(rollout.response_mask.shape) * rollout.response_mask
    returns = torch.randn(rollout.response_mask.shape)
    counts, results = {}, {}
    for mini in (8, 2):  # 1 and then 4 minibatches per epoch
        config = PPOConfig(reward_url=["http://127.0.0.1:9"], batch_size=8, mini_batch_size=mini, ppo_epochs=2,
                           max_approx_kl=1e9)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        counts[mini] = count_syncs(monkeypatch, lambda: results.__setitem__(mini, ppo_update(
            model, optimizer, rollout, advantages, returns, config, torch.device("cpu"))))
    assert counts[2] == counts[8], counts  # the reads are per epoch and per summary, never per minibatch
    assert results[2]["skipped_updates"] == 0 and results[2]["policy_loss"] == results[2]["policy_loss"]  # not NaN


def test_a_non_finite_minibatch_is_skipped_and_left_out_of_the_statistics(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path / "policy", smol_tokenizer))
    model, rollout = rollout_of(policy, smol_tokenizer, 4)
    advantages = torch.full(rollout.response_mask.shape, float("nan"))  # every loss is NaN
    returns = torch.zeros(rollout.response_mask.shape)
    config = PPOConfig(reward_url=["http://127.0.0.1:9"], batch_size=4, mini_batch_size=2, ppo_epochs=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = ppo_update(model, optimizer, rollout, advantages, returns, config, torch.device("cpu"))
    assert result["skipped_updates"] == 2 and result["policy_loss"] == 0.0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_the_ready_made_mask_gives_transformers_own_logits_on_left_padded_rows(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    from rewardserve.trainer.prompts import encode_prompt, pad_left
    from rewardserve.trainer.rl.rollout import positions_from_mask

    policy = AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path / "policy", smol_tokenizer)).eval()
    ids, mask = pad_left([encode_prompt(smol_tokenizer, p, 64) for p in ("Hi", "Tell me about the sea, please")],
                         smol_tokenizer.pad_token_id)
    with torch.no_grad():
        ours, _ = ActorCritic(policy)(ids, mask, prompt_width=2)  # (B, R, V) for the last positions
        theirs = policy(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, 1:-1]
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow  # 10 s; test_sharding runs the same two-rank DDP step (beside FSDP's) in the default suite
def test_two_ranks_with_different_rollout_counts_update_together(tmp_path, smol_tokenizer):
    """After a partial drop, rank 0 holds 4 rollouts and rank 1 two: both run as many minibatch steps (no hang),
    end with the same weights, and whiten with the statistics of the whole batch."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    worker = Path(__file__).with_name("ddp_update_worker.py")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
            str(policy), str(tmp_path)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)  # a hang is a failure
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [line["rollouts"] for line in lines] == [4, 2]
    assert lines[0]["checksum"] == pytest.approx(lines[1]["checksum"], abs=1e-9)  # DDP kept them in step
    assert all(line["whitening_error"] < 1e-5 for line in lines)


def test_the_early_stop_reads_each_epoch_s_own_kl(tmp_path, smol_tokenizer, monkeypatch):
    """One minibatch per epoch, approximate KL 0, 1, 1 by epoch and a limit of 0.8: the second epoch's check must
    stop the update (its own KL is 1); averaged with the first epoch's 0, it read 0.5 and ran a third."""
    from rewardserve.trainer.rl import ppo
    from rewardserve.trainer.rl.estimators import PolicyLoss, clipped_policy_loss

    policy = AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path / "policy", smol_tokenizer))
    model, rollout = rollout_of(policy, smol_tokenizer, 4)
    kls = iter([0.0, 1.0, 1.0])

    def scripted(*args, **kwargs):
        loss = clipped_policy_loss(*args, **kwargs)
        return PolicyLoss(loss.loss, loss.clipfrac, torch.tensor(next(kls)))

    monkeypatch.setattr(ppo, "clipped_policy_loss", scripted)
    config = PPOConfig(reward_url="http://127.0.0.1:9", batch_size=4, mini_batch_size=4, ppo_epochs=3,
                       max_approx_kl=0.8)
    advantages, returns, _ = ppo.advantages_for(rollout, torch.arange(4.0), 0.05, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ppo.ppo_update(model, optimizer, rollout, advantages, returns, config, torch.device("cpu"))
    assert next(kls) == 1.0  # the third epoch never ran


def test_top_p_below_one_is_refused_in_one_line():
    with pytest.raises(ValueError, match="--top-p 0.5: PPO samples from the whole distribution"):
        PPOConfig(reward_url="http://127.0.0.1:9", top_p=0.5)


def test_the_learning_rate_warms_up_linearly_then_stays():
    from rewardserve.trainer.rl.ppo import warmup_lr

    assert [warmup_lr(step, 1.0, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(0, 3e-5, 0) == 3e-5  # no warm-up


def test_a_half_precision_value_head_still_gives_fp32_values(tmp_path, smol_tokenizer):
    """Under FSDP's mixed precision the value head computes in bf16 while the trunk's output is cast for it: the
    values come out fp32, and close to the fp32 head's."""
    from rewardserve.trainer.prompts import encode_prompt, pad_left

    policy = AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path / "policy", smol_tokenizer)).eval()
    model = ActorCritic(policy)
    torch.nn.init.normal_(model.value_head.weight)
    ids, mask = pad_left([encode_prompt(smol_tokenizer, p, 32) for p in ("Hi", "Tell me about the sea")],
                         smol_tokenizer.pad_token_id)
    with torch.no_grad():
        _, fp32 = model(ids, mask, prompt_width=2)
        model.value_head.to(torch.bfloat16)
        _, half = model(ids, mask, prompt_width=2)
    assert half.dtype == torch.float32 and fp32.abs().max() > 0.1
    assert torch.allclose(half, fp32, atol=0.05 * fp32.abs().max().item())


def test_an_epochs_minibatch_indices_reach_the_device_in_one_copy():
    """Views of one tensor, copied once an epoch, not a tensor built on the device per minibatch."""
    from rewardserve.trainer.rl.ppo import epoch_index_tensors

    parts = epoch_index_tensors([[3, 0, 5], [1, 4], [2]], torch.device("cpu"))
    assert [p.tolist() for p in parts] == [[3, 0, 5], [1, 4], [2]]
    assert len({p.untyped_storage().data_ptr() for p in parts}) == 1


class ScriptedScorer:
    """A reward client that refuses its first chunk with the given 4xx and scores the others 1.0."""

    def __init__(self, kind: str):
        self.kind, self.calls = kind, 0

    def score(self, items, target=None):
        from rewardserve.trainer.client import ScoreResult
        from rewardserve.trainer.client.transports import RequestRejected

        self.calls += 1
        if self.calls == 1:
            raise RequestRejected("422", self.kind, "items[1]: the model's score for this item is nan")
        return ScoreResult(scores=[1.0] * len(items), rewards=[1.0] * len(items), truncated=[False] * len(items),
                           transform={"name": "raw"}, model="rm")


@pytest.mark.parametrize("kind", ["unscorable_item", "unknown_model"])
def test_a_refused_item_drops_its_chunk_and_a_refused_run_ends_in_one_line(tmp_path, smol_tokenizer, kind):
    """A 422 for one item (unscorable, too long) drops that chunk and counts it, as an unreachable server does;
    a refusal of the run's own configuration ends it with one line, not a traceback out of main()."""
    from concurrent.futures import ThreadPoolExecutor

    from rewardserve.server.errors import StartupError
    from rewardserve.trainer.rl.ppo import rollout_and_score

    policy = AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path / "p", smol_tokenizer))
    model, reference = ActorCritic(policy), copy.deepcopy(policy).eval()
    engine = RolloutEngine(policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id)
    config = PPOConfig(reward_url="http://127.0.0.1:9", batch_size=4, mini_batch_size=2, generation_batch_size=2,
                       max_new_tokens=4)
    prompts = ["one", "two", "three", "four"]
    with ThreadPoolExecutor(2) as pool:
        if kind == "unknown_model":
            with pytest.raises(StartupError, match="refuses this run's requests .*unknown_model"):
                rollout_and_score(model, reference, engine, smol_tokenizer, prompts, ScriptedScorer(kind), pool,
                                  config, torch.device("cpu"))
            return
        scored = rollout_and_score(model, reference, engine, smol_tokenizer, prompts, ScriptedScorer(kind), pool,
                                   config, torch.device("cpu"))
    assert scored.dropped == 2 and len(scored.rollout.responses) == 2 and scored.scores.tolist() == [1.0, 1.0]


def test_the_start_check_sends_the_item_shape_of_the_run():
    """A run of `messages` prompts checks the server with a `messages` item before the policy loads, so a server
    that cannot take them refuses in one line at start, not after the first generation."""
    from rewardserve.trainer.client import RewardTarget
    from rewardserve.trainer.rl.ppo import check_reward_server

    sent = []

    class Recorder:
        urls = ["http://127.0.0.1:9"]

        def score(self, items, target=None):
            sent.append(items)

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    check_reward_server(Recorder(), RewardTarget.from_names(None, None), conversation)
    check_reward_server(Recorder(), RewardTarget.from_names(None, None), "Hi?")
    assert sent[0] == [{"messages": conversation + [{"role": "assistant", "content": "Hello! How can I help?"}]}]
    assert sent[1] == [{"prompt": "Hi?", "response": "Hello! How can I help?"}]
