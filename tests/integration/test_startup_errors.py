"""Start-up errors are one line and a non-zero exit: `--device cuda` without a GPU (the device is never chosen
silently), and a folder that is not a reward model."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def run_cli(*args: str, env_device: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = None
    if env_device:
        import os

        env = os.environ | {"REWARDSERVE_DEVICE": env_device}
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rewardserve.trainer.cli", *args], capture_output=True, text=True,
                            timeout=120, env=env)
    return result, time.perf_counter() - began


def assert_refused_in_one_line(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and " INFO " not in line and not line.startswith("INFO:")]  # ours, and uvicorn's
    assert len(lines) == 1, result.stderr
    assert all(phrase in lines[0] for phrase in phrases), lines[0]
    assert "Traceback" not in result.stderr


@no_gpu
def test_serve_refuses_cuda_without_a_gpu_before_loading_anything(tmp_path):
    # The folder does not exist: a refusal that came after loading would complain about it instead.
    result, seconds = run_cli("serve", "--model", str(tmp_path / "absent"), "--device", "cuda", "--http-port", "0")
    assert_refused_in_one_line(result, "sees no GPU", "--device cpu")
    assert seconds < 60


@no_gpu
def test_ppo_refuses_cuda_from_the_environment_without_a_gpu(tmp_path):
    result, _ = run_cli("ppo", "--reward-url", "http://127.0.0.1:9", "--policy", str(tmp_path / "absent"),
                        "--out", str(tmp_path / "run"), env_device="cuda")
    assert_refused_in_one_line(result, "sees no GPU", "--device cpu")


@no_gpu
def test_auto_falls_back_to_the_cpu_with_one_warning(caplog, monkeypatch):
    from rewardserve.server import modeling

    monkeypatch.setattr(modeling, "_warned_no_gpu", False)
    with caplog.at_level("WARNING"):
        assert modeling.resolve_device("auto").type == "cpu"
        assert modeling.resolve_device("auto").type == "cpu"  # a second model, a second stage: no second warning
    assert [record.getMessage() for record in caplog.records].count(
        f"--device auto: torch {torch.__version__} sees no GPU (a CPU-only build of torch); running on the CPU") == 1


@pytest.mark.slow  # 7 s (a model loads); the one-line refusals of flags stay in the default suite
def test_transform_debias_without_a_length_fit_is_refused_in_one_line(tiny_llama):
    """Refused once the checkpoint's config is read (after its weights load): the last line says why, no traceback."""
    result, _ = run_cli("serve", "--model", str(tiny_llama), "--transform", "debias", "--http-port", "0",
                        "--grpc-port", "0", "--device", "cpu")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[-1].startswith("rewardserve: --transform debias needs the checkpoint's length fit"), lines[-1]


def test_serving_a_causal_lm_says_what_it_is_and_what_to_do(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    from ..conftest import tiny_config

    folder = tmp_path / "causal-lm"
    AutoModelForCausalLM.from_config(tiny_config("llama", len(smol_tokenizer), smol_tokenizer.pad_token_id)
                                     ).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    result, _ = run_cli("serve", "--model", str(folder), "--device", "cpu", "--http-port", "0", "--grpc-port", "0")
    assert_refused_in_one_line(result, "is a causal language model (LlamaForCausalLM)",
                               f"rewardserve train --base {folder}")


def test_bad_flags_and_missing_models_are_one_line_each(tmp_path):
    result, _ = run_cli("serve", "--model", f"a={tmp_path}", "--model", f"a={tmp_path}")
    assert_refused_in_one_line(result, "two models are named alike", "--model NAME=DIR")
    result, _ = run_cli("serve", "--model", str(tmp_path), "--combination", "mix=median a b")
    assert_refused_in_one_line(result, "unknown kind 'median'")
    result, _ = run_cli("ppo", "--reward-url", "http://127.0.0.1:9", "--steps", "0")
    assert_refused_in_one_line(result, "--steps: Input should be greater than 0")
    result, _ = run_cli("serve", "--model", f"helpful={tmp_path / 'absent'}", "--device", "cpu", "--http-port", "0")
    assert_refused_in_one_line(result, "no checkpoint folder at", "model 'helpful'")


def test_pickle_only_checkpoint_is_refused_with_the_conversion(tiny_llama, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_llama, tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    result, seconds = run_cli("serve", "--model", str(folder), "--device", "cpu", "--http-port", "0",
                              "--grpc-port", "0")
    assert_refused_in_one_line(result, "pickle weights only (pytorch_model.bin)", "refused on purpose",
                               ".save_pretrained(")
    assert "listening" not in result.stderr  # refused before the ports open


def test_hub_id_out_of_reach_is_one_line(tmp_path):
    """HF_HUB_OFFLINE makes the hub unreachable on any machine; the refusal says what to do, without retries."""
    import os

    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rewardserve.trainer.cli", "serve", "--model",
                             "someone/reward-model-that-is-not-cached", "--device", "cpu", "--http-port", "0",
                             "--grpc-port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert_refused_in_one_line(result, "'someone/reward-model-that-is-not-cached' is not a local folder",
                               "pass a checkpoint folder")
    assert time.perf_counter() - began < 30


def test_ppo_with_a_policy_folder_that_is_not_there_is_one_line(running_server, tmp_path):
    result, _ = run_cli("ppo", "--reward-url", running_server.http_url, "--policy", str(tmp_path / "no-such-folder"),
                        "--out", str(tmp_path / "run"), "--device", "cpu")
    assert_refused_in_one_line(result, f"--policy: no model folder at {tmp_path / 'no-such-folder'}")


def test_off_switches_take_none_as_the_help_says():
    from rewardserve.trainer.rl.config import PPOConfig

    for word in ("none", "None", "null"):
        config = PPOConfig(reward_url="http://x:1", reward_clip=word, missing_eos_penalty=word)
        assert config.reward_clip is None and config.missing_eos_penalty is None
    assert PPOConfig(reward_url="http://x:1", reward_clip="5").reward_clip == 5.0
