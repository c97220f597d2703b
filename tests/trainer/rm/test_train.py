"""Reward-model training on the CPU with tiny models: one forward per pair, statistics, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rewardserve.server.modeling import RewardModel
from rewardserve.trainer.rm import train as rm_train
from rewardserve.trainer.rm.config import RMTrainConfig
from rewardserve.trainer.rm.data import EncodedPair, collate_pairs
from rewardserve.trainer.rm.preference import bradley_terry_loss

from ...conftest import tiny_config


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, smol_tokenizer) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-base")
    AutoModelForCausalLM.from_config(tiny_config("llama", len(smol_tokenizer), smol_tokenizer.pad_token_id)
                                     ).save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Learnable toy preferences: the chosen answer is polite."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": f"Thank you, the answer is {i}.", "rejected": f"{i}. Go away."}
            for i in range(48)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def config(base, data, out, **overrides) -> RMTrainConfig:
    settings = dict(base=str(base), data=[str(data)], out=str(out), batch_size=8, lr=3e-3, max_length=128,
                    log_every=1, epochs=2, warmup_ratio=0.0)
    return RMTrainConfig(**(settings | overrides))


def test_one_forward_scores_both_sides_of_every_pair(tiny_base, smol_tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    calls = []
    model.base_model.register_forward_pre_hook(lambda _m, _args, kwargs: calls.append(kwargs["input_ids"].shape),
                                               with_kwargs=True)
    pairs = [EncodedPair([i, 2, 3], [i + 10, 5], None, None, False) for i in range(4)]  # distinct: none deduplicated
    optimizer = torch.optim.AdamW(model.parameters())
    settings, cpu = config("b", "d", "o", batch_size=4), torch.device("cpu")
    result = rm_train.train_step(model, optimizer, rm_train.collate_step(pairs, settings, 0, model, cpu), settings, cpu)
    assert calls == [torch.Size([1, 4 * 3 + 4 * 2])] and not result["skipped"]  # both sides packed in one row


def test_lr_schedule_by_hand():
    assert rm_train.lr_at(0, total=100, warmup=10, peak=1.0) == pytest.approx(0.1)
    assert rm_train.lr_at(10, total=100, warmup=10, peak=1.0) == pytest.approx(1.0)
    assert rm_train.lr_at(100, total=100, warmup=10, peak=1.0) == pytest.approx(0.1)


def test_training_learns_writes_statistics_and_a_plain_hf_checkpoint(tiny_base, pairs_file, tmp_path):
    report = rm_train.main(config(tiny_base, pairs_file, tmp_path / "rm"))
    assert report["accuracy"] == 1.0  # the toy preference is learnable
    out = tmp_path / "rm"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "eval_report.json", "train_log.jsonl",
                 "training.png"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "rm.work").exists()
    stats = json.loads((out / "config.json").read_text())["reward_statistics"]
    assert stats == {"mean": pytest.approx(report["statistics"]["mean"]), "std": pytest.approx(report["statistics"]["std"])}
    served = RewardModel.load(str(out))
    assert (served.statistics.mean, served.statistics.std) == (stats["mean"], stats["std"])
    plain = AutoModelForSequenceClassification.from_pretrained(out)  # no project code needed
    assert plain.config.num_labels == 1 and plain.config.pad_token_id != plain.config.eos_token_id


def test_whitening_statistics_come_from_held_out_responses_when_there_are_enough():
    train, held_out = torch.arange(10.0), torch.ones(rm_train.MIN_HELD_OUT_RESPONSES)
    assert rm_train.whitening_scores(train, held_out) == (held_out, "64 held-out responses")
    assert rm_train.whitening_scores(train, held_out[:-1]) == (train, "10 training responses")


def test_resume_continues_to_the_same_weights(tiny_base, pairs_file, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    rm_train.main(config(tiny_base, pairs_file, straight))
    interrupted = tmp_path / "interrupted"
    original = rm_train.train_step
    steps = []

    def crash_at_step_4(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(rm_train, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        rm_train.main(config(tiny_base, pairs_file, interrupted, save_every=2))
    assert torch.load(tmp_path / "interrupted.work" / "state.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(rm_train, "train_step", original)
    rm_train.main(config(tiny_base, pairs_file, interrupted, save_every=2, resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log = [json.loads(line) for line in (interrupted / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))  # 2 epochs x 6 batches, each step logged once


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_a_training_step_that_does_not_log_never_synchronises_with_the_host(tiny_base, monkeypatch):
    """Every way a tensor's value reaches Python is patched to count; a step must use none of them."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    settings = config("b", "d", "o", batch_size=4, grad_accum=2)
    optimizer = rm_train.make_optimizer(model, settings)
    pairs = [EncodedPair([1, 2, 3, 9], [4, 5], None, None, False) for _ in range(4)]
    cpu = torch.device("cpu")
    batches = rm_train.collate_step(pairs, settings, 0, model, cpu)
    rm_train.train_step(model, optimizer, batches, settings, cpu)  # first step: lazy state
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _name=name, _original=original, **k: (calls.append(_name),
                                                                                   _original(self, *a, **k))[1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = rm_train.train_step(model, optimizer, batches, settings, cpu)
    monkeypatch.undo()
    assert calls == []
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in result.values())
    assert not bool(result["skipped"]) and any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_step_with_a_non_finite_loss_is_skipped_by_the_optimizer(tiny_base):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    settings = config("b", "d", "o", batch_size=2)
    optimizer = rm_train.make_optimizer(model, settings)
    pairs = [EncodedPair([1, 2, 3], [4, 5], None, None, False) for _ in range(2)]
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cpu = torch.device("cpu")
    result = rm_train.train_step(model, optimizer, rm_train.collate_step(pairs, settings, 0, model, cpu), settings, cpu)
    assert bool(result["skipped"])
    assert all(torch.equal(before[n], p) or torch.isnan(before[n]).all() for n, p in model.named_parameters())
    assert int(optimizer.state[model.score.weight]["step"]) == 0


