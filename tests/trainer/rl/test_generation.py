"""The rollout engine: the same tokens as transformers' generate when greedy, the documented sampling rules on
known logits, EOS and padding, and one forward per decode step for the whole rollout batch."""
from __future__ import annotations

import copy

import pytest
import torch

from rewardserve.trainer.rl.generation import RolloutEngine, Sampling, sample_next, top_p_filter
from rewardserve.trainer.prompts import encode_prompt, pad_left, response_mask_until_eos
from rewardserve.trainer.rl.rollout import ActorCritic, generate_rollout

from ...conftest import build_tiny_policy

PROMPTS = ["Hi", "What is the capital of France? Answer in one word.", "a", "Tell me a story about a dog."]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    folder = build_tiny_policy(tmp_path_factory.mktemp("policy"), smol_tokenizer)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def prompts_batch(tokenizer, prompts=PROMPTS, multiple_of=1):
    return pad_left([encode_prompt(tokenizer, p, 128) for p in prompts], tokenizer.pad_token_id, multiple_of)


def transformers_greedy(model, tokenizer, ids, mask, new_tokens):
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("multiple_of", [1, 16])
def test_greedy_tokens_equal_transformers_generate_on_a_tiny_model(tiny_policy, smol_tokenizer, multiple_of):
    ids, mask = prompts_batch(smol_tokenizer, multiple_of=multiple_of)
    engine = RolloutEngine(tiny_policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id)
    ours = engine.generate(ids, mask, Sampling(24, temperature=0)).responses
    theirs = transformers_greedy(tiny_policy, smol_tokenizer, ids, mask, 24)
    assert ours.tolist() == theirs.tolist()


def test_greedy_tokens_equal_transformers_generate_on_smollm2(smollm2_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    ids, mask = prompts_batch(smol_tokenizer, PROMPTS[:2])
    engine = RolloutEngine(model, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id)
    ours = engine.generate(ids, mask, Sampling(12, temperature=0)).responses
    assert ours.tolist() == transformers_greedy(model, smol_tokenizer, ids, mask, 12).tolist()
    assert "Paris" in smol_tokenizer.decode(ours[1])


def test_eos_ends_a_row_with_padding_and_the_loop_stops_once_every_row_has_ended(tiny_policy, smol_tokenizer):
    ids, mask = prompts_batch(smol_tokenizer)
    free = RolloutEngine(tiny_policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id)
    greedy = free.generate(ids, mask, Sampling(24, temperature=0)).responses
    eos = int(greedy[0, 2])  # pretend row 0's third token is EOS
    engine = RolloutEngine(tiny_policy, eos, smol_tokenizer.pad_token_id, check_every=4)
    result = engine.generate(ids, mask, Sampling(24, temperature=0))
    for row, expected in zip(result.responses, greedy):
        hits = (expected == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else len(expected)
        assert row[:end].tolist() == expected[:end].tolist()
        assert (row[end:] == smol_tokenizer.pad_token_id).all()
    response_mask, reached = response_mask_until_eos(result.responses, eos)
    assert bool(reached[0]) and response_mask[0].tolist()[:4] == [1, 1, 1, 0]
    alone = engine.generate(ids[:1], mask[:1], Sampling(24, temperature=0))
    # EOS at step 3, seen at the check after step 4: the prefill and 3 decode forwards, 3 columns kept
    assert alone.decode_steps == 4 and alone.responses.tolist() == [greedy[0, :3].tolist()]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).tolist() == [[True, True, True]]


def draw(logits: torch.Tensor, sampling: Sampling, count: int = 40000) -> torch.Tensor:
    torch.manual_seed(0)
    tokens = sample_next(logits.expand(count, -1), sampling)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / count


def test_sampling_follows_the_temperature_scaled_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert draw(logits, Sampling(1)).tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.01)
    at_half = torch.tensor([0.25, 0.09, 0.04]) / 0.38  # p^(1/T) renormalised, T = 0.5
    assert draw(logits, Sampling(1, temperature=0.5)).tolist() == pytest.approx(at_half.tolist(), abs=0.01)
    assert draw(logits, Sampling(1, top_p=0.7)).tolist() == pytest.approx([0.625, 0.375, 0.0], abs=0.01)
    assert draw(logits, Sampling(1, temperature=0), count=10).tolist() == [1.0, 0.0, 0.0]


