"""Metric sinks: JSON Lines on disk (always), TensorBoard when installed, Weights & Biases when asked
(`--report-to wandb`), and PNG plots at the end. Metric names are stable across runs and alike in every sink."""
from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlLog:
    """Appends one JSON object per line; a resumed run keeps appending to the same file.

    With `tensorboard` and the tensorboard package installed, every numeric metric also goes to TensorBoard (under
    PATH's folder/tensorboard) as `namespace/name`, e.g. `ppo/approx_kl`; with `wandb_run`, to that Weights & Biases
    run under the same names; with `gauges` (a monitoring.StepGauges), to Prometheus.
    """

    def __init__(self, path: str | Path, fresh: bool, namespace: str = "", tensorboard: bool = False, wandb_run=None,
                 gauges=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")
        self.namespace = namespace
        self._board = _summary_writer(self.path.parent / "tensorboard") if tensorboard else None
        self.wandb_run = wandb_run
        self.gauges = gauges

    def write(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.gauges is not None:
            self.gauges.observe(record)
        if self._board is None and self.wandb_run is None:
            return
        numbers = {f"{self.namespace}/{name}": value for name, value in record.items()
                   if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._board is not None:
            for name, value in numbers.items():
                self._board.add_scalar(name, value, record["step"])
            self._board.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=record["step"])

    def finish(self, images: dict[str, Path | None] | None = None) -> None:
        """Ends the Weights & Biases run, with the plots (name -> PNG) as images, and the metrics endpoint."""
        if self.gauges is not None:
            self.gauges.close()
        if self.wandb_run is None:
            return
        import wandb

        self.wandb_run.log({name: wandb.Image(str(path)) for name, path in (images or {}).items() if path})
        self.wandb_run.finish()

    def drop_after(self, step: int) -> None:
        """On resume, forget what was logged past the checkpoint: those steps are about to run again."""
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records() if r.get("step", 0) <= step))

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def start_wandb(out: Path, config: dict, job: str):
    """A Weights & Biases run in OUT/wandb with the configuration logged once. Online when WANDB_API_KEY is set,
    offline otherwise (no network is needed; `wandb sync OUT/wandb/offline-run-*` uploads it later); WANDB_MODE,
    WANDB_PROJECT (default `rewardserve`) and the other WANDB_ variables apply as usual."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--report-to wandb needs the wandb package: pip install 'rewardserve[wandb]'") from None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "rewardserve"), dir=str(out), job_type=job,
                      config=config, mode=mode)


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional: JSON Lines are always written
        return None
    return SummaryWriter(str(folder))


def plot_curves(records: list[dict], keys: list[str], out_png: str | Path, title: str, x: str = "step") -> Path | None:
    """One panel per key against `x`; skipped (returns None) when matplotlib is not installed or nothing to plot."""
    return plot_runs({"": records}, keys, out_png, title, x)


def plot_runs(runs: dict[str, list[dict]], keys: list[str], out_png: str | Path, title: str,
              x: str = "step") -> Path | None:
    """One panel per key against `x`, a line per run (named in a legend when there are several)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in keys if any(k in r for records in runs.values() for r in records)]
    if not keys:
        return None
    figure, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        for name, records in runs.items():
            points = [(r[x], r[key]) for r in records if key in r and r[key] is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None,
                      label=name or None)
        axis.set_title(key)
        axis.set_xlabel(x)
        axis.grid(alpha=0.3)
        if len(runs) > 1:
            axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)
    return Path(out_png)


def format_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * (width + 16)] + [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m rewardserve.trainer.tracking NAME=RUN/metrics.jsonl ... --keys a,b --out plot.png`: runs side by
    side, one panel per metric (how docs/images/prm-ppo.png is drawn)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rewardserve.trainer.tracking", description=main.__doc__)
    parser.add_argument("runs", nargs="+", help="NAME=PATH of a metrics.jsonl")
    parser.add_argument("--keys", required=True, help="metrics, comma-separated")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, _, path = spec.partition("=")
        runs[name] = JsonlLog(path, fresh=False).records()
    if plot_runs(runs, args.keys.split(","), args.out, args.title) is None:
        raise SystemExit("nothing plotted: matplotlib is missing, or no run has those metrics")
    print(f"drew {args.out}")


if __name__ == "__main__":
    main()
