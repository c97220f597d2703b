"""Conversations with a reward model whose tokenizer has no chat template (BERT, MiniLM): `messages` are written
plainly, as training wrote them (the checkpoint says how), over HTTP and gRPC alike."""
from __future__ import annotations

import json
import shutil

import httpx

from rewardserve.trainer.client import RewardClient

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
        info = {m["model"]: m for m in httpx.get(f"{server.http_url}/info", timeout=30).json()["models"]}
        assert info["concat"]["plain_chat_format"] == "concat" and info["roles"]["plain_chat_format"] == "roles"
    finally:
        server.stop()
