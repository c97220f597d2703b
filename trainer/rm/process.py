"""Process reward model training (`rewardserve train --objective prm`), in the order of `train.py`: data -> model ->
for each step: batch -> forward -> loss at the step ends -> backward -> clip -> step -> log; then evaluate, save.

Data (files, or the shipped `builtin:arithmetic-steps` and `builtin:arithmetic-steps-heldout`): TRL's stepwise
supervision, one solution a row: {"prompt", "completions": [step, ...], "labels": [bool, ...]}
(a label per step: is this step right). The model is a token classifier with two labels (0 wrong, 1 right) on the
base's trunk, what TRL's PRMTrainer trains and the server serves with `--prm`; rows are encoded by the server's
`StepEncoder`, so training labels exactly the positions the server reads. The loss is the cross-entropy at each
step's end alone; solutions are packed end to end as pairs are (no padding computed).

Evaluation, on held-out solutions: step accuracy (a step is judged right when P(right) >= 0.5), and ProcessBench's
earliest-error F1 (Zheng et al., 2024): a solution's predicted first error is its first step judged wrong (none if
every step is judged right); the accuracy over solutions with an error (the first error found exactly) and over
solutions without one (none found), and their harmonic mean. Beside them, the baseline that always says "the last
step is the first error" and the one that says "every step is right".
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rewardserve.server.embedded import resolve_model_path
from rewardserve.server.errors import RewardServeError
from rewardserve.server.modeling import (context_size, describe_device, is_decoder_reward_model, keep_head_in_fp32,
                                         pad_right, quiet_transformers, resolve_device, save_reward_model, synchronize)
from rewardserve.server.packing import pack, packed_attention_on, plain_attention_blocker, to_device
from rewardserve.server.process_rewards import (STEP_SEPARATOR_KEY, StepEncoder, StepIds, head_module,
                                                packed_step_states, padded_step_states, step_index)
from rewardserve.server.steps import StepFormat
from rewardserve.server.tokenization import load_tokenizer

from .config import RMTrainConfig
from .data import BadRow, DataReport, split_train_eval
from .preference import wilson_interval
from .train import autocast_for, lr_at, make_optimizer, work_dir
from ..prompts import set_text
from ..tracking import JsonlLog, format_table, plot_curves

LABELS = {0: "wrong", 1: "right"}
MAX_STEPS = 10_000  # training reads every step of a row; the server's --max-steps bounds requests, not data


@dataclass(frozen=True)
class StepwiseRow:
    prompt: str
    steps: tuple[str, ...]
    labels: tuple[bool, ...]

    @property
    def first_error(self) -> int:
        """The index of the first wrong step, -1 when every step is right."""
        return next((i for i, right in enumerate(self.labels) if not right), -1)


@dataclass(frozen=True)
class EncodedSolution:
    input_ids: StepIds
    labels: tuple[bool, ...]
    first_error: int


def parse_stepwise_row(row: dict) -> StepwiseRow:
    """A TRL stepwise-supervision row, or BadRow saying what is wrong with it."""
    if not isinstance(row, dict):
        raise BadRow("not a JSON object")
    prompt, steps, labels = row.get("prompt", ""), row.get("completions"), row.get("labels")
    if not isinstance(prompt, str):
        raise BadRow("prompt not a string")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise BadRow("completions not a list of strings")
    if not isinstance(labels, list) or not all(isinstance(label, bool) for label in labels):
        raise BadRow("labels not a list of booleans")
    if len(labels) != len(steps):
        raise BadRow("a label count unlike the step count")
    return StepwiseRow(prompt, tuple(steps), tuple(labels))


def read_stepwise(paths: list[str], report: DataReport) -> list[StepwiseRow]:
    rows = []
    for path in paths:
        for line in set_text(path).splitlines():
            if not line.strip():
                continue
            report.read += 1
            try:
                rows.append(parse_stepwise_row(json.loads(line)))
            except json.JSONDecodeError:
                report.skip("not JSON")
            except BadRow as error:
                report.skip(str(error))
    return rows


def encode_solutions(rows: list[StepwiseRow], encoder: StepEncoder, report: DataReport) -> list[EncodedSolution]:
    """Each row as the server would read it; rows it would refuse (a step holding the separator, too long) are
    skipped and counted."""
    encoded = []
    for row in rows:
        try:
            encoder.step_format.check(list(row.steps))
            item = encoder.encode_steps(row.prompt, list(row.steps))
        except RewardServeError as error:
            report.skip(error.message.split(";")[0].split(",")[0])
            continue
        report.truncated += item.truncated
        report.used += 1
        encoded.append(EncodedSolution(item.input_ids, row.labels, row.first_error))
    return encoded


# -- forward and loss -------------------------------------------------------------------------------------------------
def packs(model, max_length: int) -> bool:
    return plain_attention_blocker(model.config, max_length) is None


def step_logits(model, solutions: list[EncodedSolution], device: torch.device, packed: bool) -> torch.Tensor:
    """(S, 2) fp32 head logits at every step end of the solutions, in order: one packed forward (or padded rows)."""
    sequences = [solution.input_ids for solution in solutions]
    owners, ends = (t.to(device) for t in step_index(sequences))
    decoder = is_decoder_reward_model(model)
    with autocast_for(device):
        if packed:
            with packed_attention_on(model):
                hidden = packed_step_states(model, to_device(pack(sequences), device), owners, ends, decoder)
        else:
            input_ids, attention_mask = pad_right(sequences, model.config.pad_token_id or 0)
            hidden = padded_step_states(model, input_ids.to(device), attention_mask.to(device), owners, ends, decoder)
    return head_module(model)(hidden.float()).float()


def step_labels(solutions: list[EncodedSolution], device: torch.device) -> torch.Tensor:
    return torch.tensor([int(label) for solution in solutions for label in solution.labels], device=device)


def prm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each step end's two logits against its label (1 right, 0 wrong), mean over the steps."""
    return F.cross_entropy(logits, labels)


