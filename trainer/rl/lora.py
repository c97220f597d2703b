"""LoRA through peft: the policy trains low-rank adapters on its projections and nothing else, and the reference is
the same base read with the adapters switched off, so no second copy of the model is held.

peft injects the adapters into the policy's own modules: the policy keeps its class and forward (generation, the
packed forward, every family's logit handling are unchanged), and `disable_adapter()` gives back the base exactly.
"""
from __future__ import annotations

from torch import nn


def attach_adapters(policy: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]):
    """Injects LoRA adapters of `rank` into `policy`'s `targets` (every other weight frozen); returns the PeftModel
    around it. The adapters start at zero (peft's B = 0), so the adapted policy starts as the base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(policy, config)
    except ValueError as error:  # no module matched: say which names there are
        names = sorted({name.rsplit(".", 1)[-1] for name, module in policy.named_modules()
                        if isinstance(module, nn.Linear)})
        raise SystemExit(f"--lora-target-modules {','.join(targets)}: {error}; this policy's linear layers are"
                         f" named {', '.join(names)}") from None


class AdaptersOff(nn.Module):
    """The reference for a LoRA policy: its base model, read with the adapters switched off. Holds no weights of its
    own (the PeftModel is kept outside the module tree, so freezing or moving this never touches the adapters)."""

    def __init__(self, adapted):
        super().__init__()
        object.__setattr__(self, "adapted", adapted)

    @property
    def config(self):
        return self.adapted.get_base_model().config

    def forward(self, **kwargs):
        with self.adapted.disable_adapter():
            return self.adapted.get_base_model()(**kwargs)


def trainable_parameters(adapted) -> tuple[int, int]:
    """(trainable, all) parameters of the adapted policy, as peft counts them."""
    return adapted.get_nb_trainable_parameters()


def merged_copy(adapted) -> nn.Module:
    """A plain model with the adapters merged into the base's weights, made from a copy so that the running policy
    keeps its adapters (what --merge-lora saves)."""
    import copy

    return copy.deepcopy(adapted).merge_and_unload()
