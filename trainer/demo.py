"""The main job, end to end on the embedded defaults:

0. split   the prompt set: every fifth prompt is held out, never used in PPO -> OUT/prompts/
1. label   AI-labelled preferences (by default the relevance judge)         -> OUT/prefs.jsonl
2. train   a Bradley–Terry reward model on them                            -> OUT/rm/
3. serve   the reward model, as its own process, on a free loopback port
4. ppo     the policy against that server, over HTTP                        -> OUT/ppo/
           with --refresh-every N, every N steps: label the current policy's completions, train the reward
           model further on old plus new pairs, hot-reload it into the running server, continue -> OUT/refresh-K/
5. compare the trained policy against the starting one on the held-out prompts: win rates under the reward
           model, the AI judge in both orders and the relevance judge       -> OUT/compare/
6. report  what each stage achieved and where its outputs are              -> OUT/summary.json

Each stage's output is cached: a second run skips what is done (--fresh redoes everything).
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from .config import CompareConfig, DemoConfig
from .rl.config import PPOConfig
from .rm.config import LabelConfig, RMTrainConfig


def main(config: DemoConfig) -> dict:
    print("rewardserve demo " + json.dumps(config.printable(), indent=2), flush=True)
    out = Path(config.out)
    if config.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.perf_counter()
    split_prompts(out)
    if "label" in config.stages:
        timings["label"] = run_stage("label", out / "prefs.jsonl", lambda: label(config, out))
    if "train" in config.stages:
        timings["train"] = run_stage("train", out / "rm" / "config.json", lambda: train(config, out))
    if "ppo" in config.stages:
        done = out / "ppo" / ("refreshes.json" if config.refresh_every else "policy/config.json")
        timings["serve+ppo"] = run_stage("ppo", done, lambda: ppo(config, out))
    if "compare" in config.stages:
        timings["serve+compare"] = run_stage("compare", out / "compare" / "summary.json", lambda: compare(config, out))
    timings["total"] = round(time.perf_counter() - started, 1)
    summary = report(out, timings)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_stage(name: str, done_marker: Path, stage) -> float | None:
    if done_marker.exists():
        print(f"== {name}: cached ({done_marker} exists; --fresh redoes it)", flush=True)
        return None
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    stage()
    return round(time.perf_counter() - started, 1)


def split_prompts(out: Path) -> None:
    """The built-in prompts, every fifth held out (each kind of prompt on both sides), the rest shuffled once so
    that labelling's first N and PPO's batches mix the kinds: OUT/prompts/{train,held_out}.jsonl."""
    from .prompts import load_prompts

    prompts = load_prompts("builtin")
    held_out = [p for i, p in enumerate(prompts) if i % 5 == 4]
    train = [p for i, p in enumerate(prompts) if i % 5 != 4]
    random.Random(0).shuffle(train)
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("held_out", held_out)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))


def label(config: DemoConfig, out: Path) -> None:
    from .rm.labeling import main as label_main

    summary = label_main(label_config(config, out, out / "prefs.jsonl", config.policy, config.label_prompts,
                                      config.seed))
    (out / "label_summary.json").write_text(json.dumps(summary, indent=2))


def label_config(config: DemoConfig, out: Path, prefs: Path, policy: str, prompts: int, seed: int) -> LabelConfig:
    """The training split's first `prompts` prompts, answered by `policy`, judged as the demo's settings say."""
    return LabelConfig(out=str(prefs), prompts=str(out / "prompts" / "train.jsonl"), policy=policy,
                       judge_mode=config.label_judge_mode, judge=label_judge(config), max_prompts=prompts,
                       responses_per_prompt=config.label_responses, labels=config.label_form,
                       max_new_tokens=config.max_new_tokens, device=config.device, seed=seed)


def label_judge(config: DemoConfig) -> str:
    return config.label_judge or ("minilm" if config.label_judge_mode == "relevance" else config.judge)


def train(config: DemoConfig, out: Path) -> None:
    from .rm.train import main as train_main

    train_main(RMTrainConfig(base=config.base, data=[str(out / "prefs.jsonl")], out=str(out / "rm"),
                             epochs=config.rm_epochs, lr=config.rm_lr, batch_size=8, max_length=config.rm_max_length,
                             eval_fraction=config.rm_eval_fraction, warmup_ratio=0.1, log_every=1,
                             device=config.device, seed=config.seed))


# What the server's start-up calibration chose for the demo's reward model on a 2-core CPU (packed SDPA at 16k tokens:
# 5,918 tokens/s against 5,111 padded, README), pinned so that each of the demo's two servers starts without the
# 18 s of measuring
SERVER_FLAGS = ("--forward-path", "packed", "--max-batch-tokens", "16384")


def ppo(config: DemoConfig, out: Path) -> None:
    from .rl.ppo import main as ppo_main

    if config.refresh_every is not None:
        return ppo_with_refreshes(config, out)
    with reward_server(out / "rm", out / "server.log", SERVER_FLAGS) as url:
        ppo_main(ppo_config(config, out, url, config.ppo_steps))


def ppo_config(config: DemoConfig, out: Path, url: str, steps: int, resume: bool = False) -> PPOConfig:
    # one minibatch, one epoch: one optimiser step per batch of rollouts, on-policy (an AdamW step over 135M
    # parameters costs seconds on a CPU)
    return PPOConfig(reward_url=[url], policy=config.policy, prompts=str(out / "prompts" / "train.jsonl"),
                     out=str(out / "ppo"), steps=steps, batch_size=config.ppo_batch_size,
                     mini_batch_size=config.ppo_batch_size,
                     ppo_epochs=1, lr=config.ppo_lr, lr_warmup_steps=config.ppo_lr_warmup_steps, beta=config.ppo_beta,
                     max_new_tokens=config.max_new_tokens,
                     missing_eos_penalty=config.missing_eos_penalty,
                     advantage_estimator=config.advantage_estimator, samples_per_prompt=config.samples_per_prompt,
                     device=config.device, seed=config.seed, save_every=max(1, config.ppo_steps // 2),
                     resume=resume)


def compare(config: DemoConfig, out: Path) -> None:
    """The trained policy (B) against the starting one (A) on the held-out prompts, sampled as PPO samples."""
    from .compare import main as compare_main

    with reward_server(out / "rm", out / "compare-server.log", SERVER_FLAGS) as url:
        compare_main(CompareConfig(policy_a=config.policy, policy_b=str(out / "ppo" / "policy"),
                                   prompts=str(out / "prompts" / "held_out.jsonl"), reward_url=[url],
                                   judge=config.judge, samples=config.compare_samples,
                                   relevance_judge=label_judge(config) if config.label_judge_mode == "relevance"
                                   else None,
                                   max_new_tokens=config.max_new_tokens, out=str(out / "compare"),
                                   device=config.device, seed=config.seed))


def ppo_with_refreshes(config: DemoConfig, out: Path) -> None:
    """PPO in runs of --refresh-every steps against one server that never stops; between two runs the reward model
    is refreshed and hot-reloaded, and PPO resumes from its checkpoint."""
    from .rl.ppo import main as ppo_main

    admin_key = secrets.token_urlsafe(16)
    reward_model, refreshes, done = out / "rm", [], 0
    with reward_server(out / "rm", out / "server.log", [*SERVER_FLAGS, "--allow-reload-from", str(out)],
                       # in the environment, not the command line: no `ps` shows it, and a key that begins with
                       # "-" (token_urlsafe's alphabet has it) is not mistaken for a flag
                       {"REWARDSERVE_ADMIN_KEY": admin_key}) as url:
        while done < config.ppo_steps:
            steps = min(config.ppo_steps, done + config.refresh_every)
            ppo_main(ppo_config(config, out, url, steps, resume=done > 0))
            done = steps
            if done < config.ppo_steps:
                reward_model, record = refresh(config, out, reward_model, url, admin_key, len(refreshes) + 1, done)
                refreshes.append(record)
    (out / "ppo" / "refreshes.json").write_text(json.dumps(refreshes, indent=2))


def refresh(config: DemoConfig, out: Path, reward_model: Path, url: str, admin_key: str, number: int,
            after_step: int) -> tuple[Path, dict]:
    """label (the current policy's completions) -> train --init-from the served model on old + new pairs -> reload."""
    from .rm.labeling import main as label_main
    from .rm.train import main as train_main

    folder = out / f"refresh-{number}"
    print(f"== refresh {number}, after PPO step {after_step}: label the policy's completions, train on old + new"
          " pairs, reload", flush=True)
    labels = label_main(label_config(config, out, folder / "prefs.jsonl", str(out / "ppo" / "policy"),
                                     config.refresh_prompts, config.seed + number))
    data = [str(out / "prefs.jsonl")] + [str(out / f"refresh-{k}" / "prefs.jsonl") for k in range(1, number + 1)]
    report = train_main(RMTrainConfig(init_from=str(reward_model), data=data, out=str(folder / "rm"), epochs=1,
                                      lr=config.rm_lr, batch_size=8, max_length=config.rm_max_length,
                                      eval_fraction=config.rm_eval_fraction, warmup_ratio=0.1, log_every=1,
                                      device=config.device, seed=config.seed))
    reply = httpx.post(f"{url}/admin/reload", json={"path": str(folder / "rm")},
                       headers={"Authorization": f"Bearer {admin_key}"}, timeout=600)
    if reply.status_code != 200:
        raise SystemExit(f"the refreshed reward model was not reloaded: {reply.text}")
    reloaded = reply.json()
    print(f"reloaded the reward model: {reloaded['old_version']} -> {reloaded['new_version']}"
          f" in {reloaded['seconds']:.1f} s, while the server kept serving", flush=True)
    return folder / "rm", {"after_step": after_step, "new_pairs": labels["rows_written"], "training_files": data,
                           "held_out_accuracy": report["accuracy"], **reloaded}


@contextmanager
def reward_server(model: Path, log_path: Path, flags: list[str] = (), environment: dict | None = None,
                  startup_timeout: float = 300):
    """`rewardserve serve` as its own process on a free loopback port; stopped (SIGTERM, drained) on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "rewardserve.trainer.cli", "serve", "--model", str(model),
                                   "--http-port", str(port), "--grpc-port", "0", *flags], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, **(environment or {})})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, server, startup_timeout, log_path)
            print(f"reward server ready at {url} (log: {log_path})", flush=True)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=60)


def wait_ready(url: str, server: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the reward server exited with {server.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the reward server was not ready within {timeout} s; see {log_path}")


def report(out: Path, timings: dict) -> dict:
    """The summary a user reads first: one number per stage, and where everything is."""
    def read(path: Path):
        return json.loads(path.read_text()) if path.exists() else {}

    labels, rm, compared = read(out / "label_summary.json"), read(out / "rm" / "eval_report.json"), \
        read(out / "compare" / "summary.json")
    rm_std = read(out / "rm" / "config.json").get("reward_statistics", {}).get("std")
    metrics_path = out / "ppo" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    summary = {
        "labelling": {"judge_mode": labels.get("judge_mode"), "rows": labels.get("rows_written"),
                      **{key: labels.get(key) for key in ("consistency_rate", "consistency_rate_debiased",
                                                          "judge_position_bias_logit", "judge_content_signal_logit",
                                                          "judge_answer_mass")}},
        "reward_model": {"held_out_accuracy": rm.get("accuracy"), "held_out_pairs": rm.get("pairs"),
                         "length_only_accuracy": rm.get("length_only_accuracy"), "score_std": rm_std},
        "ppo": ppo_figures(metrics),
        "held_out_comparison": comparison_figures(compared),
        "refreshes": read(out / "ppo" / "refreshes.json") or None,
        "seconds_per_stage": timings,
        "outputs": {"preferences": str(out / "prefs.jsonl"), "reward_model": str(out / "rm"),
                    "reward_model_plot": str(out / "rm" / "training.png"), "ppo_metrics": str(metrics_path),
                    "ppo_plot": str(out / "ppo" / "ppo.png"), "policy": str(out / "ppo" / "policy"),
                    "comparisons": str(out / "compare" / "comparisons.jsonl"),
                    "win_rate_plot": str(out / "compare" / "win_rates.png")},
    }
    print("\n== summary\n" + json.dumps(summary, indent=2), flush=True)
    return summary


def ppo_figures(metrics: list[dict]) -> dict:
    """Did PPO move? The mean reward of the last quarter of steps against the first quarter's. The server whitens
    with the reward model's own score statistics, so rewards are in units of its score std, and the gain is too."""
    if not metrics:
        return {"steps": 0}
    quarter = max(1, len(metrics) // 4)

    def mean(key, rows):
        return round(sum(m[key] for m in rows) / len(rows), 4)

    first, last = mean("reward_mean", metrics[:quarter]), mean("reward_mean", metrics[-quarter:])
    return {"steps": len(metrics), "advantage_estimator": metrics[-1].get("advantage_estimator"),
            "beta": metrics[-1]["beta"], "reward_first_quarter": first, "reward_last_quarter": last,
            "reward_gain_in_rm_std": round(last - first, 4),
            "kl_mean": mean("kl", metrics), "kl_last_quarter": mean("kl", metrics[-quarter:]),
            "response_length_first_quarter": mean("response_length", metrics[:quarter]),
            "response_length_last_quarter": mean("response_length", metrics[-quarter:]),
            "reward_model_changed_at_steps": [m["step"] for m in metrics if m.get("model_version_changed")]}


def comparison_figures(compared: dict) -> dict | None:
    if not compared:
        return None
    return {"prompts": compared["prompts"], "comparisons": compared["comparisons"],
            **{f"win_rate_{name}": [compared[name]["rate"], compared[name]["low"], compared[name]["high"]]
               for name in ("reward", "judge", "relevance") if name in compared},
            "mean_length_tokens": compared["mean_length_tokens"], "mean_reward": compared["mean_reward"],
            **({"mean_relevance": compared["mean_relevance"]} if "mean_relevance" in compared else {})}
