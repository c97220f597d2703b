"""`rewardserve bench {serve,train,ppo,all}`: one command that measures serving, reward-model training and PPO on
the machine it runs on, with no model download (random-weight shapes from built-in configs, or --model).

Writes OUT/bench.json (every figure, the device, the versions, the commit, the flags) and OUT/bench.md (the same as
tables), and prints the tables. Ratios are always between rows of the same run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rewardserve.server.modeling import resolve_device

from .config import BenchConfig
from . import ppo as ppo_part, serve as serve_part, train as train_part
from .common import Budget, environment, measure_peak, workload_g, workload_w, write_json
from .models import real_models, shape_models
from .report import markdown


def main(config: BenchConfig) -> dict:
    print("rewardserve bench " + json.dumps(config.printable(), indent=2), flush=True)
    device = resolve_device(config.device)
    began = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {message}", flush=True)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"environment": environment(device, config.printable())}
    progress(f"device: {result['environment']['device']}; measuring the matmul peak")
    result["peak"] = peak = measure_peak(device)
    progress(f"peak: {peak['flops'] / 1e12:.2f} TFLOP/s ({peak['matmul']})")
    on_gpu = device.type == "cuda"  # the reference sizes; a CPU gets smaller ones unless the flags say otherwise
    sequences = workload_w(config.sequences or (512 if on_gpu else 64))
    train_pairs = config.train_pairs or (None if on_gpu else 160)
    ppo_size = (config.ppo_rollouts or (64 if on_gpu else 16), config.ppo_new_tokens or (128 if on_gpu else 32))
    result["workload"] = {"name": "W", "sequences": len(sequences), "tokens": sum(map(len, sequences)),
                          "complete": len(sequences) == 512}
    groups = None
    if config.workload == "G":
        groups = workload_g(config.groups or (64 if on_gpu else 8))
        flat = [s for group in groups for s in group]
        result["workload"] = {"name": "G", "groups": len(groups), "sequences": len(flat),
                              "tokens": sum(map(len, flat)), "complete": len(groups) == 64}
    budget = Budget(config.budget_s)
    parts = ("serve", "train", "ppo") if config.part == "all" else (config.part,)
    cache = Path(config.cache) if config.cache else None
    for part in parts:
        result[part] = []
    specs = [config.model] if config.model else config.shapes
    for spec in specs:
        progress(f"models: {spec}")
        models = real_models(spec, device, cache) if config.model else shape_models(spec, config.tokenizer, device,
                                                                                      cache)
        if "serve" in parts and groups is not None:
            rows = serve_part.run_shared(models, groups, device, peak["flops"], budget, progress)
            result["serve"].append({"model": models.name, "rows": rows})
        elif "serve" in parts:
            rows, chosen = serve_part.run(models, sequences, device, peak["flops"], budget,
                                          config.stand_in_forward_us, progress)
            result["serve"].append({"model": models.name, "rows": rows, "server_forward": chosen})
        if "train" in parts:
            result["train"].append(train_part.run(models, Path(config.data_dir), train_pairs,
                                                  config.train_max_length, config.peer, progress))
        if "ppo" in parts:
            result["ppo"].append(ppo_part.run(models, device, *ppo_size, progress, config.advantage_estimator,
                                              config.samples_per_prompt, config.sharding))
        write_json(out / "bench.json", result)  # after each model, so a long run keeps what it measured
    result["seconds"] = time.perf_counter() - began
    write_json(out / "bench.json", result)
    tables = markdown(result)
    (out / "bench.md").write_text(tables)
    print(tables, flush=True)
    progress(f"done: {out / 'bench.json'}, {out / 'bench.md'}")
    return result
