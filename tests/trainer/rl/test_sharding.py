"""--sharding fsdp on two CPU ranks (gloo), with and without LoRA: a PPO step equals the DDP one (losses, updated
weights), each rank holds half of DDP's bytes, and the saved policy loads with plain transformers and gives the
sharded model's logits (with LoRA, the adapter folder is written)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ...conftest import build_tiny_policy


@pytest.mark.parametrize("lora_rank", [0, pytest.param(8, marks=pytest.mark.slow)])  # LoRA under FSDP: 8 s more
def test_an_fsdp_step_equals_the_ddp_step_and_holds_half_the_bytes(tmp_path, smol_tokenizer, lora_rank):
    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    worker = Path(__file__).with_name("fsdp_worker.py")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
            str(policy), str(tmp_path), str(lora_rank)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)  # a hang is a failure
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["ddp"]["rollouts"] for r in ranks] == [3, 2]  # the ranks hold different numbers of rollouts
    for report in ranks:
        ddp, fsdp = report["ddp"], report["fsdp"]
        assert fsdp["old_logprobs"] == pytest.approx(ddp["old_logprobs"], abs=1e-5)  # the same rollouts
        for name, value in ddp["update"].items():
            assert fsdp["update"][name] == pytest.approx(value, abs=1e-5), name
        for part in ("parameters", "gradients", "optimizer", "reference"):
            if ddp["held"][part]:  # with LoRA the reference is the base: nothing
                assert fsdp["held"][part] / ddp["held"][part] == pytest.approx(0.5, abs=0.05), part
    assert ranks[0]["weights_gap"] < 1e-5  # the updated weights, gathered
    if lora_rank:
        assert (tmp_path / "policy" / "adapter_config.json").is_file()
    else:
        assert ranks[0]["saved_gap"] < 1e-5  # OUT/policy, loaded with plain transformers
