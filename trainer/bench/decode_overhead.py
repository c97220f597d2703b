"""Decode-step overhead, the CPU proxy for what dominates rollouts on a GPU: the rollout engine (one batched
generation over a static KV cache) against the old default path (transformers' `generate`, dynamic cache, in
chunks of 8 rollouts), side by side in one run, on the same policy and prompts.

    python -m rewardserve.trainer.bench.decode_overhead                          # tiny 2-layer policy, 64 x 64
    python -m rewardserve.trainer.bench.decode_overhead --policy smollm2 --rollouts 16 --new-tokens 32

Prints a table and writes JSON (--out). Tokens/s counts every sampled position (no EOS is forced or avoided).
"""
from __future__ import annotations

import json
import time

import torch
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from rewardserve.server.embedded import resolve_model_path

from ..rl.generation import RolloutEngine, Sampling
from ..prompts import encode_prompt, pad_left
from ..tracking import format_table

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain gradient descent briefly.",
           "Give me three tips for sleeping better."]


class DecodeOverheadConfig(BaseSettings):
    model_config = SettingsConfigDict(cli_kebab_case=True, use_attribute_docstrings=True)

    policy: str = "tiny"
    """`tiny` (2 layers, hidden 32, SmolLM2's vocabulary, random weights), `smollm2`, or a causal LM folder."""
    rollouts: int = 64
    """Rollouts sampled per call."""
    new_tokens: int = 64
    """Tokens sampled per rollout."""
    old_chunk: int = 8
    """Rollouts per `generate` call on the old path (its default --generation-batch-size)."""
    repeats: int = 3
    """Timed repetitions of each path (best kept), after a warm-up."""
    out: str | None = None
    """Write the figures as JSON here."""


def load_policy(spec: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2" if spec == "tiny" else spec))
    if spec != "tiny":
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(spec)).eval(), tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def main(config: DecodeOverheadConfig) -> dict:
    policy, tokenizer = load_policy(config.policy)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(config.rollouts)]
    ids, mask = pad_left([encode_prompt(tokenizer, p, 256) for p in prompts], tokenizer.pad_token_id, 16)
    engine = RolloutEngine(policy, tokenizer.eos_token_id, tokenizer.pad_token_id)

    def new_path() -> tuple[int, int]:
        generated = engine.generate(ids, mask, Sampling(config.new_tokens))
        return generated.decode_steps, generated.responses.numel()

    def old_path() -> tuple[int, int]:
        steps = tokens = 0
        for start in range(0, config.rollouts, config.old_chunk):
            out = policy.generate(input_ids=ids[start:start + config.old_chunk],
                                  attention_mask=mask[start:start + config.old_chunk], do_sample=True, top_k=0,
                                  max_new_tokens=config.new_tokens, pad_token_id=tokenizer.pad_token_id)
            steps += out.shape[1] - ids.shape[1]
            tokens += out[:, ids.shape[1]:].numel()
        return steps, tokens

    figures = {}
    for name, run in (("rollout engine, one batch", new_path), (f"generate, chunks of {config.old_chunk}", old_path)):
        run()
        best = None
        for _ in range(config.repeats):
            began = time.perf_counter()
            steps, tokens = run()
            seconds = time.perf_counter() - began
            if best is None or seconds < best["seconds"]:
                best = {"seconds": seconds, "decode_steps": steps, "tokens": tokens}
        # per decode step of the whole rollout batch: the old path needs rollouts / chunk generate steps for one
        best["ms_per_batch_step"] = 1000 * best["seconds"] / config.new_tokens
        best["tokens_per_s"] = best["tokens"] / best["seconds"]
        figures[name] = best
    new, old = figures.values()
    result = {"policy": config.policy, "rollouts": config.rollouts, "new_tokens": config.new_tokens,
              "paths": figures, "step_time_ratio_new_to_old": new["ms_per_batch_step"] / old["ms_per_batch_step"],
              "tokens_per_s_ratio_new_to_old": new["tokens_per_s"] / old["tokens_per_s"]}
    rows = [("path", "decode steps | ms per step of the batch | tokens/s")]
    rows += [(name, f"{f['decode_steps']} | {f['ms_per_batch_step']:.1f} | {f['tokens_per_s']:,.0f}")
             for name, f in figures.items()]
    rows.append(("new / old", f"step time {result['step_time_ratio_new_to_old']:.2f} | tokens/s "
                              f"{result['tokens_per_s_ratio_new_to_old']:.2f}"))
    print(format_table(rows, f"decode overhead: {config.policy}, {config.rollouts} rollouts x {config.new_tokens}"
                              f" tokens, {torch.get_num_threads()} threads"), flush=True)
    if config.out:
        with open(config.out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main(CliApp.run(DecodeOverheadConfig))