# -- evaluation -------------------------------------------------------------------------------------------------------
def predicted_first_error(probabilities: list[float], threshold: float = 0.5) -> int:
    """The first step judged wrong (P(right) below the threshold), -1 when none is.

    >>> predicted_first_error([0.9, 0.4, 0.2]), predicted_first_error([0.9, 0.8])
    (1, -1)
    """
    return next((i for i, p in enumerate(probabilities) if p < threshold), -1)


def earliest_error_f1(predicted: list[int], truth: list[int]) -> dict:
    """ProcessBench's measure: accuracy on solutions with an error (the first one found exactly), on solutions
    without (none found), and their harmonic mean.

    >>> earliest_error_f1([1, -1, 2, -1], [1, -1, 0, 3])
    {'erroneous_accuracy': 0.5, 'correct_accuracy': 1.0, 'f1': 0.6667, 'erroneous': 3, 'correct': 1}
    """
    erroneous = [p == t for p, t in zip(predicted, truth) if t >= 0]
    correct = [p == -1 for p, t in zip(predicted, truth) if t < 0]
    a = sum(erroneous) / len(erroneous) if erroneous else 0.0
    b = sum(correct) / len(correct) if correct else 0.0
    return {"erroneous_accuracy": round(a, 4), "correct_accuracy": round(b, 4),
            "f1": round(2 * a * b / (a + b), 4) if a + b else 0.0, "erroneous": len(erroneous),
            "correct": len(correct)}


def evaluation_report(solutions: list[EncodedSolution], probabilities: list[list[float]]) -> dict:
    steps = [(p >= 0.5) == label for solution, row in zip(solutions, probabilities)
             for p, label in zip(row, solution.labels)]
    accuracy = sum(steps) / len(steps)
    truth = [solution.first_error for solution in solutions]
    right_share = sum(label for solution in solutions for label in solution.labels) / len(steps)
    return {
        "solutions": len(solutions), "steps": len(steps),
        "step_accuracy": round(accuracy, 4), "step_accuracy_interval": [round(x, 4) for x in
                                                                        wilson_interval(accuracy, len(steps))],
        "earliest_error": earliest_error_f1([predicted_first_error(row) for row in probabilities], truth),
        "baselines": {
            "always_the_last_step": earliest_error_f1([len(s.labels) - 1 for s in solutions], truth),
            "never_an_error": earliest_error_f1([-1] * len(solutions), truth),
            "majority_step_accuracy": round(max(right_share, 1 - right_share), 4),
        },
    }


@torch.inference_mode()
def score_solutions(model, solutions: list[EncodedSolution], device, packed: bool, batch_size: int,
                    progress: str) -> list[list[float]]:
    """Each solution's step probabilities P(right)."""
    model.eval()
    rows = []
    for start in tqdm(range(0, len(solutions), batch_size), desc=progress, dynamic_ncols=True):
        batch = solutions[start:start + batch_size]
        flat = iter(torch.softmax(step_logits(model, batch, device, packed), dim=-1)[:, 1].tolist())
        rows += [list(itertools.islice(flat, len(solution.labels))) for solution in batch]
    return rows


def print_report(report: dict, title: str) -> None:
    found = report["earliest_error"]
    last, never = report["baselines"]["always_the_last_step"], report["baselines"]["never_an_error"]
    low, high = report["step_accuracy_interval"]

    def against(name: str) -> str:
        return f"{found[name]:.3f}  (baselines: the last step {last[name]:.3f}, no error {never[name]:.3f})"

    rows = [("step accuracy", f"{report['step_accuracy']:.3f} [{low:.3f}, {high:.3f}]  (majority label"
                              f" {report['baselines']['majority_step_accuracy']:.3f})"),
            ("earliest-error F1", against("f1")),
            (f"  first error found ({found['erroneous']} with one)", against("erroneous_accuracy")),
            (f"  no error found ({found['correct']} without)", against("correct_accuracy"))]
    print(format_table(rows, f"{title}: {report['solutions']} solutions, {report['steps']} steps"), flush=True)


