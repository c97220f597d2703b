"""`ServeConfig`: every setting of the reward server, as a flag (`--max-batch-tokens`) and an environment variable
(`REWARDSERVE_MAX_BATCH_TOKENS`). Validated at start and printed at start with the API key redacted."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .combinations import Combination, Objective
from .steps import Separator, StepFormat
from .verifiers import VerifierSpec, default_workers

MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _auto_word(value):
    return None if isinstance(value, str) and value.strip().lower() in ("auto", "none", "") else value


def _split_ints(value):
    return [part for part in re.split(r"[\s,]+", value) if part] if isinstance(value, str) else value


AutoOrInt = Annotated[Annotated[int, Field(gt=0)] | None, BeforeValidator(_auto_word)]


def parse_model_spec(spec: str) -> tuple[str, str]:
    """`NAME=DIR` -> (NAME, DIR); a bare `DIR` is named after its last folder, as a one-model server always was."""
    name, equals, path = spec.partition("=")
    if equals and MODEL_NAME.match(name) and path and not Path(spec).exists():
        return name, path
    return Path(spec).name or spec, spec


class ServeConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="REWARDSERVE_", use_attribute_docstrings=True, cli_kebab_case=True, cli_implicit_flags=True,
        extra="ignore",
    )

    model: Annotated[list[str], NoDecode] = []
    """Reward checkpoint: a local folder (HF sequence-classification or OpenRLHF layout), or a hub id. Repeat it as
    NAME=DIR to serve several models in one process (`--model helpful=DIR --model safety=DIR`); the environment
    variable takes them separated by spaces or commas."""
    judge: Annotated[list[str], NoDecode] = []
    """A causal LM served as a reward model: each item's reward is the LLM's expected rating from 1 to 10 under the
    judge template (d-RLAIF). A folder, a hub id or `smollm2` (the embedded model); NAME=DIR names it. It sits
    beside --model checkpoints, in combinations too."""
    judge_template: str | None = None
    """The judge's question, a text file with {constitution}, {prompt} and {response}; default:
    server/assets/judge_template.txt (a rating from 1 to 10, the rating alone)."""
    constitution: str | None = None
    """The principles the judge rates by, a text file; default: server/assets/constitution.txt."""
    judge_calibration_set: str | None = None
    """JSON Lines of {"prompt", "response"} (or {"prompt", "chosen", "rejected"}) rows the judge scores at start,
    whose mean and std whiten its ratings."""
    judge_reward_mean: float | None = None
    """The judge's rating mean for whitening, instead of a calibration set; give with --judge-reward-std."""
    judge_reward_std: float | None = Field(None, gt=0)
    """The judge's rating std for whitening; give with --judge-reward-mean."""
    prm: Annotated[list[str], NoDecode] = []
    """A process reward model, scoring every step of a solution: a token-classification checkpoint (TRL's
    PRMTrainer's, `rewardserve train --objective prm`), or a causal LM read at --step-tag through --step-token-ids.
    NAME=DIR names it. Items give `steps`, or a response split at --step-separator; answers carry `step_scores`
    and the reward is their --step-aggregate. It sits beside --model checkpoints, in combinations too."""
    step_separator: Separator = "\n"
    """What separates a solution's steps (PRMTrainer's default, a newline); `\n` and `\t` are read as escapes."""
    step_tag: str | None = None
    """A causal-LM process reward model: the text after each step where its score is read (Math-Shepherd: " ки")."""
    step_token_ids: Annotated[list[int] | None, NoDecode, BeforeValidator(_split_ints)] = None
    """A causal-LM process reward model: GOOD,BAD token ids; a step's score is P(GOOD) against P(BAD) at its tag."""
    step_aggregate: Literal["min", "last", "mean", "product"] = "min"
    """How a process reward model's step scores make an item's reward: min (default: a solution is as sound as its
    weakest step, whatever its number of steps), last, mean, or product (which falls with every extra step)."""
    max_steps: int = Field(128, gt=0)
    """Steps in one item at most (422 beyond)."""
    verifier: list[str] = []
    """An answer checker served as a model, NAME=KIND[:OPTION], repeatable: `correct=math` (the final answer, the
    last \\boxed{} or a final-answer line, against the item's `reference`, by mathematical equivalence; `math:lenient`
    also takes the last line), `same=exact` (normalised exact match), `fmt=regex:PATTERN` (a format reward, no
    reference), `own=python:MODULE:FUNCTION` (your checker; needs --trust-verifier-code). Scores are 1 or 0, not
    whitened; it sits beside --model checkpoints, in combinations too. The environment variable takes a JSON list."""
    verifier_timeout: float = Field(5.0, gt=0)
    """Seconds one answer check may take; past it the check answers `timeout` (score 0) and its worker is replaced."""
    verifier_workers: int = Field(default_factory=default_workers, gt=0)
    """Worker processes running the checks (default: half the cores, at most 8)."""
    trust_verifier_code: bool = False
    """Run the checkers of --verifier NAME=python:MODULE:FUNCTION: they are your code, imported in the server's
    worker processes."""
    combination: list[str] = []
    """A named combination of the models, repeatable: "safe=llama2 helpful=H safety=S [threshold=0.15]",
    "mix=sum 0.7*H 0.3*S" or "ens=ensemble A B C [lambda=0.5]" (README: when to use which)."""
    default_reward: str | None = None
    """The model or combination that answers requests naming neither (and the compatible endpoints); default: the
    first model."""
    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 to serve beyond this machine (then set an API key)."""
    http_port: int = Field(8000, ge=0, le=65535)
    """HTTP port (0 picks a free one and logs it)."""
    grpc_port: int = Field(50051, ge=-1, le=65535)
    """gRPC port; 0 turns gRPC off, -1 picks a free port and logs it."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights' dtype: auto is bfloat16 on CUDA and float32 on CPU. The score head always runs in float32."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    max_length: int | None = Field(None, gt=1)
    """Longest sequence in tokens; longer items are cut (see --on-overflow). Default: the length the checkpoint was
    trained at, else its positions; always capped, per model, at that model's positions."""
    on_overflow: Literal["truncate", "error"] = "truncate"
    """truncate: keep the response and cut the prompt from the left (the item says truncated); error: answer 413."""
    plain_chat_format: Literal["auto", "concat", "roles"] = "auto"
    """How `messages` (and prompt + response) are written for a checkpoint whose tokenizer has no chat template:
    concat (the turns' texts in order, the last right after the others: prompt + response as ever) or roles
    ("User: ...", blank lines between). auto: what `rewardserve train` stored in the checkpoint, else concat."""
    forward_path: Literal["auto", "packed", "packed-flex", "packed-varlen", "packed-sdpa", "padded"] = "auto"
    """How a batch runs: auto (measured at start, see --calibration-seconds), packed (padding-free with the
    device's default kernel: flex_attention on CUDA, SDPA per sequence elsewhere; padded for architectures that do
    not pack), packed-flex or packed-varlen (CUDA; varlen needs torch 2.10 or later and half precision),
    packed-sdpa, or padded."""
    max_batch_tokens: AutoOrInt = None
    """Token budget of one forward pass: rows x longest row when padded, the tokens themselves when packed.
    auto (the default): the fastest of --calibration-budgets, measured at start."""
    calibration_budgets: Annotated[list[int], NoDecode, BeforeValidator(_split_ints)] = [16384, 32768, 65536, 131072]
    """Token budgets the start-up calibration tries (each capped by the memory it was measured to need)."""
    calibration_seconds: float = Field(30.0, gt=0)
    """Time the start-up calibration may take per model (and again after a reload); a candidate that would not
    finish in what is left is skipped. Skipped when --forward-path and --max-batch-tokens are both given."""
    calibration_lengths: str | None = None
    """File of token lengths (whitespace-separated integers) that calibration batches follow, e.g. your traffic's;
    default: workload W's log-normal lengths (median 500, 32 to 2048)."""
    min_shared_prefix: int = Field(32, ge=0)
    """Items of a batch (from one request or several) whose tokens begin with the same N or more are computed as
    that prefix once, then each one's own tokens attending to it: exactly the unshared scores, for a group of
    responses to one prompt at about the cost of one prompt. Decoders only (an encoder's prefix states depend on
    what follows); 0 turns it off. 32 is past a chat template's header, so unrelated items share only a long
    system prompt, where sharing starts to pay."""
    max_wait_ms: float = Field(2.0, ge=0)
    """How long an idle batcher waits for more requests to join a batch."""
    max_queue_items: int = Field(8192, gt=0)
    """Items allowed to wait; beyond it requests get 503 with Retry-After."""
    max_items_per_request: int = Field(1024, gt=0)
    """Items in one request at most (413 beyond)."""
    max_inflight_characters: int = Field(16_000_000, gt=0)
    """Characters of requests admitted and not yet answered (tokenizing, queued, scoring), all clients together;
    beyond it a request gets 503 with Retry-After before it is tokenized. A client with nothing in flight may still
    send a small request (a reserve of a quarter more), so one client's flood leaves room for the others."""
    rate_limit: float = Field(0.0, ge=0)
    """Scoring requests per second allowed from one client address (429 / RESOURCE_EXHAUSTED beyond); 0 is off."""
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    """Largest request body (HTTP) or message (gRPC), in bytes."""
    transform: Literal["auto", "raw", "whiten", "logsigmoid", "debias"] = "auto"
    """Default reward transform: whiten when statistics are known (from the checkpoint or flags), else raw; debias
    needs the checkpoint's length fit (from `rewardserve train`) and prompt + response or messages items."""
    reward_mean: float | None = None
    """Mean of the model's scores for whitening (overrides the checkpoint's); give with --reward-std."""
    reward_std: float | None = Field(None, gt=0)
    """Std of the model's scores for whitening (overrides the checkpoint's); give with --reward-mean."""
    beta: float = Field(1.0, gt=0)
    """Scale of the logsigmoid transform: reward = beta * log(sigmoid(score))."""
    append_eos: bool | None = None
    """Append EOS to formatted text before scoring (where the score is read); default: yes for decoder models."""
    api_key: SecretStr | None = None
    """Require this key (HTTP `Authorization: Bearer`, gRPC metadata `authorization`); health and metrics stay open.
    Pass it through the environment (REWARDSERVE_API_KEY) or --api-key-file: a flag's value shows in `ps`."""
    api_key_file: str | None = None
    """A file holding the API key (its first line), read at start: a Kubernetes or Docker secret."""
    allow_reload_from: str | None = None
    """Folder whose checkpoints `POST /admin/reload` (and gRPC AdminService.Reload) may load; reload by path is off
    without it. Give --admin-key too. SIGHUP re-reads every model's own path in any case."""
    admin_key: SecretStr | None = None
    """Key the admin calls must present (HTTP `Authorization: Bearer`, gRPC metadata `authorization`); through the
    environment (REWARDSERVE_ADMIN_KEY) or --admin-key-file rather than the command line."""
    admin_key_file: str | None = None
    """A file holding the admin key (its first line), read at start."""
    tls_cert: str | None = None
    """PEM certificate chain: serve HTTPS and gRPC over TLS (give with --tls-key)."""
    tls_key: str | None = None
    """PEM private key of --tls-cert."""
    tokenizer_threads: int = Field(2, gt=0)
    """Threads that tokenize requests off the event loop."""
    stand_in_forward_us: float | None = Field(None, gt=0)
    """Benchmarking only: replace the model's forward by a stand-in that waits this many microseconds per padded
    token, as a GPU would, and scores every item 0; measures the serving path's own overhead."""
    trust_remote_code: bool = False
    """Run a checkpoint's own modelling code (the files its config.json's auto_map names; InternLM2's and ArmoRM's
    reward models need it). Off: such a checkpoint is refused. It executes those files: read them first; /info lists
    each one's SHA-256."""
    output_field: str = "logits"
    """Where a checkpoint with its own code puts its scores: the field of its forward's output (ArmoRM: `score`)."""
    objective: str | None = None
    """A model of several outputs (num_labels > 1, or its own code's): the output that is the reward."""
    objective_weights: str | None = None
    """... or a weighted sum of its outputs: `helpful=0.5,harmless=0.5` (outputs left out weigh 0)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Logging level."""

    @field_validator("model", "judge", "prm", mode="before")
    @classmethod
    def _split_models(cls, value):
        if isinstance(value, str):
            return [part for part in re.split(r"[\s,]+", value) if part]
        return value

    @model_validator(mode="after")
    def _keys_from_files(self) -> "ServeConfig":
        for name in ("api_key", "admin_key"):
            file = getattr(self, f"{name}_file")
            if file is None:
                continue
            flag = f"--{name.replace('_', '-')}"
            if getattr(self, name) is not None:
                raise ValueError(f"give {flag} or {flag}-file, not both")
            try:
                key = Path(file).read_text().splitlines()[0].strip() if Path(file).stat().st_size else ""
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"{flag}-file {file}: {type(error).__name__}: {error}") from None
            if not key:
                raise ValueError(f"{flag}-file {file} is empty: put the key on its first line")
            setattr(self, name, SecretStr(key))
        return self

    @model_validator(mode="after")
    def _pairs_come_together(self) -> "ServeConfig":
        if not self.model and not self.judge and not self.verifier and not self.prm:
            raise ValueError("give at least one --model (or --judge, --prm, or --verifier)")
        if not self.step_separator:
            raise ValueError("--step-separator is empty; give the text between steps (default: a newline)")
        if (self.step_tag is None) != (self.step_token_ids is None):
            raise ValueError("give --step-tag and --step-token-ids together: a causal-LM process reward model is"
                             " read at the tag, through the two ids")
        if self.step_token_ids is not None and (len(self.step_token_ids) != 2
                                                or len(set(self.step_token_ids)) != 2):
            raise ValueError(f"--step-token-ids {self.step_token_ids}: give two different ids, GOOD,BAD")
        if self.step_tag is not None and not self.prm:
            raise ValueError("--step-tag and --step-token-ids read a process reward model: serve one with --prm")
        verifiers = self.verifier_specs()  # parses each: a bad spec stops the start here
        own = [v.name for v in verifiers if v.kind == "python"]
        if own and not self.trust_verifier_code:
            raise ValueError(f"--verifier {', '.join(own)} runs your own Python code in the server: pass"
                             " --trust-verifier-code to allow it")
        if (self.judge_reward_mean is None) != (self.judge_reward_std is None):
            raise ValueError("give --judge-reward-mean and --judge-reward-std together")
        if len(self.judge) > 1 and (self.judge_reward_mean is not None or self.judge_calibration_set):
            raise ValueError("--judge-reward-mean/std and --judge-calibration-set whiten one judge; serve one")
        if self.judge_reward_mean is not None and self.judge_calibration_set:
            raise ValueError("give --judge-calibration-set or --judge-reward-mean/std, not both")
        for flag, path in [("--judge-template", self.judge_template), ("--constitution", self.constitution),
                           ("--judge-calibration-set", self.judge_calibration_set)]:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path} is not a file")
        names = [name for name, _ in self.model_specs()] + [v.name for v in verifiers]
        if len(set(names)) != len(names):
            raise ValueError(f"two models are named alike ({', '.join(names)}); name each one: --model NAME=DIR")
        combinations = [c.name for c in self.combinations()]  # parses each, so a bad spec stops the start here
        clash = set(combinations) & set(names) or len(set(combinations)) != len(combinations)
        if clash:
            raise ValueError(f"models and combinations need names of their own ({', '.join(names + combinations)})")
        if self.default_reward is not None and self.default_reward not in names + combinations:
            raise ValueError(f"--default-reward {self.default_reward!r} is neither a model nor a combination"
                             f" ({', '.join(names + combinations)})")
        if self.reward_mean is not None and len(self.model_specs()) > 1:
            raise ValueError("--reward-mean and --reward-std set one model's statistics; with several models, store"
                             " them in each checkpoint's config.json (`reward_statistics`)")
        if (self.reward_mean is None) != (self.reward_std is None):
            raise ValueError("give --reward-mean and --reward-std together")
        if (self.allow_reload_from is None) != (self.admin_key is None):
            raise ValueError("give --allow-reload-from and --admin-key together: reload is an authenticated call")
        if self.allow_reload_from is not None and not Path(self.allow_reload_from).is_dir():
            raise ValueError(f"--allow-reload-from {self.allow_reload_from} is not a folder")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give --tls-cert and --tls-key together")
        if not self.calibration_budgets or min(self.calibration_budgets) <= 0:
            raise ValueError(f"--calibration-budgets {self.calibration_budgets}: give positive token budgets")
        if self.calibration_lengths is not None and not Path(self.calibration_lengths).is_file():
            raise ValueError(f"--calibration-lengths {self.calibration_lengths} is not a file")
        if self.objective is not None and self.objective_weights is not None:
            raise ValueError("give --objective or --objective-weights, not both")
        self.objective_choice()  # a malformed --objective-weights stops the start here
        return self

    def objective_choice(self) -> Objective:
        if self.objective_weights is None:
            return Objective(name=self.objective)
        weights = {}
        for part in filter(None, re.split(r"[\s,]+", self.objective_weights)):
            name, equals, weight = part.partition("=")
            if name in weights:
                raise ValueError(f"--objective-weights {self.objective_weights!r} names {name} twice; give each"
                                 " output once")
            try:
                weights[name] = float(weight)
            except ValueError:
                equals = ""
            if not equals or not name:
                raise ValueError(f"--objective-weights {self.objective_weights!r}: write NAME=WEIGHT pairs separated"
                                 " by commas, e.g. helpful=0.5,harmless=0.5")
        return Objective(weights=weights)

    def model_specs(self) -> list[tuple[str, str]]:
        """(name, path) of each model, the judges then the process reward models after the reward models, in the
        order given; the first is the default."""
        return [parse_model_spec(spec) for spec in self.model + self.judge + self.prm]

    def verifier_specs(self) -> list[VerifierSpec]:
        specs = []
        for spec in self.verifier:
            try:
                specs.append(VerifierSpec.parse(spec))
            except ValueError as error:
                raise ValueError(str(error)) from None
        return specs

    def judge_names(self) -> set[str]:
        return {parse_model_spec(spec)[0] for spec in self.judge}

    def prm_names(self) -> set[str]:
        return {parse_model_spec(spec)[0] for spec in self.prm}

    def step_format(self) -> StepFormat:
        return StepFormat(self.step_separator, self.step_tag, self.max_steps)

    def combinations(self) -> list[Combination]:
        return [Combination.parse(spec) for spec in self.combination]

    def printable(self) -> dict:
        """The settings as printed at start; the API key shows only whether it is set."""
        return self.model_dump(mode="json") | {"api_key": "<set>" if self.api_key else None,
                                               "admin_key": "<set>" if self.admin_key else None}
