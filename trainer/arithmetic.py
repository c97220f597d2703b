"""The checkable task that ships with the project: small sums and differences with their answers, for RL against
a verifier (`rewardserve serve --verifier correct=math:lenient`), split into training and held-out prompts.

    python -m rewardserve.trainer.arithmetic   # rewrites trainer/assets/arithmetic-{train,heldout}.jsonl

The files are generated from a fixed seed, so they are the same everywhere (a test regenerates and compares them).
Each row is {"prompt", "reference"}; `--prompts builtin:arithmetic` and `builtin:arithmetic-heldout` name them.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
INSTRUCTION = "End your reply with a line of the form: Answer: <number>"
SEED, TRAIN, HELD_OUT = 0, 256, 64


def problems(count: int, seed: int) -> list[dict]:
    """`count` distinct questions a + b or a - b with a, b in 2..30, and their answers."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < count:
        a, b, op = rng.randint(2, 30), rng.randint(2, 30), rng.choice("+-")
        if (a, b, op) in seen:
            continue
        seen.add((a, b, op))
        rows.append({"prompt": f"What is {a} {op} {b}? {INSTRUCTION}", "reference": str(a + b if op == "+" else a - b)})
    return rows


def split() -> tuple[list[dict], list[dict]]:
    rows = problems(TRAIN + HELD_OUT, SEED)
    return rows[:TRAIN], rows[TRAIN:]


def write(folder: Path = ASSETS) -> None:
    for name, rows in zip(("arithmetic-train", "arithmetic-heldout"), split()):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    write()
    print(f"wrote {TRAIN} training and {HELD_OUT} held-out problems to {ASSETS}")
