"""AI preference labelling (RLAIF): sample candidate responses, let a judge model compare them, and write
soft-labelled preference rows that `rewardserve train` reads. Two judges:

- pairwise (the default): a causal LM compares two responses under a written constitution, as below;
- relevance: a sentence encoder scores each response alone by how directly it answers its question
  (`relevance.py`), and a pair's label is the score gap; no order, so no position bias;
- rating: a causal LM rates each response alone from 1 to 10 under the constitution, and a pair's label is the gap
  of the expected ratings (the server's `--judge`, server/judge.py; pointwise, so no position bias either).

The pairwise judge is asked which of two responses better follows the principles and must answer with one letter; its
verdict is read from the next-token probabilities of "A" and "B". Each pair is asked in both orders and the two
probabilities averaged in logit space, which cancels the judge's preference for a position. The share of pairs
whose two orders pick the same winner is the consistency rate. A small judge's position bias is nearly a constant
(the 135M SmolLM2 adds about 2 logits to whatever is shown as A), so a low raw rate says little about its
preference; the debiased consistency rate asks the same question after taking the mean bias of the pairs asked
together off each order. A pair whose orders still disagree after that is one the judge contradicted itself on: its label is shrunk
towards 0.5 (or the row dropped).

Each run reports what the labels can carry, in logits of "the first is better": the judge's mean position bias
(towards the letter A; the two orders differ by twice it), its mean content signal (the size of the order-free
part), and the share of its next-token probability that lands on the two answer letters at all.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from rewardserve.server.embedded import resolve_model_path
from rewardserve.server.modeling import resolve_device

from ..prompts import encode_prompt, generate_responses, load_prompts, pad_left, prompt_text
from .config import LabelConfig

JUDGE_TEMPLATE = """{constitution}

Question: {question}

Response A: {a}

Response B: {b}

Which response follows the principles better? Answer with one letter, A or B."""


@dataclass(frozen=True)
class Verdict:
    p_first: float  # probability, averaged over both orders, that the first response is better
    consistent: bool  # both orders picked the same winner
    consistent_debiased: bool = True  # ... once the mean position bias of the pairs asked together is taken off
    position_bias: float = 0.0  # logit added to "the response shown as A is better", whatever it says
    content_signal: float = 0.0  # the order-free logit that the first is better
    answer_mass: float | None = 1.0  # next-token probability on "A" or "B" at all, averaged over both orders


def load_constitution(spec: str) -> str:
    if spec == "builtin":
        return (resources.files("rewardserve.server") / "assets" / "constitution.txt").read_text().strip()
    return Path(spec).read_text().strip()


def verdict_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the bare letters A and B, as the judge's answer begins."""
    a, b = tokenizer.encode("A", add_special_tokens=False), tokenizer.encode("B", add_special_tokens=False)
    if len(a) != 1 or len(b) != 1:
        raise SystemExit("the judge's tokenizer splits 'A' or 'B' into several tokens; pick another judge")
    return a[0], b[0]


