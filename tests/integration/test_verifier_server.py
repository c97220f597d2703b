"""Verifiers served beside a reward model by a real server: over HTTP and gRPC, alone and in combinations, through
the compatible endpoints, under hostile answers, with their metrics."""
from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from rewardserve.server.normalization import whiten
from rewardserve.trainer.client import RequestRejected, RewardClient, RewardTarget

from ..conftest import ServerProcess

MEAN, STD = 0.1, 2.0
ITEMS = [
    {"prompt": "What is 1/2 + 1/4?", "response": "So the total is \\boxed{\\frac{3}{4}}.", "reference": "0.75"},
    {"prompt": "What is 2 + 2?", "response": "Answer: 5", "reference": "4"},
    {"prompt": "What is 3 * 3?", "response": "It is nine, I believe.", "reference": "9"},
    {"prompt": "Name a prime.", "response": "\\boxed{7}", "reference": "7"},
]


@pytest.fixture(scope="module")
def server(tiny_llama):
    server = ServerProcess(
        None, "--model", f"rm={tiny_llama}", "--reward-mean", str(MEAN), "--reward-std", str(STD),
        "--verifier", "correct=math", "--verifier", "boxed=regex:\\\\boxed\\{", "--verifier-timeout", "1",
        "--verifier-workers", "2", "--combination", "mix=sum 1*correct 0.1*rm",
        "--combination", "gated=gate rm by=boxed")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def raw_rm_scores(server):
    reply = httpx.post(f"{server.http_url}/score", json={"items": ITEMS, "model": "rm", "transform": "raw"}).json()
    return reply["scores"]


