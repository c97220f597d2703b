"""Every CUDA branch on one card, against the fp32 reference on the same card: `make test-gpu` runs this file (each
test marked `gpu`, skipped without CUDA), then `rewardserve bench all`, and writes one report.

Tolerances, stated once: a bf16 path agrees with the fp32 padded forward within 2e-2 of the scores' scale (the
calibration's own check, server/calibration.py `verify`) and ranks items as it does (Spearman >= 0.99 asserted on
tiny random models, whose scores crowd together; the report gives each value against the 0.999 target); two bf16
paths, or one batch and its items alone, agree within the same 2e-2.
"""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from rewardserve.server import metrics, packing
from rewardserve.server.batcher import Batcher
from rewardserve.server.calibration import choose, measure_model, memory_cap, synthetic_batch, workload_w_lengths
from rewardserve.server.modeling import RewardModel, forward_paths

from ..server.test_architectures import FAMILIES, POSITIONS, VOCAB

pytestmark = pytest.mark.gpu
GiB = 2**30


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties in random float scores)."""
    ranks = [torch.tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def tolerance(reference: list[float]) -> float:
    return 2e-2 * max(1.0, max(abs(x) for x in reference))


def save_family(folder, family: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(FAMILIES[family][0]).save_pretrained(folder)
    return str(folder)


def llama_config(vocab: int, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, positions=8192,
                 init=0.02, **extra):
    """SmolLM2-135M's shape by default, random weights."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=positions,
                       initializer_range=init, pad_token_id=0, num_labels=1, tie_word_embeddings=True, **extra)


# -- every forward path, every architecture ------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_forward_path_in_bf16_agrees_with_fp32_padded_and_is_batch_invariant(tmp_path, family, cuda, record):
    path = save_family(tmp_path, family)
    reference = RewardModel.load(path, dtype="float32", device="cuda")
    served = RewardModel.load(path, dtype="bfloat16", device="cuda")
    rng = random.Random(0)
    sequences = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, min(served.max_length, POSITIONS) + 1))]
                 for _ in range(48)]
    with reference.forward_path_as("padded"):
        expected = reference.score_batch(sequences)
    paths = forward_paths(served.device, served.packs) + (["packed-sdpa"] if served.packs else [])
    for forward in paths:
        with served.forward_path_as(forward), packing.strict_kernels():
            pending = served.launch(sequences)
            together = served.collect(pending)
            alone = [served.score_batch([s])[0] for s in sequences[:8]]
        rho = spearman(together, expected)
        gap = max(abs(x - y) for x, y in zip(together, expected))
        invariance = max(abs(x - y) for x, y in zip(alone, together[:8]))
        record("spearman_vs_fp32", rho, family=family, path=forward, target=0.999, met=rho >= 0.999)
        record("max_gap_vs_fp32", gap, family=family, path=forward, tolerance=tolerance(expected))
        record("batch_invariance_gap", invariance, family=family, path=forward)
        assert pending.path == forward, f"{forward} ran {pending.path}"  # the kernel asked for is the one that ran
        assert rho >= 0.99 and gap <= tolerance(expected) and invariance <= tolerance(expected), (forward, rho, gap)


def test_shared_prefix_flex_equals_the_unshared_forward(tmp_path, cuda, record):
    path = save_family(tmp_path, "llama")
    model = RewardModel.load(path, dtype="bfloat16", device="cuda")
    rng = random.Random(1)
    prompt = [rng.randrange(3, VOCAB) for _ in range(40)]
    sequences = [prompt + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(8)]
    with model.forward_path_as("packed-flex"), packing.strict_kernels():
        unshared = model.score_batch(sequences)
        model.min_shared_prefix = 16
        pending = model.launch(sequences)
        shared = model.collect(pending)
    gap = max(abs(x - y) for x, y in zip(shared, unshared))
    record("shared_vs_unshared_gap", gap, computed_tokens=pending.computed_tokens,
           sent_tokens=sum(map(len, sequences)))
    assert pending.path == "packed-flex" and pending.computed_tokens < sum(map(len, sequences))
    assert gap <= tolerance(unshared)


