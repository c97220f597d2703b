"""The `rewardserve` command. Each subcommand body is one call to that deployable's `main(config)`.

It lives in `trainer/` because only the trainer side may import the server (never the reverse).
"""
from __future__ import annotations

import json
import sys

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict

from rewardserve.server.config import ServeConfig
from rewardserve.server.errors import StartupError

from .bench.config import BenchConfig
from .client.config import ScoreConfig
from .config import BestOfNConfig, CompareConfig, DemoConfig
from .rl.config import PPOConfig
from .rm.config import EvalConfig, LabelConfig, RMTrainConfig


class Serve(ServeConfig):
    """Serve a reward model over HTTP and gRPC."""

    def cli_cmd(self) -> None:
        from rewardserve.server.main import main

        main(self)


class Score(ScoreConfig):
    """Score items on a running reward server and print the result as JSON."""

    def cli_cmd(self) -> None:
        from .client import RewardClient, RewardClientError, RewardTarget

        print("rewardserve score " + json.dumps(self.printable()), file=sys.stderr)
        items = _score_items(self)
        api_key = self.api_key.get_secret_value() if self.api_key else None
        with RewardClient(self.url, timeout=self.timeout, api_key=api_key, ca_file=self.ca_file) as client:
            try:
                result = client.score(items, self.transform, RewardTarget.from_names(self.model, self.combination))
            except RewardClientError as error:
                raise SystemExit(f"rewardserve score: {error}") from error
        print(json.dumps(result.__dict__, indent=2))


class Train(RMTrainConfig):
    """Train a Bradley–Terry reward model on preference pairs (or, --objective prm, a process reward model on
    stepwise supervision); the output folder is a servable checkpoint."""

    def cli_cmd(self) -> None:
        if self.objective == "prm":
            from .rm.process import train_prm

            train_prm(self)
            return
        from .rm.train import main

        main(self)


class Eval(EvalConfig):
    """Evaluate any reward checkpoint on preference pairs (accuracy, calibration, length bias)."""

    def cli_cmd(self) -> None:
        from .rm.train import evaluate_checkpoint

        evaluate_checkpoint(self)


class PPO(PPOConfig):
    """Fine-tune a policy with PPO, every reward coming from a reward server by URL."""

    def cli_cmd(self) -> None:
        from .rl.ppo import main

        main(self)


class Label(LabelConfig):
    """Label preference pairs with an AI judge (RLAIF): a causal LM under a written constitution, asked in both
    orders, or a sentence encoder scoring each response's relevance to its question."""

    def cli_cmd(self) -> None:
        from .rm.labeling import main

        main(self)


class Compare(CompareConfig):
    """Win rate of policy B over policy A on a prompt set, under a reward server (and optionally an AI judge and a
    relevance judge)."""

    def cli_cmd(self) -> None:
        from .compare import main

        main(self)


class BestOfN(BestOfNConfig):
    """For each problem, the response the reward server ranks highest (a process reward model: by its step
    aggregate), and how often that pick is right where the data says."""

    def cli_cmd(self) -> None:
        from .best_of_n import main

        main(self)


class Demo(DemoConfig):
    """The main job end to end: label -> train a reward model -> serve it -> PPO against it."""

    def cli_cmd(self) -> None:
        from .demo import main

        main(self)


class Bench(BenchConfig):
    """Measure serving, reward-model training and PPO on this machine (tables and JSON)."""

    def cli_cmd(self) -> None:
        from .bench.run import main

        main(self)


def _score_items(config: ScoreConfig) -> list[dict]:
    if config.file:
        with open(config.file) as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if config.text is not None:
        return [{"text": config.text}]
    return [{"prompt": config.prompt or "", "response": config.response}]


class RewardServeCommand(BaseSettings):
    """rewardserve: a reward-model server and the trainers that use it."""

    model_config = SettingsConfigDict(cli_prog_name="rewardserve", cli_kebab_case=True, cli_implicit_flags=True,
                                      use_attribute_docstrings=True)

    serve: CliSubCommand[Serve]
    """Serve a reward model over HTTP and gRPC."""
    score: CliSubCommand[Score]
    """Score items on a running server."""
    train: CliSubCommand[Train]
    """Train a reward model (Bradley–Terry) on preference pairs."""
    eval: CliSubCommand[Eval]
    """Evaluate a reward checkpoint on preference pairs."""
    label: CliSubCommand[Label]
    """Label preference pairs with an AI judge (RLAIF)."""
    ppo: CliSubCommand[PPO]
    """Fine-tune a policy with PPO against a reward server."""
    compare: CliSubCommand[Compare]
    """Win rate of one policy over another, under a reward server and an AI judge."""
    best_of_n: CliSubCommand[BestOfN]
    """Pick each problem's best response by a reward server (a process reward model's step aggregate)."""
    demo: CliSubCommand[Demo]
    """Run the main job end to end (label, train, serve, PPO)."""
    bench: CliSubCommand[Bench]
    """Measure serving, training and PPO on this machine."""

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: list[str] | None = None) -> None:
    try:
        CliApp.run(RewardServeCommand, cli_args=sys.argv[1:] if argv is None else argv)
    except StartupError as error:
        raise SystemExit(f"rewardserve: {error}") from None
    except ValidationError as error:  # a flag or environment variable that cannot be: one line each, no traceback
        raise SystemExit("rewardserve: " + "; ".join(map(_flag_problem, error.errors()))) from None


def _flag_problem(error: dict) -> str:
    """`--steps: Input should be greater than 0`; a check across flags has no single flag to name."""
    message = str(error["msg"]).removeprefix("Value error, ")
    fields = [part for part in error.get("loc", ()) if isinstance(part, str)][1:]  # [0] is the subcommand
    return f"--{fields[-1].replace('_', '-')}: {message}" if fields else message


if __name__ == "__main__":
    main()
