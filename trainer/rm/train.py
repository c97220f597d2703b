"""Bradley–Terry reward-model training, in nanoGPT's order: data -> model -> for each step: batch -> forward ->
loss -> backward -> clip -> step -> log; then evaluate, compute the whitening statistics, save.

The checkpoint is a plain Hugging Face sequence-classification model (plus the statistics in its config), scored
by the server through the same `sequence_scores` and `ItemEncoder` used here, so training and serving agree.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rewardserve.server.embedded import resolve_model_path
from rewardserve.server.modeling import (context_size, describe_device, init_reward_model_from_base,
                                         is_decoder_reward_model, load_sequence_classifier, resolve_device,
                                         save_reward_model, sequence_scores, shares_prefixes, synchronize)
from rewardserve.server.normalization import LengthFit, RewardStatistics, debias, fit_length
from rewardserve.server.packing import packed_attention_on, packed_scores, supports_packing, to_device
from rewardserve.server.tokenization import PLAIN_FORMAT_KEY, ItemEncoder, load_tokenizer, trained_max_length

from .config import EvalConfig, RMTrainConfig
from .data import (DataReport, EncodedPair, PairBatch, PreferencePair, collate_pairs, encode_pairs,
                   length_bucketed_batches, pair_fingerprint, prompt_key, read_pairs, split_train_eval, write_pairs)
from .preference import (bradley_terry_loss, brier_score, expected_calibration_error, label_log_likelihood,
                         length_only_accuracy, pairwise_accuracy, pairwise_wins, pearson, reward_statistics,
                         wilson_interval, winner_margin)
from ..tracking import JsonlLog, format_table, plot_curves, start_wandb



def work_dir(out: Path) -> Path:
    """Training state and logs live beside the checkpoint until it is saved, then the logs move into it."""
    return out.with_name(out.name + ".work")


# -- forward passes -------------------------------------------------------------------------------------------------
def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32 for the optimizer); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pair_scores(model, batch: PairBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected together: returns (chosen (B,), rejected (B,))."""
    non_blocking = device.type == "cuda"
    with autocast_for(device):
        if batch.packed is not None:
            scores = packed_scores(model, to_device(batch.packed, device))  # (2B,)
        else:
            scores = sequence_scores(model, batch.input_ids.to(device, non_blocking=non_blocking),
                                     batch.attention_mask.to(device, non_blocking=non_blocking))
    return scores[: batch.pairs], scores[batch.pairs:]


def collate_step(pairs: list[EncodedPair], config: RMTrainConfig, pad_id: int, model, device) -> list[PairBatch]:
    """A step's --grad-accum micro-batches, ready for the device (packed where the model allows, pinned on CUDA).
    Runs on a background thread while the previous step trains."""
    return [collate_pairs(pairs[start:start + config.micro_batch_size], pad_id, config.margin,
                          packed=supports_packing(model, config.max_length), pin_memory=device.type == "cuda",
                          min_shared_prefix=shared_prefix(model, config))
            for start in range(0, len(pairs), config.micro_batch_size)]


def shared_prefix(model, config: RMTrainConfig) -> int:
    """--min-shared-prefix where the model can share prefixes (a decoder that packs), else 0."""
    return config.min_shared_prefix if shares_prefixes(model, config.max_length) else 0


