"""A real server with a process reward model beside a reward model: step scores over HTTP and gRPC equal a plain
transformers forward of each item alone, the aggregate is the reward, combinations read it, and bad steps get a
422 / INVALID_ARGUMENT that says what to fix while the server keeps serving."""
from __future__ import annotations

import json

import grpc
import httpx
import pytest
import torch

from rewardserve.proto import reward_pb2, reward_pb2_grpc
from rewardserve.server.process_rewards import StepEncoder
from rewardserve.server.steps import StepFormat, aggregate_steps
from rewardserve.server.schemas import ScoreItem
from rewardserve.trainer.client import RewardClient
from tests.conftest import ServerProcess, build_checkpoint
from tests.server.test_process_rewards import GOOD, BAD, TAG, build_prm, plain_forward

PROMPT = "Compute 12 + 7 - 5 step by step.\n"
ITEMS = [{"prompt": PROMPT, "steps": ["12 + 7 = 19", "19 - 5 = 14"]},
         {"prompt": PROMPT, "response": "12 + 7 = 18\n18 - 5 = 13\nThe answer is 13."},
         {"prompt": "Compute 3 + 4.\n", "steps": ["3 + 4 = 7"]}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smol_tokenizer):
    folder = tmp_path_factory.mktemp("prm-server")
    rm = build_checkpoint(folder / "rm", "llama", smol_tokenizer)
    config = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps(config | {"reward_statistics": {"mean": 0.0, "std": 2.0}}))
    return {"prm": build_prm(folder / "prm", "llama", smol_tokenizer, seed=3),
            "tag": build_prm(folder / "tag", "causal", smol_tokenizer, seed=4), "rm": rm}


@pytest.fixture(scope="module")
def server(checkpoints):
    process = ServerProcess(checkpoints["rm"], "--prm", f"steps={checkpoints['prm']}", "--max-steps", "4",
                            "--step-aggregate", "min", "--combination", "mix=sum 1*steps 0.1*rm",
                            "--default-reward", "steps")
    yield process
    process.stop()


def expected_steps(kind: str, path, tokenizer, step_format: StepFormat) -> list[list[float]]:
    encoder = StepEncoder(tokenizer, 256, step_format)
    rows = []
    for item in ITEMS:
        ids = encoder.encode(ScoreItem(**item)).input_ids
        rows.append(plain_forward(kind, path, list(ids), ids.step_ends).tolist())
    return rows


def test_step_scores_over_http_and_grpc_equal_a_plain_forward(server, checkpoints, smol_tokenizer):
    expected = expected_steps("llama", checkpoints["prm"], smol_tokenizer, StepFormat())
    body = httpx.post(f"{server.http_url}/score", json={"items": ITEMS}, timeout=30).json()
    assert body["model"] == "steps" and [len(row) for row in body["step_scores"]] == [2, 3, 1]
    for got, want in zip(body["step_scores"], expected):
        assert got == pytest.approx(want, abs=1e-5)
    assert body["scores"] == pytest.approx([min(row) for row in expected], abs=1e-5)
    assert body["rewards"] == pytest.approx(body["scores"])  # a probability: not whitened
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        reply = stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(**item) for item in ITEMS]), timeout=30)
    flat = lambda rows: [value for row in rows for value in row]  # noqa: E731
    assert [len(row.values) for row in reply.step_scores] == [2, 3, 1]
    assert flat(row.values for row in reply.step_scores) == pytest.approx(flat(body["step_scores"]), abs=1e-6)
    with RewardClient(server.grpc_url) as client:  # the client reads them too
        assert flat(client.score(ITEMS).step_scores) == pytest.approx(flat(body["step_scores"]), abs=1e-6)


def test_a_combination_reads_the_aggregate_and_the_reward_model_the_joined_steps(server):
    mix = httpx.post(f"{server.http_url}/score", json={"combination": "mix", "items": ITEMS}, timeout=30).json()
    steps, rm = mix["components"]["steps"], mix["components"]["rm"]
    assert mix["rewards"] == pytest.approx([s + 0.1 * r for s, r in zip(steps["rewards"], rm["rewards"])], abs=1e-6)
    assert steps["step_scores"] and rm["step_scores"] is None
    joined = httpx.post(f"{server.http_url}/score", timeout=30, json={"model": "rm", "items": [
        {"prompt": PROMPT, "response": "12 + 7 = 19\n19 - 5 = 14"}]}).json()
    assert rm["scores"][0] == pytest.approx(joined["scores"][0], abs=1e-6)


