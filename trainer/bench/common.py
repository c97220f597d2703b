"""What every part of `rewardserve bench` shares: workload W, the named model shapes, the device's peak, the
machine's description, timing rules, and the server process the serve and ppo parts talk to.

Timing rules, the same for every row: a warm-up pass, then at least two timed passes; a row's figure is its best
pass. `--budget-s` only trims the passes beyond those (up to `MAX_PASSES`), never a row.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import torch

from rewardserve.server.modeling import synchronize

MAX_PASSES = 5

# Llama-architecture shapes: hidden, intermediate, layers, attention heads, KV heads (vocabulary: the tokenizer's).
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),  # SmolLM2-135M
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),  # Llama-3.2-1B
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),  # Llama-3-8B
}


def workload_w(count: int = 512) -> list[list[int]]:
    """The reference RL-scoring workload: 512 sequences of log-normal lengths (mean about 628 tokens).

    Kept exactly as specified so that figures compare across versions; `count` < 512 takes its first items.
    """
    g = torch.Generator().manual_seed(1)
    lengths = torch.clamp(torch.exp(0.7 * torch.randn(512, generator=g) + math.log(500)), 32, 2048).long()
    sequences = [torch.randint(5, 32000, (int(length),), generator=g).tolist() for length in lengths]
    return sequences[:count]


def workload_g(groups: int = 64) -> list[list[list[int]]]:
    """The shared-prompt workload: 64 prompts of W-like length, each with 8 responses (a GRPO group), every
    sequence the prompt then a response; one group per request. `groups` < 64 takes its first groups.

    From one generator (seed 2): the 64 prompt lengths, then for each prompt its 8 response lengths, its prompt's
    token ids and its responses' token ids, in that order."""
    g = torch.Generator().manual_seed(2)
    prompt_lengths = torch.clamp(torch.exp(0.7 * torch.randn(64, generator=g) + math.log(500)), 32, 2048).long()
    workload = []
    for prompt_length in prompt_lengths:
        response_lengths = torch.clamp(torch.exp(0.6 * torch.randn(8, generator=g) + math.log(150)), 16, 1024).long()
        prompt = torch.randint(5, 32000, (int(prompt_length),), generator=g).tolist()
        workload.append([prompt + torch.randint(5, 32000, (int(n),), generator=g).tolist() for n in response_lengths])
    return workload[:groups]


# -- the machine ----------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def measure_peak(device: torch.device) -> dict:
    """FLOP/s of one large matmul: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU (best of a few)."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(4 if device.type == "cuda" else 3):
        synchronize(device)
        began = time.perf_counter()
        for _ in range(5 if device.type == "cuda" else 1):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - began) / (5 if device.type == "cuda" else 1))
    return {"matmul": f"{str(dtype).removeprefix('torch.')} {size}^3", "flops": 2 * size**3 / best}


def environment(device: torch.device, flags: dict) -> dict:
    import transformers

    return {"device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": git_commit(), "flags": flags,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def git_commit() -> str | None:
    """The project's commit when run from a checkout (the installed package has none)."""
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() + ("+dirty" if dirty else "")) if result.returncode == 0 else None


# -- timing ---------------------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """Seconds left for optional repetitions; the required ones always run."""

    seconds: float
    started: float = 0.0

    def __post_init__(self):
        self.started = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


def best_of_passes(run_pass: Callable[[], dict], budget: Budget, key: str = "seconds") -> tuple[dict, int]:
    """One warm-up pass, then two timed passes, then more while the budget lasts; returns (best pass, passes)."""
    warmup = run_pass()
    passes = [run_pass(), run_pass()]
    while len(passes) < MAX_PASSES and budget.left() > 3 * min(p[key] for p in passes) + warmup[key]:
        passes.append(run_pass())
    return min(passes, key=lambda p: p[key]), len(passes)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# -- a server of our own, in its own process -------------------------------------------------------------------------
class ServerProcess:
    """`rewardserve serve` on free loopback ports, with its log kept; stopped with SIGTERM on exit."""

    READY = re.compile(r"rewardserve ready: .* http=https?://[^:]+:(\d+) grpc=(?:[^:]+:(\d+)|off)")

    def __init__(self, model: str, *flags: str, startup_timeout: float = 600):
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.http_port = self.grpc_port = 0
        command = [sys.executable, "-m", "rewardserve.trainer.cli", "serve", "--model", model, "--host", "127.0.0.1",
                   "--http-port", "0", "--grpc-port", "-1", *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(startup_timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("the reward server did not start:\n" + "\n".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if match := self.READY.search(line):
                self.http_port, self.grpc_port = int(match.group(1)), int(match.group(2) or 0)
                self._ready.set()
        self._ready.set()  # the process ended

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def info(self) -> dict:
        return httpx.get(f"{self.http_url}/info", timeout=30).json()

    def metric(self, name: str) -> float:
        """A counter from the server's /metrics (sum over its labels)."""
        text = httpx.get(f"{self.http_url}/metrics", timeout=30).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and (line[len(name)] in " {"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2))