@torch.no_grad()
def score_all_pairs(model, pairs: list[EncodedPair], pad_token_id: int, batch_size: int, device,
                    progress: str | None = None, min_shared_prefix: int = 0):
    """Scores every pair in length-sorted batches: returns (chosen (N,), rejected (N,)) on the CPU. `progress`
    names a progress bar over the batches (None: no bar); `min_shared_prefix`, as `collate_pairs` takes it."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    chosen, rejected = torch.empty(len(pairs)), torch.empty(len(pairs))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None):
        index = order[start:start + batch_size]
        batch_pairs = [pairs[i] for i in index]
        packed = supports_packing(model, max(pair.length for pair in batch_pairs))
        batch = collate_pairs(batch_pairs, pad_token_id, packed=packed, min_shared_prefix=min_shared_prefix)
        c, r = pair_scores(model, batch, device)
        chosen[index], rejected[index] = c.float().cpu(), r.float().cpu()
    model.train(was_training)
    return chosen, rejected


# -- evaluation -----------------------------------------------------------------------------------------------------
def evaluation_report(pairs: list[EncodedPair], chosen: torch.Tensor, rejected: torch.Tensor,
                      length_fit: LengthFit | None = None) -> dict:
    """Held-out accuracy, reward gap, calibration, the labels' log-likelihood and Brier score, accuracy by margin,
    and the length-bias check: how often the reward picks the longer response (what a length-only scorer would
    pick), and with `length_fit`, the same for the length-debiased reward.

    Each pair's winner is the one its label names (`chosen` unless p_chosen < 0.5); lengths are the responses' own
    tokens, not the whole formatted sequences (whose prompts and truncation would blur them)."""
    labels = pair_labels(pairs)
    won = winner_margin(chosen, rejected, labels)  # (N,) the labelled winner's score minus the loser's
    by_margin = defaultdict(list)
    for pair, difference in zip(pairs, won.tolist()):
        by_margin["none" if pair.margin is None else f"{pair.margin:.2f}"].append(
            1.0 if difference > 0 else 0.5 if difference == 0 else 0.0)
    chosen_lengths = [p.chosen_response_length for p in pairs]
    rejected_lengths = [p.rejected_response_length for p in pairs]
    winner_lengths, loser_lengths = zip(*[(c, r) if p.p_chosen is None or p.p_chosen >= 0.5 else (r, c)
                                          for p, c, r in zip(pairs, chosen_lengths, rejected_lengths)])
    accuracy = pairwise_accuracy(chosen, rejected, labels)
    report = {
        "pairs": len(pairs),
        "accuracy": accuracy,
        "accuracy_interval": list(wilson_interval(accuracy, len(pairs))),
        "mean_reward_gap": won.mean().item(),
        "ece": expected_calibration_error(chosen, rejected, labels),
        "label_log_likelihood": label_log_likelihood(chosen, rejected, labels),
        "brier_score": brier_score(chosen, rejected, labels),
        "accuracy_by_margin": {k: {"pairs": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_margin.items())},
        "length_reward_correlation": pearson(chosen_lengths + rejected_lengths, chosen.tolist() + rejected.tolist()),
        "length_only_accuracy": length_only_accuracy(list(winner_lengths), list(loser_lengths)),
    } | length_bias_report(pairs, chosen.tolist(), rejected.tolist(), length_fit)
    return report | {"context": report_context(report)}


def report_context(report: dict) -> list[str]:
    """What a reader should know before trusting the figures: an interval that holds a coin or the length-only
    baseline, and a debiasing that turned the reward's length preference around (then its accuracy measures
    length, not quality)."""
    low, high = report["accuracy_interval"]
    notes = []
    if low <= 0.5 <= high:
        notes.append(f"the 95% interval of the accuracy, [{low:.3f}, {high:.3f}] over {report['pairs']} pairs,"
                     " includes 0.5: these pairs cannot tell this model from a coin")
    if low <= report["length_only_accuracy"] <= high:
        notes.append(f"that interval includes the length-only baseline ({report['length_only_accuracy']:.3f}): these"
                     " pairs cannot tell this model from one that picks the longer response")
    bias = report["length_bias"]
    if bias["debiased"] is not None:
        raw, debiased = bias["raw"]["agrees_with_length"], bias["debiased"]["agrees_with_length"]
        if (raw - 0.5) * (debiased - 0.5) < 0:
            notes.append(f"removing the training set's length slope turns the reward's length preference around"
                         f" (prefers the longer response {raw:.3f} -> {debiased:.3f}): the debiased accuracy then"
                         " measures length, not quality")
    return notes


def pair_labels(pairs: list[EncodedPair]) -> torch.Tensor | None:
    """Each pair's p_chosen (1 where it has none), or None when no pair has one."""
    if all(pair.p_chosen is None for pair in pairs):
        return None
    return torch.tensor([1.0 if pair.p_chosen is None else pair.p_chosen for pair in pairs])