@torch.no_grad()
def p_first_wins(judge, tokenizer, questions: list[str], firsts: list[str], seconds: list[str], constitution: str,
                 batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """P(judge answers "A") with the first response shown as A, from the next-token logits of A and B, and the
    probability the judge puts on "A" or "B" at all (over its whole vocabulary): two (N,) tensors."""
    prompts = [JUDGE_TEMPLATE.format(constitution=constitution, question=q, a=a, b=b)
               for q, a, b in zip(questions, firsts, seconds)]
    letters, mass = answer_logits(judge, [encode_prompt(tokenizer, p, 2048) for p in prompts],
                                  list(verdict_token_ids(tokenizer)), tokenizer.pad_token_id, batch_size, device)
    return letters.softmax(-1)[:, 0], mass


def cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.2x; older releases know only the first."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many tokens every sequence begins with, leaving each at least one token of its own."""
    longest = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for position in range(longest):
        if any(s[position] != first[position] for s in sequences):
            return position
    return max(0, longest)


@torch.no_grad()
def answer_logits(model, sequences: list[list[int]], token_ids: list[int], pad_token_id: int, batch_size: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token logits of `token_ids` after each sequence (N, k), and the probability the model puts on them
    at all (N,). The prefix every sequence shares (the chat template's system turn and the judge's constitution:
    about half of each prompt) is computed once, and each batch attends to its cache: with causal attention the
    prefix's keys and values do not depend on what follows, so this is the unshared forward, at about half the cost.
    Each batch's own parts are left-padded after the prefix (the padding masked out, positions continuing from
    the prefix), so every row ends at the last column."""
    if not sequences:
        return torch.empty(0, len(token_ids)), torch.empty(0)
    shared, cache_name = shared_prefix_length(sequences), cache_argument(model)
    prefix = None
    if shared:
        output = model(input_ids=torch.tensor([sequences[0][:shared]], device=device), use_cache=True)
        prefix = output["cache"] if "cache" in output else output["past_key_values"]  # renamed in transformers 5.2x
    letters, masses = [], []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_left([s[shared:] for s in sequences[start:start + batch_size]], pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        cache = None
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(ids))
        full_mask = torch.cat([torch.ones(len(ids), shared, dtype=mask.dtype, device=device), mask], dim=-1)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, logits_to_keep=1,
                       **{cache_name: cache}).logits[:, -1].float()  # (B, V) at the answer's first token
        letters.append(logits[:, token_ids].cpu())
        masses.append(logits.softmax(-1)[:, token_ids].sum(-1).cpu())
    return torch.cat(letters), torch.cat(masses)


def judge_both_orders(judge, tokenizer, questions, first, second, constitution, batch_size, device) -> list[Verdict]:
    """Asks in both orders and averages in logit space: with a position bias b, the two orders give
    logit s + b and s - b for "the first is better", and their mean is the unbiased s."""
    forward, forward_mass = p_first_wins(judge, tokenizer, questions, first, second, constitution, batch_size, device)
    second_as_a, backward_mass = p_first_wins(judge, tokenizer, questions, second, first, constitution, batch_size,
                                              device)
    backward = 1 - second_as_a
    shown_first, shown_second = torch.logit(forward, eps=1e-6), torch.logit(backward, eps=1e-6)  # s + b, s - b
    signal, bias = (shown_first + shown_second) / 2, (shown_first - shown_second) / 2
    mass = (forward_mass + backward_mass) / 2
    # with the mean bias taken off each order (s + b - mean b, s - b + mean b), they agree when |s| > |b - mean b|
    debiased = signal.abs() > (bias - bias.mean()).abs()
    return [Verdict(torch.sigmoid(s).item(), bool((f > 0.5) == (b > 0.5)), bool(d), c.item(), s.item(), m.item())
            for s, f, b, d, c, m in zip(signal, forward, backward, debiased, bias, mass)]


def pointwise_verdicts(first_scores: torch.Tensor, second_scores: torch.Tensor, temperature: float) -> list[Verdict]:
    """A pointwise judge's verdicts: the logit that the first is better is the score gap over the temperature. The
    order the two were shown in plays no part, so every verdict is consistent and the position bias is 0."""
    signal = (first_scores - second_scores) / temperature
    return [Verdict(torch.sigmoid(s).item(), True, True, 0.0, s.item(), None) for s in signal]


def rating_judge(path: str, constitution: str, device: str):
    """The server's judge (server/judge.py) in process: `rate(questions, responses)` is each response's expected
    rating from 1 to 10, (N,), computed as a server with `--judge` computes it."""
    from transformers import AutoTokenizer

    from rewardserve.server.batcher import score_in_batches
    from rewardserve.server.judge import load_judge
    from rewardserve.server.schemas import ScoreItem

    judge, encoder = load_judge(path, AutoTokenizer.from_pretrained(path), constitution=constitution, device=device,
                                min_shared_prefix=32)

    def rate(questions: list[str], responses: list[str]) -> torch.Tensor:
        sequences = [encoder.encode(ScoreItem(prompt=q, response=r)).input_ids for q, r in zip(questions, responses)]
        return torch.tensor([row[0] for row in score_in_batches(judge, sequences)])
    return rate


def judge_figures(verdicts: list[Verdict]) -> dict:
    """How much the labels can carry: the mean position bias and mean |content signal| in logits, and the mean
    share of the judge's next-token probability on the two answer letters (None for a pointwise judge)."""
    count = max(1, len(verdicts))
    masses = [v.answer_mass for v in verdicts if v.answer_mass is not None]
    return {"judge_position_bias_logit": round(sum(v.position_bias for v in verdicts) / count, 4),
            "judge_content_signal_logit": round(sum(abs(v.content_signal) for v in verdicts) / count, 4),
            "judge_answer_mass": round(sum(masses) / len(masses), 4) if masses else None}


def preference_rows(prompts, first, second, verdicts: list[Verdict], inconsistent: str,
                    labels: str = "soft") -> list[dict]:
    rows = []
    for prompt, x, y, verdict in zip(prompts, first, second, verdicts):
        if x.strip() == y.strip() or not x.strip() or not y.strip():
            continue  # nothing to learn from identical or empty candidates
        if not verdict.consistent_debiased and inconsistent == "drop":
            continue
        p = verdict.p_first if verdict.consistent_debiased else 0.5 + (verdict.p_first - 0.5) / 2
        chosen, rejected, p_chosen = (x, y, p) if p >= 0.5 else (y, x, 1 - p)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "p_chosen": 1.0 if labels == "hard" else round(p_chosen, 4),
                     "judge_consistent": verdict.consistent_debiased})
    return rows


