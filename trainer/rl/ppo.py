"""PPO against a remote reward server, in the CleanRL RLHF order. Each step:

1. sample prompts             -> PromptSampler.batch
2. roll out                   -> generate_rollout: one batched generation, then log-probs and values
3. score (overlapped with 2)  -> the reward server, by URL, while the log-probs are read
4. KL-penalised rewards       -> per_token_rewards(score at the last token, -beta * KL at every token; with
                                 --reward-granularity step, each step's score at the step's last token)
5. advantages                 -> gae + whitening
6. update                     -> K epochs of clipped policy and value losses over minibatches
7. log, adapt beta, checkpoint

A reward is never made up: a chunk the server could not score after every retry is dropped and counted.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rewardserve.server.embedded import resolve_model_path
from rewardserve.server.errors import StartupError
from rewardserve.server.modeling import describe_device, is_local
from rewardserve.server.packing import plain_attention_blocker
from rewardserve.server.steps import StepFormat
from ..client import (RequestRejected, RetryPolicy, RewardClient, RewardTarget, RewardUnavailable,
                     UntrustedServer)
from .gold import GoldEvaluation, GoldMonitor, GoldVerdict, evaluations_in, plot_gold
from ..prompts import end_of_turn_ids, load_prompts, load_references, prompt_key
from .config import PPOConfig
from .distributed import Ranks, setup_ranks, teardown
from .estimators import (AdaptiveKLController, FixedKLController, RunningMoments, clipped_policy_loss,
                       aggregate, clipped_value_loss, explained_variance, gae, group_baselined_scores, kl_penalty,
                       masked_mean, masked_whiten, per_token_rewards, returns_to_go)
from .generation import RolloutEngine, Sampling
from .lora import AdaptersOff, attach_adapters, merged_copy, trainable_parameters
from .sharding import (describe_held, full_policy_state, gathered, held_bytes, load_shards, save_shards,
                       shard)
from .rollout import ActorCritic, Rollout, generate_rollout, policy_forward, share_prompts
from .step_rewards import dense_step_rewards, score_steps, step_item
from .prometheus_gauges import StepGauges
from ..tracking import JsonlLog, plot_curves, start_wandb


# -- data -----------------------------------------------------------------------------------------------------------
class PromptSampler:
    """Epoch-wise seeded shuffles: the batch of (step, rank) is a pure function of them, so a resumed run sees the
    same data, and the ranks of a data-parallel run see disjoint prompts."""

    def __init__(self, prompts: list, batch_size: int, seed: int, ranks: Ranks = Ranks()):
        self.prompts, self.batch_size, self.seed, self.ranks = prompts, batch_size, seed, ranks

    def batch(self, step: int) -> list:
        start = (step * self.ranks.world_size + self.ranks.rank) * self.batch_size
        return [self._at(position) for position in range(start, start + self.batch_size)]

    def _at(self, position: int):
        epoch, offset = divmod(position, len(self.prompts))
        order = list(range(len(self.prompts)))
        random.Random(self.seed + epoch).shuffle(order)
        return self.prompts[order[offset]]


def scoring_items(prompts: list, responses: list[str], references: dict[str, str] | None = None) -> list[dict]:
    """The server's items: prompt + response, or the conversation with the response as its last turn; with the
    prompt's `reference` (the right answer, for a verifier) where the prompt set gives one."""
    items = []
    for prompt, response in zip(prompts, responses):
        if isinstance(prompt, str):
            item = {"prompt": prompt, "response": response}
        else:
            item = {"messages": prompt + [{"role": "assistant", "content": response}]}
        reference = references.get(prompt_key(prompt)) if references else None
        items.append(item if reference is None else item | {"reference": reference})
    return items


# -- phases ---------------------------------------------------------------------------------------------------------
@dataclass
class ScoredRollout:
    rollout: Rollout | None  # None when every chunk was dropped
    scores: torch.Tensor  # (B,) rewards from the server
    generated: int
    dropped: int
    timings: dict
    generation: dict  # decode_steps, tokens, path
    components: dict[str, list[float]] = field(default_factory=dict)  # each model's rewards, when several scored
    ensemble_std: list[float] | None = None
    chosen: list[str] | None = None  # llama2: the model whose score each rollout got
    versions: list[str] = field(default_factory=list)  # the model versions that scored this batch
    replicas: dict[str, int] = field(default_factory=dict)  # rollouts scored by each reward URL
    step_scores: list[list[float]] | None = None  # --reward-granularity step: each rollout's step scores


