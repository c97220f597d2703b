"""Settings of `rewardserve bench`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import CliPositionalArg

from ..settings import CommaList, CommandSettings


class BenchConfig(CommandSettings):
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