def main(config: LabelConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("rewardserve label " + json.dumps(config.printable(), indent=2), flush=True)
    torch.manual_seed(config.seed)
    device, started = resolve_device(config.device), time.perf_counter()
    prompts = load_prompts(config.prompts)[: config.max_prompts]
    policy_path, judge_path = resolve_model_path(config.policy), resolve_model_path(config.judge_model)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path).to(device).eval()
    candidates = [generate_responses(policy, tokenizer, prompts, config.max_new_tokens, config.temperature,
                                     config.batch_size, device)[0]
                  for _ in range(config.responses_per_prompt)]
    sampled = time.perf_counter()
    questions = [prompt_text(p) for p in prompts]
    if config.judge_mode == "relevance":
        from .relevance import RelevanceJudge

        relevance = RelevanceJudge(judge_path, device, config.batch_size)
        scores = [relevance.scores(questions, responses) for responses in candidates]  # each response once

        def judge_pair(i: int, j: int) -> list[Verdict]:
            return pointwise_verdicts(scores[i], scores[j], config.relevance_temperature)
    elif config.judge_mode == "rating":
        rate = rating_judge(judge_path, load_constitution(config.constitution), config.device)
        ratings = [rate(questions, responses) for responses in candidates]  # each response once

        def judge_pair(i: int, j: int) -> list[Verdict]:
            return pointwise_verdicts(ratings[i], ratings[j], config.rating_temperature)
    else:
        judge = policy if judge_path == policy_path else \
            AutoModelForCausalLM.from_pretrained(judge_path).to(device).eval()
        judge_tokenizer = tokenizer if judge_path == policy_path else AutoTokenizer.from_pretrained(judge_path)
        constitution = load_constitution(config.constitution)

        def judge_pair(i: int, j: int) -> list[Verdict]:
            return judge_both_orders(judge, judge_tokenizer, questions, candidates[i], candidates[j], constitution,
                                     config.batch_size, device)
    rows, verdicts = [], []
    for i, j in itertools.combinations(range(config.responses_per_prompt), 2):
        pair_verdicts = judge_pair(i, j)
        verdicts += pair_verdicts
        rows += preference_rows(prompts, candidates[i], candidates[j], pair_verdicts, config.inconsistent,
                                config.labels)
    write_rows(Path(config.out), rows)
    summary = {"judge_mode": config.judge_mode, "prompts": len(prompts), "pairs_judged": len(verdicts),
               "rows_written": len(rows),
               "consistency_rate": sum(v.consistent for v in verdicts) / max(1, len(verdicts)),
               "consistency_rate_debiased": sum(v.consistent_debiased for v in verdicts) / max(1, len(verdicts)),
               **judge_figures(verdicts),
               "seconds_sampling": round(sampled - started, 1),
               "seconds_judging": round(time.perf_counter() - sampled, 1)}
    print("labelling finished: " + json.dumps(summary), flush=True)
    return summary


def write_rows(path: Path, rows: list[dict]) -> None:
    """Written to a temp file and renamed, so a cached stage is never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text("".join(json.dumps(row) + "\n" for row in rows))
    staging.replace(path)