def rollout_and_score(model, reference, engine: RolloutEngine, tokenizer, prompts: list, client: RewardClient,
                      pool: ThreadPoolExecutor, config: PPOConfig, device, answers: dict[str, str] | None = None
                      ) -> ScoredRollout:
    """Phases 2 and 3: the whole batch is sampled in one generation (or in --generation-batch-size chunks), and its
    responses are scored on the server while the log-probs and values are read here. `answers`: each prompt's
    reference answer, sent with its responses (for a verifier)."""
    sampling = Sampling(config.max_new_tokens, config.temperature, config.top_p)
    target = RewardTarget.from_names(config.reward_model, config.reward_combination)
    timings = {"generate": 0.0, "logprobs": 0.0, "score_wait": 0.0}
    generation = {"decode_steps": 0, "tokens": 0}
    in_flight: list[tuple[Rollout, Future]] = []
    chunk = config.generation_batch_size or len(prompts)
    step_format = StepFormat(config.step_separator)

    def score(prompts_: list, texts: list[str]) -> Future:
        items = scoring_items(prompts_, texts, answers)
        if config.reward_granularity == "step":
            return pool.submit(score_steps, client, prompts_, texts, step_format, config.step_reward_model,
                               config.outcome_model, items)
        return pool.submit(client.score, items, target=target)

    for start in range(0, len(prompts), chunk):
        futures: list[Future] = []
        began = time.perf_counter()
        rollout, stats = generate_rollout(
            model, reference, engine, tokenizer, prompts[start:start + chunk], sampling, config.max_prompt_length,
            device, config.forward_batch_tokens,
            on_sampled=lambda p, texts: futures.append(score(p, texts)),
            min_shared_prefix=config.min_shared_prefix)
        timings["generate"] += stats.seconds
        timings["logprobs"] += time.perf_counter() - began - stats.seconds
        generation["decode_steps"] += stats.decode_steps
        generation["tokens"] += stats.tokens
        generation["path"] = stats.path
        in_flight.append((rollout, futures[0]))
    kept, results, dropped = [], [], 0
    for chunk_rollout, future in in_flight:
        began = time.perf_counter()
        try:
            results.append(future.result())
            kept.append(chunk_rollout)
        except RewardUnavailable as error:
            dropped += len(chunk_rollout.responses)
            tqdm.write(f"dropped {len(chunk_rollout.responses)} rollouts the server could not score: {error}")
        except RequestRejected as error:
            if error.kind not in PER_ITEM_REFUSALS:  # the run's own configuration: it ends here, in one line
                raise StartupError(f"the reward server refuses this run's requests ({error.status} {error.kind}):"
                                   f" {error.message}") from None
            dropped += len(chunk_rollout.responses)  # one item it could not score: the chunk, not the run
            tqdm.write(f"dropped {len(chunk_rollout.responses)} rollouts the server refused ({error.kind}):"
                       f" {error.message[:200]}")
        timings["score_wait"] += time.perf_counter() - began
    rollout = Rollout.concat(kept, tokenizer.pad_token_id) if kept else None
    scored = ScoredRollout(rollout, torch.tensor([r for result in results for r in result.rewards]), len(prompts),
                           dropped, timings, generation)
    return scored_parts(scored, results)


# Refusals that concern one item of a chunk (a response the model scores NaN, one too long under
# --on-overflow error): that chunk is dropped and counted, as when the server is unreachable; any other refusal
# (a key, a model name) is the run's configuration and ends it.
PER_ITEM_REFUSALS = {"unscorable_item", "input_too_long"}


def scored_parts(scored: ScoredRollout, results: list) -> ScoredRollout:
    """Gathers, over a batch's scoring answers, each model's rewards, an ensemble's std, llama2's choices and the
    versions that scored."""
    for result in results:
        for name, part in (result.components or {}).items():
            scored.components.setdefault(name, []).extend(part["rewards"])
        if result.std is not None:
            scored.ensemble_std = (scored.ensemble_std or []) + list(result.std)
        if result.chosen is not None:
            scored.chosen = (scored.chosen or []) + list(result.chosen)
        if result.model_version not in scored.versions:
            scored.versions.append(result.model_version)
        scored.replicas[result.replica] = scored.replicas.get(result.replica, 0) + len(result.rewards)
        if result.step_scores is not None:
            scored.step_scores = (scored.step_scores or []) + list(result.step_scores)
    return scored


def model_weights(versions: list[str]) -> str:
    """What scored, whichever replica answered: each version's weights hash, without the load time after its `@`
    that tells two replicas of one checkpoint (or a restarted server) apart. `a=3f2a9c1e07@20261126T021005Z,b=...`
    -> `a=3f2a9c1e07,b=...`. Replicas serving different weights give several entries, joined by `;`."""
    return ";".join(sorted({",".join(part.split("@")[0] for part in version.split(",")) for version in versions}))


def shape_scores(scores: torch.Tensor, reached_eos: torch.Tensor, moments: RunningMoments, config: PPOConfig,
                 ranks: Ranks = Ranks()):
    """Running whitening (statistics over every rank's rewards), clipping, and the missing-EOS penalty."""
    if config.whiten_rewards and not (config.reward_granularity == "step" and config.outcome_model is None):
        moments.update(ranks.gather(scores))  # (step rewards alone: the outcome is 0, nothing to whiten)
        scores = moments.whiten(scores)
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    if config.missing_eos_penalty is not None:
        scores = scores - config.missing_eos_penalty * (~reached_eos).float()
    return scores


