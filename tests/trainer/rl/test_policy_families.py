"""The trainer's log-probs are those of the distribution it sampled, for each causal-LM family: the logits come from
the model's own forward (Gemma 2's final softcap, Granite's logits_scaling, Cohere's logit_scale), sliding windows
stay on, and the draw is exactly the softmax."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from rewardserve.trainer.rl.generation import RolloutEngine, Sampling, sample_next
from rewardserve.trainer.rl.estimators import gather_logprobs
from rewardserve.trainer.prompts import end_of_turn_ids, response_mask_until_eos
from rewardserve.trainer.rl.rollout import ActorCritic, generate_rollout

from ...conftest import build_tiny_policy

DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=256, initializer_range=0.5)


def families(vocab: int, pad: int) -> dict:
    common = dict(vocab_size=vocab, pad_token_id=pad, **DECODER)
    return {
        "llama": tf.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": tf.Qwen2Config(num_key_value_heads=2, **common),
        "mistral-window-16": tf.MistralConfig(num_key_value_heads=2, sliding_window=16, **common),
        "gemma2": tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=16, final_logit_softcapping=2.0,
                                  **common),
        "granite": tf.GraniteConfig(num_key_value_heads=2, logits_scaling=8.0, **common),
        "cohere": tf.CohereConfig(num_key_value_heads=2, logit_scale=0.0625, **common),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, vocab_size=vocab, pad_token_id=pad,
                              initializer_range=0.5),
    }


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, smol_tokenizer):
    return AutoModelForCausalLM.from_pretrained(build_tiny_policy(tmp_path_factory.mktemp("policy"), smol_tokenizer)
                                                ).eval()


PROMPTS = ["Say something about the weather in a long and winding sentence, please.", "Hi", "Count to twenty."]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-window-16", "gemma2", "granite", "cohere", "gpt2"])
def test_recorded_logprobs_are_the_sampled_distribution_and_step_0_kl_is_zero(smol_tokenizer, family):
    """Against a copy of itself the KL is 0 at step 0; the recorded log-probs equal those of the model's own forward
    of each sequence alone, unpadded (what the engine sampled from), at a temperature of 0.7. Sequences reach 60
    tokens, well past the 16-token sliding windows."""
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(families(len(smol_tokenizer), smol_tokenizer.pad_token_id)[family]).eval()
    engine = RolloutEngine(policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id)
    rollout, _ = generate_rollout(ActorCritic(policy), copy.deepcopy(policy), engine, smol_tokenizer, PROMPTS,
                                  Sampling(40, temperature=0.7), 64, torch.device("cpu"), forward_tokens=4096)
    mask = rollout.response_mask.bool()
    assert (rollout.old_logprobs - rollout.ref_logprobs)[mask].abs().max() < 1e-5  # KL exactly 0 against a copy
    assert rollout.input_ids.shape[1] >= 60
    width = rollout.prompt_width
    for row in range(len(PROMPTS)):
        real = rollout.attention_mask[row].bool()
        ids = rollout.input_ids[row][real][None]  # the sequence alone, no padding
        prompt = int(real[:width].sum())
        with torch.no_grad():
            logits = policy(ids).logits[:, prompt - 1:-1]
        own = gather_logprobs(logits, ids[:, prompt:], temperature=0.7)[0]
        recorded = rollout.old_logprobs[row][mask[row]]
        assert torch.allclose(recorded, own[:len(recorded)], atol=1e-5), family


def test_the_draw_follows_the_softmax_on_a_small_vocabulary():
    """200,000 Gumbel-max draws from five tokens against their softmax probabilities (chi-square, 4 degrees of
    freedom: 18.5 is its 0.999 quantile)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    torch.manual_seed(0)
    draws = sample_next(logits[None].expand(200_000, -1), Sampling(1))
    observed = torch.bincount(draws, minlength=5).double()
    expected = logits.double().softmax(-1) * len(draws)
    assert float(((observed - expected) ** 2 / expected).sum()) < 18.5


@pytest.mark.slow  # 13 s of float64 noise over 40,000 tokens
def test_the_draw_reaches_the_far_tail_after_a_large_mass():
    """A token of probability 1 - 1e-3 followed by 40,000 tokens of 2.5e-8 each, below half the float32 resolution
    near 1, where a cumulative sum cannot tell them apart: the tail is drawn about as often as its mass says (8 of
    8,000). Float32 uniforms would cap the Gumbel noise at 16.6 and starve it; the noise is drawn in float64."""
    tail, each = 40_000, 2.5e-8
    probabilities = torch.full((tail + 1,), each, dtype=torch.float64)
    probabilities[0] = 1 - tail * each
    logits = probabilities.log().float()[None].expand(1000, -1)
    torch.manual_seed(0)
    draws = torch.cat([sample_next(logits, Sampling(1)) for _ in range(8)])
    assert 1 <= int((draws > 0).sum()) <= 24, int((draws > 0).sum())


def test_every_end_of_turn_token_ends_a_response(tiny_policy, smol_tokenizer):
    """Llama 3 and Qwen2.5 end a turn with a token of generation_config.eos_token_id other than the tokenizer's
    EOS: the engine stops a row there, and the response mask ends there."""
    prompt = smol_tokenizer(["Hello there"], return_tensors="pt")
    greedy = Sampling(6, temperature=0)
    engine = RolloutEngine(tiny_policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id)
    free = engine.generate(prompt["input_ids"], prompt["attention_mask"], greedy).responses[0]
    stop = int(free[2])
    assert stop not in free[:2].tolist() and stop != smol_tokenizer.eos_token_id
    policy = copy.deepcopy(tiny_policy)
    policy.generation_config.eos_token_id = [smol_tokenizer.eos_token_id, stop]
    ends = end_of_turn_ids(policy, smol_tokenizer)
    assert ends == sorted({smol_tokenizer.eos_token_id, stop})
    stopped = RolloutEngine(policy, ends, smol_tokenizer.pad_token_id).generate(
        prompt["input_ids"], prompt["attention_mask"], greedy).responses
    assert stopped[0].tolist() == free[:3].tolist()  # the columns after the stop were padding, and were cut
    mask, reached = response_mask_until_eos(torch.cat([stopped, stopped], dim=1), ends)
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0] and bool(reached[0])