def length_bias_report(pairs: list[EncodedPair], chosen: list[float], rejected: list[float],
                       length_fit: LengthFit | None) -> dict:
    """Response lengths in tokens. `agrees_with_length`: the share of pairs (with responses of different lengths)
    where the reward prefers the longer response; 0.5 is no length preference. `length_slope`: the least-squares
    slope of score on response length over these responses."""
    lengths = [(p.chosen_response_length, p.rejected_response_length) for p in pairs]

    def bias(c_scores: list[float], r_scores: list[float]) -> dict:
        votes = [(c > r) == (lc > lr) for (lc, lr), c, r in zip(lengths, c_scores, r_scores) if lc != lr and c != r]
        slope = fit_length([n for pair in lengths for n in pair],
                           [s for pair in zip(c_scores, r_scores) for s in pair]).slope if lengths else 0.0
        return {"agrees_with_length": sum(votes) / len(votes) if votes else 0.5, "length_slope": slope}

    report = {"raw": bias(chosen, rejected), "debiased": None, "length_fit": None}
    if length_fit is not None:
        c_debiased = [debias(s, lc, length_fit) for s, (lc, _) in zip(chosen, lengths)]
        r_debiased = [debias(s, lr, length_fit) for s, (_, lr) in zip(rejected, lengths)]
        report["debiased"] = bias(c_debiased, r_debiased) | {
            "accuracy": pairwise_accuracy(torch.tensor(c_debiased), torch.tensor(r_debiased), pair_labels(pairs))}
        report["length_fit"] = {"slope": length_fit.slope, "mean_length": length_fit.mean_length}
    return {"length_bias": report}


def print_report(report: dict, title: str) -> None:
    low, high = report["accuracy_interval"]
    rows = [("pairs", str(report["pairs"])), ("accuracy", f"{report['accuracy']:.3f}"),
            ("accuracy, 95% interval", f"[{low:.3f}, {high:.3f}]"),
            ("length-only accuracy", f"{report['length_only_accuracy']:.3f}"),
            ("mean reward gap", f"{report['mean_reward_gap']:.3f}"), ("calibration error (ECE)", f"{report['ece']:.3f}"),
            ("label log-likelihood (nats)", f"{report['label_log_likelihood']:.3f}"),
            ("Brier score", f"{report['brier_score']:.3f}"),
            ("corr(reward, length)", f"{report['length_reward_correlation']:.3f}")]
    bias = report["length_bias"]
    rows.append(("prefers the longer response, raw", f"{bias['raw']['agrees_with_length']:.3f}"))
    if bias["debiased"] is not None:
        rows += [("prefers the longer response, debiased", f"{bias['debiased']['agrees_with_length']:.3f}"),
                 ("accuracy, length slope removed", f"{bias['debiased']['accuracy']:.3f}"),
                 ("score/token slope, raw -> debiased",
                  f"{bias['raw']['length_slope']:.4f} -> {bias['debiased']['length_slope']:.4f}")]
    rows += [(f"accuracy, margin {k}", f"{v['accuracy']:.3f} ({v['pairs']} pairs)")
             for k, v in report["accuracy_by_margin"].items()]
    print(format_table(rows, title), flush=True)
    for note in report.get("context", []):
        print(f"note: {note}", flush=True)


# -- training -------------------------------------------------------------------------------------------------------
HELD_OUT_FILE = "heldout.jsonl"  # the split held out of --data, beside the checkpoint, for `rewardserve eval`
TRAINED_PAIRS_FILE = "trained_pairs.txt"  # a fingerprint per training pair: eval warns about pairs trained on


@dataclass
class PreparedData:
    train: list[EncodedPair]
    eval: list[EncodedPair]
    report: dict
    held_out_pairs: list[PreferencePair]  # as read, before encoding: what heldout.jsonl holds
    trained_fingerprints: list[str]


def prepare_data(config: RMTrainConfig, encoder: ItemEncoder) -> PreparedData:
    train_report, eval_report = DataReport(), DataReport()
    pairs = read_pairs(config.data, train_report, config.max_pairs, config.seed, config.margin_from_scores)
    if config.eval_data:
        train_pairs, eval_pairs = pairs, read_pairs(config.eval_data, eval_report)
    else:
        train_pairs, eval_pairs = split_train_eval(pairs, config.eval_fraction, config.seed,
                                                   group_of=prompt_key)
    train = encode_pairs(train_pairs, encoder, train_report)
    held_out = encode_pairs(eval_pairs, encoder, eval_report if config.eval_data else train_report)
    print(f"train: --data {train_report.describe()}", flush=True)
    if config.eval_data:
        print(f"train: --eval-data {eval_report.describe()}", flush=True)
    if not train:
        raise SystemExit(f"no usable pairs to train on: {train_report.describe()}")
    if not held_out:
        why = (f"--eval-data: {eval_report.describe()}" if config.eval_data else
               f"the held-out split kept whole prompts and {len({prompt_key(p) for p in pairs})} prompts at"
               f" --eval-fraction {config.eval_fraction} left it none of {len(pairs)} pairs")
        raise SystemExit(f"no held-out pairs to evaluate on ({why}): raise --eval-fraction, or give --eval-data")
    return PreparedData(train, held_out, {"train_files": train_report.summary(), "eval_files": eval_report.summary()},
                        eval_pairs, sorted({pair_fingerprint(pair) for pair in train_pairs}))


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_for_step(step: int, data: list[EncodedPair], config: RMTrainConfig) -> list[int]:
    """Which pairs train at `step`: epoch e uses its own seeded bucketing, so a resumed run sees the same order."""
    per_epoch = math.ceil(len(data) / config.batch_size)
    epoch, index = divmod(step, per_epoch)
    return length_bucketed_batches(data, config.batch_size, seed=config.seed + epoch)[index]


