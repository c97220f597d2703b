"""Admission before work, in process: the item count read on the raw bytes (JSON and protobuf), the in-flight
character budget's rules, the memory trim's pacing, and the rough edges of start-up and reload that were a
traceback, a silent misreading or a dead process."""
from __future__ import annotations

import json
import time

import pytest

from rewardserve.proto import reward_pb2
from rewardserve.server.admission import (MemoryTrimmer, TokenizingBudget, count_protobuf_field, longest_json_array)
from rewardserve.server.config import ServeConfig
from rewardserve.server.errors import StartupError, describe_validation_errors

MANY = 48 * 1025 + 100  # past the count below which a body is parsed without counting


def items_body(item: bytes, count: int, tail: bytes = b"") -> bytes:
    return b'{"items": [' + b", ".join([item] * count) + b"]" + tail + b"}"


def test_the_longest_array_is_counted_on_the_bytes_and_counting_stops_past_the_limit():
    assert longest_json_array(items_body(b"{}", MANY), 1024) == ("items", 1025)
    assert longest_json_array(items_body(b"{}", MANY), MANY) is None
    # strings hold brackets, commas and escaped quotes; a later object's commas are not the array's; 60 strings an
    # item, so that the body is one to count rather than parse freely
    tricky = b'{"text": "a \\"quoted\\" [x, {y}], z", "tags": [' + b", ".join([b'"t"'] * 60) + b"]}"
    body = items_body(tricky, 1025, b', "transform": {"a": 1, "b": 2}')
    assert longest_json_array(body, 1024) == ("items", 1025) and longest_json_array(body, 1025) is None
    strings = b'{"query": [' + b", ".join([b'""'] * MANY) + b"]}"  # the compatible endpoints' shape
    assert longest_json_array(strings, 1024) == ("query", 1025)
    nested = items_body(b'{"messages": [' + b", ".join([b'{"role": "user", "content": "hi, [there]"}'] * 20) + b"]}",
                        1000)
    assert longest_json_array(nested, 1024) is None  # 1000 items, however many values inside them
    assert longest_json_array(items_body(b"{}", 1100), 1024) is None  # small: parsed, the validator counts


def test_a_million_item_body_is_counted_in_milliseconds():
    body = items_body(b"{}", 1_000_000)
    began = time.perf_counter()
    assert longest_json_array(body, 1024) == ("items", 1025)
    assert time.perf_counter() - began < 0.05


def test_the_protobuf_items_are_counted_on_the_wire():
    message = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text="a", input_ids=[1, 2])] * 7, model="m",
                                      request_id="r")
    raw = message.SerializeToString()
    assert count_protobuf_field(raw, 1, 1024) == 7 and count_protobuf_field(raw, 1, 3) == 4
    huge = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem()] * 1_000_000).SerializeToString()
    began = time.perf_counter()
    assert count_protobuf_field(huge, 1, 1024) == 1025
    assert time.perf_counter() - began < 0.05


def test_an_error_lists_at_most_ten_problems_each_bounded():
    errors = [{"loc": ("items", i, "text"), "msg": "x" * 5000} for i in range(100_000)]
    message = describe_validation_errors(errors)
    assert message.endswith("and 99990 more problems of the same request") and len(message) < 6000


def test_the_budget_refuses_a_flood_keeps_a_share_per_client_and_a_reserve_for_newcomers():
    budget = TokenizingBudget(1000)
    assert budget.try_admit("flood-1", 300)
    assert not budget.try_admit("flood-2", 600)  # room for it, but over half while flood-1 holds some
    assert budget.try_admit("flood-1", 700)  # alone, a client may use the whole budget
    assert not budget.try_admit("flood-2", 200)  # no room
    assert budget.try_admit("steady", 15)  # holds nothing and is small: the reserve takes it
    assert not budget.try_admit("steady", 15)  # holding something now: no reserve
    assert not budget.try_admit("other", 400)  # too large for the reserve
    budget.release("flood-1", 1000)
    budget.release("steady", 15)
    assert budget.admitted == 0 and budget.by_client == {}
    assert budget.try_admit("huge", 5000)  # an idle server takes any one request, or it could never be served
    assert not budget.try_admit("next", 100)


