"""Preference data: reading the formats people have, encoding pairs, and length-bucketed batches.

Accepted JSON Lines rows (several files can be mixed):
- {"prompt": str, "chosen": str, "rejected": str, "margin"?: float}       the format of ../shared/data
- {"chosen": [messages], "rejected": [messages], "prompt"?: [messages]}    TRL's conversational form
- {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}       raw hh-rlhf: split at the last turn
- any of the above with "p_chosen" in [0, 1]                               soft labels from an AI judge

A row that cannot be used is counted under its reason and reported, never silently used or dropped.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from pydantic import ValidationError

from rewardserve.server.errors import InvalidInput, describe_validation_errors
from rewardserve.server.modeling import pad_right
from rewardserve.server.packing import PackedBatch, pack
from rewardserve.server.schemas import ScoreItem
from rewardserve.server.tokenization import ItemEncoder

HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | list[dict]
    chosen: str
    rejected: str
    margin: float | None = None
    p_chosen: float | None = None


@dataclass(frozen=True)
class EncodedPair:
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None
    p_chosen: float | None
    truncated: bool
    chosen_response_length: int = 0  # the responses' own tokens: what the length fit regresses scores on
    rejected_response_length: int = 0

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class DataReport:
    """Rows read, rows used, and rows skipped by reason."""

    read: int = 0
    used: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    not_sampled: int = 0  # usable rows left out by a --max-pairs sample
    notes: Counter = field(default_factory=Counter)  # what was read differently from the plain format, or not read

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def note(self, what: str) -> None:
        self.notes[what] += 1

    def summary(self) -> dict:
        return {"read": self.read, "used": self.used, "truncated": self.truncated, "skipped": dict(self.skipped),
                "not_sampled": self.not_sampled, "notes": dict(self.notes)}

    def describe(self) -> str:
        """One line for the terminal: `40 rows read: 36 used, 4 skipped (3 missing chosen/rejected, 1 not JSON)`."""
        line = f"{self.read} rows read: {self.used} used"
        if self.not_sampled:
            line += f", {self.not_sampled} left out by --max-pairs"
        if self.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
            line += f", {sum(self.skipped.values())} skipped ({reasons})"
        line += f"; {self.truncated} truncated" if self.truncated else ""
        if self.notes:
            line += "; " + "; ".join(f"{count} rows: {what}" for what, count in self.notes.most_common())
        return line


class BadRow(ValueError):
    pass


# -- reading --------------------------------------------------------------------------------------------------------
def _split_conversation(messages: list[dict]) -> tuple[list[dict], str]:
    if not messages or messages[-1].get("role") != "assistant":
        raise BadRow("conversation does not end with an assistant turn")
    return messages[:-1], messages[-1].get("content", "")


def _split_hh(dialogue: str) -> tuple[str, str]:
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("missing prompt (no field, and no final \\n\\nAssistant: turn to split at)")
    cut += len(HH_ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


ACCEPTED_SHAPES = ("{prompt, chosen, rejected} (text or messages), TRL's conversational {chosen: [...], rejected:"
                   " [...]}, or hh-rlhf dialogues {chosen, rejected} (optional margin, p_chosen, score_chosen and"
                   " score_rejected)")


def _common_prefix_prompt(chosen: str, rejected: str) -> str:
    """TRL's implicit prompt: the text chosen and rejected begin with, a space before the answers left to them."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if 0 < n < len(chosen) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n]


