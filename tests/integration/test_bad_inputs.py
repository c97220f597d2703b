"""Every bad input gets a clear 4xx or the right gRPC status, and the next valid request still succeeds."""
from __future__ import annotations

import grpc
import httpx
import pytest

from rewardserve.proto import reward_pb2, reward_pb2_grpc

from ..conftest import ServerProcess

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
VALID = {"items": [{"prompt": "Hi", "response": "Hello"}]}


@pytest.fixture(scope="module")
def strict_server(tiny_llama):
    server = ServerProcess(tiny_llama, "--api-key", KEY, "--on-overflow", "error", "--max-length", "64",
                           "--max-items-per-request", "8", "--max-body-bytes", "20000")
    yield server
    server.stop()


HTTP_CASES = [
    ("malformed JSON", b'{"items": [', "application/json", 400, "malformed_request", "not valid JSON"),
    ("not JSON at all", b"items=1", "application/x-www-form-urlencoded", 400, "malformed_request", "Content-Type"),
    ("wrong type", b'{"items": [{"text": 5}]}', "application/json", 422, "invalid_input", "items[0].text"),
    ("empty batch", b'{"items": []}', "application/json", 422, "invalid_input", "at least 1 item"),
    ("item with no text", b'{"items": [{}]}', "application/json", 422, "invalid_input", "an item needs one of"),
    ("missing field", b'{"texts": ["a"]}', "application/json", 422, "invalid_input", "items: Field required"),
    ("too many items", b'{"items": [' + b",".join([b'{"text": "a"}'] * 9) + b"]}", "application/json", 413,
     "too_many_items", "over the limit of 8"),
    ("oversized body", b'{"items": [{"text": "' + b"a" * 30000 + b'"}]}', "application/json", 413,
     "payload_too_large", "20000-byte limit"),
    ("overlong text", b'{"items": [{"text": "' + b"word " * 200 + b'"}]}', "application/json", 413,
     "input_too_long", "over max_length 64"),
    ("whiten without statistics", b'{"items": [{"text": "a"}], "transform": "whiten"}', "application/json", 422,
     "transform_unavailable", "--reward-mean"),
]


