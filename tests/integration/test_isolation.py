"""No client can change or break another's scores, on a real server: an item longer than a model's positions, a
token the model has no embedding for, a request larger than the queue, a checkpoint that scores NaN; and the
answers that say so are the same over HTTP and gRPC."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardserve.proto import reward_pb2, reward_pb2_grpc
from tests.conftest import ServerProcess, build_checkpoint

API_KEY, ADMIN = "client-key", "admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def with_statistics(folder: Path) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["reward_statistics"] = {"mean": 0.0, "std": 1.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smol_tokenizer, minilm_dir) -> dict[str, Path]:
    """bert and gpt2: 256 positions each. extra: a Llama whose tokenizer knows one token more than its embeddings.
    nan: a Llama whose head is NaN, to reload."""
    root = tmp_path_factory.mktemp("isolation")
    built = {"bert": with_statistics(build_checkpoint(root / "bert", "bert", AutoTokenizer.from_pretrained(minilm_dir))),
             "gpt2": with_statistics(build_checkpoint(root / "gpt2", "gpt2", smol_tokenizer)),
             "extra": build_checkpoint(root / "extra", "llama", smol_tokenizer)}
    grown = AutoTokenizer.from_pretrained(built["extra"])
    grown.add_tokens(["<|reward|>"])
    grown.save_pretrained(built["extra"])
    nan = build_checkpoint(root / "nan", "llama", smol_tokenizer, seed=3)
    model = AutoModelForSequenceClassification.from_pretrained(nan)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(nan)
    return built | {"nan": nan, "root": root}


@pytest.fixture(scope="module")
def server(checkpoints):
    models = [arg for name in ("gpt2", "extra") for arg in ("--model", f"{name}={checkpoints[name]}")]
    process = ServerProcess(f"bert={checkpoints['bert']}", *models, "--max-length", "1000",
                            "--max-queue-items", "10", "--combination", "ens=ensemble bert gpt2",
                            "--default-reward", "ens", "--api-key", API_KEY, "--transform", "raw",
                            "--allow-reload-from", str(checkpoints["root"]), "--admin-key", ADMIN,
                            "--max-wait-ms", "20")
    yield process
    process.stop()


def post(server, body: dict, path: str = "/score", headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.http_url}{path}", json=body, headers=headers, timeout=60)


def items_scored(server) -> float:
    text = httpx.get(f"{server.http_url}/metrics").text
    return float(re.search(r"^rewardserve_items_total (\S+)$", text, re.M).group(1))


def test_max_length_is_capped_at_each_model_positions_and_a_long_item_fails_nobody(server):
    info = httpx.get(f"{server.http_url}/info", headers=AUTH).json()
    assert {m["model"]: m["max_length"] for m in info["models"]} == {"bert": 256, "gpt2": 256, "extra": 256}
    assert "--max-length 1000 is over the 256 positions of model bert" in server.output()
    long_item, short_item = {"text": "word " * 700}, {"text": "a short one"}
    requests = [{"model": model, "items": items} for model in ("bert", "gpt2")  # 6 items: the queue holds 10
                for items in ([long_item], [short_item], [short_item, long_item])]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda body: post(server, body), requests))
    for body, reply in zip(requests, replies):
        assert reply.status_code == 200, reply.text
        assert reply.json()["truncated"] == [item is long_item for item in body["items"]]


def test_a_token_without_an_embedding_fails_only_its_own_request(server):
    bad_text = {"model": "extra", "items": [{"text": "hello"}, {"text": "x <|reward|>"}]}
    bad_ids = {"model": "extra", "items": [{"input_ids": [5, 49152]}]}
    good = {"model": "extra", "items": [{"text": "hello"}, {"text": "x y"}]}
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda body: post(server, body), [bad_text, good, bad_ids, good]))
    assert [r.status_code for r in replies] == [422, 200, 422, 200]
    assert replies[0].json()["error"]["message"] == (
        "items[1]: the text holds the token '<|reward|>' (id 49152), which this model has no embedding for (its ids"
        " stop at 49151); leave it out")
    assert "token id 49152, outside the vocabulary of 49152" in replies[2].json()["error"]["message"]


def test_a_request_larger_than_the_queue_is_413_and_costs_no_forward(server):
    """2 models x 6 items > --max-queue-items 10: it can never be admitted, so it is not a 503 to retry, and no
    model's items are computed for it."""
    before = items_scored(server)
    for _ in range(3):
        reply = post(server, {"combination": "ens", "items": [{"text": f"item {i}"} for i in range(6)]})
        assert reply.status_code == 413, reply.text
        assert reply.json()["error"]["type"] == "too_many_items"
        assert "needs 12 places in the scoring queue (2 models x 6 items)" in reply.json()["error"]["message"]
    assert items_scored(server) == before
    assert post(server, {"combination": "ens", "items": [{"text": "fits"}] * 5}).status_code == 200


def test_open_metrics_name_no_paths(server, checkpoints):
    text = httpx.get(f"{server.http_url}/metrics").text  # no key: /metrics is open
    assert 'rewardserve_model_info{model="bert",version=' in text
    assert "path=" not in text and str(checkpoints["root"]) not in text


def test_compatible_endpoints_serve_a_default_combination(server):
    for path, body in [("/classify", {"input": ["a", "b"]}), ("/predict", {"inputs": ["a", "b"]}),
                       ("/v1/score/evaluation", {"messages": ["a", "b"]})]:
        reply = post(server, body, path)
        assert reply.status_code == 200, (path, reply.text)


def test_an_empty_model_name_is_refused_not_read_as_the_default(server):
    reply = post(server, {"model": "", "items": [{"text": "a"}]})
    assert reply.status_code == 422 and "model: String should have at least 1 character" in reply.text
    reply = post(server, {"model": ""}, "/admin/reload", {"Authorization": f"Bearer {ADMIN}"})
    assert reply.status_code == 422 and "model: String should have at least 1 character" in reply.text


def test_a_checkpoint_that_scores_nan_is_refused_at_reload_and_the_old_one_serves(server, checkpoints):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    before = post(server, {"model": "extra", "items": [{"text": "hello"}]}).json()
    reply = post(server, {"model": "extra", "path": str(checkpoints["nan"])}, "/admin/reload", admin)
    assert reply.status_code == 422 and reply.json()["error"]["type"] == "reload_failed"
    assert "non-finite scores" in reply.json()["error"]["message"]
    reply = post(server, {"model": "extra", "path": str(checkpoints["root"]) + "/ex\u0000tra"}, "/admin/reload", admin)
    assert reply.status_code == 422 and "NUL" in reply.json()["error"]["message"]
    after = post(server, {"model": "extra", "items": [{"text": "hello"}]}).json()
    assert after["scores"] == before["scores"] and after["model_version"] == before["model_version"]


def test_an_empty_transform_is_refused_alike_over_http_and_grpc(server):
    http = post(server, {"model": "gpt2", "items": [{"text": "a"}], "transform": ""}).json()["error"]["message"]
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    request = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="a")], model="gpt2", transform="")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Score(request, metadata=[("authorization", f"Bearer {API_KEY}")])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.details() == http
    unset = stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="a")], model="gpt2"),
                       metadata=[("authorization", f"Bearer {API_KEY}")])
    assert unset.transform.name == "raw"
