"""`rewardserve best-of-n`: for each problem, the response the reward server ranks highest (a process reward model
ranks by the aggregate of its step scores).

Reads {"prompt", "responses": [...]} rows (a response is a text, or its steps as a list), scores every response of
a problem in one request, and writes each problem with its responses' rewards and the pick. Where rows say which
responses are right (`correct`), it reports how often the pick is right, with a 95% interval, beside chance (the
share of right responses) and the first response.
"""
from __future__ import annotations

import json
from pathlib import Path

from .client import RewardClient, RewardClientError, RewardTarget
from .config import BestOfNConfig
from .prompts import prompt_rows
from .rm.preference import wilson_interval
from .tracking import format_table


def response_item(prompt: str, response: str | list[str]) -> dict:
    return {"prompt": prompt, "steps": response} if isinstance(response, list) else {"prompt": prompt,
                                                                                      "response": response}


def pick(rewards: list[float]) -> int:
    """The index of the highest reward (the first of equals)."""
    return max(range(len(rewards)), key=lambda i: (rewards[i], -i))


def best_of_n(client: RewardClient, rows: list[dict], target: RewardTarget) -> list[dict]:
    picked = []
    for row in rows:
        result = client.score([response_item(row["prompt"], r) for r in row["responses"]], target=target)
        best = pick(result.rewards)
        picked.append(row | {"rewards": result.rewards, "best_index": best, "best": row["responses"][best]}
                      | ({"step_scores": result.step_scores} if result.step_scores is not None else {}))
    return picked


def summary(picked: list[dict]) -> dict:
    """How often the pick is right, against chance and against always taking the first response."""
    judged = [row for row in picked if "correct" in row]
    if not judged:
        return {"problems": len(picked)}
    right = sum(row["correct"][row["best_index"]] for row in judged) / len(judged)
    return {"problems": len(judged), "picked_right": round(right, 4),
            "picked_right_interval": [round(x, 4) for x in wilson_interval(right, len(judged))],
            "chance": round(sum(sum(r["correct"]) / len(r["correct"]) for r in judged) / len(judged), 4),
            "first_response_right": round(sum(r["correct"][0] for r in judged) / len(judged), 4)}


def main(config: BestOfNConfig) -> dict:
    print("rewardserve best-of-n " + json.dumps(config.printable()), flush=True)
    rows = list(prompt_rows(config.data))
    if not rows or any(not row.get("responses") for row in rows):
        raise SystemExit(f"{config.data}: every row needs a `prompt` and a non-empty `responses` list")
    target = RewardTarget(model=config.reward_model, combination=config.reward_combination)
    api_key = config.reward_api_key.get_secret_value() if config.reward_api_key else None
    with RewardClient(config.reward_url, timeout=config.reward_timeout, api_key=api_key) as client:
        try:
            picked = best_of_n(client, rows, target)
        except RewardClientError as error:
            raise SystemExit(f"rewardserve best-of-n: {error}") from error
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in picked))
    result = summary(picked)
    if "picked_right" in result:
        low, high = result["picked_right_interval"]
        print(format_table([("picked a right response", f"{result['picked_right']:.3f} [{low:.3f}, {high:.3f}]"),
                            ("chance", f"{result['chance']:.3f}"),
                            ("the first response", f"{result['first_response_right']:.3f}")],
                           f"best of n over {result['problems']} problems"), flush=True)
    print(f"best-of-n: {len(picked)} problems ranked; written to {out}", flush=True)
    return result
