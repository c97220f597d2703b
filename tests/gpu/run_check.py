"""`make test-gpu`: the whole GPU truth in one command, for the day a card is lent.

1. the tests marked `gpu` (tests/gpu/test_gpu.py: every CUDA branch against the fp32 reference on the same card;
   skipped, each named, where there is no CUDA), at most 8 minutes;
2. `rewardserve bench all --shapes 135M,1B` on the card (skipped without CUDA);
3. one report: runs/gpu-check/report.json (every test's outcome and time, every figure the tests measured, the
   bench's figures) and runs/gpu-check/report.md (the same as tables), printed at the end.

It runs from a checkout without an install: where `rewardserve` is not importable (a GPU machine with its own
Python and torch, and nothing to download), the checkout's folders are linked under the report folder as the
`rewardserve` package. The tests and the bench read a tokenizer folder: REWARDSERVE_GPU_TOKENIZER, or the one this
script exports to runs/gpu-check/tokenizer where the embedded SmolLM2 is installed (carry that folder to a machine
without it).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("REWARDSERVE_GPU_CHECK_OUT", REPO / "runs" / "gpu-check")).resolve()
TEST_SECONDS = 480
BENCH_SECONDS = 900


def importable_package() -> None:
    """Makes `import rewardserve` work here and in the processes started below."""
    try:
        import rewardserve.server  # noqa: F401
        return
    except ImportError:
        pass
    shim = OUT / "shim" / "rewardserve"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").touch()
    for name in ("server", "trainer", "proto"):
        link = shim / name
        if not link.exists():
            link.symlink_to(REPO / name, target_is_directory=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(shim.parent))


def tokenizer_folder() -> Path | None:
    folder = Path(os.environ.get("REWARDSERVE_GPU_TOKENIZER", OUT / "tokenizer"))
    if (folder / "tokenizer_config.json").is_file():
        return folder
    try:
        from transformers import AutoTokenizer

        from rewardserve.server.embedded import smollm2_checkpoint

        AutoTokenizer.from_pretrained(smollm2_checkpoint()).save_pretrained(folder)
        return folder
    except Exception as error:  # no embedded SmolLM2 here (a GPU machine): the tests that need one say so
        print(f"no tokenizer folder ({type(error).__name__}: {error}); set REWARDSERVE_GPU_TOKENIZER", flush=True)
        return None


def run_tests(tokenizer: Path | None) -> list[dict]:
    junit = OUT / "pytest.xml"
    env = {**os.environ, "REWARDSERVE_GPU_CHECK_OUT": str(OUT), "PYTHONUNBUFFERED": "1"}
    if tokenizer is not None:
        env["REWARDSERVE_GPU_TOKENIZER"] = str(tokenizer)
    command = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-o", "addopts=", "-p", "no:cacheprovider",
               "-q", "-rs", f"--junitxml={junit}", "-W", "ignore::DeprecationWarning"]
    try:
        subprocess.run(command, cwd=REPO, env=env, timeout=TEST_SECONDS)
    except subprocess.TimeoutExpired:
        print(f"the GPU tests passed their {TEST_SECONDS} s", flush=True)
    return read_junit(junit)


def read_junit(path: Path) -> list[dict]:
    if not path.is_file():
        return [{"test": "tests/gpu", "outcome": "error", "seconds": 0.0, "note": "no result (timed out?)"}]
    rows = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, note = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                note = (found.get("message") or found.text or "").strip().splitlines()[0][:200] if (
                    found.get("message") or found.text) else ""
                break
        rows.append({"test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                     "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2), "note": note})
    return rows


def run_bench(cuda: bool, tokenizer: Path | None) -> dict:
    if not cuda:
        return {"outcome": "skipped", "note": "no CUDA device"}
    out = OUT / "bench"
    command = [sys.executable, "-m", "rewardserve.trainer.cli", "bench", "all", "--shapes", "135M,1B", "--out",
               str(out)] + (["--tokenizer", str(tokenizer)] if tokenizer else [])
    began = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=BENCH_SECONDS)
        outcome, tail = ("passed" if done.returncode == 0 else "failed"), (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        outcome, tail = "failed", f"timed out after {BENCH_SECONDS} s"
    result = {"outcome": outcome, "seconds": round(time.perf_counter() - began, 1), "command": " ".join(command)}
    if (out / "bench.json").is_file():
        result["figures"] = json.loads((out / "bench.json").read_text())
    if (out / "bench.md").is_file():
        result["tables"] = (out / "bench.md").read_text()
    if outcome != "passed":
        result["tail"] = tail
    return result


def environment() -> dict:
    import torch

    about = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    try:
        import transformers

        about["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        about["device"] = torch.cuda.get_device_name()
    return about


def markdown(report: dict) -> str:
    lines = ["# make test-gpu", "", ", ".join(f"{k} {v}" for k, v in report["environment"].items()), "",
             "| test | outcome | s | note |", "|---|---|---:|---|"]
    lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']} | {t['note']} |" for t in report["tests"]]
    counts = {o: sum(t["outcome"] == o for t in report["tests"]) for o in ("passed", "failed", "error", "skipped")}
    lines += ["", ", ".join(f"{n} {o}" for o, n in counts.items()), ""]
    if report["measurements"]:
        lines += ["## Measured", "", "| test | figure | value | context |", "|---|---|---|---|"]
        for row in report["measurements"]:
            context = {k: v for k, v in row.items() if k not in ("test", "name", "value")}
            lines.append(f"| {row['test'].split('::')[-1]} | {row['name']} | {row['value']} | {json.dumps(context)} |")
        lines.append("")
    bench = report["bench"]
    lines += ["## rewardserve bench all --shapes 135M,1B", "", f"{bench['outcome']}: {bench.get('note', '')}"]
    if bench.get("tables"):
        lines += ["", bench["tables"]]
    if bench.get("tail"):
        lines += ["", "```", bench["tail"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "measurements.jsonl").unlink(missing_ok=True)
    importable_package()
    import torch

    cuda = torch.cuda.is_available()
    tokenizer = tokenizer_folder()
    began = time.perf_counter()
    tests = run_tests(tokenizer)
    measurements = [json.loads(line) for line in (OUT / "measurements.jsonl").read_text().splitlines()] \
        if (OUT / "measurements.jsonl").is_file() else []
    report = {"environment": environment(), "tests": tests, "tests_seconds": round(time.perf_counter() - began, 1),
              "measurements": measurements, "bench": run_bench(cuda, tokenizer)}
    (OUT / "report.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (OUT / "report.md").write_text(text)
    print(text, flush=True)
    print(f"report: {OUT / 'report.json'}, {OUT / 'report.md'}", flush=True)
    failed = [t for t in tests if t["outcome"] in ("failed", "error")]
    return 1 if failed or report["bench"]["outcome"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