def parse_row(row: dict, report: DataReport | None = None, margin_from_scores: bool = False) -> PreferencePair:
    """One JSON object -> a PreferencePair, or BadRow naming what is wrong. `report` takes a note of what is read
    differently from the plain format (an implicit prompt) and of fields recognised but unused."""
    report = report or DataReport()
    if not isinstance(row, dict):
        raise BadRow(f"not a JSON object (a JSON {type(row).__name__})")
    if "chosen" not in row or "rejected" not in row:
        if "conversations" in row or "messages" in row:
            raise BadRow(f"one conversation (ShareGPT or chat), not a preference pair: send {ACCEPTED_SHAPES}")
        raise BadRow("missing chosen/rejected")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen_turns, chosen = _split_conversation(chosen)
        rejected_turns, rejected = _split_conversation(rejected)
        if prompt is None:
            prompt = chosen_turns
            if rejected_turns != prompt:
                raise BadRow("chosen and rejected conversations have different prompts")
        else:  # the turns a conversation holds before its answer, if any, must be the prompt it is scored under
            as_turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if any(turns and turns != as_turns for turns in (chosen_turns, rejected_turns)):
                raise BadRow("a conversation's turns before its answer differ from `prompt`")
    elif prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        if HH_ASSISTANT in chosen or HH_ASSISTANT in rejected:
            prompt, chosen = _split_hh(chosen)
            rejected_prompt, rejected = _split_hh(rejected)
            if rejected_prompt != prompt:
                raise BadRow("chosen and rejected dialogues have different prompts")
        else:  # TRL's implicit prompt: what both sides begin with
            prompt = _common_prefix_prompt(chosen, rejected)
            if not prompt:
                raise BadRow("missing prompt (no field, no \\n\\nAssistant: turn, and chosen and rejected share no"
                             " leading text)")
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
            report.note("prompt taken as the text chosen and rejected begin with (TRL's implicit prompt)")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not isinstance(prompt, (str, list)):
        raise BadRow("wrong field types")
    if not chosen.strip() or not rejected.strip():
        raise BadRow("empty response")
    if chosen == rejected:
        raise BadRow("identical sides")
    margin, p_chosen = row.get("margin"), row.get("p_chosen")
    if p_chosen is not None and not 0.0 <= float(p_chosen) <= 1.0:
        raise BadRow("p_chosen outside [0, 1]")
    margin = _margin_from_scores(row, margin, margin_from_scores, report)
    if "label" in row:
        report.note("`label` not read (a soft label goes under p_chosen, a margin under margin)")
    return PreferencePair(prompt, chosen, rejected, None if margin is None else float(margin),
                          None if p_chosen is None else float(p_chosen))


def _margin_from_scores(row: dict, margin, use: bool, report: DataReport):
    """UltraFeedback's score_chosen / score_rejected: their gap is the margin with --margin-from-scores (a
    `margin` field wins), and otherwise said to be unused; rows whose scores contradict their order are counted."""
    if "score_chosen" not in row or "score_rejected" not in row:
        return margin
    try:
        gap = float(row["score_chosen"]) - float(row["score_rejected"])
    except (TypeError, ValueError):
        raise BadRow("score_chosen / score_rejected are not numbers") from None
    if gap < 0:
        report.note("score_chosen below score_rejected (the scores contradict the order)")
    if not use:
        report.note("score_chosen / score_rejected not read (--margin-from-scores makes their gap the margin)")
        return margin
    return gap if margin is None else margin


def read_pairs(paths: list[str], report: DataReport, limit: int | None = None, seed: int = 0,
               margin_from_scores: bool = False) -> list[PreferencePair]:
    """Every usable row of the files, in order; with `limit`, a seeded sample of `limit` of them drawn across all
    the files (in their order), never the first file's head. `report.read` counts every row.

    The sample draws from its own stream, not random.Random(seed): `split_train_eval` shuffles with that one, and
    a shuffle and a sample of one stream pick mostly the same indices first (the shuffle draws randbelow(n),
    randbelow(n - 1)..., the sample randbelow(n) again and again, from the same bits), so `eval --max-pairs 40` on a training file drew mostly the pairs that training had held out (12 trained of
    40 where 36 were expected)."""
    pairs = []
    for path in paths:
        with open(path) as handle:
            for line in handle:
                if not line.strip():
                    continue
                report.read += 1
                try:
                    pairs.append(parse_row(json.loads(line), report, margin_from_scores))
                except json.JSONDecodeError:
                    report.skip("not JSON")
                except BadRow as error:
                    report.skip(str(error))
    if limit is not None and limit < len(pairs):
        report.not_sampled = len(pairs) - limit
        pairs = [pairs[i] for i in sorted(random.Random(f"--max-pairs {seed}").sample(range(len(pairs)), limit))]
    return pairs


def pair_fingerprint(pair: PreferencePair) -> str:
    """What identifies a comparison, whichever side a file lists first: the prompt and both responses."""
    sides = sorted([pair.chosen, pair.rejected])
    return hashlib.sha256(json.dumps([pair.prompt, *sides]).encode()).hexdigest()[:16]


def write_pairs(pairs: list[PreferencePair], path) -> None:
    """JSON Lines that `read_pairs` reads back as the same pairs."""
    with open(path, "w") as handle:
        for pair in pairs:
            row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
            row |= {key: value for key, value in (("margin", pair.margin), ("p_chosen", pair.p_chosen))
                    if value is not None}
            handle.write(json.dumps(row) + "\n")


def prompt_key(pair) -> str:
    """What groups pairs for the held-out split: their prompt, text or messages."""
    return json.dumps(pair.prompt)


