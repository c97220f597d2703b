"""`rewardserve compare` as a real process: two tiny policies, the real server over HTTP and gRPC, and a server
still loading (503, then ready) whose refusals are retried, never counted as losses."""
from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from rewardserve.trainer.compare import outcome

from ..conftest import CLI, build_tiny_policy, free_port
from .test_readiness import start_gated, wait_for


@pytest.fixture(scope="module")
def policies(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("compare")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n"
                               for w in ("cats", "rain", "tea", "maps", "bees", "salt")))
    return build_tiny_policy(root / "a", smol_tokenizer, seed=0), build_tiny_policy(root / "b", smol_tokenizer, seed=1), prompts


def compare(url: str, policies, out, *flags: str) -> subprocess.CompletedProcess:
    a, b, prompts = policies
    return subprocess.run([*CLI, "compare", "--policy-a", str(a), "--policy-b", str(b), "--prompts", str(prompts), "--reward-url",
                           url, "--out", str(out), "--max-new-tokens", "8", "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=600)


def read(out) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


# 14 s with its server and two policies (the same over gRPC: 7 s more); the default suite keeps `compare` in process
# with real policies and a scorer (tests/trainer/test_compare.py)
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_win_rate_is_that_of_the_server_s_scores(running_server, policies, tmp_path, protocol):
    url = running_server.http_url if protocol == "http" else running_server.grpc_url
    run = compare(url, policies, tmp_path, "--samples", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    rows, summary = read(tmp_path)
    assert len(rows) == 12 and summary["comparisons"] == 12 and summary["prompts"] == 6
    for side in ("a", "b"):  # every score is the server's own score of that response
        direct = httpx.post(f"{running_server.http_url}/score", json={"items": [
            {"prompt": row["prompt"], "response": row[side]} for row in rows]}).json()["rewards"]
        assert [row[f"{side}_reward"] for row in rows] == pytest.approx(direct, abs=1e-5)
    outcomes = [outcome(row["b_reward"], row["a_reward"]) for row in rows]
    assert summary["reward"]["rate"] == pytest.approx(sum(outcomes) / 12)
    assert summary["reward"]["low"] <= summary["reward"]["rate"] <= summary["reward"]["high"]
    assert "B's win rate, reward" in run.stdout


@pytest.mark.slow  # 8 s; the default suite keeps compare's win rate against the server's scores
def test_a_policy_against_itself_ties_every_greedy_comparison(running_server, policies, minilm_dir, tmp_path):
    """Under the reward server, under an AI judge asked in both orders (whose position bias then cancels), and
    under the relevance judge."""
    a, _, prompts = policies
    run = compare(running_server.http_url, (a, a, prompts), tmp_path, "--greedy", "--judge", str(a),
                  "--relevance-judge", str(minilm_dir))
    assert run.returncode == 0, run.stderr[-3000:]
    rows, summary = read(tmp_path)
    assert summary["reward"] == {"rate": 0.5, "low": 0.5, "high": 0.5, "wins": 0, "ties": 6, "losses": 0}
    assert summary["judge"]["ties"] == 6 and [row["judge_outcome"] for row in rows] == [0.5] * 6
    assert summary["relevance"]["ties"] == 6 and all(row["a_relevance"] == row["b_relevance"] for row in rows)
    assert "B's win rate, relevance" in run.stdout


@pytest.mark.slow  # 17 s; the client's retry of a 503 is checked in tests/trainer/client/test_reward_client.py
def test_a_server_that_refuses_at_first_is_retried_not_counted_as_a_loss(tiny_llama, policies, tmp_path):
    """The server's ports answer 503 (loading) until the test opens its gate: compare's requests are retried."""
    http_port, gate, log_path = free_port(), tmp_path / "gate", tmp_path / "server.log"
    server = start_gated(tiny_llama, gate, log_path, http_port, free_port())
    try:
        wait_for(server, log_path, "listening:")
        a, b, prompts = policies
        comparer = subprocess.Popen([*CLI, "compare", "--policy-a", str(a), "--policy-b", str(b), "--prompts", str(prompts),
                                     "--reward-url", f"http://127.0.0.1:{http_port}", "--out", str(tmp_path / "out"),
                                     "--max-new-tokens", "8", "--device", "cpu"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while "not_ready" not in httpx.get(f"http://127.0.0.1:{http_port}/metrics").text:
            assert time.monotonic() < deadline and comparer.poll() is None, "compare never asked the server"
            time.sleep(0.2)
        gate.touch()
        output, _ = comparer.communicate(timeout=300)
    finally:
        server.terminate()
        server.wait(30)
    assert comparer.returncode == 0, output[-3000:]
    rows, summary = read(tmp_path / "out")
    assert len(rows) == 6 and summary["reward"]["wins"] + summary["reward"]["ties"] + summary["reward"]["losses"] == 6
