"""Conversations with a reward model whose tokenizer has no chat template (BERT, MiniLM): `messages` are written
plainly, as training wrote them (the checkpoint says how), over HTTP and gRPC alike, and TRL's conversational
reward calls work."""
from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest

from rewardserve.trainer.client import RewardClient
from rewardserve.trainer.integrations import RewardServerFunction

from ..conftest import ServerProcess

TURNS = [{"role": "user", "content": "Is fire hot? "}, {"role": "assistant", "content": "Yes, very."}]


def test_messages_score_as_prompt_and_response_or_as_the_checkpoint_s_roles(tiny_bert, tmp_path):
    roles = tmp_path / "roles-bert"
    shutil.copytree(tiny_bert, roles)
    config = json.loads((roles / "config.json").read_text())
    (roles / "config.json").write_text(json.dumps(config | {"reward_plain_chat_format": "roles"}))
    server = ServerProcess(None, "--model", f"concat={tiny_bert}", "--model", f"roles={roles}")
    try:
        def scores(model: str, items: list[dict]) -> list[float]:
            reply = httpx.post(f"{server.http_url}/score", json={"model": model, "items": items}, timeout=30)
            assert reply.status_code == 200, reply.text
            return reply.json()["scores"]

        as_pair = {"prompt": TURNS[0]["content"], "response": TURNS[1]["content"]}
        assert scores("concat", [{"messages": TURNS}]) == scores("concat", [as_pair])
        written = {"text": "User: Is fire hot? \n\nAssistant: Yes, very."}
        assert scores("roles", [{"messages": TURNS}]) == scores("roles", [as_pair]) == scores("roles", [written])
        grpc = RewardClient(server.grpc_url).score([{"messages": TURNS}], target=None)
        assert grpc.scores == scores("concat", [{"messages": TURNS}])
        # TRL's GRPOTrainer on a conversational dataset calls the reward function so (it stopped at the first call)
        trl = RewardServerFunction(server.http_url, transform="raw")([[TURNS[0]]], [[TURNS[1]]])
        assert trl == scores("concat", [as_pair])
        info = {m["model"]: m for m in httpx.get(f"{server.http_url}/info", timeout=30).json()["models"]}
        assert info["concat"]["plain_chat_format"] == "concat" and info["roles"]["plain_chat_format"] == "roles"
    finally:
        server.stop()


@pytest.mark.slow  # 15 s of PPO; the parts (the start check's item shape, the server's plain chats) are default tests
def test_ppo_with_messages_prompts_against_a_reward_model_without_a_chat_template(tiny_bert, smol_tokenizer,
                                                                                    tmp_path):
    """The run that ended in a traceback 35 s in: messages prompts scored by a BERT reward model."""
    from ..conftest import CLI, build_tiny_policy

    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Is fire hot?"}]}) + "\n")
    server = ServerProcess(tiny_bert)
    try:
        run = subprocess.run([*CLI, "ppo", "--reward-url", server.http_url, "--policy", str(policy), "--prompts",
                              str(prompts), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
                              "--mini-batch-size", "4", "--max-new-tokens", "8"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        [step] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert step["dropped_total"] == 0 and step["rollouts"] == 4
    finally:
        server.stop()
