"""The reward model: loading a checkpoint, pooling, scoring, and the checkpoint format training writes.

A checkpoint is a Hugging Face sequence-classification model with one label, or the layout OpenRLHF writes for
reward models (its trunk plus a bias-free linear head named by `value_head_prefix`, with `mean`/`std` in the
config). Both load into the same `AutoModelForSequenceClassification`; an OpenRLHF head named other than `score`
is copied into place.

Scoring rules, shared by serving and training through `sequence_scores`:
- sequences are padded on the right by us, whatever the tokenizer's padding side, so positions start at 0 for
  every row and a score cannot depend on the padding or on the other rows of the batch;
- decoders are pooled at the last real token (where training put EOS), with the attention mask, never with
  `pad_token_id` (which breaks when pad == eos);
- the scalar head runs in fp32 in every dtype: a bf16 dot product over thousands of features loses the small
  score differences that ranking depends on.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .combinations import Objective
from .errors import DeviceUnavailable, NotARewardModel, OutOfMemory, StartupError
from .normalization import LengthFit, RewardStatistics
from .packing import (PackedBatch, pack, packable_head, packed_outputs, plain_attention_blocker,
                      supports_packing, to_device, varlen_available)
from .tokenization import PLAIN_FORMAT_KEY

log = logging.getLogger(__name__)

STATISTICS_KEY = "reward_statistics"  # config.json entry written by `rewardserve train`
LENGTH_FIT_KEY = "reward_length_fit"  # likewise: the least-squares line of score on response length
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is the first GPU when torch sees one, else the CPU (with a warning); a named GPU must exist."""
    global _warned_no_gpu
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if not _warned_no_gpu:  # once per process, however many models and stages ask
            log.warning("--device auto: torch %s sees no GPU (%s); running on the CPU", torch.__version__,
                        _why_no_gpu())
            _warned_no_gpu = True
        return torch.device("cpu")
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--device {device}, but torch {torch.__version__} sees no GPU ({_why_no_gpu()}); run on a GPU host"
                " (in Docker: the NVIDIA container toolkit and a GPU reservation) or pass --device cpu"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"--device {device}, but torch sees {torch.cuda.device_count()} GPU(s);"
                                    f" pick cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return target


_warned_no_gpu = False


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU); only for timings and at the ends of loops."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _why_no_gpu() -> str:
    return "a CPU-only build of torch" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no device visible"