def train_step(model, optimizer, batches: list[PairBatch], config: RMTrainConfig, device) -> dict:
    """One optimizer step over a step's micro-batches (`collate_step`), with no host synchronisation: the loss,
    accuracy and gradient norm stay on the device as 0-d tensors (read them on logging steps), and a step whose
    loss is not finite is skipped by the fused optimizer itself (its `found_inf`, as GradScaler uses it)."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    wins = torch.zeros((), device=device)
    total = sum(batch.pairs for batch in batches)
    for batch in batches:
        chosen, rejected = pair_scores(model, batch, device)
        p_chosen = _on(batch.p_chosen, device)
        loss = bradley_terry_loss(chosen, rejected, _on(batch.margin, device), p_chosen, config.center_coef)
        # With gradient checkpointing the backward recomputes the forward: it must see the packed attention too
        with packed_attention_on(model) if batch.packed is not None else contextlib.nullcontext():
            (loss * batch.pairs / total).backward()
        loss_sum += loss.detach() * batch.pairs
        wins += pairwise_wins(chosen.detach(), rejected.detach(), p_chosen)
    loss = loss_sum / total
    skipped = ~torch.isfinite(loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped.float()  # the fused AdamW leaves weights, moments and step count untouched
        optimizer.step()
    elif not skipped.item():  # other optimizers cannot skip on the device: ask the host
        optimizer.step()
    return {"loss": loss, "accuracy": wins / total, "grad_norm": grad_norm, "skipped": skipped}


def make_optimizer(model, config: RMTrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW: one kernel for every parameter, and the only AdamW that can skip a step without the host."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)


def _on(tensor, device):
    return None if tensor is None else tensor.to(device)


def save_train_state(work: Path, model, optimizer, step: int) -> None:
    """Everything --resume needs, written to a temp file and renamed, so a crash never leaves half a state."""
    staging = work / "state.pt.partial"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state()}, staging)
    staging.replace(work / "state.pt")


def load_train_state(work: Path, model, optimizer) -> int:
    path = work / "state.pt"
    if not path.is_file():
        raise SystemExit(f"--resume: no training state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def main(config: RMTrainConfig) -> dict:
    print("rewardserve train " + json.dumps(config.printable(), indent=2), flush=True)
    torch.manual_seed(config.seed)
    out, device = Path(config.out), resolve_device(config.device)
    print(f"train: on {describe_device(device)}, float32 weights{' and bf16 autocast' if device.type == 'cuda' else ''}",
          flush=True)
    source = resolve_model_path(config.init_from or config.base)
    tokenizer = load_tokenizer(source)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        _give_distinct_pad(tokenizer)
    if config.init_from:  # a refresh: the served reward model, head included, trained further
        print(f"train: continuing from the reward model {source}", flush=True)
        model = load_sequence_classifier(source, torch.float32).to(device)
    else:
        model = init_reward_model_from_base(source).to(device)
    tokenizer.model_max_length = min(config.max_length, context_size(model))  # the server reads it back
    encoder = ItemEncoder(tokenizer, tokenizer.model_max_length, append_eos=is_decoder_reward_model(model),
                          plain_format=config.plain_chat_format)
    data = prepare_data(config, encoder)
    print(f"data: {len(data.train)} training and {len(data.eval)} held-out pairs; {json.dumps(data.report)}", flush=True)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = make_optimizer(model, config)
    total_steps = max(1, math.ceil(config.epochs * math.ceil(len(data.train) / config.batch_size)))
    warmup = round(config.warmup_ratio * total_steps)
    work = work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    start = load_train_state(work, model, optimizer) if config.resume else 0
    wandb_run = start_wandb(work, config.printable(), "train") if "wandb" in config.report_to else None
    log = JsonlLog(work / "train_log.jsonl", fresh=not config.resume, wandb_run=wandb_run, namespace="train")
    log.drop_after(start)
    model.train()
    loop_began, trained_pairs = time.perf_counter(), 0
    warm_at, warm_pairs = loop_began, 0
    progress = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="train", dynamic_ncols=True)
    logged_at, logged_pairs = time.perf_counter(), 0

    def prepare(step: int) -> list[PairBatch]:
        pairs = [data.train[i] for i in batch_for_step(step, data.train, config)]
        return collate_step(pairs, config, tokenizer.pad_token_id, model, device)

    prefetcher = ThreadPoolExecutor(1, thread_name_prefix="collate")  # step k + 1's batches while step k trains
    upcoming = prefetcher.submit(prepare, start)
    try:
        for step in progress:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, config.lr)
            batches = upcoming.result()
            if step + 1 < total_steps:
                upcoming = prefetcher.submit(prepare, step + 1)
            result = train_step(model, optimizer, batches, config, device)
            trained_pairs += sum(batch.pairs for batch in batches)
            if step == start:  # one extra sync: the first step holds the warm-up (compilation, autotuning)
                synchronize(device)
                warm_at, warm_pairs = time.perf_counter(), trained_pairs
            if (step + 1) % config.log_every == 0 or step + 1 == total_steps:  # the loop's one host synchronisation
                now = time.perf_counter()
                record = {k: (bool(v) if k == "skipped" else v.item()) for k, v in result.items()}
                record |= {"step": step + 1, "lr": optimizer.param_groups[0]["lr"],
                           "pairs": sum(batch.pairs for batch in batches),
                           "pairs_per_s": (trained_pairs - logged_pairs) / (now - logged_at)}
                log.write(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
                logged_at, logged_pairs = now, trained_pairs
            if (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                save_train_state(work, model, optimizer, step + 1)
    finally:
        prefetcher.shutdown(cancel_futures=True)
    synchronize(device)
    ended = time.perf_counter()
    loop = {"seconds": ended - loop_began, "pairs": trained_pairs, "steps": total_steps - start,
            "after_first_step": {"seconds": ended - warm_at, "pairs": trained_pairs - warm_pairs}}
    print(f"train: {loop['steps']} steps, {loop['pairs']} pairs in {loop['seconds']:.1f} s"
          f" ({loop['pairs'] / loop['seconds']:.1f} pairs/s)", flush=True)
    return finish(config, model, tokenizer, data, log, device) | {"train_loop": loop}


MIN_HELD_OUT_RESPONSES = 64  # fewer, and the held-out std is too noisy a unit to whiten with


def whitening_scores(train_scores: torch.Tensor, held_out_scores: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The scores the whitening statistics are computed over, and what they are. The held-out responses, when
    there are enough of them: the server scores responses the model never saw, and a model that has learnt its
    training pairs by heart spreads their scores wider than new ones (on the demo's 8 epochs, about twice as
    wide), so a std taken over them shrinks every whitened reward. Else the training responses."""
    if len(held_out_scores) >= MIN_HELD_OUT_RESPONSES:
        return held_out_scores, f"{len(held_out_scores)} held-out responses"
    return train_scores, f"{len(train_scores)} training responses"


