"""The real server calibrates its forward at start (packed SDPA against padded, two budgets, on this CPU), serves
with the fastest, shows the table in its log, /info (HTTP and gRPC) and metrics, and calibrates again after a
hot reload."""
from __future__ import annotations

import json

import grpc
import httpx

from rewardserve.proto import reward_pb2, reward_pb2_grpc
from tests.conftest import ServerProcess, build_checkpoint

ADMIN = "admin-secret"
CALIBRATING = ("--forward-path", "auto", "--max-batch-tokens", "auto", "--calibration-budgets", "1024,4096",
               "--calibration-seconds", "20")


def test_the_server_calibrates_at_start_and_again_after_a_reload(tmp_path, smol_tokenizer):
    checkpoint = build_checkpoint(tmp_path / "allowed" / "a", "llama", smol_tokenizer)
    server = ServerProcess(checkpoint, *CALIBRATING, "--allow-reload-from", str(checkpoint.parent),
                           "--admin-key", ADMIN)
    try:
        info = httpx.get(f"{server.http_url}/info", timeout=30).json()
        calibration = info["calibration"]
        measured = {(c["path"], c["budget"]): c["tokens_per_s"] for c in calibration["candidates"]}
        assert set(measured) == {("packed-sdpa", 1024), ("padded", 1024), ("packed-sdpa", 4096), ("padded", 4096)}
        fastest = max(measured, key=measured.get)
        assert calibration["how"] == "measured" and (info["forward_path"], info["max_batch_tokens"]) == fastest
        assert "calibration of a in" in server.output() and "chosen" in server.output()  # the table, logged
        assert server.metric("rewardserve_calibration_tokens_per_second") > 0
        assert server.metric("rewardserve_forward_budget_tokens") == fastest[1]
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            answer = reward_pb2_grpc.RewardServiceStub(channel).Info(reward_pb2.InfoRequest(), timeout=30)
        assert answer.default_model.forward_path == info["forward_path"]
        assert len(answer.default_model.calibration.candidates) == 4

        score = httpx.post(f"{server.http_url}/score", json={"items": [{"text": "hello there"}]}, timeout=30)
        assert score.status_code == 200
        reloaded = httpx.post(f"{server.http_url}/admin/reload", json={"path": str(checkpoint)},
                              headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        assert reloaded.status_code == 200, reloaded.text
        assert server.output().count("calibration of a in") == 2  # measured again for the reloaded weights
        again = httpx.get(f"{server.http_url}/info", timeout=30).json()["calibration"]
        assert again["how"] == "measured" and json.dumps(again) != json.dumps(calibration)  # new timings
    finally:
        server.stop()
