"""Several reward models behind one real server: per-model scores equal each model alone whatever the batch mix,
the combinations equal their hand-computed values, and unknown names are refused with the known ones, over HTTP
and gRPC."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from transformers import AutoTokenizer

from rewardserve.server.modeling import RewardModel
from rewardserve.server.schemas import ScoreItem
from rewardserve.server.tokenization import ItemEncoder, load_tokenizer
from rewardserve.trainer.client import RequestRejected, RewardClient, RewardTarget
from tests.conftest import ServerProcess, build_checkpoint

ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "How do I pick a lock?", "response": "I can't help with that.", "safety": True},
    {"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof / the gutters hum all night / "
                                                        "morning smells of earth"},
    {"prompt": "Hi", "response": "Hello! How can I help?"},
]
STATISTICS = {"a": (0.2, 1.5), "b": (-0.3, 0.5), "c": (0.0, 2.0)}
COMBINATIONS = ["safe=llama2 helpful=a safety=b threshold=0.5", "mix=sum 0.7*a 0.3*b", "ens=ensemble a b c lambda=0.5"]


def with_statistics(folder: Path, mean: float, std: float) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["reward_statistics"] = {"mean": mean, "std": std}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def three_models(tmp_path_factory, smol_tokenizer, minilm_dir) -> dict[str, Path]:
    """Two Llama models on SmolLM2's tokenizer (other seeds) and a BERT on MiniLM's: each its own tokenizer."""
    root = tmp_path_factory.mktemp("several")
    built = {"a": build_checkpoint(root / "a", "llama", smol_tokenizer, seed=0),
             "b": build_checkpoint(root / "b", "llama", smol_tokenizer, seed=1),
             "c": build_checkpoint(root / "c", "bert", AutoTokenizer.from_pretrained(minilm_dir), seed=2)}
    return {name: with_statistics(path, *STATISTICS[name]) for name, path in built.items()}


@pytest.fixture(scope="module")
def alone(three_models) -> dict[str, list[float]]:
    """Each model's score of each item, each item alone, in this process: what every answer must equal."""
    scores = {}
    for name, path in three_models.items():
        model = RewardModel.load(str(path))
        encoder = ItemEncoder(load_tokenizer(str(path)), model.max_positions, append_eos=model.is_decoder)
        scores[name] = [model.score_batch([encoder.encode(ScoreItem(**item)).input_ids])[0] for item in ITEMS]
    return scores


@pytest.fixture(scope="module")
def server(three_models):
    a, *others = [f"{name}={path}" for name, path in three_models.items()]
    flags = [arg for spec in others for arg in ("--model", spec)]
    flags += [arg for spec in COMBINATIONS for arg in ("--combination", spec)]
    process = ServerProcess(a, *flags, "--max-wait-ms", "20")
    yield process
    process.stop()


def whiten(name: str, score: float) -> float:
    mean, std = STATISTICS[name]
    return (score - mean) / std


def test_each_model_answers_as_it_does_alone_whatever_the_mix(server, alone):
    """Requests for a, b, c and all three side by side, sent together, so the batcher holds all the models' items
    at once: every answer equals the model scored alone (fp32, 1e-5)."""
    requests = [({"model": name}, name) for name in "abc" for _ in range(4)] + [({"models": ["c", "a", "b"]}, None)] * 4

    def send(request):
        body, _ = request
        return httpx.post(f"{server.http_url}/score", json={"items": ITEMS, "transform": "raw", **body}, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(send, requests))
    for (body, name), reply in zip(requests, replies):
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        if name is not None:
            assert answer["model"] == name and answer["components"] is None
            assert answer["scores"] == pytest.approx(alone[name], abs=1e-5)
        else:
            assert list(answer["components"]) == ["c", "a", "b"] and answer["model"] == "c"
            for part_name, part in answer["components"].items():
                assert part["scores"] == pytest.approx(alone[part_name], abs=1e-5)
            assert answer["scores"] == answer["components"]["c"]["scores"]


def test_the_default_is_the_first_model_and_each_keeps_its_transform(server, alone):
    answer = httpx.post(f"{server.http_url}/score", json={"items": ITEMS}, timeout=60).json()
    assert answer["model"] == "a" and answer["transform"]["name"] == "whiten"
    assert answer["rewards"] == pytest.approx([whiten("a", s) for s in alone["a"]], abs=1e-5)
    assert answer["model_version"] and "@" in answer["model_version"]


