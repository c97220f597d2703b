"""A table of bad inputs -> error, and the error table itself."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from rewardserve.server import errors
from rewardserve.server.errors import describe_validation_errors
from rewardserve.server.schemas import ScoreItem, ScoreRequest

BAD_REQUESTS = [
    ({"items": []}, "items: List should have at least 1 item"),
    ({"items": [{}]}, "items[0]: an item needs one of"),
    ({"items": [{"prompt": "p"}]}, "`prompt` needs a `response`"),
    ({"items": [{"text": "a", "input_ids": [1]}]}, "exactly one form, got text and input_ids"),
    ({"items": [{"text": ""}]}, "`text` is empty"),
    ({"items": [{"messages": []}]}, "`messages` is empty"),
    ({"items": [{"input_ids": []}]}, "`input_ids` is empty"),
    ({"items": [{"input_ids": [3, -1]}]}, "negative token id"),
    ({"items": [{"text": 5}]}, "items[0].text: Input should be a valid string"),
    ({"items": [{"messages": [{"role": "user"}]}]}, "items[0].messages[0].content: Field required"),
    ({"items": [{"messages": [{"role": "bot", "content": "hi"}]}]},
     "items[0].messages[0].role: role 'bot' is not one chat templates know; use one of system, developer, user"),
    ({"items": [{"text": "a"}], "transform": "zscore"}, "transform: Input should be 'raw', 'whiten', 'logsigmoid' or 'debias'"),
    ({"items": [{"text": "a", "colour": "red"}]}, "items[0].colour: Extra inputs are not permitted"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS)
def test_bad_requests_name_the_field_and_the_fix(body, message):
    with pytest.raises(ValidationError) as error:
        ScoreRequest.model_validate(body)
    assert message in describe_validation_errors(error.value.errors())


def test_each_form_is_accepted():
    for item in [{"prompt": "p", "response": "r"}, {"response": "r"}, {"text": "t"}, {"input_ids": [1, 2]},
                 {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]:
        ScoreItem.model_validate(item)
    assert ScoreItem(prompt="p", response="").response == ""  # an empty rollout is still scorable


ERROR_CLASSES = [errors.InvalidInput, errors.MalformedRequest, errors.TransformUnavailable, errors.UnknownModel, errors.InputTooLong,
                 errors.TooManyItems, errors.UnscorableItem, errors.PayloadTooLarge, errors.Unauthorized, errors.Forbidden, errors.ReloadFailed,
                 errors.InsufficientMemory, errors.Conflict, errors.Overloaded, errors.RateLimited,
                 errors.NotReady, errors.Internal]


@pytest.mark.parametrize("cls", ERROR_CLASSES)
def test_every_error_has_a_status_a_grpc_code_and_one_body_shape(cls):
    import grpc

    error = cls("what to fix")
    assert 400 <= error.http_status < 600
    assert isinstance(getattr(grpc.StatusCode, error.grpc_code), grpc.StatusCode)
    assert error.body("r1") == {"error": {"type": error.kind, "message": "what to fix", "request_id": "r1"}}


def test_the_hierarchy_is_closed_and_complete():
    def leaves(cls):
        return {cls} | {c for sub in cls.__subclasses__() for c in leaves(sub)}

    assert leaves(errors.RewardServeError) - {errors.RewardServeError} == set(ERROR_CLASSES)
    assert len({c.kind for c in ERROR_CLASSES}) == len(ERROR_CLASSES)