def advantages_for(rollout: Rollout, scores: torch.Tensor, beta: float, config: PPOConfig, ranks: Ranks = Ranks(),
                   dense: torch.Tensor | None = None):
    """Phases 4 and 5: per-token rewards, then GAE and advantages whitened over every rank's batch. Returns
    (advantages, returns, kl (B,)). dense (B, R): per-token rewards besides the score (a process reward model's)."""
    mask = rollout.response_mask.float()
    kl = kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, config.kl_estimator) * mask  # (B, R)
    if config.kl_in == "loss":  # the KL is the update's own term: the rewards carry none of it
        beta = 0.0
    if config.advantage_estimator == "gae":
        rewards = per_token_rewards(scores, kl, beta, mask, dense)
        advantages, returns = gae(rewards, rollout.values, mask, config.gamma, config.lam)
        return masked_whiten(advantages, mask, total=ranks.sum_on_device) * mask, returns, kl.sum(-1)
    # Critic-free: each score baselined within its prompt's group, the KL penalty at every token, reward-to-go
    baselined = group_baselined_scores(scores, config.samples_per_prompt, config.advantage_estimator,
                                       config.grpo_scale_by_std)
    advantages = returns_to_go(per_token_rewards(baselined, kl, beta, mask, dense), mask, config.gamma)
    if config.advantage_estimator == "reinforce++":
        advantages = masked_whiten(advantages, mask, total=ranks.sum_on_device) * mask
    return advantages, advantages, kl.sum(-1)  # no critic: the returns train nothing


def ppo_update(model, optimizer, rollout: Rollout, advantages, returns, config: PPOConfig, device,
               ranks: Ranks = Ranks(), beta: float = 0.0) -> dict:
    """Phase 6: K epochs of minibatch steps on the clipped objectives; stops early past --max-approx-kl.

    The rollout goes to the device once, and a minibatch step never waits for it: statistics stay on the device
    until the epoch's one read (the early-stop check), and a step whose loss is not finite (on any rank) is skipped
    by the fused optimizer itself. Under DDP every rank runs the same number of minibatch steps (the fewest any
    rank's rollouts make: a rank that lost some to the server splits its rest as many ways, in larger parts), and
    stops only when all agree to. The early stop reads each epoch's own approximate KL.
    """
    batch = rollout.tensors(device) | {"advantages": advantages.to(device), "returns": returns.to(device)}
    group = config.samples_per_prompt if config.min_shared_prefix else 1  # minibatches keep a group whole to share
    rows, prompt_lengths = rollout.token_rows() if config.min_shared_prefix else ([], [])  # read once
    critic = config.has_critic  # the critic-free estimators add no value loss, log none
    stats = {k: [] for k in ("policy_loss", "clipfrac", "approx_kl", "entropy")}
    stats |= {"kl_loss": []} if config.kl_in == "loss" else {}
    stats |= {k: [] for k in ("value_loss", "vf_clipfrac") if critic}
    applied: list[torch.Tensor] = []  # 1.0 for each minibatch step taken, 0.0 for each skipped
    count = len(rollout.responses)
    minibatches = ranks.smallest(math.ceil(count / config.mini_batch_size))  # DDP: as many backward passes
    for _epoch in range(config.ppo_epochs):
        epoch_began = len(applied)
        indices = minibatch_indices(count, minibatches, group)
        for index, on_device in zip(indices, epoch_index_tensors(indices, device)):
            mini = {name: tensor[on_device] for name, tensor in batch.items()}
            mask = mini["response_mask"].float()
            shared = share_prompts([rows[i] for i in index], [prompt_lengths[i] for i in index], mask.shape[1],
                                   config.min_shared_prefix) if config.min_shared_prefix else None
            logprobs, values, entropy = policy_forward(model, mini["input_ids"], mini["attention_mask"],
                                                       rollout.prompt_width, config.temperature,
                                                       shared.to(device) if shared is not None else None)
            policy = clipped_policy_loss(logprobs, mini["old_logprobs"], mini["advantages"], mask, config.cliprange,
                                         config.loss_aggregation, config.max_new_tokens)
            loss = policy.loss
            if config.kl_in == "loss":  # GRPO's form: k3 of the current policy against the reference, with grad
                kl_loss = aggregate(kl_penalty(logprobs, mini["ref_logprobs"], "k3"), mask, config.loss_aggregation,
                                    config.max_new_tokens)
                loss = loss + beta * kl_loss
            if critic:
                value_loss, vf_clipfrac = clipped_value_loss(values, mini["values"], mini["returns"], mask,
                                                             config.cliprange_value)
                loss = loss + config.vf_coef * value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            not_finite = ranks.any_on_device(~torch.isfinite(loss.detach()))
            optimizer.found_inf = not_finite.float()  # never apply a non-finite update
            optimizer.step()
            applied.append(1.0 - not_finite.float())
            measured = {"policy_loss": policy.loss, "clipfrac": policy.clipfrac, "approx_kl": policy.approx_kl,
                        "entropy": masked_mean(entropy, mask)}
            if config.kl_in == "loss":
                measured["kl_loss"] = kl_loss
            if critic:
                measured |= {"value_loss": value_loss, "vf_clipfrac": vf_clipfrac}
            for name, value in measured.items():
                stats[name].append(value.detach().float().nan_to_num(0.0))
        epoch_kl = applied_mean(stats["approx_kl"][epoch_began:], applied[epoch_began:])
        if ranks.mean({"approx_kl": epoch_kl})["approx_kl"] > config.max_approx_kl:
            break  # the epoch's one host read
    summary = {k: applied_mean(v, applied) for k, v in stats.items()}
    return summary | {"skipped_updates": int(len(applied) - torch.stack(applied).sum().item())}