def test_llama2_rule_over_http_and_grpc(server, alone):
    for url in (server.http_url, server.grpc_url):
        with RewardClient(url) as client:
            result = client.score(ITEMS, target=RewardTarget(combination="safe"))
        expected = ["b" if flagged or 1 / (1 + math.exp(-s)) < 0.5 else "a"
                    for s, flagged in zip(alone["b"], [item.get("safety", False) for item in ITEMS])]
        assert result.chosen == expected and expected[1] == "b"  # item 1 is flagged
        assert result.scores == pytest.approx([alone[m][i] for i, m in enumerate(expected)], abs=1e-5)
        assert result.rewards == pytest.approx([whiten(m, alone[m][i]) for i, m in enumerate(expected)], abs=1e-5)
        assert result.combination["kind"] == "llama2" and result.combination["threshold"] == 0.5
        assert set(result.components) == {"a", "b"}
        assert result.components["b"]["rewards"] == pytest.approx([whiten("b", s) for s in alone["b"]], abs=1e-5)
        assert result.model_version.count("=") == 2


def test_weighted_sum_and_ensemble_against_hand_computed_values(server, alone):
    with RewardClient(server.http_url) as client:
        mix = client.score(ITEMS, target=RewardTarget(combination="mix"))
        ensemble = client.score(ITEMS, target=RewardTarget(combination="ens"))
    assert mix.rewards == pytest.approx([0.7 * whiten("a", a) + 0.3 * whiten("b", b)
                                         for a, b in zip(alone["a"], alone["b"])], abs=1e-5)
    for i in range(len(ITEMS)):
        values = [whiten(name, alone[name][i]) for name in "abc"]
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
        assert ensemble.scores[i] == pytest.approx(mean, abs=1e-5) and ensemble.std[i] == pytest.approx(std, abs=1e-5)
        assert ensemble.rewards[i] == pytest.approx(mean - 0.5 * std, abs=1e-5)


def test_unknown_names_are_refused_with_the_known_ones(server):
    for body, says in [({"model": "helpful"}, "no model named 'helpful'; this server has models: a, b, c;"
                                              " combinations: safe, mix, ens"),
                       ({"combination": "nope"}, "no combination named 'nope'; this server's combinations: safe,"
                                                 " mix, ens"),
                       ({"models": ["a", "zz"]}, "no model named 'zz'"),
                       ({"model": "a", "combination": "safe"}, "name one of `model`, `models` or `combination`"),
                       ({"combination": "safe", "transform": "raw"}, "leave out `transform`")]:
        reply = httpx.post(f"{server.http_url}/score", json={"items": ITEMS[:1], **body}, timeout=30)
        assert reply.status_code == 422 and says in reply.json()["error"]["message"], reply.text
    with RewardClient(server.grpc_url) as client, pytest.raises(RequestRejected) as refused:
        client.score(ITEMS[:1], target=RewardTarget(model="helpful"))
    assert refused.value.status == grpc.StatusCode.NOT_FOUND.name and "models: a, b, c" in str(refused.value)
    assert httpx.get(f"{server.http_url}/ready").status_code == 200  # and it keeps serving


def test_info_lists_models_and_combinations_on_both_protocols(server, three_models):
    info = httpx.get(f"{server.http_url}/info").json()
    assert [m["model"] for m in info["models"]] == ["a", "b", "c"] and info["default"] == "a"
    assert [m["path"] for m in info["models"]] == [str(p) for p in three_models.values()]
    assert info["models"][2]["architecture"] == "BertForSequenceClassification"
    assert [c["name"] for c in info["combinations"]] == ["safe", "mix", "ens"]
    from rewardserve.proto import reward_pb2, reward_pb2_grpc

    stub = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    answer = stub.Info(reward_pb2.InfoRequest(), timeout=10)
    assert json.loads(answer.json) == info
    assert answer.default == "a"
    assert [(c.name, c.kind, list(c.models)) for c in answer.combinations] == [
        (c["name"], c["kind"], c["models"]) for c in info["combinations"]]
    scalars = ("model", "path", "version", "architecture", "dtype", "device", "max_length", "on_overflow",
               "chat_template", "max_items_per_request", "max_batch_tokens", "forward")
    for mirrored, expected in zip([answer.default_model, *answer.models], [info, *info["models"]]):
        assert {key: getattr(mirrored, key) for key in scalars} == {key: expected[key] for key in scalars}
        assert mirrored.default_transform.name == expected["default_transform"]["name"]
        assert (mirrored.statistics.mean, mirrored.statistics.std) == (expected["statistics"]["mean"],
                                                                       expected["statistics"]["std"])