def finish(config: RMTrainConfig, model, tokenizer, data: PreparedData, log: JsonlLog, device) -> dict:
    """Evaluate, compute the whitening statistics (over the held-out responses when there are enough) and the
    length fit over the training responses, save the checkpoint and report."""
    out = Path(config.out)
    chosen, rejected = score_all_pairs(model, data.eval, tokenizer.pad_token_id, config.micro_batch_size * 2, device,
                                       progress="evaluate held-out pairs", min_shared_prefix=shared_prefix(model, config))
    train_chosen, train_rejected = score_all_pairs(model, data.train, tokenizer.pad_token_id,
                                                   config.micro_batch_size * 2, device,
                                                   progress="score training pairs (whitening, length fit)",
                                                   min_shared_prefix=shared_prefix(model, config))
    whitened_over, over = whitening_scores(torch.cat([train_chosen, train_rejected]), torch.cat([chosen, rejected]))
    mean, std = reward_statistics(whitened_over)
    length_fit = fit_length([n for p in data.train for n in (p.chosen_response_length, p.rejected_response_length)],
                            [s for pair in zip(train_chosen.tolist(), train_rejected.tolist()) for s in pair])
    report = evaluation_report(data.eval, chosen, rejected, length_fit) | {"data": data.report}
    report["statistics"] = {"mean": mean, "std": std, "over": over}
    model.to("cpu")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    save_reward_model(model, tokenizer, out, RewardStatistics(mean, std, source="checkpoint"), length_fit,
                      config.plain_chat_format)
    (out / "eval_report.json").write_text(json.dumps(report, indent=2))
    write_pairs(data.held_out_pairs, out / HELD_OUT_FILE)
    (out / TRAINED_PAIRS_FILE).write_text("".join(f"{fingerprint}\n" for fingerprint in data.trained_fingerprints))
    shutil.move(log.path, out / "train_log.jsonl")
    print_report(report, f"held-out evaluation of {out}")
    # After the checkpoint, never before: a fresh machine's matplotlib first builds its font cache (up to a minute).
    print(f"train: checkpoint saved to {out}; drawing {out / 'training.png'}", flush=True)
    plot = plot_curves(JsonlLog(out / "train_log.jsonl", fresh=False).records(), ["loss", "accuracy"],
                       out / "training.png", f"reward model: {out.name}")
    log.finish({"train/plot": plot})
    if (work_dir(out) / "wandb").is_dir():  # the run, finished, joins the checkpoint it describes
        shutil.move(work_dir(out) / "wandb", out / "wandb")
    shutil.rmtree(work_dir(out), ignore_errors=True)
    return report