def test_packed_and_padded_pairs_give_the_same_scores_and_loss(tiny_base):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1).eval()
    pairs = [EncodedPair(list(range(5, 5 + n)), list(range(40, 40 + m)), 0.5, None, False)
             for n, m in ((3, 9), (17, 2), (1, 30), (12, 12))]
    cpu = torch.device("cpu")
    results = {}
    for packed in (False, True):
        batch = collate_pairs(pairs, 0, packed=packed)
        assert (batch.packed is not None) == packed
        chosen, rejected = rm_train.pair_scores(model, batch, cpu)
        results[packed] = (chosen, rejected, bradley_terry_loss(chosen, rejected, batch.margin))
    for padded, packed in zip(results[False], results[True]):
        assert torch.allclose(padded, packed, atol=1e-4)


def test_gradient_checkpointing_gives_the_packed_step_s_gradients(tiny_base):
    """The backward recomputes each layer's forward: it must run the packed attention again, or it attends across
    the packed documents (and torch refuses the step: another number of tensors saved)."""
    pairs = [EncodedPair(list(range(5, 5 + n)), list(range(40, 40 + m)), None, None, False)
             for n, m in ((3, 9), (17, 2), (6, 11))]
    settings, cpu = config("b", "d", "o", batch_size=3), torch.device("cpu")
    gradients = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same fresh score head
        model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
        model.config.pad_token_id = 0
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        rm_train.train_step(model, optimizer, rm_train.collate_step(pairs, settings, 0, model, cpu), settings, cpu)
        gradients[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert gradients[True].keys() == gradients[False].keys()
    for name, gradient in gradients[False].items():
        assert torch.allclose(gradients[True][name], gradient, atol=1e-6), name


def pairs_with(p_chosen, chosen_lengths, rejected_lengths):
    """Encoded pairs of whole sequences of 100 tokens each (as after truncation) with the given response lengths."""
    return [EncodedPair([1] * 100, [2] * 100, None, p, True, lc, lr)
            for p, lc, lr in zip(p_chosen, chosen_lengths, rejected_lengths)]


def test_evaluation_reads_the_winner_from_the_soft_label():
    """The same 64 preferences written as (chosen, rejected, p 1) and as (rejected, chosen, p 0) report the same."""
    torch.manual_seed(0)
    better, worse = torch.randn(64) + 1.0, torch.randn(64)
    lengths = [10 + i % 7 for i in range(64)], [12 + i % 5 for i in range(64)]
    listed = rm_train.evaluation_report(pairs_with([1.0] * 64, *lengths), better, worse)
    swapped = rm_train.evaluation_report(pairs_with([0.0] * 64, lengths[1], lengths[0]), worse, better)
    for key in ("accuracy", "mean_reward_gap", "ece", "label_log_likelihood", "brier_score", "length_only_accuracy"):
        assert listed[key] == pytest.approx(swapped[key]), key
    assert listed["accuracy"] > 0.7 and listed["mean_reward_gap"] > 0


def test_length_figures_use_the_responses_own_lengths():
    """Whole sequences are all 100 tokens (truncated): by them every pair would tie. The responses differ."""
    report = rm_train.evaluation_report(pairs_with([None] * 4, [30, 5, 20, 8], [10, 9, 20, 2]),
                                        torch.tensor([3.0, 0.5, 2.0, 0.8]), torch.tensor([1.0, 0.9, 2.0, 0.2]))
    assert report["length_only_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert report["length_reward_correlation"] == pytest.approx(
        rm_train.pearson([30, 5, 20, 8, 10, 9, 20, 2], [3.0, 0.5, 2.0, 0.8, 1.0, 0.9, 2.0, 0.2]))


def test_eval_cuts_pairs_at_the_checkpoint_s_trained_length(tiny_base, pairs_file, tmp_path):
    """A checkpoint trained at 32 tokens is evaluated at 32 (as the server scores it), not at a default of 1024."""
    out = tmp_path / "rm"
    rm_train.main(config(tiny_base, pairs_file, out, max_length=32, epochs=1))
    from rewardserve.trainer.rm.config import EvalConfig

    default = rm_train.evaluate_checkpoint(EvalConfig(model=str(out), data=[str(pairs_file)]))
    explicit = rm_train.evaluate_checkpoint(EvalConfig(model=str(out), data=[str(pairs_file)], max_length=1024))
    assert default["data"]["truncated"] > 0 and explicit["data"]["truncated"] == 0


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_a_prompt_shared_by_chosen_and_rejected_gives_the_unshared_loss_and_gradients(smol_tokenizer, kind):
    """Two pairs whose sides share a 40- and a 36-token prompt, and one that shares nothing: packed with the
    prompts once, the Bradley-Terry loss and every parameter's gradient are those of the unshared packing."""
    from ..rl.test_shared_prompts import close

    torch.manual_seed(0)
    config = tiny_config(kind, len(smol_tokenizer), smol_tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config).eval()  # GPT-2's dropout off: one draw each side
    first, second = list(range(100, 140)), list(range(200, 236))
    pairs = [EncodedPair(first + [7, 8, 9], first + [10, 11], None, 0.8, False),
             EncodedPair(second + [12], second + [13, 14, 15, 16], None, None, False),
             EncodedPair([1, 2, 3], [4, 5], None, 0.6, False)]
    cpu = torch.device("cpu")

    def loss_and_gradients(min_shared_prefix: int):
        model.zero_grad(set_to_none=True)
        batch = collate_pairs(pairs, smol_tokenizer.pad_token_id, packed=True, min_shared_prefix=min_shared_prefix)
        chosen, rejected = rm_train.pair_scores(model, batch, cpu)
        loss = bradley_terry_loss(chosen, rejected, batch.margin, batch.p_chosen)
        loss.backward()
        return batch.packed.computed_tokens, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    unshared_tokens, unshared_loss, unshared_grads = loss_and_gradients(0)
    shared_tokens, shared_loss, shared_grads = loss_and_gradients(32)
    assert (unshared_tokens, shared_tokens) == (167, 167 - 40 - 36)  # each prompt computed once
    assert close(unshared_loss, shared_loss)
    assert unshared_grads["score.weight"].abs().max() > 0
    for name, grad in unshared_grads.items():
        assert close(grad, shared_grads[name]), name
