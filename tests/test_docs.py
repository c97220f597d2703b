"""The front door cannot drift: every relative link of README.md and docs/ resolves (a file, and its heading where
an anchor is named), and every `rewardserve` command in the README's code blocks names a subcommand and flags that
subcommand takes."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from rewardserve.server.config import ServeConfig
from rewardserve.trainer.bench.config import BenchConfig
from rewardserve.trainer.cli import RewardServeCommand
from rewardserve.trainer.client.config import ScoreConfig
from rewardserve.trainer.config import BestOfNConfig, CompareConfig, DemoConfig
from rewardserve.trainer.rl.config import PPOConfig
from rewardserve.trainer.rm.config import EvalConfig, LabelConfig, RMTrainConfig

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SUBCOMMANDS = {"serve": ServeConfig, "score": ScoreConfig, "train": RMTrainConfig, "eval": EvalConfig,
               "label": LabelConfig, "ppo": PPOConfig, "compare": CompareConfig, "demo": DemoConfig,
               "bench": BenchConfig, "best_of_n": BestOfNConfig}  # by field name: `best-of-n` on the command line
LINK = re.compile(r"(?<!!)\[[^\]]+\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


def flags_of(settings) -> set[str]:
    flags = set()
    for name, field in settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        flags |= {flag, "--no-" + name.replace("_", "-")} if field.annotation in (bool, "bool") else {flag}
    return flags | {"--help", "-h"}


def readme_commands(text: str) -> list[list[str]]:
    """Each `rewardserve ...` line of the bash code blocks, continuation lines joined, as argv."""
    commands, block, language = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block, language = [], line[3:].strip()
            else:
                if language in ("bash", "sh"):
                    commands += _commands_in("\n".join(block))
                block = None
        elif block is not None:
            block.append(line)
    return commands


def _commands_in(block: str) -> list[list[str]]:
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"^(\.venv/bin/)?rewardserve ", "rewardserve ", line.split(" # ")[0].strip())
        if line.startswith("rewardserve "):
            commands.append(shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " ").replace("&", " ")))
    return commands


def command_problems(argv: list[str]) -> list[str]:
    sub = argv[1].replace("-", "_")
    if sub not in SUBCOMMANDS:
        return [f"{' '.join(argv)}: no subcommand {sub}"]
    known = flags_of(SUBCOMMANDS[sub])
    flags = [a.split("=")[0] for a in argv[2:] if a.startswith("-") and a != "-"]
    return [f"rewardserve {sub}: no flag {flag}" for flag in flags if flag not in known]


def test_the_subcommand_table_is_the_cli_s():
    assert set(SUBCOMMANDS) == set(RewardServeCommand.model_fields)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_every_readme_command_parses():
    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) >= 8
    assert [problem for argv in commands for problem in command_problems(argv)] == []


def test_a_broken_link_and_a_wrong_flag_are_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](missing.md) [no anchor](#nowhere)\n")
    assert broken_links(page) == ["missing.md: no such file", "#nowhere: no heading #nowhere in page.md"]
    assert command_problems(["rewardserve", "serve", "--model", "m", "--verifer", "x=math"]) == \
        ["rewardserve serve: no flag --verifer"]
    assert command_problems(["rewardserve", "serv"]) == ["rewardserve serv: no subcommand serv"]