@pytest.mark.parametrize("item, status, message", [
    ({"prompt": "p", "steps": []}, 422, "`steps` is empty"),
    ({"prompt": "p", "response": "\n \n"}, 422, "no steps to score"),
    ({"prompt": "p", "steps": ["a\nb"]}, 422, "holds the step separator"),
    ({"prompt": "p", "steps": ["a"] * 5}, 422, "5 steps, over the limit of 4"),
    ({"prompt": "p", "steps": ["a"], "response": "a"}, 422, "not both"),
    ({"text": "a formatted text"}, 422, "do not say where the steps end"),
])
def test_bad_steps_are_refused_clearly_on_both_protocols(server, item, status, message):
    answer = httpx.post(f"{server.http_url}/score", json={"items": [ITEMS[0], item]}, timeout=30)
    assert answer.status_code == status and message in answer.json()["error"]["message"]
    if "steps" in item and item["steps"] == []:
        return  # proto3 cannot tell an empty list from none: that item is just a prompt, refused differently
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(
                items=[reward_pb2.ScoreItem(**ITEMS[0]), reward_pb2.ScoreItem(**item)]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in refused.value.details()
    assert httpx.post(f"{server.http_url}/score", json={"items": ITEMS}, timeout=30).status_code == 200


def test_info_describes_the_steps(server):
    info = httpx.get(f"{server.http_url}/info", timeout=30).json()
    steps = next(model for model in info["models"] if model["model"] == "steps")
    assert steps["kind"] == "process_reward_model"
    assert steps["steps"] == {"head": "token classification, P(label 1) of 2", "aggregate": "min", "max_steps": 4,
                              "read": "at the separator '\\n' after each step", "separator": "\n", "tag": None}


@pytest.mark.slow  # 7 s: a second server; tests/server/test_process_rewards.py holds the step-tag head to transformers
def test_a_causal_lm_read_at_a_step_tag(checkpoints, smol_tokenizer):
    server = ServerProcess(None, "--prm", f"tag={checkpoints['tag']}", "--step-tag", TAG, "--step-token-ids",
                           f"{GOOD},{BAD}", "--step-aggregate", "product")
    try:
        body = httpx.post(f"{server.http_url}/score", json={"items": ITEMS}, timeout=30).json()
        expected = expected_steps("causal", checkpoints["tag"], smol_tokenizer, StepFormat(tag=TAG))
        for got, want in zip(body["step_scores"], expected):
            assert got == pytest.approx(want, abs=1e-5)
        assert body["scores"] == pytest.approx([aggregate_steps(row, "product") for row in expected], abs=1e-5)
        assert "read at the step tag ' ки'" in server.output()
        wrong = httpx.post(f"{server.http_url}/score", timeout=30,
                           json={"items": [{"prompt": "p", "steps": ["1 + 1 = 2 ки"]}]})
        assert wrong.status_code == 422 and "holds the step tag" in wrong.json()["error"]["message"]
    finally:
        server.stop()
    assert torch.tensor(expected[1]).std() > 1e-4  # the steps' scores differ: a misplaced read would show


def test_best_of_n_picks_by_the_aggregate(server, tmp_path):
    """`rewardserve best-of-n` against the server: each problem's pick is its highest reward (the min of its step
    scores, as /score gives it), and the summary counts right picks where the rows say which are right."""
    import subprocess

    from tests.conftest import CLI

    rows = [{"prompt": PROMPT, "responses": [["12 + 7 = 19", "19 - 5 = 14"], ["12 + 7 = 18", "18 - 5 = 13"],
                                             "12 + 7 = 19\nThe answer is 14."], "correct": [True, False, True]},
            {"prompt": "Compute 3 + 4.\n", "responses": ["3 + 4 = 7", "3 + 4 = 8"], "correct": [True, False]}]
    data, out = tmp_path / "rows.jsonl", tmp_path / "picked.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = subprocess.run([*CLI, "best-of-n", "--reward-url", server.http_url, "--reward-model", "steps", "--data",
                           str(data), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    picked = [json.loads(line) for line in out.read_text().splitlines()]
    for row, result in zip(rows, picked):
        items = [{"prompt": row["prompt"], **({"steps": r} if isinstance(r, list) else {"response": r})}
                 for r in row["responses"]]
        rewards = httpx.post(f"{server.http_url}/score", json={"model": "steps", "items": items}, timeout=30
                             ).json()["rewards"]
        assert result["rewards"] == pytest.approx(rewards, abs=1e-6)
        assert result["best_index"] == rewards.index(max(rewards))
        assert len(result["step_scores"]) == len(row["responses"])
    right = sum(row["correct"][result["best_index"]] for row, result in zip(rows, picked)) / 2
    assert f"picked a right response  {right:.3f}" in done.stdout and "chance                   0.583" in done.stdout