# -- the job ----------------------------------------------------------------------------------------------------------
def init_process_reward_model(base: str):
    """The base's trunk with a fresh two-label token-classification head (std 1/sqrt(H+1), as for reward heads)."""
    from transformers import AutoModelForTokenClassification

    with quiet_transformers():  # a newly initialised head is the point here
        model = AutoModelForTokenClassification.from_pretrained(base, num_labels=2, id2label=LABELS,
                                                                label2id={v: k for k, v in LABELS.items()})
    head = head_module(model)
    torch.nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    keep_head_in_fp32(model)
    return model


def train_prm(config: RMTrainConfig) -> dict:
    print("rewardserve train --objective prm " + json.dumps(config.printable(), indent=2), flush=True)
    torch.manual_seed(config.seed)
    out, device = Path(config.out), resolve_device(config.device)
    print(f"train: a process reward model on {describe_device(device)}", flush=True)
    source = resolve_model_path(config.base)
    tokenizer = load_tokenizer(source)
    model = init_process_reward_model(source).to(device)
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = min(config.max_length, context_size(model))
    step_format = StepFormat(config.step_separator, max_steps=MAX_STEPS)
    encoder = StepEncoder(tokenizer, tokenizer.model_max_length, step_format)
    print(f"data: steps read {step_format.where_read(encoder)}", flush=True)

    report = DataReport()
    rows = read_stepwise(config.data, report)
    if config.max_pairs is not None and len(rows) > config.max_pairs:
        report.not_sampled = len(rows) - config.max_pairs
        rows = random.Random(f"--max-pairs {config.seed}").sample(rows, config.max_pairs)
    if config.eval_data:
        train_rows, eval_rows = rows, read_stepwise(config.eval_data, DataReport())
    else:  # solutions of one prompt stay on one side
        train_rows, eval_rows = split_train_eval(rows, config.eval_fraction, config.seed, lambda row: row.prompt)
    train = encode_solutions(train_rows, encoder, report)
    held_out = encode_solutions(eval_rows, encoder, DataReport())
    print(f"data: {report.describe()}; {len(train)} training and {len(held_out)} held-out solutions", flush=True)
    if not train or not held_out:
        raise SystemExit("train --objective prm: no training or no held-out solutions left; see the data line")

    packed = packs(model, tokenizer.model_max_length)
    optimizer = make_optimizer(model, config)
    per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * per_epoch))
    warmup = round(config.warmup_ratio * total_steps)
    work = work_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    log = JsonlLog(work / "train_log.jsonl", fresh=True, namespace="train")
    model.train()
    began = time.perf_counter()
    progress = tqdm(range(total_steps), desc="train prm", dynamic_ncols=True)
    for step in progress:
        epoch, index = divmod(step, per_epoch)
        if index == 0:  # each epoch its own seeded order, drawn once
            order = list(range(len(train)))
            random.Random(config.seed + epoch).shuffle(order)
        batch = [train[i] for i in order[index * config.batch_size:(index + 1) * config.batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, warmup, config.lr)
        optimizer.zero_grad(set_to_none=True)
        logits = step_logits(model, batch, device, packed)
        labels = step_labels(batch, device)
        loss = prm_loss(logits, labels)
        with packed_attention_on(model) if packed else contextlib.nullcontext():  # a recomputing backward packs too
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:  # the loop's one host synchronisation
            record = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item(),
                      "step_accuracy": ((logits.argmax(-1) == labels).float().mean()).item(),
                      "lr": optimizer.param_groups[0]["lr"]}
            log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['step_accuracy']:.2f}")
    synchronize(device)
    seconds = time.perf_counter() - began
    print(f"train: {total_steps} steps, {len(train) * config.epochs:.0f} solutions in {seconds:.1f} s", flush=True)

    probabilities = score_solutions(model, held_out, device, packed, 2 * config.batch_size, "evaluate held-out")
    result = evaluation_report(held_out, probabilities) | {"data": report.summary(),
                                                           "train_loop": {"seconds": seconds, "steps": total_steps}}
    model.to("cpu")
    setattr(model.config, STEP_SEPARATOR_KEY, config.step_separator)
    save_reward_model(model, tokenizer, out, statistics=None)
    (out / "eval_report.json").write_text(json.dumps(result, indent=2))
    shutil.move(log.path, out / "train_log.jsonl")
    print_report(result, f"held-out evaluation of {out}")
    plot_curves(JsonlLog(out / "train_log.jsonl", fresh=False).records(), ["loss", "step_accuracy"],
                out / "training.png", f"process reward model: {out.name}")
    log.finish({})
    shutil.rmtree(work, ignore_errors=True)
    print(f"train: checkpoint saved to {out}; serve it with `rewardserve serve --prm {out}`", flush=True)
    return result
