"""The GPU half's dtypes and process groups, proven on the CPU: host collectives under a CUDA process group's
backend map, fp32 master weights from a bf16 checkpoint, and FSDP's bf16 compute with an fp32 LM head."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rewardserve.trainer.rl.distributed import Ranks, group_backend

from ...conftest import build_tiny_policy


@pytest.fixture
def group_of_one():
    """A one-process group with the given backend string; torn down after."""
    def start(backend: str) -> None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def test_the_host_collectives_run_under_the_gpu_process_groups_backend_map(group_of_one):
    """On GPUs the group maps CUDA to NCCL and, since the loop all-reduces host values (metrics, counts), the CPU
    to gloo: with NCCL alone, `Ranks.mean` raised 'No backend type associated with device type cpu' at step 1.
    The same device map, with gloo standing in for NCCL (which needs a GPU), runs every host collective here."""
    devices = dict(part.split(":") for part in group_backend(cuda=True).split(","))
    assert devices == {"cpu": "gloo", "cuda": "nccl"}
    group_of_one(",".join(f"{device}:gloo" for device in devices))
    ranks = Ranks(rank=0, world_size=2)  # "active": every method takes its collective path (over a group of one)
    assert ranks.mean({"reward": 3.0}) == {"reward": 1.5}
    assert ranks.total(2.5) == 2.5 and ranks.smallest(7) == 7
    assert ranks.all_true(True) and not ranks.any_true(False)


def test_an_nccl_only_map_is_what_failed(group_of_one):
    """The map the GPU group had before (CUDA only) refuses a host all-reduce: the check above can fail."""
    group_of_one("cuda:gloo")
    with pytest.raises(RuntimeError, match="device type cpu"):
        Ranks(rank=0, world_size=2).mean({"reward": 3.0})


def test_a_bf16_checkpoint_trains_fp32_master_weights(tmp_path, smol_tokenizer):
    """A policy saved in bf16 (most hub policies) is loaded in fp32, policy and reference: one AdamW step at an RL
    learning rate moves nearly every weight (in bf16 storage, 2.8% of them moved; the rest rounded away)."""
    from transformers import AutoModelForCausalLM

    from rewardserve.trainer.rl.config import PPOConfig
    from rewardserve.trainer.rl.ppo import build_models

    folder = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    config = PPOConfig(reward_url="http://127.0.0.1:9", policy=str(folder), batch_size=4, mini_batch_size=2)
    _, model, reference, _ = build_models(config, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    weights = model.policy.get_input_embeddings().weight
    before = weights.detach().clone()
    optimizer = torch.optim.AdamW([weights], lr=3e-6)
    weights.grad = torch.randn_like(weights)
    optimizer.step()
    assert (weights.detach() != before).float().mean() > 0.99


def test_fsdp_computes_the_layers_in_bf16_and_the_lm_head_in_fp32(tmp_path, smol_tokenizer, group_of_one):
    """FSDP2 with the GPU's mixed precision, on a group of one here: the decoder layers compute in bf16, the logits
    come from an fp32 LM head on fp32 inputs (before, the whole root computed in bf16: head input and weight)."""
    from transformers import AutoModelForCausalLM

    from rewardserve.trainer.rl.estimators import gather_logprobs
    from rewardserve.trainer.rl.rollout import ActorCritic
    from rewardserve.trainer.rl.sharding import shard

    folder = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    reference_model = ActorCritic(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    sharded = ActorCritic(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    group_of_one("gloo")
    shard(sharded, None, torch.device("cpu"), torch.bfloat16)
    seen = {}
    layer = sharded.policy.model.layers[0].self_attn.q_proj
    head = sharded.policy.lm_head
    def record(name):
        def hook(module, args, output) -> None:  # None: the output goes on unchanged
            seen.setdefault(name, (args[0].dtype, output.dtype))
        return hook

    layer.register_forward_hook(record("layer"))
    head.register_forward_hook(record("head"))
    ids = torch.randint(5, 1000, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits, values = sharded(ids, mask, 4)
        expected, _ = reference_model(ids, mask, 4)
    assert seen["layer"] == (torch.bfloat16, torch.bfloat16)
    assert seen["head"] == (torch.float32, torch.float32) and logits.dtype == torch.float32
    assert values.dtype == torch.float32
    # how near the fp32 model's log-probs come is the bf16 trunk's rounding: measured on SmolLM2 by make test-gpu
    assert torch.isfinite(gather_logprobs(logits, ids[:, 4:]) - gather_logprobs(expected, ids[:, 4:])).all()
