"""`rewardserve compare`: is policy B better than policy A? Its win rate on a prompt set.

Both policies answer every prompt (greedy, or k samples each); a reward server scores both answers (any model or
combination it serves); an AI judge may give a second opinion in both orders, and a relevance judge (a sentence
encoder: which answer is closer to the prompt) a third. A comparison B wins counts 1, a
tie 1/2, a loss 0; the win rate is their mean, with a 95% bootstrap interval that resamples prompts (a prompt's k
samples move together, since they share the prompt). A request the server cannot answer is retried by the
client; one it never answers stops the comparison rather than count as anyone's loss.

Writes OUT/comparisons.jsonl (every prompt, both responses and their scores) and OUT/summary.json.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rewardserve.server.modeling import resolve_device

from .client import RewardClient, RewardClientError, RewardTarget
from .config import CompareConfig
from .prompts import end_of_turn_ids, generate_responses, load_prompts, load_references, prompt_text
from .rl.ppo import check_reward_server, policy_folder, scoring_items
from .rm.labeling import judge_both_orders, load_constitution
from .tracking import format_table


SCORERS = {"reward": "reward model", "judge": "AI judge, both orders", "relevance": "relevance judge"}
PLOT_LABELS = {"reward": "reward\nmodel", "judge": "AI judge,\nboth orders", "relevance": "relevance\njudge"}


@dataclass(frozen=True)
class WinRate:
    rate: float  # B's wins + ties / 2, over all comparisons
    low: float  # 95% bootstrap interval
    high: float
    wins: int
    ties: int
    losses: int


def outcome(b_score: float, a_score: float) -> float:
    """1 when B scores higher, 1/2 on a tie, 0 when A does."""
    return 1.0 if b_score > a_score else 0.5 if b_score == a_score else 0.0


def win_rate(outcomes: list[float], prompt_of: list[int], resamples: int = 2000, seed: int = 0) -> WinRate:
    """The mean outcome and its percentile bootstrap interval, resampling prompts with all their comparisons."""
    by_prompt: dict[int, list[float]] = {}
    for value, prompt in zip(outcomes, prompt_of):
        by_prompt.setdefault(prompt, []).append(value)
    groups = [(sum(values), len(values)) for values in by_prompt.values()]
    rng = random.Random(seed)
    rates = []
    for _ in range(resamples):
        drawn = [groups[rng.randrange(len(groups))] for _ in groups]
        rates.append(sum(total for total, _ in drawn) / sum(count for _, count in drawn))
    rates.sort()
    low, high = rates[int(0.025 * resamples)], rates[min(resamples - 1, int(0.975 * resamples))]
    return WinRate(sum(outcomes) / len(outcomes), low, high, sum(o == 1.0 for o in outcomes),
                   sum(o == 0.5 for o in outcomes), sum(o == 0.0 for o in outcomes))


def answer(path: str, prompts: list, config: CompareConfig, device, seed: int) -> tuple[list[str], list[int]]:
    """Each prompt's `samples` responses (greedy: one), prompt-major, cut at the policy's end-of-turn tokens; and
    their lengths in tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    torch.manual_seed(seed)
    repeated = [prompt for prompt in prompts for _ in range(config.samples)]
    return generate_responses(model, tokenizer, repeated, config.max_new_tokens,
                              None if config.greedy else config.temperature, config.batch_size, device,
                              end_of_turn_ids(model, tokenizer))


def reward_scores(client: RewardClient, target: RewardTarget, prompts: list, responses: list[str],
                  answers: dict[str, str] | None = None, chunk: int = 64) -> tuple[list[float], list[bool] | None]:
    """The server's reward of each response; and where a verifier checked them (the target itself, or a model of
    its combination), whether each answer is correct."""
    rewards, correct = [], []
    for start in range(0, len(responses), chunk):
        items = scoring_items(prompts[start:start + chunk], responses[start:start + chunk], answers)
        result = client.score(items, target=target)
        rewards += result.rewards
        checks = result.checks or next((part["checks"] for part in (result.components or {}).values()
                                        if part.get("checks")), None)
        correct = None if checks is None or correct is None else correct + [c["verdict"] == "correct" for c in checks]
    return rewards, correct


