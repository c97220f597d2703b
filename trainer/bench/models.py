"""The models a benchmark runs: random-weight Llama checkpoints of named shapes (built once, cached, then loaded
like any checkpoint; a forward's speed does not depend on the weights' values), or a real checkpoint (`--model`).

Each shape gives a causal LM (the PPO policy, and the base reward-model training starts from) and a reward model
(a one-label sequence classifier) on the same trunk shape, both saved with the tokenizer.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardserve.server.embedded import cache_dir, resolve_model_path

from .common import SHAPES


@dataclass(frozen=True)
class BenchModels:
    name: str  # the shape, or the --model path
    policy: Path  # causal LM: PPO's policy and the base of reward-model training
    reward: Path  # reward checkpoint the server loads
    random_weights: bool


def load_bench_tokenizer(spec: str):
    """The tokenizer every shape uses (`smollm2`: the embedded SmolLM2's), with a pad token distinct from EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for token in ("<|endoftext|>", "<pad>", "[PAD]", tokenizer.unk_token):
            if token and token in tokenizer.get_vocab() and token != tokenizer.eos_token:
                tokenizer.pad_token = token
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def shape_models(shape: str, tokenizer_spec: str, device: torch.device, cache: Path | None = None) -> BenchModels:
    """Builds (once) and returns the random-weight policy and reward checkpoints of a named shape."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; the shapes are {', '.join(SHAPES)}")
    tokenizer = load_bench_tokenizer(tokenizer_spec)
    key = hashlib.sha256(f"{shape}|{len(tokenizer)}|{tokenizer.pad_token_id}|{tokenizer.eos_token_id}".encode())
    folder = (cache or cache_dir() / "bench") / f"{shape}-{key.hexdigest()[:10]}"
    if not (folder / "reward" / "config.json").is_file():
        _build_shape(shape, tokenizer, folder, device)
    return BenchModels(shape, folder / "policy", folder / "reward", random_weights=True)


def _build_shape(shape: str, tokenizer, folder: Path, device: torch.device) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer), max_position_embeddings=8192,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, num_labels=1)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    build_device = device if device.type == "cuda" else torch.device("cpu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: an 8B model in fp32 is 32 GB
    try:
        for name, cls in (("policy", LlamaForCausalLM), ("reward", LlamaForSequenceClassification)):
            torch.manual_seed(0)
            with build_device:
                model = cls(config)
            model.save_pretrained(staging / name, safe_serialization=True)
            tokenizer.save_pretrained(staging / name)
            del model
    finally:
        torch.set_default_dtype(previous)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)


def real_models(spec: str, device: torch.device, cache: Path | None = None) -> BenchModels:
    """A real checkpoint: a reward model is served as it is; a causal LM or encoder gets a fresh (seeded) reward head
    for serving, and is itself the policy and the training base."""
    from transformers import AutoConfig

    path = Path(resolve_model_path(spec))
    config = AutoConfig.from_pretrained(path)
    is_reward = getattr(config, "num_labels", 0) == 1 and any("ForSequenceClassification" in a
                                                               for a in (config.architectures or []))
    if is_reward:
        return BenchModels(str(spec), path, path, random_weights=False)
    from rewardserve.server.modeling import init_reward_model_from_base, save_reward_model


    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    reward = (cache or cache_dir() / "bench") / f"reward-head-{path.name}-{key}"
    if not (reward / "config.json").is_file():
        torch.manual_seed(0)
        save_reward_model(init_reward_model_from_base(path), load_bench_tokenizer(str(path)), reward, None)
    return BenchModels(str(spec), path, reward, random_weights=False)


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters that do matmul work per token: all but the token embeddings (and a tied LM head)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
