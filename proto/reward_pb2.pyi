from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "response", "messages", "text", "input_ids", "safety", "reference", "steps")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAFETY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    text: str
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    safety: bool
    reference: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., text: _Optional[str] = ..., input_ids: _Optional[_Iterable[int]] = ..., safety: _Optional[bool] = ..., reference: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "transform", "request_id", "model", "models", "combination")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COMBINATION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    transform: str
    request_id: str
    model: str
    models: _containers.RepeatedScalarFieldContainer[str]
    combination: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., transform: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., combination: _Optional[str] = ...) -> None: ...

class RewardStatistics(_message.Message):
    __slots__ = ("mean", "std", "source")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    source: str
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class LengthFit(_message.Message):
    __slots__ = ("slope", "mean_length", "responses")
    SLOPE_FIELD_NUMBER: _ClassVar[int]
    MEAN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    slope: float
    mean_length: float
    responses: int
    def __init__(self, slope: _Optional[float] = ..., mean_length: _Optional[float] = ..., responses: _Optional[int] = ...) -> None: ...

class Transform(_message.Message):
    __slots__ = ("name", "statistics", "beta", "length_fit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    statistics: RewardStatistics
    beta: float
    length_fit: LengthFit
    def __init__(self, name: _Optional[str] = ..., statistics: _Optional[_Union[RewardStatistics, _Mapping]] = ..., beta: _Optional[float] = ..., length_fit: _Optional[_Union[LengthFit, _Mapping]] = ...) -> None: ...

class Combination(_message.Message):
    __slots__ = ("name", "kind", "models", "weights", "threshold", "conservative_lambda", "otherwise")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONSERVATIVE_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    OTHERWISE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    models: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    threshold: float
    conservative_lambda: float
    otherwise: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., threshold: _Optional[float] = ..., conservative_lambda: _Optional[float] = ..., otherwise: _Optional[float] = ...) -> None: ...

class Check(_message.Message):
    __slots__ = ("verdict", "answer")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    verdict: str
    answer: str
    def __init__(self, verdict: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class ComponentScores(_message.Message):
    __slots__ = ("scores", "rewards", "truncated", "transform", "model_version", "name", "outputs", "checks", "step_scores")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Values
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Values, _Mapping]] = ...) -> None: ...
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    STEP_SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    transform: Transform
    model_version: str
    name: str
    outputs: _containers.MessageMap[str, Values]
    checks: _containers.RepeatedCompositeFieldContainer[Check]
    step_scores: _containers.RepeatedCompositeFieldContainer[Values]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., rewards: _Optional[_Iterable[float]] = ..., truncated: _Optional[_Iterable[bool]] = ..., transform: _Optional[_Union[Transform, _Mapping]] = ..., model_version: _Optional[str] = ..., name: _Optional[str] = ..., outputs: _Optional[_Mapping[str, Values]] = ..., checks: _Optional[_Iterable[_Union[Check, _Mapping]]] = ..., step_scores: _Optional[_Iterable[_Union[Values, _Mapping]]] = ...) -> None: ...

