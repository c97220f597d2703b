"""Our reward functions for TRL and verl, called the way those trainers call them, against the real server."""
from __future__ import annotations

import httpx
import pytest

from rewardserve.trainer import integrations
from rewardserve.trainer.integrations import RewardServerFunction, verl_reward


def test_trl_reward_function_standard_and_conversational(running_server):
    direct = httpx.post(f"{running_server.http_url}/score", json={"items": [
        {"prompt": "Hi", "response": "Hello!"}, {"prompt": "Hi", "response": "Go away."}]}).json()["rewards"]
    reward = RewardServerFunction(running_server.http_url)
    assert reward(["Hi", "Hi"], ["Hello!", "Go away."], completion_ids=None) == pytest.approx(direct, abs=1e-5)
    conversational = RewardServerFunction(running_server.grpc_url)(
        [[{"role": "user", "content": "Hi"}]] * 2,
        [[{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "Go away."}]])
    assert conversational == pytest.approx(direct, abs=1e-5)


def test_verl_compute_score(running_server, monkeypatch):
    monkeypatch.setenv("REWARDSERVE_REWARD_URL", running_server.http_url)
    monkeypatch.setattr(verl_reward, "_verl_client", None)
    score = integrations.compute_score("gsm8k", "Hello!", "ignored", extra_info={"prompt": "Hi"})
    direct = httpx.post(f"{running_server.http_url}/score",
                        json={"items": [{"prompt": "Hi", "response": "Hello!"}]}).json()["rewards"][0]
    assert score == pytest.approx(direct, abs=1e-5)


@pytest.mark.parametrize("module_name", ["rewardserve.trainer.integrations.verl_reward",
                                         "rewardserve.trainer.verl_reward"])  # the old path, kept for one release
def test_verl_loads_our_reward_file_by_path(running_server, monkeypatch, module_name):
    """Exactly as verl's get_custom_reward_fn does: the path printed by the README's one-liner, loaded with
    spec_from_file_location as "custom_module", executed outside any package, its function called."""
    import importlib.util
    import subprocess
    import sys

    path = subprocess.run([sys.executable, "-c", f"import {module_name} as m; print(m.__file__)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    spec = importlib.util.spec_from_file_location("custom_module", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "custom_module", module)
    spec.loader.exec_module(module)
    monkeypatch.setenv("REWARDSERVE_REWARD_URL", running_server.http_url)
    monkeypatch.setattr(verl_reward, "_verl_client", None)
    score = getattr(module, "compute_score")("gsm8k", "Hello!", "ignored", extra_info={"prompt": "Hi"})
    direct = httpx.post(f"{running_server.http_url}/score",
                        json={"items": [{"prompt": "Hi", "response": "Hello!"}]}).json()["rewards"][0]
    assert score == pytest.approx(direct, abs=1e-5)


def test_the_package_module_cannot_be_loaded_by_path():
    """Why the file above exists: the package's other modules import relatively, and fail the way verl reports it."""
    import importlib.util

    from rewardserve.trainer.integrations import trl

    spec = importlib.util.spec_from_file_location("custom_module", trl.__file__)
    with pytest.raises(ImportError, match="relative import"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_trl_grpo_trainer_runs_with_our_reward_function(running_server, smol_tokenizer, tmp_path):
    """A few real GRPOTrainer steps on the CPU, every reward from the server: its /metrics show the requests."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from ..conftest import build_tiny_policy

    def ok_requests() -> float:
        lines = httpx.get(f"{running_server.http_url}/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith('rewardserve_requests_total{outcome="ok",'))

    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    prompts = Dataset.from_list([{"prompt": f"Say something about {w}."} for w in ("cats", "dogs", "rain", "tea")])
    config = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                        max_completion_length=8, max_steps=2, learning_rate=1e-4, logging_steps=1, report_to="none",
                        use_cpu=True, save_strategy="no")
    before = ok_requests()
    trainer = GRPOTrainer(model=str(policy), reward_funcs=[RewardServerFunction(running_server.http_url)], args=config,
                          train_dataset=prompts, processing_class=smol_tokenizer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/rewardserve/mean" in h]
    assert len(logged) == 2 and all(abs(h["rewards/rewardserve/mean"]) > 0 for h in logged)
    assert ok_requests() - before == 2  # one batched request per step


def test_slime_custom_reward_function(running_server):
    import asyncio
    from types import SimpleNamespace

    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    sample = SimpleNamespace(prompt=prompt, response="Hello!", label=None)
    score = asyncio.run(integrations.slime_reward(SimpleNamespace(rm_url=running_server.grpc_url), sample))
    direct = httpx.post(f"{running_server.http_url}/score",
                        json={"items": [{"text": prompt + "Hello!"}]}).json()["rewards"][0]
    assert score == pytest.approx(direct, abs=1e-5)
    conversation = SimpleNamespace(prompt=[{"role": "user", "content": "Hi"}], response="Hello!", label=None)
    by_messages = asyncio.run(integrations.slime_reward(SimpleNamespace(rm_url=running_server.http_url), conversation))
    direct = httpx.post(f"{running_server.http_url}/score", json={"items": [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]}).json()["rewards"][0]
    assert by_messages == pytest.approx(direct, abs=1e-5)