@pytest.mark.parametrize("name, body, content_type, status, kind, message", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_bad_input_then_a_good_one(strict_server, name, body, content_type, status, kind, message):
    url = f"{strict_server.http_url}/score"
    reply = httpx.post(url, content=body, headers={**AUTH, "Content-Type": content_type})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["type"] == kind and message in reply.json()["error"]["message"]
    assert httpx.post(url, json=VALID, headers=AUTH).status_code == 200


def test_http_auth(strict_server):
    url = f"{strict_server.http_url}/score"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY[:-1]}):
        reply = httpx.post(url, json=VALID, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "unauthorized"
    assert httpx.get(f"{strict_server.http_url}/health").status_code == 200  # open
    assert httpx.get(f"{strict_server.http_url}/metrics").status_code == 200  # open
    assert httpx.get(f"{strict_server.http_url}/info").status_code == 401
    assert httpx.post(url, json=VALID, headers=AUTH).status_code == 200


def grpc_item(**fields):
    return reward_pb2.ScoreItem(**fields)


GRPC_CASES = [  # the error's `type` comes in the trailing metadata, as HTTP's body names it
    ("empty batch", reward_pb2.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "invalid_input", "at least 1 item"),
    ("item with no text", reward_pb2.ScoreRequest(items=[grpc_item()]), grpc.StatusCode.INVALID_ARGUMENT,
     "invalid_input", "an item needs one of"),
    ("two forms", reward_pb2.ScoreRequest(items=[grpc_item(text="a", input_ids=[1])]),
     grpc.StatusCode.INVALID_ARGUMENT, "invalid_input", "exactly one form"),
    ("bad transform", reward_pb2.ScoreRequest(items=[grpc_item(text="a")], transform="zscore"),
     grpc.StatusCode.INVALID_ARGUMENT, "invalid_input", "transform"),
    ("whiten without statistics", reward_pb2.ScoreRequest(items=[grpc_item(text="a")], transform="whiten"),
     grpc.StatusCode.FAILED_PRECONDITION, "transform_unavailable", "--reward-mean"),
    ("too many items", reward_pb2.ScoreRequest(items=[grpc_item(text="a")] * 9), grpc.StatusCode.INVALID_ARGUMENT,
     "too_many_items", "over the limit of 8"),
    ("overlong text", reward_pb2.ScoreRequest(items=[grpc_item(text="word " * 200)]), grpc.StatusCode.INVALID_ARGUMENT,
     "input_too_long", "over max_length 64"),
    ("oversized message", reward_pb2.ScoreRequest(items=[grpc_item(text="a" * 30000)]),
     grpc.StatusCode.RESOURCE_EXHAUSTED, None, ""),  # refused by grpc itself, before our code
    ("negative id", reward_pb2.ScoreRequest(items=[grpc_item(input_ids=[1, -5])]), grpc.StatusCode.INVALID_ARGUMENT,
     "invalid_input", "negative token id"),
]


@pytest.mark.parametrize("name, request_message, code, kind, message", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_input_then_a_good_one(strict_server, name, request_message, code, kind, message):
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{strict_server.grpc_port}"))
    metadata = (("authorization", f"Bearer {KEY}"),)
    with pytest.raises(grpc.RpcError) as error:
        stub.Score(request_message, metadata=metadata, timeout=30)
    assert error.value.code() == code and message in error.value.details()
    assert dict(error.value.trailing_metadata() or ()).get("rewardserve-error-type") == kind
    good = reward_pb2.ScoreRequest(items=[grpc_item(prompt="Hi", response="Hello")])
    assert len(stub.Score(good, metadata=metadata, timeout=30).scores) == 1


def test_the_client_reads_the_error_type_over_grpc(strict_server):
    from rewardserve.trainer.client import RequestRejected, RewardClient

    with pytest.raises(RequestRejected) as error:
        RewardClient(strict_server.grpc_url, api_key=KEY).score([{"text": "a"}], transform="whiten")
    assert error.value.status == "FAILED_PRECONDITION" and error.value.kind == "transform_unavailable"


def test_grpc_auth(strict_server):
    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{strict_server.grpc_port}"))
    good = reward_pb2.ScoreRequest(items=[grpc_item(text="a")])
    for metadata in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as error:
            stub.Score(good, metadata=metadata, timeout=30)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(error.value.trailing_metadata())["rewardserve-error-type"] == "unauthorized"
    with pytest.raises(grpc.RpcError) as error:
        list(stub.ScoreStream(iter([good]), timeout=30))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(stub.Score(good, metadata=(("x-api-key", KEY),), timeout=30).scores) == 1


@pytest.mark.slow  # 10 s; the limiter's rules are unit-tested in tests/server/test_rate_limit.py
def test_rate_limit_per_client_on_both_protocols(tiny_llama):
    server = ServerProcess(tiny_llama, "--rate-limit", "2")
    try:
        replies = [httpx.post(f"{server.http_url}/score", json=VALID) for _ in range(6)]
        limited = [r for r in replies if r.status_code == 429]
        assert limited and limited[0].json()["error"]["type"] == "rate_limited" and "Retry-After" in limited[0].headers
        stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        codes = []
        for _ in range(6):
            try:
                stub.Score(reward_pb2.ScoreRequest(items=[grpc_item(text="a")]), timeout=30)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
                assert dict(error.trailing_metadata())["retry-after"] >= "1"
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        from rewardserve.trainer.client import RewardClient

        for url in (server.http_url, server.grpc_url):  # the client waits as told, and gets through
            with RewardClient(url) as client:
                assert all(len(client.score([{"text": "a"}]).scores) == 1 for _ in range(4))
    finally:
        server.stop()