def judge_outcomes(path: str, config: CompareConfig, prompts: list, a: list[str], b: list[str],
                   device) -> list[float]:
    """The judge's verdict on each comparison, asked in both orders: P(B is better) > 1/2 is a win for B."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    verdicts = judge_both_orders(judge, AutoTokenizer.from_pretrained(path), [prompt_text(p) for p in prompts], b, a,
                                 load_constitution(config.constitution), config.batch_size, device)
    return [outcome(v.p_first, 0.5) for v in verdicts]


def relevance_scores(spec: str, config: CompareConfig, prompts: list, a: list[str], b: list[str],
                     device) -> tuple[list[float], list[float]]:
    """Each side's cosine with its prompt under a sentence encoder: B wins where it is closer."""
    from .rm.relevance import RelevanceJudge

    judge, questions = RelevanceJudge(spec, device, config.batch_size), [prompt_text(p) for p in prompts]
    return judge.scores(questions, a).tolist(), judge.scores(questions, b).tolist()


def main(config: CompareConfig) -> dict:
    print("rewardserve compare " + json.dumps(config.printable(), indent=2), flush=True)
    device = resolve_device(config.device)
    policy_a, policy_b = policy_folder(config.policy_a, "--policy-a"), policy_folder(config.policy_b, "--policy-b")
    judge = policy_folder(config.judge, "--judge") if config.judge else None
    relevance_judge = policy_folder(config.relevance_judge, "--relevance-judge") if config.relevance_judge else None
    prompts = load_prompts(config.prompts)[: config.max_prompts]
    client = RewardClient(config.reward_url, timeout=config.reward_timeout,
                          api_key=config.reward_api_key.get_secret_value() if config.reward_api_key else None,
                          ca_file=config.reward_ca_file)
    target = RewardTarget.from_names(config.reward_model, config.reward_combination)
    answers = load_references(config.prompts)
    check_reward_server(client, target, prompts[0], answers)  # a refusal is one line now, not after both answered
    asked = [prompt for prompt in prompts for _ in range(config.samples)]
    prompt_of = [i for i in range(len(prompts)) for _ in range(config.samples)]
    a, a_lengths = answer(policy_a, prompts, config, device, config.seed)
    b, b_lengths = answer(policy_b, prompts, config, device, config.seed + config.independent_samples)
    try:
        (a_rewards, a_correct), (b_rewards, b_correct) = (reward_scores(client, target, asked, side, answers)
                                                          for side in (a, b))
    except RewardClientError as error:  # never a loss for either side: the comparison stops
        raise SystemExit(f"rewardserve compare: the reward server did not score every response ({error});"
                         " nothing was counted") from None
    finally:
        client.close()
    by_reward = [outcome(rb, ra) for ra, rb in zip(a_rewards, b_rewards)]
    summary = {"a": config.policy_a, "b": config.policy_b, "prompts": len(prompts), "comparisons": len(asked),
               "samples_per_prompt": config.samples, "greedy": config.greedy,
               "reward": asdict(win_rate(by_reward, prompt_of, seed=config.seed)),
               "mean_reward": {"a": sum(a_rewards) / len(a), "b": sum(b_rewards) / len(b)},
               "mean_length_tokens": {"a": sum(a_lengths) / len(a), "b": sum(b_lengths) / len(b)},
               "identical_answers": sum(x == y for x, y in zip(a, b))}
    if a_correct is not None and b_correct is not None:  # a verifier's share of right answers, each side's
        summary["verifier_accuracy"] = {side: asdict(win_rate([float(c) for c in correct], prompt_of, seed=config.seed))
                                        for side, correct in (("a", a_correct), ("b", b_correct))}
    by_judge = judge_outcomes(judge, config, asked, a, b, device) if judge else None
    if by_judge is not None:
        summary["judge"] = asdict(win_rate(by_judge, prompt_of, seed=config.seed))
    relevance = None
    if relevance_judge:
        relevance = relevance_scores(relevance_judge, config, asked, a, b, device)
        by_relevance = [outcome(rb, ra) for ra, rb in zip(*relevance)]
        summary["relevance"] = asdict(win_rate(by_relevance, prompt_of, seed=config.seed))
        summary["mean_relevance"] = {"a": sum(relevance[0]) / len(a), "b": sum(relevance[1]) / len(b)}
    write_comparisons(Path(config.out), asked, prompt_of, a, b, a_rewards, b_rewards, by_judge, a_lengths, b_lengths,
                      relevance)
    (Path(config.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_win_rates(summary, Path(config.out) / "win_rates.png")
    print_summary(summary)
    return summary


def plot_win_rates(summary: dict, out_png: Path) -> Path | None:
    """B's win rate under each scorer with its 95% interval, beside the mean lengths; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [name for name in SCORERS if name in summary]
    figure, (rates, lengths) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    values = [summary[name]["rate"] for name in names]
    errors = [[summary[n]["rate"] - summary[n]["low"] for n in names],
              [summary[n]["high"] - summary[n]["rate"] for n in names]]
    rates.bar([PLOT_LABELS[n] for n in names], values, yerr=errors, capsize=6,
              color=["tab:blue", "tab:orange", "tab:purple"][:len(names)])
    rates.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    rates.set_ylim(0, 1)
    rates.set_title(f"B's win rate over A ({summary['comparisons']} comparisons)")
    lengths.bar(["A", "B"], [summary["mean_length_tokens"]["a"], summary["mean_length_tokens"]["b"]],
                color=["gray", "tab:green"])
    lengths.set_title("mean response length (tokens)")
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return out_png


def write_comparisons(out: Path, prompts, prompt_of, a, b, a_rewards, b_rewards, by_judge, a_lengths,
                      b_lengths, relevance=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "comparisons.jsonl", "w") as handle:
        for i, prompt in enumerate(prompts):
            row = {"prompt": prompt, "prompt_index": prompt_of[i], "a": a[i], "b": b[i], "a_reward": a_rewards[i],
                   "b_reward": b_rewards[i], "outcome": outcome(b_rewards[i], a_rewards[i]),
                   "a_tokens": a_lengths[i], "b_tokens": b_lengths[i]}
            if by_judge is not None:
                row["judge_outcome"] = by_judge[i]
            if relevance is not None:
                row["a_relevance"], row["b_relevance"] = relevance[0][i], relevance[1][i]
            handle.write(json.dumps(row) + "\n")


def print_summary(summary: dict) -> None:
    rows = []
    for name in SCORERS:
        if name in summary:
            w = summary[name]
            rows.append((f"B's win rate, {name}", f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]"
                                                  f" ({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)"))
    for side in ("a", "b"):
        if "verifier_accuracy" in summary:
            w = summary["verifier_accuracy"][side]
            rows.append((f"right answers (verifier), {side.upper()}", f"{w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]"))
    rows.append(("identical answers (each a tie)", f"{summary['identical_answers']} of {summary['comparisons']}"))
    rows.append(("mean reward, A -> B", f"{summary['mean_reward']['a']:.3f} -> {summary['mean_reward']['b']:.3f}"))
    if "mean_relevance" in summary:
        rows.append(("mean relevance (cosine), A -> B",
                     f"{summary['mean_relevance']['a']:.3f} -> {summary['mean_relevance']['b']:.3f}"))
    rows.append(("mean length (tokens), A -> B",
                 f"{summary['mean_length_tokens']['a']:.1f} -> {summary['mean_length_tokens']['b']:.1f}"))
    print(format_table(rows, f"{summary['b']} (B) against {summary['a']} (A), {summary['comparisons']} comparisons"
                             f" on {summary['prompts']} prompts"), flush=True)
    if summary["identical_answers"]:
        print(f"note: {summary['identical_answers']} comparisons are of identical answers (the policies sampled the"
              " same text with the same random numbers), counted as ties: they say nothing of which policy is better;"
              " --independent-samples samples B with its own seed", flush=True)