@pytest.mark.slow  # 7 s; the default suite refuses it in process (tests/server/test_combinations.py)
def test_a_combination_over_models_without_statistics_is_refused_at_start(tmp_path, smol_tokenizer):
    bare = build_checkpoint(tmp_path / "bare", "llama", smol_tokenizer)
    stats = with_statistics(build_checkpoint(tmp_path / "stats", "llama", smol_tokenizer, seed=1), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="bare has no reward statistics: serve a checkpoint from `rewardserve"):
        ServerProcess(f"bare={bare}", "--model", f"stats={stats}", "--combination", "e=ensemble bare stats",
                      startup_timeout=60)


def test_openrlhf_endpoint_and_trl_function_take_a_combination(server):
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>", "just some text"]
    direct = httpx.post(f"{server.http_url}/score", json={"items": [{"text": t} for t in texts],
                                                          "combination": "mix"}, timeout=30).json()
    compat = httpx.post(f"{server.http_url}/get_reward", json={"query": texts, "combination": "mix"}, timeout=30)
    assert compat.status_code == 200 and compat.json()["rewards"] == pytest.approx(direct["rewards"], abs=1e-6)
    from rewardserve.trainer.integrations import RewardServerFunction

    function = RewardServerFunction(server.http_url, combination="ens")
    rewards = function(["Hi", "Hi"], ["Hello", "Go away"])
    by_hand = RewardClient(server.http_url).score([{"prompt": "Hi", "response": r} for r in ("Hello", "Go away")],
                                                  target=RewardTarget(combination="ens")).rewards
    assert rewards == pytest.approx(by_hand, abs=1e-6) and function.__name__ == "rewardserve_ens"


@pytest.mark.parametrize("flags, expected", [
    (["--reward-combination", "ens"], {"reward/a", "reward/b", "reward/c", "reward/ensemble_std"}),
    # 9 s each; the ensemble above logs every kind of component in the default suite
    pytest.param(["--reward-combination", "safe"], {"reward/a", "reward/b"}, marks=pytest.mark.slow),
    pytest.param(["--reward-model", "b,c"], {"reward/b", "reward/c"}, marks=pytest.mark.slow),
])
def test_ppo_logs_each_component(server, smol_tokenizer, tmp_path, flags, expected):
    from tests.conftest import CLI, build_tiny_policy
    import subprocess

    policy = build_tiny_policy(tmp_path / "policy", smol_tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say something."}) + "\n")
    run = subprocess.run([*CLI, "ppo", "--reward-url", server.http_url, "--policy", str(policy), "--prompts",
                          str(prompts), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--mini-batch-size", "4",
                          "--max-new-tokens", "8", *flags], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert expected <= set(record), set(record)
        assert record["model_version"].count("=") == len([k for k in expected if k.count("/") == 1
                                                          and k != "reward/ensemble_std"])
    if "safe" in flags:
        shares = [v for k, v in records[-1].items() if k.startswith("reward/chosen/")]
        assert shares and sum(shares) == pytest.approx(1.0)


def test_ppo_refuses_an_unknown_combination_before_loading_the_policy(server, tmp_path):
    """The policy folder does not exist: a refusal that came after loading it would complain about that instead."""
    from tests.conftest import CLI
    import subprocess

    run = subprocess.run([*CLI, "ppo", "--reward-url", server.http_url, "--policy", str(tmp_path / "absent"),
                          "--out", str(tmp_path / "run"), "--reward-combination", "nope", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert len(lines) == 1 and "refuses this run's requests (HTTP 422 unknown_model)" in lines[0], run.stderr
    assert "no combination named 'nope'" in lines[0] and "ens" in lines[0]


def test_the_score_command_names_a_combination_or_models(server):
    import subprocess

    from tests.conftest import CLI

    for flags, check in [(["--combination", "ens"], lambda out: out["combination"]["kind"] == "ensemble"),
                         (["--model", "b,c"], lambda out: list(out["components"]) == ["b", "c"])]:
        run = subprocess.run([*CLI, "score", "--url", server.grpc_url, "--prompt", "Hi", "--response", "Hello",
                              *flags], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert check(json.loads(run.stdout))
