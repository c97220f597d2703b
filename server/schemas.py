"""The one definition of a scoring request and its result.

FastAPI builds these from JSON and the gRPC adapter builds them from protobuf, so the shape rules written here
are the only ones, and both protocols answer a bad item with the same message.
"""
from __future__ import annotations

import functools

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

TransformChoice = Literal["raw", "whiten", "logsigmoid", "debias"]


def _valid_unicode(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them here, by field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"holds an unpaired surrogate at position {error.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
Name = Annotated[str, Field(min_length=1)]  # a model or combination; "" is refused rather than read as the default


# The roles chat templates know (OpenAI's, and the tool roles of Llama 3 and Qwen); anything else would be
# rendered by some templates as if it were one of these, or dropped, without a word.
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def _known_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one chat templates know; use one of {', '.join(ROLES)}")
    return role


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Annotated[str, AfterValidator(_known_role)] = Field(
        description="system, user or assistant (or developer, tool, function, ipython)")
    content: Text


class ScoreItem(BaseModel):
    """One thing to score, given in exactly one of four forms.

    - `prompt` + `response`: joined with the checkpoint's chat template (user turn, assistant turn) when it has
      one, else concatenated. `prompt` + `steps` is the same item with the response given as its steps: a process
      reward model scores each one; any other model scores the steps joined by the server's --step-separator.
    - `messages`: a whole chat, scored after the template is applied; it should end with the assistant turn.
    - `text`: already formatted; scored exactly as given (no template, no extra BOS).
    - `input_ids`: already tokenized; scored exactly as given.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = None
    response: Text | None = None
    messages: list[Message] | None = None
    text: Text | None = None
    input_ids: list[int] | None = None
    steps: list[Text] | None = Field(None, description="the response as its steps, for a process reward model (each"
                                                       " step scored); other models read them joined by the"
                                                       " server's step separator")
    safety: bool | None = Field(None, description="flags the item safety-relevant, for a llama2 combination: its"
                                                   " safety model's score is used whatever it is")
    reference: Text | None = Field(None, description="the right answer, for a verifier (`math`, `exact`) to check"
                                                     " the response against; reward models ignore it")

    @model_validator(mode="after")
    def _exactly_one_form(self) -> "ScoreItem":
        if self.steps is not None and self.response is not None:
            raise ValueError("give the response once: as `response` or as its `steps`, not both")
        if self.steps is not None and not self.steps:
            raise ValueError("`steps` is empty; send at least one step")
        if self.prompt is not None and self.response is None and self.steps is None:
            raise ValueError("`prompt` needs a `response` (or its `steps`) to score; send both, or send `text` instead")
        forms = [
            name
            for name, given in [
                ("prompt/response", self.response is not None or self.steps is not None),
                ("messages", self.messages is not None),
                ("text", self.text is not None),
                ("input_ids", self.input_ids is not None),
            ]
            if given
        ]
        if not forms:
            raise ValueError("an item needs one of: `prompt` + `response` (or `steps`), `messages`, `text` or"
                             " `input_ids`")
        if len(forms) > 1:
            raise ValueError(f"an item takes exactly one form, got {' and '.join(forms)}")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` is empty; send at least one message")
        if self.text is not None and not self.text:
            raise ValueError("`text` is empty; there is nothing to score")
        if self.input_ids is not None:
            if not self.input_ids:
                raise ValueError("`input_ids` is empty; there is nothing to score")
            if min(self.input_ids) < 0:
                raise ValueError("`input_ids` holds a negative token id")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ScoreItem] = Field(min_length=1, description="the items to score, at least one")
    transform: TransformChoice | None = Field(
        default=None, description="raw, whiten, logsigmoid or debias; the model's default when left out (a"
                                  " combination fixes its own)"
    )
    model: Name | None = Field(None, description="score with this one model (GET /info lists them)")
    models: list[Name] | None = Field(None, min_length=1, description="score with each of these models; the response"
                                                                        " has every model's scores in `components`")
    combination: Name | None = Field(None, description="score with this combination declared at start")

    @model_validator(mode="after")
    def _one_target(self) -> "ScoreRequest":
        named = [name for name in ("model", "models", "combination") if getattr(self, name) is not None]
        if len(named) > 1:
            raise ValueError(f"name one of `model`, `models` or `combination`, not {' and '.join(named)}")
        return self


@functools.cache
def score_request_limited_to(max_items: int) -> type[ScoreRequest]:
    """ScoreRequest whose `items` holds at most `max_items`: the validator refuses a longer list before validating
    any item (one error, not one per item), the form the HTTP adapter parses a body into."""
    return create_model("ScoreRequest", __base__=ScoreRequest,
                        items=(list[ScoreItem], Field(min_length=1, max_length=max_items,
                                                      description="the items to score, at least one")))


class RewardStatisticsOut(BaseModel):
    mean: float
    std: float
    source: str


class LengthFitOut(BaseModel):
    slope: float
    mean_length: float
    responses: int


class TransformOut(BaseModel):
    name: TransformChoice
    statistics: RewardStatisticsOut | None = None
    beta: float | None = None
    length_fit: LengthFitOut | None = None


class CombinationOut(BaseModel):
    name: str
    kind: Literal["llama2", "sum", "ensemble", "gate"]
    models: list[str]
    weights: list[float] | None = None
    threshold: float | None = None
    conservative_lambda: float | None = None
    otherwise: float | None = Field(None, description="gate: the reward where the gate's check fails")


class CheckOut(BaseModel):
    """A verifier's reading of one item."""

    verdict: Literal["correct", "wrong", "no_answer", "timeout"] | str
    answer: str | None = Field(None, description="the answer as the checker read it (math: the parsed final answer)")


class ComponentScores(BaseModel):
    """One model's part of a `models` or `combination` answer."""

    scores: list[float]
    rewards: list[float]
    truncated: list[bool]
    transform: TransformOut
    model_version: str
    outputs: dict[str, list[float]] | None = None
    checks: list[CheckOut] | None = None
    step_scores: list[list[float]] | None = None


STEP_SCORES_DESCRIPTION = ("a process reward model: each item's step scores (the probability that each step is"
                           " right), in the order of its steps; `scores` is their aggregate (/info's `steps`)")
CHECKS_DESCRIPTION = "a verifier: each item's verdict and the answer it read"
OUTPUTS_DESCRIPTION = ("a model of several outputs (a num_labels > 1 head, a judge): each named output, one value per"
                       " item; `scores` is the reward made of them as /info's `objective` says")


class ScoreResponse(BaseModel):
    """Parallel lists, one entry per item, in the order the items came.

    One model: its raw `scores` and transformed `rewards`. `models`: the first model's at the top, every model's in
    `components`. A combination: `rewards` is the combined reward, `scores` the value before its last step (llama2:
    the chosen raw score; sum: the sum; ensemble: the mean), and `components` each model's raw and whitened scores.
    """

    model: str = Field(description="the model or combination that gave `rewards`")
    scores: list[float] = Field(description="raw scores of the reward model")
    rewards: list[float] = Field(description="scores after the transform")
    truncated: list[bool] = Field(description="whether the item was cut to max_length (prompt cut from the left)")
    transform: TransformOut
    model_version: str = Field(description="the version of the model that scored (hash of weights and config @ load"
                                           " time); for several, `name=version` joined by commas")
    components: dict[str, ComponentScores] | None = None
    combination: CombinationOut | None = None
    chosen: list[str] | None = Field(None, description="llama2: the model whose score each item got")
    std: list[float] | None = Field(None, description="ensemble: the std of the models' whitened scores")
    outputs: dict[str, list[float]] | None = Field(None, description=OUTPUTS_DESCRIPTION)
    checks: list[CheckOut] | None = Field(None, description=CHECKS_DESCRIPTION)
    step_scores: list[list[float]] | None = Field(None, description=STEP_SCORES_DESCRIPTION)


class CalibrationCandidateOut(BaseModel):
    path: str
    budget: int
    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    seconds: float = 0.0
    compile_seconds: float = Field(0.0, description="of `seconds`, the check against padded and the warm-up"
                                                    " (compilation), kept apart from the timed runs")
    skipped: str | None = Field(None, description="why it was not measured, or is not eligible")


class CalibrationOut(BaseModel):
    how: str = Field(description="`measured`, or why nothing was (pinned by flags)")
    seconds: float
    candidates: list[CalibrationCandidateOut]


class StepsOut(BaseModel):
    head: str = Field(description="token classification (P(label 1)) or step tag (P(GOOD) against P(BAD))")
    read: str = Field(description="where each step's score is read")
    aggregate: Literal["min", "last", "mean", "product"]
    separator: str
    tag: str | None = None
    max_steps: int


class ModelInfo(BaseModel):
    model: str
    path: str = ""
    version: str = ""
    architecture: str
    dtype: str
    device: str
    max_length: int
    on_overflow: str
    chat_template: bool
    plain_chat_format: str | None = Field(None, description="without a chat template: how conversations are"
                                                            " written (concat or roles)")
    default_transform: TransformOut
    statistics: RewardStatisticsOut | None = None
    max_items_per_request: int
    max_batch_tokens: int
    forward_path: str = Field("", description="packed-flex, packed-varlen, packed-sdpa or padded: how its batches"
                                               " run (measured at start unless pinned; after a kernel failed, the"
                                               " path that runs instead)")
    forwards: dict[str, int] = Field({}, description="forward passes along each path since the model loaded, from"
                                                     " the attention kernels its layers called")
    calibration: CalibrationOut | None = Field(None, description="the start-up calibration's candidates and choice")
    forward: str = Field("model", description="`model`, or the stand-in a benchmark replaced its forward with")
    min_shared_prefix: int | None = Field(None, description="items sharing this many leading tokens or more are"
                                                            " computed over that prefix once; None: sharing is off")
    shared_prefix: str = Field("", description="why sharing is on or off for this model")
    length_fit: LengthFitOut | None = None
    kind: Literal["reward_model", "judge", "verifier", "process_reward_model"] = Field(
        "reward_model", description="a reward model, a causal LM served as a judge (its expected rating), an"
                                    " answer checker (a verifier), or a process reward model (a score per step)")
    steps: StepsOut | None = Field(None, description="a process reward model: its head, where it reads each step,"
                                                     " the step aggregate and the most steps an item may have")
    verifier: str | None = Field(None, description="a verifier: its kind and option (math, exact, regex:PATTERN,"
                                                   " python:MODULE:FUNCTION)")
    outputs: list[str] = Field([], description="the names of its outputs, where it has several")
    objective: str | None = Field(None, description="how the reward is made of the outputs: one of them, or a"
                                                    " weighted sum")
    code_files: dict[str, str] | None = Field(None, description="--trust-remote-code: SHA-256 of each Python file"
                                                                " of the checkpoint, the code that scores")


class ServerInfo(ModelInfo):
    """GET /info: the default model's fields at the top (as a one-model server has always answered), then every
    model, the combinations and the default."""

    models: list[ModelInfo]
    combinations: list[CombinationOut]
    default: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Name | None = Field(None, description="the model to replace; the server's first model when left out")
    path: str | None = Field(None, min_length=1, max_length=4096,
                             description="checkpoint folder inside --allow-reload-from; the model's own path"
                                         " (re-read) when left out")


class ReloadResponse(BaseModel):
    model: str
    path: str
    old_version: str
    new_version: str
    seconds: float


class OpenRLHFRewardRequest(BaseModel):
    """OpenRLHF's remote reward-model protocol: `query` holds the full, already templated texts."""

    query: list[str] = Field(min_length=1)
    prompts: list[str] | None = None
    labels: list | None = None
    model: Name | None = Field(None, description="rewardserve's addition: one of the server's models")
    combination: Name | None = Field(None, description="rewardserve's addition: one of the server's combinations")


class OpenRLHFRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict = Field(default_factory=dict)