def test_the_math_verifier_over_http_says_what_it_read(server):
    reply = httpx.post(f"{server.http_url}/score", json={"items": ITEMS, "model": "correct"}).json()
    assert reply["rewards"] == reply["scores"] == [1.0, 0.0, 0.0, 1.0]
    assert [c["verdict"] for c in reply["checks"]] == ["correct", "wrong", "no_answer", "correct"]
    assert [c["answer"] for c in reply["checks"]] == ["\\frac{3}{4}", "5", None, "7"]
    assert reply["outputs"] == {"correct": [1.0, 0.0, 0.0, 1.0], "answer_found": [1.0, 1.0, 0.0, 1.0],
                                "timed_out": [0.0, 0.0, 0.0, 0.0]}
    assert reply["transform"]["name"] == "raw"  # 0/1 rewards are not whitened


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_combinations_with_a_reward_model_equal_the_rule_by_hand(server, raw_rm_scores, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    correct, boxed = [1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]
    with RewardClient(url) as client:
        mix = client.score(ITEMS, target=RewardTarget(combination="mix"))
        gated = client.score(ITEMS, target=RewardTarget(combination="gated"))
        alone = client.score(ITEMS, target=RewardTarget(model="correct"))
    by_hand = [c + 0.1 * whiten(s, MEAN, STD) for c, s in zip(correct, raw_rm_scores)]
    assert mix.rewards == pytest.approx(by_hand, abs=1e-6)
    assert mix.components["correct"]["checks"][1] == {"verdict": "wrong", "answer": "5"}
    gated_by_hand = [whiten(s, MEAN, STD) if b else -1.0 for b, s in zip(boxed, raw_rm_scores)]
    assert gated.rewards == pytest.approx(gated_by_hand, abs=1e-6)
    assert gated.combination["kind"] == "gate" and gated.combination["otherwise"] == -1.0
    assert alone.checks == [{"verdict": "correct", "answer": "\\frac{3}{4}"}, {"verdict": "wrong", "answer": "5"},
                            {"verdict": "no_answer", "answer": None}, {"verdict": "correct", "answer": "7"}]


def test_items_a_verifier_cannot_check_are_a_422_naming_the_item(server):
    no_reference = [ITEMS[0], {"prompt": "Q", "response": "\\boxed{1}"}]
    reply = httpx.post(f"{server.http_url}/score", json={"items": no_reference, "model": "correct"})
    assert reply.status_code == 422 and "items[1]: verifier 'correct' (math) checks the answer against the" \
                                       " item's `reference`, and this item has none" in reply.json()["error"]["message"]
    reply = httpx.post(f"{server.http_url}/score", json={"items": [{"input_ids": [1, 2], "reference": "1"}],
                                                         "model": "correct"})
    assert reply.status_code == 422 and "reads text" in reply.json()["error"]["message"]
    with RewardClient(server.grpc_url) as client, pytest.raises(RequestRejected, match="has none"):
        client.score(no_reference, target=RewardTarget(combination="mix"))
    # a format check needs no reference; the reward model ignores one
    assert httpx.post(f"{server.http_url}/score", json={"items": no_reference, "model": "boxed"}).status_code == 200
    assert httpx.post(f"{server.http_url}/score", json={"items": ITEMS, "model": "rm"}).status_code == 200


def test_verl_and_openrlhf_pass_their_ground_truth_through(server, monkeypatch):
    from rewardserve.trainer.integrations import verl_reward

    monkeypatch.setenv("REWARDSERVE_REWARD_URL", server.http_url)
    monkeypatch.setenv("REWARDSERVE_REWARD_MODEL", "correct")
    monkeypatch.setattr(verl_reward, "_verl_client", None)
    assert verl_reward.compute_score("gsm8k", "Answer: 12", "12", extra_info={"prompt": "Q"}) == 1.0
    assert verl_reward.compute_score("gsm8k", "Answer: 12", 13, extra_info={"prompt": "Q"}) == 0.0
    reply = httpx.post(f"{server.http_url}/get_reward", json={
        "query": ["Q: 2+2? A: \\boxed{4}", "Q: 2+2? A: \\boxed{5}"], "prompts": ["Q: 2+2? A:"] * 2,
        "labels": ["4", "4"], "model": "correct"})
    assert reply.status_code == 200 and reply.json()["rewards"] == [1.0, 0.0]
    reply = httpx.post(f"{server.http_url}/get_reward", json={"query": ["\\boxed{4}"], "labels": ["4", "5"],
                                                              "model": "correct"})
    assert reply.status_code == 422 and "one per query" in reply.json()["error"]["message"]


def test_hostile_answers_time_out_while_another_client_keeps_its_latency(server):
    """A client floods the verifier with answers sympy or the regex engine cannot finish (1 s limit each); another
    client's reward-model requests keep their latency, and its own small checks are answered within a few limits."""
    def latencies(count: int, body: dict) -> list[float]:
        times = []
        with httpx.Client(timeout=60) as client:
            for _ in range(count):
                began = time.perf_counter()
                assert client.post(f"{server.http_url}/score", json=body).status_code == 200
                times.append(time.perf_counter() - began)
        return times

    rm_body = {"items": ITEMS, "model": "rm"}
    quiet = latencies(10, rm_body)
    hostile = [{"response": "\\boxed{9^{9^{9^{9^{9}}}}}", "prompt": "Q", "reference": "1"},
               {"response": "\\boxed{" + "\\frac{1}{" * 3000 + "1" + "}" * 3000 + "}", "prompt": "Q", "reference": "1"},
               {"response": "x" * 1_000_000, "prompt": "Q", "reference": "1"}]
    answers = {}

    def flood():
        with httpx.Client(timeout=120) as client:
            began = time.perf_counter()
            reply = client.post(f"{server.http_url}/score", json={"items": hostile * 2, "model": "correct"})
            answers["flood"] = (reply, time.perf_counter() - began)

    attacker = threading.Thread(target=flood)
    attacker.start()
    time.sleep(0.3)
    busy = latencies(10, rm_body)
    began = time.perf_counter()
    small = httpx.post(f"{server.http_url}/score", json={"items": ITEMS[:1], "model": "correct"}, timeout=60)
    small_seconds = time.perf_counter() - began
    attacker.join(120)
    reply, flood_seconds = answers["flood"]
    assert reply.status_code == 200, reply.text
    verdicts = [c["verdict"] for c in reply.json()["checks"]]
    print("flood", verdicts, f"{flood_seconds:.2f} s; small {small_seconds:.2f} s; rm median quiet"
          f" {statistics.median(quiet):.3f} s, busy {statistics.median(busy):.3f} s")
    assert set(verdicts) <= {"timeout", "no_answer", "wrong"} and "timeout" in verdicts, verdicts
    assert flood_seconds < 6 * 1.0 + 10, flood_seconds  # six checks of at most 1 s each, on two workers
    assert small.status_code == 200 and small.json()["rewards"] == [1.0]
    assert small_seconds < 4.0, small_seconds  # its check takes its turn beside the flood's, not after it
    assert statistics.median(busy) < 3 * statistics.median(quiet) + 0.1, (quiet, busy)
    metrics = httpx.get(f"{server.http_url}/metrics").text.splitlines()
    timeouts = [line for line in metrics if line.startswith("rewardserve_verifier_checks_total{")
                and 'verdict="timeout"' in line and 'verifier="correct"' in line]
    assert timeouts and float(timeouts[0].split()[-1]) >= 1, timeouts
    assert server.metric("rewardserve_verifier_check_seconds_count") >= 6


def test_info_describes_the_verifiers(server):
    info = httpx.get(f"{server.http_url}/info").json()
    verifiers = {m["model"]: m for m in info["models"] if m["kind"] == "verifier"}
    assert verifiers["correct"]["verifier"] == "math" and verifiers["boxed"]["verifier"] == "regex:\\\\boxed\\{"
    assert verifiers["correct"]["statistics"] == {"mean": 0.0, "std": 1.0,
                                                  "source": "a verifier's 0/1 verdict, not whitened"}
    assert {c["name"]: c["kind"] for c in info["combinations"]} == {"mix": "sum", "gated": "gate"}
    reload = httpx.post(f"{server.http_url}/admin/reload", json={"model": "correct"})
    assert reload.status_code in (401, 403)  # reload is off here; with it on, a verifier is refused by name
