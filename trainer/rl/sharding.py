"""`--sharding fsdp`: policies larger than one GPU, on PyTorch's own sharding (FSDP2, `fully_shard`) under torchrun.

- Each decoder layer of the policy (and of a separate critic) is its own FSDP group, and the `ActorCritic` root
  holds the rest (embeddings, final norm, LM head, value head): every rank keeps 1/world of the parameters, of their
  gradients and of AdamW's state. On CUDA, the decoder layers compute in bf16, the embeddings, final norm, LM head
  and value head in fp32, and gradients are reduced in fp32 (`precision_policies`); on the CPU everything is fp32.
- The reference is sharded the same way (a frozen copy); with LoRA it is the policy's own base and costs nothing.
- Generation needs whole layers. The policy and the reference are gathered once for the whole rollout phase
  (sampling, then the log-prob, reference and value forwards) and resharded after it. Gathering layer by layer at
  every decode step would make each forward a collective, and ranks sample different numbers of decode steps (each
  stops at its own EOS) and read their rollouts in different numbers of chunks; gathered once, the rollout phase
  does no collective at all, at the cost of both models' full parameters while it lasts.
- Checkpoints go through `torch.distributed.checkpoint`: every rank writes its own shards. The final policy is
  gathered to rank 0 and written as a plain Hugging Face folder.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the modules whose class transformers lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def precision_policies(compute_dtype: torch.dtype | None):
    """FSDP2's mixed precision for (the decoder layers, the roots). The layers gather their weights in
    `compute_dtype` and compute in it, their outputs cast back to fp32 (so the final norm, and the LM head that
    turns it into log-probs, read fp32); the roots (embeddings, final norm, LM head, value head) keep fp32: logits
    read from a bf16 LM head were 0.024 nats a token off on SmolLM2, 0.09 at worst. Gradients reduce in fp32.
    None: everything fp32 (the CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is None:
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    layers = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    return layers, MixedPrecisionPolicy(reduce_dtype=torch.float32)


def shard(model: nn.Module, reference: nn.Module | None, device: torch.device,
          compute_dtype: torch.dtype | None = None) -> None:
    """fully_shard on every decoder layer of the policy, the critic trunk and the reference, then on the roots;
    the layers compute in `compute_dtype` (bf16 on CUDA), the roots in fp32 (`precision_policies`)."""
    from torch.distributed.fsdp import fully_shard

    layer_precision, root_precision = precision_policies(compute_dtype)
    # the shards are the fp32 master weights (FSDP wants one dtype per group, and a bf16 checkpoint's value head is
    # fp32)
    model.float()
    if reference is not None:
        reference.float()
    policy_layers = decoder_layers(model.policy)
    if not policy_layers:
        raise SystemExit(f"--sharding fsdp: {type(model.policy).__name__} names no decoder layer class"
                         " (`_no_split_modules`) to shard by")
    for layer in policy_layers + (decoder_layers(model.critic_trunk) if model.critic_trunk is not None else []):
        fully_shard(layer, mp_policy=layer_precision)
    fully_shard(model, mp_policy=root_precision)
    roots = [lambda ids: model(ids, torch.ones_like(ids), 1)]
    if reference is not None and list(reference.parameters()):  # LoRA's reference is the policy's own base
        for layer in decoder_layers(reference):
            fully_shard(layer, mp_policy=layer_precision)
        fully_shard(reference, mp_policy=root_precision)
        roots.append(lambda ids: reference(input_ids=ids))
    # FSDP sets itself up at the first forward through each root, and the rollout engine calls the policy below
    # its root: that first forward is made here, on two tokens, by every rank alike
    with torch.no_grad():
        for forward in roots:
            forward(torch.ones(1, 2, dtype=torch.long, device=device))
    for module in _fsdp_modules(model, reference):
        module.reshard()  # a root keeps its parameters whole after a forward, for the backward that usually follows


def _fsdp_modules(*roots: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [module for root in roots if root is not None for module in root.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(*roots: nn.Module):
    """The whole parameters of these sharded models, held from entry to exit (one all-gather each, in the same
    order on every rank) so that forwards within do no collective. Without FSDP, nothing."""
    modules = _fsdp_modules(*roots)
    for module in modules:
        module.set_reshard_after_forward(False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True)


def local_numel(parameter: torch.Tensor) -> int:
    """Elements this rank holds: its shard of a sharded (DTensor) parameter, all of a plain one."""
    return parameter.to_local().numel() if hasattr(parameter, "to_local") else parameter.numel()


def held_bytes(model: nn.Module, reference: nn.Module | None, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds, in bytes: parameters, gradients (one per trained parameter, in its dtype), AdamW's
    two moments (fp32) and the reference's parameters."""
    def size(parameters) -> int:
        return sum(local_numel(p) * p.element_size() for p in parameters)

    trained = [p for group in optimizer.param_groups for p in group["params"]]
    return {"parameters": size(model.parameters()), "gradients": size(trained),
            "optimizer": sum(2 * 4 * local_numel(p) for p in trained),
            "reference": size(reference.parameters()) if reference is not None else 0}


def describe_held(held: dict[str, int], rank: int, world_size: int, sharding: str) -> str:
    mib = {name: f"{value / 2**20:,.1f} MiB" for name, value in held.items()}
    return (f"rank {rank}/{world_size} holds ({sharding}): parameters {mib['parameters']}, gradients"
            f" {mib['gradients']}, AdamW state {mib['optimizer']}, reference {mib['reference']}")


# -- checkpoints ----------------------------------------------------------------------------------------------------
def save_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and the optimiser into `folder` (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Reads `save_shards`' folder back into the sharded model and optimiser (the world size it was written at, or
    another: torch.distributed.checkpoint reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_policy_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The policy's whole state dict on the CPU of rank 0 (None elsewhere), named as the policy names it; every
    rank must call this. Without FSDP, the policy's own."""
    if not _fsdp_modules(model):
        return model.policy.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return {key.removeprefix("policy."): value for key, value in state.items() if key.startswith("policy.")}
