"""The models a server holds, its combinations, and what a request asks of them.

A `ServedModel` is everything one model needs to answer: the engine the batcher runs, the encoder of its tokenizer,
its statistics, length fit and default transform, its description and version; a verifier (server/verifiers.py) has
its checker pool instead of an engine and an encoder. The registry maps names to them.
A request reads the registry once, when it starts, and holds on to what it found: a reload that swaps a model in
meanwhile changes what later requests get, never a request in flight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .combinations import Combination
from .errors import InvalidInput, UnknownModel
from .normalization import LengthFit, RewardStatistics
from .schemas import ModelInfo, ScoreRequest
from .tokenization import ItemEncoder


@dataclass(frozen=True)
class ServedModel:
    name: str
    engine: Any  # a ForwardEngine: launch(sequences) then collect(pending) -> scores
    encoder: ItemEncoder
    statistics: RewardStatistics | None
    length_fit: LengthFit | None
    default_transform: Any  # RewardTransform
    info: ModelInfo
    version: str
    path: str
    output_names: tuple[str, ...] = ()  # several outputs: each item's result is [reward, *outputs]
    verifier: Any = None  # a VerifierSpec: an answer checker, run by `checker` (a CheckerPool) instead of `engine`
    checker: Any = None
    step_aggregate: str | None = None  # a process reward model: how its step scores make an item's score (min, ...)

    def live_info(self) -> ModelInfo:
        """Its /info, with the path it serves along now (a kernel that failed has been replaced) and the forwards
        that ran along each path, counted from the kernels the layers called."""
        return self.info.model_copy(update={
            "forward_path": getattr(self.engine, "forward_path", self.info.forward_path),
            "forwards": dict(getattr(self.engine, "forwards_by_path", {}))})


@dataclass(frozen=True)
class Target:
    """What one request is scored with: one model, several side by side, or a combination of several."""

    kind: str  # "model", "models" or "combination"
    models: tuple[ServedModel, ...]
    combination: Combination | None = None

    @property
    def name(self) -> str:
        return self.combination.name if self.combination else self.models[0].name


class ModelRegistry:
    def __init__(self, models: list[ServedModel], combinations: list[Combination], default: str | None = None):
        self._models = {model.name: model for model in models}
        self.combinations = {c.name: c for c in combinations}
        self.default = default or models[0].name

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownModel(f"no model named {name!r}; this server has {self._known()}") from None

    def replace(self, model: ServedModel) -> ServedModel:
        """Puts a new version of a served model in its place (one dict store: atomic for every reader); returns
        the old one."""
        old = self.get(model.name)
        self._models[model.name] = model
        return old

    def default_model(self) -> ServedModel:
        """The default's model, or a default combination's first model (what /info describes at its top)."""
        combination = self.combinations.get(self.default)
        return self.get(combination.models[0] if combination else self.default)

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def target(self, request: ScoreRequest) -> Target:
        if request.models is not None:
            if len(set(request.models)) != len(request.models):
                raise InvalidInput("`models` names a model twice; name each once")
            return Target("models", tuple(self.get(name) for name in request.models))
        if request.combination is not None:
            return self._combination(request.combination)
        name = request.model or self.default
        if request.model is None and name in self.combinations:
            return self._combination(name)
        return Target("model", (self.get(name),))

    def _combination(self, name: str) -> Target:
        combination = self.combinations.get(name)
        if combination is None:
            known = ", ".join(self.combinations) or "none"
            raise UnknownModel(f"no combination named {name!r}; this server's combinations: {known}")
        return Target("combination", tuple(self.get(m) for m in combination.models), combination)

    def _known(self) -> str:
        combinations = f"; combinations: {', '.join(self.combinations)}" if self.combinations else ""
        return f"models: {', '.join(self._models)}{combinations}"