def describe_device(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """What the start-up log says about where the work runs: `cuda:0 (NVIDIA H200), bfloat16`."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    where = f"{device} ({name})"
    return where if dtype is None else f"{where}, {str(dtype).removeprefix('torch.')}"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (bf16 matmuls on most CPUs are slow and imprecise), unless asked otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def pad_right(sequences: list[list[int]], pad_token_id: int, pin_memory: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads to the longest sequence on the right: returns input_ids (B, T) and attention_mask (B, T).

    pin_memory: build them in page-locked memory, so that their copy to a GPU can be asynchronous.

    >>> pad_right([[5, 6, 7], [8]], pad_token_id=0)[1].tolist()
    [[1, 1, 1], [1, 0, 0]]
    """
    width = max(len(s) for s in sequences)
    lengths = torch.tensor([len(s) for s in sequences])
    flat = torch.tensor([token for sequence in sequences for token in sequence], dtype=torch.long)
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, T)
    input_ids = torch.empty((len(sequences), width), dtype=torch.long, pin_memory=pin_memory).fill_(pad_token_id)
    input_ids[attention_mask.bool()] = flat  # row-major order of the mask is the order of the tokens
    if pin_memory:
        attention_mask = attention_mask.pin_memory()
    return input_ids, attention_mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for either padding side: mask [[0,1,1],[1,1,0]] -> [2, 1]."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).argmax(-1)  # (B,)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The (B, 1, T, T) boolean mask a decoder attends with: causal, and blind to padding on either side.

    Given ready-made, transformers uses it as it is; given the (B, T) mask, it first asks the device whether the
    batch has any padding at all (to pick SDPA's causal fast path), a host synchronisation in every forward. A
    padding position attends to itself alone, so that no row of the mask is empty (SDPA would return NaN there);
    no real token ever attends to it.
    """
    width = attention_mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=attention_mask.device).tril()  # (T, T)
    diagonal = torch.eye(width, dtype=torch.bool, device=attention_mask.device)
    return (causal[None, None] & attention_mask.bool()[:, None, None, :]) | diagonal  # (B, 1, T, T)


def decoder_attention_mask(config, attention_mask: torch.Tensor) -> torch.Tensor:
    """What a decoder's forward is given for a (B, T) padding mask: the ready-made causal mask where attention is
    plain causal (it spares a host sync per forward), else the (B, T) mask itself, from which ALiBi, sliding-window
    and local-attention models build their own masks (given a full causal mask, transformers uses it as it is and
    the window is lost)."""
    if plain_attention_blocker(config, attention_mask.shape[1]) is None and \
            getattr(config, "model_type", None) not in POSITIONS_FROM_MASK:
        return causal_padding_mask(attention_mask)
    return attention_mask


POSITIONS_FROM_MASK = {"opt"}  # counts its positions along the (B, T) mask it is given: it must get that mask


def is_decoder_reward_model(model: nn.Module) -> bool:
    """Decoder reward models (Llama, Qwen2, Mistral, Gemma, GPT-2, ...) carry a linear `score` head on the trunk."""
    return isinstance(getattr(model, "score", None), nn.Linear)


def shares_prefixes(model: nn.Module, max_length: int) -> bool:
    """Whether items sharing a prefix can compute it once: a decoder (a prefix's states do not depend on what
    follows; an encoder's do) whose sequences of up to `max_length` tokens pack."""
    return is_decoder_reward_model(model) and supports_packing(model, max_length)


def sequence_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's fp32 outputs per row (B, K): K is 1 for a reward model, num_labels for a head of several."""
    if not is_decoder_reward_model(model):
        # Encoders pool as their class does ([CLS] + pooler); the head's inputs are cast to fp32 by a hook.
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    hidden = model.base_model(input_ids=input_ids, attention_mask=decoder_attention_mask(model.config, attention_mask)
                              ).last_hidden_state  # (B, T, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pooled = hidden[rows, last_token_index(attention_mask)]  # (B, H): only the last token reaches the head
    return model.score(pooled.float())  # (B, K)


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One fp32 score per row (B,) of a one-output reward model, differentiable: the forward training uses, and
    serving through `sequence_outputs`."""
    return sequence_outputs(model, input_ids, attention_mask)[:, 0]


def _head_module(model: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no `score` or `classifier` head to read a reward from")


def keep_head_in_fp32(model: nn.Module) -> None:
    head = _head_module(model)
    head.float()
    if not is_decoder_reward_model(model):
        head.register_forward_pre_hook(lambda _module, args: tuple(a.float() for a in args))


# -- checkpoints --------------------------------------------------------------------------------------------------
def context_size(model: nn.Module) -> int:
    """The longest sequence the architecture takes: its position table, where it has one (GPT-2 calls it
    n_positions, MPT max_seq_len). RoBERTa-style embeddings count positions from padding_idx + 1, so two rows of
    their table are never reached. Without a table (ALiBi, as in BLOOM) 2048 is assumed."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        positions = getattr(config, name, None)
        if isinstance(positions, int) and positions > 0:
            break
    else:
        return 2048
    embeddings = getattr(model.base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if isinstance(getattr(embeddings, "position_embeddings", None), nn.Embedding) and isinstance(padding_idx, int):
        positions -= padding_idx + 1
    return positions


def read_statistics(config) -> RewardStatistics | None:
    """Statistics for whitening: ours (`reward_statistics`), else OpenRLHF's `mean`/`std` when it normalized."""
    ours = getattr(config, STATISTICS_KEY, None)
    if ours:
        return RewardStatistics(float(ours["mean"]), float(ours["std"]), source="checkpoint")
    if getattr(config, "normalize_reward", False) and getattr(config, "std", None):
        return RewardStatistics(float(config.mean), float(config.std), source="checkpoint (OpenRLHF mean/std)")
    return None


def read_length_fit(config) -> LengthFit | None:
    fit = getattr(config, LENGTH_FIT_KEY, None)
    if not fit:
        return None
    return LengthFit(float(fit["slope"]), float(fit["mean_length"]), int(fit.get("responses", 0)))


def _copy_openrlhf_head(model: nn.Module, path: Path, prefix: str) -> None:
    """OpenRLHF names the head by `value_head_prefix` (`value_head` in older releases); move it into `score`."""
    from safetensors import safe_open

    key = f"{prefix}.weight"
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            if key in handle.keys():
                with torch.no_grad():
                    model.score.weight.copy_(handle.get_tensor(key).reshape_as(model.score.weight))
                return
    raise ValueError(f"{path}: config names value_head_prefix={prefix!r} but no tensor {key!r} is in its safetensors")


@contextlib.contextmanager
def quiet_transformers():
    """Silences transformers' loading warnings that are expected here (a head it calls "newly initialized")."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")
# What a served checkpoint needs from the hub: configuration, tokenizer, chat template and safetensors weights.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py"]


def is_local(spec: str) -> bool:
    """A path (it exists, or it is written as one), not a hub id."""
    return spec.startswith(LOCAL_PATH_PREFIXES) or Path(spec).is_dir()


def check_local_checkpoint(path: str | os.PathLike, name: str = "") -> None:
    """A local folder that is absent, or holds pickle weights only, is refused before anything loads."""
    folder = Path(path).expanduser()
    which = f" (model {name!r})" if name else ""
    if not folder.is_dir():
        raise StartupError(f"no checkpoint folder at {path}{which}")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise StartupError(
            f"{path}{which} has pickle weights only ({', '.join(pickles[:3])}), refused on purpose: unpickling can"
            " run code. Convert once with python -c \"from transformers import AutoModelForSequenceClassification"
            f" as M; M.from_pretrained('{path}', num_labels=1).save_pretrained('{path}')\" (writes safetensors)")
    raise StartupError(f"{path}{which} has no model weights (*.safetensors)")


def local_checkpoint(spec: str, name: str = "") -> Path:
    """The checkpoint folder to load: `spec` itself when it is a path, else the hub repository `spec` fetched (or
    found in the cache) once; the hub's failure is one line that says what to do, not a traceback after retries."""
    if is_local(spec):
        check_local_checkpoint(spec, name)
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, allow_patterns=HUB_FILES))
    except Exception as error:  # no network, no such repository, a gated one: all need the user
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise StartupError(
            f"{spec!r} is not a local folder, and the Hugging Face hub did not give it ({type(error).__name__}:"
            f" {reason}); pass a checkpoint folder, or give this machine access to huggingface.co (a token for a"
            " gated model), or set HF_HUB_OFFLINE=1 with the model already in the cache") from None
    check_local_checkpoint(folder, name)
    return folder


def own_code_modules(path: str | os.PathLike) -> list[str]:
    """The Python files a checkpoint's config.json names in its `auto_map` (its own modelling code), [] for an
    architecture transformers ships."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return []
    auto_map = json.loads(config.read_text()).get("auto_map") or {}
    references = [r for value in auto_map.values() for r in (value if isinstance(value, list) else [value]) if r]
    # "modeling_x.Class", or "repo--modeling_x.Class" for code that lives in another hub repository
    return sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in references})


def code_file_hashes(path: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every Python file in the checkpoint folder: what --trust-remote-code may execute (a module can
    import its neighbours), so that /info says exactly which code scores."""
    return {file.name: hashlib.sha256(file.read_bytes()).hexdigest() for file in sorted(Path(path).glob("*.py"))}


def check_own_code(path: str | os.PathLike, trust_remote_code: bool, name: str = "") -> None:
    """A checkpoint with its own modelling code is refused without --trust-remote-code, before anything loads."""
    modules = own_code_modules(path)
    if modules and not trust_remote_code:
        which = f" (model {name!r})" if name else ""
        raise StartupError(f"{path}{which} ships its own modelling code ({', '.join(modules)}), which runs only with"
                           " --trust-remote-code: read it first, since the server executes it")


def folder_signature(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """What a checkpoint folder holds, cheaply: each file's name, size and modification time (a hub id: none)."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())


@contextlib.contextmanager
def unchanged_while_loading(path: str | os.PathLike):
    """Refuses a checkpoint whose folder changed while it loaded (a file deleted, rewritten or added): the weights
    read and the version computed from the files afterwards would not describe the same model."""
    before = folder_signature(path)
    yield
    if folder_signature(path) != before:
        raise StartupError(f"{path} changed while it loaded (files deleted, rewritten or added); load it again once"
                           " it is completely written")


def load_sequence_classifier(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
    several_outputs: bool = False,
) -> nn.Module:
    """Loads a reward checkpoint (HF or OpenRLHF layout, or one with its own code) from safetensors, head in fp32,
    eval mode. several_outputs: a num_labels > 1 head is served as it is (else refused: training wants one)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_own_code(path, trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if getattr(config, "auto_map", None):
        return _load_own_code(path, config, dtype)
    openrlhf_prefix = getattr(config, "value_head_prefix", None)
    architectures = ", ".join(config.architectures or [])
    if "ForCausalLM" in architectures and not openrlhf_prefix:
        raise NotARewardModel(
            f"{path} is a causal language model ({architectures}) with no trained reward head; train a reward model"
            f" on it with `rewardserve train --base {path} --data <pairs.jsonl> --out <folder>` and serve that, or"
            f" serve it as a judge: `rewardserve serve --judge {path}`"
        )
    if getattr(config, "num_labels", 1) != 1 and not openrlhf_prefix and not several_outputs:
        raise NotARewardModel(f"{path}: a reward model has one label, this checkpoint ({architectures}) has"
                              f" {config.num_labels}; serve a one-label reward checkpoint")
    if openrlhf_prefix:
        config.num_labels = 1
    with quiet_transformers():  # the OpenRLHF layout's head is "newly initialized" until we copy it in
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=True, output_loading_info=True,
        )
    if openrlhf_prefix and openrlhf_prefix != "score":
        _copy_openrlhf_head(model, Path(path), openrlhf_prefix)
    elif any(k.split(".")[0] in ("score", "classifier") for k in loading["missing_keys"]):
        raise NotARewardModel(
            f"{path} has no trained reward head (its score/classifier weights are missing); train one with"
            " `rewardserve train --base ...`"
        )
    keep_head_in_fp32(model)
    return model.eval()


def _load_own_code(path: str | os.PathLike, config, dtype: torch.dtype) -> nn.Module:
    """A checkpoint's own classes, by its `auto_map`: its sequence-classification class where it names one, else
    its AutoModel (InternLM2's reward models register theirs there). Its code decides pooling and head precision."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if "AutoModelForSequenceClassification" in config.auto_map else AutoModel
    return auto.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True,
                                trust_remote_code=True).eval()


def read_output_field(output, field: str) -> torch.Tensor:
    """The scores a forward returned, as (B, K) fp32, from its `field` (`logits` for transformers' own classes; a
    checkpoint with its own output class declares it with --output-field). Never guessed: a missing field is an
    error that lists the ones there are."""
    value = output.get(field) if hasattr(output, "get") else getattr(output, field, None)
    if not isinstance(value, torch.Tensor):
        fields = list(output.keys()) if hasattr(output, "keys") else [n for n in vars(output) if not n.startswith("_")]
        raise NotARewardModel(f"the model's forward returned a {type(output).__name__} without a tensor"
                              f" {field!r} (its fields: {', '.join(fields) or 'none'}); pass --output-field with the"
                              " one that holds the scores")
    if value.dim() == 1:
        value = value[:, None]
    if value.dim() != 2:
        raise NotARewardModel(f"the model's {field!r} has shape {tuple(value.shape)}; scores are (batch,) or"
                              " (batch, outputs)")
    return value.float()


def output_names(config, count: int) -> list[str]:
    """Each output's name, from the config's id2label (`output_K` where it has none, or repeats one)."""
    labels = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [labels.get(i, f"output_{i}") for i in range(count)]
    return names if len(set(names)) == count else [f"output_{i}" for i in range(count)]


def init_reward_model_from_base(base: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM or encoder with a fresh one-output head (init std 1/sqrt(H+1), as OpenRLHF does), for training."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():  # a newly initialised head is the point here
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
    head = _head_module(model)
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    keep_head_in_fp32(model)
    return model


def save_reward_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, statistics: RewardStatistics | None,
                      length_fit: LengthFit | None = None, plain_format: str | None = None):
    """Writes an HF checkpoint (safetensors + tokenizer) with the whitening statistics and the length fit in its
    config.

    Written to a sibling temp folder and renamed, so a reader never sees half a checkpoint.
    """
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if statistics is not None:
        setattr(model.config, STATISTICS_KEY, {"mean": statistics.mean, "std": statistics.std})
    if length_fit is not None:
        setattr(model.config, LENGTH_FIT_KEY, asdict(length_fit))
    if plain_format is not None and not getattr(tokenizer, "chat_template", None):
        setattr(model.config, PLAIN_FORMAT_KEY, plain_format)  # how its conversations were written in training
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)


# -- serving ------------------------------------------------------------------------------------------------------
@dataclass
class RewardModel:
    """A loaded reward model, ready to score batches of token ids. No asyncio: the batcher calls it from a thread."""

    network: nn.Module
    name: str
    device: torch.device
    dtype: torch.dtype
    pad_token_id: int
    max_positions: int  # the architecture's own limit (context_size)
    statistics: RewardStatistics | None
    max_length: int  # the longest sequence this model is given: what was asked, capped at max_positions
    packs: bool = False  # padding-free forwards (server/packing.py) for the architectures that support them
    min_shared_prefix: int | None = None  # packed decoders: items sharing this many leading tokens share their forward
    forward_path: str = "padded"  # FORWARD_PATHS: packed with a kernel, or padded (the calibration chooses)
    max_batch_tokens: int = 16384  # the batch planner's budget for this model (the calibration chooses)
    length_fit: LengthFit | None = None
    weights_hash: str = ""  # checkpoint_hash(path): what the model is; with loaded_at, its version
    loaded_at: float = field(default_factory=time.time)
    output_names: tuple[str, ...] = ()  # a model of several outputs: each one's name (a one-output model: none)
    objective: torch.Tensor | None = None  # (K,) fp32 on the device: the reward is outputs @ objective
    objective_formula: str = ""  # the same, as /info shows it: `helpful` or `0.5*helpful + 0.5*honest`
    output_field: str | None = None  # a checkpoint with its own code: the field of its forward's output to read
    code_hashes: dict[str, str] = field(default_factory=dict)  # its code files' SHA-256 (--trust-remote-code)
    forwards_by_path: dict[str, int] = field(default_factory=dict)  # forwards that ran along each path (counted)

    @classmethod
    def load(cls, path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
             max_length: int | None = None, min_shared_prefix: int = 0, objective: Objective | None = None,
             output_field: str = "logits"):
        """max_length: the longest sequence to expect, capped at the model's positions (None: the positions).
        min_shared_prefix: share the forward of a prefix this long or longer (0: never); decoders that pack only.
        objective: how a model of several outputs makes its reward. output_field: where a checkpoint with its own
        code puts its scores (transformers' classes: `logits`)."""
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        log.info("loading reward model %s on %s", path, describe_device(target, torch_dtype))
        with unchanged_while_loading(path):
            network = load_sequence_classifier(path, torch_dtype, trust_remote_code, several_outputs=True).to(target)
            own_code = bool(getattr(network.config, "auto_map", None))
            model = cls.from_network(network, path, target, torch_dtype, max_length, min_shared_prefix,
                                     may_pack=not own_code and packable_head(network))
        if own_code:
            model.output_field, model.code_hashes = output_field, code_file_hashes(path)
            log.warning("--trust-remote-code: %s runs its own code: %s", path,
                        ", ".join(f"{name} (sha256 {digest[:16]})" for name, digest in model.code_hashes.items()))
        count = model.output_count()
        if count > 1:
            model.set_objective(output_names(network.config, count), objective or Objective())
        elif objective is not None and (objective.name or objective.weights):
            raise StartupError(f"{path} has one output, its score: --objective and --objective-weights choose among"
                               " the outputs of a model of several; leave them out")
        return model

    @classmethod
    def from_network(cls, network: nn.Module, path: str, device: torch.device, dtype: torch.dtype,
                     max_length: int | None, min_shared_prefix: int, may_pack: bool):
        """may_pack: the head (and code) allow a packed forward; whether the attention does is checked here."""
        config = network.config
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        if isinstance(pad, list):
            pad = pad[0]
        positions = context_size(network)
        length = min(max_length or positions, positions)
        blocker = plain_attention_blocker(config, length)
        packs = may_pack and blocker is None
        if not packs:
            log.info("%s is scored padded: %s", type(network).__name__,
                     blocker or "its head is not a linear score or pooled classifier, or it runs its own code")
        model = cls(network, _model_name(path), device, dtype, int(pad), positions, read_statistics(config), length,
                    packs=packs, forward_path=forward_paths(device, packs)[0], length_fit=read_length_fit(config),
                    weights_hash=checkpoint_hash(path, config))
        if packs and min_shared_prefix > 0 and model.is_decoder:
            model.min_shared_prefix = min_shared_prefix
        return model

    def output_count(self) -> int:
        """How many outputs the forward gives per item: the head's, or for a model's own code, what one short
        forward returns."""
        if self.output_field is None:
            return self.network.config.num_labels
        sequence = [[(3 + i) % self.embedding_rows for i in range(4)]]
        with torch.inference_mode():
            return self.padded_outputs(*(t.to(self.device) for t in pad_right(sequence, self.pad_token_id))).shape[1]

    def set_objective(self, names: list[str], objective: Objective) -> None:
        weights, self.objective_formula = objective.vector(names, self.name)
        self.output_names = tuple(names)
        self.objective = torch.tensor(weights, dtype=torch.float32, device=self.device)

    @property
    def embedding_rows(self) -> int:
        """Token ids below this have an embedding; a tokenizer can know more tokens than the model was given."""
        return self.network.get_input_embeddings().num_embeddings

    @property
    def version(self) -> str:
        """A short hash of the weights and config, and the load time: `3f2a9c1e07@20261126T021005Z`."""
        return f"{self.weights_hash}@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(self.loaded_at))}"

    @property
    def is_decoder(self) -> bool:
        return is_decoder_reward_model(self.network)

    @property
    def architecture(self) -> str:
        return type(self.network).__name__

    @contextlib.contextmanager
    def forward_path_as(self, path: str):
        """Runs along `path` for a while (calibration), then as before."""
        previous, self.forward_path = self.forward_path, path
        try:
            yield
        finally:
            self.forward_path = previous

    @property
    def plans_packed(self) -> bool:
        """Whether its batches cost their real tokens (packed) rather than rows x longest (padded)."""
        return self.forward_path != "padded"

    def shared_prefix_note(self) -> str:
        """Why sharing is on or off, for /info."""
        if self.min_shared_prefix and self.plans_packed:
            return f"on: items sharing {self.min_shared_prefix} or more leading tokens compute them once"
        if not self.plans_packed:
            return "off: this model is scored padded"
        if not self.is_decoder:
            return "off: in an encoder a prefix's states depend on what follows it, so they cannot be shared"
        return "off: --min-shared-prefix 0"

    # -- the forward, in two halves so the batcher can overlap host work with the device -----------------------
    @torch.inference_mode()
    def launch(self, sequences: list[list[int]]) -> "PendingScores":
        """Packs (or pads) on the host, copies, runs the forward and starts the copy of the scores back, without
        waiting.

        On a GPU every step here is queued asynchronously (pinned host memory, non-blocking copies, an event after
        the scores' copy), so the caller can prepare and launch the next batch while this one runs; on the CPU the
        work is done by the time it returns.
        """
        pinned = self.device.type == "cuda"
        planned = self.forward_path
        try:
            if self.plans_packed:
                packed = to_device(pack(sequences, pin_memory=pinned, min_shared_prefix=self.min_shared_prefix,
                                        kernel=planned.removeprefix("packed-")), self.device)
                outputs, computed = self.packed_outputs(packed, sequences), packed.computed_tokens
                ran = "packed-" + "+".join(sorted(packed.documents.ran))  # counted as the layers called them
            else:
                input_ids, attention_mask = pad_right(sequences, self.pad_token_id, pin_memory=pinned)
                outputs = self.padded_outputs(input_ids.to(self.device, non_blocking=pinned),
                                              attention_mask.to(self.device, non_blocking=pinned), sequences)
                computed, ran = input_ids.numel(), "padded"
            scores = self.read_out(outputs)
        except torch.OutOfMemoryError as error:
            out_of_memory = str(error)
        else:
            out_of_memory = None
        if out_of_memory is not None:  # raised outside the except clause: nothing keeps the failed forward's frames
            raise OutOfMemory(out_of_memory)  # (and its activations) alive while the batcher retries the halves
        self.forwards_by_path[ran] = self.forwards_by_path.get(ran, 0) + 1
        expected = self.expected_path(packed.documents.expected_kernel(self.device)) if self.plans_packed else planned
        if ran != expected:
            self.fall_back(planned, ran)
        if not pinned:
            return PendingScores(scores, None, computed, ran, ran != expected)
        host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
        host.copy_(scores, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingScores(host, done, computed, ran, ran != expected)

    @staticmethod
    def expected_path(kernel: str) -> str:
        return f"packed-{kernel}"

    def release_memory(self) -> None:
        """After running out of memory: give the allocator's cached blocks back before the halves are retried."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fall_back(self, planned: str, ran: str) -> None:
        """A kernel failed (one warning from packing) and another ran: from now on the model says the path that
        runs, so /info, gRPC Info and the metrics report the kernel that executed, not the one asked for."""
        if self.forward_path == planned and planned != ran:
            now = ran if ran in FORWARD_PATHS else "packed-sdpa"  # a forward that changed kernel half-way
            log.warning("%s: its %s forward ran %s (a kernel failed); it serves and is reported as %s from now on",
                        self.name, planned, ran, now)
            self.forward_path = now

    def packed_outputs(self, batch: PackedBatch, sequences: list[list[int]] | None = None) -> torch.Tensor:
        """(B, K) fp32 from a packed batch already on the device. sequences: the batch's ids, for a model that
        reads several positions of each (a process reward model, at its steps' ends)."""
        return packed_outputs(self.network, batch)

    def padded_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       sequences: list[list[int]] | None = None) -> torch.Tensor:
        """(B, K) fp32 from right-padded rows on the device: our pooling and head, or the checkpoint's own forward."""
        if self.output_field is None:
            return sequence_outputs(self.network, input_ids, attention_mask)
        return read_output_field(self.network(input_ids=input_ids, attention_mask=attention_mask), self.output_field)

    def read_out(self, outputs: torch.Tensor) -> torch.Tensor:
        """What a batch returns: the score (B,) of a one-output model; for one of several, the reward (outputs @
        objective) then each output, (B, 1 + K), so that one copy brings all of them back."""
        if self.objective is None:
            return outputs[:, 0]
        return torch.cat([(outputs @ self.objective)[:, None], outputs], dim=1)

    @staticmethod
    def collect(pending: "PendingScores") -> list[float] | list[list[float]]:
        """Waits for that batch alone (the one host synchronisation per batch) and returns its scores (for a model
        of several outputs, a row per item: the reward, then each output)."""
        if pending.done is not None:
            pending.done.synchronize()
        return pending.scores.tolist()

    def score_batch(self, sequences: list[list[int]]) -> list[float] | list[list[float]]:
        return self.collect(self.launch(sequences))


FORWARD_PATHS = ("packed-flex", "packed-varlen", "packed-sdpa", "padded")


def forward_paths(device: torch.device, packs: bool) -> list[str]:
    """The forward paths a model can take on this device, the default first: packed with each kernel the device
    has (flex_attention and varlen_attn on CUDA, SDPA per document elsewhere), and padded, which every model has."""
    if not packs:
        return ["padded"]
    if device.type == "cuda":
        return ["packed-flex", *(["packed-varlen"] if varlen_available(device) else []), "padded"]
    return ["packed-sdpa", "padded"]


@dataclass
class PendingScores:
    scores: torch.Tensor  # (B,) or (B, 1 + K), on the host (pinned on a GPU machine), complete once `done` has fired
    done: "torch.cuda.Event | None"
    computed_tokens: int = 0  # what the forward ran: padding included, a shared prefix once
    path: str = ""  # the path that ran, from the kernels the layers called (packed-sdpa, packed-flex, padded, ...)
    fell_back: bool = False  # the path's kernel failed and another ran
    split: list[int] | None = None  # a process reward model: each item's count of the flat scores (its steps)


def checkpoint_hash(path: str | os.PathLike, config=None) -> str:
    """BLAKE2b over config.json and the weight files (10 hex digits), so two loads of the same checkpoint agree
    and any change to the weights or config shows. A hub id hashes the id and the commit it resolved to."""
    folder = Path(path)
    digest = hashlib.blake2b(digest_size=5)
    if not folder.is_dir():
        digest.update(f"{path}@{getattr(config, '_commit_hash', None)}".encode())
        return digest.hexdigest()
    files = [folder / "config.json"] + sorted(f for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))
    for file in files:
        if file.is_file():
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 23):
                    digest.update(chunk)
    return digest.hexdigest()


def weights_bytes(path: str | os.PathLike, dtype: torch.dtype) -> int | None:
    """What a checkpoint's weights take in `dtype` on the device, from its safetensors headers (nothing loaded);
    None when it has none to read."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    elements = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                elements += math.prod(handle.get_slice(key).get_shape())
    return elements * torch.empty((), dtype=dtype).element_size()


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device (a GPU's free memory, the host's MemAvailable for the CPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _model_name(path: str) -> str:
    return Path(path).name or str(path)