def test_the_memory_trim_waits_for_a_large_request_and_a_second_between_trims():
    trimmer = MemoryTrimmer(every_seconds=60)
    if trimmer._trim is None:
        pytest.skip("no malloc_trim in this C library")
    assert not trimmer.due(1000) and trimmer.due(2 << 20)
    trimmer.trim()
    assert not trimmer.due(2 << 20)


# -- rough edges ----------------------------------------------------------------------------------------------------
def test_a_reload_path_past_4096_characters_is_a_422_not_a_500():
    from pydantic import ValidationError

    from rewardserve.server.schemas import ReloadRequest

    with pytest.raises(ValidationError, match="at most 4096"):
        ReloadRequest(path="x" * 100_000)


def test_a_judge_template_with_a_format_spec_is_refused_at_start(tmp_path):
    from rewardserve.server.judge import read_template

    template = tmp_path / "t.txt"
    template.write_text("Rate {response:>99999999999} for {prompt}")
    with pytest.raises(StartupError, match="no format spec or conversion.*{response:>99999999999}"):
        read_template(str(template))
    template.write_text("Rate {response!r}")
    with pytest.raises(StartupError, match="{response!r}"):
        read_template(str(template))


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8\n", b"[" * 100_000 + b"\n"])
def test_a_judge_calibration_set_that_cannot_be_read_is_a_one_line_start_error(tmp_path, content):
    from rewardserve.server.main import judge_statistics

    path = tmp_path / "calibration.jsonl"
    path.write_bytes(content)
    with pytest.raises(StartupError, match="--judge-calibration-set"):
        judge_statistics(None, None, str(path))


def test_a_judge_with_its_own_code_is_refused_without_trust_remote_code(tmp_path, smol_tokenizer):
    from rewardserve.server.judge import load_judge

    from ..conftest import build_tiny_policy

    folder = build_tiny_policy(tmp_path / "judge", smol_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyJudge"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_mine.py").write_text("raise SystemExit('never imported')\n")
    with pytest.raises(StartupError, match="modeling_mine.py.*--trust-remote-code"):
        load_judge(str(folder), smol_tokenizer, device="cpu")


def test_objective_weights_naming_an_output_twice_or_on_a_one_output_model_are_refused(tiny_llama):
    from pydantic import ValidationError

    from rewardserve.server.combinations import Objective
    from rewardserve.server.modeling import RewardModel

    with pytest.raises(ValidationError, match="names helpful twice"):
        ServeConfig(model=[str(tiny_llama)], objective_weights="helpful=1,helpful=-1")
    with pytest.raises(StartupError, match="has one output"):
        RewardModel.load(str(tiny_llama), objective=Objective(name="helpful"))


def test_a_checkpoint_that_changes_while_it_loads_is_refused(tmp_path):
    from rewardserve.server.modeling import unchanged_while_loading

    (tmp_path / "model.safetensors").write_bytes(b"0" * 10)
    with pytest.raises(StartupError, match="changed while it loaded"):
        with unchanged_while_loading(tmp_path):
            (tmp_path / "model.safetensors").unlink()
    with unchanged_while_loading(tmp_path):  # unchanged: nothing said
        pass


def test_keys_come_from_files_and_not_both_ways(tmp_path, tiny_llama):
    from pydantic import ValidationError

    key = tmp_path / "key"
    key.write_text("s3cret\n")
    config = ServeConfig(model=[str(tiny_llama)], api_key_file=str(key))
    assert config.api_key.get_secret_value() == "s3cret" and config.printable()["api_key"] == "<set>"
    with pytest.raises(ValidationError, match="--api-key or --api-key-file, not both"):
        ServeConfig(model=[str(tiny_llama)], api_key_file=str(key), api_key="other")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValidationError, match="is empty"):
        ServeConfig(model=[str(tiny_llama)], admin_key_file=str(tmp_path / "empty"))


def test_steps_count_in_a_request_s_characters():
    from rewardserve.server.schemas import ScoreRequest
    from rewardserve.server.service import request_characters

    steps = ScoreRequest(items=[{"prompt": "ab", "steps": ["x" * 1000, "y" * 500]}])
    assert request_characters(steps) == 2 + 1500
