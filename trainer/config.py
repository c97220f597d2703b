"""Typed settings of the trainer-side commands (pydantic-settings: each field is a flag and a REWARDSERVE_* variable;
its docstring is the --help text)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, CliPositionalArg, NoDecode, SettingsConfigDict


def _split_commas(value):
    """`a,b` -> [a, b], so lists read the same from a flag and from an environment variable (not JSON)."""
    if isinstance(value, str):
        value = [value]
    return [part.strip() for item in value for part in str(item).split(",") if part.strip()]


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


def _none_word(value):
    """`none` (as the help says) or `null` (JSON's word) both mean: off."""
    return None if isinstance(value, str) and value.strip().lower() in ("none", "null") else value


OffOrFloat = Annotated[float | None, BeforeValidator(_none_word)]


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="REWARDSERVE_", use_attribute_docstrings=True, cli_kebab_case=True, cli_implicit_flags=True,
        extra="ignore",
    )

    def printable(self) -> dict:
        """The settings as printed at start, secrets shown only as set or not."""
        shown = self.model_dump(mode="json")
        return shown | {k: "<set>" for k, v in self if isinstance(v, SecretStr)}


class ScoreConfig(_Settings):
    url: CommaList = ["http://127.0.0.1:8000"]
    """Reward server URL(s), http(s):// or grpc(s)://; several are used round-robin."""
    prompt: str | None = None
    """Prompt of the one item to score (with --response)."""
    response: str | None = None
    """Response of the one item to score."""
    text: str | None = None
    """Already formatted text to score as given."""
    file: str | None = None
    """JSON Lines file of items ({"prompt", "response"} / {"messages"} / {"text"} / {"input_ids"}) to score."""
    transform: Literal["raw", "whiten", "logsigmoid", "debias"] | None = None
    """Reward transform; the model's default when left out."""
    model: CommaList | None = None
    """The server's model(s) to score with (several comma-separated: each in `components`); default: its default."""
    combination: str | None = None
    """One of the server's combinations to score with."""
    api_key: SecretStr | None = None
    """API key of the server."""
    ca_file: str | None = None
    """PEM CA bundle to trust for https:// and grpcs:// (default: the system's)."""
    timeout: float = Field(60.0, gt=0)
    """Seconds to wait for one answer."""

    @model_validator(mode="after")
    def _one_source(self) -> "ScoreConfig":
        if self.model and self.combination:
            raise ValueError("give --model or --combination, not both")
        sources = [self.response is not None, self.text is not None, self.file is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one of --prompt/--response, --text or --file")
        return self


def check_report_to(report_to: list[str]) -> None:
    if set(report_to) - {"wandb"}:
        raise ValueError(f"--report-to {','.join(report_to)}: only wandb is known (JSON Lines and TensorBoard are"
                         " always written)")


class RMTrainConfig(_Settings):
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


class EvalConfig(_Settings):
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


class PPOConfig(_Settings):
    reward_url: CommaList
    """Reward server URL(s), http(s):// or grpc(s)://, comma-separated; requests are spread round-robin."""
    reward_api_key: SecretStr | None = None
    """API key of the reward server."""
    reward_ca_file: str | None = None
    """PEM CA bundle to trust for https:// and grpcs:// reward URLs (default: the system's)."""
    reward_timeout: float = Field(120.0, gt=0)
    """Seconds to wait for one scoring answer before retrying."""
    reward_retries: int = Field(8, gt=0)
    """Attempts per scoring request (exponential backoff with jitter, Retry-After honoured) before a rollout batch
    is dropped and counted."""
    reward_model: CommaList | None = None
    """Which of the server's models scores: one name, or several (comma-separated; the first gives the reward, each
    is logged as reward/<name>). Default: the server's default."""
    reward_combination: str | None = None
    """A combination declared at the server's start (llama2, sum or ensemble); each of its models is logged as
    reward/<name>, an ensemble's disagreement as reward/ensemble_std."""
    gold_reward_url: str | None = None
    """A gold reward server (a larger or differently trained model) that scores the same rollouts every
    --gold-every steps, never seen by the update: logged against sqrt(KL) and plotted (OUT/gold.png), with the
    best-gold policy kept in OUT/best_gold."""
    gold_api_key: SecretStr | None = None
    """API key of the gold reward server."""
    gold_every: int = Field(1, gt=0)
    """Steps between gold evaluations."""
    stop_on_gold_drop: int | None = Field(None, gt=0)
    """Stop once the gold mean has fallen this many evaluations in a row while the proxy rose (needs
    --gold-reward-url)."""
    policy: str = "smollm2"
    """Policy to fine-tune: a local causal LM folder, a hub id, or `smollm2` (the embedded SmolLM2-135M-Instruct)."""
    reference: str | None = None
    """Frozen reference policy for the KL penalty; default: a frozen copy of the starting policy."""
    prompts: str = "builtin"
    """JSON Lines of {"prompt": str} or {"messages": [...]}; `builtin` for the project's own prompt set."""
    steps: int = Field(100, gt=0)
    """PPO steps (one rollout batch and its update each)."""
    out: str = "runs/ppo"
    """Output folder: metrics.jsonl, plots, checkpoints/, policy/."""
    batch_size: int = Field(16, gt=0)
    """Rollouts per step."""
    generation_batch_size: int | None = Field(None, gt=0)
    """Rollouts sampled at once; default: the whole batch in one generation (chunks only where memory needs
    them). Each chunk's responses go to the server while the next chunk is sampled."""
    forward_batch_tokens: int = Field(16384, gt=0)
    """Tokens (rows x width) per forward when reading the rollouts' log-probs and values."""
    compile_decode: bool | None = None
    """Compile the decode step with CUDA graphs (default: on CUDA); it falls back to eager, with a warning, if it
    fails."""
    mini_batch_size: int = Field(8, gt=0)
    """Rollouts per gradient step of the update."""
    ppo_epochs: int = Field(2, gt=0)
    """Passes over each rollout batch."""
    lr: float = Field(3e-6, gt=0)
    """AdamW learning rate of the policy and value head."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Steps over which the learning rate rises linearly to --lr (the first step's is lr / N); constant after."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probabilities of policy and reference use logits / temperature too."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold; PPO takes 1 only (the full distribution): see the check below."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest response."""
    max_prompt_length: int = Field(256, gt=0)
    """Longest prompt in tokens (cut from the left)."""
    beta: float = Field(0.05, ge=0)
    """KL penalty coefficient (initial value when --adaptive-kl). The penalty is beta * KL at every response token,
    so a sequence pays beta times its summed (sequence-level) KL."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator: k1 = log p - log q, k3 = q/p - 1 - log(q/p)."""
    adaptive_kl: bool = False
    """Adapt beta towards --target-kl (Ziegler et al.)."""
    target_kl: float = Field(6.0, gt=0)
    """Target KL per sequence (summed over response tokens, in nats) for the adaptive controller."""
    kl_horizon: int = Field(10000, gt=0)
    """Rollouts over which the adaptive controller closes the gap."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount: GAE's (ppo), and the rewards-to-go of the critic-free estimators (grpo, rloo, reinforce++), as
    verl and OpenRLHF discount REINFORCE++'s."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    cliprange: float = Field(0.2, gt=0)
    """Policy ratio clip."""
    cliprange_value: float = Field(0.2, gt=0)
    """Value clip, around the rollout's values."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    max_approx_kl: float = Field(0.5, gt=0)
    """Stop an update's remaining epochs once the approximate KL to the rollout policy passes this."""
    whiten_rewards: bool = True
    """Whiten the server's rewards with running statistics across steps."""
    reward_clip: OffOrFloat = Field(10.0, gt=0)
    """Clip (whitened) rewards to +-this; none to disable."""
    missing_eos_penalty: OffOrFloat = Field(1.0, ge=0)
    """Subtract this from the reward of a response that never reached EOS; none to disable."""
    max_dropped_fraction: float = Field(0.25, ge=0, le=1)
    """Stop with an error once more than this share of rollouts could not be scored."""
    critic: Literal["shared", "separate"] = "shared"
    """Value head on the policy's trunk (shared) or on a separate copy of it."""
    samples_per_prompt: int = Field(1, gt=0)
    """Responses per prompt: each step samples --batch-size / n prompts n times, and each group is scored in one
    request (groups are never split across --generation-batch-size chunks, so a dropped chunk drops whole groups)."""
    report_to: CommaList = []
    """Where metrics also go: `wandb` (Weights & Biases: online with WANDB_API_KEY, else offline into OUT/wandb),
    beside the JSON Lines and TensorBoard that are always written."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Serve each step's metrics for Prometheus on this port (`rewardserve_trainer_<name>` gauges at /metrics; 0
    picks a free port and prints it); off by default. docker compose's monitoring profile scrapes 9400."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint binds; 0.0.0.0 for a scraper on another host or container."""
    sharding: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole policy, reference and AdamW state. fsdp: FSDP2 (`fully_shard`) on each decoder
    layer and the root, so each rank holds 1/world of the parameters, gradients, AdamW state and reference; bf16
    compute with fp32 gradient reduction on CUDA; sharded checkpoints (torch.distributed.checkpoint)."""
    lora_rank: int = Field(0, ge=0)
    """Train LoRA adapters of this rank (peft) instead of the whole policy: only the adapters (and any value head)
    are trained and held by AdamW, and the reference is the same base with the adapters off (no second copy, unless
    --reference names another model). 0: the whole policy is trained. OUT/policy is then peft's adapter folder."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA's scale numerator (the update is alpha / rank x B A)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input, in the update only (the rollout's forwards run in eval mode)."""
    lora_target_modules: CommaList = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Linear layers that get adapters, by their last name (default: the attention and MLP projections of
    Llama-style models)."""
    merge_lora: bool = False
    """Also save the trained adapters merged into the base, as a plain model: OUT/policy-merged."""
    min_shared_prefix: int = Field(32, ge=0)
    """Responses whose prompts share N tokens or more (a group) are read with the prompt computed once: the
    rollout's log-prob, reference and value forwards and the update's forward and backward, exactly the unshared
    ones (a packed row, as the server does). Architectures with plain attention only (others run padded); 0 turns
    it off. The update's minibatches then keep each group whole."""
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce++"] = "gae"
    """gae: PPO's value head and GAE. grpo (scores centred, and divided by the std, within each prompt's group),
    rloo (each score minus the mean of the others in its group), reinforce++ (the batch's token advantages
    whitened): critic-free, no value loss; grpo and rloo need --samples-per-prompt 2 or more."""
    grpo_scale_by_std: bool = True
    """GRPO divides a group's centred scores by their std; --no-grpo-scale-by-std is Dr. GRPO."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference goes: `reward` (-beta * KL at every token, --kl-estimator), or `loss` (beta
    times the k3 estimate of KL(policy || reference) added to the policy loss, GRPO's form)."""
    loss_aggregation: Literal["token-mean", "sequence-mean", "token-sum-norm"] = "token-mean"
    """How the policy loss averages over tokens: over every token of the minibatch, over each response then the
    responses (GRPO's paper), or a sum over tokens divided by minibatch x --max-new-tokens (Dr. GRPO)."""
    seed: int = 0
    """Seed of the prompt order and of sampling."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda:N."""
    save_every: int = Field(50, gt=0)
    """Steps between checkpoints (OUT/checkpoints/step-N)."""
    keep_checkpoints: int = Field(1, gt=0)
    """Checkpoints kept, the newest (each is the policy, any critic and AdamW state in fp32, ~12 bytes a parameter:
    1.6 GB for 135M). One is enough to resume: a checkpoint replaces the last only once it is whole."""
    resume: bool = False
    """Continue from the latest checkpoint in OUT/checkpoints."""

    @model_validator(mode="after")
    def _sizes_divide(self) -> "PPOConfig":
        if self.reward_model and self.reward_combination:
            raise ValueError("give --reward-model or --reward-combination, not both")
        if self.stop_on_gold_drop is not None and self.gold_reward_url is None:
            raise ValueError("--stop-on-gold-drop watches the gold reward: give --gold-reward-url too")
        if self.top_p < 1:
            # The ratio, the KL and the gradient are of the full softmax; a nucleus sample would make every step
            # off-policy without a correction (TRL's PPO refuses it too).
            raise ValueError(f"--top-p {self.top_p}: PPO samples from the whole distribution its log-probs describe;"
                             " use --top-p 1 and lower --temperature for less diverse responses")
        for name in ("generation_batch_size", "mini_batch_size"):
            if getattr(self, name) is not None and self.batch_size % getattr(self, name):
                raise ValueError(f"--batch-size {self.batch_size} must divide by --{name.replace('_', '-')}")
        for name in ("batch_size", "generation_batch_size"):
            size = getattr(self, name)
            if size is not None and size % self.samples_per_prompt:
                raise ValueError(f"--{name.replace('_', '-')} {size} must divide by --samples-per-prompt"
                                 f" {self.samples_per_prompt} (a prompt's group is sampled and scored together)")
        if self.advantage_estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"--advantage-estimator {self.advantage_estimator} baselines each score with the other"
                             " answers to its prompt: give --samples-per-prompt 2 or more")
        check_report_to(self.report_to)
        if self.sharding == "fsdp" and self.merge_lora:
            raise ValueError("--merge-lora with --sharding fsdp is not built yet: merge the saved adapter folder with"
                             " peft's merge_and_unload")
        if self.sharding == "fsdp" and self.gold_reward_url:
            raise ValueError("--gold-reward-url with --sharding fsdp is not built yet (its best-policy save is taken on"
                             " rank 0 alone); use --sharding ddp")
        if self.merge_lora and not self.lora_rank:
            raise ValueError("--merge-lora merges trained adapters: give --lora-rank too")
        if not self.has_critic and self.critic == "separate":
            raise ValueError(f"--advantage-estimator {self.advantage_estimator} trains no critic: leave out"
                             " --critic separate")
        return self

    @property
    def has_critic(self) -> bool:
        """A value head (and with --critic separate, its trunk): GAE needs one, the critic-free estimators do not."""
        return self.advantage_estimator == "gae"


class LabelConfig(_Settings):
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


class CompareConfig(_Settings):
    policy_b: str
    """Policy B, the one asked about (typically the trained policy: OUT/policy of `rewardserve ppo`)."""
    policy_a: str = "smollm2"
    """Policy A, the baseline (a causal LM folder, a hub id, or `smollm2`)."""
    prompts: str = "builtin"
    """JSON Lines of {"prompt"} or {"messages"}; `builtin` for the project's own prompt set. Use prompts the
    policies were not trained on."""
    max_prompts: int | None = Field(None, gt=0)
    """Compare on at most this many prompts (in file order)."""
    reward_url: CommaList
    """Reward server URL(s) that score both answers, http(s):// or grpc(s)://."""
    reward_model: CommaList | None = None
    """One of the server's models (default: the server's default)."""
    reward_combination: str | None = None
    """One of the server's combinations."""
    reward_api_key: SecretStr | None = None
    """API key of the reward server."""
    reward_ca_file: str | None = None
    """PEM CA bundle to trust for https:// and grpcs://."""
    reward_timeout: float = Field(120.0, gt=0)
    """Seconds to wait for one scoring answer before retrying."""
    judge: str | None = None
    """An AI judge for a second opinion, asked in both orders (a causal LM folder, hub id or `smollm2`)."""
    relevance_judge: str | None = None
    """A sentence encoder (a folder, hub id or `minilm`) as a further opinion: B wins where its response is closer
    to the prompt (see `rewardserve label --judge-mode relevance`)."""
    constitution: str = "builtin"
    """The judge's principles: a text file, or `builtin`."""
    greedy: bool = False
    """Greedy answers (one per prompt); otherwise --samples sampled answers per prompt."""
    samples: int = Field(1, gt=0)
    """Sampled answers per prompt and policy (1 when --greedy)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest answer."""
    batch_size: int = Field(16, gt=0)
    """Sequences per generation or judging batch."""
    out: str = "runs/compare"
    """Output folder: comparisons.jsonl, summary.json."""
    seed: int = 0
    """Seed of sampling and of the bootstrap."""
    independent_samples: bool = False
    """Sample B with --seed + 1. By default both policies draw the same random numbers (paired sampling: where two
    policies agree they answer alike, so the win rate measures the policies, not the sampling noise); near-identical
    policies then often give identical answers, which count as ties."""
    device: str = "auto"
    """auto, cpu or cuda:N."""

    @model_validator(mode="after")
    def _one_greedy_answer(self) -> "CompareConfig":
        if self.reward_model and self.reward_combination:
            raise ValueError("give --reward-model or --reward-combination, not both")
        if self.greedy and self.samples != 1:
            raise ValueError("--greedy gives one answer per prompt: leave out --samples")
        return self


class DemoConfig(_Settings):
    out: str = "runs/demo"
    """Folder of every stage's output: prompts/, prefs.jsonl, rm/, ppo/, compare/, summary.json."""
    fresh: bool = False
    """Redo every stage, even those whose output is already there."""
    stages: list[Literal["label", "train", "ppo", "compare"]] = ["label", "train", "ppo", "compare"]
    """Stages to run, in order (the compose stack's prepare job runs label,train)."""
    policy: str = "smollm2"
    """Policy that writes candidates and is fine-tuned by PPO."""
    label_judge_mode: Literal["pairwise", "relevance"] = "relevance"
    """How the labelling stage judges (see `rewardserve label --judge-mode`). relevance, the default: SmolLM2-135M
    asked "A or B" answers with the position, not the content (README, "The demo's labeller")."""
    label_judge: str | None = None
    """The labelling stage's judge (default: `minilm` for relevance, `smollm2` for pairwise); with relevance it is
    also an opinion in the comparison."""
    judge: str = "smollm2"
    """The causal LM judge asked in both orders in the comparison (and in labelling when pairwise)."""
    base: str = "minilm"
    """Base of the reward model (`minilm`: the embedded 22M all-MiniLM-L6-v2 encoder, six times cheaper to train
    and serve than SmolLM2, which leaves the CPU to PPO)."""
    label_prompts: int = Field(48, gt=1)
    """Prompts of the training split to label."""
    label_responses: int = Field(3, ge=2)
    """Responses sampled per labelled prompt; every pair among them is judged (3 give 3 pairs a prompt)."""
    label_form: Literal["soft", "hard"] = "soft"
    """soft: p_chosen is the judge's order-free probability; hard: the judge's winner, p_chosen 1."""
    max_new_tokens: int = Field(24, gt=0)
    """Longest response, when labelling, in PPO and in the comparison."""
    rm_epochs: float = Field(6.0, gt=0)
    """Reward-model epochs over the labelled pairs."""
    rm_lr: float = Field(5e-5, gt=0)
    """Reward-model learning rate."""
    rm_max_length: int = Field(256, gt=8)
    """Reward-model sequence length."""
    rm_eval_fraction: float = Field(0.3, gt=0, lt=1)
    """Share of the labelled prompts whose pairs are held out from reward-model training (all pairs of a prompt
    on one side)."""
    ppo_steps: int = Field(48, gt=0)
    """PPO steps."""
    ppo_batch_size: int = Field(16, gt=0)
    """Rollouts per PPO step."""
    samples_per_prompt: int = Field(4, gt=0)
    """Rollouts per prompt in a step (a group, for the critic-free estimators)."""
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce++"] = "rloo"
    """How PPO's update weighs each rollout (see `rewardserve ppo --help`); RLOO's leave-one-out baseline needs no
    critic to learn first, which matters in a run this short."""
    ppo_lr: float = Field(5e-5, gt=0)
    """PPO learning rate."""
    ppo_lr_warmup_steps: int = Field(12, ge=0)
    """Steps over which PPO's learning rate rises linearly to --ppo-lr. Without it the first steps mostly sharpen
    the starting policy's sampling (its entropy fell from 2.6 to 1.4 nats a token in 3 steps at 5e-5)."""
    ppo_beta: float = Field(0.05, ge=0)
    """KL penalty coefficient (fixed), in the reward, k1 estimator."""
    missing_eos_penalty: OffOrFloat = Field(None, ge=0)
    """PPO's penalty for an answer cut at --max-new-tokens; off (none) by default here: at 24 tokens most answers
    are cut, and the penalty taught the policy to stop early rather than to answer better (a 0.11 -> 0.69 end rate,
    with no gain in the reward model's score, in the run before it was turned off)."""
    compare_samples: int = Field(1, gt=0)
    """Sampled answers per held-out prompt and policy in the comparison."""
    refresh_every: int | None = Field(None, gt=0)
    """Refresh the reward model every N PPO steps: label the current policy's completions, train the reward model
    on old plus new pairs from where it is (--init-from), hot-reload it into the running server, and continue."""
    refresh_prompts: int = Field(16, gt=1)
    """Prompts labelled at each refresh."""
    device: str = "auto"
    """auto, cpu or cuda:N."""
    seed: int = 0
    """Seed of every stage."""


class BenchConfig(_Settings):
    part: CliPositionalArg[Literal["serve", "train", "ppo", "all"]]
    """What to measure: serve (anchors, the scoring core, the server over HTTP and gRPC), train (ours against TRL's
    RewardTrainer), ppo (rollouts and updates against the server), or all three."""
    out: str
    """Folder for bench.json (every figure, the machine, the versions, the flags) and bench.md (the tables)."""
    shapes: CommaList = ["135M", "1B"]
    """Random-weight Llama shapes to build and measure: tiny, 135M, 1B, 8B (ignored with --model)."""
    model: str | None = None
    """Measure this real checkpoint instead of shapes (a reward model, or a causal LM/encoder that gets a fresh head;
    `smollm2` for the embedded one)."""
    tokenizer: str = "smollm2"
    """Tokenizer folder the shapes use (its vocabulary sizes them); `smollm2` for the embedded SmolLM2's."""
    budget_s: float = Field(240.0, gt=0)
    """Seconds for optional repetitions; every row always gets a warm-up and two timed passes."""
    peer: bool = True
    """Also run the peer (TRL's RewardTrainer) in the train part."""
    workload: Literal["W", "G"] = "W"
    """serve: W, 512 sequences of log-normal lengths with no shared prefixes; or G, 64 prompts of W-like length with
    8 responses each (a group a request), which shared prefixes serve (see docs/benchmarks.md)."""
    groups: int | None = Field(None, gt=0, le=64)
    """Groups of workload G to use (its first N). Default: all 64 on a GPU, 8 on a CPU."""
    sequences: int | None = Field(None, gt=0, le=512)
    """Sequences of workload W to use (its first N). Default: all 512 on a GPU (the reference figures), 64 on a
    CPU."""
    stand_in_forward_us: float | None = Field(None, gt=0)
    """serve only: replace the model's forward by a stand-in that waits this many microseconds per padded token
    (5 is the H200's 1B figure), to measure the serving path's own overhead on a machine without a GPU."""
    data_dir: str = "../shared/data"
    """Folder holding pandalm/pairs.jsonl for the train part (a synthetic set of the same size when absent), and
    hh-rlhf-harmless/pairs.jsonl for its shared-prompt rows (skipped when absent)."""
    train_pairs: int | None = Field(None, gt=0)
    """Use at most this many pairs in the train part. Default: all on a GPU, 160 on a CPU."""
    ppo_rollouts: int | None = Field(None, gt=0)
    """Rollouts per PPO step in the ppo part. Default: 64 on a GPU (the reference), 16 on a CPU."""
    ppo_new_tokens: int | None = Field(None, gt=0)
    """New tokens per rollout in the ppo part. Default: 128 on a GPU (the reference), 32 on a CPU."""
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce++"] = "gae"
    """The ppo part's estimator (as `rewardserve ppo --advantage-estimator`)."""
    samples_per_prompt: int = Field(1, gt=0)
    """The ppo part's group size (as `rewardserve ppo --samples-per-prompt`; must divide the rollouts)."""
    sharding: Literal["ddp", "fsdp"] = "ddp"
    """The ppo part's sharding (as `rewardserve ppo --sharding`); fsdp runs with a world size of 1 here, beside ddp."""
    train_max_length: int = Field(1024, gt=8)
    """Sequence length of both trainers."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda:N."""
    cache: str | None = None
    """Folder where built shapes are kept (default: the rewardserve cache)."""
