"""Settings of `rewardserve ppo`: the RL loop (PPO, GRPO, RLOO, REINFORCE++) against a reward server."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from rewardserve.server.steps import Separator

from ..settings import CommaList, OffOrFloat, CommandSettings, check_report_to


class PPOConfig(CommandSettings):
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
    reward_granularity: Literal["outcome", "step"] = "outcome"
    """outcome: one reward per response, at its last token. step: dense rewards from a process reward model
    (--step-reward-model): each response is split into steps at --step-separator, and each step's reward, its
    P(right) - 0.5, is placed at the step's last token; --reward-model, if given, adds an outcome reward at the last
    token. For gae and reinforce++ (grpo and rloo baseline one score per response)."""
    step_reward_model: str | None = None
    """--reward-granularity step: the server's process reward model (`rewardserve serve --prm NAME=DIR`)."""
    step_separator: Separator = "\n"
    """--reward-granularity step: where a response is split into steps; the server's --step-separator (checked at
    start). `\\n` and `\\t` are read as escapes."""
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
    """JSON Lines of {"prompt": str} or {"messages": [...]}, each with an optional `reference` (the right answer, sent
    with its responses for a verifier); `builtin` for the project's own prompt set, `builtin:arithmetic` for its
    checkable sums."""
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
    def _step_rewards(self) -> "PPOConfig":
        if self.reward_granularity == "outcome":
            if self.step_reward_model is not None:
                raise ValueError("--step-reward-model gives dense step rewards: add --reward-granularity step")
            return self
        if self.step_reward_model is None:
            raise ValueError("--reward-granularity step needs --step-reward-model NAME, the server's process reward"
                             " model (`rewardserve serve --prm NAME=DIR`)")
        if self.advantage_estimator in ("grpo", "rloo"):
            raise ValueError(f"--reward-granularity step with --advantage-estimator {self.advantage_estimator}: it"
                             " baselines one score per response; use gae or reinforce++, which take a reward at every"
                             " token")
        if self.reward_combination is not None or (self.reward_model and len(self.reward_model) > 1):
            raise ValueError("--reward-granularity step: the outcome reward is one model (--reward-model NAME) or"
                             " none; a combination or several models are not taken")
        if not self.step_separator:
            raise ValueError("--step-separator is empty; give the text between steps (default: a newline)")
        return self

    @property
    def outcome_model(self) -> str | None:
        """With step rewards, the model whose reward goes on the last token (None: the step rewards alone)."""
        return self.reward_model[0] if self.reward_model else None

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
