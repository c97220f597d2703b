"""The real server shares a group's prompt: the scores are each item's alone, over HTTP (items as prompt + response
text, formatted with a left-padding tokenizer's chat template) and gRPC, and /metrics counts what was computed."""
from __future__ import annotations

import grpc
import httpx
import pytest

from rewardserve.proto import reward_pb2, reward_pb2_grpc

from ..conftest import ServerProcess, build_checkpoint

PROMPT = ("You are a careful assistant. Read the whole question before answering, and answer in plain words. "
          "Question: how do tides work, and why are there two of them a day in most places?")
RESPONSES = ["The moon pulls the oceans.", "Gravity from the moon and the sun raises two bulges of water.",
             "I don't know.", "The moon pulls the oceans.", "Tides come from the moon's pull and the Earth's spin."]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smol_tokenizer):
    checkpoint = build_checkpoint(tmp_path_factory.mktemp("llama-left"), "llama", smol_tokenizer, padding_side="left")
    process = ServerProcess(checkpoint, "--transform", "raw", "--min-shared-prefix", "16")
    yield process
    process.stop()


def test_a_group_in_one_request_scores_as_each_item_alone(server):
    info = httpx.get(f"{server.http_url}/info").json()
    assert info["min_shared_prefix"] == 16 and info["shared_prefix"].startswith("on")
    items = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
    alone = [httpx.post(f"{server.http_url}/score", json={"items": [item]}).json()["rewards"][0] for item in items]
    sent, computed = server.metric("rewardserve_model_tokens_total"), server.metric("rewardserve_computed_tokens_total")
    assert sent == computed  # one item a forward: nothing to share
    together = httpx.post(f"{server.http_url}/score", json={"items": items}).json()["rewards"]
    assert together == pytest.approx(alone, abs=1e-5)
    sent_now = server.metric("rewardserve_model_tokens_total") - sent
    computed_now = server.metric("rewardserve_computed_tokens_total") - computed
    assert computed_now < 0.5 * sent_now  # the prompt once, the repeated response once

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=i["prompt"], response=i["response"])
                                                 for i in items])
        reply = stub.Score(request, timeout=30)
    assert list(reply.rewards) == pytest.approx(alone, abs=1e-5)