def _give_distinct_pad(tokenizer) -> None:
    """Padding must differ from EOS (the scoring position), or tools that pool by pad_token_id read the wrong token."""
    candidates = [t for t in ("<|endoftext|>", "<pad>", "[PAD]", tokenizer.unk_token) if t]
    for token in candidates:
        if token in tokenizer.get_vocab() and token != tokenizer.eos_token:
            tokenizer.pad_token = token
            return
    raise SystemExit("the base tokenizer has no token to pad with other than EOS; add one to the base checkpoint")


def count_trained_on(pairs: list[PreferencePair], fingerprints_file: Path) -> int:
    """How many of `pairs` the checkpoint trained on (0 when it records no training pairs: not ours, or older)."""
    if not fingerprints_file.is_file():
        return 0
    trained = set(fingerprints_file.read_text().split())
    return sum(pair_fingerprint(pair) in trained for pair in pairs)


def evaluate_checkpoint(config: EvalConfig) -> dict:
    """`rewardserve eval`: the same report for any reward checkpoint on any preference file."""
    from rewardserve.server.modeling import RewardModel

    print("rewardserve eval " + json.dumps(config.printable(), indent=2), flush=True)
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path)
    model = RewardModel.load(path, config.dtype, config.device,
                             max_length=config.max_length or trained_max_length(tokenizer))
    encoder = ItemEncoder(tokenizer, model.max_length, append_eos=model.is_decoder, embedding_rows=model.embedding_rows,
                          plain_format=getattr(model.network.config, PLAIN_FORMAT_KEY, None) or "concat")
    report_counts = DataReport()
    read = read_pairs(config.data, report_counts, config.max_pairs, config.seed)
    trained_on = count_trained_on(read, Path(path) / TRAINED_PAIRS_FILE)
    pairs = encode_pairs(read, encoder, report_counts)
    print(f"eval: --data {report_counts.describe()}", flush=True)
    if trained_on:
        print(f"eval: warning: {trained_on} of these {len(read)} pairs were in this checkpoint's training data, where"
              f" its accuracy says little; evaluate on held-out pairs ({Path(path) / HELD_OUT_FILE})", flush=True)
    chosen, rejected = score_all_pairs(model.network, pairs, model.pad_token_id, config.batch_size, model.device,
                                       progress="eval")
    report = evaluation_report(pairs, chosen, rejected, model.length_fit) | {"data": report_counts.summary(),
                                                                             "trained_on": trained_on}
    print_report(report, f"evaluation of {config.model}")
    if config.report:
        Path(config.report).write_text(json.dumps(report, indent=2))
    return report
