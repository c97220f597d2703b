"""`rewardserve bench train`: our reward-model training against TRL's RewardTrainer on the same split and recipe
(one epoch, 16 pairs a step, learning rate 1e-5, max length 1024), side by side in one run.

Pairs/s are measured the same way for both: the pairs of one epoch over the wall time of the training loop, data
loading included, model loading, tokenizing the data set and evaluation excluded (ours: the loop `rewardserve train`
times; TRL: its `train_runtime`). Random-weight shapes measure speed only; real checkpoints (--model) accuracy too.
The data is PandaLM from --data-dir when it is there, else a synthetic set of the same size (stated in the output).
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch

from ..config import EvalConfig, RMTrainConfig
from ..rm_train import evaluate_checkpoint, main as train_ours
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
        ours = {"pairs_per_s": loop["pairs"] / loop["seconds"], "seconds": loop["seconds"], "steps": loop["steps"],
                "accuracy": None if models.random_weights else report["accuracy"],
                "length_only_accuracy": report["length_only_accuracy"]}
        trl = {"skipped": "--no-peer"}
        if peer:
            progress(f"train {models.name}: TRL RewardTrainer on {len(train_rows)} pairs")
            trl = _run_trl(models, train_rows, eval_file, folder / "trl", max_length)
        speedup = ours["pairs_per_s"] / trl["pairs_per_s"] if trl.get("pairs_per_s") else None
        return {"model": models.name, "data": source, "train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
                "ours": ours, "trl": trl, "speedup": speedup}


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
    trainer = RewardTrainer(model=str(models.policy), args=args, train_dataset=Dataset.from_list(records),
                            processing_class=tokenizer)
    result = trainer.train()
    seconds = result.metrics["train_runtime"]
    accuracy = None
    if not models.random_weights:
        trainer.save_model(str(out))
        accuracy = evaluate_checkpoint(EvalConfig(model=str(out), data=[str(eval_file)], max_length=max_length,
                                                  batch_size=32))["accuracy"]
    return {"pairs_per_s": len(records) / seconds, "seconds": seconds, "accuracy": accuracy}
