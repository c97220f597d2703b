"""LoRA: only the adapters are trained and held by the optimiser (peft's count), the reference is the base with the
adapters off (exactly, with no second copy), and --merge-lora writes a plain model equal to adapters + base."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rewardserve.trainer.rl.config import PPOConfig
from rewardserve.trainer.rl.lora import merged_copy
from rewardserve.trainer.rl.ppo import build_models, holdings, save_policy
from rewardserve.trainer.prompts import encode_prompt, pad_left
from rewardserve.trainer.rl.rollout import response_logits

from ...conftest import build_tiny_policy
from .test_shared_prompts import close

pytest.importorskip("peft")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, smol_tokenizer):
    """A tiny policy with rank-8 adapters, made non-zero so that adapted and base differ."""
    policy = build_tiny_policy(tmp_path_factory.mktemp("policy"), smol_tokenizer)
    config = PPOConfig(reward_url=["http://127.0.0.1:9"], policy=str(policy), lora_rank=8,
                       advantage_estimator="rloo", samples_per_prompt=2)
    tokenizer, model, reference, _engine = build_models(config, CPU)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    ids, mask = pad_left([encode_prompt(tokenizer, p, 64) for p in ("Hi", "Tell me about the sea")],
                         tokenizer.pad_token_id)
    return policy, config, model.eval(), reference, (ids, mask)


def test_only_the_adapters_are_trained_and_counted_as_peft_counts_them(lora_run):
    _policy, _config, model, reference, _batch = lora_run
    trainable, total = model.adapters.get_nb_trainable_parameters()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == trainable and 0 < trainable < total / 10
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trained)
    said = holdings(model, reference, optimizer)
    assert f"LoRA adapters: {trainable:,} trainable of {total:,} (peft's count)" in said
    assert f"AdamW over {trainable:,} parameters" in said and "adapters off (no copy)" in said
    assert not list(reference.parameters())  # no second copy of the weights


def test_the_reference_is_the_base_model_exactly(lora_run):
    policy, _config, model, reference, (ids, mask) = lora_run
    base = AutoModelForCausalLM.from_pretrained(policy).eval()
    with torch.no_grad():
        ours = response_logits(reference, ids, mask, prompt_width=2)
        theirs = response_logits(base, ids, mask, prompt_width=2)
        adapted = response_logits(model.policy, ids, mask, prompt_width=2)
    assert torch.equal(ours, theirs)
    assert (adapted - theirs).abs().max() > 1e-2  # the adapters are on for the policy itself


def test_the_merged_model_loads_plainly_and_equals_adapters_plus_base(lora_run, tmp_path, smol_tokenizer):
    _policy, _config, model, _reference, (ids, mask) = lora_run
    merged_copy(model.adapters).save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        adapted = response_logits(model.policy, ids, mask, prompt_width=2)
        merged = response_logits(plain, ids, mask, prompt_width=2)
    assert close(adapted, merged)  # within 1e-5 of the logits' scale: merging sums the same terms in another order
    assert any("lora_" in name for name, _ in model.policy.named_parameters())  # the running policy kept them
    save_policy(tmp_path / "adapter", model, smol_tokenizer)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
