"""`rewardserve bench train`: our reward-model training against TRL's RewardTrainer on the same split and recipe
(one epoch, 16 pairs a step, learning rate 1e-5, max length 1024), side by side in one run.

Pairs/s are measured the same way for both: the pairs of one epoch over the wall time of the training loop, data
loading included, model loading, tokenizing the data set and evaluation excluded (ours: the loop `rewardserve train`
times; TRL: its `train_runtime`); and again after the first step, which holds each one's warm-up (on a GPU our
first step compiles the packed attention, about 14 s for 135M on an H200: a one-off that a short epoch overweights). Random-weight shapes measure speed only; real checkpoints (--model) accuracy too.
The data is PandaLM from --data-dir when it is there, else a synthetic set of the same size (stated in the output).
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..rm.config import EvalConfig, RMTrainConfig
from ..rm.train import evaluate_checkpoint, main as train_ours
from .models import BenchModels

RECIPE = dict(epochs=1, batch_size=16, lr=1e-5)


def run(models: BenchModels, data_dir: Path, max_pairs: int | None, max_length: int, peer: bool, progress) -> dict:
    with tempfile.TemporaryDirectory(prefix="rewardserve-bench-train-") as tmp:
        folder = Path(tmp)
        rows, source = _pairs(data_dir, max_pairs)
        train_rows, eval_rows = _split(rows)
        train_file, eval_file = folder / "train.jsonl", folder / "eval.jsonl"
        train_file.write_text("\n".join(train_rows) + "\n")
        eval_file.write_text("\n".join(eval_rows) + "\n")
        progress(f"train {models.name}: ours on {len(train_rows)} pairs")
        report = train_ours(RMTrainConfig(base=str(models.policy), data=[str(train_file)], eval_data=[str(eval_file)],
                                          out=str(folder / "ours"), max_length=max_length, margin=False,
                                          **RECIPE))
        loop = report["train_loop"]
        steady = loop["after_first_step"]
        ours = {"pairs_per_s": loop["pairs"] / loop["seconds"], "seconds": loop["seconds"], "steps": loop["steps"],
                "pairs_per_s_after_first_step": _rate(steady["pairs"], steady["seconds"]),
                "first_step_s": loop["seconds"] - steady["seconds"],
                "accuracy": None if models.random_weights else report["accuracy"],
                "length_only_accuracy": report["length_only_accuracy"]}
        trl = {"skipped": "--no-peer"}
        if peer:
            progress(f"train {models.name}: TRL RewardTrainer on {len(train_rows)} pairs")
            trl = _run_trl(models, train_rows, eval_file, folder / "trl", max_length)
        return {"model": models.name, "data": source, "train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
                "ours": ours, "trl": trl, "speedup": _ratio(ours, trl, "pairs_per_s"),
                "speedup_after_first_step": _ratio(ours, trl, "pairs_per_s_after_first_step"),
                "shared_prompts": _shared_prompts(models, data_dir, max_pairs, max_length, folder, progress)}


def _shared_prompts(models: BenchModels, data_dir: Path, max_pairs: int | None, max_length: int, folder: Path,
                    progress) -> dict:
    """Ours on hh-rlhf's pairs (a chosen and a rejected answer to one multi-turn conversation, often longer than
    either answer), with the conversation computed once per pair (--min-shared-prefix 32) and without (0), one
    after the other on the same pairs. Pairs/s after the first step, which holds the warm-up."""
    path = data_dir / "hh-rlhf-harmless" / "pairs.jsonl"
    if not path.is_file():
        return {"skipped": f"{path} absent"}
    rows = [line for line in path.read_text().splitlines() if line.strip()][:max_pairs]
    data = folder / "hh-rlhf.jsonl"
    data.write_text("\n".join(rows) + "\n")
    rates = {}
    for name, min_shared_prefix in (("shared", 32), ("unshared", 0)):
        progress(f"train {models.name}: ours on {len(rows)} hh-rlhf pairs, prompts {name}")
        report = train_ours(RMTrainConfig(base=str(models.policy), data=[str(data)], out=str(folder / f"hh-{name}"),
                                          max_length=max_length, margin=False, eval_fraction=0.05,
                                          min_shared_prefix=min_shared_prefix, **RECIPE))
        steady = report["train_loop"]["after_first_step"]
        rates[name] = _rate(steady["pairs"], steady["seconds"])
    speedup = rates["shared"] / rates["unshared"] if rates["shared"] and rates["unshared"] else None
    return {"data": f"hh-rlhf harmless ({path})", "pairs": len(rows), "pairs_per_s_shared": rates["shared"],
            "pairs_per_s_unshared": rates["unshared"], "speedup": speedup}


def _rate(pairs: int, seconds: float) -> float | None:
    return pairs / seconds if pairs and seconds > 0 else None


def _ratio(ours: dict, trl: dict, key: str) -> float | None:
    return ours[key] / trl[key] if ours.get(key) and trl.get(key) else None


def _pairs(data_dir: Path, max_pairs: int | None) -> tuple[list[str], str]:
    path = data_dir / "pandalm" / "pairs.jsonl"
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        return rows[:max_pairs], f"PandaLM ({path})"
    count = max_pairs or 914  # PandaLM's size, so speed figures stay comparable
    rng = random.Random(0)
    words = "the a reward model policy answer question helpful safe token server batch gradient loss".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [json.dumps({"prompt": text(rng.randint(20, 120)), "chosen": text(rng.randint(20, 200)),
                        "rejected": text(rng.randint(20, 200))}) for _ in range(count)]
    return rows, f"synthetic ({data_dir / 'pandalm'} absent)"


def _split(rows: list[str]) -> tuple[list[str], list[str]]:
    """The fixed split: indices shuffled with random.Random(0), the first 90% train."""
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    cut = int(0.9 * len(rows))
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def _run_trl(models: BenchModels, train_rows: list[str], eval_file: Path, out: Path, max_length: int) -> dict:
    try:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer
    except ImportError as error:
        return {"skipped": f"TRL is not installed ({error.name}); pip install 'rewardserve[integrations]'"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.policy))
    if tokenizer.eos_token is None:
        return {"skipped": "TRL's RewardTrainer appends an EOS token, and this tokenizer has none"}
    templated = bool(getattr(tokenizer, "chat_template", None))
    records = []
    for row in map(json.loads, train_rows):
        if templated:  # the conversational form, so TRL applies the same chat template we score with
            records.append({"prompt": [{"role": "user", "content": row["prompt"]}],
                            "chosen": [{"role": "assistant", "content": row["chosen"]}],
                            "rejected": [{"role": "assistant", "content": row["rejected"]}]})
        else:
            records.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    cuda = torch.cuda.is_available()
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=RECIPE["batch_size"],
                        learning_rate=RECIPE["lr"], num_train_epochs=RECIPE["epochs"], max_length=max_length,
                        bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no", logging_steps=10,
                        disable_tqdm=True)
    clock = AfterFirstStep(len(records), RECIPE["batch_size"])
    trainer = RewardTrainer(model=str(models.policy), args=args, train_dataset=Dataset.from_list(records),
                            processing_class=tokenizer, callbacks=[clock])
    result = trainer.train()
    seconds = result.metrics["train_runtime"]
    accuracy = None
    if not models.random_weights:
        trainer.save_model(str(out))
        accuracy = evaluate_checkpoint(EvalConfig(model=str(out), data=[str(eval_file)], max_length=max_length,
                                                  batch_size=32))["accuracy"]
    return {"pairs_per_s": len(records) / seconds, "seconds": seconds, "accuracy": accuracy,
            "pairs_per_s_after_first_step": clock.pairs_per_s()}


class AfterFirstStep(TrainerCallback):
    """Times TRL's loop from the end of its first optimizer step to the end of training, as ours is timed."""

    def __init__(self, pairs: int, batch_size: int):
        self.pairs, self.batch_size, self.began, self.ended = pairs, batch_size, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            _synchronize()
            self.began = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        _synchronize()
        self.ended = time.perf_counter()

    def pairs_per_s(self) -> float | None:
        if self.began is None or self.ended is None:
            return None
        return _rate(max(0, self.pairs - self.batch_size), self.ended - self.began)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
