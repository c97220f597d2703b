"""The real server process, over real HTTP and gRPC on loopback ports."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rewardserve.proto import reward_pb2, reward_pb2_grpc
from rewardserve.server.modeling import RewardModel
from rewardserve.server.schemas import ScoreItem
from rewardserve.server.tokenization import ItemEncoder, load_tokenizer
from rewardserve.trainer.client import RewardClient

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "Say something rude.", "response": "No, I would rather not."},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHey<|im_end|>"},
    {"input_ids": [1, 4093, 198, 1780, 2]},
]


@pytest.fixture(scope="module")
def in_process_scores(tiny_llama):
    """Each item scored alone, in this process, without the server: what every answer must equal."""
    model = RewardModel.load(str(tiny_llama))
    encoder = ItemEncoder(load_tokenizer(str(tiny_llama)), model.max_positions)
    return [model.score_batch([encoder.encode(ScoreItem(**item)).input_ids])[0] for item in ITEMS]


def test_score_over_http_equals_the_in_process_scores(running_server, in_process_scores):
    reply = httpx.post(f"{running_server.http_url}/score", json={"items": ITEMS}, timeout=30)
    assert reply.status_code == 200
    body = reply.json()
    assert body["scores"] == pytest.approx(in_process_scores, abs=1e-4)
    assert body["rewards"] == pytest.approx([(s - 0.1) / 2.0 for s in body["scores"]], abs=1e-6)
    assert body["transform"] == {"name": "whiten", "statistics": {"mean": 0.1, "std": 2.0, "source": "server flags"},
                                 "beta": None, "length_fit": None}
    assert body["truncated"] == [False] * len(ITEMS) and body["model"] == running_server_model(running_server)


def running_server_model(server) -> str:
    return httpx.get(f"{server.http_url}/info").json()["model"]


def test_http_and_grpc_return_the_same_numbers(running_server):
    http = RewardClient(running_server.http_url).score(ITEMS, transform="logsigmoid")
    grpc_result = RewardClient(running_server.grpc_url).score(ITEMS, transform="logsigmoid")
    assert grpc_result.scores == pytest.approx(http.scores, abs=1e-5)
    assert grpc_result.rewards == pytest.approx(http.rewards, abs=1e-5)
    assert grpc_result.transform["name"] == http.transform["name"] == "logsigmoid"


def test_openrlhf_get_reward_any_batch_size(running_server, in_process_scores):
    for queries in ([ITEMS[3]["text"]], [ITEMS[3]["text"]] * 3):
        reply = httpx.post(f"{running_server.http_url}/get_reward", json={"query": queries, "prompts": ["p"] * len(queries)})
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
        body = reply.json()
        assert body["scores"] == pytest.approx([in_process_scores[3]] * len(queries), abs=1e-4)
        assert set(body) == {"rewards", "scores", "extra_logs"}


def test_health_ready_info_metrics_openapi(running_server):
    base = running_server.http_url
    assert httpx.get(f"{base}/health").json() == {"status": "alive"}
    assert httpx.get(f"{base}/ready").json() == {"status": "ready"}
    info = httpx.get(f"{base}/info").json()
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["chat_template"] is True
    assert info["statistics"] == {"mean": 0.1, "std": 2.0, "source": "server flags"}
    httpx.post(f"{base}/score", json={"items": ITEMS[:1]})
    metrics = httpx.get(f"{base}/metrics").text
    for name in ("rewardserve_items_total", "rewardserve_batch_size_bucket", "rewardserve_queue_seconds_bucket",
                 "rewardserve_forward_seconds_bucket", "rewardserve_tokenize_seconds_bucket",
                 "rewardserve_queue_depth", 'rewardserve_requests_total{outcome="ok",protocol="http"}'):
        assert name in metrics
    assert {"/score", "/get_reward", "/info"} <= set(httpx.get(f"{base}/openapi.json").json()["paths"])


def test_grpc_stream_health_and_reflection(running_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{running_server.grpc_port}")
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    requests = [reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="a" * (i + 1))], request_id=str(i))
                for i in range(5)] + [reward_pb2.ScoreRequest(request_id="empty")]
    answers = {a.request_id: a for a in stub.ScoreStream(iter(requests), timeout=30)}
    assert set(answers) == {"0", "1", "2", "3", "4", "empty"}
    assert answers["empty"].error.code == "INVALID_ARGUMENT" and "at least 1 item" in answers["empty"].error.message
    assert all(answers[str(i)].WhichOneof("result") == "response" for i in range(5))
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="rewardserve.v1.RewardService")).status == 1
    info = json.loads(stub.Info(reward_pb2.InfoRequest()).json)
    assert info["architecture"] == "LlamaForSequenceClassification"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "rewardserve.v1.RewardService" in {s.name for s in listing.list_services_response.service}


def test_32_concurrent_clients_all_get_correct_answers(running_server, in_process_scores):
    def one_client(index: int):
        url = running_server.http_url if index % 2 else running_server.grpc_url
        with RewardClient(url) as client:
            order = [(index + k) % len(ITEMS) for k in range(len(ITEMS))]
            results = []
            for _ in range(3):
                scores = client.score([ITEMS[i] for i in order]).scores
                results.append(all(abs(s - in_process_scores[i]) < 1e-4 for s, i in zip(scores, order)))
            return all(results)

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(one_client, range(32)))


def test_the_api_pages_load_without_a_cdn(running_server):
    """/docs and /redoc name only assets this server serves (an air-gapped cluster has no CDN)."""
    import re

    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{running_server.http_url}{page}").text
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
        assert assets and all(asset.startswith("/") for asset in assets), assets
        for asset in assets:
            assert httpx.get(f"{running_server.http_url}{asset}").status_code == 200, asset