def minibatch_indices(count: int, minibatches: int, group: int = 1) -> list[list[int]]:
    """A random split of the rollouts into minibatches (one host read of the permutation per epoch); with
    `group` > 1, of whole groups (the rollouts come in groups of consecutive rows), so that each minibatch's groups
    share their prompts. Rows, when the rollouts are not whole groups or the groups fewer than the minibatches."""
    if group == 1 or count % group or count // group < minibatches:
        order = torch.randperm(count).tolist()
    else:
        order = [g * group + k for g in torch.randperm(count // group).tolist() for k in range(group)]
    size, larger = divmod(count, minibatches)  # as tensor_split: the first `larger` parts one longer
    bounds = [m * size + min(m, larger) for m in range(minibatches + 1)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def epoch_index_tensors(indices: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Every minibatch's row indices on the device from one copy an epoch (pinned and non-blocking on a GPU): a
    tensor built on the device per minibatch is a blocking host-to-device copy inside the loop."""
    flat = torch.tensor([i for index in indices for i in index], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory()
    return list(flat.to(device, non_blocking=True).split([len(index) for index in indices]))


def applied_mean(values: list[torch.Tensor], applied: list[torch.Tensor]) -> float:
    """The mean of a statistic over the minibatch steps that were applied (0 when none was)."""
    weights = torch.stack(applied[:len(values)])
    return (torch.stack(values) * weights).sum().item() / max(weights.sum().item(), 1.0)


# -- checkpoints ----------------------------------------------------------------------------------------------------
def save_checkpoint(out: Path, step: int, model, optimizer, kl_controller, moments, counters: dict,
                    keep: int = 1, ranks: Ranks = Ranks(), sharded: bool = False) -> None:
    """Writes checkpoints/step-N via a .partial folder and a rename, so a crash never leaves half a checkpoint, then
    drops all but the newest `keep`. Sharded (FSDP), every rank calls it and writes its own shards."""
    def write(staging: Path) -> None:
        state = {"kl": kl_controller.state_dict(), "moments": moments.state_dict(), "counters": counters, "step": step}
        if sharded:
            ranks.barrier()  # the staging folder is there
            save_shards(staging / "shards", model, optimizer)
        else:
            save_model(model, str(staging / "actor_critic.safetensors"))
            state["optimizer"] = optimizer.state_dict()
        if ranks.is_main:
            torch.save(state, staging / "trainer_state.pt")

    if ranks.is_main:
        replace_folder(out / "checkpoints" / f"step-{step}", write)
        for old in sorted(_checkpoints(out), key=_step_of)[:-keep]:
            shutil.rmtree(old)
    else:  # another rank of a sharded run: its shards go into rank 0's staging folder
        write(out / "checkpoints" / f"step-{step}.partial")
    if sharded:
        ranks.barrier()  # the checkpoint is whole, and renamed, before any rank goes on


def _checkpoints(out: Path) -> list[Path]:
    return [p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".partial")]


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def load_latest_checkpoint(out: Path, model, optimizer, kl_controller, moments) -> tuple[int, dict]:
    checkpoints = _checkpoints(out)
    if not checkpoints:
        raise SystemExit(f"--resume: no checkpoint under {out / 'checkpoints'}")
    latest = max(checkpoints, key=_step_of)
    state = torch.load(latest / "trainer_state.pt", map_location="cpu", weights_only=True)
    if (latest / "shards").is_dir():
        load_shards(latest / "shards", model, optimizer)
    else:
        load_model(model, str(latest / "actor_critic.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
    kl_controller.load_state_dict(state["kl"])
    moments.load_state_dict(state["moments"])
    print(f"resumed from {latest}", flush=True)
    return state["step"], state["counters"]


# -- the loop -------------------------------------------------------------------------------------------------------
def policy_folder(spec: str, flag: str) -> str:
    """What to load `spec` from: a folder (the embedded model converted first) or a hub id. A path that is not a
    folder is one line naming it, as `serve` does, not a traceback about hub repository ids."""
    path = resolve_model_path(spec)
    if is_local(path) and not Path(path).is_dir():
        raise StartupError(f"{flag}: no model folder at {spec}")
    return path


def build_models(config: PPOConfig, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_path = policy_folder(config.policy, "--policy")
    reference_path = policy_folder(config.reference, "--reference") if config.reference else policy_path
    # with LoRA and no --reference, the reference is the policy's own base with its adapters off: no second copy
    shares_base = config.lora_rank > 0 and config.reference is None
    try:
        tokenizer = AutoTokenizer.from_pretrained(policy_path)
        # fp32 master weights whatever the checkpoint was saved in: AdamW updates below bf16's resolution (most of
        # them at RL learning rates) would round away, and learning would stall without a word
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        reference = None if shares_base else \
            AutoModelForCausalLM.from_pretrained(reference_path, dtype=torch.float32)
    except OSError as error:  # a hub id out of reach, or a folder that is not a causal LM
        raise StartupError(f"--policy {config.policy} / --reference {config.reference or config.policy}:"
                           f" {str(error).strip().splitlines()[0][:300]}") from None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise SystemExit(f"{policy_path}: the tokenizer needs a pad token distinct from EOS")
    adapters = None
    if config.lora_rank:
        adapters = attach_adapters(policy, config.lora_rank, config.lora_alpha, config.lora_dropout,
                                   config.lora_target_modules)
    model = ActorCritic(policy, config.critic == "separate", critic=config.has_critic, adapters=adapters).to(device)
    if shares_base:
        reference = AdaptersOff(adapters)
    else:
        reference = reference.to(device)
        reference.eval().requires_grad_(False)
    model.policy.generation_config.pad_token_id = tokenizer.pad_token_id
    fsdp = config.sharding == "fsdp"  # graphs need fixed storage; a whole bf16 copy would undo the sharding
    engine = RolloutEngine(model.policy, end_of_turn_ids(model.policy, tokenizer), tokenizer.pad_token_id,
                           False if fsdp else config.compile_decode, compute_dtype=None if fsdp else "auto")
    return tokenizer, model, reference, engine


def precision_note(sharding: str, device: torch.device) -> str:
    """What the start line says of the dtypes: the weights AdamW updates are fp32 whatever the checkpoint holds."""
    if device.type != "cuda":
        return "fp32 master weights, fp32 compute"
    compute = ("bf16 compute in the decoder layers (FSDP mixed precision, gradients reduced in fp32), the LM head"
               " and value head in fp32" if sharding == "fsdp" else "fp32 compute")
    return f"fp32 master weights, {compute}; sampling from a bf16 copy refreshed once per rollout"


def holdings(model: ActorCritic, reference, optimizer) -> str:
    """What the run holds, said at start: each model's parameters, and the optimiser's (AdamW keeps two fp32
    moments of each)."""
    def count(modules) -> int:
        return sum(p.numel() for module in modules if module is not None for p in module.parameters())

    if model.value_head is None:
        critic = "none (critic-free)"
    elif model.critic_trunk is None:
        critic = f"a value head of {count([model.value_head]):,} on the policy's trunk"
    else:
        critic = f"its own trunk and head, {count([model.critic_trunk, model.value_head]):,}"
    optimised = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    held = f"{count([reference]):,} (frozen)" if count([reference]) else "the policy's base, adapters off (no copy)"
    lora = ""
    if model.adapters is not None:
        trainable, total = trainable_parameters(model.adapters)
        lora = f"; LoRA adapters: {trainable:,} trainable of {total:,} (peft's count)"
    return (f"ppo holds: policy {count([model.policy]):,} parameters; reference {held}; critic {critic};"
            f" AdamW over {optimised:,} parameters ({8 * optimised / 2**30:.2f} GiB of moments){lora}")


def check_reward_server(client: RewardClient, target: RewardTarget, prompt: str | list[dict] = "Hello",
                        references: dict[str, str] | None = None) -> None:
    """Before the policy loads: one scored item of the shape this run sends (its first prompt, as `prompt` +
    `response` or as `messages`) shows the server takes this run's requests (its model or combination, the item's
    shape, the API key, TLS). A refusal ends the run in one line now, not after the first generation; a server that
    is not up yet is waited for later, as in any outage."""
    try:
        client.score(scoring_items([prompt], ["Hello! How can I help?"], references), target=target)
    except RequestRejected as error:
        raise StartupError(f"the reward server at {client.urls[0]} refuses this run's requests ({error.status}"
                           f" {error.kind}): {error.message}") from None
    except UntrustedServer as error:
        raise StartupError(str(error)) from None
    except RewardUnavailable as error:
        tqdm.write(f"no reward server answered before the start ({error}); starting anyway: rollouts wait for it")


def check_step_rewards(client: RewardClient, config: PPOConfig, prompts: list) -> None:
    """Before the policy loads: every prompt is one the step model takes (a text, or one user turn); the step model
    answers step scores, and splits a response at this run's separator (two steps sent as one response come back as
    two scores), so the steps scored are the steps rewarded."""
    separator = config.step_separator
    for each in prompts:  # conversations of several turns have no one prompt for the step model
        try:
            step_item(each, ["x"])
        except ValueError as error:
            raise StartupError(str(error)) from None
    prompt = prompts[0]
    probe = {"prompt": prompt if isinstance(prompt, str) else prompt[-1]["content"],
             "response": f"First.{separator}Second."}  # steps without spaces, so a space may separate them
    try:
        answer = client.score([probe], target=RewardTarget(model=config.step_reward_model))
    except (RequestRejected, UntrustedServer) as error:
        raise StartupError(f"the reward server at {client.urls[0]} refuses this run's step requests: {error}") from None
    except RewardUnavailable as error:
        tqdm.write(f"no reward server answered before the start ({error}); starting anyway: rollouts wait for it")
        return
    if answer.step_scores is None:
        raise StartupError(f"--step-reward-model {config.step_reward_model} gives no step scores: serve a process"
                           " reward model with `rewardserve serve --prm NAME=DIR`")
    if len(answer.step_scores[0]) != 2:
        raise StartupError(f"the server does not split steps at --step-separator {separator!r} (a response of two"
                           f" steps came back as {len(answer.step_scores[0])}); start both with the same separator")
    tqdm.write(f"ppo: step rewards from {config.step_reward_model}: each response split into steps at"
               f" {separator!r} (the server's separator, checked), each step's P(right) - 0.5 on its last token;"
               f" outcome reward: {config.outcome_model or 'none'}")


def main(config: PPOConfig) -> dict:
    ranks, device = setup_ranks(config.device, group_of_one=config.sharding == "fsdp")
    if ranks.is_main:
        print("rewardserve ppo " + json.dumps(config.printable(), indent=2), flush=True)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        print(f"ppo: policy, reference and value head on {describe_device(device)};"
              f" {precision_note(config.sharding, device)}", flush=True)
    client = RewardClient(config.reward_url, timeout=config.reward_timeout, retry=RetryPolicy(config.reward_retries),
                          api_key=config.reward_api_key.get_secret_value() if config.reward_api_key else None,
                          ca_file=config.reward_ca_file)
    prompts, answers = load_prompts(config.prompts), load_references(config.prompts)
    if config.reward_granularity == "step":
        check_step_rewards(client, config, prompts)
        if config.outcome_model is not None:
            check_reward_server(client, RewardTarget(model=config.outcome_model), prompts[0], answers)
    else:
        check_reward_server(client, RewardTarget.from_names(config.reward_model, config.reward_combination),
                            prompts[0], answers)
    torch.manual_seed(config.seed)  # new weights (LoRA's A) start alike on every rank: FSDP broadcasts none
    tokenizer, model, reference, engine = build_models(config, device)
    blocker = plain_attention_blocker(model.policy.config, config.max_prompt_length + config.max_new_tokens)
    if config.min_shared_prefix and blocker is not None:
        config = config.model_copy(update={"min_shared_prefix": 0})
        if ranks.is_main:
            print(f"ppo: prompts are computed once per response, not shared: {blocker}", flush=True)
    sharded = config.sharding == "fsdp"
    if sharded:
        shard(model, reference, device, torch.bfloat16 if device.type == "cuda" else None)  # in place: shards
    trainable = DistributedDataParallel(model) if ranks.active and not sharded else model  # generation: `model`
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters (and any value head)
    optimizer = torch.optim.AdamW(trained, lr=config.lr, fused=True)  # fused: it can skip on the device
    if ranks.is_main:
        print(holdings(model, reference, optimizer), flush=True)
    print(describe_held(held_bytes(model, reference, optimizer), ranks.rank, ranks.world_size, config.sharding),
          flush=True)
    kl_controller = (AdaptiveKLController(config.beta, config.target_kl, config.kl_horizon) if config.adaptive_kl
                     else FixedKLController(config.beta))
    moments = RunningMoments()
    groups = config.samples_per_prompt
    sampler = PromptSampler(prompts, config.batch_size // groups, config.seed, ranks)
    counters, start = {"generated": 0, "dropped": 0, "skipped_updates": 0}, 0
    if config.resume:
        start, counters = load_latest_checkpoint(out, model, optimizer, kl_controller, moments)
    log = None
    if ranks.is_main:
        wandb_run = start_wandb(out, config.printable(), "ppo") if "wandb" in config.report_to else None
        gauges = StepGauges(config.metrics_port, config.metrics_host) if config.metrics_port is not None else None
        log = JsonlLog(out / "metrics.jsonl", fresh=not config.resume, namespace="ppo", tensorboard=True,
                       wandb_run=wandb_run, gauges=gauges)
    if log:
        log.drop_after(start)
    earlier = log.records() if log else []
    versions = earlier[-1].get("model_weights") if earlier else None  # what scored last, without load times
    gold_client, monitor = None, None
    if config.gold_reward_url and ranks.is_main:
        gold_client = RewardClient(config.gold_reward_url, timeout=config.reward_timeout,
                                   retry=RetryPolicy(config.reward_retries),
                                   api_key=config.gold_api_key.get_secret_value() if config.gold_api_key else None)
        monitor = GoldMonitor.from_records(config.gold_every, config.stop_on_gold_drop, earlier)
    progress = tqdm(initial=start, total=config.steps, desc="ppo", disable=not ranks.is_main)
    with ThreadPoolExecutor(1, thread_name_prefix="score") as pool, progress:
        for step in range(start, config.steps):
            progress.update(step - progress.n)  # the steps done before this one (a skipped step counts as done)
            began = time.perf_counter()
            torch.manual_seed(config.seed * 1_000_003 + step * ranks.world_size + ranks.rank)  # resumable sampling
            prompts = [prompt for prompt in sampler.batch(step) for _ in range(groups)]  # 1: each group together
            model.eval()
            with gathered(model, reference):  # FSDP: whole layers for the rollout phase, one all-gather each
                scored = rollout_and_score(model, reference, engine, tokenizer, prompts, client, pool, config,
                                           device, answers)  # 2, 3
            counters["generated"] += ranks.total(scored.generated)
            counters["dropped"] += ranks.total(scored.dropped)
            check_dropped(counters, config)
            if not ranks.all_true(scored.rollout is not None):
                continue  # some rank has nothing to learn from: every rank skips, or DDP would wait forever
            rollout = scored.rollout
            weights = model_weights(scored.versions)  # replicas of one checkpoint are one model
            changed = ranks.any_true(versions is not None and weights != versions)
            if changed:  # a reloaded reward model: the trainer's own whitening starts afresh with it
                moments = RunningMoments()
                tqdm.write(f"step {step + 1}: the reward model changed, {versions} -> {weights}")
            versions = weights
            scores = shape_scores(scored.scores, rollout.reached_eos, moments, config, ranks)
            dense = None
            if config.reward_granularity == "step":
                dense = dense_step_rewards(tokenizer, rollout, scored.step_scores, StepFormat(config.step_separator))
            advantages, returns, kl = advantages_for(rollout, scores, kl_controller.beta, config, ranks, dense)  # 4, 5
            gold = None
            if config.gold_reward_url and (step + 1) % config.gold_every == 0:  # every rank takes part
                gold = judge_on_gold(gold_client, monitor, scored, kl, step + 1, ranks)
                if gold is not None and gold.new_best:  # the weights that sampled the judged rollouts
                    save_policy(out / "best_gold", model, tokenizer, {"step": step + 1, **gold.metrics})
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = warmup_lr(step, config.lr, config.lr_warmup_steps)
            update_began = time.perf_counter()
            update = ppo_update(trainable, optimizer, rollout, advantages, returns, config, device, ranks,
                                kl_controller.beta)  # 6
            counters["skipped_updates"] += update.pop("skipped_updates")
            timings = scored.timings | {"update": time.perf_counter() - update_began,
                                        "step": time.perf_counter() - began}
            record = step_metrics(step + 1, scored, scores, kl, kl_controller.beta, rollout, returns, update, timings,
                                  counters, ranks, optimizer.param_groups[0]["lr"])
            record |= {"model_version_changed": changed, "model_weights": weights}
            record |= group_metrics(scored.scores, groups, config.advantage_estimator, ranks)
            if scored.step_scores is not None:
                record |= step_metrics_of(scored.step_scores, ranks)
            kl_controller.update(record["kl"], len(rollout.responses) * ranks.world_size)  # 7
            stop = False
            if gold is not None:
                record |= gold.metrics
                stop = gold.stop
            if log:
                log.write(record)
            if (log or sharded) and ((step + 1) % config.save_every == 0 or step + 1 == config.steps or stop):
                save_checkpoint(out, step + 1, model, optimizer, kl_controller, moments, counters,
                                config.keep_checkpoints, ranks, sharded)
            if ranks.any_true(stop):  # the monitor runs on the main rank; every rank stops with it
                if monitor is not None:
                    drops = config.stop_on_gold_drop
                    evaluations = "evaluation" if drops == 1 else "evaluations"
                    tqdm.write(f"step {step + 1}: the gold reward fell {drops} {evaluations} in a row while the proxy"
                               f" rose; stopping (best gold at step {monitor.best.step}, kept in {out / 'best_gold'})")
                counters["stopped_on_gold_drop"] = step + 1
                break
        progress.update(counters.get("stopped_on_gold_drop", config.steps) - progress.n)  # it ends where the run did
    policy_state = full_policy_state(model) if sharded else None  # every rank takes part; rank 0 gets it
    summary = finish(out, model, tokenizer, log, counters, config.merge_lora, policy_state) if log else {}
    teardown(ranks)
    return summary


def warmup_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps (a pure function of the step, so a resumed run goes on where it was)."""
    return peak * min(1.0, (step + 1) / warmup) if warmup else peak


def check_dropped(counters: dict, config: PPOConfig) -> None:
    if counters["dropped"] > config.max_dropped_fraction * counters["generated"]:
        raise SystemExit(
            f"{counters['dropped']} of {counters['generated']} rollouts could not be scored (limit"
            f" {config.max_dropped_fraction:.0%}); is the reward server at {config.reward_url} up?"
        )


def step_metrics_of(step_scores: list[list[float]], ranks: Ranks) -> dict:
    """The process reward model's view of the batch: its mean step score, and steps per response."""
    flat = ranks.gather(torch.tensor([score for row in step_scores for score in row], dtype=torch.float32))
    counts = ranks.gather(torch.tensor([float(len(row)) for row in step_scores]))
    return {"step_score_mean": flat.mean().item() if flat.numel() else float("nan"),
            "steps_per_response": counts.mean().item()}


def group_metrics(scores: torch.Tensor, group_size: int, estimator: str, ranks: Ranks) -> dict:
    """The estimator, and with groups: their mean within-group std of the server's rewards, and the share of groups
    whose rewards are all equal (they teach a critic-free estimator nothing)."""
    if group_size == 1:
        return {"advantage_estimator": estimator}
    groups = scores.reshape(-1, group_size)
    equal = (groups == groups[:, :1]).all(-1).float().mean().item()
    return {"advantage_estimator": estimator, **ranks.mean({"group_reward_std": groups.std(-1).mean().item(),
                                                            "groups_all_equal": equal})}


def step_metrics(step, scored, shaped, kl, beta, rollout, returns, update, timings, counters, ranks,
                 lr: float) -> dict:
    """One line of metrics.jsonl: rates and means averaged over the ranks, counts and throughput summed."""
    mask = rollout.response_mask.float()
    lengths = mask.sum(-1)
    rewards = scored.scores
    sample = rollout.responses[0][:200]
    numbers = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "reward_shaped_mean": shaped.mean().item(), "kl": kl.mean().item(),
        "response_length": lengths.mean().item(), "eos_rate": rollout.reached_eos.float().mean().item(),
        **({"explained_variance": explained_variance(rollout.values, returns, mask)} if "value_loss" in update
           else {}),
        **update,
        "score_wait_share": timings["score_wait"] / timings["step"],
        "generation/tokens_per_s": scored.generation["tokens"] / timings["generate"],
        "generation/decode_steps": scored.generation["decode_steps"],
        "generation/tokens": scored.generation["tokens"],
        **{f"time/{k}": v for k, v in timings.items()},
    }
    return {"step": step, **ranks.mean(numbers), "beta": beta, "lr": lr, "ranks": ranks.world_size,
            "rollouts": int(ranks.total(len(rollout.responses))),
            "tokens_per_s": ranks.total(lengths.sum().item() / timings["step"]),
            "dropped_total": counters["dropped"], "skipped_updates_total": counters["skipped_updates"],
            "generation/path": scored.generation.get("path"), "sample_response": sample,
            **reward_parts(scored)}


def reward_parts(scored: ScoredRollout) -> dict:
    """reward/<model>: the mean of each model's part; reward/ensemble_std: the mean disagreement of an ensemble;
    reward/chosen/<model>: the share of rollouts a llama2 rule gave that model's score; model_version."""
    parts = {f"reward/{name}": sum(values) / len(values) for name, values in scored.components.items() if values}
    if scored.ensemble_std:
        parts["reward/ensemble_std"] = sum(scored.ensemble_std) / len(scored.ensemble_std)
    if scored.chosen:
        for name in scored.components:  # every model of the rule, 0 included, so each curve is unbroken
            parts[f"reward/chosen/{name}"] = scored.chosen.count(name) / len(scored.chosen)
    scored_by = ",".join(f"{url}={count}" for url, count in sorted(scored.replicas.items()))
    return parts | {"model_version": ",".join(scored.versions), "scored_by": scored_by}


def judge_on_gold(client: RewardClient | None, monitor: GoldMonitor | None, scored: ScoredRollout, kl: torch.Tensor,
                  step: int, ranks: Ranks) -> GoldVerdict | None:
    """Every rank's rollouts of this step, gathered to the main rank, scored on the gold server beside their proxy
    rewards and per-sequence KL: gold and proxy describe the same rollouts. Runs before the update, so the policy
    that a new best keeps is the one that sampled them. An unreachable gold server skips this evaluation alone.
    Returns the verdict on the main rank, None elsewhere."""
    rollout = scored.rollout
    parts = ranks.gather_objects((scoring_items(rollout.prompts, rollout.responses), scored.scores.tolist(),
                                  kl.tolist()))
    if monitor is None:
        return None
    items, proxy, kls = ([value for part in parts for value in part[i]] for i in range(3))
    try:
        gold = client.score(items).rewards
    except RewardUnavailable as error:
        tqdm.write(f"step {step}: gold evaluation skipped, the gold server could not score: {error}")
        return None
    return monitor.observe(GoldEvaluation(step, sum(proxy) / len(proxy), sum(gold) / len(gold), sum(kls) / len(kls)))


def save_policy(folder: Path, model, tokenizer, about: dict | None = None, state: dict | None = None) -> None:
    """An HF policy folder (what `--policy` and `rewardserve label --policy` read), or with LoRA peft's adapter
    folder (which transformers with peft installed loads over its base), written via a rename. `state`: the
    policy's whole state dict where the model itself holds shards (FSDP)."""
    def write(target: Path) -> None:
        if model.adapters is not None:
            peft_state = None if state is None else {f"base_model.model.{key}": value for key, value in state.items()}
            model.adapters.save_pretrained(target, state_dict=peft_state)
        else:
            model.policy.save_pretrained(target, safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(target)
        if about is not None:
            (target / "about.json").write_text(json.dumps(about, indent=2))

    replace_folder(folder, write)


def replace_folder(folder: Path, write) -> None:
    """`write(staging)` fills a sibling folder, which then replaces `folder`: a reader never sees half of it."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)


def finish(out: Path, model, tokenizer, log: JsonlLog, counters: dict, merge_lora: bool = False,
           policy_state: dict | None = None) -> dict:
    save_policy(out / "policy", model, tokenizer, state=policy_state)
    if merge_lora and model.adapters is not None:
        merged = merged_copy(model.adapters)

        def write_merged(target: Path) -> None:
            merged.save_pretrained(target, safe_serialization=True)
            tokenizer.save_pretrained(target)

        replace_folder(out / "policy-merged", write_merged)
    records = log.records()
    plot = plot_curves(records, ["reward_mean", "kl", "response_length"], out / "ppo.png",
                       "PPO against the reward server")
    gold = evaluations_in(records)
    gold_plot = None
    if gold:
        gold_plot = plot_gold(gold, out / "gold.png")
        best = max(gold, key=lambda e: e.gold)
        counters = counters | {"gold_best_step": best.step, "gold_best": best.gold, "gold_last": gold[-1].gold}
    log.finish({"ppo/plot": plot, "ppo/gold_plot": gold_plot})
    summary = {"steps": len(records), **counters}
    if records:
        summary |= {"reward_first": records[0]["reward_mean"], "reward_last": records[-1]["reward_mean"],
                    "kl_last": records[-1]["kl"]}
    print("ppo finished: " + json.dumps(summary), flush=True)
    return summary
