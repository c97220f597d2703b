"""The rollout engine: left-padded prompts in; sampled tokens, masks and counts out. One function,
`RolloutEngine.generate`, so that another engine (vLLM) can stand in its place later.

Why not transformers' `generate`: each of its decode steps runs logits processors, stopping criteria and a host
synchronisation to ask whether every sequence is done, which for a small policy costs more than the forward. This
loop is what sampling needs and nothing else:
- a preallocated (static) KV cache of width prompt + max_new_tokens, reused across calls of the same shape;
- an attention mask that never changes during the loop (the prompt's padding, then ones: causality hides the
  positions not generated yet), and positions counted from each row's first real token;
- sampling on the device (temperature, top-p; greedy at temperature 0) by the Gumbel-max trick, exact and free of
  host synchronisation; an end-of-turn token turning a row into padding;
- one host synchronisation every `check_every` steps, to stop once every row has reached EOS;
- on CUDA, the decode step compiled with CUDA graphs (torch.compile, mode="reduce-overhead"), guarded: if it fails
  to build or run, one warning and the same loop runs eagerly. Graphs need static shapes, so compiled calls pad
  their prompts on the left (masked: the same samples) to a cache width of a power of two: a run compiles one graph
  per width class, not per prompt width, and a width past dynamo's recompile limit decodes eagerly and says so
  (`Generated.path` is what ran, never what was meant to);
- sampling from a bf16 copy of the weights on CUDA (`compute_dtype`), refreshed in place once per call: autocast
  over fp32 weights re-casts every Linear weight at every decode step (22 casts a step for SmolLM2's 22 layers,
  about 4x the weight traffic of bf16 weights).
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0


@dataclass
class Generated:
    responses: torch.Tensor  # (B, R) sampled tokens, padding after each row's EOS
    decode_steps: int  # forward passes of the policy (the prefill included)
    path: str  # which decode path ran: "compiled" or "eager"


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probability reaches top_p; the rest get -inf.

    Probabilities [0.5, 0.3, 0.2] with top_p 0.7 keep the first two; with top_p 0.5, the first alone.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each one
    sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One token per row (B,) from the last position's logits (B, V)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_p < 1:
        logits = top_p_filter(logits, sampling.top_p)
    # The Gumbel-max trick: argmax(logits + G), G ~ Gumbel(0, 1) drawn independently per token, is distributed
    # exactly as softmax(logits), with no host synchronisation and no cumulative sum (whose float32 rounding leaves
    # tokens after a large mass undrawable and moves the rest). The noise is drawn in float64: float32 uniforms,
    # multiples of 2^-24, cap G at 16.6 and so starve tokens more than e^-16 below the top one; float64 caps it at
    # 36.7. Tokens at -inf (outside the nucleus) never win.
    uniform = torch.rand(logits.shape, dtype=torch.float64, device=logits.device).clamp_(min=1e-300)
    return (logits.double() - torch.log(-torch.log(uniform))).argmax(-1)


def cache_width(width: int) -> int:
    """The compiled decode step's cache width for prompt + response `width`: the next power of two (at least 64),
    so that runs of every prompt length compile a handful of graphs."""
    return max(64, 1 << (width - 1).bit_length())


class RolloutEngine:
    def __init__(self, policy: nn.Module, eos_token_id: int | list[int], pad_token_id: int,
                 compile_decode: bool | None = None, check_every: int = 8,
                 compute_dtype: torch.dtype | None | str = "auto", compile_backend: str | object = "inductor"):
        """eos_token_id: the token, or every token, that ends a response (`prompts.end_of_turn_ids`).
        compute_dtype: sample from a copy of the weights in this dtype ("auto": bf16 on CUDA; None: the policy's
        own weights, as under FSDP, where a whole copy would defeat the sharding). compile_backend: torch.compile's
        (the tests count graphs through their own)."""
        self.policy = policy
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.pad_token_id = pad_token_id
        self.check_every = check_every
        parameters = inspect.signature(type(policy).forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"  # transformers renamed it
        self._caches: dict[tuple, object] = {}
        device = next(policy.parameters()).device
        if compute_dtype == "auto":
            compute_dtype = torch.bfloat16 if device.type == "cuda" else None
        self._sampler = policy if compute_dtype is None else _weights_copy(policy, compute_dtype)
        self._compiled, self._compiled_shapes, self._warned_limit = None, set(), False
        if compile_decode if compile_decode is not None else device.type == "cuda":
            options = {"mode": "reduce-overhead"} if compile_backend == "inductor" else {}
            self._compiled = torch.compile(self._forward_last, dynamic=False, backend=compile_backend, **options)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @property
    def compiled_graphs(self) -> int:
        """The decode-step shapes compiled so far (each is one graph, captured once)."""
        return len(self._compiled_shapes)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling) -> Generated:
        """Samples up to max_new_tokens per row after left-padded prompts (B, P); returns the responses (B, R')
        with R' <= max_new_tokens (trailing columns that are padding in every row are cut)."""
        if self._sampler is not self.policy:
            _refresh(self._sampler, self.policy)  # one cast per call, in place (CUDA graphs keep their addresses)
        steps = sampling.max_new_tokens
        if self._compiled is not None:  # static shapes: one graph per width class, not per prompt width
            prompt_ids, prompt_mask = _pad_left(prompt_ids, prompt_mask, cache_width(prompt_ids.shape[1] + steps)
                                                - steps, self.pad_token_id)
        batch, width = prompt_ids.shape
        cache = self._cache_for(batch, width + steps)
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, steps)], dim=1)  # (B, P + R), fixed for the loop
        prompt_lengths = prompt_mask.long().sum(-1)  # (B,)
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        responses = torch.full((batch, steps), self.pad_token_id, dtype=torch.long, device=prompt_ids.device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=prompt_ids.device)
        ends = torch.tensor(self.eos_token_ids, device=prompt_ids.device)
        with self._autocast():
            logits = self._forward_last(prompt_ids, positions, mask, cache)  # the prefill, eager: its shape varies
        path, forwards = self._decode_path(batch, width + steps), 1
        for step in range(steps):
            tokens = torch.where(unfinished, sample_next(logits, sampling), self.pad_token_id)  # (B,)
            responses[:, step] = tokens
            unfinished &= ~torch.isin(tokens, ends)
            if step + 1 == steps or ((step + 1) % self.check_every == 0 and not unfinished.any()):  # host sync
                break
            logits, path = self._decode(tokens[:, None], (prompt_lengths + step)[:, None], mask, cache, path)
            forwards += 1
        # Columns after the last real token are padding in every row (the loop checks only every few steps).
        real = (responses[:, :step + 1] != self.pad_token_id).any(0).nonzero()
        width = int(real.max()) + 1 if len(real) else step + 1
        return Generated(responses[:, :width], forwards, path)

    def _forward_last(self, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
        """Logits of the last position (B, V)."""
        output = self._sampler(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return output.logits[:, -1]

    def _decode_path(self, batch: int, width: int) -> str:
        """compiled, or eager: this shape would pass dynamo's recompile limit, past which dynamo itself would run
        the step eagerly without a word (while this said compiled)."""
        if self._compiled is None:
            return "eager"
        shape = (batch, width)
        if shape not in self._compiled_shapes:
            if len(self._compiled_shapes) >= torch._dynamo.config.recompile_limit:
                if not self._warned_limit:
                    log.warning("compiled decode: %d shapes compiled, dynamo's recompile limit; shape %s decodes"
                                " eagerly (and says so)", len(self._compiled_shapes), shape)
                    self._warned_limit = True
                return "eager"
            self._compiled_shapes.add(shape)
        return "compiled"

    def _decode(self, tokens, positions, mask, cache, path: str):
        with self._autocast():
            if path == "compiled":
                try:
                    return self._compiled(tokens, positions, mask, cache).clone(), path
                except Exception as error:  # a GPU run must not die of an optimisation
                    log.warning("compiled decode step failed (%s: %s); decoding eagerly from now on",
                                type(error).__name__, error)
                    self._compiled = None
            return self._forward_last(tokens, positions, mask, cache), "eager"

    def _cache_for(self, batch: int, width: int):
        """A static KV cache of this shape, allocated once and reset for each call (CUDA graphs need its
        buffers to stay where they are)."""
        from transformers import StaticCache

        key = (batch, width)
        cache = self._caches.get(key)
        if cache is None:
            if len(self._caches) >= 4:
                self._caches.clear()
            cache = self._caches[key] = StaticCache(config=self.policy.config, max_cache_len=width)
        else:
            cache.reset()
        return cache

    def _autocast(self):
        """Sampling from the policy's own fp32 weights on CUDA (under FSDP): bf16 autocast. A bf16 copy needs none."""
        return torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda" and self._sampler is self.policy)


def _weights_copy(policy: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The policy with its parameters (not its buffers: rotary frequencies stay fp32) in `dtype`, for sampling."""
    sampler = copy.deepcopy(policy).eval().requires_grad_(False)
    for parameter in sampler.parameters():
        parameter.data = parameter.data.to(dtype)
    return sampler


@torch.no_grad()
def _refresh(sampler: nn.Module, policy: nn.Module) -> None:
    for target, source in zip(sampler.parameters(), policy.parameters()):
        target.copy_(source)


def _pad_left(ids: torch.Tensor, mask: torch.Tensor, width: int, pad_token_id: int):
    """Left-padded prompts widened to `width` with masked padding (positions count from the first real token)."""
    extra = width - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_token_id), ids], dim=1),
            torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1))