class Values(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "scores", "rewards", "truncated", "transform", "model_version", "components", "combination", "chosen", "std", "outputs", "checks", "step_scores")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Values
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Values, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    COMBINATION_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    STEP_SCORES_FIELD_NUMBER: _ClassVar[int]
    model: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    transform: Transform
    model_version: str
    components: _containers.RepeatedCompositeFieldContainer[ComponentScores]
    combination: Combination
    chosen: _containers.RepeatedScalarFieldContainer[str]
    std: _containers.RepeatedScalarFieldContainer[float]
    outputs: _containers.MessageMap[str, Values]
    checks: _containers.RepeatedCompositeFieldContainer[Check]
    step_scores: _containers.RepeatedCompositeFieldContainer[Values]
    def __init__(self, model: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ..., rewards: _Optional[_Iterable[float]] = ..., truncated: _Optional[_Iterable[bool]] = ..., transform: _Optional[_Union[Transform, _Mapping]] = ..., model_version: _Optional[str] = ..., components: _Optional[_Iterable[_Union[ComponentScores, _Mapping]]] = ..., combination: _Optional[_Union[Combination, _Mapping]] = ..., chosen: _Optional[_Iterable[str]] = ..., std: _Optional[_Iterable[float]] = ..., outputs: _Optional[_Mapping[str, Values]] = ..., checks: _Optional[_Iterable[_Union[Check, _Mapping]]] = ..., step_scores: _Optional[_Iterable[_Union[Values, _Mapping]]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "type", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    type: str
    message: str
    def __init__(self, code: _Optional[str] = ..., type: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ScoreResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ScoreResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "path", "version", "architecture", "dtype", "device", "max_length", "on_overflow", "chat_template", "default_transform", "statistics", "max_items_per_request", "max_batch_tokens", "forward", "length_fit", "min_shared_prefix", "shared_prefix", "forward_path", "calibration", "kind", "outputs", "objective", "code_files", "forwards", "plain_chat_format", "verifier", "steps")
    class CodeFilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ForwardsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ON_OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIT_FIELD_NUMBER: _ClassVar[int]
    MIN_SHARED_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SHARED_PREFIX_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PATH_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    CODE_FILES_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    PLAIN_CHAT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    path: str
    version: str
    architecture: str
    dtype: str
    device: str
    max_length: int
    on_overflow: str
    chat_template: bool
    default_transform: Transform
    statistics: RewardStatistics
    max_items_per_request: int
    max_batch_tokens: int
    forward: str
    length_fit: LengthFit
    min_shared_prefix: int
    shared_prefix: str
    forward_path: str
    calibration: Calibration
    kind: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    objective: str
    code_files: _containers.ScalarMap[str, str]
    forwards: _containers.ScalarMap[str, int]
    plain_chat_format: str
    verifier: str
    steps: Steps
    def __init__(self, model: _Optional[str] = ..., path: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_length: _Optional[int] = ..., on_overflow: _Optional[str] = ..., chat_template: _Optional[bool] = ..., default_transform: _Optional[_Union[Transform, _Mapping]] = ..., statistics: _Optional[_Union[RewardStatistics, _Mapping]] = ..., max_items_per_request: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., forward: _Optional[str] = ..., length_fit: _Optional[_Union[LengthFit, _Mapping]] = ..., min_shared_prefix: _Optional[int] = ..., shared_prefix: _Optional[str] = ..., forward_path: _Optional[str] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ..., kind: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., objective: _Optional[str] = ..., code_files: _Optional[_Mapping[str, str]] = ..., forwards: _Optional[_Mapping[str, int]] = ..., plain_chat_format: _Optional[str] = ..., verifier: _Optional[str] = ..., steps: _Optional[_Union[Steps, _Mapping]] = ...) -> None: ...

class Steps(_message.Message):
    __slots__ = ("head", "read", "aggregate", "separator", "tag", "max_steps")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    SEPARATOR_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    head: str
    read: str
    aggregate: str
    separator: str
    tag: str
    max_steps: int
    def __init__(self, head: _Optional[str] = ..., read: _Optional[str] = ..., aggregate: _Optional[str] = ..., separator: _Optional[str] = ..., tag: _Optional[str] = ..., max_steps: _Optional[int] = ...) -> None: ...

class CalibrationCandidate(_message.Message):
    __slots__ = ("path", "budget", "tokens_per_s", "peak_bytes", "seconds", "skipped", "compile_seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    budget: int
    tokens_per_s: float
    peak_bytes: int
    seconds: float
    skipped: str
    compile_seconds: float
    def __init__(self, path: _Optional[str] = ..., budget: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., peak_bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., skipped: _Optional[str] = ..., compile_seconds: _Optional[float] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("how", "seconds", "candidates")
    HOW_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    how: str
    seconds: float
    candidates: _containers.RepeatedCompositeFieldContainer[CalibrationCandidate]
    def __init__(self, how: _Optional[str] = ..., seconds: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[CalibrationCandidate, _Mapping]]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("json", "default_model", "models", "combinations", "default")
    JSON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COMBINATIONS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    json: str
    default_model: ModelInfo
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    combinations: _containers.RepeatedCompositeFieldContainer[Combination]
    default: str
    def __init__(self, json: _Optional[str] = ..., default_model: _Optional[_Union[ModelInfo, _Mapping]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., combinations: _Optional[_Iterable[_Union[Combination, _Mapping]]] = ..., default: _Optional[str] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("model", "path")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    model: str
    path: str
    def __init__(self, model: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("model", "path", "old_version", "new_version", "seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    path: str
    old_version: str
    new_version: str
    seconds: float
    def __init__(self, model: _Optional[str] = ..., path: _Optional[str] = ..., old_version: _Optional[str] = ..., new_version: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...
