"""Endpoints in the shapes other trainers' reward clients already send, translated onto the same core and batcher.

Each route parses that project's body, builds the one `ScoreRequest`, calls `ScoringService.score`, and reshapes
the result. Texts from these clients are already templated, so they are sent as `text` (or `input_ids`) items:
scored as given, with no template and no extra BOS.

- vLLM `POST /classify` (verl's reward loop) and the SGLang-native classify shape share one path: a body with
  `input`/`messages` is vLLM's, one with `text`/`input_ids` is SGLang's.
- TEI `POST /predict`.
Truncation follows the server's own rule (`--on-overflow`: the prompt is cut from the left, or 413), whatever
`truncate`, `truncation_direction` or `truncate_prompt_tokens` say: the reward is read at the end of the text,
so the end is what must survive.
- LLaMA-Factory `POST /v1/score/evaluation`.
"""
from __future__ import annotations

import math
import time
import uuid

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InvalidInput
from .schemas import ScoreItem, ScoreRequest, ScoreResponse
from .service import ScoringService


class ClassifyRequest(BaseModel):
    """vLLM's classify body (`input` or `messages`) or SGLang's native one (`text` or `input_ids`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[dict] | None = None
    use_activation: bool | None = None
    activation: bool | None = Field(None, description="vLLM's older name of use_activation")
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> "ClassifyRequest":
        given = [name for name in ("input", "messages", "text", "input_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("send exactly one of `input` or `messages` (vLLM), or `text` or `input_ids` (SGLang)")
        return self

    @property
    def is_sglang(self) -> bool:
        return self.text is not None or self.input_ids is not None

    @property
    def single_sglang_item(self) -> bool:
        """SGLang answers a single text (or one token list) with one object, a batch with a list."""
        return isinstance(self.text, str) or (self.input_ids is not None and all(isinstance(i, int) for i in self.input_ids))

    def items(self) -> list[ScoreItem]:
        if self.messages is not None:
            return [ScoreItem(messages=self.messages)]
        value = self.input if self.input is not None else self.text if self.text is not None else self.input_ids
        if isinstance(value, str):
            return [ScoreItem(text=value)]
        if not value:
            raise InvalidInput("the input list is empty; send at least one text or token list")
        if all(isinstance(v, int) for v in value):
            return [ScoreItem(input_ids=value)]
        return [ScoreItem(text=v) if isinstance(v, str) else ScoreItem(input_ids=v) for v in value]


class PredictRequest(BaseModel):
    """TEI's predict body: one text or a batch; `raw_scores` false applies the sigmoid, as TEI does."""

    model_config = ConfigDict(extra="ignore")

    inputs: str | list[str] = Field(description="one text or a batch; text pairs (cross-encoders) are not supported")
    truncate: bool = False
    truncation_direction: str = Field("Right", pattern="^(?i:left|right)$")
    raw_scores: bool = False


class EvaluationRequest(BaseModel):
    """LLaMA-Factory's score API: already formatted conversations, one score each."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[str] = Field(min_length=1)
    max_length: int | None = None


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def add_compat_routes(app: FastAPI, service: ScoringService, authorized) -> None:
    async def raw_scores(items: list[ScoreItem], request: Request) -> ScoreResponse:
        """The default model's raw scores, or a default combination's own (it fixes its transform itself)."""
        return await service.score(ScoreRequest(items=items, transform=None if service.default_is_combination
                                                else "raw"), protocol="http", client=client_of(request))

    @app.post("/classify", dependencies=[authorized])
    @app.post("/v1/classify", dependencies=[authorized], include_in_schema=False)
    async def classify(body: ClassifyRequest, request: Request):
        """vLLM's (and verl's) classify, or SGLang's native shape; raw scores unless use_activation."""
        result = await raw_scores(body.items(), request)
        if body.is_sglang:
            answers = [{"embedding": [s], "meta_info": {"id": uuid.uuid4().hex}} for s in result.scores]
            return answers[0] if body.single_sglang_item else answers
        activate = body.use_activation if body.use_activation is not None else bool(body.activation)
        return {
            "id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": result.model,
            "data": [{"index": i, "label": "LABEL_0", "probs": [sigmoid(s) if activate else s], "num_classes": 1}
                     for i, s in enumerate(result.scores)],
        }

    @app.post("/predict", dependencies=[authorized])
    async def predict(body: PredictRequest, request: Request):
        """TEI's predict: sigmoid(score) by default, the raw score with raw_scores=true."""
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        result = await raw_scores([ScoreItem(text=t) for t in texts], request)
        answers = [[{"score": s if body.raw_scores else sigmoid(s), "label": "LABEL_0"}] for s in result.scores]
        return answers[0] if isinstance(body.inputs, str) else answers

    @app.post("/v1/score/evaluation", dependencies=[authorized])
    async def evaluation(body: EvaluationRequest, request: Request):
        """LLaMA-Factory's score API: the raw reward of each formatted conversation."""
        result = await raw_scores([ScoreItem(text=m) for m in body.messages], request)
        return {"id": f"scoreeval-{uuid.uuid4().hex}", "object": "score.evaluation", "model": body.model or result.model,
                "scores": result.scores}


def client_of(request: Request) -> str:
    """One connection (address and port): the unit whose share of the in-flight characters a request draws on."""
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"