def test_a_rollout_batch_of_64_costs_max_new_tokens_policy_forwards(tiny_policy, smol_tokenizer):
    """Today's engine: one batched generation; the old default ran 8 chunks of 8, each its own decode loop."""
    engine = RolloutEngine(tiny_policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id)
    model, reference = ActorCritic(tiny_policy), copy.deepcopy(tiny_policy)
    calls, sampling_calls = [], []
    generate = engine.generate

    def counted_generate(*args, **kwargs):  # the policy's forwards while sampling (the log-probs' come after)
        before = len(calls)
        generated = generate(*args, **kwargs)
        sampling_calls.append(len(calls) - before)
        return generated

    engine.generate = counted_generate
    hook = tiny_policy.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
        rollout, stats = generate_rollout(model, reference, engine, smol_tokenizer, prompts, Sampling(16), 128,
                                          torch.device("cpu"), forward_tokens=4096)
    finally:
        hook.remove()
    calls = calls[:sampling_calls[0]]
    assert len(sampling_calls) == 1 and stats.decode_steps == len(calls)
    reached_eos_everywhere = bool(rollout.reached_eos.all())
    assert len(calls) == 16 or reached_eos_everywhere
    assert rollout.old_logprobs.shape == rollout.ref_logprobs.shape == (64, rollout.response_mask.shape[1])
    # the reference is a copy of the policy here: the two log-probs agree token for token
    assert torch.allclose(rollout.old_logprobs, rollout.ref_logprobs, atol=1e-5)


def counting_backend(graphs: list):
    def backend(graph, example_inputs):
        graphs.append(len(example_inputs))
        return graph.forward
    return backend


def test_the_compiled_decode_step_compiles_once_per_width_class_and_equals_eager(tiny_policy, smol_tokenizer):
    """Prompts of eight widths (with dynamic=False, eight graphs, and dynamo's limit: the ninth would decode eagerly
    in silence) are padded on the left to a cache width of a power of two: two graphs, each width's greedy tokens
    equal to the eager engine's, and `path` says compiled."""
    torch._dynamo.reset()
    graphs = []
    compiled = RolloutEngine(tiny_policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id,
                             compile_decode=True, compile_backend=counting_backend(graphs))
    eager = RolloutEngine(tiny_policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id)
    for extra in range(8):
        ids, mask = prompts_batch(smol_tokenizer, [p + " more" * (4 * extra) for p in PROMPTS[:2]])
        result = compiled.generate(ids, mask, Sampling(6, temperature=0))
        assert result.path == "compiled"
        assert result.responses.tolist() == eager.generate(ids, mask, Sampling(6, temperature=0)).responses.tolist()
    torch._dynamo.reset()
    assert compiled.compiled_graphs == len(graphs) <= 2


def test_past_dynamos_recompile_limit_the_path_says_eager(tiny_policy, smol_tokenizer, monkeypatch, caplog):
    import logging

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    engine = RolloutEngine(tiny_policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id,
                           compile_decode=True, compile_backend=counting_backend([]))
    short = prompts_batch(smol_tokenizer, PROMPTS[:2])
    long = prompts_batch(smol_tokenizer, [p + " more" * 40 for p in PROMPTS[:2]])
    with caplog.at_level(logging.WARNING):
        paths = [engine.generate(*batch, Sampling(4, temperature=0)).path for batch in (short, long, long)]
    torch._dynamo.reset()
    assert paths == ["compiled", "eager", "eager"]
    assert sum("recompile limit" in r.getMessage() for r in caplog.records) == 1


def test_sampling_from_a_bf16_copy_casts_the_weights_once_per_call_not_per_step(tiny_policy, smol_tokenizer):
    """Autocast over fp32 weights casts every Linear weight at every decode step; the engine's bf16 copy is
    refreshed in place once a call, so the casts do not grow with the steps (counted with a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.weight_casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            source = args[0] if args else None
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and \
                    isinstance(source, torch.Tensor) and source.dim() == 2 and source.numel() >= 32 * 32:
                self.weight_casts += 1
            return func(*args, **kwargs)

    engine = RolloutEngine(tiny_policy, smol_tokenizer.eos_token_id, smol_tokenizer.pad_token_id,
                           compute_dtype=torch.bfloat16)
    assert {p.dtype for p in engine._sampler.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in tiny_policy.parameters()} == {torch.float32}
    ids, mask = prompts_batch(smol_tokenizer, PROMPTS[:2])
    counts = []
    for steps in (3, 12):
        with CountCasts() as counter:
            generated = engine.generate(ids, mask, Sampling(steps, temperature=0, ))
        assert generated.decode_steps == steps
        counts.append(counter.weight_casts)
    linear_weights = sum(1 for p in tiny_policy.parameters() if p.dim() == 2 and p.numel() >= 32 * 32)
    assert counts[0] == counts[1] <= linear_weights  # one refresh a call, whatever the steps
    with torch.no_grad():  # the copy follows the policy after an update
        tiny_policy.lm_head.weight.add_(1.0)
        engine.generate(ids, mask, Sampling(1, temperature=0))
        assert torch.equal(engine._sampler.lm_head.weight, tiny_policy.lm_head.weight.to(torch.bfloat16))
        tiny_policy.lm_head.weight.sub_(1.0)
