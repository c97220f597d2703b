"""Reward models people download that are not one-label transformers classes, behind a real server: a checkpoint
with its own modelling code (refused without --trust-remote-code, scored by its own forward with it), and a
num_labels = 3 head whose named outputs come back beside the reward chosen at start, over HTTP and gRPC."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from rewardserve.proto import reward_pb2, reward_pb2_grpc
from rewardserve.server.combinations import Objective
from rewardserve.server.errors import StartupError
from rewardserve.server.modeling import RewardModel
from rewardserve.trainer.client import RewardClient
from tests.conftest import ServerProcess, build_checkpoint
from tests.integration.test_startup_errors import assert_refused_in_one_line, run_cli

# The kind of file InternLM2's and ArmoRM's reward models ship: a config class, a model class registered through
# config.json's auto_map (AutoModel, as InternLM2 does), and an output object of its own whose reward is `score`.
OWN_CODE = '''
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class TinyRMConfig(PretrainedConfig):
    model_type = "tiny_rm"

    def __init__(self, vocab_size=1000, hidden_size=16, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


@dataclass
class TinyRMOutput(ModelOutput):
    score: torch.FloatTensor = None
    pooled: torch.FloatTensor = None


class TinyRewardModel(PreTrainedModel):
    config_class = TinyRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * weights).sum(1) / weights.sum(1)  # a masked mean: padding plays no part
        return TinyRMOutput(score=self.head(torch.tanh(pooled)), pooled=pooled)
'''
SEQUENCES = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [7]]
LABELS = {0: "helpful", 1: "honest", 2: "harmless"}


@pytest.fixture(scope="module")
def own_code_checkpoint(tmp_path_factory, smol_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("own-code")
    (folder / "modeling_tiny_rm.py").write_text(OWN_CODE)
    spec = importlib.util.spec_from_file_location("modeling_tiny_rm_for_writing", folder / "modeling_tiny_rm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    config = module.TinyRMConfig(pad_token_id=smol_tokenizer.pad_token_id)
    module.TinyRewardModel(config).save_pretrained(folder)
    settings = json.loads((folder / "config.json").read_text())
    settings["auto_map"] = {"AutoConfig": "modeling_tiny_rm.TinyRMConfig",
                            "AutoModel": "modeling_tiny_rm.TinyRewardModel"}
    (folder / "config.json").write_text(json.dumps(settings))
    smol_tokenizer.save_pretrained(folder)
    return folder


def plain_forward(folder: Path, sequence: list[int]) -> float:
    """The checkpoint's own code run by transformers, one unpadded sequence at a time."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([sequence])).score[0, 0].item()


def test_own_code_is_refused_without_the_flag_in_one_line(own_code_checkpoint):
    result, _ = run_cli("serve", "--model", str(own_code_checkpoint), "--device", "cpu", "--http-port", "0",
                        "--grpc-port", "0")
    assert_refused_in_one_line(result, "ships its own modelling code (modeling_tiny_rm.py)", "--trust-remote-code")


def test_own_code_scores_as_its_plain_forward_over_http_and_grpc(own_code_checkpoint):
    server = ServerProcess(own_code_checkpoint, "--trust-remote-code", "--output-field", "score")
    try:
        assert "runs its own code: modeling_tiny_rm.py" in server.output()
        expected = [plain_forward(own_code_checkpoint, s) for s in SEQUENCES]
        for url in (server.http_url, server.grpc_url):
            with RewardClient(url) as client:
                result = client.score([{"input_ids": s} for s in SEQUENCES])  # one padded batch of four lengths
            assert result.scores == pytest.approx(expected, abs=1e-5), url
            assert result.outputs is None
        info = httpx.get(f"{server.http_url}/info", timeout=10).json()
        digest = hashlib.sha256((own_code_checkpoint / "modeling_tiny_rm.py").read_bytes()).hexdigest()
        assert info["code_files"] == {"modeling_tiny_rm.py": digest}
        stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        assert dict(stub.Info(reward_pb2.InfoRequest(), timeout=10).default_model.code_files) == info["code_files"]
        assert info["forward_path"] == "padded" and info["architecture"] == "TinyRewardModel"
    finally:
        server.stop()


def test_an_output_field_the_code_does_not_return_is_refused_with_the_fields_it_has(own_code_checkpoint):
    with pytest.raises(StartupError, match=r"without a tensor 'logits' \(its fields: score, pooled\); pass"
                                           " --output-field"):
        RewardModel.load(str(own_code_checkpoint), trust_remote_code=True)  # the default field, `logits`


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory, smol_tokenizer) -> Path:
    folder = build_checkpoint(tmp_path_factory.mktemp("three-labels"), "llama", smol_tokenizer)
    settings = json.loads((folder / "config.json").read_text())
    settings |= {"id2label": {str(k): v for k, v in LABELS.items()}, "label2id": {v: k for k, v in LABELS.items()}}
    (folder / "config.json").write_text(json.dumps(settings))
    # the one-label head built above is replaced by a three-label one, trained weights as they come
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, ignore_mismatched_sizes=True)
    model.save_pretrained(folder)
    return folder


def test_three_labels_need_an_objective_that_names_their_outputs(three_labels):
    with pytest.raises(StartupError, match=r"has 3 outputs \(helpful, honest, harmless\); choose its reward with"
                                           " --objective NAME"):
        RewardModel.load(str(three_labels))
    with pytest.raises(StartupError, match="--objective-weights names kind, not outputs of model"):
        RewardModel.load(str(three_labels), objective=Objective(weights={"helpful": 0.5, "kind": 0.5}))


def test_three_named_outputs_and_the_chosen_reward_over_http_and_grpc(three_labels):
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(three_labels, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [plain(torch.tensor([s])).logits[0].tolist() for s in SEQUENCES]
    server = ServerProcess(three_labels, "--objective-weights", "helpful=0.7,harmless=0.3")
    try:
        for url in (server.http_url, server.grpc_url):
            with RewardClient(url) as client:
                result = client.score([{"input_ids": s} for s in SEQUENCES])
            assert set(result.outputs) == set(LABELS.values())  # gRPC's map has no order
            for k, name in LABELS.items():
                assert result.outputs[name] == pytest.approx([row[k] for row in expected], abs=1e-4), (url, name)
            reward = [0.7 * row[0] + 0.3 * row[2] for row in expected]
            assert result.scores == pytest.approx(reward, abs=1e-4), url
        info = httpx.get(f"{server.http_url}/info", timeout=10).json()
        assert info["outputs"] == ["helpful", "honest", "harmless"]
        assert info["objective"] == "0.7*helpful + 0.3*harmless"
    finally:
        server.stop()
