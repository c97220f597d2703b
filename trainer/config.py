"""Settings of the tools that compose the jobs: `rewardserve compare`, `best-of-n` and `demo`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from .settings import CommaList, CommandSettings, OffOrFloat


class BestOfNConfig(CommandSettings):
    data: str = "builtin:arithmetic-steps-best-of-4"
    """JSON Lines of {"prompt", "responses": [...]} (each response a text, or a list of steps for a process reward
    model), optionally "correct": [bool, ...] to measure the pick; `builtin:arithmetic-steps-best-of-4` is the
    shipped set (200 problems, 4 worked answers each, one right)."""
    reward_url: CommaList
    """Reward server URL(s), http(s):// or grpc(s)://."""
    reward_model: str | None = None
    """The server's model that ranks (a process reward model ranks by its --step-aggregate); default: its default."""
    reward_combination: str | None = None
    """... or one of its combinations."""
    reward_api_key: SecretStr | None = None
    """API key of the reward server."""
    reward_timeout: float = Field(120.0, gt=0)
    """Seconds to wait for one scoring answer before retrying."""
    out: str = "runs/best-of-n.jsonl"
    """Each problem with its responses' rewards and the one picked."""

    @model_validator(mode="after")
    def _one_target(self) -> "BestOfNConfig":
        if self.reward_model and self.reward_combination:
            raise ValueError("give --reward-model or --reward-combination, not both")
        return self


class CompareConfig(CommandSettings):
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


class DemoConfig(CommandSettings):
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
