"""The checkable tasks that ship with the project, generated from fixed seeds (a test regenerates and compares them):

- small sums and differences with their answers, for RL against a verifier (`rewardserve serve --verifier
  correct=math:lenient`): rows {"prompt", "reference"}, named `--prompts builtin:arithmetic` (and
  `builtin:arithmetic-heldout`);
- arithmetic chains worked step by step, half of them with a planted first error at a known step, for process
  reward models (`rewardserve train --objective prm`): TRL's stepwise-supervision rows {"prompt", "completions",
  "labels"}, plus `first_error` (the step index, or null) and `error` (how it was planted); and problems with four
  worked answers, one right, for `rewardserve best-of-n`.

The planted errors are transcription errors: a step starts from a number other than the one before it, or the
answer line reports another number than the last result. Every step's own arithmetic is right. Slips in the
arithmetic itself (`7 + 8 = 16`) were tried first: all-MiniLM-L6-v2 trained on them 6 epochs kept to the majority
label (held-out step accuracy 0.698 against 0.693), and neither SmolLM2-135M nor a small encoder trained from
scratch did better in the minutes a CPU gives a test; a checker of sums is what a verifier is for.

    python -m rewardserve.trainer.arithmetic   # rewrites trainer/assets/arithmetic-*.jsonl
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


CHAIN_SEED, CHAIN_TRAIN, CHAIN_HELD_OUT = 1, 2000, 300


def wrong(value: int, shift: int) -> int:
    """A number near `value` and not it, never negative (the chains stay in whole numbers)."""
    return value + shift if value + shift >= 0 else value + abs(shift)


def chain_problem(rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
    """A chain's start and its operations: 2 to 4 of them, operands 1..9, every true value within 0..18 (the facts
    a small model can learn)."""
    start, operations, value = rng.randint(2, 9), [], None
    value = start
    for _ in range(rng.randint(2, 4)):
        operand = rng.randint(1, 9)
        op = "-" if operand <= value and (value + operand > 18 or rng.random() < 0.5) else "+"
        operations.append((op, operand))
        value = value + operand if op == "+" else value - operand
    return start, operations


def worked(start: int, operations: list[tuple[str, int]], error_at: int | None, shift: int) -> dict:
    """The chain worked a step a line, then "The answer is N.", with a first error at `error_at` (None: none): the
    step starts from the number before it (the problem's start, or the last result) off by `shift`, or the answer
    line reports the last result off by `shift`. Every step from the first error on is labelled wrong, as stepwise
    data labels them: what follows is built on it."""
    steps, carried = [], start
    for index, (op, operand) in enumerate(operations):
        left = wrong(carried, shift) if index == error_at else carried
        carried = left + operand if op == "+" else left - operand
        steps.append(f"{left} {op} {operand} = {carried}")
    steps.append(f"The answer is {wrong(carried, shift) if error_at == len(operations) else carried}.")
    terms = " ".join(f"{op} {operand}" for op, operand in operations)
    return {"prompt": f"Compute {start} {terms} step by step, one operation a line.\n", "completions": steps,
            "labels": [error_at is None or index < error_at for index in range(len(steps))],
            "first_error": error_at, "error": None if error_at is None else
            "answer" if error_at == len(operations) else "carry"}


def planted_error(rng: random.Random, steps: int) -> tuple[int, int]:
    """Where the first error goes (uniform over the steps, the answer line included) and how far off it is."""
    return rng.randrange(steps), rng.choice([-2, -1, 1, 2])


def chain(rng: random.Random, with_error: bool) -> dict:
    """One chain, with a planted first error or none."""
    start, operations = chain_problem(rng)
    if not with_error:
        return worked(start, operations, None, 1)
    return worked(start, operations, *planted_error(rng, len(operations) + 1))


def chains(count: int, seed: int) -> list[dict]:
    """`count` distinct chains, every other one with a planted error."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < count:
        row = chain(rng, with_error=len(rows) % 2 == 1)
        key = (row["prompt"], tuple(row["completions"]))
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def split() -> tuple[list[dict], list[dict]]:
    rows = problems(TRAIN + HELD_OUT, SEED)
    return rows[:TRAIN], rows[TRAIN:]


def chain_split() -> tuple[list[dict], list[dict]]:
    """Training and held-out chains; no held-out problem (its prompt) is among the training ones."""
    rows = chains(CHAIN_TRAIN + 2 * CHAIN_HELD_OUT, CHAIN_SEED)
    train = rows[:CHAIN_TRAIN]
    trained = {row["prompt"] for row in train}
    held_out = [row for row in rows[CHAIN_TRAIN:] if row["prompt"] not in trained][:CHAIN_HELD_OUT]
    return train, held_out


BEST_OF_SEED, BEST_OF_PROMPTS, BEST_OF_N = 2, 200, 4


def best_of_n_rows(count: int = BEST_OF_PROMPTS, n: int = BEST_OF_N, seed: int = BEST_OF_SEED,
                   trained: list[dict] | None = None) -> list[dict]:
    """Problems none of the training chains poses, each with n worked answers in a random order: one right, the
    others each with a planted first error ({"prompt", "responses": [steps, ...], "correct": [bool, ...]}), for
    `rewardserve best-of-n` (chance picks the right one 1 time in n)."""
    rng, rows = random.Random(seed), []
    taken = {row["prompt"] for row in trained or chain_split()[0]}  # the training problems, then each one used
    while len(rows) < count:
        start, operations = chain_problem(rng)
        answers = [worked(start, operations, None, 1)]
        while len(answers) < n:  # n different answers
            answer = worked(start, operations, *planted_error(rng, len(operations) + 1))
            if all(answer["completions"] != other["completions"] for other in answers):
                answers.append(answer)
        if answers[0]["prompt"] in taken:
            continue
        taken.add(answers[0]["prompt"])
        rng.shuffle(answers)
        rows.append({"prompt": answers[0]["prompt"], "responses": [a["completions"] for a in answers],
                     "correct": [a["first_error"] is None for a in answers]})
    return rows


def files() -> dict[str, list[dict]]:
    """Every shipped file's rows, by its name."""
    (train, held_out), (chains_train, chains_held_out) = split(), chain_split()
    return {"arithmetic-train": train, "arithmetic-heldout": held_out, "arithmetic-steps-train": chains_train,
            "arithmetic-steps-heldout": chains_held_out,
            f"arithmetic-steps-best-of-{BEST_OF_N}": best_of_n_rows(trained=chains_train)}


def write(folder: Path = ASSETS) -> None:
    for name, rows in files().items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    write()
    print(f"wrote {TRAIN} training and {HELD_OUT} held-out problems, {CHAIN_TRAIN} training and {CHAIN_HELD_OUT}"
          f" held-out step-by-step chains, {BEST_OF_PROMPTS} problems of {BEST_OF_N} answers each to {ASSETS}")
