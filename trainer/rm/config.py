"""Settings of the reward-model jobs: `rewardserve train`, `eval` and `label`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rewardserve.server.steps import Separator

from ..settings import CommaList, CommandSettings, check_report_to


class RMTrainConfig(CommandSettings):
    objective: Literal["bradley-terry", "prm"] = "bradley-terry"
    """bradley-terry: a reward model from preference pairs; prm: a process reward model from stepwise supervision
    (TRL's rows: prompt, completions (the steps), labels (one boolean a step)), a token classifier served with
    `rewardserve serve --prm`."""
    step_separator: Separator = "\n"
    """--objective prm: what ends each step in the sequences trained on (the server's --step-separator); `\\n`
    and `\\t` are read as escapes."""
    plain_chat_format: Literal["concat", "roles"] = "concat"
    """How conversations (messages rows, and prompt + response) are written for a base whose tokenizer has no chat
    template (MiniLM, BERT, DeBERTa): concat (the turns' texts in order, the last right after the others) or roles
    ("User: ...", blank lines between). Stored in the checkpoint, so the server writes them the same way."""
    base: str = "smollm2"
    """Base model: a local folder (causal LM or encoder), a hub id, or an embedded one: `smollm2` (SmolLM2-135M,
    a decoder with a chat template) or `minilm` (all-MiniLM-L6-v2, a 22M encoder without one)."""
    margin_from_scores: bool = False
    """Rows with score_chosen and score_rejected (UltraFeedback's): their gap is the pair's margin (a `margin`
    field wins). Off, they are not read, and the data line says so."""
    init_from: str | None = None
    """Start from this reward checkpoint (trunk and trained head) instead of --base with a fresh head: how a served
    reward model is refreshed on old plus new pairs."""
    data: CommaList
    """Preference file(s), JSON Lines; repeat the flag or separate with commas to mix several."""
    eval_data: CommaList | None = None
    """Held-out file(s); without them a fixed-seed --eval-fraction of --data is held out."""
    out: str
    """Output folder: the checkpoint (loadable by the server and by AutoModelForSequenceClassification)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training pairs (fractions allowed)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate of AdamW (linear warmup, then cosine decay to 10%)."""
    batch_size: int = Field(16, gt=0)
    """Pairs per optimizer step (split into --grad-accum micro-batches)."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step; batch_size must divide by it."""
    max_length: int = Field(1024, gt=8)
    """Longest sequence in tokens; the prompt is cut from the left beyond it."""
    min_shared_prefix: int = Field(32, ge=0)
    """A pair's chosen and rejected sequences (and any others of a micro-batch) that begin with the same N tokens
    or more are packed as that prefix once, then each response attending to it: the prompt computed once in the
    forward and the backward, the same loss and gradients. Decoders that pack only; 0 turns it off."""
    margin: bool = True
    """Use each pair's `margin` inside the sigmoid (Llama 2) when the data has one (--no-margin to ignore it)."""
    center_coef: float = Field(0.0, ge=0)
    """Weight of the centering penalty mean((r_w + r_l)^2), which keeps scores near zero."""
    seed: int = 0
    """Seed of the split, the batch order and the head's initialisation."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of --data held out when no --eval-data is given."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Recompute each layer's forward in the backward instead of keeping its activations: SmolLM2-135M, 16 pairs a
    step, peaks at 5.6 GB instead of 18.2 GB, for more time per step."""
    max_pairs: int | None = Field(None, gt=0)
    """Use at most this many pairs of --data (quick runs): a --seed sample across all the files."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda:N."""
    save_every: int = Field(200, gt=0)
    """Steps between resumable training checkpoints (OUT/train_state)."""
    resume: bool = False
    """Continue from OUT/train_state after an interruption."""
    log_every: int = Field(10, gt=0)
    """Steps between log lines in OUT/train_log.jsonl."""
    report_to: CommaList = []
    """Where the log lines also go: `wandb` (Weights & Biases, as for `rewardserve ppo`; its run ends up in
    OUT/wandb)."""

    @model_validator(mode="after")
    def _exact_division(self) -> "RMTrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} must divide by --grad-accum {self.grad_accum}")
        check_report_to(self.report_to)
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


class EvalConfig(CommandSettings):
    model: str
    """Reward checkpoint to evaluate (ours, TRL's, OpenRLHF's)."""
    data: CommaList
    """Preference file(s), JSON Lines."""
    max_length: int | None = Field(None, gt=8)
    """Longest sequence in tokens; default: the length the checkpoint was trained at (what the server uses), so
    pairs are cut as in training and serving."""
    batch_size: int = Field(16, gt=0)
    """Pairs per forward pass."""
    max_pairs: int | None = Field(None, gt=0)
    """Evaluate at most this many pairs: a --seed sample across all the files."""
    seed: int = 0
    """Seed of the --max-pairs sample."""
    device: str = "auto"
    """auto, cpu or cuda:N."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)."""
    report: str | None = None
    """Write the report as JSON to this file."""


class LabelConfig(CommandSettings):
    prompts: str = "builtin"
    """JSON Lines of {"prompt"} or {"messages"}; `builtin` for the project's own prompt set."""
    out: str = "runs/prefs.jsonl"
    """Output JSON Lines: prompt, chosen, rejected, p_chosen (what `rewardserve train` reads)."""
    policy: str = "smollm2"
    """Model that writes the candidate responses (local causal LM, hub id, or `smollm2`)."""
    judge_mode: Literal["pairwise", "relevance", "rating"] = "pairwise"
    """pairwise: a causal LM judge asked "A or B?" under the constitution, in both orders; relevance: a sentence
    encoder scores how directly each response answers its question (the cosine of their embeddings), one
    response at a time, and a pair's label is the difference (it sees relevance, not harm or truth); rating: a
    causal LM rates each response alone from 1 to 10 under the constitution (the server's --judge), and a pair's
    label is the gap of the expected ratings."""
    judge: str | None = None
    """The judge: a causal LM for pairwise and rating (default `smollm2`), a sentence encoder for relevance (default
    `minilm`, the embedded all-MiniLM-L6-v2); a local folder or hub id."""
    constitution: str = "builtin"
    """Text file of principles the pairwise and rating judges apply; `builtin` for helpful, honest, harmless,
    concise."""
    relevance_temperature: float = Field(0.05, gt=0)
    """Relevance mode: a pair's soft label is sigmoid(cosine gap / this), so a gap of this size gives 0.73."""
    rating_temperature: float = Field(1.0, gt=0)
    """Rating mode: a pair's soft label is sigmoid(expected-rating gap / this): one rating point gives 0.73."""
    max_prompts: int | None = Field(None, gt=0)
    """Label at most this many prompts (in file order)."""
    responses_per_prompt: int = Field(2, ge=2)
    """Responses sampled per prompt; every pair among them is judged."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest candidate response."""
    temperature: float = Field(0.9, gt=0)
    """Sampling temperature of the candidates (diverse enough to differ)."""
    batch_size: int = Field(16, gt=0)
    """Sequences per generation or judging batch."""
    inconsistent: Literal["drop", "downweight"] = "downweight"
    """A pair the judge ranks differently in the two orders, once their mean position bias is taken off: drop it, or
    keep it with p_chosen shrunk towards 0.5."""
    labels: Literal["soft", "hard"] = "soft"
    """soft: p_chosen is the judge's order-free probability that the chosen one is better; hard: the judge's
    winner with p_chosen 1 (a weak judge's probabilities sit near 0.5 and teach a reward model little)."""
    seed: int = 0
    """Sampling seed."""
    device: str = "auto"
    """auto, cpu or cuda:N."""

    @property
    def judge_model(self) -> str:
        return self.judge or ("minilm" if self.judge_mode == "relevance" else "smollm2")