def test_a_process_reward_model_reads_its_steps_on_cuda_as_in_fp32(tmp_path, cuda, record):
    """The PRM's CUDA branch: step ends copied from pinned memory, every forward path in bf16, a shared prompt, each
    item's step scores against the fp32 padded forward on the same card."""
    from transformers import AutoModelForTokenClassification

    from rewardserve.server.process_rewards import ProcessRewardModel, StepIds

    config = FAMILIES["llama"][0].__class__(**FAMILIES["llama"][0].to_dict())
    config.num_labels, config.architectures = 2, ["LlamaForTokenClassification"]
    torch.manual_seed(0)
    AutoModelForTokenClassification.from_config(config).save_pretrained(tmp_path)
    reference = ProcessRewardModel.load_prm(str(tmp_path), dtype="float32", device="cuda")
    served = ProcessRewardModel.load_prm(str(tmp_path), dtype="bfloat16", device="cuda", min_shared_prefix=16)
    rng = random.Random(2)
    prompt = [rng.randrange(3, VOCAB) for _ in range(40)]
    sequences = []
    for _ in range(16):
        ids = prompt + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 60))]
        ends = tuple(sorted(rng.sample(range(len(prompt), len(ids)), rng.randrange(1, 4))))
        sequences.append(StepIds(ids, ends))
    with reference.forward_path_as("padded"):
        expected = [x for row in reference.score_batch(sequences) for x in row]
    for forward in forward_paths(served.device, served.packs):
        with served.forward_path_as(forward), packing.strict_kernels():
            rows = served.score_batch(sequences)
        assert [len(row) for row in rows] == [len(s.step_ends) for s in sequences], forward
        got = [x for row in rows for x in row]
        gap = max(abs(x - y) for x, y in zip(got, expected))
        record("prm_step_gap_vs_fp32", gap, path=forward, tolerance=2e-2)
        assert gap <= 2e-2, (forward, gap)