def split_train_eval(pairs: list, eval_fraction: float, seed: int, group_of=None) -> tuple[list, list]:
    """Fixed-seed held-out split. Pairs of one group (`group_of(pair)`, e.g. its prompt) stay on one side: pairs
    that share a prompt share responses too (every pair among k responses), so splitting them would leak the
    held-out responses into training. Groups are shuffled with random.Random(seed), and the first fill the
    training side up to (1 - f) of the pairs; without groups, each pair is its own."""
    keys = [group_of(pair) if group_of else index for index, pair in enumerate(pairs)]
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    cut, train, held_out = round(len(pairs) * (1 - eval_fraction)), [], []
    for group in order:
        (train if len(train) < cut else held_out).extend(group)
    return [pairs[i] for i in train], [pairs[i] for i in held_out]


# -- encoding -------------------------------------------------------------------------------------------------------
def _side_item(prompt: str | list[dict], response: str) -> ScoreItem:
    if isinstance(prompt, list):
        return ScoreItem(messages=prompt + [{"role": "assistant", "content": response}])
    return ScoreItem(prompt=prompt, response=response)


def encode_pairs(pairs: list[PreferencePair], encoder: ItemEncoder, report: DataReport) -> list[EncodedPair]:
    """Tokenizes both sides the way the server will; a response that cannot fit beside its prompt is skipped."""
    encoded = []
    for pair in pairs:
        try:
            chosen = encoder.encode(_side_item(pair.prompt, pair.chosen))
            rejected = encoder.encode(_side_item(pair.prompt, pair.rejected))
        except InvalidInput as error:
            report.skip(f"cannot format: {error.message}")
            continue
        except ValidationError as error:  # e.g. a message role no chat template knows
            report.skip(f"cannot format: {describe_validation_errors(error.errors())}")
            continue
        response_lengths = encoder.count_tokens(pair.chosen), encoder.count_tokens(pair.rejected)
        if max(response_lengths) + 8 > encoder.max_length:  # room for the template's turn markers and some prompt
            report.skip("too long after truncation (a response alone fills max_length)")
            continue
        if chosen.input_ids == rejected.input_ids:
            report.skip("identical after truncation")
            continue
        report.truncated += chosen.truncated or rejected.truncated
        encoded.append(EncodedPair(chosen.input_ids, rejected.input_ids, pair.margin, pair.p_chosen,
                                   chosen.truncated or rejected.truncated, *response_lengths))
    report.used += len(encoded)
    return encoded


# -- batching -------------------------------------------------------------------------------------------------------
def length_bucketed_batches(pairs: list[EncodedPair], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffles, sorts by length within chunks of 50 batches, cuts into batches, and shuffles their order.

    Pairs of similar length share a batch, so little compute goes to padding, while the order stays random.
    """
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        sorted_chunk = sorted(order[start:start + chunk], key=lambda i: pairs[i].length)
        batches += [sorted_chunk[i:i + batch_size] for i in range(0, len(sorted_chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class PairBatch:
    """The B chosen sequences, then the B rejected ones: padded (2B, T), or packed end to end in one row."""

    pairs: int
    margin: torch.Tensor | None  # (B,)
    p_chosen: torch.Tensor | None  # (B,)
    input_ids: torch.Tensor | None = None  # (2B, T) when padded
    attention_mask: torch.Tensor | None = None  # (2B, T) when padded
    packed: PackedBatch | None = None  # when packed


def collate_pairs(pairs: list[EncodedPair], pad_token_id: int, use_margin: bool = True, packed: bool = False,
                  pin_memory: bool = False, min_shared_prefix: int = 0) -> PairBatch:
    """Chosen and rejected in one batch, so one forward pass scores both sides of every pair; packed without
    padding for the architectures that support it (server/packing.py), else padded on the right. Packed with
    `min_shared_prefix` (decoders only), a prompt that chosen and rejected share is computed once.

    A missing margin counts as 0 and a missing p_chosen as 1 (a hard label) when others in the batch have one.
    pin_memory: page-locked host tensors, so that the copy to a GPU is asynchronous.
    """
    sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    margins = [p.margin for p in pairs]
    soft = [p.p_chosen for p in pairs]
    margin = (torch.tensor([m or 0.0 for m in margins]) if use_margin and any(m is not None for m in margins)
              else None)
    p_chosen = torch.tensor([1.0 if s is None else s for s in soft]) if any(s is not None for s in soft) else None
    if packed:
        return PairBatch(len(pairs), margin, p_chosen, packed=pack(sequences, pin_memory, min_shared_prefix))
    input_ids, attention_mask = pad_right(sequences, pad_token_id, pin_memory)
    return PairBatch(len(pairs), margin, p_chosen, input_ids, attention_mask)