@pytest.mark.parametrize("tokens", [16384, 65536, 131072])
def test_the_block_mask_memory(tokens, cuda, record):
    rng = random.Random(tokens)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(rng.choice(workload_w_lengths()), tokens - sum(lengths)))
    documents = packing.to_device(packing.pack([[5] * n for n in lengths]), cuda).documents
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    mask = packing.document_block_mask(documents.ids, True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() - before
    record("block_mask_peak_bytes", peak, tokens=tokens, seconds=seconds, target_bytes=GiB if tokens == 131072 else None)
    assert mask.kv_indices.shape[-1] == -(-tokens // packing.FLEX_BLOCK)
    assert peak < GiB


# -- calibration --------------------------------------------------------------------------------------------------
def test_calibration_chooses_measures_what_ran_and_never_recompiles_after_warm_up(tmp_path, cuda, record):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(llama_config(49152)).to(torch.bfloat16).save_pretrained(tmp_path)
    model = RewardModel.load(str(tmp_path), dtype="bfloat16", device="cuda")
    lengths = workload_w_lengths()
    cap = memory_cap(cuda)
    calibration = choose(forward_paths(cuda, model.packs), [16384, 32768, 65536, 131072],
                         measure_model(model, lengths), 150.0, cap)
    print(calibration.table())
    record("calibration", calibration.rows(), chosen=[calibration.path, calibration.budget], memory_cap=cap,
           seconds=calibration.seconds)
    measured = [m for m in calibration.measurements if m.tokens_per_s]
    assert measured and calibration.how.startswith("measured")
    assert all(m.peak_bytes <= cap for m in measured if not m.skipped)
    flex = [m for m in measured if m.path == "packed-flex"]
    assert flex, "packed-flex was never measured: " + calibration.table()
    record("flex_compile_seconds", flex[0].compile_seconds, run_seconds=flex[0].run_seconds)
    # 100 batches of workload W along flex after the warm-up: no new graph
    from torch._dynamo.utils import counters

    model.forward_path, model.max_batch_tokens = "packed-flex", 16384
    graphs = counters["stats"]["unique_graphs"]
    rng = random.Random(7)
    paths = set()
    for _ in range(100):
        batch = synthetic_batch(lengths, 16384, True, model.max_length, model.embedding_rows,
                                random.Random(rng.random()))
        pending = model.launch(batch)
        model.collect(pending)
        paths.add(pending.path)
    recompiles = counters["stats"]["unique_graphs"] - graphs
    record("recompiles_after_warm_up", recompiles, batches=100, target=0)
    assert recompiles == 0 and paths == {"packed-flex"}


def test_an_oom_is_split_by_the_batcher_and_memory_returns_to_its_level(tmp_path, cuda, record, monkeypatch):
    model = RewardModel.load(save_family(tmp_path, "llama"), dtype="bfloat16", device="cuda")
    model.forward_path = "padded"
    real = model.padded_outputs

    def padded_outputs(input_ids, attention_mask, sequences=None):
        if input_ids.shape[0] > 2:  # a real CUDA out-of-memory, asked of the allocator
            free, _ = torch.cuda.mem_get_info()
            torch.empty(2 * free, dtype=torch.uint8, device="cuda")
        return real(input_ids, attention_mask)

    monkeypatch.setattr(model, "padded_outputs", padded_outputs)
    sequences = [[5 + i] * (10 + i) for i in range(8)]
    splits = metrics.OOM_SPLITS._value.get()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()

    async def scenario():
        batcher = Batcher(model, max_batch_tokens=1 << 16, max_wait_ms=1, max_queue_items=100)
        batcher.start()
        scores = await asyncio.gather(*batcher.submit(sequences))
        await batcher.drain_and_stop()
        return scores

    scores = asyncio.run(asyncio.wait_for(scenario(), 120))
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    record("oom_splits", metrics.OOM_SPLITS._value.get() - splits, memory_before=before, memory_after=after)
    assert len(scores) == 8 and metrics.OOM_SPLITS._value.get() > splits
    assert after - before < 2**20


# -- the trainer ----------------------------------------------------------------------------------------------------
def causal_lm(folder, tokenizer_dir, init: float = 0.5, **shape):
    """A random causal LM of SmolLM2's vocabulary with the tokenizer beside it (init 0.5: peaked predictions)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    shape = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "positions": 2048} | shape
    config = llama_config(len(tokenizer), init=init, **shape)
    config.pad_token_id = tokenizer.pad_token_id
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def test_the_cuda_graph_decode_equals_eager_over_prompt_widths(tmp_path, tokenizer_dir, cuda, record):
    from transformers import AutoModelForCausalLM

    from rewardserve.trainer.rl.generation import RolloutEngine, Sampling
    from rewardserve.trainer.prompts import encode_prompt, pad_left

    folder, tokenizer = causal_lm(tmp_path, tokenizer_dir)
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(cuda).eval()
    graphs = RolloutEngine(policy, tokenizer.eos_token_id, tokenizer.pad_token_id, compute_dtype=None)
    eager = RolloutEngine(policy, tokenizer.eos_token_id, tokenizer.pad_token_id, compile_decode=False,
                          compute_dtype=None)
    sampled = RolloutEngine(policy, tokenizer.eos_token_id, tokenizer.pad_token_id)  # bf16 copy, compiled
    agree = []
    for words in (1, 9, 30, 70, 150, 300):
        prompts = [encode_prompt(tokenizer, "Tell me " + "more " * (words + k), 1024) for k in range(4)]
        ids, mask = (t.to(cuda) for t in pad_left(prompts, tokenizer.pad_token_id))
        compiled = graphs.generate(ids, mask, Sampling(16, temperature=0))
        assert compiled.path == "compiled"
        reference = eager.generate(ids, mask, Sampling(16, temperature=0)).responses
        agree.append(compiled.responses.tolist() == reference.tolist())
        assert sampled.generate(ids, mask, Sampling(16, temperature=1.0)).path == "compiled"
    record("decode_graphs", graphs.compiled_graphs, widths=6, equal_to_eager=agree)
    assert all(agree) and graphs.compiled_graphs <= 4


def test_a_bf16_checkpoint_trains_fp32_master_weights_on_cuda(tmp_path, tokenizer_dir, cuda, record):
    pytest.importorskip("pydantic_settings", reason="the trainer's configuration needs pydantic-settings")
    from transformers import AutoModelForCausalLM

    from rewardserve.trainer.rl.config import PPOConfig
    from rewardserve.trainer.rl.ppo import build_models

    folder, _ = causal_lm(tmp_path, tokenizer_dir)
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    config = PPOConfig(reward_url="http://127.0.0.1:9", policy=str(folder), batch_size=4, mini_batch_size=2)
    _, model, reference, engine = build_models(config, cuda)
    weights = model.policy.get_input_embeddings().weight
    before = weights.detach().clone()
    weights.grad = torch.randn_like(weights)
    torch.optim.AdamW([weights], lr=3e-6).step()
    moved = float((weights.detach() != before).float().mean())
    record("master_weights_moved", moved, dtype=str(weights.dtype))
    assert weights.dtype == torch.float32 and moved > 0.99
    assert {p.dtype for p in engine._sampler.parameters()} == {torch.bfloat16}


def test_fsdp_at_world_size_one_computes_bf16_with_log_probs_near_fp32(tmp_path, tokenizer_dir, cuda, record):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rewardserve.trainer.rl.distributed import group_backend
    from rewardserve.trainer.rl.estimators import gather_logprobs
    from rewardserve.trainer.rl.rollout import ActorCritic
    from rewardserve.trainer.rl.sharding import shard

    folder, _ = causal_lm(tmp_path, tokenizer_dir, init=0.02, hidden=576, layers=30, heads=9, kv_heads=3,
                          intermediate=1536)  # SmolLM2-135M's shape
    fp32 = ActorCritic(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)).to(cuda)
    sharded = ActorCritic(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)).to(cuda)
    dist.init_process_group(group_backend(cuda=True), store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard(sharded, None, cuda, torch.bfloat16)
        ids = torch.randint(5, 40000, (4, 256), device=cuda)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits, _ = sharded(ids, mask, 64)
            expected, _ = fp32(ids, mask, 64)
        gap = (gather_logprobs(logits, ids[:, 64:]) - gather_logprobs(expected, ids[:, 64:])).abs()
        record("fsdp_bf16_logprob_gap_mean", float(gap.mean()), max=float(gap.max()), target=1e-3)
        assert logits.dtype == torch.float32 and float(gap.mean()) <= 1e-3
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()  # gradients reduce in fp32 into fp32 shards
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in sharded.parameters())
    finally:
        dist.destroy_process_group()


def test_lora_on_cuda_trains_the_adapters_and_its_reference_is_the_base(tmp_path, tokenizer_dir, cuda, record):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from rewardserve.trainer.rl.lora import AdaptersOff, attach_adapters
    from rewardserve.trainer.rl.rollout import ActorCritic

    folder, _ = causal_lm(tmp_path, tokenizer_dir)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(cuda)
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapters = attach_adapters(policy, 8, 16, 0.0, ["q_proj", "v_proj"])
    model = ActorCritic(policy, adapters=adapters).to(cuda)
    reference = AdaptersOff(adapters)
    ids = torch.randint(5, 40000, (2, 32), device=cuda)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits, values = model(ids, torch.ones_like(ids), 8)
    (logits.float().logsumexp(-1).mean() + values.mean()).backward()
    optimizer.step()
    with torch.no_grad():
        gap = (reference(input_ids=ids).logits - base(input_ids=ids).logits).abs().max()
        moved = (model(ids, torch.ones_like(ids), 8)[0] - logits).abs().max()
    record("lora_reference_gap", float(gap), policy_moved=float(moved))
    assert float(gap) < 1e-4 and float(moved) > 0


def test_the_judge_rates_alike_on_every_path(tmp_path, tokenizer_dir, cuda, record):
    from transformers import AutoTokenizer

    from rewardserve.server.judge import load_judge
    from rewardserve.server.schemas import ScoreItem

    folder, _ = causal_lm(tmp_path, tokenizer_dir, init=0.02)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    judge, encoder = load_judge(str(folder), tokenizer, dtype="bfloat16", device="cuda", min_shared_prefix=32)
    items = [ScoreItem(prompt=f"Question {k}: what is {k} + {k}?", response=f"It is {2 * k + (k % 2)}.")
             for k in range(6)]
    sequences = [encoder.encode(item).input_ids for item in items]
    ratings = {}
    for forward in forward_paths(cuda, judge.packs):
        with judge.forward_path_as(forward), packing.strict_kernels():
            ratings[forward] = [r if isinstance(r, float) else r[0] for r in judge.score_batch(sequences)]
    record("judge_ratings", ratings)
    padded = ratings["padded"]
    for forward, values in ratings.items():
        assert max(abs(x - y) for x, y in zip(values, padded)) <= 2e-2 * 10, forward  # ratings run 1 to 10


# -- the server over its protocols -----------------------------------------------------------------------------------
def test_the_server_on_cuda_answers_http_and_grpc_as_the_core(tmp_path, tokenizer_dir, cuda, record, monkeypatch):
    """The real server on the card, calibrating its forward: HTTP and gRPC give the core's padded fp32-checked
    scores, and /info's path is one its forwards ran."""
    for module in ("fastapi", "uvicorn", "pydantic_settings", "grpc_health", "grpc_reflection"):
        pytest.importorskip(module, reason=f"the server needs {module}")
    import httpx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewardserve.server.schemas import ScoreItem
    from rewardserve.server.tokenization import ItemEncoder
    from rewardserve.trainer.client import RewardClient

    from ..conftest import ServerProcess

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = llama_config(len(tokenizer), hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    config.pad_token_id = tokenizer.pad_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.delenv("REWARDSERVE_FORWARD_PATH", raising=False)  # the tests' pins: this server calibrates
    monkeypatch.delenv("REWARDSERVE_MAX_BATCH_TOKENS", raising=False)
    server = ServerProcess(tmp_path, "--device", "cuda", "--calibration-budgets", "16384,32768", startup_timeout=300)
    try:
        items = [{"prompt": f"Say {k}", "response": "ok " * (k + 1)} for k in range(5)]
        http = httpx.post(f"{server.http_url}/score", json={"items": items}, timeout=60).json()
        info = httpx.get(f"{server.http_url}/info", timeout=30).json()
        grpc = RewardClient(server.grpc_url).score(items)
        core = RewardModel.load(str(tmp_path), dtype="bfloat16", device="cuda")
        encoder = ItemEncoder(tokenizer, core.max_length, "truncate")
        with core.forward_path_as("padded"):
            expected = core.score_batch([encoder.encode(ScoreItem(**item)).input_ids for item in items])
        record("server", {"http": http["scores"], "grpc": grpc.scores, "core": expected},
               forward_path=info["forward_path"], forwards=info.get("forwards"))
        assert http["scores"] == pytest.approx(expected, abs=tolerance(expected))
        assert grpc.scores == pytest.approx(http["scores"], abs=1e-6)
        assert info["forward_path"] in info.get("forwards", {})  # what it serves along is what ran
    finally:
        server.stop()


def test_a_pinned_compiled_kernel_is_checked_and_warmed_at_start(tmp_path, cuda, record):
    """--forward-path packed-flex with --max-batch-tokens: nothing is calibrated, so the start checks the kernel
    against padded and warms its shape classes (main.warm_pinned); a failure would be a one-line start error."""
    pytest.importorskip("pydantic_settings", reason="the server's configuration needs pydantic-settings")
    from rewardserve.server.config import ServeConfig
    from rewardserve.server.main import configure_forward

    model = RewardModel.load(save_family(tmp_path, "llama"), dtype="bfloat16", device="cuda")
    model.min_shared_prefix = 16
    config = ServeConfig(model=[str(tmp_path)], forward_path="packed-flex", max_batch_tokens=16384)
    began = time.perf_counter()
    calibration = configure_forward(model, config)
    record("pinned_warm_seconds", time.perf_counter() - began, forwards=dict(model.forwards_by_path))
    assert calibration.how.startswith("pinned") and model.forwards_by_path.get("packed-flex", 0) >= 3


def test_an_epochs_minibatch_indices_reach_the_gpu_in_one_pinned_copy(cuda):
    from rewardserve.trainer.rl.ppo import epoch_index_tensors

    parts = epoch_index_tensors([[3, 0, 5], [1, 4], [2]], cuda)
    assert [p.device.type for p in parts] == ["cuda"] * 3
    assert [p.tolist() for p in parts] == [[3, 0, 5], [1, 4], [2]]
